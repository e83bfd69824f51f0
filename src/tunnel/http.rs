//! HTTP pieces both tunnel ends use: Kubernetes `Status` error bodies, hop-by-hop header
//! hygiene, splicing an upgraded connection (exec, attach, port-forward) byte for byte, and
//! counting the bytes of bodies and splices.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::upgrade::header_has_token;

/// Errors of bodies that come from more than one HTTP implementation (hyper, h2).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// HTTP/2 flow-control windows on every hop. The defaults (64 KiB) cap one stream at
/// window/RTT, which through a distant relay is a fraction of the line rate (frp's yamux ran
/// at 10-15% with 256 KiB); 4 MiB per stream covers a bandwidth-delay product of ~300 Mbit/s
/// at 100 ms. Windows are limits, not allocations: an idle watch costs nothing for them.
pub const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Every kubectl watch is one stream; a laptop with many `-w` windows needs headroom.
pub const H2_MAX_STREAMS: u32 = 1024;

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1).
/// `Connection` and `Upgrade` are kept for upgrade requests, which need them end to end.
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if keep_upgrade {
        // Only "Upgrade": other names listed in Connection would ask the next hop to drop
        // those headers, Impersonate-* among them.
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(header::HOST);
}

/// Whether a request asks to switch protocols (SPDY/3.1 or WebSocket).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && header_has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Watches: streams that stay open for hours and that clients (client-go's reflectors)
/// re-establish by themselves when they end. Decided as the apiserver decides: the query
/// decoded as a form, and `watch` read as Go's `strconv.ParseBool` reads it (`true`, `True`,
/// `1`, `t`...). A followed log (`follow=true`) is not one: `kubectl logs -f` takes its end for
/// the container's.
pub fn is_watch(path_and_query: &str) -> bool {
    let Some((_, query)) = path_and_query.split_once('?') else {
        return false;
    };
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "watch" && go_parse_bool(&v))
}

/// The values Go's `strconv.ParseBool` takes as true.
pub fn go_parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// A Kubernetes `Status` body, which kubectl prints as "Error from server (Reason): message".
pub fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gateway failure as plain text with status 502. kubectl shows a plain-text body verbatim
/// ("an error on the server (\"<text>\") ...") on every path, discovery included, whereas its
/// discovery client drops the message of a JSON `Status` and 503 replaces it with a generic one.
pub fn gateway_error(message: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(message.to_string())));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Once both sides have switched protocols, copies bytes both ways until each side is done.
///
/// The directions are independent: one failing ends only itself. Through a WebSocket a
/// close is not a TCP half-close (after the peer's Close no more data can be written), so a
/// write towards a closing tunnel may fail while the other direction still carries the
/// command's last output and exit status; aborting both, as `copy_bidirectional` does, could
/// drop those bytes. `held` is kept until the splice ends (a session's place on a gauge); the
/// caller spawns the splice where it is tracked. Returns the bytes copied each way.
pub async fn splice_upgraded(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    held: impl Send,
) -> Spliced {
    let _held = held;
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch did not complete");
            return Spliced::default();
        }
    };
    let (mut down_rd, mut down_wr) = tokio::io::split(TokioIo::new(down));
    let (mut up_rd, mut up_wr) = tokio::io::split(TokioIo::new(up));
    let to_upstream = copy_then_shutdown(&mut down_rd, &mut up_wr);
    let to_downstream = copy_then_shutdown(&mut up_rd, &mut down_wr);
    let (up_bytes, down_bytes) = tokio::join!(to_upstream, to_downstream);
    tracing::debug!(
        bytes.up = up_bytes,
        bytes.down = down_bytes,
        "upgraded stream closed"
    );
    Spliced {
        up: up_bytes,
        down: down_bytes,
    }
}

/// Bytes copied each way by a splice: from the client towards the upstream, and back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    pub up: u64,
    pub down: u64,
}

/// Copies until `from` ends, then shuts `to` down; the bytes read, also when it failed midway.
async fn copy_then_shutdown<R, W>(from: &mut R, to: &mut W) -> u64
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut counting = CountingReader {
        inner: from,
        read: 0,
    };
    let copied = tokio::io::copy(&mut counting, to).await;
    let _ = to.shutdown().await;
    if let Err(e) = copied {
        tracing::debug!(error = %e, "one direction of an upgraded stream ended with error");
    }
    counting.read
}

struct CountingReader<'a, R> {
    inner: &'a mut R,
    read: u64,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReader<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

/// A body whose data bytes are counted into `count`, when there is one (the agent's audit
/// log counts request bodies).
pub struct Counted<B> {
    inner: B,
    count: Option<Arc<AtomicU64>>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Option<Arc<AtomicU64>>) -> Counted<B> {
        Counted { inner, count }
    }

    /// Not counted.
    pub fn plain(inner: B) -> Counted<B> {
        Counted { inner, count: None }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(count), Poll::Ready(Some(Ok(frame)))) = (&this.count, &polled) {
            if let Some(data) = frame.data_ref() {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An error and its sources on one line, for messages a user reads.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counted_bodies_count_data_bytes() {
        let count = Arc::new(AtomicU64::new(0));
        let body = Counted::new(
            http_body_util::Full::new(Bytes::from_static(b"hello")),
            Some(count.clone()),
        );
        let got = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(count.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn watches_are_recognised() {
        assert!(is_watch("/api/v1/pods?watch=true&resourceVersion=1"));
        assert!(!is_watch("/api/v1/namespaces/d/pods/p/log?follow=true"));
        assert!(!is_watch("/api/v1/pods?limit=500"));
        assert!(!is_watch("/api/v1/pods"));
        // The apiserver reads these as true too.
        for q in ["watch=True", "watch=TRUE", "watch=t", "watch=%74rue"] {
            assert!(is_watch(&format!("/api/v1/pods?limit=1&{q}")), "{q}");
        }
        for q in [
            "watch=false",
            "watch=0",
            "watch=yes",
            "watchx=true",
            "label=watch%3Dtrue",
            "follow=True",
        ] {
            assert!(!is_watch(&format!("/api/v1/pods?{q}")), "{q}");
        }
    }
}

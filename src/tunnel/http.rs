//! HTTP pieces both tunnel ends use: Kubernetes `Status` error bodies, hop-by-hop header
//! hygiene, and splicing an upgraded connection (exec, attach, port-forward) byte for byte.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::upgrade::header_has_token;

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

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
    if !keep_upgrade {
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

/// Once both sides have switched protocols, copies bytes both ways until either side closes.
pub fn splice_upgraded(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    Ok((up_bytes, down_bytes)) => {
                        tracing::debug!(
                            bytes.up = up_bytes,
                            bytes.down = down_bytes,
                            "upgraded stream closed"
                        )
                    }
                    Err(e) => tracing::debug!(error = %e, "upgraded stream ended with error"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "protocol switch did not complete"),
        }
    });
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

//! Response bodies: whole ones, and the long-lived streams behind watches and `logs -f` that
//! hand each chunk to hyper as soon as it exists (a chunk in HTTP/1.1, a DATA frame in h2).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::Sleep;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).boxed_unsync()
}

/// Counts itself in a shared gauge while alive. Held by a streaming body, it makes "streams
/// open" mean exactly "bodies hyper has not dropped yet", which is when the client is gone.
pub struct CountGuard(Arc<AtomicUsize>);

impl CountGuard {
    pub fn new(gauge: &Arc<AtomicUsize>) -> CountGuard {
        gauge.fetch_add(1, Ordering::SeqCst);
        CountGuard(gauge.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Chunks from a channel until the sender goes away or the optional deadline passes.
pub struct Streaming {
    rx: mpsc::UnboundedReceiver<Bytes>,
    _guard: CountGuard,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Streaming {
    pub fn body(
        rx: mpsc::UnboundedReceiver<Bytes>,
        guard: CountGuard,
        timeout: Option<Duration>,
    ) -> Body {
        Streaming {
            rx,
            _guard: guard,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        }
        .boxed_unsync()
    }
}

impl hyper::body::Body for Streaming {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }
}

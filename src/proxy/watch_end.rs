//! Ends a watch cleanly when its tunnel breaks. A relay restart or network blip then looks to
//! the client like the apiserver closing the watch, which client-go's reflectors handle by
//! re-establishing it, instead of a protocol error mid-stream. A followed log is left to fail
//! as it broke: `kubectl logs -f` would take a clean end for the container's and exit 0.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub struct EndCleanly {
    inner: Incoming,
    done: bool,
}

impl EndCleanly {
    pub fn new(inner: Incoming) -> Self {
        EndCleanly { inner, done: false }
    }
}

impl Body for EndCleanly {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                tracing::info!(error = %e, "tunnel broke under a stream; ending it cleanly so the client re-establishes it");
                self.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

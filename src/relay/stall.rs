//! A deadline on writes that make no progress, for a connection's HTTP exchange: a caller that
//! sends requests and never reads the answers would otherwise hold its connection, its place
//! among the unauthenticated and the socket's send queue for as long as it likes, since
//! hyper's deadlines cover reading a request, not writing its answer. Once the connection is
//! upgraded into a listener or rendezvous the deadline is lifted ([`Lift`]): a slow reader is
//! then the splice's backpressure, as it should be.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub struct StallDeadline<IO> {
    io: IO,
    limit: Duration,
    /// Running while a write waits; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    lifted: Arc<AtomicBool>,
}

/// Lifts a [`StallDeadline`] for good.
#[derive(Clone)]
pub struct Lift(Arc<AtomicBool>);

impl Lift {
    pub fn lift(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl<IO> StallDeadline<IO> {
    pub fn new(io: IO, limit: Duration) -> (Self, Lift) {
        let lifted = Arc::new(AtomicBool::new(false));
        let stream = StallDeadline {
            io,
            limit,
            stalled: None,
            lifted: lifted.clone(),
        };
        (stream, Lift(lifted))
    }

    /// What a write's poll becomes: progress resets the deadline; waiting past it is an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() || self.lifted.load(Ordering::Acquire) {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing of the answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for StallDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StallDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMIT: Duration = Duration::from_millis(200);

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_times_the_writer_out_unless_lifted() {
        // Nobody reads the other end: the pipe fills and the write waits.
        let (a, _b) = tokio::io::duplex(1024);
        let (mut stalled, _) = StallDeadline::new(a, LIMIT);
        let started = tokio::time::Instant::now();
        let err = stalled.write_all(&[0u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= LIMIT);

        // Slow progress is not a stall: each read resets the deadline.
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut slow, _) = StallDeadline::new(a, LIMIT);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut got = 0;
            while got < 16 * 1024 {
                tokio::time::sleep(LIMIT / 2).await;
                got += b.read(&mut buf).await.unwrap();
            }
        });
        slow.write_all(&[0u8; 16 * 1024]).await.unwrap();
        reader.await.unwrap();

        // Lifted (the connection became a rendezvous): a write may wait as long as it must.
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut upgraded, lift) = StallDeadline::new(a, LIMIT);
        lift.lift();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(LIMIT * 10).await;
            let mut sink = Vec::new();
            b.read_to_end(&mut sink).await.unwrap();
            sink.len()
        });
        upgraded.write_all(&[0u8; 8 * 1024]).await.unwrap();
        drop(upgraded);
        assert_eq!(reader.await.unwrap(), 8 * 1024);
    }
}

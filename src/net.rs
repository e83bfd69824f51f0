//! Accepting TCP connections for the relay and the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection (with Nagle off: the tunnel carries small interactive writes), or
/// `None` once `shutdown` is cancelled. Accept errors such as EMFILE are logged and retried
/// after a short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}

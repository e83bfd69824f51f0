//! `/healthz` (the process runs) and `/readyz` (at least one listener is connected to the
//! relay), for the pod's probes.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// Probes come from the kubelet a few times a minute; anything beyond this many open
/// connections is not a probe and is turned away instead of holding memory.
pub const MAX_CONNECTIONS: usize = 16;
/// A probe sends its request at once; a client that has not within this time is dropped.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No probe connection lives longer than this, kept alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "health endpoint busy; dropping a connection");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| respond(req, shared.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(8 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let listening = shared.listening.load(Ordering::Relaxed);
    let (code, body) = match req.uri().path() {
        "/healthz" | "/livez" => (StatusCode::OK, "ok".to_string()),
        "/readyz" if listening > 0 => (
            StatusCode::OK,
            format!("ok: {listening} listener(s) connected"),
        ),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the relay".to_string(),
        ),
        _ => (StatusCode::NOT_FOUND, "try /healthz or /readyz".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start() -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca = crate::tls::CertificateAuthority::generate("test").unwrap();
        let uri = http::Uri::from_static("https://127.0.0.1:1");
        let upstream = crate::agent::Upstream::new(&uri, Some(ca.cert_pem().as_bytes())).unwrap();
        let shared = Arc::new(Shared {
            upstream: Arc::new(upstream),
            listening: AtomicUsize::new(1),
            streams: AtomicUsize::new(0),
            rendezvous: Arc::new(Semaphore::new(1)),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared, stop.clone()));
        (addr, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_surplus_connections_do_not_hold_the_endpoint() {
        let (addr, stop) = start().await;
        // Fill every slot with clients that never send a request.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        // One more is turned away at once while the slots are held.
        let mut surplus = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(1), surplus.read(&mut buf))
            .await
            .expect("a surplus connection is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The header deadline frees the slots: the silent clients are closed.
        tokio::time::sleep(HEADER_TIMEOUT + Duration::from_secs(1)).await;
        for mut c in silent {
            let n = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf))
                .await
                .expect("a silent connection is closed after the header deadline")
                .unwrap_or(0);
            assert!(
                n == 0 || buf.starts_with(b"HTTP/1.1 408"),
                "{:?}",
                &buf[..n]
            );
        }
        // And a real probe is served again.
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        probe.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        stop.cancel();
    }
}

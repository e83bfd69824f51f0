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
    serve_with(listener, shared, shutdown, HEADER_TIMEOUT).await
}

async fn serve_with(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    header_timeout: Duration,
) {
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
                .header_read_timeout(header_timeout)
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

    async fn start(header_timeout: Duration) -> (std::net::SocketAddr, CancellationToken) {
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
            rejecting: Arc::new(Semaphore::new(1)),
            replicas: Default::default(),
            hard_stop: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(listener, shared, stop.clone(), header_timeout));
        (addr, stop)
    }

    /// Generous: only a hang fails it.
    const WITHIN: Duration = Duration::from_secs(5);

    async fn closed(c: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(WITHIN, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            // hyper may answer a timed-out request with 408 before closing.
            Ok(Ok(n)) => buf[..n].starts_with(b"HTTP/1.1 408"),
            Err(_) => false,
        }
    }

    async fn probe(addr: std::net::SocketAddr) -> Vec<u8> {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WITHIN, c.read_to_end(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_turned_away() {
        let (addr, stop) = start(Duration::from_secs(600)).await;
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order, after every slot is taken: closed at once.
        let mut surplus = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut surplus).await,
            "a connection beyond the cap was held"
        );
        // The silent ones still hold their slots (their deadline is far away).
        let mut buf = [0u8; 1];
        let still_open = tokio::time::timeout(Duration::from_millis(200), silent[0].read(&mut buf));
        assert!(
            still_open.await.is_err(),
            "a silent connection was closed early"
        );
        drop(silent);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_closed_at_the_header_deadline() {
        let (addr, stop) = start(Duration::from_millis(300)).await;
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for c in &mut silent {
            assert!(
                closed(c).await,
                "a silent connection outlived the header deadline"
            );
        }
        // The slots are free again: a real probe is served.
        let answer = probe(addr).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        stop.cancel();
    }
}

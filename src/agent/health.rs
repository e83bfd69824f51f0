//! `/healthz` (the process runs) and `/readyz` (at least one listener is connected to the
//! relay), for the pod's probes.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
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

//! Serving one rendezvous stream: HTTP (1.1 or 2, detected from the preface) from the proxy,
//! forwarded to the apiserver. Upgrades (exec, attach, port-forward) are answered by the
//! apiserver and then spliced byte for byte.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::identity::Authenticator;
use super::upstream::Upstream;
use crate::metrics::{kube_verb, session_kind, AgentMetrics};
use crate::tunnel::http::{
    error_chain, gateway_error, is_long_lived, is_upgrade, splice_upgraded, status,
    strip_hop_by_hop, Body, H2_CONNECTION_WINDOW, H2_MAX_STREAMS, H2_STREAM_WINDOW,
};
use crate::tunnel::request_id;

/// Serves HTTP over one tunnelled byte stream until the proxy closes it or the agent drains.
/// Draining, the stream takes no new requests (HTTP/2 GOAWAY, so the proxy moves them to a
/// new rendezvous, or `Connection: close` on HTTP/1.1) and those in flight finish, within the
/// agent's drain deadline. Upgraded sessions (exec, attach, port-forward) run in `sessions`,
/// which the agent waits for too.
pub async fn serve<S>(
    io: S,
    upstream: Arc<Upstream>,
    auth: Arc<Authenticator>,
    metrics: AgentMetrics,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let (upstream, auth, metrics) = (upstream.clone(), auth.clone(), metrics.clone());
        let sessions = sessions.clone();
        async move {
            let verb = kube_verb(
                req.method(),
                req.uri().path_and_query().map_or("/", |p| p.as_str()),
            );
            let resp = forward(req, upstream, auth, &metrics, sessions).await;
            if let Ok(resp) = &resp {
                metrics.request(verb, resp.status().as_u16());
            }
            resp
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(1024 * 1024);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %error_chain(&*e), "tunnel stream ended with error");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    upstream: Arc<Upstream>,
    auth: Arc<Authenticator>,
    metrics: &AgentMetrics,
    sessions: TaskTracker,
) -> Result<Response<Body>, Infallible> {
    if let Err(refused) = auth.authorize(req.headers_mut(), &upstream).await {
        metrics.auth_failure(refusal_reason(refused.status()));
        return Ok(refused);
    }
    let upgrade = is_upgrade(&req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // The proxy's id (callers other than our proxy get one here), which the apiserver keeps.
    let request_id = request_id::ensure(req.headers_mut());
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let uri = match upstream.uri_for(&pq) {
        Ok(u) => u,
        Err(_) => return Ok(status(400, "BadRequest", "request path is not a valid URI")),
    };
    *req.uri_mut() = uri;
    // The upstream connection's own protocol decides; hyper refuses an h2-tagged request on h1.
    *req.version_mut() = Version::HTTP_11;
    let started = std::time::Instant::now();
    let method = req.method().clone();

    if upgrade {
        let downstream = hyper::upgrade::on(&mut req);
        return Ok(match upstream.upgrades.request(req).await {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let session = session_kind(&pq).map(|kind| metrics.session(kind));
                    sessions.spawn(splice_upgraded(
                        downstream,
                        hyper::upgrade::on(&mut resp),
                        session,
                    ));
                }
                tracing::debug!(%request_id, %method, path = %pq, status = resp.status().as_u16(), "upgrade forwarded");
                resp.map(|b| b.boxed_unsync())
            }
            Err(e) => unreachable_apiserver(&upstream, &e),
        });
    }

    // Long-lived streams get HTTP/1.1 connections of their own. On the shared HTTP/2
    // connection they would use up the apiserver's streams per connection (100 on current
    // kube-apiservers); hyper's pool opens no second connection, so every request after them
    // would wait forever.
    let client = if is_long_lived(&pq) {
        &upstream.streams
    } else {
        &upstream.client
    };
    Ok(match client.request(req).await {
        Ok(resp) => {
            tracing::debug!(%request_id, %method, path = %pq, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "forwarded");
            resp.map(|b| b.boxed_unsync())
        }
        Err(e) => unreachable_apiserver(&upstream, &e),
    })
}

/// Why the agent turned a caller away, from the status it answered with.
fn refusal_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthenticated",
        403 => "forbidden",
        400 => "bad_request",
        _ => "unavailable",
    }
}

fn unreachable_apiserver(
    upstream: &Upstream,
    e: &hyper_util::client::legacy::Error,
) -> Response<Body> {
    let detail = error_chain(e);
    tracing::warn!(apiserver = upstream.base(), error = %detail, "apiserver request failed");
    gateway_error(&format!(
        "clusterconnect agent cannot reach the apiserver at {}: {detail}",
        upstream.base()
    ))
}

//! Serving one rendezvous stream: HTTP (1.1 or 2, detected from the preface) from the proxy,
//! forwarded to the apiserver. Upgrades (exec, attach, port-forward) are answered by the
//! apiserver and then spliced byte for byte. Each request runs in a span naming its request
//! id, cluster, rendezvous (`sb_hc_id`), method and path, and, with `--audit-log`, gets its
//! audit line (see `audit`).

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
use tracing::Instrument;

use super::audit::{self, AuditLog, Entry, Identity, Who};
use super::h2_pool::Sent;
use super::identity::{Authenticator, Caller};
use super::upstream::Upstream;
use crate::metrics::{kube_verb, session_kind, AgentMetrics};
use crate::tunnel::http::{
    error_chain, gateway_error, is_upgrade, splice_upgraded, status, strip_hop_by_hop, Body,
    BoxError, Counted, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW,
};
use crate::tunnel::request_id;

/// What every tunnelled request is served with.
pub struct Served {
    pub upstream: Arc<Upstream>,
    pub auth: Arc<Authenticator>,
    pub audit: Option<Arc<AuditLog>>,
    /// The hybrid connection, which names the cluster in logs and audit lines.
    pub cluster: Arc<str>,
    pub metrics: AgentMetrics,
    /// Where upgraded sessions (exec, attach, port-forward) run: the agent waits for them
    /// when it drains.
    pub sessions: TaskTracker,
    /// The drain period is over: close at once.
    pub hard_stop: CancellationToken,
    /// Told when this stream's first request arrives (see [`serve`]).
    pub first_request: FirstRequest,
    /// HTTP/2 streams this tunnel stream carries at once.
    pub max_concurrent_streams: u32,
}

/// Whether a stream has carried a request yet, and a way to wait for its first.
#[derive(Default)]
pub struct FirstRequest {
    seen: std::sync::atomic::AtomicBool,
    arrived: tokio::sync::Notify,
}

impl FirstRequest {
    fn arrive(&self) {
        if !self.seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // A stored permit: a wait that starts later still sees it.
            self.arrived.notify_one();
        }
    }
}

/// How long a draining agent waits for the first request of a stream opened just before it
/// left the relay: that request is already on its way and would otherwise be cut unread.
const FIRST_REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves HTTP over one tunnelled byte stream until the proxy closes it or the agent drains.
/// Draining (`shutdown`), the stream takes no new requests (HTTP/2 GOAWAY, so the proxy moves
/// them to a new rendezvous, or `Connection: close` on HTTP/1.1) and those in flight finish,
/// within the agent's drain deadline. `rendezvous` is the stream's `sb-hc-id`, logged with
/// each request.
pub async fn serve<S>(io: S, served: Arc<Served>, rendezvous: Arc<str>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // hyper runs HTTP/2 streams in tasks of their own, outside this (the rendezvous) span:
    // each request's span names it as its parent.
    let parent = tracing::Span::current();
    let service = {
        let served = served.clone();
        // Boxed: hyper keeps each stream's task (sized for this future) for as long as the
        // response streams, and a watch streams for hours; boxed, the future is freed once
        // the response is handed over and the task stays small.
        service_fn(move |req| {
            Box::pin(forward(
                req,
                served.clone(),
                rendezvous.clone(),
                parent.clone(),
            ))
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(served.max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(1024 * 1024);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = shutdown.cancelled() => {
            if !served.first_request.seen.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::select! {
                    ended = conn.as_mut() => return log_end(ended),
                    _ = served.first_request.arrived.notified() => {}
                    _ = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
                    _ = served.hard_stop.cancelled() => return,
                }
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                ended = conn.as_mut() => ended,
                _ = served.hard_stop.cancelled() => return,
            }
        }
        _ = served.hard_stop.cancelled() => return,
    };
    log_end(ended);
}

fn log_end(ended: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = ended {
        tracing::debug!(error = %error_chain(&*e), "tunnel stream ended with error");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    served: Arc<Served>,
    rendezvous: Arc<str>,
    parent: tracing::Span,
) -> Result<Response<Body>, Infallible> {
    served.first_request.arrive();
    // The proxy's id (callers other than our proxy get one here), which the apiserver keeps.
    let request_id = request_id::ensure(req.headers_mut());
    // No query in the span: it is not needed to follow a call, and may hold anything.
    let span = tracing::info_span!(
        parent: &parent,
        "request",
        %request_id,
        cluster = %served.cluster,
        sb_hc_id = %rendezvous,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let entry = served.audit.as_ref().map(|log| {
        Entry::new(
            log.clone(),
            &request_id,
            req.method(),
            req.uri(),
            req.headers(),
        )
    });
    let verb = kube_verb(
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
    );
    let resp = forward_audited(req, &served, entry).instrument(span).await;
    served.metrics.request(verb, resp.status().as_u16());
    Ok(resp)
}

async fn forward_audited(
    mut req: Request<Incoming>,
    served: &Served,
    mut entry: Option<Entry>,
) -> Response<Body> {
    let upstream = &served.upstream;
    let presented = entry
        .as_ref()
        .map(|_| served.auth.credential(req.headers()));
    // Boxed, as are the other paths that are large or rare below (Entra validation, upgrades,
    // HTTP/1.1): this future is alive for every request in flight, and what a burst of them
    // held stays resident after it (freed heap the allocator keeps).
    let caller = match Box::pin(served.auth.authorize(req.headers_mut(), upstream)).await {
        Ok(caller) => caller,
        Err(refused) => {
            tracing::debug!(status = refused.status().as_u16(), "refused by the agent");
            served
                .metrics
                .auth_failure(refusal_reason(refused.status()));
            return match (entry, presented) {
                (Some(mut entry), Some(presented)) => {
                    entry.set_identity(Identity::Known(Arc::new(Who::unknown(presented))));
                    entry.respond(refused)
                }
                _ => refused,
            };
        }
    };
    if let Some(entry) = entry.as_mut() {
        entry.set_identity(match caller {
            Caller::Entra { user, groups } => Identity::Known(Arc::new(Who {
                user: Some(user),
                groups,
                credential: audit::Credential::Entra,
            })),
            // Passed through: the apiserver judges the token, a TokenReview names it.
            Caller::PassThrough => match audit::bearer(req.headers()) {
                Some(token) => entry.log().identify(token, upstream),
                None => Identity::Known(Arc::new(Who::unknown(audit::Credential::None))),
            },
        });
    }
    let upgrade = is_upgrade(&req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let uri = match upstream.uri_for(&pq) {
        Ok(u) => u,
        Err(_) => {
            let refused = status(400, "BadRequest", "request path is not a valid URI");
            return respond(entry, refused);
        }
    };
    *req.uri_mut() = uri;
    // The upstream connection's own protocol decides; hyper refuses an h2-tagged request on h1.
    *req.version_mut() = Version::HTTP_11;
    let started = std::time::Instant::now();
    let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|body| match &entry {
        Some(entry) => entry.count_request(body),
        None => Counted::plain(body),
    });

    if let Some(downstream) = downstream {
        return Box::pin(forward_upgrade(req, downstream, served, entry, &pq)).await;
    }

    // Requests and watches share the pooled HTTP/2 connections, as many on each as the
    // apiserver allows; an apiserver without HTTP/2 gets HTTP/1.1, a connection per request
    // in flight.
    let sent = match &upstream.h2 {
        Some(pool) => match pool.send(req).await {
            Ok(Sent::Response(resp)) => Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync())),
            Ok(Sent::Http1(req)) => Box::pin(http1(upstream, req)).await,
            Err(e) => Err(BoxError::from(e)),
        },
        None => Box::pin(http1(upstream, req)).await,
    };
    match sent {
        Ok(resp) => {
            tracing::debug!(
                status = resp.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "forwarded"
            );
            respond(entry, resp)
        }
        Err(e) => respond(entry, unreachable_apiserver(upstream, &*e)),
    }
}

/// An upgrade (exec, attach, port-forward): answered by the apiserver over an HTTP/1.1
/// connection of its own, then spliced byte for byte.
async fn forward_upgrade(
    req: Request<Counted<Incoming>>,
    downstream: hyper::upgrade::OnUpgrade,
    served: &Served,
    mut entry: Option<Entry>,
    pq: &str,
) -> Response<Body> {
    let upstream = &served.upstream;
    match upstream.upgrades.request(req).await {
        Ok(mut resp) => {
            tracing::debug!(status = resp.status().as_u16(), "upgrade forwarded");
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_side = hyper::upgrade::on(&mut resp);
                if let Some(entry) = entry.as_mut() {
                    entry.session_start();
                }
                let session = session_kind(pq).map(|kind| served.metrics.session(kind));
                let hard_stop = served.hard_stop.clone();
                served.sessions.spawn(async move {
                    let spliced = tokio::select! {
                        bytes = splice_upgraded(downstream, upstream_side, session) => Some(bytes),
                        // Past the drain period: closed, its end line written on drop.
                        _ = hard_stop.cancelled() => None,
                    };
                    if let (Some(entry), Some(bytes)) = (entry, spliced) {
                        entry.session_end(bytes.up, bytes.down);
                    }
                });
                return resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
            }
            respond(
                entry,
                resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
            )
        }
        Err(e) => respond(entry, unreachable_apiserver(upstream, &e)),
    }
}

async fn http1(
    upstream: &Upstream,
    req: Request<Counted<Incoming>>,
) -> Result<Response<Body>, BoxError> {
    match upstream.streams.request(req).await {
        Ok(resp) => Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync())),
        Err(e) => Err(e.into()),
    }
}

/// The answer, with its audit line to come when there is one.
fn respond(entry: Option<Entry>, resp: Response<Body>) -> Response<Body> {
    match entry {
        Some(entry) => entry.respond(resp),
        None => resp,
    }
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

fn unreachable_apiserver(upstream: &Upstream, e: &dyn std::error::Error) -> Response<Body> {
    let detail = error_chain(e);
    tracing::warn!(apiserver = upstream.base(), error = %detail, "apiserver request failed");
    gateway_error(&format!(
        "clusterconnect agent cannot reach the apiserver at {}: {detail}",
        upstream.base()
    ))
}

//! Tunnelled connections to the agent, through the relay. Ordinary requests share a few
//! long-lived HTTP/2 connections, each over one rendezvous WebSocket, so a burst of kubectl
//! calls costs no new relay handshakes. Upgrades get a dedicated HTTP/1.1 rendezvous each.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{CredentialError, CredentialSource};
use crate::metrics::ProxyMetrics;
use crate::tunnel::dial::{dial_stream, DialError, RelayIo};
use crate::tunnel::http::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW};
use crate::tunnel::keepalive::{PING_INTERVAL, PING_TIMEOUT};
use crate::tunnel::protocol::{Action, RelayAddress};
use crate::tunnel::sas::SasKey;
use crate::tunnel::WsStream;

/// What the proxy sends through the tunnel: kubectl's request bodies, or its own probes.
pub type SendBody = BoxBody<Bytes, hyper::Error>;

/// How the proxy reaches one cluster's agent.
#[derive(Clone)]
pub struct RelayTarget {
    pub relay: RelayAddress,
    pub entity: String,
    pub send: SendCredential,
    pub tls: Arc<ClientConfig>,
}

/// Where the relay Send tokens come from.
#[derive(Clone)]
pub enum SendCredential {
    /// A rule's key: the proxy mints its own tokens.
    Key(SasKey),
    /// Tokens issued by someone else (the registry's `listClusterUserCredential`), renewed
    /// ahead of expiry by the source.
    Issued(Arc<dyn CredentialSource>),
}

/// Send tokens are minted per connection and only need to outlive the handshake.
const SEND_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP over the tunnel failed")]
    Http(#[from] hyper::Error),
    #[error("no relay send token")]
    SendToken(#[from] CredentialError),
    #[error("every agent this request reached was shutting down; retry")]
    Draining,
    #[error("the pool holds its maximum of {0} connections")]
    PoolFull(usize),
}

impl RelayTarget {
    /// A fresh rendezvous and its `sb-hc-id`, which the relay and the agent log too (with the
    /// relay's `_<suffix>` added), so one tunnel can be followed across the three logs.
    async fn open(&self) -> Result<(Arc<str>, WsStream<RelayIo>), TunnelError> {
        let id: Arc<str> = Uuid::new_v4().to_string().into();
        let io = self.dial(&id).await?;
        tracing::debug!(sb_hc_id = %id, "rendezvous opened");
        Ok((id, io))
    }

    async fn dial(&self, id: &str) -> Result<WsStream<RelayIo>, TunnelError> {
        let url = self.relay.url(&self.entity, Action::Connect, id);
        let source = match &self.send {
            SendCredential::Key(key) => {
                let token = key.mint(&self.relay.resource_uri(&self.entity), SEND_TOKEN_TTL);
                return Ok(dial_stream(&url, Some(&token), &self.tls).await?);
            }
            SendCredential::Issued(source) => source,
        };
        let token = source.token().await?;
        match dial_stream(&url, Some(&token), &self.tls).await {
            // An issued token stops working before its expiry when its key is renewed: one
            // fresh token, and the refusal stands if that is refused too (the role is gone).
            Err(e) if e.is_auth() => {
                tracing::info!(source = %source.describe(), "relay refused the send token; fetching a fresh one");
                source.refused(&token);
                let token = source.token().await?;
                Ok(dial_stream(&url, Some(&token), &self.tls).await?)
            }
            dialed => Ok(dialed?),
        }
    }

    /// Opens a dedicated HTTP/1.1 tunnel for one upgrade request and sends it.
    pub async fn send_upgrade(
        &self,
        req: Request<SendBody>,
    ) -> Result<Response<Incoming>, TunnelError> {
        let (id, io) = self.open().await?;
        tracing::Span::current().record("sb_hc_id", &*id);
        let (mut sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upgrade tunnel ended with error");
                }
            }
            .instrument(tracing::info_span!("rendezvous", sb_hc_id = %id)),
        );
        Ok(sender.send_request(req).await?)
    }
}

/// HTTP/2 connections over rendezvous streams: at least [`POOL_SIZE`], more while every one
/// carries its [`PoolLimits::streams_per_connection`] (watches hold a stream for hours), up to
/// [`PoolLimits::max_connections`]; re-opened when they fail.
pub struct Pool {
    target: RelayTarget,
    conns: Mutex<Vec<Pooled>>,
    /// One dial at a time: a burst of requests waits for one new connection, not many.
    dialing: Mutex<()>,
    limits: PoolLimits,
    opened: AtomicU64,
    /// The cluster's name, which labels its metrics.
    name: String,
    metrics: ProxyMetrics,
}

/// How far a pool grows.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    /// Requests in flight on one connection before another is opened: under the agent's
    /// HTTP/2 stream limit (1024), past which requests would queue on the connection.
    pub streams_per_connection: usize,
    /// Connections (rendezvous) one cluster's pool holds at most; past that, requests wait
    /// for a stream on the least busy one.
    pub max_connections: usize,
}

/// `proxy --streams-per-connection`'s default.
pub const STREAMS_PER_CONNECTION: usize = 1000;
/// Connections per cluster at most (64 of 1,000 streams: 64,000 requests and watches open).
pub const MAX_CONNECTIONS: usize = 64;

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            streams_per_connection: STREAMS_PER_CONNECTION,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// One connection of the pool, numbered so that a caller discarding a connection that failed
/// it does not throw away a newer one.
#[derive(Clone)]
struct Pooled {
    id: u64,
    sender: http2::SendRequest<SendBody>,
    /// The rendezvous' `sb-hc-id`, which relay and agent log too.
    rendezvous: Arc<str>,
    /// Requests in flight on it, responses still streaming included.
    open: Arc<AtomicUsize>,
}

/// A request's place on its connection, given back when the response (body included) is
/// done with: kept in the response's extensions until its body is dropped.
#[derive(Clone)]
pub struct StreamSlot {
    _place: Arc<SlotInner>,
}

struct SlotInner(Arc<AtomicUsize>);

impl Drop for SlotInner {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StreamSlot {
    fn take(open: &Arc<AtomicUsize>) -> StreamSlot {
        open.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            _place: Arc::new(SlotInner(open.clone())),
        }
    }
}

/// Two connections at least: one rendezvous failing (a relay node restarting) leaves the
/// other warm.
pub const POOL_SIZE: usize = 2;

/// Times one request is sent at most: the first connection may be draining (its agent is
/// stopping), and so may the next one if it was opened to the same agent at that moment.
const SEND_ATTEMPTS: usize = 3;

/// Why a request did not get a response on one connection.
enum Failed {
    /// The request never left: the connection had gone (or was going away) before it was
    /// sent. It is handed back to be sent elsewhere.
    Unsent(Box<Request<SendBody>>),
    Sent(hyper::Error),
}

impl Pool {
    pub fn new(
        target: RelayTarget,
        limits: PoolLimits,
        (name, metrics): (&str, &ProxyMetrics),
    ) -> Self {
        Pool {
            target,
            conns: Mutex::new(Vec::new()),
            dialing: Mutex::new(()),
            limits: PoolLimits {
                streams_per_connection: limits.streams_per_connection.max(1),
                max_connections: limits.max_connections.max(POOL_SIZE),
            },
            opened: AtomicU64::new(0),
            name: name.to_string(),
            metrics: metrics.clone(),
        }
    }

    /// Sends an upgrade request over a dedicated tunnel of its own.
    pub async fn send_upgrade(
        &self,
        req: Request<SendBody>,
    ) -> Result<Response<Incoming>, TunnelError> {
        let sent = self.target.send_upgrade(req).await;
        self.count(sent.as_ref().map(|_| ()));
        sent
    }

    /// A tunnel opened, or why not.
    fn count(&self, opened: Result<(), &TunnelError>) {
        let reason = match opened {
            // The rendezvous was made; only HTTP over it failed.
            Ok(()) | Err(TunnelError::Http(_)) => {
                self.metrics.tunnel_opened(&self.name);
                return;
            }
            Err(TunnelError::Dial(d)) if d.is_no_listener() => "no_listener",
            Err(TunnelError::Dial(d)) if d.is_auth() => {
                self.metrics.auth_failure("relay");
                "refused"
            }
            Err(TunnelError::Dial(DialError::Rejected { .. })) => "rejected",
            Err(TunnelError::Dial(DialError::Connect { .. } | DialError::ConnectTimeout(..))) => {
                "connect"
            }
            Err(TunnelError::SendToken(_)) => "credential",
            Err(TunnelError::Draining) => "draining",
            Err(TunnelError::PoolFull(_)) => "pool_full",
            Err(TunnelError::Dial(_)) => "other",
        };
        self.metrics.tunnel_failed(&self.name, reason);
    }

    /// Sends `req` on a pooled connection (the caller's span learns its `sb_hc_id`). A connection whose agent is draining (HTTP/2
    /// GOAWAY) is dropped from the pool and the request goes on a fresh rendezvous, which the
    /// relay gives to an agent still listening: when the request never left, or when the
    /// agent's GOAWAY says it did not process it (then only a request without a body, which
    /// can be sent again as it was).
    pub async fn send(
        &self,
        mut req: Request<SendBody>,
    ) -> Result<Response<Incoming>, TunnelError> {
        let mut attempt = 1;
        loop {
            let replay = bodiless_copy(&req);
            let pooled = self.connection().await?;
            tracing::Span::current().record("sb_hc_id", &*pooled.rendezvous);
            let slot = StreamSlot::take(&pooled.open);
            let failed = match send_on(pooled.sender, req).await {
                Ok(mut resp) => {
                    resp.extensions_mut().insert(slot);
                    return Ok(resp);
                }
                Err(failed) => failed,
            };
            drop(slot);
            self.discard(pooled.id).await;
            req = match failed {
                Failed::Unsent(req) => *req,
                Failed::Sent(e) => match replay {
                    Some(again) if not_processed(&e) => again,
                    _ => return Err(e.into()),
                },
            };
            if attempt == SEND_ATTEMPTS {
                return Err(TunnelError::Draining);
            }
            attempt += 1;
            tracing::debug!(
                attempt,
                "the agent is draining this connection; sending on a fresh one"
            );
        }
    }

    /// Opens a pooled connection now (the proxy's start-up check).
    pub async fn warm_up(&self) -> Result<(), TunnelError> {
        self.connection().await.map(|_| ())
    }

    /// The least busy live connection below its stream limit, or a new one (the first
    /// [`POOL_SIZE`] are opened as they are needed, later ones when every connection is at its
    /// limit, up to the pool's maximum).
    async fn connection(&self) -> Result<Pooled, TunnelError> {
        if let Some(pooled) = self.pick(false).await {
            return Ok(pooled);
        }
        let _dialing = self.dialing.lock().await;
        // Another caller's dial may have made room meanwhile.
        if let Some(pooled) = self.pick(false).await {
            return Ok(pooled);
        }
        // Boxed: rare, and large (relay dial, TLS, WebSocket and HTTP/2 handshakes); inline,
        // every request's future would be its size, and what a burst of requests in flight
        // held stays resident after it.
        match Box::pin(self.open()).await {
            Ok(pooled) => Ok(pooled),
            // At the maximum, or a dial failing: a live connection still serves, its
            // requests queued behind its streams.
            Err(e) => self.pick(true).await.ok_or(e),
        }
    }

    /// A live connection: the least busy one with room, or (`any`) the least busy at all.
    async fn pick(&self, any: bool) -> Option<Pooled> {
        let mut conns = self.conns.lock().await;
        conns.retain(|p| !p.sender.is_closed());
        if !any && conns.len() < POOL_SIZE {
            return None;
        }
        let limit = self.limits.streams_per_connection;
        conns
            .iter()
            .filter(|p| any || p.open.load(Ordering::Acquire) < limit)
            .min_by_key(|p| p.open.load(Ordering::Acquire))
            .cloned()
    }

    async fn open(&self) -> Result<Pooled, TunnelError> {
        if self.conns.lock().await.len() >= self.limits.max_connections {
            return Err(TunnelError::PoolFull(self.limits.max_connections));
        }
        let opened = self.target.open().await;
        self.count(opened.as_ref().map(|_| ()));
        let (rendezvous, io) = opened?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(1024 * 1024)
            // Keeps the rendezvous alive through idle-dropping load balancers, and notices a
            // dead relay or agent before the next kubectl call does.
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            // Boxed: hyper sizes the task it spawns for each request by its connection task,
            // which holds the IO inline (TLS and WebSocket state, over 1 KiB).
            .handshake(TokioIo::new(Box::new(io)))
            .await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "pooled tunnel connection ended");
                }
            }
            .instrument(tracing::info_span!("rendezvous", sb_hc_id = %rendezvous)),
        );
        let id = self.opened.fetch_add(1, Ordering::Relaxed);
        let pooled = Pooled {
            id,
            sender,
            rendezvous,
            open: Arc::default(),
        };
        let mut conns = self.conns.lock().await;
        conns.push(pooled.clone());
        tracing::debug!(connections = conns.len(), sb_hc_id = %pooled.rendezvous, "opened pooled tunnel connection");
        Ok(pooled)
    }

    /// Forgets the connection `id`, so the next request opens a new rendezvous.
    async fn discard(&self, id: u64) {
        self.conns.lock().await.retain(|p| p.id != id);
    }
}

async fn send_on(
    mut sender: http2::SendRequest<SendBody>,
    req: Request<SendBody>,
) -> Result<Response<Incoming>, Failed> {
    if sender.ready().await.is_err() {
        return Err(Failed::Unsent(Box::new(req)));
    }
    sender
        .try_send_request(req)
        .await
        .map_err(|mut e| match e.take_message() {
            Some(req) => Failed::Unsent(Box::new(req)),
            None => Failed::Sent(e.into_error()),
        })
}

/// The same request again, when it has no body (GET, DELETE, watch): headers are all of it.
fn bodiless_copy(req: &Request<SendBody>) -> Option<Request<SendBody>> {
    if !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether the agent said it never processed the stream: a GOAWAY naming a last stream below
/// it, or REFUSED_STREAM (RFC 9113, section 8.7: safe to retry whatever the method).
fn not_processed(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

//! The agent: runs next to the cluster, keeps listener control channels open to the relay
//! (outbound only), and serves each tunnelled connection by forwarding to the apiserver.

pub mod audit;
mod forward;
mod h2_pool;
mod health;
pub mod heartbeat;
mod identity;
mod key;
mod listener;
mod replicas;
mod review;
mod token_review;
mod upstream;

pub use audit::{AuditLog, Target as AuditTarget};
pub use h2_pool::APISERVER_CONNECTIONS;
pub use identity::{AuthMode, Authenticator, Caller, EntraAuth, PopSettings};
pub use key::{KeySource, POLL_INTERVAL as KEY_POLL_INTERVAL};
pub use review::strip_impersonation;
pub use upstream::{Loaded, Upstream, UpstreamError};

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tunnel::protocol::RelayAddress;

pub struct AgentConfig {
    pub relay: RelayAddress,
    /// The hybrid connection (one per cluster).
    pub entity: String,
    /// The Listen rule's key, re-read from its file when that changes (key rotation).
    pub key: Arc<KeySource>,
    pub relay_tls: Arc<ClientConfig>,
    /// Control channels to keep open; the relay spreads senders across them.
    pub listeners: usize,
    /// Distinct relay replicas the listeners should sit on when the relay runs as several
    /// (`--relay-replicas`); a single relay is unaffected.
    pub relay_replicas: usize,
    pub token_ttl: Duration,
    /// Who may connect and as whom the apiserver sees them.
    pub auth: Arc<Authenticator>,
    /// Tunnel streams (rendezvous) open at once; see [`MAX_STREAMS`].
    pub max_streams: usize,
    /// HTTP/2 streams (requests and watches) one tunnel stream carries at once; the proxy
    /// opens another tunnel stream before it reaches this (`proxy --streams-per-connection`).
    pub streams_per_connection: u32,
    /// On shutdown, how long requests and sessions in flight may take to finish.
    pub drain: Duration,
    /// Counted into as the agent works; served when the CLI registered them.
    pub metrics: crate::metrics::AgentMetrics,
    /// Where each request and session is recorded (`--audit-log`), if anywhere.
    pub audit: Option<Arc<AuditLog>>,
}

/// One hour, as Azure's own clients mint; renewal happens at three quarters of it.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Open tunnel streams (rendezvous) at once, by default (`agent --max-streams`). Each pooled
/// stream multiplexes many requests; each watch, exec or port-forward takes one.
pub const MAX_STREAMS: usize = 4096;
/// On shutdown, requests and sessions in flight get this long to finish, by default
/// (`agent --drain-timeout`): under the 30 s Kubernetes gives a pod by default.
pub const DRAIN: Duration = Duration::from_secs(25);
/// After the drain period, what is still open gets this long to close (and queue its audit
/// line).
pub const HARD_STOP: Duration = Duration::from_secs(1);
/// Then the audit log gets this long to write out its queued lines: drain, hard stop and this
/// stay under the manifests' 30 s grace period.
pub const AUDIT_FLUSH: Duration = Duration::from_secs(3);

/// Busy answers dialed back at once; past this, a sender the agent has no room for is left
/// to the relay's accept timeout rather than costing the agent a dial each.
pub const MAX_REJECTING: usize = 64;

pub(crate) struct Shared {
    pub upstream: Arc<Upstream>,
    pub listening: AtomicUsize,
    pub streams: AtomicUsize,
    pub rendezvous: Arc<Semaphore>,
    /// Busy answers being dialed back (each a short TLS dial), at most [`MAX_REJECTING`].
    pub rejecting: Arc<Semaphore>,
    /// The relay replicas the listeners hold and the names they announced.
    pub replicas: replicas::ReplicaView,
    /// Cancelled when the drain period is over: what is still open is closed (and its audit
    /// line written) before the agent exits.
    pub hard_stop: CancellationToken,
}

/// Runs until `shutdown` is cancelled, then drains: the listeners leave the relay first, so
/// no new sender is handed to this agent; then the tunnel streams take no new requests
/// (GOAWAY: the proxy sends them to another agent); then those in flight and open sessions
/// get [`AgentConfig::drain`] to finish. A relay that refuses the agent's key is retried with
/// back-off (the key file is re-read each time): rotating the key fixes a running agent.
pub async fn run(
    config: AgentConfig,
    upstream: Upstream,
    health: Option<TcpListener>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        upstream: Arc::new(upstream),
        listening: AtomicUsize::new(0),
        streams: AtomicUsize::new(0),
        rendezvous: Arc::new(Semaphore::new(config.max_streams.max(1))),
        rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
        replicas: Default::default(),
        hard_stop: CancellationToken::new(),
    });
    let tasks = TaskTracker::new();
    if let Some(h) = health {
        tokio::spawn(health::serve(h, shared.clone(), shutdown.clone()));
    }
    tracing::info!(apiserver = shared.upstream.base(), connection = %config.entity, listeners = config.listeners, "agent starting");
    tokio::spawn({
        let key = config.key.clone();
        let shutdown = shutdown.clone();
        async move { key.watch(key::POLL_INTERVAL, shutdown).await }
    });
    let streams = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..config.listeners.max(config.relay_replicas).max(1) {
        set.spawn(listener::run(
            i,
            config.clone(),
            shared.clone(),
            tasks.clone(),
            (shutdown.clone(), streams.clone()),
        ));
    }
    // The whole drain, leaving the relay included, fits in `config.drain` from the signal;
    // then closing what is left and writing the audit log's last lines take a few seconds
    // more, all inside the pod's grace period (manifests: 30 s against 25 s of drain).
    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + config.drain;
    let left =
        tokio::time::timeout_at(deadline, async { while set.join_next().await.is_some() {} });
    if left.await.is_err() {
        tracing::warn!("the listeners did not leave the relay within the drain period");
    }
    streams.cancel();
    tasks.close();
    let open = shared.streams.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        open_streams = open,
        drain_secs = config.drain.as_secs(),
        "left the relay; draining requests and sessions in flight"
    );
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_secs = config.drain.as_secs(),
            "drain period over; closing what is still open"
        );
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(HARD_STOP, tasks.wait()).await;
    }
    if let Some(audit) = &config.audit {
        audit.close(AUDIT_FLUSH).await;
    }
}

//! The relay: the one place both sides dial out to. It speaks the Azure Relay Hybrid
//! Connections protocol, checks SAS tokens against its rules, pairs each sender with a
//! listener and then splices their WebSockets without looking inside.

mod admission;
mod auth;
pub mod clusters;
mod config;
mod control;
mod frame;
mod limits;
mod rendezvous;
mod rule;
mod server;
mod splice;
mod state;

pub use config::{ConfigError, EntraFile, Limits, RelayConfig, RelayFile, DEFAULT_MAX_CONNECTIONS};
pub use rendezvous::Rendezvous;
pub use rule::Rule;
pub use state::RelayStats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use state::{Ctx, Shared};

/// On shutdown, open rendezvous streams get this long to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves the relay on an already-bound listener until `shutdown` is cancelled, then drains.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if config.hostnames.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the relay needs at least one configured hostname: rendezvous addresses sent to listeners name it",
        ));
    }
    let public_port = match config.public_port {
        Some(p) => p,
        None => listener.local_addr()?.port(),
    };
    let tasks = TaskTracker::new();
    let ctx = context(&config, public_port, &tasks, &shutdown);
    let closing = ctx.closing.clone();
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let admission = admission::Admission::new(
        config.limits.max_unauthenticated,
        config.limits.max_unauthenticated_per_ip,
    );
    tracing::info!(addr = %listener.local_addr()?, "relay listening");
    while let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await {
        // Strangers get no slot: only a place among the unauthenticated, capped per address.
        let admitted = match admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(refused) => {
                tracing::debug!(peer = %peer, ?refused, "unauthenticated connection refused");
                continue;
            }
        };
        tasks.spawn(serve_connection(
            acceptor.clone(),
            tcp,
            peer,
            ctx.clone(),
            admitted,
        ));
    }
    drain(&tasks, &closing).await;
    Ok(())
}

/// What every connection shares, before it gets its own connection slot.
fn context(
    config: &RelayConfig,
    public_port: u16,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Ctx {
    let hostnames = config
        .hostnames
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    Ctx {
        shared: Shared {
            hostnames: Arc::new(hostnames),
            rules: config.rules.clone(),
            clusters: config.clusters.clone(),
            stats: config.stats.clone(),
            public_port,
            limits: config.limits,
        },
        rendezvous: Rendezvous::default(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        closing: CancellationToken::new(),
        slots: Arc::new(Semaphore::new(config.max_connections)),
    }
}

/// TLS, then HTTP/1.1 with upgrades, each phase under the handshake deadline. `admitted` is
/// held until the HTTP exchange ends; an upgraded listener or rendezvous holds a slot instead.
async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Ctx,
    admitted: admission::Admitted,
) {
    let _admitted = admitted;
    let deadline = ctx.shared.limits.handshake_timeout;
    let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service = service_fn(move |req| server::handle(req, ctx.clone(), peer));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(peer = %peer, error = %e, "connection ended with error");
    }
}

/// Lets open streams finish for [`DRAIN`], then closes what is left.
async fn drain(tasks: &TaskTracker, closing: &CancellationToken) {
    tracing::info!("relay stopping: no new connections, draining open streams");
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::info!("drain period over; closing remaining streams");
        closing.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    }
}

//! The relay: the one place both sides dial out to. It speaks the Azure Relay Hybrid
//! Connections protocol, checks SAS tokens against its rules, pairs each sender with a
//! listener and then splices their WebSockets without looking inside.

mod auth;
pub mod clusters;
mod config;
mod control;
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

/// A client that has not finished TLS and its HTTP request by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
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
    let limit = Arc::new(Semaphore::new(config.max_connections));
    tracing::info!(addr = %listener.local_addr()?, "relay listening");
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await else {
            break;
        };
        let mut ctx = ctx.clone();
        ctx.permit = Some(Arc::new(permit));
        tasks.spawn(serve_connection(acceptor.clone(), tcp, peer, ctx));
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
        permit: None,
    }
}

/// TLS, then HTTP/1.1 with upgrades, each phase under the handshake deadline.
async fn serve_connection(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr, ctx: Ctx) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
        .header_read_timeout(HANDSHAKE_TIMEOUT)
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

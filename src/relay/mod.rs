//! The relay: the one place both sides dial out to. It speaks the Azure Relay Hybrid
//! Connections protocol, checks SAS tokens against its rules, pairs each sender with a
//! listener and then splices their WebSockets without looking inside.

mod admission;
mod auth;
pub mod clusters;
mod config;
mod control;
mod gauge;
mod hc_http;
mod limits;
pub mod proxy_protocol;
mod rendezvous;
pub mod replicas;
mod rule;
mod server;
mod splice;
mod stall;
mod state;

pub use config::{
    ClusterLink, ConfigError, EntraFile, Limits, RelayConfig, RelayFile, DEFAULT_MAX_CONNECTIONS,
};
pub use proxy_protocol::ProxyProtocol;
pub use rendezvous::Rendezvous;
pub use rule::{Rule, RuleSet};
pub use state::RelayStats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::CONNECTION;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use state::{Ctx, Shared};

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
    let mut ctx = context(&config, public_port, &tasks, &shutdown);
    if let Some(link) = &config.cluster {
        let replicas = replicas::Replicas::start(
            link.client.clone(),
            link.prefix.clone(),
            link.me.clone(),
            ctx.rendezvous.clone(),
            config.limits.max_rendezvous_per_listener,
            shutdown.clone(),
        )
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        tracing::info!(replica = %link.me, peers = ?replicas.peers(), "relay replica joined");
        ctx.shared.replicas = Some(replicas);
    }
    let closing = ctx.closing.clone();
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let admission = ctx.admission.clone();
    let proxy_protocol = config.proxy_protocol.clone();
    tracing::info!(
        addr = %listener.local_addr()?,
        proxy_protocol = proxy_protocol.is_some(),
        "relay listening"
    );
    while let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await {
        // Strangers get no slot: only a place among the unauthenticated, capped per address.
        let admitted = match &proxy_protocol {
            None => admission.admit(peer.ip()).map(Incoming::Direct),
            Some(pp) if !pp.trusts(peer.ip()) => {
                tracing::debug!(peer = %peer, "PROXY header from an untrusted peer refused");
                continue;
            }
            // The client's address comes with the header; until then, the global cap only.
            Some(_) => admission.reserve().map(Incoming::Proxied),
        };
        let admitted = match admitted {
            Ok(a) => a,
            Err(refused) => {
                ctx.shared.stats.metrics.limit_hit(refused.limit());
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
    // Closed now, not when draining ends: a client connecting meanwhile is refused at once
    // (and its agent or proxy tries again), rather than left waiting in the accept queue.
    drop(listener);
    drain(&tasks, &closing, config.limits.drain).await;
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
            replicas: None,
        },
        rendezvous: Rendezvous::default(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        closing: CancellationToken::new(),
        slots: Arc::new(Semaphore::new(config.max_connections)),
        per_token: Default::default(),
        admission: admission::Admission::new(
            config.limits.max_unauthenticated,
            config.limits.max_unauthenticated_per_ip,
            config.limits.ipv6_prefix_len,
        ),
    }
}

/// A connection's place among the unauthenticated, as taken at accept.
enum Incoming {
    /// Its peer is its client, already charged.
    Direct(admission::Admitted),
    /// Behind a balancer: charged to its client once the PROXY header names it.
    Proxied(admission::Reserved),
}

/// The first byte the client sent, left in the socket for the TLS handshake; `None` when it
/// closed without sending any.
async fn first_byte(tcp: &TcpStream) -> Option<u8> {
    let mut byte = [0u8; 1];
    match tcp.peek(&mut byte).await {
        Ok(1) => Some(byte[0]),
        _ => None,
    }
}

/// The answer to plain HTTP on the TLS port.
async fn plain_http_refused(tcp: &mut TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = "this port speaks TLS only: use https:// or wss://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    if tcp.write_all(answer.as_bytes()).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    // Closing with the request unread would reset the connection, and the client could lose
    // the answer: read what it sent, a bounded amount, until it closes (or the deadline).
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let mut left = limits::MAX_REQUEST_HEAD;
    while left > 0 {
        match tcp.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// The PROXY header (when configured) and TLS under one handshake deadline, then HTTP/1.1
/// with upgrades, each request's headers under that deadline too. The admission place is
/// held until the HTTP exchange ends; an upgraded listener or rendezvous holds a slot instead.
async fn serve_connection(
    acceptor: TlsAcceptor,
    mut tcp: TcpStream,
    peer: SocketAddr,
    ctx: Ctx,
    incoming: Incoming,
) {
    let deadline = ctx.shared.limits.handshake_timeout;
    let handshake_ends = Instant::now() + deadline;
    let (peer, admitted) = match incoming {
        Incoming::Direct(admitted) => (peer, admitted),
        Incoming::Proxied(reserved) => {
            let metrics = &ctx.shared.stats.metrics;
            match proxied(&mut tcp, peer, reserved, handshake_ends, metrics).await {
                Some(client) => client,
                None => return,
            }
        }
    };
    let place = admitted.place();
    let first = tokio::select! {
        first = tokio::time::timeout_at(handshake_ends, first_byte(&tcp)) => first,
        () = place.evicted() => return,
    };
    match first {
        Ok(Some(byte)) if byte.is_ascii_uppercase() => {
            // "GET /..." where a ClientHello belongs: someone typed http://. Tell them, as
            // nginx does, instead of a TLS alert their client shows as gibberish.
            let _ = tokio::time::timeout_at(handshake_ends, plain_http_refused(&mut tcp)).await;
            return;
        }
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => return,
    }
    let handshake = tokio::select! {
        done = tokio::time::timeout_at(handshake_ends, acceptor.accept(tcp)) => done,
        () = place.evicted() => return,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    // Answers must be read as they come (see `stall`), and a connection carries a bounded
    // number of them: a refusal ends it, and so does the last of MAX_REQUESTS_PER_CONNECTION,
    // so requests sent ahead without reading the answers cannot pile them up.
    let (io, lift) = stall::StallDeadline::new(tls, deadline);
    let served = Arc::new(AtomicUsize::new(0));
    let in_service = place.clone();
    let books = admitted.books();
    let service = service_fn(move |req| {
        let (ctx, served, place) = (ctx.clone(), served.clone(), in_service.clone());
        let books = books.clone();
        async move {
            // Not idle while it serves a request: a newcomer may not take its place. Except
            // an agent status report, whose body is read before it is authenticated (its
            // signature covers the body): a stranger withholding that body for the request
            // deadline must not be able to keep places from newcomers.
            let busy = (!server::authenticated_by_body(&req)).then(|| place.busy());
            let mut req = req;
            req.extensions_mut().insert(books.clone());
            let mut resp = server::handle(req, ctx, peer).await?;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                place.busy().keep();
            }
            drop(busy);
            let count = served.fetch_add(1, Ordering::Relaxed) + 1;
            if resp.status().as_u16() >= 400 || count >= limits::MAX_REQUESTS_PER_CONNECTION {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .max_buf_size(limits::MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let ended = tokio::select! {
        ended = conn => ended,
        () = place.evicted() => {
            tracing::debug!(peer = %peer, "idle unauthenticated connection closed: a newcomer took its place");
            return;
        }
    };
    // An upgraded listener or rendezvous reads at its own pace from here on.
    lift.lift();
    if let Err(e) = ended {
        tracing::debug!(peer = %peer, error = %e, "connection ended with error");
    }
}

/// Reads the PROXY header and charges the client it names (the balancer itself for LOCAL
/// and UNKNOWN); `None` when the connection is to be closed, the reason logged.
async fn proxied(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    reserved: admission::Reserved,
    until: Instant,
    metrics: &crate::metrics::RelayMetrics,
) -> Option<(SocketAddr, admission::Admitted)> {
    let header = match tokio::time::timeout_at(until, proxy_protocol::read_header(tcp)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            let error = crate::tunnel::http::error_chain(&e);
            tracing::debug!(peer = %peer, %error, "no valid PROXY header; connection closed");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "no PROXY header within the handshake deadline");
            return None;
        }
    };
    let client = header.client(peer);
    match reserved.identify(client.ip()) {
        Ok(admitted) => Some((client, admitted)),
        Err(refused) => {
            metrics.limit_hit(refused.limit());
            tracing::debug!(peer = %client, balancer = %peer, ?refused, "unauthenticated connection refused");
            None
        }
    }
}

/// Lets open streams finish for `period` (`drain_secs`), then closes what is left.
async fn drain(tasks: &TaskTracker, closing: &CancellationToken, period: Duration) {
    tracing::info!(
        drain_secs = period.as_secs(),
        "relay stopping: no new connections, draining open streams"
    );
    tasks.close();
    if tokio::time::timeout(period, tasks.wait()).await.is_err() {
        tracing::info!("drain period over; closing remaining streams");
        closing.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    }
}

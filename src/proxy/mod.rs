//! The proxy: runs next to kubectl. It serves HTTPS on 127.0.0.1 with a local CA, accepts only
//! the per-session credential it wrote into the kubeconfig, injects the real credential and
//! carries every request (watches, logs, exec, port-forward) through the relay to the agent.

pub mod kubeconfig;
pub mod local_ca;
mod pool;
mod server;
mod watch_end;

pub use pool::{
    Pool, PoolLimits, RelayTarget, SendBody, SendCredential, TunnelError, MAX_CONNECTIONS,
    POOL_SIZE, STREAMS_PER_CONNECTION,
};
pub use server::{ProbeError, CLUSTER_PREFIX};

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::{CredentialSource, RenewalObserver};
use crate::metrics::ProxyMetrics;
use crate::secret::Secret;
use crate::tunnel::http::{H2_CONNECTION_WINDOW, H2_MAX_STREAMS, H2_STREAM_WINDOW};
use server::{Handler, Route};

/// The port `az connectedk8s proxy` uses, so existing habits and scripts carry over.
pub const DEFAULT_PORT: u16 = 47011;
/// On Ctrl-C, in-flight requests get this long; open watches are then ended.
pub const DRAIN: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One cluster the proxy serves, under `/clusters/<name>`.
pub struct ClusterConfig {
    pub name: String,
    pub target: RelayTarget,
    pub credential: Arc<dyn CredentialSource>,
}

pub struct ProxyConfig {
    pub clusters: Vec<ClusterConfig>,
    pub local_tls: Arc<ServerConfig>,
    pub local_secret: Secret,
    /// Counted into as the proxy works; served when the CLI registered them.
    pub metrics: ProxyMetrics,
    /// How far each cluster's pool of tunnel connections grows.
    pub pool: PoolLimits,
}

/// The server URL a kubeconfig uses for cluster `name` behind a proxy on `port`.
pub fn server_url(port: u16, name: &str) -> String {
    format!("https://127.0.0.1:{port}{CLUSTER_PREFIX}{name}")
}

pub struct Proxy {
    handler: Arc<Handler>,
    tls: TlsAcceptor,
}

/// Proves a cluster answers end to end (`/version` through relay, agent and apiserver with
/// the real credential) while `serve` owns the proxy; the error says which part failed.
#[derive(Clone)]
pub struct Prober(Arc<Handler>);

impl Prober {
    pub async fn probe(&self, name: &str) -> Result<(), ProbeError> {
        match self.0.routes.iter().find(|r| r.name == name) {
            Some(route) => route.probe().await,
            None => Err(ProbeError::UnknownCluster(name.to_string())),
        }
    }
}

/// The kubeconfig token of cluster `name`: the session secret plus the cluster's name, so a
/// request names its cluster even when its path does not carry `/clusters/<name>`. The
/// secret's alphabet has no '.', so the split is unambiguous.
pub fn local_token(secret: &Secret, name: &str) -> Secret {
    Secret::new(format!("{}.{name}", secret.expose()))
}

/// A fresh random secret for the kubeconfig (256 bits, URL-safe).
pub fn new_local_secret() -> Secret {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Proxy {
        let metrics = config.metrics;
        let renewals: RenewalObserver = {
            let metrics = metrics.clone();
            Arc::new(move |result| metrics.token_renewal(result))
        };
        Proxy {
            handler: Arc::new(Handler {
                routes: config
                    .clusters
                    .into_iter()
                    .map(|c| {
                        c.credential.observe_renewals(renewals.clone());
                        if let SendCredential::Issued(source) = &c.target.send {
                            source.observe_renewals(renewals.clone());
                        }
                        Route {
                            pool: Pool::new(c.target, config.pool, (&c.name, &metrics)),
                            name: c.name,
                            credential: c.credential,
                            last_refusal: std::sync::Mutex::new(None),
                        }
                    })
                    .collect(),
                local_secret: config.local_secret,
                metrics,
            }),
            tls: TlsAcceptor::from(config.local_tls),
        }
    }

    pub fn cluster_names(&self) -> Vec<String> {
        self.handler.routes.iter().map(|r| r.name.clone()).collect()
    }

    /// Opens a pooled tunnel to each cluster now, so a wrong key or an untrusted relay
    /// certificate is reported at start rather than on the first kubectl call.
    pub async fn warm_up(&self) -> Vec<(String, Result<(), TunnelError>)> {
        let mut results = Vec::new();
        for route in &self.handler.routes {
            results.push((route.name.clone(), route.pool.warm_up().await));
        }
        results
    }

    /// A cheap handle for probing while `serve` owns the proxy.
    pub fn prober(&self) -> Prober {
        Prober(self.handler.clone())
    }

    /// Serves kubectl on `listener` until `shutdown`, then drains for at most [`DRAIN`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        let builder = Arc::new(builder);
        while let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await {
            // The handshake runs in the connection's own task: a slow or stalled client must
            // not hold up everyone else's kubectl.
            let (tls, handler, builder, watcher) = (
                self.tls.clone(),
                self.handler.clone(),
                builder.clone(),
                graceful.watcher(),
            );
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "local TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                // Boxed: hyper keeps each stream's task, sized for this future, for as long as
                // its response streams (a watch: hours); boxed, the future is freed once the
                // response is handed over.
                let service = service_fn(move |req| Box::pin(handler.clone().handle(req)));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(peer = %peer, error = %e, "kubectl connection ended with error");
                }
            });
        }
        tracing::info!("proxy stopping: finishing in-flight requests");
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!("drain period over; closing remaining connections");
        }
        Ok(())
    }
}

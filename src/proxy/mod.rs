//! The proxy: runs next to kubectl. It serves HTTPS on 127.0.0.1 with a local CA, accepts only
//! the per-session credential it wrote into the kubeconfig, injects the real credential and
//! carries every request (watches, logs, exec, port-forward) through the relay to the agent.

pub mod kubeconfig;
pub mod local_ca;
mod pool;
mod server;

pub use pool::{Pool, RelayTarget, TunnelError, POOL_SIZE};

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

use crate::auth::CredentialSource;
use crate::secret::Secret;
use server::{Handler, Route};

/// The port `az connectedk8s proxy` uses, so existing habits and scripts carry over.
pub const DEFAULT_PORT: u16 = 47011;
/// On Ctrl-C, in-flight requests get this long; open watches are then ended.
pub const DRAIN: Duration = Duration::from_secs(5);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ProxyConfig {
    pub target: RelayTarget,
    pub credential: Arc<dyn CredentialSource>,
    pub local_tls: Arc<ServerConfig>,
    pub local_secret: Secret,
}

pub struct Proxy {
    handler: Arc<Handler>,
    tls: TlsAcceptor,
}

/// A fresh random secret for the kubeconfig (256 bits, URL-safe).
pub fn new_local_secret() -> Secret {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Proxy {
        Proxy {
            handler: Arc::new(Handler {
                route: Route {
                    pool: Pool::new(config.target, POOL_SIZE),
                    credential: config.credential,
                },
                local_secret: config.local_secret,
            }),
            tls: TlsAcceptor::from(config.local_tls),
        }
    }

    /// Opens a pooled tunnel now, so a wrong key or untrusted relay certificate is reported at
    /// start rather than on the first kubectl call.
    pub async fn warm_up(&self) -> Result<(), TunnelError> {
        self.handler.route.pool.connection().await.map(|_| ())
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
            .max_concurrent_streams(1024)
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        let builder = Arc::new(builder);
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "local TLS handshake failed");
                    continue;
                }
                Err(_) => continue,
            };
            let handler = self.handler.clone();
            let service = service_fn(move |req| handler.clone().handle(req));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
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

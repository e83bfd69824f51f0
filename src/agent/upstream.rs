//! The agent's connection to the kube-apiserver: where it is and which CA it has, taken from
//! the in-cluster service account or a kubeconfig (via kube's config loader), and the clients
//! that reach it: a pool of HTTP/2 connections for requests and watches (see `h2_pool`), an
//! HTTP/1.1 client for an apiserver without HTTP/2, and HTTP/1.1 connections for upgrades.
//!
//! The agent never presents a client certificate: a caller's bearer token is what the
//! apiserver authenticates, so a certificate from the agent's kubeconfig would let callers
//! borrow the agent's identity. The agent's own bearer token (its service account) is used
//! only for requests it impersonates an Entra identity on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::h2_pool::{H2Pool, APISERVER_CONNECTIONS};
use crate::auth::exec::TokenCommand;
use crate::auth::refresh::{Refreshing, RENEW_MARGIN};
use crate::auth::{CredentialSource, StaticToken, TokenFile};
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::http::Counted;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot load the cluster connection from kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot read kubeconfig {}", path.display())]
    OpenKubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {} has no context '{context}' (it has: {known}); pass one of those with --context", path.display())]
    NoContext {
        path: PathBuf,
        context: String,
        known: String,
    },
    #[error("cannot load the cluster connection from the kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error("cannot load the cluster connection (run in a pod, or pass --kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("the kubeconfig asks to skip TLS verification of the apiserver; the agent needs the cluster CA (certificate-authority-data) instead")]
    InsecureSkipVerify,
    #[error("cluster CA")]
    Tls(#[from] tls::TlsError),
    #[error("apiserver URL {0} must be https://")]
    NotHttps(String),
}

/// A loaded cluster connection.
pub struct Loaded {
    pub upstream: Upstream,
    /// The agent's own bearer token source, when the configuration has one.
    pub own_token: Option<Arc<dyn CredentialSource>>,
    /// The configuration itself, for the agent's own API calls (status reports).
    pub config: kube::Config,
}

/// Forwarded requests: their bodies counted for the audit log.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Counted<Incoming>>;
/// For the agent's own small requests (SubjectAccessReviews), whose bodies it builds.
pub type ReviewClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Upstream {
    /// scheme and authority of the apiserver, plus any path prefix (e.g. behind Rancher).
    base: String,
    /// Requests and watches, many streams on each of a few connections.
    pub h2: Option<H2Pool>,
    /// HTTP/1.1, when the apiserver does not offer HTTP/2: one connection per request in
    /// flight (a watch or followed log holds its own).
    pub streams: HttpsClient,
    pub upgrades: HttpsClient,
    /// The agent's own requests, made with its own credential.
    pub reviews: ReviewClient,
}

/// The apiserver may stream a watch for hours; these only bound connection setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Upstream {
    /// Loads the cluster from `kubeconfig`/`context` when given, else infers it the way
    /// kubectl and client-go do (in-cluster service account first, then `$KUBECONFIG`).
    pub async fn load(
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
    ) -> Result<Loaded, UpstreamError> {
        let config = match (kubeconfig, context) {
            (Some(path), context) => {
                // Opened here first: kube's own error for a missing file says it twice.
                std::fs::File::open(&path).map_err(|source| UpstreamError::OpenKubeconfig {
                    path: path.clone(),
                    source,
                })?;
                // read_from, not from_yaml: it resolves relative file paths against the
                // kubeconfig's directory, as kubectl does.
                let file = Kubeconfig::read_from(&path).map_err(|source| {
                    UpstreamError::ReadKubeconfig {
                        path: path.clone(),
                        source,
                    }
                })?;
                if let Some(wanted) = &context {
                    if !file.contexts.iter().any(|c| &c.name == wanted) {
                        let known: Vec<&str> =
                            file.contexts.iter().map(|c| c.name.as_str()).collect();
                        return Err(UpstreamError::NoContext {
                            path,
                            context: wanted.clone(),
                            known: if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            },
                        });
                    }
                }
                let options = KubeConfigOptions {
                    context,
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(UpstreamError::Kubeconfig)?
            }
            (None, Some(context)) => {
                let options = KubeConfigOptions {
                    context: Some(context),
                    ..Default::default()
                };
                kube::Config::from_kubeconfig(&options)
                    .await
                    .map_err(UpstreamError::Kubeconfig)?
            }
            (None, None) => kube::Config::infer().await.map_err(UpstreamError::Infer)?,
        };
        if config.accept_invalid_certs {
            return Err(UpstreamError::InsecureSkipVerify);
        }
        let ca_pem: Option<Vec<u8>> = match (&config.root_cert, &config.root_cert_file) {
            (Some(ders), _) => Some(ders_to_pem(ders)),
            (None, Some(path)) => {
                Some(
                    std::fs::read(path).map_err(|source| tls::TlsError::ReadFile {
                        what: "cluster CA",
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            (None, None) => None,
        };
        let upstream = Upstream::new(&config.cluster_url, ca_pem.as_deref())?;
        Ok(Loaded {
            upstream,
            own_token: own_token(&config.auth_info),
            config,
        })
    }

    /// An upstream at `url` trusting `ca_pem` (or the system roots when `None`).
    pub fn new(url: &Uri, ca_pem: Option<&[u8]>) -> Result<Upstream, UpstreamError> {
        if url.scheme_str() != Some("https") {
            return Err(UpstreamError::NotHttps(url.to_string()));
        }
        // hyper-rustls sets ALPN itself from the protocols enabled below.
        let alpn: &[&[u8]] = &[];
        let tls_config = match ca_pem {
            Some(pem) => tls::client_config_with_roots(tls::roots_from_pem(pem)?, alpn)?,
            None => tls::client_config(None, alpn)?,
        };
        let connector = |http2: bool| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(CONNECT_TIMEOUT));
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config((*tls_config).clone())
                .https_only();
            if http2 {
                builder.enable_http1().enable_http2().wrap_connector(http)
            } else {
                builder.enable_http1().wrap_connector(http)
            }
        };
        let h2 = H2Pool::new(url, &tls_config, APISERVER_CONNECTIONS);
        let streams = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector(false));
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(connector(false));
        let reviews = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector(true));
        let base = url.to_string().trim_end_matches('/').to_string();
        Ok(Upstream {
            base,
            h2,
            streams,
            upgrades,
            reviews,
        })
    }

    /// At most `n` HTTP/2 connections to the apiserver (`agent --apiserver-connections`).
    pub fn with_apiserver_connections(mut self, n: usize) -> Upstream {
        self.h2 = self.h2.map(|pool| pool.with_max_connections(n));
        self
    }

    /// The apiserver URI for a request's path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::uri::InvalidUri> {
        format!("{}{}", self.base, path_and_query).parse()
    }

    pub fn base(&self) -> &str {
        &self.base
    }
}

/// The agent's own bearer token: a token file (the in-cluster service-account token, which
/// the kubelet rotates) or a token in the kubeconfig.
fn own_token(auth: &kube::config::AuthInfo) -> Option<Arc<dyn CredentialSource>> {
    use secrecy::ExposeSecret;
    if let Some(plugin) = auth.exec.as_ref().and_then(TokenCommand::plugin) {
        return Some(Arc::new(Refreshing::new(plugin, RENEW_MARGIN)));
    }
    if let Some(file) = &auth.token_file {
        return Some(Arc::new(TokenFile::new(PathBuf::from(file))));
    }
    let token = auth.token.as_ref()?.expose_secret().trim().to_string();
    (!token.is_empty()).then(|| Arc::new(StaticToken::new(Secret::new(token))) as _)
}

fn ders_to_pem(ders: &[Vec<u8>]) -> Vec<u8> {
    let certs: Vec<pem::Pem> = ders
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
        .collect();
    pem::encode_many_config(
        &certs,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
    .into_bytes()
}

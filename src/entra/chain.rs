//! The proxy's Entra credential: the sources tried in order (or the one `--auth` names), the
//! first that yields a token kept for the rest of the run, as azure-identity's
//! DefaultAzureCredential does. When none works, one error lists each source and why.
//!
//! The chain moves past sources that are not configured or not usable here, and stops at a
//! configured source that fails (a rejected secret must be fixed, not silently replaced by the
//! next identity in line). The environment is read once into [`Environment`], so tests build it
//! explicitly instead of changing the process's variables.

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use super::azure_cli::AzureCli;
use super::client_credential::ClientCredential;
use super::device_code::{DeviceCode, Prompt};
use super::http::HttpClient;
use super::managed_identity::{default_challenge_dir, ManagedIdentity};
use super::workload_identity::WorkloadIdentity;
use super::{Authority, SourceError};
use crate::auth::refresh::{ExpiringToken, FetchFuture, Refreshing, TokenFetcher, RENEW_MARGIN};
use crate::auth::{CredentialError, CredentialSource};
use crate::secret::Secret;

/// The credential sources, in the order the chain tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Env,
    WorkloadIdentity,
    ManagedIdentity,
    AzureCli,
    DeviceCode,
}

impl SourceKind {
    pub const ALL: [SourceKind; 5] = [
        SourceKind::Env,
        SourceKind::WorkloadIdentity,
        SourceKind::ManagedIdentity,
        SourceKind::AzureCli,
        SourceKind::DeviceCode,
    ];

    /// The `--auth` value.
    pub fn flag_value(self) -> &'static str {
        match self {
            SourceKind::Env => "env",
            SourceKind::WorkloadIdentity => "workload-identity",
            SourceKind::ManagedIdentity => "managed-identity",
            SourceKind::AzureCli => "azure-cli",
            SourceKind::DeviceCode => "device-code",
        }
    }
}

/// The name in messages.
impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Env => "environment",
            SourceKind::WorkloadIdentity => "workload identity",
            SourceKind::ManagedIdentity => "managed identity",
            SourceKind::AzureCli => "Azure CLI",
            SourceKind::DeviceCode => "device code",
        })
    }
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SourceKind::ALL
            .into_iter()
            .find(|k| k.flag_value().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let all: Vec<&str> = SourceKind::ALL.iter().map(|k| k.flag_value()).collect();
                format!(
                    "unknown credential source {s:?}: use one of {}",
                    all.join(", ")
                )
            })
    }
}

pub type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ExpiringToken, SourceError>> + Send + 'a>>;

/// One way to get an Entra token; the chain needs to know why one did not work.
pub trait Source: Send + Sync {
    fn kind(&self) -> SourceKind;
    fn attempt(&self) -> SourceFuture<'_>;
}

/// Every source is also a plain [`TokenFetcher`], usable on its own behind `Refreshing`.
impl<S: Source> TokenFetcher for S {
    fn fetch(&self) -> FetchFuture<'_> {
        let name = self.kind().to_string();
        let attempt = self.attempt();
        Box::pin(async move { attempt.await.map_err(|e| e.into_credential_error(&name)) })
    }

    fn describe(&self) -> String {
        format!("Entra ID ({})", self.kind())
    }
}

/// The process environment the chain reads, captured once.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_certificate_path: Option<PathBuf>,
    /// Only whether it is set: encrypted keys are refused, the password is never read.
    pub client_certificate_password_set: bool,
    pub federated_token_file: Option<PathBuf>,
    /// `AZURE_POD_IDENTITY_AUTHORITY_HOST`: IMDS somewhere other than 169.254.169.254.
    pub imds_base: Option<String>,
    /// `IDENTITY_ENDPOINT` and `IMDS_ENDPOINT`: both set on an Arc-enabled server.
    pub identity_endpoint: Option<String>,
    pub imds_endpoint: Option<String>,
    /// Where HIMDS challenge files may be read from.
    pub himds_challenge_dir: PathBuf,
    /// `PATH`, to find `az`.
    pub path: Option<OsString>,
}

impl Environment {
    pub fn from_process() -> Environment {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Environment {
            tenant_id: var("AZURE_TENANT_ID"),
            client_id: var("AZURE_CLIENT_ID"),
            client_secret: var("AZURE_CLIENT_SECRET").map(Secret::new),
            client_certificate_path: var("AZURE_CLIENT_CERTIFICATE_PATH").map(PathBuf::from),
            client_certificate_password_set: var("AZURE_CLIENT_CERTIFICATE_PASSWORD").is_some(),
            federated_token_file: var("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from),
            imds_base: var("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
            identity_endpoint: var("IDENTITY_ENDPOINT"),
            imds_endpoint: var("IMDS_ENDPOINT"),
            himds_challenge_dir: default_challenge_dir(),
            path: std::env::var_os("PATH"),
        }
    }
}

pub struct ChainOptions {
    pub authority: Authority,
    /// `--tenant`; else `AZURE_TENANT_ID`; else "organizations" for the device code.
    pub tenant: Option<String>,
    /// The cluster's server application: the token's audience.
    pub server_app_id: String,
    /// The public client users sign in with (device code).
    pub client_app_id: String,
    /// `--auth`: only this source.
    pub only: Option<SourceKind>,
    /// Whether the device code may start a sign-in in the automatic chain (stderr is a
    /// terminal). `--auth device-code` always may.
    pub interactive: bool,
    pub http: HttpClient,
    /// The device code's refresh tokens go under `<config_dir>/entra/`.
    pub config_dir: PathBuf,
    pub prompt: Arc<dyn Prompt>,
}

/// A source, or why it is not configured.
type Slot = (SourceKind, Result<Box<dyn Source>, SourceError>);

pub struct EntraChain {
    sources: Vec<Slot>,
    only: bool,
    /// The source that gave the first token; used alone from then on.
    chosen: Mutex<Option<usize>>,
}

impl EntraChain {
    /// Reads each source's settings; no network yet.
    pub fn new(opts: &ChainOptions, env: &Environment) -> EntraChain {
        let kinds: Vec<SourceKind> = match opts.only {
            Some(kind) => vec![kind],
            None => SourceKind::ALL.to_vec(),
        };
        let sources = kinds
            .into_iter()
            .map(|kind| {
                let source: Result<Box<dyn Source>, SourceError> = match kind {
                    SourceKind::Env => {
                        ClientCredential::from_env(env, opts).map(|s| Box::new(s) as _)
                    }
                    SourceKind::WorkloadIdentity => {
                        WorkloadIdentity::from_env(env, opts).map(|s| Box::new(s) as _)
                    }
                    SourceKind::ManagedIdentity => {
                        ManagedIdentity::from_env(env, opts).map(|s| Box::new(s) as _)
                    }
                    SourceKind::AzureCli => AzureCli::from_env(env, opts).map(|s| Box::new(s) as _),
                    SourceKind::DeviceCode => {
                        let tenant = opts
                            .tenant
                            .clone()
                            .or_else(|| env.tenant_id.clone())
                            .unwrap_or_else(|| "organizations".into());
                        let may_prompt =
                            opts.interactive || opts.only == Some(SourceKind::DeviceCode);
                        Ok(Box::new(DeviceCode::new(opts, &tenant, may_prompt)) as _)
                    }
                };
                (kind, source)
            })
            .collect();
        EntraChain {
            sources,
            only: opts.only.is_some(),
            chosen: Mutex::new(None),
        }
    }

    fn chosen(&self) -> Option<usize> {
        *self.chosen.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get(&self) -> Result<ExpiringToken, CredentialError> {
        if let Some(i) = self.chosen() {
            let (kind, source) = &self.sources[i];
            let source = source
                .as_ref()
                .map_err(|e| e.clone().into_credential_error("Entra ID"))?;
            return source
                .attempt()
                .await
                .map_err(|e| e.into_credential_error(&format!("Entra ID ({kind})")));
        }
        let mut tried = Vec::new();
        for (i, (kind, source)) in self.sources.iter().enumerate() {
            let outcome = match source {
                Ok(source) => source.attempt().await,
                Err(e) => Err(e.clone()),
            };
            match outcome {
                Ok(token) => {
                    tracing::info!(source = %kind, "using this Entra credential");
                    *self.chosen.lock().unwrap_or_else(|p| p.into_inner()) = Some(i);
                    return Ok(token);
                }
                Err(e) => {
                    tracing::debug!(source = %kind, reason = %e.reason(), "Entra credential source not used");
                    tried.push(format!("{kind}: {}", e.reason()));
                    if matches!(e, SourceError::Failed(_)) && !self.only {
                        let rest: Vec<String> = self.sources[i + 1..]
                            .iter()
                            .map(|(k, _)| k.to_string())
                            .collect();
                        if !rest.is_empty() {
                            tried.push(format!(
                                "not tried after that failure: {} (fix it, or choose a source with --auth)",
                                rest.join(", ")
                            ));
                        }
                        break;
                    }
                }
            }
        }
        Err(CredentialError::Unavailable {
            source_name: "Entra ID".into(),
            reason: if self.only {
                tried.join("; ")
            } else {
                format!("no Entra credential worked: {}", tried.join("; "))
            },
        })
    }
}

impl TokenFetcher for EntraChain {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.get())
    }

    fn describe(&self) -> String {
        match self.chosen() {
            Some(i) => format!("Entra ID ({})", self.sources[i].0),
            None => "Entra ID".into(),
        }
    }
}

/// The proxy's Entra credential: the chain, renewed ahead of expiry, with a first token
/// already fetched so a misconfiguration fails at start-up with the chain's error.
pub async fn credential(
    opts: &ChainOptions,
    env: &Environment,
) -> Result<Arc<dyn CredentialSource>, CredentialError> {
    let source = Refreshing::new(EntraChain::new(opts, env), RENEW_MARGIN);
    source.token().await?;
    Ok(Arc::new(source))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::entra::device_code::StderrPrompt;
    use crate::entra::test_server::{authority, client, json, TestServer};
    use crate::entra::{ARC_CLIENT_APP_ID, ARC_SERVER_APP_ID};

    /// Options pointing Entra at a test server, prompting nowhere, caching nowhere useful.
    pub(crate) fn options(base: &str) -> ChainOptions {
        ChainOptions {
            authority: authority(base),
            tenant: None,
            server_app_id: ARC_SERVER_APP_ID.into(),
            client_app_id: ARC_CLIENT_APP_ID.into(),
            only: None,
            interactive: false,
            http: client(),
            config_dir: std::env::temp_dir().join("clusterconnect-test-unused"),
            prompt: Arc::new(StderrPrompt),
        }
    }

    /// Nothing configured, IMDS refused, no `az`, no terminal.
    fn bare_environment(imds: std::net::SocketAddr, path: &std::path::Path) -> Environment {
        Environment {
            imds_base: Some(format!("http://{imds}")),
            path: Some(path.as_os_str().to_owned()),
            ..Environment::default()
        }
    }

    fn closed_port() -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn when_nothing_works_one_error_lists_every_source_and_why() {
        let empty = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let imds = closed_port();
        let mut opts = options("http://127.0.0.1:9");
        opts.config_dir = config.path().to_path_buf();
        let chain = EntraChain::new(&opts, &bare_environment(imds, empty.path()));
        let err = chain.fetch().await.unwrap_err().to_string();
        assert!(err.starts_with("Entra ID: no Entra credential worked: environment: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH not set; workload identity: AZURE_FEDERATED_TOKEN_FILE not set; managed identity: IMDS at http://127.0.0.1:"), "{err}");
        assert!(err.contains("; Azure CLI: `az` is not on PATH; device code: skipped (stderr is not a terminal; pass --auth device-code)"), "{err}");
        assert_eq!(chain.describe(), "Entra ID");

        // With --auth, only that source, and its own message.
        opts.only = Some(SourceKind::AzureCli);
        let chain = EntraChain::new(&opts, &bare_environment(imds, empty.path()));
        let err = chain.fetch().await.unwrap_err().to_string();
        assert_eq!(err, "Entra ID: Azure CLI: `az` is not on PATH");
    }

    #[tokio::test]
    async fn the_first_source_that_works_is_kept_and_a_configured_failure_stops_the_chain() {
        let server = TestServer::start(|req, n| {
            if req.target.starts_with("/metadata/") {
                json(200, serde_json::json!({"access_token": format!("mi-{n}"), "expires_in": "3600"}))
            } else {
                json(401, serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}))
            }
        })
        .await;
        let empty = tempfile::tempdir().unwrap();
        let mut env = bare_environment(closed_port(), empty.path());
        env.imds_base = Some(server.base.clone());
        let opts = options(&server.base);
        let chain = EntraChain::new(&opts, &env);
        assert_eq!(chain.fetch().await.unwrap().token.expose(), "mi-0");
        assert_eq!(chain.describe(), "Entra ID (managed identity)");
        assert_eq!(chain.fetch().await.unwrap().token.expose(), "mi-1");

        // A service principal whose secret Entra rejects: the chain stops there, no IMDS.
        env.tenant_id = Some("t".into());
        env.client_id = Some("c".into());
        env.client_secret = Some(Secret::new("wrong"));
        let before = server.requests().len();
        let chain = EntraChain::new(&opts, &env);
        let err = chain.fetch().await.unwrap_err().to_string();
        assert!(
            err.contains("environment: service principal: http://127.0.0.1:")
                && err.contains("AADSTS7000215"),
            "{err}"
        );
        assert!(err.contains("not tried after that failure: workload identity, managed identity, Azure CLI, device code"), "{err}");
        assert_eq!(server.requests().len(), before + 1);
    }

    #[test]
    fn auth_values_parse() {
        for kind in SourceKind::ALL {
            assert_eq!(kind.flag_value().parse::<SourceKind>().unwrap(), kind);
        }
        assert!("kerberos"
            .parse::<SourceKind>()
            .unwrap_err()
            .contains("azure-cli"));
    }
}

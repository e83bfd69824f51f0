//! The proxy's Entra credential: the sources tried in order (or the one `--auth` names), the
//! first that yields a token kept for the rest of the run, as azure-identity's
//! DefaultAzureCredential does. When none works, one error lists each source and why.
//!
//! The chain moves past sources that are not configured or not usable here, and stops at a
//! configured source that fails (a rejected secret must be fixed, not silently replaced by the
//! next identity in line). The environment is read once into [`Environment`], so tests build it
//! explicitly instead of changing the process's variables.

use std::sync::{Arc, Mutex};

use super::azure_cli::AzureCli;
use super::client_credential::ClientCredential;
use super::device_code::DeviceCode;
use super::managed_identity::ManagedIdentity;
use super::workload_identity::WorkloadIdentity;
use super::SourceError;
use crate::auth::refresh::{ExpiringToken, FetchFuture, Refreshing, TokenFetcher, RENEW_MARGIN};
use crate::auth::{CredentialError, CredentialSource};

/// Where callers have always found these; they live in [`super::source`] so that the sources
/// need not import the chain.
pub use super::source::{ChainOptions, Environment, Source, SourceFuture, SourceKind};

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
                    // IMDS and `az account get-access-token` take no req_cnf: their tokens
                    // would be bearer tokens, which --pop must not silently fall back to.
                    SourceKind::ManagedIdentity | SourceKind::AzureCli if opts.pop.is_some() => {
                        Err(SourceError::NotConfigured(
                            "cannot get proof-of-possession tokens (--pop); use a service principal, workload identity or the device code"
                                .into(),
                        ))
                    }
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
        Err(CredentialError::unavailable(
            "Entra ID",
            if self.only {
                tried.join("; ")
            } else {
                format!("no Entra credential worked: {}", tried.join("; "))
            },
        ))
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

/// The proxy's Entra credential with `--pop`: access tokens bound to `opts.pop`'s key,
/// renewed ahead of expiry, the first fetched now. Wrap it in a
/// [`super::pop::PopCredential`] per cluster.
pub async fn bound_credential(
    opts: &ChainOptions,
    env: &Environment,
) -> Result<Arc<dyn CredentialSource>, CredentialError> {
    let Some(ring) = opts.pop.clone() else {
        return credential(opts, env).await;
    };
    let fetcher = super::pop::BoundFetcher {
        inner: EntraChain::new(opts, env),
        ring,
    };
    let source = Refreshing::new(fetcher, RENEW_MARGIN);
    source.token().await?;
    Ok(Arc::new(source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::test_server::{json, options, TestServer};
    use crate::secret::Secret;
    use crate::tunnel::http::error_chain;

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
        let err = error_chain(&chain.fetch().await.unwrap_err());
        assert!(err.starts_with("Entra ID: no Entra credential worked: environment: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH not set; workload identity: AZURE_FEDERATED_TOKEN_FILE not set; managed identity: IMDS at http://127.0.0.1:"), "{err}");
        assert!(err.contains("; Azure CLI: `az` is not on PATH; device code: skipped (stderr is not a terminal; pass --auth device-code)"), "{err}");
        assert_eq!(chain.describe(), "Entra ID");

        // With --auth, only that source, and its own message.
        opts.only = Some(SourceKind::AzureCli);
        let chain = EntraChain::new(&opts, &bare_environment(imds, empty.path()));
        let err = error_chain(&chain.fetch().await.unwrap_err());
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
        let err = error_chain(&chain.fetch().await.unwrap_err());
        assert!(
            err.contains("environment: service principal: http://127.0.0.1:")
                && err.contains("AADSTS7000215"),
            "{err}"
        );
        assert!(err.contains("not tried after that failure: workload identity, managed identity, Azure CLI, device code"), "{err}");
        assert_eq!(server.requests().len(), before + 1);
    }

    #[tokio::test]
    async fn with_pop_sources_that_cannot_bind_tokens_are_not_used() {
        let empty = tempfile::tempdir().unwrap();
        let mut opts = options("http://127.0.0.1:9");
        let pem = pem::parse(include_str!("testdata/test-only-rsa-key.pem")).unwrap();
        let key = super::super::pop::PopKey::from_pkcs8(pem.contents()).unwrap();
        opts.pop = Some(Arc::new(super::super::pop::KeyRing::with_key(
            key,
            super::super::pop::KEY_ROTATION,
        )));
        for kind in [SourceKind::ManagedIdentity, SourceKind::AzureCli] {
            opts.only = Some(kind);
            let chain = EntraChain::new(&opts, &bare_environment(closed_port(), empty.path()));
            let err = error_chain(&chain.fetch().await.unwrap_err());
            assert!(
                err.contains("cannot get proof-of-possession tokens (--pop)"),
                "{err}"
            );
        }
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

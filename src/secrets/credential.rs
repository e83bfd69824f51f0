//! Which Entra credential signs in to Key Vault. The vault's challenge names the tenant and the
//! resource (token audience); the credential is then the proxy's chain ([`crate::entra::chain`])
//! for that tenant and resource, narrowed by what the SecretProviderClass asks for (a managed
//! identity, a workload identity's client id), or the service principal whose `clientid` and
//! `clientsecret` a Kubernetes Secret holds (the Arc extension's `secrets-store-creds` pattern).

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::Api;

use super::keyvault::{Challenge, VaultCredentials};
use super::provider_class::Identity;
use crate::auth::refresh::{Refreshing, RENEW_MARGIN};
use crate::auth::{CredentialError, CredentialSource};
use crate::entra::chain::{ChainOptions, EntraChain, Environment, SourceKind};
use crate::entra::device_code::Prompt;
use crate::entra::http::HttpClient;
use crate::entra::Authority;
use crate::secret::Secret;

/// Everything of [`ChainOptions`] except what the challenge decides.
pub struct ChainCredentials {
    pub authority: Authority,
    /// The tenant the user or the class named; the vault's own tenant wins when they differ.
    pub tenant: Option<String>,
    pub client_app_id: String,
    pub only: Option<SourceKind>,
    pub interactive: bool,
    pub http: HttpClient,
    pub config_dir: PathBuf,
    pub prompt: Arc<dyn Prompt>,
    pub env: Environment,
}

impl ChainCredentials {
    /// Narrows the chain to the identity the class names. An explicit `--auth` is kept.
    pub fn use_identity(&mut self, identity: &Identity) {
        match identity {
            Identity::Default => {}
            Identity::ManagedIdentity { client_id } => {
                self.only.get_or_insert(SourceKind::ManagedIdentity);
                if client_id.is_some() {
                    self.env.client_id = client_id.clone();
                }
            }
            Identity::WorkloadIdentity { client_id } => {
                self.only.get_or_insert(SourceKind::WorkloadIdentity);
                self.env.client_id = Some(client_id.clone());
            }
        }
    }

    /// Only this service principal (from `--credentials-secret`), whatever the environment holds.
    pub fn use_service_principal(&mut self, client_id: String, client_secret: Secret) {
        self.only = Some(SourceKind::Env);
        self.env = Environment {
            client_id: Some(client_id),
            client_secret: Some(client_secret),
            tenant_id: self.tenant.clone(),
            ..Environment::default()
        };
    }
}

impl VaultCredentials for ChainCredentials {
    fn credential(
        &self,
        challenge: &Challenge,
    ) -> Result<Arc<dyn CredentialSource>, CredentialError> {
        if let Some(configured) = &self.tenant {
            if !configured.eq_ignore_ascii_case(&challenge.tenant) {
                tracing::warn!(configured = %configured, vault_tenant = %challenge.tenant, "the vault belongs to another tenant than the one configured; signing in to the vault's tenant");
            }
        }
        let opts = ChainOptions {
            authority: self.authority.clone(),
            tenant: Some(challenge.tenant.clone()),
            server_app_id: challenge.resource.clone(),
            client_app_id: self.client_app_id.clone(),
            only: self.only,
            interactive: self.interactive,
            http: self.http.clone(),
            config_dir: self.config_dir.clone(),
            prompt: self.prompt.clone(),
            pop: None,
        };
        let chain = EntraChain::new(&opts, &self.env);
        Ok(Arc::new(Refreshing::new(chain, RENEW_MARGIN)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsSecretError {
    #[error("cannot read Secret {namespace}/{name} for the Key Vault credentials; create it with kubectl create secret generic {name} --from-literal clientid=<client-id> --from-literal clientsecret=<client-secret>")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} has no {key:?} key; it needs clientid and clientsecret")]
    Missing {
        namespace: String,
        name: String,
        key: &'static str,
    },
}

/// The `clientid` and `clientsecret` of a Kubernetes Secret.
pub async fn read_credentials_secret(
    api: &Api<KubeSecret>,
    namespace: &str,
    name: &str,
) -> Result<(String, Secret), CredentialsSecretError> {
    let secret = api
        .get(name)
        .await
        .map_err(|source| CredentialsSecretError::Read {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        })?;
    let value = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.trim().to_string())
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CredentialsSecretError::Missing {
                namespace: namespace.to_string(),
                name: name.to_string(),
                key,
            })
    };
    Ok((value("clientid")?, Secret::new(value("clientsecret")?)))
}

//! A Key Vault client for one SecretProviderClass, as the controller and the CSI provider
//! both need it: the vault of `keyvaultName` in the class's cloud (or a URL the operator
//! mapped the name to: a private endpoint, an emulator), signed in as the service principal
//! of a credentials Secret when there is one, else as the identity the class names. The
//! pod's (or node's) own identity is used only when the class opts in to it, as the upstream
//! Azure provider requires: otherwise anyone who may create a class would read whatever that
//! identity can.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::entra::chain::{Environment, SourceKind};
use crate::entra::cloud::resolve_from_process;
use crate::entra::device_code::StderrPrompt;
use crate::entra::http::HttpClient;
use crate::entra::{Authority, ARC_CLIENT_APP_ID};
use crate::secret::Secret;
use crate::secrets::credential::ChainCredentials;
use crate::secrets::keyvault::vault_url;
use crate::secrets::provider_class::Identity;
use crate::secrets::{KeyVaultClient, ProviderClass};

/// The Secret the Arc extension's docs have users create for a service principal.
pub const CREDENTIALS_SECRET: &str = "secrets-store-creds";
/// The label the upstream driver requires on such Secrets.
pub const USED_LABEL: &str = "secrets-store.csi.k8s.io/used";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("SecretProviderClass {class}: cannot tell which Azure cloud to use")]
    Cloud {
        class: String,
        #[source]
        source: crate::entra::cloud::CloudError,
    },
    #[error("SecretProviderClass {class}: Key Vault {vault}")]
    Client {
        class: String,
        vault: String,
        #[source]
        source: Box<crate::secrets::KeyVaultError>,
    },
    #[error("SecretProviderClass {class}: no service principal and no identity: put one in Secret {CREDENTIALS_SECRET} (keys clientid and clientsecret, labelled {USED_LABEL}=true; for a pod volume, named in nodePublishSecretRef), or opt in to the ambient identity in the class's parameters: useVMManagedIdentity: \"true\" (with userAssignedIdentityID for a user-assigned one) or clientID for workload identity")]
    NoIdentity { class: String },
}

/// What every client shares: HTTP, the environment's identity, operator-mapped vault URLs.
#[derive(Clone)]
pub struct VaultAccess {
    pub http: HttpClient,
    pub env: Environment,
    /// Lowercase vault name -> URL.
    pub vault_urls: BTreeMap<String, String>,
}

/// A service principal's `clientid` and `clientsecret`.
#[derive(Clone)]
pub struct ServicePrincipal {
    pub client_id: String,
    pub client_secret: Secret,
}

impl VaultAccess {
    pub fn client(
        &self,
        class: &ProviderClass,
        principal: Option<&ServicePrincipal>,
    ) -> Result<KeyVaultClient, VaultError> {
        if principal.is_none() && class.identity == Identity::Default {
            return Err(VaultError::NoIdentity {
                class: class.name.clone(),
            });
        }
        let cloud = resolve_from_process(class.cloud.as_deref(), class.cloud_env_file.as_deref())
            .map_err(|source| VaultError::Cloud {
            class: class.name.clone(),
            source,
        })?;
        let client_error = |source| VaultError::Client {
            class: class.name.clone(),
            vault: class.keyvault_name.clone(),
            source: Box::new(source),
        };
        let url = match self
            .vault_urls
            .get(&class.keyvault_name.to_ascii_lowercase())
        {
            Some(url) => url.clone(),
            None => vault_url(&class.keyvault_name, &cloud).map_err(client_error)?,
        };
        let mut creds = ChainCredentials {
            authority: Authority::of(&cloud),
            tenant: class.tenant_id.clone(),
            client_app_id: ARC_CLIENT_APP_ID.to_string(),
            only: None,
            // A controller has no one to show a device code to.
            interactive: false,
            http: self.http.clone(),
            config_dir: std::env::temp_dir().join("clusterconnect-extension"),
            prompt: Arc::new(StderrPrompt),
            env: self.env.clone(),
        };
        match principal {
            Some(p) => creds.use_service_principal(p.client_id.clone(), p.client_secret.clone()),
            None => {
                // Identity::Default was refused above: this is an explicit opt-in.
                creds.use_identity(&class.identity);
                // Never the Azure CLI or a device code inside the cluster.
                if creds.only.is_none() && creds.env.client_secret.is_none() {
                    creds.only = if creds.env.federated_token_file.is_some() {
                        Some(SourceKind::WorkloadIdentity)
                    } else {
                        Some(SourceKind::ManagedIdentity)
                    };
                }
            }
        }
        Ok(
            KeyVaultClient::new(self.http.clone(), &url, Arc::new(creds))
                .map_err(client_error)?
                .with_cloud(&cloud),
        )
    }
}

/// `NAME=URL` from the command line.
pub fn parse_vault_url(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, url)) if !name.trim().is_empty() && url.trim().starts_with("https://") => {
            Ok((name.trim().to_ascii_lowercase(), url.trim().to_string()))
        }
        _ => Err(format!(
            "{:?} must be VAULT_NAME=https://URL",
            crate::secret::clip(s, 100)
        )),
    }
}

#[cfg(test)]
impl VaultAccess {
    /// No identity from the environment, and no trusted roots: nothing it signs in to answers.
    pub(crate) fn for_tests() -> VaultAccess {
        VaultAccess {
            http: HttpClient::new(
                Arc::new(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ),
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
            ),
            env: Environment::default(),
            vault_urls: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> VaultAccess {
        VaultAccess::for_tests()
    }

    fn class(parameters: &str) -> ProviderClass {
        ProviderClass::parse(&format!(
            r#"{{"apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
                "metadata": {{"name": "app", "namespace": "apps"}},
                "spec": {{"provider": "azure", "parameters": {{"keyvaultName": "contoso-kv", "tenantId": "t", "objects": "array:\n  - |\n    objectName: a\n    objectType: secret\n"{parameters}}}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_ambient_identity_takes_an_opt_in() {
        let access = access();
        let err = access.client(&class(""), None).err().unwrap().to_string();
        assert!(
            err.contains(CREDENTIALS_SECRET)
                && err.contains(USED_LABEL)
                && err.contains("useVMManagedIdentity"),
            "{err}"
        );
        let principal = ServicePrincipal {
            client_id: "app".into(),
            client_secret: Secret::new("s".to_string()),
        };
        assert!(access.client(&class(""), Some(&principal)).is_ok());
        assert!(access
            .client(&class(r#", "useVMManagedIdentity": "true""#), None)
            .is_ok());
        assert!(access
            .client(
                &class(r#", "clientID": "00000000-0000-0000-0000-0000000000aa""#),
                None
            )
            .is_ok());
    }
}

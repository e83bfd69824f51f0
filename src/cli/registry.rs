//! Reaching the relay's cluster registry from the CLI: which subscription, and how the caller
//! authenticates (a Manage key, or Entra ID for the management audience).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::entra::EntraCredentials;
use super::relay::MANAGEMENT_AUDIENCE;
use crate::arm::client::{ManagementAuth, ManagementClient};
use crate::arm::{ClusterId, DEFAULT_SUBSCRIPTION};
use crate::auth::refresh::{ExpiringToken, FetchFuture, TokenFetcher};
use crate::auth::CredentialError;
use crate::entra::http::HttpClient;
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::protocol::RelayAddress;
use crate::tunnel::sas::{unix_now, SasKey};

#[derive(clap::Args, Debug, Clone)]
pub struct RegistryAccess {
    /// Subscription the clusters are registered under: on a self-hosted relay, any name that
    /// groups resource groups.
    #[arg(long, env = "CLUSTERCONNECT_SUBSCRIPTION", default_value = DEFAULT_SUBSCRIPTION)]
    pub subscription: String,
    /// Key file of a relay rule with the Manage right: act as the registry's administrator.
    /// Without it the caller signs in to Entra ID (see --auth).
    #[arg(long, env = "CLUSTERCONNECT_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// The Entra audience of the relay's management API.
    #[arg(long, default_value = MANAGEMENT_AUDIENCE)]
    pub management_audience: String,
}

impl Default for RegistryAccess {
    fn default() -> Self {
        RegistryAccess {
            subscription: DEFAULT_SUBSCRIPTION.into(),
            admin_key_file: None,
            management_audience: MANAGEMENT_AUDIENCE.into(),
        }
    }
}

impl RegistryAccess {
    pub fn cluster_id(&self, resource_group: &str, name: &str) -> anyhow::Result<ClusterId> {
        ClusterId::new(&self.subscription, resource_group, name).map_err(|e| anyhow::anyhow!(e))
    }

    /// A management client for the relay at `relay` (trusting `relay_ca` besides the system
    /// roots), authenticated by the admin key or by Entra ID.
    pub(crate) async fn client(
        &self,
        relay: &str,
        relay_ca: Option<&Path>,
        entra: &mut EntraCredentials<'_>,
    ) -> anyhow::Result<ManagementClient> {
        let relay = RelayAddress::parse(relay)?;
        let tls = tls::client_config(relay_ca, &[])
            .context("cannot set up TLS for the relay's management API")?;
        let http = HttpClient::new(tls, Duration::from_secs(10), Duration::from_secs(30));
        let auth = match &self.admin_key_file {
            Some(path) => ManagementAuth::Key(SasKey::from_file(path)?),
            None => {
                ManagementAuth::Entra(entra.get(Some(&self.management_audience)).await.context(
                    "signing in for the relay's management API (or pass --admin-key-file)",
                )?)
            }
        };
        Ok(ManagementClient::new(relay, http, Some(auth)))
    }
}

/// Send tokens from the registry's `listClusterUserCredential`, for [`Refreshing`]
/// (crate::auth::refresh::Refreshing) to renew before they expire.
pub struct RegistryTokens {
    pub client: ManagementClient,
    pub id: ClusterId,
}

impl TokenFetcher for RegistryTokens {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let config = self
                .client
                .list_user_credential(&self.id)
                .await
                .map_err(|e| CredentialError::Unavailable {
                    source_name: self.describe(),
                    reason: e.to_string(),
                })?;
            let left = config.expiration_time.saturating_sub(unix_now());
            Ok(ExpiringToken::new(
                Secret::new(config.token),
                Duration::from_secs(left),
            ))
        })
    }

    fn describe(&self) -> String {
        format!("listClusterUserCredential for {}", self.id.name)
    }
}

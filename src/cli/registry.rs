//! Reaching the relay's cluster registry from the CLI: which subscription, and how the caller
//! authenticates (a Manage key, or Entra ID with a token for the relay's own audience, never
//! Azure Resource Manager's unless asked for by name).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::entra::EntraCredentials;
use crate::arm::client::{ManagementAuth, ManagementClient};
use crate::arm::{ClusterId, DEFAULT_SUBSCRIPTION};
use crate::auth::refresh::{ExpiringToken, FetchFuture, TokenFetcher};
use crate::auth::CredentialError;
use crate::entra::http::HttpClient;
use crate::relay::clusters::is_arm_audience;
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
    /// The Entra audience of the relay's management API: the application ID URI or client id
    /// the relay's `[entra] audience` names. Tokens are requested for it, not for Azure.
    #[arg(
        long,
        visible_alias = "management-audience",
        env = "CLUSTERCONNECT_RELAY_AUDIENCE",
        default_value = DEFAULT_RELAY_AUDIENCE,
        value_name = "APP_ID_URI"
    )]
    pub relay_audience: String,
}

/// The management API's audience when the relay's operator kept the documented example
/// (`config/relay.toml`); a relay with its own application is reached with --relay-audience.
pub const DEFAULT_RELAY_AUDIENCE: &str = "api://clusterconnect-relay";

impl Default for RegistryAccess {
    fn default() -> Self {
        RegistryAccess {
            subscription: DEFAULT_SUBSCRIPTION.into(),
            admin_key_file: None,
            relay_audience: DEFAULT_RELAY_AUDIENCE.into(),
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
                let own_clouds_arm = entra
                    .cloud()
                    .is_ok_and(|c| c.is_arm_audience(&self.relay_audience));
                if is_arm_audience(&self.relay_audience) || own_clouds_arm {
                    errln!(
                        "warning: --relay-audience {} is Azure Resource Manager's: this sends the relay a token valid against Azure (relays refuse it unless their operator set allow_arm_audience)",
                        self.relay_audience
                    );
                }
                ManagementAuth::Entra(entra.get(Some(&self.relay_audience)).await.with_context(
                    || format!("signing in for the relay's management API (audience {}; see --relay-audience) or pass --admin-key-file", self.relay_audience),
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
                .map_err(|e| CredentialError::unavailable(self.describe(), e))?;
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

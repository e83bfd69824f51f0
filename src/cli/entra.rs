//! How the CLI signs in to Entra ID: the flags ([`EntraFlags`]) and the credentials of one
//! start-up ([`EntraCredentials`]), shared by the proxy's clusters and the registry client.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::auth::CredentialSource;
use crate::entra::chain::{self, ChainOptions, Environment, SourceKind};
use crate::entra::cloud::resolve_from_process;
use crate::entra::device_code::StderrPrompt;
use crate::entra::http::HttpClient;
use crate::entra::pop::{KeyRing, PopCredential};
use crate::entra::{Authority, CloudDefinition, ARC_CLIENT_APP_ID, ARC_SERVER_APP_ID};

/// How to sign in to Entra ID (the proxy's apiserver credential, the management API).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct EntraFlags {
    /// Without a token flag the proxy signs in to Entra ID; this picks the one credential source
    /// instead of trying env, workload-identity, managed-identity, azure-cli, device-code in turn.
    #[arg(long, value_name = "SOURCE")]
    pub auth: Option<SourceKind>,
    /// The public client app users sign in with (device code) [default: the Azure Arc client
    /// app, 3f4439ff-e698-4d6d-84fe-09c9d574f06b].
    #[arg(long, value_name = "APP_ID")]
    pub client_app_id: Option<String>,
    /// Entra tenant (id or domain) [default: AZURE_TENANT_ID, else "organizations" for the
    /// device code].
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    pub cloud: CloudFlags,
}

/// Which Azure cloud: every command that talks to Entra ID, Graph, Key Vault or ARM takes these.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct CloudFlags {
    /// Azure cloud: AzurePublicCloud [default], AzureUSGovernmentCloud, AzureChinaCloud, or the
    /// name of the cloud --cloud-config describes (AzureStackCloud also reads
    /// AZURE_ENVIRONMENT_FILEPATH, as kubelogin does).
    #[arg(long, value_name = "NAME")]
    pub cloud: Option<String>,
    /// A custom cloud's endpoints, as JSON in the shape `az cloud register --cloud-config` takes
    /// and `az cloud show` prints [default: CLUSTERCONNECT_CLOUD_CONFIG]. AZURE_AUTHORITY_HOST,
    /// CLUSTERCONNECT_GRAPH_ENDPOINT, CLUSTERCONNECT_GRAPH_RESOURCE,
    /// CLUSTERCONNECT_KEYVAULT_DNS_SUFFIX, CLUSTERCONNECT_KEYVAULT_RESOURCE,
    /// CLUSTERCONNECT_ARM_ENDPOINT and CLUSTERCONNECT_ARM_RESOURCE override single endpoints.
    #[arg(long, value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,
}

impl CloudFlags {
    /// The cloud these flags and the environment name.
    pub fn resolve(&self) -> anyhow::Result<CloudDefinition> {
        resolve_from_process(self.cloud.as_deref(), self.cloud_config.as_deref())
            .context("cannot tell which Azure cloud to use")
    }
}

/// The Entra credentials of one start-up: one chain per server app, shared by its clusters so
/// a sign-in happens once.
pub(crate) struct EntraCredentials<'a> {
    flags: &'a EntraFlags,
    env: Environment,
    by_server_app: HashMap<String, Arc<dyn CredentialSource>>,
    /// With `--pop`: bound access tokens and their key ring, per server app; each cluster
    /// wraps them in PoP tokens of its own.
    pop_by_server_app: HashMap<String, (Arc<dyn CredentialSource>, Arc<KeyRing>)>,
}

impl<'a> EntraCredentials<'a> {
    pub(crate) fn new(flags: &'a EntraFlags) -> Self {
        EntraCredentials {
            flags,
            env: Environment::from_process(),
            by_server_app: HashMap::new(),
            pop_by_server_app: HashMap::new(),
        }
    }

    /// The cloud the flags and the environment name.
    pub(crate) fn cloud(&self) -> anyhow::Result<CloudDefinition> {
        self.flags.cloud.resolve()
    }

    /// The Entra credential for `server_app_id` (the token's audience: an app id or a resource
    /// URL such as the management API's).
    pub(crate) async fn get(
        &mut self,
        server_app_id: Option<&str>,
    ) -> anyhow::Result<Arc<dyn CredentialSource>> {
        let server_app_id = checked_app_id(server_app_id)?;
        if let Some(source) = self.by_server_app.get(&server_app_id) {
            return Ok(source.clone());
        }
        let opts = self.options(&server_app_id, None)?;
        let source = chain::credential(&opts, &self.env)
            .await
            .with_context(|| format!("no Entra ID credential for {server_app_id}"))?;
        self.by_server_app.insert(server_app_id, source.clone());
        Ok(source)
    }

    /// The Entra credential of the cluster `cluster_id` with proof of possession (`--pop`):
    /// PoP tokens naming the cluster, around access tokens bound to a key of this process.
    pub(crate) async fn get_pop(
        &mut self,
        server_app_id: Option<&str>,
        cluster_id: &str,
    ) -> anyhow::Result<Arc<dyn CredentialSource>> {
        let server_app_id = checked_app_id(server_app_id)?;
        let (access, ring) = match self.pop_by_server_app.get(&server_app_id) {
            Some(known) => known.clone(),
            None => {
                let ring = Arc::new(
                    KeyRing::generate()
                        .await
                        .context("cannot create the proof-of-possession key")?,
                );
                let opts = self.options(&server_app_id, Some(ring.clone()))?;
                let access = chain::bound_credential(&opts, &self.env)
                    .await
                    .with_context(|| {
                        format!("no Entra ID proof-of-possession credential for {server_app_id}")
                    })?;
                self.pop_by_server_app
                    .insert(server_app_id, (access.clone(), ring.clone()));
                (access, ring)
            }
        };
        Ok(Arc::new(PopCredential::new(access, ring, cluster_id)))
    }

    fn options(
        &self,
        server_app_id: &str,
        pop: Option<Arc<KeyRing>>,
    ) -> anyhow::Result<ChainOptions> {
        let flags = self.flags;
        let authority = Authority::of(&flags.cloud.resolve()?);
        let http = HttpClient::with_system_roots(None)
            .context("cannot set up TLS for Entra ID (the system trust store)")?;
        Ok(ChainOptions {
            authority,
            tenant: flags.tenant.clone().filter(|t| !t.trim().is_empty()),
            server_app_id: server_app_id.to_string(),
            client_app_id: flags
                .client_app_id
                .clone()
                .unwrap_or_else(|| ARC_CLIENT_APP_ID.to_string()),
            only: flags.auth,
            // A CI job must never wait for a human; a terminal on stderr means one is there.
            interactive: std::io::stderr().is_terminal(),
            http,
            config_dir: crate::proxy::local_ca::config_dir(),
            prompt: Arc::new(StderrPrompt),
            pop,
        })
    }
}

/// The server app id (the token's audience), or why it cannot be one.
fn checked_app_id(server_app_id: Option<&str>) -> anyhow::Result<String> {
    let server_app_id = server_app_id
        .unwrap_or(ARC_SERVER_APP_ID)
        .trim()
        .to_string();
    if uuid::Uuid::parse_str(&server_app_id).is_err() && url::Url::parse(&server_app_id).is_err() {
        anyhow::bail!("server app id {server_app_id:?} is neither an application (client) id GUID nor an app id URI; pass the cluster's Entra server application id");
    }
    Ok(server_app_id)
}

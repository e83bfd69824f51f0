//! Which clusters a proxy (or `run`) serves: the single-cluster flags, or a clusters file
//! with one `[[cluster]]` table per cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::auth::exec::TokenCommand;
use crate::auth::refresh::{Refreshing, RENEW_MARGIN};
use crate::auth::{CredentialSource, StaticToken, TokenFile};
use crate::proxy::{ClusterConfig, RelayTarget};
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::protocol::{validate_entity, RelayAddress};
use crate::tunnel::sas::SasKey;

#[derive(clap::Args, Debug, Default)]
pub struct ClusterFlags {
    /// Relay address: wss://host[:port] (sb://<namespace>.servicebus.windows.net for Azure Relay).
    #[arg(long, env = "CLUSTERCONNECT_RELAY")]
    pub relay: Option<String>,
    /// Hybrid connection name of the cluster; also the kubeconfig context name.
    #[arg(long, env = "CLUSTERCONNECT_CONNECTION")]
    pub connection: Option<String>,
    /// File holding "SharedAccessKeyName=<rule>;SharedAccessKey=<key>" for a rule with Send rights.
    #[arg(long, env = "CLUSTERCONNECT_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for the relay, besides the system roots.
    #[arg(long, env = "CLUSTERCONNECT_RELAY_CA")]
    pub relay_ca: Option<PathBuf>,
    /// Bearer token for the apiserver (a service-account token). Prefer --token-file or the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        env = "CLUSTERCONNECT_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token; re-read as it rotates.
    #[arg(long, conflicts_with = "token_command")]
    pub token_file: Option<PathBuf>,
    /// Command printing a token or a kubectl ExecCredential (token + expirationTimestamp);
    /// re-run five minutes before expiry. A failed run keeps the current token until it expires.
    #[arg(long, conflicts_with = "token")]
    pub token_command: Option<String>,
    /// Several clusters in one proxy: a TOML file of [[cluster]] tables with name, relay,
    /// connection, key_file, token_file (or token) and optional relay_ca.
    #[arg(long, conflicts_with_all = ["relay", "connection", "key_file", "token", "token_file", "token_command"])]
    pub clusters_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClustersFile {
    cluster: Vec<ClusterEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterEntry {
    name: Option<String>,
    relay: String,
    connection: String,
    key_file: PathBuf,
    relay_ca: Option<PathBuf>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    token_command: Option<String>,
}

impl ClusterFlags {
    pub async fn resolve(&self) -> anyhow::Result<Vec<ClusterConfig>> {
        let Some(path) = &self.clusters_file else {
            let missing: Vec<&str> = [
                ("--relay", self.relay.is_none()),
                ("--connection", self.connection.is_none()),
                ("--key-file", self.key_file.is_none()),
            ]
            .iter()
            .filter_map(|(name, absent)| absent.then_some(*name))
            .collect();
            if !missing.is_empty() {
                anyhow::bail!("missing {}: name the cluster's relay, connection and send key (or pass --clusters-file)", missing.join(", "));
            }
            let entry = ClusterEntry {
                name: None,
                relay: self.relay.clone().unwrap_or_default(),
                connection: self.connection.clone().unwrap_or_default(),
                key_file: self.key_file.clone().unwrap_or_default(),
                relay_ca: self.relay_ca.clone(),
                token: self.token.clone(),
                token_file: self.token_file.clone(),
                token_command: self.token_command.clone(),
            };
            return Ok(vec![entry.resolve(Path::new("")).await?]);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read clusters file {}", path.display()))?;
        let file: ClustersFile = toml::from_str(&text)
            .with_context(|| format!("clusters file {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut clusters: Vec<ClusterConfig> = Vec::new();
        for entry in file.cluster {
            let cluster = entry
                .resolve(base)
                .await
                .with_context(|| format!("in clusters file {}", path.display()))?;
            if clusters.iter().any(|c| c.name == cluster.name) {
                anyhow::bail!(
                    "clusters file {}: two clusters are named '{}'; give one a distinct `name`",
                    path.display(),
                    cluster.name
                );
            }
            clusters.push(cluster);
        }
        if clusters.is_empty() {
            anyhow::bail!("clusters file {} has no [[cluster]] tables", path.display());
        }
        Ok(clusters)
    }
}

impl ClusterEntry {
    async fn resolve(self, base: &Path) -> anyhow::Result<ClusterConfig> {
        let relay = RelayAddress::parse(&self.relay)?;
        validate_entity(&self.connection)?;
        let name = self
            .name
            .unwrap_or_else(|| self.connection.replace('/', "-"));
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            anyhow::bail!("cluster name {name:?} must use letters, digits, '-', '_' or '.'");
        }
        let key = SasKey::from_file(&base.join(&self.key_file))?;
        let tls = tls::client_config(self.relay_ca.map(|p| base.join(p)).as_deref(), &[])
            .context("cannot set up TLS for the relay connection")?;
        let credential: Arc<dyn CredentialSource> = match (self.token, self.token_file, self.token_command) {
            (Some(t), None, None) if !t.trim().is_empty() => Arc::new(StaticToken::new(Secret::new(t.trim()))),
            (None, Some(file), None) => {
                let source = TokenFile::new(base.join(file));
                source.token().await?;
                Arc::new(source)
            }
            (None, None, Some(command)) => {
                let source = Refreshing::new(TokenCommand::new(command), RENEW_MARGIN);
                source.token().await?;
                Arc::new(source)
            }
            _ => anyhow::bail!(
                "cluster '{name}' needs exactly one credential for the apiserver: --token-file, --token-command, or --token / CLUSTERCONNECT_TOKEN (token_file, token_command or token in a clusters file)"
            ),
        };
        Ok(ClusterConfig {
            name,
            target: RelayTarget {
                relay,
                entity: self.connection,
                key,
                tls,
            },
            credential,
        })
    }
}

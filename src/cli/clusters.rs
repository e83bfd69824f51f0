//! Which clusters a proxy (or `run`) serves: the single-cluster flags, or a clusters file
//! with one `[[cluster]]` table per cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use super::entra::{EntraCredentials, EntraFlags};
use super::registry::{RegistryAccess, RegistryTokens};
use crate::arm::ClusterId;
use crate::auth::exec::TokenCommand;
use crate::auth::refresh::{Refreshing, RENEW_MARGIN};
use crate::auth::{CredentialSource, StaticToken, TokenFile};
use crate::proxy::{ClusterConfig, RelayTarget, SendCredential};
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
        conflicts_with_all = ["token_file", "auth"]
    )]
    pub token: Option<String>,
    /// File holding the bearer token; re-read as it rotates.
    #[arg(long, conflicts_with_all = ["token_command", "auth"])]
    pub token_file: Option<PathBuf>,
    /// Command printing a token or a kubectl ExecCredential (token + expirationTimestamp);
    /// re-run five minutes before expiry. A failed run keeps the current token until it expires.
    #[arg(long, conflicts_with_all = ["token", "auth"])]
    pub token_command: Option<String>,
    /// Several clusters in one proxy: a TOML file of [[cluster]] tables with name, relay,
    /// connection, key_file, token_file (or token, token_command, or none for Entra ID with an
    /// optional server_app_id) and optional relay_ca.
    #[arg(long, conflicts_with_all = ["relay", "connection", "key_file", "token", "token_file", "token_command"])]
    pub clusters_file: Option<PathBuf>,
    /// The cluster's Entra server application (the token audience) [default: the Azure Arc
    /// server app, 6256c85f-0aad-4d50-b960-e6e9b21efe35].
    #[arg(long, value_name = "APP_ID")]
    pub server_app_id: Option<String>,
    /// A cluster registered with the relay (`clusterconnect connect`): its name. The relay,
    /// connection and send token then come from the registry, as `az connectedk8s proxy -n`.
    #[arg(short = 'n', long = "name", requires = "resource_group", conflicts_with_all = ["connection", "key_file", "clusters_file"])]
    pub cluster_name: Option<String>,
    /// The registered cluster's resource group.
    #[arg(short = 'g', long, requires = "cluster_name")]
    pub resource_group: Option<String>,
    #[command(flatten)]
    pub registry: RegistryAccess,
    #[command(flatten)]
    pub entra: EntraFlags,
    /// Present Entra ID tokens as proof-of-possession (PoP) tokens, as kubelogin
    /// --pop-enabled does for Azure Arc: bound to a key only this proxy holds and to the
    /// cluster's resource id, so a token seen on the way is useless elsewhere. Needs the
    /// cluster's id (--cluster-id, `cluster_id` in a clusters file, or -n/-g).
    #[arg(long, conflicts_with_all = ["token", "token_file", "token_command"])]
    pub pop: bool,
    /// The cluster's Azure resource id
    /// (/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.Kubernetes/connectedClusters/<name>):
    /// the u claim of its PoP tokens.
    #[arg(long, requires = "pop", conflicts_with_all = ["clusters_file", "cluster_name"])]
    pub cluster_id: Option<String>,
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
    /// For a cluster without a token: the Entra server app its tokens are for.
    server_app_id: Option<String>,
    /// The cluster's Azure resource id, for its PoP tokens (`--pop`).
    cluster_id: Option<String>,
}

impl ClusterFlags {
    pub async fn resolve(&self) -> anyhow::Result<Vec<ClusterConfig>> {
        let mut entra = EntraCredentials::new(&self.entra);
        if let (Some(name), Some(group)) = (&self.cluster_name, &self.resource_group) {
            return Ok(vec![self.registered(name, group, &mut entra).await?]);
        }
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
                server_app_id: self.server_app_id.clone(),
                cluster_id: self.cluster_id.clone(),
            };
            return Ok(vec![
                entry.resolve(Path::new(""), &mut entra, self.pop).await?,
            ]);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read clusters file {}", path.display()))?;
        let file: ClustersFile = toml::from_str(&text)
            .with_context(|| format!("clusters file {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut clusters: Vec<ClusterConfig> = Vec::new();
        for entry in file.cluster {
            let cluster = entry
                .resolve(base, &mut entra, self.pop)
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

impl ClusterFlags {
    /// A cluster from the registry (`proxy -n NAME -g RG`): relay, hybrid connection and a
    /// renewing Send token from `listClusterUserCredential`.
    async fn registered(
        &self,
        name: &str,
        resource_group: &str,
        entra: &mut EntraCredentials<'_>,
    ) -> anyhow::Result<ClusterConfig> {
        let relay_text = self.relay.as_deref().context(
            "--relay is needed with -n/-g: the relay that holds the cluster registry (wss://host[:port])",
        )?;
        let id = self.registry.cluster_id(resource_group, name)?;
        let path = id.path();
        let client = self
            .registry
            .client(relay_text, self.relay_ca.as_deref(), entra)
            .await?;
        let first = client.list_user_credential(&id).await.with_context(|| {
            format!(
                "cannot get a connection for cluster '{name}' in resource group '{resource_group}'"
            )
        })?;
        let relay = RelayAddress::parse(&first.relay)?;
        let entity = first.hybrid_connection_name.clone();
        let tokens = Refreshing::new(RegistryTokens { client, id }, RENEW_MARGIN);
        tokens.token().await?;
        let tls = tls::client_config(self.relay_ca.as_deref(), &[])
            .context("cannot set up TLS for the relay connection")?;
        let credential = apiserver_credential(
            name,
            Path::new(""),
            entra,
            Tokens {
                token: self.token.clone(),
                token_file: self.token_file.clone(),
                token_command: self.token_command.clone(),
            },
            self.server_app_id.as_deref(),
            self.pop.then_some(path.as_str()),
        )
        .await?;
        Ok(ClusterConfig {
            name: name.to_string(),
            target: RelayTarget {
                relay,
                entity,
                send: SendCredential::Issued(Arc::new(tokens)),
                tls,
            },
            credential,
        })
    }
}

impl ClusterEntry {
    async fn resolve(
        self,
        base: &Path,
        entra: &mut EntraCredentials<'_>,
        pop: bool,
    ) -> anyhow::Result<ClusterConfig> {
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
        let has_token =
            self.token.is_some() || self.token_file.is_some() || self.token_command.is_some();
        if has_token && self.server_app_id.is_some() {
            anyhow::bail!("cluster '{name}': server_app_id is for Entra ID and this cluster has a token; remove one of them");
        }
        // --pop is about Entra tokens: a cluster with a token of its own keeps using it.
        let pop_cluster = match (pop && !has_token, self.cluster_id.as_deref()) {
            (false, _) => None,
            (true, Some(id)) => {
                ClusterId::parse(id).map_err(|e| anyhow::anyhow!("cluster '{name}': cluster id: {e}"))?;
                Some(id.trim())
            }
            (true, None) => anyhow::bail!("cluster '{name}': --pop needs the cluster's Azure resource id for the PoP token's u claim: pass --cluster-id /subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.Kubernetes/connectedClusters/<name> (cluster_id in a clusters file)"),
        };
        let credential = apiserver_credential(
            &name,
            base,
            entra,
            Tokens {
                token: self.token,
                token_file: self.token_file,
                token_command: self.token_command,
            },
            self.server_app_id.as_deref(),
            pop_cluster,
        )
        .await?;
        Ok(ClusterConfig {
            name,
            target: RelayTarget {
                relay,
                entity: self.connection,
                send: SendCredential::Key(key),
                tls,
            },
            credential,
        })
    }
}

/// A cluster's token settings; all `None` means Entra ID.
struct Tokens {
    token: Option<String>,
    token_file: Option<PathBuf>,
    token_command: Option<String>,
}

/// The apiserver credential of one cluster: one of the token flags, or Entra ID (as PoP
/// tokens for the cluster `pop_cluster` names, with `--pop`).
async fn apiserver_credential(
    name: &str,
    base: &Path,
    entra: &mut EntraCredentials<'_>,
    tokens: Tokens,
    server_app_id: Option<&str>,
    pop_cluster: Option<&str>,
) -> anyhow::Result<Arc<dyn CredentialSource>> {
    Ok(match (tokens.token, tokens.token_file, tokens.token_command) {
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
            (None, None, None) => match pop_cluster {
                Some(cluster_id) => entra.get_pop(server_app_id, cluster_id).await,
                None => entra.get(server_app_id).await,
            }
            .with_context(|| {
                format!("cluster '{name}': no credential for the apiserver: pass --token-file, --token-command or --token, or make an Entra ID credential available")
            })?,
            _ => anyhow::bail!(
                "cluster '{name}' has more than one credential for the apiserver (or an empty token): keep one of token_file, token_command or token, or none for Entra ID"
            ),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use crate::entra::chain::SourceKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            [
                "clusterconnect",
                "proxy",
                "--relay",
                "wss://r",
                "--connection",
                "c",
            ]
            .iter()
            .chain(args),
        )
    }

    #[test]
    fn entra_flags_parse_and_auth_with_a_token_is_a_usage_error() {
        let cli = parse(&[
            "--auth",
            "azure-cli",
            "--tenant",
            "contoso.onmicrosoft.com",
            "--cloud",
            "AzureChinaCloud",
        ])
        .unwrap();
        let Command::Proxy(args) = cli.command else {
            panic!("not proxy")
        };
        assert_eq!(args.clusters.entra.auth, Some(SourceKind::AzureCli));
        assert_eq!(
            args.clusters.entra.cloud.cloud.as_deref(),
            Some("AzureChinaCloud")
        );
        let Command::Proxy(args) = parse(&[]).unwrap().command else {
            panic!("not proxy")
        };
        assert_eq!(args.clusters.entra.cloud.cloud, None);
        let err = parse(&["--auth", "env", "--token-file", "t"])
            .err()
            .unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let err = parse(&["--auth", "kerberos"]).err().unwrap().to_string();
        assert!(err.contains("device-code"), "{err}");
    }

    #[tokio::test]
    async fn pop_needs_a_cluster_id_and_no_token() {
        let err = parse(&["--cluster-id", "/subscriptions/x"]).err().unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = parse(&["--pop", "--token", "t"]).err().unwrap();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let Command::Proxy(args) = parse(&["--pop", "--key-file", "k"]).unwrap().command else {
            panic!("not proxy")
        };
        assert!(args.clusters.pop);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("send.key"),
            "SharedAccessKeyName=send;SharedAccessKey=0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        let file = dir.path().join("clusters.toml");
        std::fs::write(
            &file,
            "[[cluster]]\nrelay = \"wss://relay.example\"\nconnection = \"c\"\nkey_file = \"send.key\"\n",
        )
        .unwrap();
        let mut flags = super::ClusterFlags {
            clusters_file: Some(file.clone()),
            pop: true,
            ..Default::default()
        };
        let err = format!("{:#}", flags.resolve().await.err().unwrap());
        assert!(
            err.contains("--pop needs the cluster's Azure resource id"),
            "{err}"
        );
        std::fs::write(
            &file,
            "[[cluster]]\nrelay = \"wss://relay.example\"\nconnection = \"c\"\nkey_file = \"send.key\"\ncluster_id = \"not-an-id\"\n",
        )
        .unwrap();
        flags.clusters_file = Some(file);
        let err = format!("{:#}", flags.resolve().await.err().unwrap());
        assert!(err.contains("cluster 'c': cluster id"), "{err}");
    }

    #[tokio::test]
    async fn a_clusters_file_entry_with_a_token_and_a_server_app_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("send.key"),
            "SharedAccessKeyName=send;SharedAccessKey=0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        let file = dir.path().join("clusters.toml");
        std::fs::write(
            &file,
            "[[cluster]]\nrelay = \"wss://relay.example\"\nconnection = \"c\"\nkey_file = \"send.key\"\ntoken = \"t\"\nserver_app_id = \"6256c85f-0aad-4d50-b960-e6e9b21efe35\"\n",
        )
        .unwrap();
        let flags = super::ClusterFlags {
            clusters_file: Some(file),
            ..Default::default()
        };
        let err = format!("{:#}", flags.resolve().await.err().unwrap());
        assert!(err.contains("server_app_id is for Entra ID"), "{err}");
    }
}

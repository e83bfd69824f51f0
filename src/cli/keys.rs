//! `clusterconnect keys list|renew`: a registered cluster's agent keys, and renewing one, like
//! `az relay hyco authorization-rule keys list|renew`. The relay closes what a renewed key
//! authorized at once; `--update-agent` moves the agent to the renewed key so a rotation has
//! no downtime: renew the key the agent does not use, then the other.

use anyhow::Context;
use base64::Engine;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, Patch, PatchParams};

use super::connect::KubeFlags;
use super::inventory::RegistryFlags;
use super::kubeclient;
use crate::arm::{AccessKeys, ClusterId};
use crate::onboard::install;
use crate::onboard::manifests::{AGENT_NAME, LISTEN_KEY_FILE};
use crate::tunnel::sas::SasKey;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print the agent's Listen rule with its primary and secondary keys (owners only).
    List(ListArgs),
    /// Give one key a new value; the listeners and tunnels that the old value authorized are
    /// closed at once.
    Renew(RenewArgs),
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Name of the connected cluster.
    #[arg(short = 'n', long)]
    pub name: String,
    #[arg(short = 'g', long)]
    pub resource_group: String,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyChoice {
    /// The agent's primary Listen key.
    Primary,
    /// The agent's secondary Listen key.
    Secondary,
    /// The relay's key behind every user's Send token: renewing it ends every user tunnel of
    /// the cluster; proxies fetch new tokens on their own.
    Send,
}

impl KeyChoice {
    fn key_type(self) -> &'static str {
        match self {
            KeyChoice::Primary => "PrimaryKey",
            KeyChoice::Secondary => "SecondaryKey",
            KeyChoice::Send => "SendKey",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RenewArgs {
    /// Name of the connected cluster.
    #[arg(short = 'n', long)]
    pub name: String,
    #[arg(short = 'g', long)]
    pub resource_group: String,
    /// Which key gets a new value.
    #[arg(long, value_enum)]
    pub key: KeyChoice,
    /// Also write the renewed Listen key into the agent's Secret in the cluster of your
    /// kubeconfig; the agent picks it up when the kubelet refreshes the Secret (about a minute).
    /// Refused for the key the agent uses now, which would cut it off until then.
    #[arg(long)]
    pub update_agent: bool,
    #[command(flatten)]
    pub kube: KubeFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

const MISSING_KUBECONFIG: &str =
    "set KUBECONFIG or pass --kubeconfig (--update-agent writes the agent's Secret in the cluster)";

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List(args) => {
            let id = args
                .at
                .registry
                .cluster_id(&args.resource_group, &args.name)?;
            let keys = args.at.client().await?.list_keys(&id).await?;
            print(&keys)
        }
        Command::Renew(args) => renew(args).await,
    }
}

async fn renew(args: RenewArgs) -> anyhow::Result<()> {
    let id = args
        .at
        .registry
        .cluster_id(&args.resource_group, &args.name)?;
    let client = args.at.client().await?;
    let agent = match args.update_agent {
        true => {
            let agent = AgentSecret::open(&args.kube, &id, args.key).await?;
            let before = client.list_keys(&id).await?;
            agent.refuse_the_key_in_use(&before, args.key)?;
            Some(agent)
        }
        false => None,
    };
    let keys = client.regenerate_keys(&id, args.key.key_type()).await?;
    if let Some(agent) = agent {
        let line = match args.key {
            KeyChoice::Secondary => &keys.secondary_connection_string,
            _ => &keys.primary_connection_string,
        };
        agent.write(line).await.with_context(|| {
            format!(
                "the {:?} key was renewed (the agent still uses the other key, which keeps working), but writing it into Secret {}/{AGENT_NAME} failed; run the same command again once the cluster is reachable",
                args.key, args.kube.namespace
            )
        })?;
        errln!(
            "wrote the renewed {:?} key into Secret {}/{AGENT_NAME}; the agent uses it once the kubelet refreshes the Secret (about a minute)",
            args.key, args.kube.namespace
        );
    }
    print(&keys)
}

fn print(keys: &AccessKeys) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(keys)?);
    Ok(())
}

/// The agent's Secret of this registration, checked before anything is renewed.
struct AgentSecret {
    secrets: Api<KubeSecret>,
    /// The Listen key the agent has now, if its Secret holds a readable one.
    current: Option<SasKey>,
}

impl AgentSecret {
    async fn open(kube: &KubeFlags, id: &ClusterId, key: KeyChoice) -> anyhow::Result<Self> {
        if key == KeyChoice::Send {
            anyhow::bail!("--update-agent moves the agent to a renewed Listen key; the Send key never leaves the relay, so renew it without --update-agent");
        }
        let (client, _) = kubeclient::client(
            kube.kubeconfig.as_deref(),
            kube.kube_context.as_deref(),
            MISSING_KUBECONFIG,
        )
        .await?;
        let secrets: Api<KubeSecret> = Api::namespaced(client, &kube.namespace);
        // Ours and this registration's: the same checks `connect` makes.
        if install::existing_key(&secrets, &kube.namespace, id)
            .await?
            .is_none()
        {
            anyhow::bail!(
                "there is no agent Secret {}/{AGENT_NAME} in this cluster; run `clusterconnect connect` first, or pass the agent's --namespace",
                kube.namespace
            );
        }
        let secret = secrets
            .get(AGENT_NAME)
            .await
            .context("cannot read the agent Secret")?;
        let current = secret
            .data
            .as_ref()
            .and_then(|d| d.get(LISTEN_KEY_FILE))
            .and_then(|b| SasKey::parse(&String::from_utf8_lossy(&b.0)).ok());
        Ok(AgentSecret { secrets, current })
    }

    /// Renewing the key the agent uses would cut it off until the kubelet refreshes the
    /// Secret: refused, with the order that has no downtime.
    fn refuse_the_key_in_use(&self, keys: &AccessKeys, key: KeyChoice) -> anyhow::Result<()> {
        let Some(current) = &self.current else {
            return Ok(());
        };
        let renewing = match key {
            KeyChoice::Primary => &keys.primary_key,
            KeyChoice::Secondary => &keys.secondary_key,
            KeyChoice::Send => return Ok(()),
        };
        if current.key.expose() == renewing.as_str() {
            let other = match key {
                KeyChoice::Primary => "secondary",
                _ => "primary",
            };
            anyhow::bail!(
                "the agent uses the {key:?} key now, and renewing it would cut the agent off until the kubelet refreshes its Secret; renew the {other} key with --update-agent first, wait a minute, then renew this one (or renew it without --update-agent to cut the agent off at once)"
            );
        }
        Ok(())
    }

    async fn write(&self, line: &str) -> anyhow::Result<()> {
        let value = base64::engine::general_purpose::STANDARD.encode(line);
        let patch = serde_json::json!({ "data": { LISTEN_KEY_FILE: value } });
        self.secrets
            .patch(AGENT_NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

//! `clusterconnect list` and `clusterconnect show`: the registry's clusters, as
//! `az connectedk8s list/show` prints them.

use std::path::PathBuf;

use super::entra::{EntraCredentials, EntraFlags};
use super::output::{flatten, render, Output};
use super::registry::RegistryAccess;

/// Where the registry is and how to reach it.
#[derive(clap::Args, Debug)]
pub struct RegistryFlags {
    /// The relay holding the registry: wss://host[:port].
    #[arg(long, env = "CLUSTERCONNECT_RELAY")]
    pub relay: String,
    /// Extra CA certificate (PEM) to trust for the relay, besides the system roots.
    #[arg(long, env = "CLUSTERCONNECT_RELAY_CA")]
    pub relay_ca: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryAccess,
    #[command(flatten)]
    pub entra: EntraFlags,
}

impl RegistryFlags {
    /// The management client these flags describe (signing in to Entra ID when no admin key
    /// is given).
    pub async fn client(&self) -> anyhow::Result<crate::arm::client::ManagementClient> {
        let mut entra = EntraCredentials::new(&self.entra);
        self.registry
            .client(&self.relay, self.relay_ca.as_deref(), &mut entra)
            .await
    }
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only this resource group.
    #[arg(short = 'g', long)]
    pub resource_group: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Json)]
    pub output: Output,
    /// A field pick applied before printing, e.g. "[].name".
    #[arg(long)]
    pub query: Option<String>,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[arg(short = 'n', long)]
    pub name: String,
    #[arg(short = 'g', long)]
    pub resource_group: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Json)]
    pub output: Output,
    /// A field pick applied before printing, e.g. "connectivityStatus".
    #[arg(long)]
    pub query: Option<String>,
    #[command(flatten)]
    pub at: RegistryFlags,
}

fn print(value: serde_json::Value, q: Option<&str>, output: Output) -> anyhow::Result<()> {
    let text = render(&value, q, output).map_err(|e| anyhow::anyhow!(e))?;
    outln!("{text}");
    Ok(())
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let client = args.at.client().await?;
    let clusters = client
        .list(
            &args.at.registry.subscription,
            args.resource_group.as_deref(),
        )
        .await?;
    let value = serde_json::Value::Array(clusters.iter().map(flatten).collect());
    print(value, args.query.as_deref(), args.output)
}

pub async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let id = args
        .at
        .registry
        .cluster_id(&args.resource_group, &args.name)?;
    let client = args.at.client().await?;
    let Some(cluster) = client.get(&id).await? else {
        anyhow::bail!(
            "the connected cluster '{}' under resource group '{}' was not found",
            args.name,
            args.resource_group
        );
    };
    print(flatten(&cluster), args.query.as_deref(), args.output)
}

//! `clusterconnect connect` and `clusterconnect disconnect`: onboard a cluster with the
//! user's own kubeconfig and register it with the relay, like `az connectedk8s connect` and
//! `az connectedk8s delete`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::inventory::RegistryFlags;
use super::kubeclient;
use super::output::flatten;
use crate::onboard::install::{self, ConnectRequest};
use crate::onboard::manifests::{self, DEFAULT_NAMESPACE};
use crate::onboard::remove;
use crate::tunnel::protocol::RelayAddress;

/// The distributions `az connectedk8s connect --distribution` knows.
const DISTRIBUTIONS: [&str; 16] = [
    "generic",
    "openshift",
    "rancher_rke",
    "kind",
    "k3s",
    "minikube",
    "gke",
    "eks",
    "aks",
    "aks_management",
    "aks_workload",
    "capz",
    "aks_engine",
    "tkg",
    "canonical",
    "karbon",
];
/// The infrastructures `az connectedk8s connect --infrastructure` knows.
const INFRASTRUCTURES: [&str; 9] = [
    "generic",
    "azure",
    "aws",
    "gcp",
    "azure_stack_hci",
    "azure_stack_hub",
    "azure_stack_edge",
    "vsphere",
    "windows_server",
];
const NO_KUBECONFIG: &str =
    "set KUBECONFIG or pass --kubeconfig (connect needs direct access to the cluster: `oc login`, `az aks get-credentials`, ...)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Yaml,
}

/// The cluster side both commands share.
#[derive(clap::Args, Debug)]
pub struct KubeFlags {
    /// Kubeconfig with direct access to the cluster [default: $KUBECONFIG, ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig [default: its current context].
    #[arg(long, visible_alias = "context")]
    pub kube_context: Option<String>,
    /// Namespace of the agent.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    /// Name of the connected cluster.
    #[arg(short = 'n', long)]
    pub name: String,
    /// Resource group to register it in.
    #[arg(short = 'g', long)]
    pub resource_group: String,
    /// Location recorded with the registration.
    #[arg(short = 'l', long, default_value = "eastus")]
    pub location: String,
    /// The Kubernetes distribution.
    #[arg(long, default_value = "generic", ignore_case = true,
          value_parser = clap::builder::PossibleValuesParser::new(DISTRIBUTIONS))]
    pub distribution: String,
    /// Where the cluster runs.
    #[arg(long, default_value = "generic", ignore_case = true,
          value_parser = clap::builder::PossibleValuesParser::new(INFRASTRUCTURES))]
    pub infrastructure: String,
    /// Tags as key=value; several after one --tags, or repeat it.
    #[arg(long, num_args = 1.., value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    #[command(flatten)]
    pub kube: KubeFlags,
    /// Install into --namespace although it already exists and connect did not create it.
    /// Without this flag such a namespace is refused. With it the namespace is used as is (not
    /// labelled or annotated), and disconnect removes only the agent's objects from it.
    #[arg(long)]
    pub use_existing_namespace: bool,
    /// The agent image [default: ghcr.io/clusterconnect/clusterconnect:<this version>].
    #[arg(long)]
    pub agent_image: Option<String>,
    /// Entra tenant id whose users the agent accepts (it impersonates them); repeat or separate
    /// with commas. Without it the agent passes service-account tokens through only.
    #[arg(long = "agent-tenant", value_delimiter = ',')]
    pub agent_tenants: Vec<String>,
    /// How long to wait for the agent to roll out.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Print the manifests instead of installing anything or registering (for GitOps); the
    /// agent Secret holds placeholders that connect fills in.
    #[arg(long)]
    pub dry_run: bool,
    /// json: the registered resource (with --dry-run, a v1 List of the manifests); yaml: the
    /// same as YAML (with --dry-run, one document per manifest).
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Json)]
    pub output: Format,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct DisconnectArgs {
    #[arg(short = 'n', long)]
    pub name: String,
    #[arg(short = 'g', long)]
    pub resource_group: String,
    #[command(flatten)]
    pub kube: KubeFlags,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// How long to wait for the namespace to finish terminating.
    #[arg(long, default_value = "2m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub at: RegistryFlags,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.trim().is_empty() {
        return Err(format!("tag {s:?} has no key; write key=value"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

fn tenants(given: &[String]) -> anyhow::Result<Vec<String>> {
    given
        .iter()
        .map(|t| {
            uuid::Uuid::parse_str(t.trim())
                .map(|id| id.hyphenated().to_string())
                .map_err(|_| anyhow::anyhow!("--agent-tenant {t:?} is not a tenant id (a GUID, as in `az account show --query tenantId`)"))
        })
        .collect()
}

fn print(value: &serde_json::Value, format: Format) -> anyhow::Result<()> {
    let text = match format {
        Format::Json => serde_json::to_string_pretty(value)?,
        Format::Yaml => serde_norway::to_string(value)?,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end()).context("cannot write to stdout")
}

/// `connect --dry-run`: the manifests for a GitOps repository, nothing installed or registered.
fn dry_run(args: &ConnectArgs, request: &ConnectRequest) -> anyhow::Result<()> {
    let relay = RelayAddress::parse(&args.at.relay)?;
    let m = install::dry_run(request, &format!("wss://{}", relay.authority()));
    let text = match args.output {
        Format::Yaml => manifests::to_yaml(&m, true)?,
        Format::Json => {
            let namespace = m.namespace.as_ref().map(serde_json::to_value).transpose()?;
            let items: Vec<_> = namespace
                .into_iter()
                .chain([
                    serde_json::to_value(&m.service_account)?,
                    serde_json::to_value(&m.cluster_role)?,
                    serde_json::to_value(&m.cluster_role_binding)?,
                    serde_json::to_value(&m.secret)?,
                    serde_json::to_value(&m.deployment)?,
                ])
                .collect();
            serde_json::to_string_pretty(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}),
            )?
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end()).context("cannot write to stdout")?;
    errln!("Dry run: nothing was installed or registered. The Secret's keys are placeholders; `clusterconnect connect` fills them in.");
    Ok(())
}

/// The cloud the agent validates Entra callers in: this command's (`--cloud`,
/// `--cloud-config`), when the agent accepts Entra callers at all and it is not the public one.
fn agent_cloud(args: &ConnectArgs) -> anyhow::Result<Option<crate::entra::CloudDefinition>> {
    if args.agent_tenants.is_empty() {
        return Ok(None);
    }
    let cloud = args.at.entra.cloud.resolve()?;
    if cloud.builtin().is_none() {
        // The agent will trust tokens from this authority: say so, since part of it may come
        // from this machine's environment rather than a flag.
        errln!(
            "The agent will validate Entra callers against authority {} (cloud {}{}).",
            cloud.authority_host,
            cloud.name,
            match crate::entra::cloud::overrides_in_effect() {
                v if v.is_empty() => String::new(),
                v => format!(", changed by {} in this environment", v.join(", ")),
            }
        );
    }
    Ok((cloud != crate::entra::CloudDefinition::default()).then_some(cloud))
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let id = args
        .at
        .registry
        .cluster_id(&args.resource_group, &args.name)?;
    let relay_ca = match &args.at.relay_ca {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read --relay-ca {} (the agent trusts it too)",
                path.display()
            )
        })?),
        None => None,
    };
    let request = ConnectRequest {
        id,
        location: args.location.clone(),
        tags: args.tags.iter().cloned().collect::<BTreeMap<_, _>>(),
        distribution: args.distribution.to_ascii_lowercase(),
        infrastructure: args.infrastructure.to_ascii_lowercase(),
        namespace: args.kube.namespace.clone(),
        use_existing_namespace: args.use_existing_namespace,
        image: args
            .agent_image
            .clone()
            .unwrap_or_else(manifests::default_image),
        tenants: tenants(&args.agent_tenants)?,
        relay_ca,
        cloud: agent_cloud(&args)?,
        timeout: args.timeout,
    };
    if args.dry_run {
        return dry_run(&args, &request);
    }
    let (kube, _) = kubeclient::client(
        args.kube.kubeconfig.as_deref(),
        args.kube.kube_context.as_deref(),
        NO_KUBECONFIG,
    )
    .await?;
    let registry = args.at.client().await?;
    let cluster = install::connect(&kube, &registry, &request, &mut |line| errln!("{line}"))
        .await
        .with_context(|| {
            format!(
                "cannot connect cluster '{}' (resource group '{}')",
                args.name, args.resource_group
            )
        })?;
    print(&flatten(&cluster), args.output)
}

/// Asks on the terminal; without one, `--yes` is required.
fn confirmed(args: &DisconnectArgs) -> anyhow::Result<bool> {
    super::confirm(
        args.yes,
        "disconnect removes the agent from the cluster and the registration",
        &format!(
            "Remove the agent (namespace {}) from the cluster and the registration of '{}' in resource group '{}'?",
            args.kube.namespace, args.name, args.resource_group
        ),
    )
}

pub async fn disconnect(args: DisconnectArgs) -> anyhow::Result<()> {
    let id = args
        .at
        .registry
        .cluster_id(&args.resource_group, &args.name)?;
    if !confirmed(&args)? {
        errln!("Nothing removed.");
        return Ok(());
    }
    let (kube, _) = kubeclient::client(
        args.kube.kubeconfig.as_deref(),
        args.kube.kube_context.as_deref(),
        NO_KUBECONFIG,
    )
    .await?;
    let registry = args.at.client().await?;
    let removal = remove::disconnect(&kube, &registry, &id, &args.kube.namespace, args.timeout)
        .await
        .with_context(|| {
            format!(
                "cannot disconnect cluster '{}' (resource group '{}')",
                args.name, args.resource_group
            )
        })?;
    let mut out = std::io::stdout().lock();
    if removal.removed.is_empty() {
        writeln!(out, "Nothing to remove: no agent objects and no registration for '{}' in resource group '{}'.", args.name, args.resource_group)?;
    }
    for line in &removal.removed {
        writeln!(out, "removed {line}")?;
    }
    for line in &removal.kept {
        writeln!(out, "kept {line}")?;
    }
    if removal.still_terminating {
        errln!(
            "warning: namespace {} is still terminating after {}; check `kubectl get namespace {} -o yaml` for finalizers",
            args.kube.namespace,
            humantime::format_duration(args.timeout),
            args.kube.namespace
        );
    }
    Ok(())
}

//! `clusterconnect extension create|update|show|list|delete`: the Key Vault Secrets Provider
//! as a cluster extension, with the flags of `az k8s-extension` (`-c`, `-g`, `--cluster-type
//! connectedClusters`, `--extension-type Microsoft.AzureKeyVaultSecretsProvider`, `-n`,
//! `--configuration-settings`). The resource lives in the relay's registry; the cluster is
//! reached through the user's kubeconfig, as `connect` does it. `extension controller` (and
//! `extension provider`) is what the installed pods run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::inventory::RegistryFlags;
use super::kubeclient;
use super::output::{flatten_value, render_queried, Output};
use crate::arm::client::ManagementClient;
use crate::arm::{
    ClusterId, ClusterScope, ErrorDetail, Extension, ExtensionProperties, ExtensionRequest,
    ExtensionScope, ExtensionStatus, KEY_VAULT_EXTENSION_TYPE,
};
use crate::extension::controller;
use crate::extension::install::{self, Health};
use crate::extension::manifests::ExtensionSpec;
use crate::extension::settings::{parse_interval, parse_pair, Settings, SettingsError};
use crate::extension::vault::{parse_vault_url, VaultAccess};

const NO_KUBECONFIG: &str =
    "set KUBECONFIG or pass --kubeconfig (the extension is installed with direct access to the cluster, as connect is)";
/// The Arc extension's default release namespace for the Key Vault provider.
const DEFAULT_RELEASE_NAMESPACE: &str = "kube-system";
/// `az k8s-extension list -o table`.
const COLUMNS: &[(&str, &str)] = &[
    ("Name", "name"),
    ("ExtensionType", "extensionType"),
    ("Version", "version"),
    ("ProvisioningState", "provisioningState"),
    ("ResourceGroup", "resourceGroup"),
];

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Install the extension in a connected cluster (like `az k8s-extension create`); running it
    /// again with the same name restores anything missing.
    Create(Box<CreateArgs>),
    /// Change the configuration settings and restore what is missing (like `az k8s-extension
    /// update`).
    Update(Box<UpdateArgs>),
    /// Show the extension, with what is really installed in the cluster.
    Show(Box<ShowArgs>),
    /// List the cluster's extensions.
    List(Box<ListArgs>),
    /// Remove what the extension installed (the CRDs, classes and synced Secrets stay) and the
    /// extension resource.
    Delete(Box<DeleteArgs>),
    /// The in-cluster controller (what the extension's Deployment runs).
    #[command(hide = true)]
    Controller(Box<ControllerArgs>),
    /// The Secrets Store CSI driver's provider (what the extension's DaemonSet runs with
    /// csi.enabled=true): gRPC Version and Mount on a unix socket.
    #[command(hide = true)]
    Provider(Box<ProviderArgs>),
}

#[derive(clap::Args, Debug)]
pub struct ProviderArgs {
    /// The unix socket to serve, in the driver's provider directory.
    #[arg(long)]
    pub socket: PathBuf,
    /// A vault's URL instead of the one its name and cloud make: VAULT_NAME=https://URL.
    #[arg(long = "vault-url", value_parser = parse_vault_url)]
    pub vault_urls: Vec<(String, String)>,
}

/// Which cluster, as `az k8s-extension` names it.
#[derive(clap::Args, Debug)]
pub struct ClusterFlags {
    /// Name of the connected cluster.
    #[arg(short = 'c', long)]
    pub cluster_name: String,
    /// Its resource group.
    #[arg(short = 'g', long)]
    pub resource_group: String,
    /// The cluster's type; only connected clusters are served.
    #[arg(long, default_value = "connectedClusters", value_parser = ["connectedClusters"], ignore_case = true)]
    pub cluster_type: String,
}

#[derive(clap::Args, Debug)]
pub struct KubeFlags {
    /// Kubeconfig with direct access to the cluster [default: $KUBECONFIG, ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig [default: its current context].
    #[arg(long, visible_alias = "context")]
    pub kube_context: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct PrintFlags {
    /// Output format, as az prints it.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Json)]
    pub output: Output,
    /// JMESPath over what -o json prints, e.g. "provisioningState" or "statuses[].message".
    #[arg(long)]
    pub query: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub cluster: ClusterFlags,
    /// Name of the extension instance.
    #[arg(short = 'n', long)]
    pub name: String,
    /// The extension type.
    #[arg(long)]
    pub extension_type: String,
    /// Settings as KEY=VALUE: secrets-store-csi-driver.enableSecretRotation,
    /// secrets-store-csi-driver.rotationPollInterval, secrets-store-csi-driver.syncSecret.enabled,
    /// csi.enabled, image. Several after one flag, or repeat it.
    #[arg(long, num_args = 1.., value_parser = parse_setting)]
    pub configuration_settings: Vec<(String, String)>,
    /// Namespace the extension is installed in.
    #[arg(long, default_value = DEFAULT_RELEASE_NAMESPACE)]
    pub release_namespace: String,
    /// How long to wait for the controller to roll out.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub kube: KubeFlags,
    #[command(flatten)]
    pub print: PrintFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[arg(short = 'n', long)]
    pub name: String,
    /// Settings to change (the others keep their values), as for create.
    #[arg(long, num_args = 1.., value_parser = parse_setting)]
    pub configuration_settings: Vec<(String, String)>,
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub kube: KubeFlags,
    #[command(flatten)]
    pub print: PrintFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[arg(short = 'n', long)]
    pub name: String,
    #[command(flatten)]
    pub kube: KubeFlags,
    #[command(flatten)]
    pub print: PrintFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[command(flatten)]
    pub print: PrintFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[arg(short = 'n', long)]
    pub name: String,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long)]
    pub yes: bool,
    #[command(flatten)]
    pub kube: KubeFlags,
    #[command(flatten)]
    pub at: RegistryFlags,
}

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Sync secretObjects into Kubernetes Secrets.
    #[arg(long)]
    pub sync_secret: bool,
    /// Re-fetch every class every --rotation-poll-interval.
    #[arg(long)]
    pub enable_secret_rotation: bool,
    #[arg(long, default_value = "2m", value_parser = parse_interval_arg)]
    pub rotation_poll_interval: Duration,
    /// Namespace and name of the leader Lease.
    #[arg(long)]
    pub lease_namespace: String,
    #[arg(long, default_value = crate::extension::manifests::CONTROLLER_NAME)]
    pub lease_name: String,
    /// This replica's name in the Lease [default: the pod's name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// A vault's URL instead of the one its name and cloud make (a private endpoint's name):
    /// VAULT_NAME=https://URL, repeatable.
    #[arg(long = "vault-url", value_parser = parse_vault_url)]
    pub vault_urls: Vec<(String, String)>,
    /// Kubeconfig [default: the pod's service account, else $KUBECONFIG].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long)]
    pub context: Option<String>,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    parse_pair(s).map_err(|e| e.to_string())
}

fn parse_interval_arg(s: &str) -> Result<Duration, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

pub async fn run(cmd: Command, shutdown: CancellationToken) -> anyhow::Result<u8> {
    match cmd {
        Command::Create(args) => create(*args).await,
        Command::Update(args) => update(*args).await,
        Command::Show(args) => show(*args).await,
        Command::List(args) => list(*args).await,
        Command::Delete(args) => delete(*args).await,
        Command::Controller(args) => run_controller(*args, shutdown).await,
        Command::Provider(args) => run_provider(*args, shutdown).await,
    }
    .map(|()| 0)
}

fn cluster_id(flags: &ClusterFlags, at: &RegistryFlags) -> anyhow::Result<ClusterId> {
    at.registry
        .cluster_id(&flags.resource_group, &flags.cluster_name)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    crate::arm::check_extension_name(name).map_err(|e| anyhow::anyhow!(e))
}

fn print(extensions: Vec<Extension>, single: bool, flags: &PrintFlags) -> anyhow::Result<()> {
    let mut values: Vec<serde_json::Value> = extensions
        .into_iter()
        .map(|e| flatten_value(serde_json::to_value(e).unwrap_or_default()))
        .collect();
    let value = if single {
        values.pop().unwrap_or_default()
    } else {
        serde_json::Value::Array(values)
    };
    let text = render_queried(&value, flags.query.as_deref(), flags.output, COLUMNS)
        .map_err(|e| anyhow::anyhow!(e))?;
    outln!("{text}");
    Ok(())
}

/// The registry client, after checking that the cluster is registered there.
async fn registry(at: &RegistryFlags, id: &ClusterId) -> anyhow::Result<ManagementClient> {
    let client = at.client().await?;
    if client.get(id).await?.is_none() {
        anyhow::bail!(
            "the connected cluster '{}' under resource group '{}' was not found; connect it first (`clusterconnect connect -n {} -g {}`)",
            id.name,
            id.resource_group,
            id.name,
            id.resource_group
        );
    }
    Ok(client)
}

async fn kube(flags: &KubeFlags) -> anyhow::Result<kube::Client> {
    let (client, _) = kubeclient::client(
        flags.kubeconfig.as_deref(),
        flags.kube_context.as_deref(),
        NO_KUBECONFIG,
    )
    .await?;
    Ok(client)
}

fn spec_of(name: &str, id: &ClusterId, namespace: &str, settings: &Settings) -> ExtensionSpec {
    ExtensionSpec {
        name: name.to_string(),
        namespace: namespace.to_string(),
        cluster_id: id.path(),
        image: settings
            .image
            .clone()
            .unwrap_or_else(crate::onboard::manifests::default_image),
        sync: settings.sync,
        rotation: settings.rotation,
        interval: settings.interval,
        csi: settings.csi,
    }
}

fn settings_of(map: &BTreeMap<String, String>) -> anyhow::Result<Settings> {
    Settings::parse(map).map_err(|e: SettingsError| anyhow::anyhow!(e))
}

/// The recorded settings for reading what is installed (show, delete): a setting this CLI
/// does not know (a newer one's) must not keep it from finding the install. Unknown or
/// unreadable settings count as their defaults, with a warning.
fn recorded_settings(map: &BTreeMap<String, String>) -> Settings {
    Settings::parse(map).unwrap_or_else(|e| {
        errln!("warning: {e}; the setting is ignored here");
        let known: BTreeMap<String, String> = map
            .iter()
            .filter(|(k, v)| {
                Settings::parse(&BTreeMap::from([((*k).clone(), (*v).clone())])).is_ok()
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Settings::parse(&known)
            .unwrap_or_else(|_| Settings::parse(&BTreeMap::new()).expect("the defaults parse"))
    })
}

fn properties(
    settings: BTreeMap<String, String>,
    namespace: &str,
    state: &str,
) -> ExtensionProperties {
    ExtensionProperties {
        extension_type: KEY_VAULT_EXTENSION_TYPE.to_string(),
        auto_upgrade_minor_version: false,
        release_train: "Stable".into(),
        version: None,
        current_version: None,
        scope: ExtensionScope {
            cluster: ClusterScope {
                release_namespace: namespace.to_string(),
            },
        },
        configuration_settings: settings,
        configuration_protected_settings: BTreeMap::new(),
        provisioning_state: state.to_string(),
        statuses: Vec::new(),
        error_info: None,
        is_system_extension: false,
    }
}

/// The state `health` shows, as ARM's fields.
fn apply_health(properties: &mut ExtensionProperties, health: &Health) {
    properties.statuses = health.statuses.clone();
    match health.error_message() {
        Some(message) => {
            properties.provisioning_state = "Failed".into();
            properties.error_info = Some(ErrorDetail {
                code: "ExtensionResourcesUnhealthy".into(),
                message,
            });
        }
        None => {
            properties.provisioning_state = "Succeeded".into();
            properties.error_info = None;
            properties.version = Some(env!("CARGO_PKG_VERSION").to_string());
            properties.current_version = properties.version.clone();
        }
    }
}

/// Records `state` in the registry, installs, checks, and records what it found.
async fn install_and_record(
    registry: &ManagementClient,
    id: &ClusterId,
    name: &str,
    mut props: ExtensionProperties,
    kube_flags: &KubeFlags,
    timeout: Duration,
) -> anyhow::Result<Extension> {
    let settings = settings_of(&props.configuration_settings)?;
    let namespace = props.scope.cluster.release_namespace.clone();
    let spec = spec_of(name, id, &namespace, &settings);
    registry
        .put_extension(
            id,
            name,
            &ExtensionRequest {
                properties: props.clone(),
            },
        )
        .await
        .context("recording the extension in the relay's registry")?;
    let kube = kube(kube_flags).await?;
    let installed = install::install(&kube, &spec, timeout, &mut |line| errln!("{line}")).await;
    if let Err(e) = &installed {
        props.provisioning_state = "Failed".into();
        props.error_info = Some(ErrorDetail {
            code: "InstallationFailed".into(),
            message: crate::tunnel::http::error_chain(e),
        });
        props.statuses = vec![ExtensionStatus {
            code: "InstallationFailed".into(),
            display_status: "Failed".into(),
            level: "Error".into(),
            message: crate::tunnel::http::error_chain(e),
            time: crate::extension::report::now_rfc3339(),
        }];
        let failed = ExtensionRequest {
            properties: props.clone(),
        };
        let _ = registry.put_extension(id, name, &failed).await;
    }
    installed
        .with_context(|| format!("cannot install extension '{name}' in cluster '{}'", id.name))?;
    let health = install::check(&kube, &spec).await?;
    apply_health(&mut props, &health);
    Ok(registry
        .put_extension(id, name, &ExtensionRequest { properties: props })
        .await?)
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    if !args
        .extension_type
        .eq_ignore_ascii_case(KEY_VAULT_EXTENSION_TYPE)
    {
        anyhow::bail!(
            "--extension-type {} is not available; the one type served is {KEY_VAULT_EXTENSION_TYPE}",
            args.extension_type
        );
    }
    let settings: BTreeMap<String, String> = args.configuration_settings.iter().cloned().collect();
    settings_of(&settings)?;
    let id = cluster_id(&args.cluster, &args.at)?;
    let registry = registry(&args.at, &id).await?;
    let existing = registry.list_extensions(&id).await?;
    if let Some(other) = existing
        .iter()
        .find(|e| !e.name.eq_ignore_ascii_case(&args.name))
    {
        anyhow::bail!(
            "cluster '{}' already has extension '{}' of type {KEY_VAULT_EXTENSION_TYPE}; only one instance per cluster is allowed: update it, or delete it first",
            id.name,
            other.name
        );
    }
    if let Some(same) = existing.first() {
        let installed = &same.properties.scope.cluster.release_namespace;
        if installed != &args.release_namespace {
            anyhow::bail!(
                "extension '{}' is installed in namespace '{installed}'; --release-namespace cannot change it (that would leave the old install behind): delete the extension first, then create it in '{}'",
                same.name,
                args.release_namespace
            );
        }
    }
    let state = if existing.is_empty() {
        "Creating"
    } else {
        "Updating"
    };
    let props = properties(settings, &args.release_namespace, state);
    let extension =
        install_and_record(&registry, &id, &args.name, props, &args.kube, args.timeout).await?;
    print(vec![extension], true, &args.print)
}

async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let id = cluster_id(&args.cluster, &args.at)?;
    let registry = registry(&args.at, &id).await?;
    let Some(current) = registry.get_extension(&id, &args.name).await? else {
        anyhow::bail!(
            "extension '{}' of connected cluster '{}' was not found; create it with `clusterconnect extension create`",
            args.name,
            id.name
        );
    };
    let mut settings = current.properties.configuration_settings.clone();
    settings.extend(args.configuration_settings.iter().cloned());
    settings_of(&settings)?;
    let namespace = current.properties.scope.cluster.release_namespace.clone();
    let props = properties(settings, &namespace, "Updating");
    let extension =
        install_and_record(&registry, &id, &args.name, props, &args.kube, args.timeout).await?;
    print(vec![extension], true, &args.print)
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let id = cluster_id(&args.cluster, &args.at)?;
    let registry = args.at.client().await?;
    let Some(mut extension) = registry.get_extension(&id, &args.name).await? else {
        anyhow::bail!(
            "(ResourceNotFound) extension '{}' of connected cluster '{}' in resource group '{}' was not found",
            args.name,
            id.name,
            id.resource_group
        );
    };
    let checked = match kube(&args.kube).await {
        Ok(kube) => {
            let settings = recorded_settings(&extension.properties.configuration_settings);
            let spec = spec_of(
                &extension.name,
                &id,
                &extension.properties.scope.cluster.release_namespace,
                &settings,
            );
            Some(install::check(&kube, &spec).await?)
        }
        Err(e) => {
            errln!("warning: the cluster was not checked ({e:#}); showing the state last recorded");
            None
        }
    };
    if let Some(health) = checked {
        let before = (
            extension.properties.provisioning_state.clone(),
            extension.properties.error_info.clone(),
        );
        apply_health(&mut extension.properties, &health);
        let after = (
            extension.properties.provisioning_state.clone(),
            extension.properties.error_info.clone(),
        );
        // What the cluster holds now is what the registry should say; only owners may record it.
        if before != after {
            let request = ExtensionRequest {
                properties: extension.properties.clone(),
            };
            if let Err(e) = registry.put_extension(&id, &extension.name, &request).await {
                tracing::debug!(error = %e, "cannot record the checked state in the registry");
            }
        }
    }
    print(vec![extension], true, &args.print)
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let id = cluster_id(&args.cluster, &args.at)?;
    let registry = args.at.client().await?;
    let extensions = registry.list_extensions(&id).await?;
    print(extensions, false, &args.print)
}

fn confirmed(args: &DeleteArgs) -> anyhow::Result<bool> {
    super::confirm(
        args.yes,
        "delete removes the extension's controller from the cluster",
        &format!(
            "Remove extension '{}' from cluster '{}'?",
            args.name, args.cluster.cluster_name
        ),
    )
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let id = cluster_id(&args.cluster, &args.at)?;
    if !confirmed(&args)? {
        errln!("Nothing removed.");
        return Ok(());
    }
    let registry = args.at.client().await?;
    let Some(extension) = registry.get_extension(&id, &args.name).await? else {
        errln!(
            "No extension '{}' on connected cluster '{}': nothing to remove.",
            args.name,
            id.name
        );
        return Ok(());
    };
    // Removing needs only the name, namespace and cluster: never the settings.
    let settings = recorded_settings(&extension.properties.configuration_settings);
    let spec = spec_of(
        &extension.name,
        &id,
        &extension.properties.scope.cluster.release_namespace,
        &settings,
    );
    let kube = kube(&args.kube).await?;
    install::remove(&kube, &spec, &mut |line| errln!("{line}"))
        .await
        .with_context(|| format!("cannot remove extension '{}' from the cluster", args.name))?;
    registry.delete_extension(&id, &args.name).await?;
    errln!(
        "Extension '{}' deleted; the SecretProviderClass CRD, the classes and their Secrets are kept.",
        args.name
    );
    Ok(())
}

async fn run_controller(args: ControllerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let kube_config = kubeclient::config(
        args.kubeconfig.as_deref(),
        args.context.as_deref(),
        "run in a pod or pass --kubeconfig",
    )
    .await?;
    // The Lease's own client has a read timeout (the watch's cannot: it idles for minutes),
    // counted from each request, so a stalled connection fails a renew rather than hanging it.
    let mut lease_config = kube_config.clone();
    lease_config.read_timeout = Some(crate::extension::leader::REQUEST_TIMEOUT);
    lease_config.reset_reader_on_write = true;
    let lease_client =
        kube::Client::try_from(lease_config).context("cannot build the Kubernetes client")?;
    let client =
        kube::Client::try_from(kube_config).context("cannot build the Kubernetes client")?;
    let identity = args
        .identity
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "controller".into()),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
    let config = controller::Config {
        sync: args.sync_secret,
        rotation: args.enable_secret_rotation,
        interval: args.rotation_poll_interval,
        lease_namespace: args.lease_namespace.clone(),
        lease_name: args.lease_name.clone(),
        identity,
        vault: vault_access(&args.vault_urls)?,
    };
    controller::run(client, lease_client, config, shutdown).await;
    Ok(())
}

fn vault_access(urls: &[(String, String)]) -> anyhow::Result<VaultAccess> {
    let http = crate::entra::http::HttpClient::with_system_roots(None)
        .context("cannot set up TLS for Entra ID and Key Vault (the system trust store)")?;
    Ok(VaultAccess {
        http,
        env: crate::entra::chain::Environment::from_process(),
        vault_urls: urls.iter().cloned().collect(),
    })
}

async fn run_provider(args: ProviderArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let provider = crate::extension::provider::Provider::new(vault_access(&args.vault_urls)?);
    crate::extension::provider::serve(&args.socket, provider, shutdown)
        .await
        .with_context(|| {
            format!(
                "cannot serve the CSI provider socket {}",
                args.socket.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command as Top};
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let cli = Cli::try_parse_from(["clusterconnect", "extension"].iter().chain(args))?;
        match cli.command {
            Top::Extension(cmd) => Ok(*cmd),
            _ => panic!("not extension"),
        }
    }

    #[test]
    fn reading_an_install_does_not_need_settings_this_cli_knows() {
        let map = BTreeMap::from([
            ("future.setting".to_string(), "x".to_string()),
            (
                crate::extension::settings::CSI.to_string(),
                "true".to_string(),
            ),
        ]);
        assert!(settings_of(&map).is_err());
        assert!(
            recorded_settings(&map).csi,
            "the known settings still count"
        );
    }

    #[test]
    fn create_takes_the_az_k8s_extension_flags() {
        let Command::Create(create) = parse(&[
            "create",
            "-c",
            "edge",
            "-g",
            "rg",
            "--cluster-type",
            "connectedClusters",
            "--extension-type",
            "Microsoft.AzureKeyVaultSecretsProvider",
            "-n",
            "akvsecretsprovider",
            "--configuration-settings",
            "secrets-store-csi-driver.enableSecretRotation=true",
            "secrets-store-csi-driver.rotationPollInterval=3m",
            "--configuration-settings",
            "secrets-store-csi-driver.syncSecret.enabled=true",
            "--relay",
            "wss://relay.example.com",
            "-o",
            "yaml",
        ])
        .unwrap() else {
            panic!("not create")
        };
        assert_eq!(create.configuration_settings.len(), 3);
        assert_eq!(create.print.output, Output::Yaml);
        assert!(parse(&[
            "create",
            "-c",
            "edge",
            "-g",
            "rg",
            "--cluster-type",
            "managedClusters",
            "--extension-type",
            "x",
            "-n",
            "a",
            "--relay",
            "wss://r",
        ])
        .is_err());
        assert!(parse(&[
            "create",
            "-c",
            "edge",
            "-g",
            "rg",
            "--extension-type",
            "x",
            "-n",
            "a",
            "--configuration-settings",
            "novalue",
            "--relay",
            "wss://r",
        ])
        .is_err());
    }
}

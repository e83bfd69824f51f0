//! `clusterconnect secrets`: Azure Key Vault secrets, keys and certificates, printed (`get`) or
//! delivered to Kubernetes Secrets and files from a SecretProviderClass (`sync`), with optional
//! rotation. Signs in to Key Vault with the proxy's Entra credential chain.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::Api;
use tokio_util::sync::CancellationToken;

use crate::entra::chain::{Environment, SourceKind};
use crate::entra::cloud::resolve_from_process;
use crate::entra::device_code::StderrPrompt;
use crate::entra::http::HttpClient;
use crate::entra::{Authority, CloudDefinition, ARC_CLIENT_APP_ID};
use crate::secrets::credential::{read_credentials_secret, ChainCredentials};
use crate::secrets::keyvault::{
    parse_id, vault_url, Format, KeyVaultClient, ObjectRef, ObjectType,
};
use crate::secrets::provider_class::ProviderClass;
use crate::secrets::rotation;
use crate::secrets::sync::{Syncer, Targets};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print one object's value, like `az keyvault secret show --query value -o tsv`: a secret's
    /// text, a key's PEM public key, a certificate's PEM private key and chain.
    Get(GetArgs),
    /// Fetch every object of a SecretProviderClass (provider azure) into the Kubernetes Secrets of
    /// its secretObjects and/or files under --mount-dir; with --rotation-poll-interval, keep
    /// them current.
    Sync(SyncArgs),
}

/// How to sign in to Key Vault: the proxy's Entra chain.
#[derive(clap::Args, Debug)]
pub struct EntraFlags {
    /// Use only this credential source instead of trying env, workload-identity,
    /// managed-identity, azure-cli, device-code in turn.
    #[arg(long, value_name = "SOURCE")]
    pub auth: Option<SourceKind>,
    /// Entra tenant [default: the SecretProviderClass's tenantId, else AZURE_TENANT_ID]; the
    /// vault's own tenant (from its challenge) is used when they differ.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Azure cloud: AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud or the name of the
    /// cloud --cloud-config describes [default: the class's cloudName, else AzurePublicCloud].
    #[arg(long, value_name = "NAME")]
    pub cloud: Option<String>,
    /// A custom cloud's endpoints, as JSON in the shape `az cloud register --cloud-config` takes
    /// [default: CLUSTERCONNECT_CLOUD_CONFIG]; its keyvaultDns suffix names vaults. See
    /// `clusterconnect proxy --help` for the variables that override single endpoints.
    #[arg(long, value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,
}

impl EntraFlags {
    /// The cloud from the flags, else the class's `cloudName` (and `cloudEnvFileName`), and
    /// the environment.
    fn cloud(&self, class: Option<&ProviderClass>) -> anyhow::Result<CloudDefinition> {
        let name = self
            .cloud
            .as_deref()
            .or(class.and_then(|c| c.cloud.as_deref()));
        let file = self
            .cloud_config
            .as_deref()
            .or(class.and_then(|c| c.cloud_env_file.as_deref()));
        resolve_from_process(name, file).context("cannot tell which Azure cloud to use")
    }
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Vault name (the NAME of https://NAME.vault.azure.net).
    #[arg(long, required_unless_present = "id", requires = "name")]
    pub vault: Option<String>,
    /// Object name.
    #[arg(long, requires = "vault")]
    pub name: Option<String>,
    /// Object version [default: the latest].
    #[arg(long)]
    pub version: Option<String>,
    /// Object type.
    #[arg(
        long = "type",
        default_value = "secret",
        value_name = "secret|key|cert"
    )]
    pub object_type: ObjectType,
    /// The object's full id instead of --vault/--name/--version/--type, as `az keyvault secret
    /// show --query id` prints it: https://NAME.vault.azure.net/secrets/NAME[/VERSION].
    #[arg(long, conflicts_with_all = ["vault", "name", "version"])]
    pub id: Option<String>,
    /// For certificates: pem (private key and chain) or pfx (the base64 PKCS#12 bundle).
    #[arg(long, default_value = "pem", value_name = "pem|pfx")]
    pub format: Format,
    #[command(flatten)]
    pub entra: EntraFlags,
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// The SecretProviderClass YAML (secrets-store.csi.x-k8s.io/v1, provider azure).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Namespace of the synced Secrets and of --credentials-secret [default: the class's
    /// namespace, else the kubeconfig context's].
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Kubeconfig to reach the cluster (the proxy's context works) [default: in-cluster or
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    pub context: Option<String>,
    /// Also write each object as a file named by its objectAlias or objectName (mode 0600), as
    /// the CSI driver lays out /mnt/secrets-store.
    #[arg(long)]
    pub mount_dir: Option<PathBuf>,
    /// Do not touch the cluster: ignore secretObjects and only write --mount-dir.
    #[arg(long, requires = "mount_dir", conflicts_with = "credentials_secret")]
    pub no_k8s: bool,
    /// Keep running and re-fetch every interval (e.g. 2m), updating only what changed; off by
    /// default (one pass, then exit).
    #[arg(long, value_parser = super::parse_duration, value_name = "DURATION")]
    pub rotation_poll_interval: Option<Duration>,
    /// Sign in as the service principal whose `clientid` and `clientsecret` this Kubernetes
    /// Secret (in --namespace) holds, as the Arc extension's secrets-store-creds.
    #[arg(long, value_name = "SECRET")]
    pub credentials_secret: Option<String>,
    /// The vault's URL instead of the one keyvaultName and the cloud make (a private endpoint's
    /// name, an emulator).
    #[arg(long, value_name = "URL")]
    pub vault_url: Option<String>,
    #[command(flatten)]
    pub entra: EntraFlags,
}

/// The shortest wait between rotation passes: Key Vault throttles a vault at a few thousand
/// requests per 10 seconds across all its clients.
const MIN_ROTATION_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(cmd: Command, shutdown: CancellationToken) -> anyhow::Result<u8> {
    match cmd {
        Command::Get(args) => get(args).await,
        Command::Sync(args) => sync(args, shutdown).await,
    }
}

fn credentials(
    flags: &EntraFlags,
    cloud: &CloudDefinition,
    tenant: Option<String>,
) -> anyhow::Result<(HttpClient, ChainCredentials)> {
    let authority = Authority::of(cloud);
    let http = HttpClient::with_system_roots(None)
        .context("cannot set up TLS for Entra ID and Key Vault (the system trust store)")?;
    let creds = ChainCredentials {
        authority,
        tenant: flags
            .tenant
            .clone()
            .or(tenant)
            .filter(|t| !t.trim().is_empty()),
        client_app_id: ARC_CLIENT_APP_ID.to_string(),
        only: flags.auth,
        interactive: std::io::stderr().is_terminal(),
        http: http.clone(),
        config_dir: crate::proxy::local_ca::config_dir(),
        prompt: Arc::new(StderrPrompt),
        env: Environment::from_process(),
    };
    Ok((http, creds))
}

async fn get(args: GetArgs) -> anyhow::Result<u8> {
    let cloud = args.entra.cloud(None)?;
    let (url, object) = match &args.id {
        Some(id) => parse_id(id)?,
        None => {
            let vault = args.vault.as_deref().unwrap_or_default();
            (
                vault_url(vault, &cloud)?,
                ObjectRef {
                    kind: args.object_type,
                    name: args.name.clone().unwrap_or_default(),
                    version: args.version.clone().filter(|v| !v.is_empty()),
                },
            )
        }
    };
    let (http, creds) = credentials(&args.entra, &cloud, None)?;
    let client = KeyVaultClient::new(http, &url, Arc::new(creds))?.with_cloud(&cloud);
    let fetched = client.fetch(&object, args.format).await?;
    tracing::debug!(vault = %client.vault(), object = %object, version = %fetched.version, "fetched");
    let value = fetched.value.expose();
    let mut out = std::io::stdout().lock();
    out.write_all(value.as_bytes())
        .and_then(|()| {
            if value.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush())
        .context("cannot write the value to stdout")?;
    Ok(0)
}

async fn kube_client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> anyhow::Result<(kube::Client, String)> {
    super::kubeclient::client(
        kubeconfig,
        context,
        "run in a pod, set KUBECONFIG or pass --kubeconfig (or --no-k8s with --mount-dir)",
    )
    .await
}

/// The SecretProviderClass of `--file`, checked against the flags.
fn read_class(args: &SyncArgs) -> anyhow::Result<ProviderClass> {
    let text = std::fs::read_to_string(&args.file).with_context(|| {
        format!(
            "cannot read SecretProviderClass file {}",
            args.file.display()
        )
    })?;
    let class = ProviderClass::parse(&text).with_context(|| args.file.display().to_string())?;
    if let Some(interval) = args.rotation_poll_interval {
        if interval < MIN_ROTATION_INTERVAL {
            anyhow::bail!(
                "--rotation-poll-interval {}s is too short; use at least {}s (2m is the CSI driver's default)",
                interval.as_secs_f32(),
                MIN_ROTATION_INTERVAL.as_secs()
            );
        }
    }
    if !uses_k8s(args, &class) && args.mount_dir.is_none() {
        anyhow::bail!(
            "nothing to deliver: SecretProviderClass '{}' has no secretObjects; pass --mount-dir to write files",
            class.name
        );
    }
    Ok(class)
}

/// Whether the cluster is needed: for secretObjects or for the credentials Secret.
fn uses_k8s(args: &SyncArgs, class: &ProviderClass) -> bool {
    !args.no_k8s && (!class.secret_objects.is_empty() || args.credentials_secret.is_some())
}

/// The Secrets API of the target namespace; signs in as the credentials Secret's service
/// principal when `--credentials-secret` names one.
async fn secret_target(
    args: &SyncArgs,
    class: &ProviderClass,
    creds: &mut ChainCredentials,
) -> anyhow::Result<(Api<KubeSecret>, String)> {
    let (client, default_namespace) =
        kube_client(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let namespace = args
        .namespace
        .clone()
        .or_else(|| class.namespace.clone())
        .unwrap_or(default_namespace);
    let api: Api<KubeSecret> = Api::namespaced(client, &namespace);
    if let Some(name) = &args.credentials_secret {
        let (client_id, secret) = read_credentials_secret(&api, &namespace, name).await?;
        tracing::info!(secret = %name, namespace = %namespace, client_id = %client_id, "signing in to Key Vault as the service principal of the credentials Secret");
        creds.use_service_principal(client_id, secret);
    }
    Ok((api, namespace))
}

async fn sync(args: SyncArgs, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let class = read_class(&args)?;
    let cloud = args.entra.cloud(Some(&class))?;
    let url = match &args.vault_url {
        Some(url) => url.clone(),
        None => vault_url(&class.keyvault_name, &cloud)?,
    };
    let (http, mut creds) = credentials(&args.entra, &cloud, class.tenant_id.clone())?;
    creds.use_identity(&class.identity);
    let secrets = if uses_k8s(&args, &class) {
        let (api, namespace) = secret_target(&args, &class, &mut creds).await?;
        Some(crate::secrets::sync::SecretTarget {
            api,
            owner: crate::secrets::sync::cli_owner(&namespace, &class.name),
            namespace,
        })
    } else {
        None
    };
    let client = KeyVaultClient::new(http, &url, Arc::new(creds))?.with_cloud(&cloud);
    let vault = client.vault().to_string();
    let objects = class.objects.len();
    let mut syncer = Syncer::new(
        client,
        class,
        Targets {
            mount_dir: args.mount_dir.clone(),
            secrets,
        },
    );
    let report = syncer
        .pass()
        .await
        .with_context(|| format!("SecretProviderClass '{}'", syncer.class().name))?;
    tracing::info!(
        vault = %vault,
        objects,
        files_written = report.files_written.len(),
        secrets = report.secrets.len(),
        "synced"
    );
    if let Some(interval) = args.rotation_poll_interval {
        tracing::info!(
            interval_s = interval.as_secs(),
            "rotation on: polling Key Vault"
        );
        rotation::run(&mut syncer, interval, shutdown).await;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command as Top};
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let cli = Cli::try_parse_from(["clusterconnect", "secrets"].iter().chain(args))?;
        match cli.command {
            Top::Secrets(cmd) => Ok(cmd),
            _ => panic!("not secrets"),
        }
    }

    #[test]
    fn get_takes_a_name_or_an_id_and_sync_a_file() {
        let Command::Get(get) =
            parse(&["get", "--vault", "kv1", "--name", "s", "--type", "cert"]).unwrap()
        else {
            panic!("not get")
        };
        assert_eq!(get.object_type, ObjectType::Cert);
        assert!(parse(&["get", "--id", "https://kv1.vault.azure.net/secrets/s"]).is_ok());
        assert!(parse(&["get", "--id", "https://x/secrets/s", "--vault", "kv1"]).is_err());
        assert!(parse(&["get"]).is_err());
        let Command::Sync(sync) = parse(&[
            "sync",
            "-f",
            "spc.yaml",
            "--mount-dir",
            "/tmp/m",
            "--rotation-poll-interval",
            "2m",
        ])
        .unwrap() else {
            panic!("not sync")
        };
        assert_eq!(sync.rotation_poll_interval, Some(Duration::from_secs(120)));
        assert!(parse(&["sync", "-f", "x", "--no-k8s"]).is_err());
    }
}

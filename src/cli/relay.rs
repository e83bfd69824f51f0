//! `clusterconnect relay`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::entra::cloud::resolve_from_process;
use crate::entra::http::HttpClient;
use crate::entra::validate::{Validator, ValidatorConfig};
use crate::entra::{Authority, CloudDefinition};
use crate::metrics::RelayMetrics;
use crate::onboard::manifests::default_image;
use crate::onboard::relay_manifests::{self, RelaySpec, DEFAULT_RELAY_NAMESPACE, TLS_SECRET};
use crate::relay::clusters::kv::Kv;
use crate::relay::clusters::{arm_audiences_of, is_arm_audience, EntraCallers, Registry};
use crate::relay::replicas;
use crate::relay::{ClusterLink, EntraFile, RelayConfig, RelayFile, RelayStats};
use crate::tls;
use crate::tls::reload::ReloadingCert;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Relay configuration (TOML); see config/relay.toml.
    #[arg(long, short = 'c', env = "CLUSTERCONNECT_RELAY_CONFIG")]
    pub config: PathBuf,
    /// Listen address, overriding the file's `listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Use a dev CA and certificate for local use instead of the file's [tls]: the CA is made on
    /// first use and kept next to the config (relay-dev-ca.crt and .key) so agent and proxy can
    /// pass it as --relay-ca and keep trusting the relay across restarts.
    #[arg(long)]
    pub dev_self_signed: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Print the Kubernetes objects that run this relay (Deployment, Service,
    /// PodDisruptionBudget, its configuration with paths moved to the pod's mounts) and exit.
    #[arg(long, conflicts_with_all = ["check", "dev_self_signed", "listen"])]
    pub dry_run: bool,
    /// Format of --dry-run's objects.
    #[arg(short = 'o', long, value_enum, default_value_t = super::connect::Format::Yaml, requires = "dry_run")]
    pub output: super::connect::Format,
    /// Namespace of the relay's objects (--dry-run).
    #[arg(long, default_value = DEFAULT_RELAY_NAMESPACE, requires = "dry_run")]
    pub namespace: String,
    /// Relay image (--dry-run) [default: this release's image].
    #[arg(long, requires = "dry_run")]
    pub image: Option<String>,
    /// Size of the registry's volume claim (--dry-run).
    #[arg(long, default_value = "1Gi", requires = "dry_run")]
    pub storage: String,
    /// With `[cluster]` in the file: relay replicas the StatefulSet runs (--dry-run; default 3).
    #[arg(long, requires = "dry_run", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replicas: Option<u16>,
    /// This replica's own name (`host[:port]`), overriding `[cluster] public_host`: the
    /// StatefulSet passes each pod's name under the first hostname.
    #[arg(long)]
    pub public_host: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT at /metrics (plain HTTP), overriding the file's
    /// `metrics_addr`. Off unless one of them is set.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.dry_run {
        return dry_run(&args);
    }
    let file = RelayFile::load(&args.config)?;
    let base = args.config.parent().map(PathBuf::from).unwrap_or_default();
    if args.dev_self_signed && !args.check {
        create_dev_keys(&file, &base)?;
    }
    let rules = file.rules(&base)?;
    let mut hostnames = file.hostnames.clone();
    let (tls, reloading) = tls_config(&args, &file, &base, &hostnames)?;
    hostnames.retain(|h| !h.is_empty());
    if hostnames.is_empty() {
        if !args.dev_self_signed {
            anyhow::bail!(
                "relay config {} has no hostnames: set `hostnames = [\"relay.example.com\"]`, the name(s) clients reach this relay by (rendezvous addresses sent to agents name the first one)",
                args.config.display()
            );
        }
        // The names the dev certificate carries.
        hostnames = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    }
    let listen = args
        .listen
        .or(file.listen)
        .context("no listen address: set `listen` in the config or pass --listen")?;
    // Bound before the registry opens: a replica names its own port in rendezvous addresses.
    let listener = match args.check {
        true => None,
        false => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?,
        ),
    };
    let bound = match &listener {
        Some(l) => l.local_addr()?.port(),
        None => listen.port(),
    };
    let public_port = file.public_port.unwrap_or(bound);
    let (clusters, cluster) = open_registry(&args, &file, &base, public_port, &shutdown).await?;
    // A replica also answers to its own name: tokens and rendezvous addresses may name it.
    if let Some(link) = &cluster {
        let own = link
            .me
            .rsplit_once(':')
            .map_or(link.me.as_str(), |(h, _)| h);
        if !hostnames.iter().any(|h| h.eq_ignore_ascii_case(own)) {
            hostnames.push(own.to_string());
        }
    }
    let metrics_addr = args.metrics_addr.clone().or(file.metrics_addr.clone());
    if let Some(addr) = &metrics_addr {
        crate::metrics::parse_addr(addr)
            .with_context(|| format!("metrics address {addr:?} is not host:port"))?;
    }
    let mut registry = crate::metrics::registry();
    let metrics = RelayMetrics::register(&mut registry);
    let config = RelayConfig {
        hostnames,
        rules: rules.into(),
        clusters,
        tls,
        max_connections: file.max_connections()?,
        stats: Arc::new(RelayStats::with_metrics(metrics)),
        public_port: file.public_port,
        limits: file.limits()?,
        proxy_protocol: file.proxy_protocol()?,
        cluster,
    };
    if args.check {
        outln!("relay config {} is valid", args.config.display());
        return Ok(());
    }
    let Some(listener) = listener else {
        return Ok(());
    };
    if let Some(addr) = &metrics_addr {
        crate::metrics::start(addr, registry, shutdown.clone()).await?;
    }
    if let Some(cert) = &reloading {
        tokio::spawn(cert.clone().watch(shutdown.clone()));
    }
    tokio::spawn(reload_on_hangup(
        args.config.clone(),
        base,
        (config.rules.clone(), reloading),
        shutdown.clone(),
    ));
    crate::relay::run(listener, config, shutdown).await?;
    Ok(())
}

/// `relay --dry-run`: the relay's Kubernetes objects on stdout; nothing else happens.
fn dry_run(args: &Args) -> anyhow::Result<()> {
    use std::io::Write;
    let text = std::fs::read_to_string(&args.config).map_err(|source| {
        crate::onboard::relay_manifests::RelayManifestError::Read {
            path: args.config.display().to_string(),
            source,
        }
    })?;
    let spec = RelaySpec {
        namespace: args.namespace.clone(),
        image: args.image.clone().unwrap_or_else(default_image),
        storage: args.storage.clone(),
        replicas: args.replicas.unwrap_or_else(|| {
            let replicated =
                toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("cluster"));
            if replicated {
                3
            } else {
                1
            }
        }),
    };
    let m = relay_manifests::build(&spec, &args.config, &text)?;
    let out = match args.output {
        super::connect::Format::Yaml => m.to_yaml()?,
        super::connect::Format::Json => serde_json::to_string_pretty(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": m.items()?}),
        )?,
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", out.trim_end()).context("cannot write to stdout")?;
    let nats = m
        .nats_command()
        .map(|c| format!("the Secret of NATS credentials:\n  {c}\n"))
        .unwrap_or_default();
    errln!(
        "Dry run: nothing was started. Before applying, create the Secret of rule keys:\n  {}\n{nats}and the certificate's Secret {TLS_SECRET} (kubernetes.io/tls).",
        m.keys_command()
    );
    Ok(())
}

/// On SIGHUP, re-reads the rules (and their key files) from the config file: a rule removed or
/// re-keyed there revokes what it authorized at once; and the TLS certificate files, which are
/// also polled. Other settings need a restart. A file that does not load changes nothing.
async fn reload_on_hangup(
    path: PathBuf,
    base: PathBuf,
    (rules, cert): (crate::relay::RuleSet, Option<Arc<ReloadingCert>>),
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch for SIGHUP; rules reload only on restart");
        return;
    };
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(cert) = &cert {
            cert.reload_and_log();
        }
        match RelayFile::load(&path).and_then(|file| file.rules(&base)) {
            Ok(new) => {
                tracing::info!(config = %path.display(), rules = new.len(), "rules reloaded (other settings take effect on restart)");
                rules.replace(new);
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %crate::tunnel::http::error_chain(&e), "rules not reloaded; the current ones stay")
            }
        }
    }
}

/// Development mode: a fresh key for every rule whose key file is missing, announced.
fn create_dev_keys(file: &RelayFile, base: &Path) -> anyhow::Result<()> {
    for path in file.create_missing_keys(base)? {
        errln!(
            "dev mode: created key file {} (agent and proxy take it as --key-file; a manage rule's as --admin-key-file)",
            path.display()
        );
    }
    Ok(())
}

/// The file's certificate, or with `--dev-self-signed` a throwaway CA and leaf.
fn tls_config(
    args: &Args,
    file: &RelayFile,
    base: &Path,
    hostnames: &[String],
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Option<Arc<ReloadingCert>>)> {
    match (&file.tls, args.dev_self_signed) {
        (_, true) => Ok((dev_tls_config(args, base, hostnames)?, None)),
        (Some(files), false) => {
            // Followed while the relay runs: renewed in place, presented at the next handshake.
            let cert =
                ReloadingCert::load(&base.join(&files.cert_file), &base.join(&files.key_file))?;
            Ok((cert.server_config(&[tls::ALPN_HTTP11])?, Some(cert)))
        }
        (None, false) => anyhow::bail!(
            "relay config {} has no [tls] section; add cert_file/key_file, or pass --dev-self-signed for local use",
            args.config.display()
        ),
    }
}

/// A dev CA kept next to the config (made on first use, unless only checking; reused after,
/// so agents and proxies that trust it reconnect across relay restarts) and a leaf for the
/// configured names and the loopback ones.
fn dev_tls_config(
    args: &Args,
    base: &Path,
    hostnames: &[String],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut names: Vec<&str> = hostnames.iter().map(String::as_str).collect();
    names.extend(["localhost", "127.0.0.1", "::1"]);
    let ca_path = base.join("relay-dev-ca.crt");
    let key_path = base.join("relay-dev-ca.key");
    let kept = match (
        std::fs::read_to_string(&ca_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => Some(tls::CertificateAuthority::from_pem(cert, key).with_context(
            || {
                format!(
                    "the dev CA in {} does not load; delete relay-dev-ca.crt and relay-dev-ca.key there to make a new one",
                    base.display()
                )
            },
        )?),
        _ => None,
    };
    let reused = kept.is_some();
    let ca = match kept {
        Some(ca) => ca,
        None => tls::CertificateAuthority::generate("clusterconnect relay dev CA")?,
    };
    let leaf = ca.issue_server(&names)?;
    if !args.check {
        if !reused {
            crate::files::write_private(&key_path, ca.key_pem().as_bytes()).with_context(|| {
                format!("cannot write the dev CA key to {}", key_path.display())
            })?;
            crate::files::write_private(&ca_path, ca.cert_pem().as_bytes())
                .with_context(|| format!("cannot write the dev CA to {}", ca_path.display()))?;
        }
        errln!(
            "dev self-signed certificate for {}; CA SHA-256 fingerprint {}; clients pass --relay-ca {}",
            names.join(", "),
            tls::fingerprint_sha256(ca.cert_pem()).unwrap_or_default(),
            ca_path.display()
        );
    }
    Ok(tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &[tls::ALPN_HTTP11],
    )?)
}

/// The cluster registry and its Entra validator; `--check` validates `[entra]` and
/// `[cluster]` but opens no file and connects to no NATS. With `[cluster]`, the registry is in
/// NATS and the link to the other replicas comes with it.
async fn open_registry(
    args: &Args,
    file: &RelayFile,
    base: &Path,
    public_port: u16,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Option<Arc<Registry>>, Option<ClusterLink>)> {
    let registry_file = base.join(
        file.registry_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("registry.redb")),
    );
    let entra = match &file.entra {
        None => None,
        Some(e) => Some(management_validator(e, base).context("relay config [entra]")?),
    };
    let Some(cluster) = &file.cluster else {
        if args.public_host.is_some() {
            anyhow::bail!(
                "--public-host names a relay replica; the config has no [cluster] section"
            );
        }
        if args.check {
            return Ok((None, None));
        }
        return Ok((
            Some(Arc::new(Registry::open_with(&registry_file, entra)?)),
            None,
        ));
    };
    let mut cluster = resolve_cluster_paths(cluster, base);
    if let Some(host) = &args.public_host {
        cluster.public_host = host.clone();
    }
    let prefix = replicas::prefix(&cluster)?;
    let me = replicas::public_authority(&cluster.public_host, public_port)?;
    if file.registry_file.is_some() {
        anyhow::bail!("relay config: registry_file and [cluster] do not go together: replicas keep the registry in NATS; remove registry_file");
    }
    if args.check {
        return Ok((None, None));
    }
    let client = replicas::connect(&cluster, &me).await?;
    let js = async_nats::jetstream::new(client.clone());
    let kv = Kv::open(&js, &format!("{prefix}-registry")).await?;
    let registry = Registry::open_nats(kv, entra, shutdown.clone()).await?;
    let link = ClusterLink { client, prefix, me };
    Ok((Some(Arc::new(registry)), Some(link)))
}

/// `[cluster]`'s files relative to the configuration file, as every other path in it.
fn resolve_cluster_paths(cluster: &replicas::ClusterFile, base: &Path) -> replicas::ClusterFile {
    let join = |p: &Option<PathBuf>| p.as_ref().map(|p| base.join(p));
    replicas::ClusterFile {
        nats_credentials_file: join(&cluster.nats_credentials_file),
        nats_token_file: join(&cluster.nats_token_file),
        nats_ca_file: join(&cluster.nats_ca_file),
        nats_cert_file: join(&cluster.nats_cert_file),
        nats_key_file: join(&cluster.nats_key_file),
        ..cluster.clone()
    }
}

/// Who may call the management API with an Entra token: tokens for `[entra] audience`, and
/// ARM's only with `allow_arm_audience`.
fn management_validator(e: &EntraFile, base: &Path) -> anyhow::Result<EntraCallers> {
    let config = e.cloud_config.as_ref().map(|p| base.join(p));
    let cloud = resolve_from_process(e.cloud.as_deref(), config.as_deref())
        .context("cannot tell which Azure cloud to use (cloud, cloud_config)")?;
    let overrides = crate::entra::cloud::overrides_in_effect();
    if !overrides.is_empty() {
        tracing::warn!(variables = %overrides.join(","), authority = %cloud.authority_host, "environment variables change the cloud whose tokens the management API trusts; make sure they are meant for it");
    }
    let audience = management_audience(e, &cloud)?;
    let mut tenants = Vec::new();
    for t in &e.tenants {
        let id = uuid::Uuid::parse_str(t.trim())
            .map_err(|_| anyhow::anyhow!("tenant {t:?} is not a tenant id (a GUID)"))?;
        tenants.push(id.hyphenated().to_string());
    }
    if tenants.is_empty() {
        anyhow::bail!(
            "tenants is empty: name the Entra tenant ids whose principals may register clusters"
        );
    }
    let authority = Authority::of(&cloud);
    let http = HttpClient::with_system_roots(None)?;
    let validator = |server_app_id: String| {
        Validator::new(
            ValidatorConfig {
                authority: authority.clone(),
                server_app_id,
                tenants: tenants.clone(),
                refetch_interval: std::time::Duration::from_secs(60),
            },
            http.clone(),
        )
    };
    let arm = if e.allow_arm_audience {
        arm_audiences_of(cloud.clone())
            .into_iter()
            .map(|a| (a.clone(), validator(a)))
            .collect()
    } else {
        Vec::new()
    };
    Ok(EntraCallers {
        own: validator(audience.clone()),
        audience: Some(audience),
        arm,
    })
}

/// `[entra] audience`: required, and not Azure Resource Manager's unless the operator accepts
/// ARM tokens anyway.
fn management_audience(e: &EntraFile, cloud: &CloudDefinition) -> anyhow::Result<String> {
    let audience = e.audience.as_deref().map(str::trim).unwrap_or_default();
    if audience.is_empty() {
        anyhow::bail!(
            "audience is not set: set it to the management API's own Entra application, its application ID URI or application (client) id, e.g. audience = \"api://clusterconnect-relay\"; clients sign in for it with --relay-audience (CLUSTERCONNECT_RELAY_AUDIENCE)"
        );
    }
    if (is_arm_audience(audience) || cloud.is_arm_audience(audience)) && !e.allow_arm_audience {
        anyhow::bail!(
            "audience {audience:?} is Azure Resource Manager's: clients would send this relay tokens that are valid against Azure; set the management API's own application ID URI or client id (e.g. \"api://clusterconnect-relay\"), or allow_arm_audience = true to accept ARM tokens (weaker)"
        );
    }
    Ok(audience.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(toml: &str) -> anyhow::Result<EntraCallers> {
        let file: RelayFile = toml::from_str(toml).expect("toml");
        management_validator(file.entra.as_ref().expect("[entra]"), Path::new(""))
    }

    const TENANT: &str = "tenants = [\"72f988bf-86f1-41af-91ab-2d7cd011db47\"]\n";

    #[test]
    fn entra_needs_the_management_apis_own_audience() {
        let err = entra(&format!("[entra]\n{TENANT}")).err().unwrap();
        assert!(
            format!("{err:#}").contains("audience is not set: set it to"),
            "{err:#}"
        );
        let own = entra(&format!(
            "[entra]\n{TENANT}audience = \"api://clusterconnect-relay\"\n"
        ))
        .unwrap();
        assert_eq!(own.audience.as_deref(), Some("api://clusterconnect-relay"));
        assert!(own.arm.is_empty());
        let arm = format!("[entra]\n{TENANT}audience = \"https://management.azure.com\"\n");
        let err = entra(&arm).err().unwrap();
        assert!(
            format!("{err:#}").contains("allow_arm_audience = true"),
            "{err:#}"
        );
        let allowed = entra(&format!(
            "[entra]\n{TENANT}audience = \"api://clusterconnect-relay\"\nallow_arm_audience = true\n"
        ))
        .unwrap();
        let accepted: Vec<&str> = allowed.arm.iter().map(|(a, _)| a.as_str()).collect();
        assert!(accepted.contains(&"https://management.core.windows.net/"));
        assert!(accepted.contains(&"https://management.azure.com"));
    }

    #[test]
    fn a_custom_clouds_arm_is_the_arm_audience_a_relay_may_allow() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cloud.json"),
            r#"{"name": "Contoso", "endpoints": {"activeDirectory": "https://login.contoso.test",
                "resourceManager": "https://arm.contoso.test/",
                "activeDirectoryResourceId": "https://management.contoso.test/",
                "microsoftGraphResourceId": "https://graph.contoso.test/"},
                "suffixes": {"keyvaultDns": ".vault.contoso.test"}}"#,
        )
        .unwrap();
        let entra = |extra: &str| {
            let file: RelayFile = toml::from_str(&format!(
                "[entra]\n{TENANT}cloud_config = \"cloud.json\"\n{extra}"
            ))
            .expect("toml");
            management_validator(file.entra.as_ref().expect("[entra]"), dir.path())
        };
        let err = entra("audience = \"https://arm.contoso.test\"\n")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("allow_arm_audience"), "{err:#}");
        let allowed = entra("audience = \"api://r\"\nallow_arm_audience = true\n").unwrap();
        let accepted: Vec<&str> = allowed.arm.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            accepted,
            [
                "https://management.contoso.test/",
                "https://management.contoso.test",
                "https://arm.contoso.test/",
                "https://arm.contoso.test"
            ]
        );
        assert!(entra("cloud = \"Fabrikam\"\naudience = \"api://r\"\n").is_err());
    }
}

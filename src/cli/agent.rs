//! `clusterconnect agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::entra::CloudFlags;
use super::RelayFlags;
use crate::agent::heartbeat::{load_key, Heartbeat, INTERVAL as HEARTBEAT_INTERVAL};
use crate::agent::{
    AgentConfig, AuditLog, AuditTarget, AuthMode, Authenticator, EntraAuth, KeySource, PopSettings,
    Upstream, DEFAULT_TOKEN_TTL,
};
use crate::arm::client::ManagementClient;
use crate::arm::ClusterId;
use crate::auth::refresh::{Refreshing, RENEW_MARGIN};
use crate::auth::CredentialSource;
use crate::entra::chain::{ChainOptions, EntraChain, Environment};
use crate::entra::device_code::StderrPrompt;
use crate::entra::graph::GroupResolver;
use crate::entra::http::HttpClient;
use crate::entra::pop::PopPolicy;
use crate::entra::validate::{Validator, ValidatorConfig};
use crate::entra::{Authority, ARC_CLIENT_APP_ID, ARC_SERVER_APP_ID};
use crate::metrics::AgentMetrics;
use crate::tunnel::http::error_chain;
use crate::tunnel::protocol::RelayAddress;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub relay: RelayFlags,
    /// Kubeconfig for reaching the apiserver when not running in a pod.
    #[arg(long, env = "CLUSTERCONNECT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig.
    #[arg(long)]
    pub context: Option<String>,
    /// Listener control channels to keep open (the relay spreads connections across them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=25))]
    pub listeners: u16,
    /// When the relay runs as several replicas behind one name: keep re-dialing that name
    /// until the listeners sit on this many distinct replicas (listeners are raised to match),
    /// so losing one replica leaves the cluster reachable. A single relay is unaffected.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=25))]
    pub relay_replicas: u16,
    /// Tunnel streams open at once: each pooled proxy connection takes one, and so does each
    /// watch, exec, attach or port-forward session the proxy opens apart. Past it, new ones
    /// wait for a free stream.
    #[arg(long, default_value_t = crate::agent::MAX_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams: u32,
    /// Requests and watches one tunnel stream carries at once (HTTP/2 streams); the proxy opens
    /// another tunnel stream before it reaches this (its --streams-per-connection, default
    /// 1,000, must stay below it).
    #[arg(long, default_value_t = crate::tunnel::http::H2_MAX_STREAMS, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub streams_per_connection: u32,
    /// HTTP/2 connections to the apiserver at most. Requests and watches share them, as many
    /// on each as the apiserver allows (its SETTINGS_MAX_CONCURRENT_STREAMS); another opens
    /// when all are full, and one left without streams for 90 s closes. Past this many full
    /// ones, a request waits up to 30 s for a free stream, then gets 502. An apiserver that
    /// does not offer HTTP/2 gets HTTP/1.1, a connection per request in flight; exec, attach
    /// and port-forward always get HTTP/1.1 connections of their own.
    #[arg(long, default_value_t = crate::agent::APISERVER_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub apiserver_connections: u32,
    /// On SIGTERM, after leaving the relay, how long requests and sessions in flight may take
    /// to finish (keep it under the pod's terminationGracePeriodSeconds).
    #[arg(long, value_parser = super::parse_duration, default_value = "25s")]
    pub drain_timeout: Duration,
    /// Address for /healthz and /readyz, or "off".
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub health_addr: String,
    /// Serve Prometheus metrics on HOST:PORT at /metrics (plain HTTP); off by default (the
    /// generated manifests turn it on).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Lifetime of the listen tokens the agent mints (renewed at three quarters).
    #[arg(long, value_parser = super::parse_duration)]
    pub token_ttl: Option<Duration>,
    /// Which callers to accept: entra (Entra ID tokens, validated and impersonated), token
    /// (bearer tokens passed through for the apiserver to check) or both. Default: both when
    /// --tenant is given, else token.
    #[arg(long, value_enum)]
    pub auth_mode: Option<AuthMode>,
    /// Entra tenant id whose users, groups and applications may connect; repeat or separate
    /// with commas for several.
    #[arg(long = "tenant", env = "CLUSTERCONNECT_TENANTS", value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// The Entra application whose tokens this cluster accepts (their audience).
    #[arg(long, default_value = ARC_SERVER_APP_ID)]
    pub server_app_id: String,
    /// The tenant's cloud: its Entra authority and the Microsoft Graph the agent asks about
    /// users in more than 200 groups.
    #[command(flatten)]
    pub cloud: CloudFlags,
    /// The cluster's resource id (set by `clusterconnect connect`): proof-of-possession tokens
    /// must name it in their u claim; with --agent-key-file, the agent also reports status to
    /// the relay's registry under it.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// The agent's private key (PKCS#8 PEM) that signs its status reports.
    #[arg(long, requires = "cluster_id")]
    pub agent_key_file: Option<PathBuf>,
    /// Write one JSON line per request and per exec/attach/port-forward session to this file
    /// (appended, created 0600), or to stdout with "-". Callers whose tokens are passed
    /// through are named by TokenReviews, one per token (needs `create` on
    /// tokenreviews.authentication.k8s.io).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<String>,
    /// How long after it was signed (its ts) a proof-of-possession token is accepted (the Arc
    /// guard's default is 15m). `clusterconnect proxy --pop` re-signs every 5m.
    #[arg(long, value_parser = super::parse_duration, default_value = "15m")]
    pub pop_window: Duration,
    /// Accept Entra ID tokens only as proof-of-possession tokens (needs --cluster-id); bare
    /// Entra bearer tokens are refused. Other tokens are still judged by --auth-mode.
    #[arg(long)]
    pub require_pop: bool,
}

/// The status reporter, when the agent was installed with a registration.
fn heartbeat(
    args: &Args,
    relay: &RelayAddress,
    relay_tls: &Arc<rustls::ClientConfig>,
    config: kube::Config,
) -> anyhow::Result<Option<Heartbeat>> {
    let (Some(id), Some(key_file)) = (&args.cluster_id, &args.agent_key_file) else {
        return Ok(None);
    };
    let id = ClusterId::parse(id).map_err(|e| anyhow::anyhow!("--cluster-id: {e}"))?;
    let pem = std::fs::read_to_string(key_file)
        .with_context(|| format!("cannot read --agent-key-file {}", key_file.display()))?;
    let key = load_key(&pem)
        .map_err(|e| anyhow::anyhow!("--agent-key-file {}: {e}", key_file.display()))?;
    let kube =
        kube::Client::try_from(config).context("cannot build the agent's own Kubernetes client")?;
    let http = HttpClient::new(
        relay_tls.clone(),
        Duration::from_secs(10),
        Duration::from_secs(30),
    );
    Ok(Some(Heartbeat {
        registry: ManagementClient::new(relay.clone(), http, None),
        id,
        key,
        kube,
    }))
}

/// The authenticator for `--auth-mode`, `--tenant` and the agent's own token.
fn authenticator(
    args: &Args,
    own_token: Option<Arc<dyn CredentialSource>>,
) -> anyhow::Result<Authenticator> {
    let mode = args.auth_mode.unwrap_or(if args.tenants.is_empty() {
        AuthMode::Token
    } else {
        AuthMode::Both
    });
    if mode == AuthMode::Token {
        if args.require_pop {
            anyhow::bail!("--require-pop is for Entra ID tokens, and --auth-mode token takes none: pass --tenant (and --auth-mode entra or both)");
        }
        return Ok(Authenticator::token_only());
    }
    let pop = pop_settings(args)?;
    if args.tenants.is_empty() {
        anyhow::bail!(
            "--auth-mode {mode:?} needs --tenant: the Entra tenant id(s) whose users may connect"
        );
    }
    let mut tenants = Vec::new();
    for tenant in &args.tenants {
        let id = uuid::Uuid::parse_str(tenant.trim()).map_err(|_| {
            anyhow::anyhow!("--tenant {tenant:?} is not a tenant id (a GUID, as in `az account show --query tenantId`)")
        })?;
        tenants.push(id.hyphenated().to_string());
    }
    let Some(own_token) = own_token else {
        anyhow::bail!("--auth-mode {mode:?} impersonates Entra users with the agent's own service-account token, and the cluster configuration has none: run the agent in a pod, or use a kubeconfig whose user has a token or tokenFile");
    };
    let cloud = args.cloud.resolve()?;
    tracing::info!(cloud = %cloud.name, authority = %cloud.authority_host, graph = %cloud.graph_endpoint, "Entra ID callers are validated against this cloud");
    let overrides = crate::entra::cloud::overrides_in_effect();
    if !overrides.is_empty() {
        tracing::warn!(variables = %overrides.join(","), authority = %cloud.authority_host, "environment variables change the cloud whose tokens this agent trusts; make sure they are meant for it (a workload-identity webhook, for one, sets AZURE_AUTHORITY_HOST)");
    }
    let authority = Authority::of(&cloud);
    let http = HttpClient::with_system_roots(None)
        .context("cannot set up TLS for Entra ID (the system trust store)")?;
    let groups = GroupResolver::new(
        http.clone(),
        authority.graph.clone(),
        graph_credential(&authority, &tenants[0], &http),
    );
    let validator = Validator::new(
        ValidatorConfig {
            authority,
            server_app_id: args.server_app_id.clone(),
            tenants,
            refetch_interval: Duration::from_secs(60),
        },
        http,
    );
    Ok(Authenticator::new(
        mode,
        EntraAuth {
            validator,
            groups: Some(groups),
            own_token,
        },
    )
    .with_pop(pop))
}

/// PoP tokens are checked against the cluster id; without one they are refused, and
/// requiring them is a start-up error.
fn pop_settings(args: &Args) -> anyhow::Result<PopSettings> {
    if args.pop_window < Duration::from_secs(60) {
        anyhow::bail!("--pop-window must be at least 1m (the proxy re-signs its PoP tokens every 5m; kubelogin's live as long as kubectl caches them)");
    }
    let policy = match &args.cluster_id {
        Some(id) => {
            // The u claim is compared as text; checking the shape here catches a typo at
            // start-up instead of as refused tokens.
            ClusterId::parse(id).map_err(|e| anyhow::anyhow!("--cluster-id: {e}"))?;
            Some(PopPolicy {
                cluster_id: id.trim().to_string(),
                window: args.pop_window,
            })
        }
        None if args.require_pop => anyhow::bail!("--require-pop needs --cluster-id: proof-of-possession tokens name the cluster's Azure resource id (/subscriptions/.../connectedClusters/<name>) in their u claim, and the agent must know it to check them"),
        None => {
            tracing::info!("no --cluster-id: proof-of-possession tokens are refused");
            None
        }
    };
    Ok(PopSettings {
        policy,
        required: args.require_pop,
    })
}

/// The agent's own Entra identity for Microsoft Graph (group overage lookups): workload
/// identity, managed identity or a service principal from its environment, never a prompt.
/// Tried once in the background at start so the log says early whether lookups will work.
fn graph_credential(
    authority: &Authority,
    tenant: &str,
    http: &HttpClient,
) -> Arc<dyn CredentialSource> {
    let env = Environment::from_process();
    let opts = ChainOptions {
        authority: authority.clone(),
        tenant: env.tenant_id.clone().or_else(|| Some(tenant.to_string())),
        server_app_id: authority.cloud.graph_resource.clone(),
        client_app_id: ARC_CLIENT_APP_ID.to_string(),
        only: None,
        interactive: false,
        http: http.clone(),
        config_dir: crate::proxy::local_ca::config_dir(),
        prompt: Arc::new(StderrPrompt),
        pop: None,
    };
    let credential: Arc<dyn CredentialSource> =
        Arc::new(Refreshing::new(EntraChain::new(&opts, &env), RENEW_MARGIN));
    let probe = credential.clone();
    tokio::spawn(async move {
        match probe.token().await {
            Ok(_) => {
                tracing::info!(identity = %probe.describe(), "group overage lookups in Microsoft Graph use this identity")
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "no Entra identity for Microsoft Graph: users in more than 200 groups cannot be authorized until one is configured")
            }
        }
    });
    credential
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (relay, key, tls) = args.relay.resolve()?;
    let loaded = Upstream::load(args.kubeconfig.clone(), args.context.clone()).await?;
    let own_token = loaded.own_token.clone();
    let auth = authenticator(&args, loaded.own_token)?;
    let upstream = loaded
        .upstream
        .with_apiserver_connections(args.apiserver_connections as usize);
    if let Some(heartbeat) = heartbeat(&args, &relay, &tls, loaded.config)? {
        tokio::spawn(heartbeat.run(HEARTBEAT_INTERVAL, shutdown.clone()));
    }
    let health = match args.health_addr.as_str() {
        "off" | "" => None,
        addr => {
            let addr = parse_health_addr(addr)
                .with_context(|| format!("--health-addr {addr:?} is not host:port or \"off\""))?;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for health probes on {addr}"))?,
            )
        }
    };
    let mut registry = crate::metrics::registry();
    let metrics = AgentMetrics::register(&mut registry);
    if let Some(addr) = &args.metrics_addr {
        crate::metrics::start(addr, registry, shutdown.clone()).await?;
    }
    let ttl = args.token_ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl < Duration::from_secs(60) {
        anyhow::bail!("--token-ttl must be at least 60s");
    }
    let audit = match args.audit_log.as_deref() {
        Some(target) => Some(Arc::new(AuditLog::open(
            &AuditTarget::parse(target),
            &args.relay.connection,
            own_token,
        )?)),
        None => None,
    };
    let config = AgentConfig {
        relay,
        entity: args.relay.connection.clone(),
        key: Arc::new(KeySource::watching(&args.relay.key_file, key)),
        relay_tls: tls,
        listeners: args.listeners as usize,
        relay_replicas: args.relay_replicas as usize,
        token_ttl: ttl,
        auth: Arc::new(auth),
        max_streams: args.max_streams as usize,
        streams_per_connection: args.streams_per_connection,
        drain: args.drain_timeout,
        metrics,
        audit,
    };
    crate::agent::run(config, upstream, health, shutdown).await;
    Ok(())
}

/// `host:port`, also with an unbracketed IPv6 host: the manifests pass `$(POD_IP):8081`, and
/// Kubernetes cannot add brackets around an IPv6 pod IP. The last `:` group is the port.
fn parse_health_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| {
        let (host, port) = s.rsplit_once(':')?;
        let ip = host.parse::<std::net::Ipv6Addr>().ok()?;
        Some(SocketAddr::from((ip, port.parse().ok()?)))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_health_addr;

    fn agent_args(extra: &[&str]) -> super::Args {
        use clap::Parser;
        let base = [
            "clusterconnect",
            "agent",
            "--relay",
            "wss://r",
            "--connection",
            "c",
            "--key-file",
            "k",
        ];
        let cli = super::super::Cli::try_parse_from(base.iter().chain(extra)).unwrap();
        match cli.command {
            super::super::Command::Agent(args) => args,
            _ => panic!("not agent"),
        }
    }

    #[test]
    fn pop_needs_the_cluster_id_only_when_required() {
        let id =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/c";
        let none = super::pop_settings(&agent_args(&[])).unwrap();
        assert!(none.policy.is_none() && !none.required);
        let err = super::pop_settings(&agent_args(&["--require-pop"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--require-pop needs --cluster-id"), "{err}");
        let err = super::pop_settings(&agent_args(&["--cluster-id", "nope"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cluster-id"), "{err}");
        let set = super::pop_settings(&agent_args(&[
            "--cluster-id",
            id,
            "--require-pop",
            "--pop-window",
            "10m",
        ]))
        .unwrap();
        let policy = set.policy.unwrap();
        assert_eq!(policy.cluster_id, id);
        assert_eq!(policy.window.as_secs(), 600);
        assert!(set.required);
        assert_eq!(
            super::pop_settings(&agent_args(&["--cluster-id", id]))
                .unwrap()
                .policy
                .unwrap()
                .window,
            crate::entra::pop::DEFAULT_WINDOW
        );
    }

    #[test]
    fn health_addresses_take_pod_ips_of_both_families() {
        for (given, want) in [
            ("10.0.0.5:8081", "10.0.0.5:8081"),
            ("[fd00::1]:8081", "[fd00::1]:8081"),
            ("fd00::1:8081", "[fd00::1]:8081"),
            ("0.0.0.0:8081", "0.0.0.0:8081"),
        ] {
            assert_eq!(
                parse_health_addr(given).map(|a| a.to_string()).as_deref(),
                Some(want)
            );
        }
        for bad in [
            "",
            "8081",
            "fd00::1",
            "host:8081",
            "10.0.0.5:x",
            "::1:99999",
        ] {
            assert_eq!(parse_health_addr(bad), None, "{bad}");
        }
    }
}

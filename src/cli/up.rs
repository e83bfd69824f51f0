//! `clusterconnect up`: relay, agent and proxy in one process against a kubeconfig context, so a
//! newcomer sees kubectl go through the whole tunnel (kubectl -> proxy -> relay -> agent ->
//! apiserver) with one command and nothing to install in the cluster.
//!
//! The relay runs on loopback with its embedded registry in a state directory, where the
//! cluster is registered as `connect` would register it (resource group `clusterconnect-up`):
//! the agent takes its Listen key from the registry and reports status to it, the proxy gets
//! its Send tokens from `listClusterUserCredential`, and `clusterconnect list`/`show` work
//! against it while `up` runs (the command is printed). kubectl through
//! the tunnel presents the context's own credential: its bearer token, token file or exec
//! plugin (run as kubectl runs it, renewed ahead of expiry); a context that authenticates
//! otherwise (a client certificate), or `--service-account`, gets a
//! short-lived token of a service account bound to `--role`, renewed while `up` runs and
//! removed, with its binding, when `up` stops, if `up` created them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::DeleteParams;
use kube::Api;
use tokio_util::sync::CancellationToken;

use super::proxy::{start, wait_ready};
use super::registry::RegistryTokens;
use crate::agent::heartbeat::{load_key, Heartbeat, INTERVAL as HEARTBEAT_INTERVAL};
use crate::agent::{AgentConfig, Authenticator, KeySource, Upstream, DEFAULT_TOKEN_TTL};
use crate::arm::client::{ManagementAuth, ManagementClient};
use crate::arm::{ClusterId, ClusterRequest, RequestProperties, DEFAULT_SUBSCRIPTION};
use crate::auth::refresh::{ExpiringToken, FetchFuture, Refreshing, TokenFetcher, RENEW_MARGIN};
use crate::auth::{CredentialError, CredentialSource};
use crate::entra::http::HttpClient;
use crate::onboard::apply;
use crate::onboard::keys::AgentKey;
use crate::onboard::token::{self, TokenSpec};
use crate::proxy::kubeconfig;
use crate::proxy::{ClusterConfig, RelayTarget, SendCredential};
use crate::relay::clusters::Registry;
use crate::relay::{RelayConfig, Rule, RuleSet, DEFAULT_MAX_CONNECTIONS};
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::protocol::RelayAddress;
use crate::tunnel::sas::SasKey;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kubeconfig of the cluster to reach [default: $KUBECONFIG, ~/.kube/config]; the tunnel's
    /// context is written into it too.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig [default: its current context].
    #[arg(long)]
    pub context: Option<String>,
    /// Go through the tunnel as a service account bound to --role (created for the session,
    /// removed at the end) even when the context has a bearer token of its own.
    #[arg(long)]
    pub service_account: bool,
    /// The ClusterRole of that service account.
    #[arg(long, default_value = "view")]
    pub role: String,
    /// Namespace of that service account.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Port of the local proxy on 127.0.0.1 [default: 47011 or the next free one].
    #[arg(long)]
    pub port: Option<u16>,
    /// Where `up` keeps what outlives a run: the relay's registry (its embedded one-file
    /// store), its CA, its admin key and the agent's signing key
    /// [default: $CLUSTERCONNECT_CONFIG_DIR/up, else ~/.config/clusterconnect/up].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Serve the relay's, agent's and proxy's Prometheus metrics on HOST:PORT at /metrics
    /// (plain HTTP); off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

const NO_KUBECONFIG: &str = "`clusterconnect up` needs a kubeconfig context that reaches a cluster: set KUBECONFIG or pass --kubeconfig (and --context), e.g. after `kind create cluster`, `az aks get-credentials` or `oc login`";
/// The service account a session goes through when the context has no bearer token.
const SESSION_ACCOUNT: &str = "clusterconnect-up";
/// Lifetime of its tokens, renewed ahead of expiry.
const SESSION_TOKEN: Duration = Duration::from_secs(3600);

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let loaded = Upstream::load(args.kubeconfig.clone(), args.context.clone())
        .await
        .context(NO_KUBECONFIG)?;
    let context = context_name(&args)?;
    let name = format!("clusterconnect-{}", sanitize(&context));
    let kubeconfig_path = args
        .kubeconfig
        .clone()
        .unwrap_or_else(kubeconfig::default_path);
    kubeconfig::check_foreign(&kubeconfig_path, std::slice::from_ref(&name))
        .context("cannot write the tunnel's context")?;

    let session = match (&loaded.own_token, args.service_account) {
        (Some(own), false) => Session::OwnToken(own.clone()),
        _ => Session::account(&args, loaded.config.clone()).await?,
    };
    let stop = CancellationToken::new();
    let result = serve(
        &args,
        &name,
        (loaded.upstream, loaded.config.clone()),
        &session,
        &kubeconfig_path,
        &stop,
        &shutdown,
    )
    .await;
    stop.cancel();
    session.end().await;
    result.map(|()| 0)
}

/// Relay, agent and proxy until `shutdown`; `stop` ends relay and agent.
async fn serve(
    args: &Args,
    name: &str,
    (upstream, kube_config): (Upstream, kube::Config),
    session: &Session,
    kubeconfig_path: &std::path::Path,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let state = StateDir::open(&state_dir(args))?;
    // One registry: the three roles' families have their own prefixes.
    let mut registry = crate::metrics::registry();
    let relay_metrics = crate::metrics::RelayMetrics::register(&mut registry);
    let agent_metrics = crate::metrics::AgentMetrics::register(&mut registry);
    let proxy_metrics = crate::metrics::ProxyMetrics::register(&mut registry);
    if let Some(addr) = &args.metrics_addr {
        crate::metrics::start(addr, registry, shutdown.clone()).await?;
    }
    let relay = Loopback::start(&state, relay_metrics, stop).await?;
    let registered = relay.register(&state, name).await?;
    let agent = AgentConfig {
        metrics: agent_metrics,
        relay: relay.address.clone(),
        entity: registered.entity.clone(),
        key: Arc::new(KeySource::fixed(registered.listen.clone())),
        relay_tls: relay.client_tls.clone(),
        listeners: 2,
        relay_replicas: 1,
        token_ttl: DEFAULT_TOKEN_TTL,
        auth: Arc::new(Authenticator::token_only()),
        max_streams: crate::agent::MAX_STREAMS,
        streams_per_connection: crate::tunnel::http::H2_MAX_STREAMS,
        // Ctrl-C on one machine: open watches need not hold the exit up.
        drain: Duration::from_secs(2),
        audit: None,
    };
    tokio::spawn(crate::agent::run(agent, upstream, None, stop.clone()));
    let heartbeat = Heartbeat {
        registry: ManagementClient::new(relay.address.clone(), relay.http(), None),
        id: registered.id.clone(),
        key: load_key(registered.agent_key.private_pem().expose())
            .map_err(|e| anyhow::anyhow!("the agent key in {}: {e}", state.dir.display()))?,
        kube: kube::Client::try_from(kube_config)
            .context("cannot build the agent's own Kubernetes client")?,
    };
    tokio::spawn(heartbeat.run(HEARTBEAT_INTERVAL, stop.clone()));
    let tokens = Refreshing::new(
        RegistryTokens {
            client: relay.admin_client(&state),
            id: registered.id.clone(),
        },
        RENEW_MARGIN,
    );
    let cluster = ClusterConfig {
        name: name.to_string(),
        target: RelayTarget {
            relay: relay.address.clone(),
            entity: registered.entity.clone(),
            send: SendCredential::Issued(Arc::new(tokens)),
            tls: relay.client_tls.clone(),
        },
        credential: session.credential(),
    };
    let started = start(
        vec![cluster],
        args.port,
        (proxy_metrics, Default::default()),
    )
    .await?;
    started.write_kubeconfig(kubeconfig_path, true, false)?;
    let names = started.proxy.cluster_names();
    let prober = started.proxy.prober();
    let serving = tokio::spawn(started.proxy.serve(started.listener, shutdown.clone()));
    tokio::select! {
        ready = wait_ready(&prober, &names, Duration::from_secs(60)) => {
            ready.context("the tunnel did not answer")?;
        }
        _ = shutdown.cancelled() => return Ok(()),
    }
    let kubeconfig_flag = match &args.kubeconfig {
        Some(p) => format!(" --kubeconfig {}", p.display()),
        None => String::new(),
    };
    errln!("{}", session.describe(&args.role, &args.namespace));
    outln!("ready: kubectl{kubeconfig_flag} --context {name} get pods -A");
    errln!("Every call goes kubectl -> proxy (127.0.0.1:{}) -> relay -> agent -> apiserver. Press Ctrl+C to stop.", started.port);
    outln!(
        "registry: clusterconnect list --relay wss://{} --relay-ca {} --admin-key-file {} -o table",
        relay.address.authority(),
        state.ca_file().display(),
        state.admin_file().display()
    );
    serving.await.context("the proxy task failed")??;
    Ok(())
}

fn context_name(args: &Args) -> anyhow::Result<String> {
    if let Some(c) = &args.context {
        return Ok(c.clone());
    }
    let file = match &args.kubeconfig {
        Some(p) => kube::config::Kubeconfig::read_from(p),
        None => kube::config::Kubeconfig::read(),
    }
    .context(NO_KUBECONFIG)?;
    file.current_context
        .filter(|c| !c.is_empty())
        .context("the kubeconfig has no current context; pass --context NAME")
}

/// A context name as a cluster name for URLs and kubeconfig entries.
fn sanitize(context: &str) -> String {
    let name: String = context
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .take(63)
        .collect();
    if name.is_empty() {
        "cluster".into()
    } else {
        name
    }
}

/// The resource group `up` registers its clusters in.
pub const UP_RESOURCE_GROUP: &str = "clusterconnect-up";

fn state_dir(args: &Args) -> PathBuf {
    args.state_dir
        .clone()
        .unwrap_or_else(|| crate::proxy::local_ca::config_dir().join("up"))
}

/// What outlives a run, in a directory of the user's (0700, files 0600): the relay's CA and
/// admin key, made on the first run, and its registry.
struct StateDir {
    dir: PathBuf,
    ca: tls::CertificateAuthority,
    admin: SasKey,
}

impl StateDir {
    fn open(dir: &Path) -> anyhow::Result<StateDir> {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if !meta.is_dir() => anyhow::bail!(
                "state directory {} is not a directory (a symlink or a file); pass --state-dir",
                dir.display()
            ),
            Ok(_) => {}
            Err(_) => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            }
        }
        let (cert, key) = (dir.join("relay-ca.crt"), dir.join("relay-ca.key"));
        let ca = match (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) {
            (Ok(c), Ok(k)) => tls::CertificateAuthority::from_pem(c, k)
                .with_context(|| format!("the relay CA in {} does not load; delete relay-ca.crt and relay-ca.key there to make a new one", dir.display()))?,
            _ => {
                let ca = tls::CertificateAuthority::generate("clusterconnect up")?;
                write_private(&cert, ca.cert_pem().as_bytes())?;
                write_private(&key, ca.key_pem().as_bytes())?;
                ca
            }
        };
        let admin_file = dir.join("admin.key");
        let admin = match std::fs::read_to_string(&admin_file) {
            Ok(text) => SasKey::parse(&text)
                .with_context(|| format!("{} is not a key file", admin_file.display()))?,
            Err(_) => {
                let admin = SasKey {
                    name: "admin".into(),
                    key: Secret::new(random_key()),
                };
                let line = format!(
                    "SharedAccessKeyName={};SharedAccessKey={}",
                    admin.name,
                    admin.key.expose()
                );
                write_private(&admin_file, line.as_bytes())?;
                admin
            }
        };
        Ok(StateDir {
            dir: dir.to_path_buf(),
            ca,
            admin,
        })
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("relay-ca.crt")
    }

    fn admin_file(&self) -> PathBuf {
        self.dir.join("admin.key")
    }

    /// The agent's signing key for `name`'s status reports, made on its first run.
    fn agent_key(&self, name: &str) -> anyhow::Result<AgentKey> {
        let path = self.dir.join(format!("agent-{name}.key"));
        match std::fs::read_to_string(&path) {
            Ok(pem) => Ok(AgentKey::from_pem(&pem, &path.display().to_string())?),
            Err(_) => {
                let key = AgentKey::generate()?;
                write_private(&path, key.private_pem().expose().as_bytes())?;
                Ok(key)
            }
        }
    }
}

/// Writes `bytes` to a new file (O_EXCL, 0600): `up` never overwrites what it did not make.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The relay on 127.0.0.1 with the state directory's registry and admin key.
struct Loopback {
    address: RelayAddress,
    client_tls: Arc<rustls::ClientConfig>,
}

/// A cluster as the registry holds it, and what agent and proxy need of it.
struct Registered {
    id: ClusterId,
    entity: String,
    listen: SasKey,
    agent_key: AgentKey,
}

impl Loopback {
    async fn start(
        state: &StateDir,
        metrics: crate::metrics::RelayMetrics,
        stop: &CancellationToken,
    ) -> anyhow::Result<Loopback> {
        let leaf = state.ca.issue_server(&["127.0.0.1", "localhost"])?;
        let server = tls::server_config(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            &[tls::ALPN_HTTP11],
        )?;
        let roots = tls::roots_from_pem(state.ca.cert_pem().as_bytes())?;
        let client_tls = tls::client_config_with_roots(roots, &[tls::ALPN_HTTP11])?;
        let registry_file = state.dir.join("registry.redb");
        let registry = Registry::open(&registry_file, None).with_context(|| {
            format!(
                "cannot open the registry {} (is another `clusterconnect up` using {}? stop it or pass --state-dir)",
                registry_file.display(),
                state.dir.display()
            )
        })?;
        let admin = Rule {
            name: state.admin.name.clone(),
            key: state.admin.key.clone(),
            secondary_key: None,
            listen: false,
            send: false,
            manage: true,
            entity: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen on 127.0.0.1 for the relay")?;
        let port = listener.local_addr()?.port();
        let config = RelayConfig {
            hostnames: vec!["127.0.0.1".into()],
            rules: RuleSet::new(vec![admin]),
            clusters: Some(Arc::new(registry)),
            tls: server,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stats: Arc::new(crate::relay::RelayStats::with_metrics(metrics)),
            public_port: None,
            // Ctrl-C on one machine: nothing to hand over to, so no long drain.
            limits: crate::relay::Limits {
                drain: Duration::from_secs(2),
                ..Default::default()
            },
            proxy_protocol: None,
            cluster: None,
        };
        tokio::spawn(crate::relay::run(listener, config, stop.clone()));
        Ok(Loopback {
            address: RelayAddress::parse(&format!("wss://127.0.0.1:{port}"))?,
            client_tls,
        })
    }

    fn http(&self) -> HttpClient {
        HttpClient::new(
            self.client_tls.clone(),
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }

    fn admin_client(&self, state: &StateDir) -> ManagementClient {
        ManagementClient::new(
            self.address.clone(),
            self.http(),
            Some(ManagementAuth::Key(state.admin.clone())),
        )
    }

    /// Registers `name` (or updates its registration) as `connect` would, with the state
    /// directory's agent key, and fetches the agent's Listen key.
    async fn register(&self, state: &StateDir, name: &str) -> anyhow::Result<Registered> {
        let id = ClusterId::new(DEFAULT_SUBSCRIPTION, UP_RESOURCE_GROUP, name)?;
        let agent_key = state.agent_key(name)?;
        let client = self.admin_client(state);
        let request = ClusterRequest {
            location: "local".into(),
            tags: Default::default(),
            properties: RequestProperties {
                agent_public_key_certificate: agent_key.public_certificate().to_string(),
                distribution: Some("generic".into()),
                infrastructure: Some("generic".into()),
            },
        };
        client.put(&id, &request).await.with_context(|| {
            format!(
                "cannot register {name} in the registry of {}",
                state.dir.display()
            )
        })?;
        let credential = client
            .list_agent_credential(&id)
            .await
            .context("cannot get the agent's Listen key from the registry")?;
        let listen = SasKey::parse(&credential.listen_key)
            .context("the registry's agent credential is not a key")?;
        Ok(Registered {
            id,
            entity: credential.hybrid_connection_name,
            listen,
            agent_key,
        })
    }
}

fn random_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Who kubectl is through the tunnel.
enum Session {
    /// The context's own bearer token, token file or exec plugin.
    OwnToken(Arc<dyn CredentialSource>),
    /// A service account of this session, and what `up` created for it.
    Account {
        tokens: Arc<Refreshing<AccountTokens>>,
        created: Created,
    },
}

/// What `up` created and so removes: never what was there before.
struct Created {
    account: bool,
    binding: bool,
}

impl Session {
    async fn account(args: &Args, config: kube::Config) -> anyhow::Result<Session> {
        let kube = kube::Client::try_from(config).context("cannot build the Kubernetes client")?;
        let spec = TokenSpec {
            namespace: args.namespace.clone(),
            service_account: SESSION_ACCOUNT.into(),
            cluster_role: args.role.clone(),
            duration: Some(SESSION_TOKEN),
            timeout: Duration::from_secs(30),
        };
        let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), &spec.namespace);
        let bindings: Api<ClusterRoleBinding> = Api::all(kube.clone());
        let created = Created {
            account: apply::get(&accounts, SESSION_ACCOUNT).await?.is_none(),
            binding: apply::get(&bindings, &spec.binding_name()).await?.is_none(),
        };
        let tokens = Arc::new(Refreshing::new(AccountTokens { kube, spec }, RENEW_MARGIN));
        let session = Session::Account { tokens, created };
        // The first token now: a context without the rights fails here, with the reason.
        if let Err(e) = session.credential().token().await {
            session.end().await;
            return Err(anyhow::Error::new(e).context(format!("cannot set up service account {}/{SESSION_ACCOUNT} with role {} (the context needs the right to create service accounts, cluster role bindings and tokens; or use a context with a bearer token)", args.namespace, args.role)));
        }
        Ok(session)
    }

    fn credential(&self) -> Arc<dyn CredentialSource> {
        match self {
            Session::OwnToken(own) => own.clone(),
            Session::Account { tokens, .. } => tokens.clone(),
        }
    }

    fn describe(&self, role: &str, namespace: &str) -> String {
        match self {
            Session::OwnToken(own) => format!("kubectl goes through the tunnel with the context's own credential ({}).", own.describe()),
            Session::Account { .. } => format!("kubectl goes through the tunnel as service account {namespace}/{SESSION_ACCOUNT} with cluster role {role}; it is removed when up stops."),
        }
    }

    /// Removes what this session created, bounded so a gone cluster cannot hold the exit.
    async fn end(&self) {
        let Session::Account { tokens, created } = self else {
            return;
        };
        let fetcher = tokens.fetcher();
        let (kube, spec) = (&fetcher.kube, &fetcher.spec);
        let cleanup = async {
            if created.binding {
                let bindings: Api<ClusterRoleBinding> = Api::all(kube.clone());
                if let Err(e) = bindings
                    .delete(&spec.binding_name(), &DeleteParams::default())
                    .await
                {
                    errln!(
                        "could not remove ClusterRoleBinding {}: {e}",
                        spec.binding_name()
                    );
                }
            }
            if created.account {
                let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), &spec.namespace);
                if let Err(e) = accounts
                    .delete(SESSION_ACCOUNT, &DeleteParams::default())
                    .await
                {
                    errln!(
                        "could not remove ServiceAccount {}/{SESSION_ACCOUNT}: {e}",
                        spec.namespace
                    );
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(15), cleanup)
            .await
            .is_err()
        {
            errln!("the cluster did not answer within 15s; remove ServiceAccount {}/{SESSION_ACCOUNT} and ClusterRoleBinding {} yourself", spec.namespace, spec.binding_name());
        }
    }
}

/// Tokens of the session's service account (TokenRequest), fetched again ahead of expiry.
struct AccountTokens {
    kube: kube::Client,
    spec: TokenSpec,
}

impl TokenFetcher for AccountTokens {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let token = token::create(&self.kube, &self.spec)
                .await
                .map_err(|e| CredentialError::unavailable(self.describe(), e))?;
            Ok(ExpiringToken::new(token, SESSION_TOKEN))
        })
    }

    fn describe(&self) -> String {
        format!(
            "service account {}/{}",
            self.spec.namespace, self.spec.service_account
        )
    }
}

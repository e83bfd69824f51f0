//! `clusterconnect up`: relay, agent and proxy in one process against a kubeconfig context, so a
//! newcomer sees kubectl go through the whole tunnel (kubectl -> proxy -> relay -> agent ->
//! apiserver) with one command and nothing to install in the cluster.
//!
//! The relay runs on loopback with a throwaway CA and keys held only in memory. kubectl through
//! the tunnel presents the context's own credential: its bearer token, token file or exec
//! plugin (run as kubectl runs it, renewed ahead of expiry); a context that authenticates
//! otherwise (a client certificate), or `--service-account`, gets a
//! short-lived token of a service account bound to `--role`, renewed while `up` runs and
//! removed, with its binding, when `up` stops, if `up` created them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::DeleteParams;
use kube::Api;
use tokio_util::sync::CancellationToken;

use super::proxy::{start, wait_ready};
use crate::agent::{AgentConfig, Authenticator, KeySource, Upstream, DEFAULT_TOKEN_TTL};
use crate::auth::refresh::{ExpiringToken, FetchFuture, Refreshing, TokenFetcher, RENEW_MARGIN};
use crate::auth::{CredentialError, CredentialSource};
use crate::onboard::apply;
use crate::onboard::token::{self, TokenSpec};
use crate::proxy::kubeconfig;
use crate::proxy::{ClusterConfig, RelayTarget, SendCredential};
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
        loaded.upstream,
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
    upstream: Upstream,
    session: &Session,
    kubeconfig_path: &std::path::Path,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let relay = Loopback::start(name, stop).await?;
    let agent = AgentConfig {
        metrics: Default::default(),
        relay: relay.address.clone(),
        entity: name.to_string(),
        key: Arc::new(KeySource::fixed(relay.listen.clone())),
        relay_tls: relay.client_tls.clone(),
        listeners: 2,
        token_ttl: DEFAULT_TOKEN_TTL,
        auth: Arc::new(Authenticator::token_only()),
        max_streams: crate::agent::MAX_STREAMS,
        // Ctrl-C on one machine: open watches need not hold the exit up.
        drain: Duration::from_secs(2),
        audit: None,
    };
    tokio::spawn(crate::agent::run(agent, upstream, None, stop.clone()));
    let cluster = ClusterConfig {
        name: name.to_string(),
        target: RelayTarget {
            relay: relay.address.clone(),
            entity: name.to_string(),
            send: SendCredential::Key(relay.send.clone()),
            tls: relay.client_tls.clone(),
        },
        credential: session.credential(),
    };
    let started = start(vec![cluster], args.port, Default::default()).await?;
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
    eprintln!("{}", session.describe(&args.role, &args.namespace));
    println!("ready: kubectl{kubeconfig_flag} --context {name} get pods -A");
    eprintln!("Every call goes kubectl -> proxy (127.0.0.1:{}) -> relay -> agent -> apiserver. Press Ctrl+C to stop.", started.port);
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

/// The relay on 127.0.0.1, its CA and two keys, none of them ever written to disk.
struct Loopback {
    address: RelayAddress,
    client_tls: Arc<rustls::ClientConfig>,
    listen: SasKey,
    send: SasKey,
}

impl Loopback {
    async fn start(entity: &str, stop: &CancellationToken) -> anyhow::Result<Loopback> {
        let ca = tls::CertificateAuthority::generate("clusterconnect up (this session only)")?;
        let leaf = ca.issue_server(&["127.0.0.1", "localhost"])?;
        let server = tls::server_config(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            &[tls::ALPN_HTTP11],
        )?;
        let roots = tls::roots_from_pem(ca.cert_pem().as_bytes())?;
        let client_tls = tls::client_config_with_roots(roots, &[tls::ALPN_HTTP11])?;
        let key = |name: &str| SasKey {
            name: name.into(),
            key: Secret::new(random_key()),
        };
        let (listen, send) = (key("listen"), key("send"));
        let rule = |k: &SasKey, listen: bool| Rule {
            name: k.name.clone(),
            key: k.key.clone(),
            secondary_key: None,
            listen,
            send: !listen,
            manage: false,
            entity: Some(entity.to_string()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen on 127.0.0.1 for the relay")?;
        let port = listener.local_addr()?.port();
        let config = RelayConfig {
            hostnames: vec!["127.0.0.1".into()],
            rules: RuleSet::new(vec![rule(&listen, true), rule(&send, false)]),
            clusters: None,
            tls: server,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stats: Default::default(),
            public_port: None,
            // Ctrl-C on one machine: nothing to hand over to, so no long drain.
            limits: crate::relay::Limits {
                drain: Duration::from_secs(2),
                ..Default::default()
            },
            proxy_protocol: None,
        };
        tokio::spawn(crate::relay::run(listener, config, stop.clone()));
        Ok(Loopback {
            address: RelayAddress::parse(&format!("wss://127.0.0.1:{port}"))?,
            client_tls,
            listen,
            send,
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
                    eprintln!(
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
                    eprintln!(
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
            eprintln!("the cluster did not answer within 15s; remove ServiceAccount {}/{SESSION_ACCOUNT} and ClusterRoleBinding {} yourself", spec.namespace, spec.binding_name());
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

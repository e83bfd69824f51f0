//! The whole tunnel on loopback: stand-in apiserver <- agent(s) -> relay <- proxy, each with
//! real TLS and real sockets, started in-process on port 0. Tests point kubectl at the
//! kubeconfig the proxy wrote.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clusterconnect::agent::{AgentConfig, Authenticator, KeySource, Upstream};
use clusterconnect::auth::{CredentialSource, StaticToken};
use clusterconnect::proxy::kubeconfig::{self, Entry};
use clusterconnect::proxy::{
    new_local_secret, server_url, ClusterConfig, Proxy, ProxyConfig, RelayTarget, SendCredential,
};
use clusterconnect::relay::{RelayConfig, RelayStats, Rule};
use clusterconnect::secret::Secret;
use clusterconnect::tls::{self, CertificateAuthority};
use clusterconnect::tunnel::protocol::{Action, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;
use rustls::ClientConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ApiServer;

pub const CONNECTION: &str = "edge-cluster";
pub const LISTEN_KEY: &str = "listen-key-for-tests-0123456789";
pub const SEND_KEY: &str = "send-key-for-tests-0123456789";

pub fn listen_key() -> SasKey {
    SasKey::parse(&format!(
        "SharedAccessKeyName=listen;SharedAccessKey={LISTEN_KEY}"
    ))
    .expect("key")
}

pub fn send_key() -> SasKey {
    SasKey::parse(&format!(
        "SharedAccessKeyName=send;SharedAccessKey={SEND_KEY}"
    ))
    .expect("key")
}

pub struct Relay {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub client_tls: Arc<ClientConfig>,
    pub stats: Arc<RelayStats>,
    config: RelayConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The key of the registry's administrator rule ("admin", Manage right).
pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";

pub fn admin_key() -> SasKey {
    SasKey::parse(&format!(
        "SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}"
    ))
    .expect("key")
}

impl Relay {
    pub async fn start() -> Relay {
        Relay::start_with(None).await
    }

    /// A relay that also serves the cluster registry from `file`, with an "admin" Manage rule
    /// and, when given, Entra callers checked by `entra`.
    pub async fn start_with_registry(
        file: &std::path::Path,
        entra: Option<clusterconnect::entra::validate::Validator>,
    ) -> Relay {
        let registry =
            clusterconnect::relay::clusters::Registry::open(file, entra).expect("registry");
        Relay::start_with(Some(Arc::new(registry))).await
    }

    /// A relay with a registry at `file` and the given limits, for tests of hostile callers.
    pub async fn start_limited(
        file: &std::path::Path,
        limits: clusterconnect::relay::Limits,
        max_connections: usize,
    ) -> Relay {
        let registry =
            clusterconnect::relay::clusters::Registry::open(file, None).expect("registry");
        Relay::start_configured(Some(Arc::new(registry)), limits, max_connections, None).await
    }

    /// A relay behind a (test) load balancer: every connection must start with a PROXY header.
    pub async fn start_proxy_protocol(
        limits: clusterconnect::relay::Limits,
        proxy_protocol: clusterconnect::relay::ProxyProtocol,
    ) -> Relay {
        Relay::start_configured(None, limits, 100, Some(proxy_protocol)).await
    }

    async fn start_with(clusters: Option<Arc<clusterconnect::relay::clusters::Registry>>) -> Relay {
        Relay::start_configured(clusters, Default::default(), 1000, None).await
    }

    async fn start_configured(
        clusters: Option<Arc<clusterconnect::relay::clusters::Registry>>,
        limits: clusterconnect::relay::Limits,
        max_connections: usize,
        proxy_protocol: Option<clusterconnect::relay::ProxyProtocol>,
    ) -> Relay {
        let stats = Arc::new(RelayStats::default());
        let ca = CertificateAuthority::generate("test relay CA").expect("CA");
        let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).expect("leaf");
        let config = RelayConfig {
            hostnames: vec!["127.0.0.1".into(), "localhost".into()],
            clusters,
            rules: clusterconnect::relay::RuleSet::new(vec![
                Rule {
                    name: "admin".into(),
                    key: Secret::new(ADMIN_KEY),
                    secondary_key: None,
                    listen: true,
                    send: true,
                    manage: true,
                    entity: None,
                },
                Rule {
                    name: "listen".into(),
                    key: Secret::new(LISTEN_KEY),
                    secondary_key: None,
                    listen: true,
                    send: false,
                    manage: false,
                    entity: None,
                },
                Rule {
                    name: "send".into(),
                    key: Secret::new(SEND_KEY),
                    secondary_key: None,
                    listen: false,
                    send: true,
                    manage: false,
                    entity: None,
                },
            ]),
            tls: tls::server_config(
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
                &[tls::ALPN_HTTP11],
            )
            .expect("tls"),
            max_connections,
            stats: stats.clone(),
            // The port this relay is bound to (see `spawn`): rendezvous addresses name it.
            public_port: None,
            limits,
            proxy_protocol,
            cluster: None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (stop, task) = Relay::spawn(listener, config.clone());
        let client_tls = tls::client_config_with_roots(
            tls::roots_from_pem(ca.cert_pem().as_bytes()).expect("roots"),
            &[],
        )
        .expect("client tls");
        Relay {
            config,
            addr,
            ca_pem: ca.cert_pem().to_string(),
            client_tls,
            stats,
            stop,
            task,
        }
    }

    fn spawn(listener: TcpListener, config: RelayConfig) -> (CancellationToken, JoinHandle<()>) {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                clusterconnect::relay::run(listener, config, stop)
                    .await
                    .expect("relay runs");
            }
        });
        (stop, task)
    }

    /// Stops the relay (every control channel and rendezvous ends) and starts it again on the
    /// same address with the same certificate, as a relay restart or failover looks to clients.
    pub async fn restart(&mut self) {
        self.go_down().await;
        self.come_back().await;
    }

    /// Stops the relay: its address refuses connections until [`Relay::come_back`].
    pub async fn go_down(&mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }

    /// Serves again on the same address, with the same certificate and configuration.
    pub async fn come_back(&mut self) {
        let mut listener = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let listener = listener.expect("rebind the relay's address");
        let (stop, task) = Relay::spawn(listener, self.config.clone());
        self.stop = stop;
        self.task = task;
    }

    /// Replaces the "listen" rule's key by `key` in the running relay, as a rotation looks
    /// to agents: the channels the old key authorized are closed, only the new key is accepted.
    pub fn rekey_listen(&self, key: &str) {
        let rules = self
            .config
            .rules
            .rules()
            .into_iter()
            .map(|mut rule| {
                if rule.name == "listen" {
                    rule.key = Secret::new(key);
                }
                rule
            })
            .collect();
        self.config.rules.replace(rules);
    }

    pub fn address(&self) -> RelayAddress {
        RelayAddress::parse(&format!("wss://127.0.0.1:{}", self.addr.port()))
            .expect("relay address")
    }
}

pub struct Agent {
    stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Agent {
    pub async fn start(relay: &Relay, api: &ApiServer, key: SasKey) -> Agent {
        Agent::start_for(relay, api, key, CONNECTION).await
    }

    pub async fn start_for(relay: &Relay, api: &ApiServer, key: SasKey, connection: &str) -> Agent {
        Agent::start_with(relay, api, key, connection, Authenticator::token_only()).await
    }

    /// An agent that authenticates callers with `auth` (e.g. Entra validation).
    pub async fn start_with(
        relay: &Relay,
        api: &ApiServer,
        key: SasKey,
        connection: &str,
        auth: Authenticator,
    ) -> Agent {
        Agent::start_keyed(
            relay,
            api,
            Arc::new(KeySource::fixed(key)),
            connection,
            auth,
        )
        .await
    }

    /// An agent whose key comes from `key` (e.g. a key file it follows).
    pub async fn start_keyed(
        relay: &Relay,
        api: &ApiServer,
        key: Arc<KeySource>,
        connection: &str,
        auth: Authenticator,
    ) -> Agent {
        Agent::start_audited(relay, api, key, connection, auth, None).await
    }

    /// An agent that writes its audit lines to `audit`, when given.
    pub async fn start_audited(
        relay: &Relay,
        api: &ApiServer,
        key: Arc<KeySource>,
        connection: &str,
        auth: Authenticator,
        audit: Option<Arc<clusterconnect::agent::AuditLog>>,
    ) -> Agent {
        let upstream = Upstream::new(
            &api.url().parse().expect("url"),
            Some(api.ca_pem().as_bytes()),
        )
        .expect("upstream");
        let config = AgentConfig {
            relay: relay.address(),
            entity: connection.into(),
            key,
            relay_tls: relay.client_tls.clone(),
            listeners: 2,
            relay_replicas: 1,
            token_ttl: Duration::from_secs(3600),
            auth: Arc::new(auth),
            max_streams: clusterconnect::agent::MAX_STREAMS,
            streams_per_connection: clusterconnect::tunnel::http::H2_MAX_STREAMS,
            drain: clusterconnect::agent::DRAIN,
            metrics: Default::default(),
            audit,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(clusterconnect::agent::run(
            config,
            upstream,
            None,
            stop.clone(),
        ));
        Agent { stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A running proxy and the kubeconfig it wrote.
pub struct LocalProxy {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub local_secret: Secret,
    pub ca_pem: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// One cluster for [`LocalProxy::start_many`].
pub struct ProxiedCluster<'a> {
    pub name: &'a str,
    pub relay: &'a Relay,
    pub connection: &'a str,
    pub key: SasKey,
    pub credential: Arc<dyn CredentialSource>,
}

/// A fixed bearer token as a credential source.
pub fn static_token(token: &str) -> Arc<dyn CredentialSource> {
    Arc::new(StaticToken::new(Secret::new(token)))
}

impl LocalProxy {
    pub async fn start(
        relay: &Relay,
        key: SasKey,
        token: &str,
        dir: &std::path::Path,
    ) -> LocalProxy {
        let cluster = ProxiedCluster {
            name: CONNECTION,
            relay,
            connection: CONNECTION,
            key,
            credential: static_token(token),
        };
        LocalProxy::start_many(vec![cluster], dir).await
    }

    /// A proxy serving several clusters, each under its own context named after it.
    pub async fn start_many(
        clusters: Vec<ProxiedCluster<'_>>,
        dir: &std::path::Path,
    ) -> LocalProxy {
        let clusters = clusters
            .into_iter()
            .map(|c| ClusterConfig {
                name: c.name.into(),
                target: RelayTarget {
                    relay: c.relay.address(),
                    entity: c.connection.into(),
                    send: SendCredential::Key(c.key),
                    tls: c.relay.client_tls.clone(),
                },
                credential: c.credential,
            })
            .collect();
        LocalProxy::start_configs(clusters, dir).await
    }

    /// A proxy for clusters resolved elsewhere (e.g. by the CLI's flags).
    pub async fn start_configs(clusters: Vec<ClusterConfig>, dir: &std::path::Path) -> LocalProxy {
        let ca = CertificateAuthority::generate("test proxy CA").expect("CA");
        let leaf = ca.issue_server(&["127.0.0.1"]).expect("leaf");
        let local_secret = new_local_secret();
        let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
        let proxy = Proxy::new(ProxyConfig {
            metrics: Default::default(),
            clusters,
            local_tls: tls::server_config(
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
                &[tls::ALPN_H2, tls::ALPN_HTTP11],
            )
            .expect("tls"),
            local_secret: local_secret.clone(),
            pool: Default::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let kubeconfig = dir.join("kubeconfig");
        for (i, name) in names.iter().enumerate() {
            let server = server_url(addr.port(), name);
            let token = clusterconnect::proxy::local_token(&local_secret, name);
            let entry = Entry {
                name,
                server: &server,
                ca_pem: ca.cert_pem(),
                token: &token,
            };
            kubeconfig::write(&kubeconfig, &entry, i == 0).expect("kubeconfig");
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                proxy.serve(listener, stop).await.expect("proxy serves");
            }
        });
        LocalProxy {
            addr,
            kubeconfig,
            local_secret,
            ca_pem: ca.cert_pem().to_string(),
            stop,
            task,
        }
    }

    #[allow(dead_code, reason = "only benches/tunnel.rs stops a proxy")]
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits (bounded) until the relay pairs a sender for `CONNECTION` with a listener.
pub async fn wait_for_listener(relay: &Relay) {
    wait_for_listener_on(relay, CONNECTION).await
}

pub async fn wait_for_listener_on(relay: &Relay, connection: &str) {
    let addr = relay.address();
    for _ in 0..200 {
        let token = send_key().mint(&addr.resource_uri(connection), Duration::from_secs(60));
        let url = addr.url(connection, Action::Connect, "probe");
        if clusterconnect::tunnel::dial::dial(&url, Some(&token), &relay.client_tls)
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no agent became available on the relay within 5 s");
}

/// Stand-in apiserver, relay, one agent and a proxy, ready for kubectl.
pub struct Stack {
    pub api: ApiServer,
    pub relay: Relay,
    pub agents: Vec<Agent>,
    pub proxy: LocalProxy,
    /// Holds the proxy's kubeconfig and local CA.
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        let api = ApiServer::start().await;
        let relay = Relay::start().await;
        let agent = Agent::start(&relay, &api, listen_key()).await;
        wait_for_listener(&relay).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let proxy = LocalProxy::start(&relay, send_key(), &api.token(), dir.path()).await;
        Stack {
            api,
            relay,
            agents: vec![agent],
            proxy,
            _dir: dir,
        }
    }
}

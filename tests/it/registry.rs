//! The relay's cluster registry: the ARM-shaped management API, who may get a cluster's
//! Send token, `proxy -n -g` through it with the real kubectl, signed agent status, and the
//! real binaries' `list`/`show` across a relay restart.

use crate::support;

use std::time::Duration;

use clusterconnect::arm::client::{ManagementAuth, ManagementClient};
use clusterconnect::arm::{ClusterId, ClusterRequest, ConnectivityStatus, RequestProperties};
use clusterconnect::entra::http::HttpClient;
use clusterconnect::entra::validate::{Validator, ValidatorConfig};
use clusterconnect::entra::{Authority, Cloud};
use clusterconnect::relay::clusters::{arm_audiences_of, EntraCallers, Registry};
use clusterconnect::tunnel::sas::SasKey;

use support::check::describe;
use support::entra::{Entra, TENANT};
use support::tunnel::{admin_key, static_token, Agent, LocalProxy, Relay, ADMIN_KEY};
use support::{kubectl_available, kubectl_ok, ApiServer};

/// The management API's own audience, as `[entra] audience` names it.
pub(crate) const RELAY_AUDIENCE: &str = "api://clusterconnect-relay";
/// Azure Resource Manager's, what `az account get-access-token` issues.
const ARM: &str = "https://management.core.windows.net/";
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// A validator for management callers with tokens for `audience`, trusting the stand-in.
pub(crate) fn validator(entra: &Entra, audience: &str) -> Validator {
    let mut authority =
        Authority::new(Cloud::AzurePublicCloud, Some(&entra.authority_host())).unwrap();
    authority.graph = entra.authority_host();
    Validator::new(
        ValidatorConfig {
            authority,
            server_app_id: audience.into(),
            tenants: vec![TENANT.into()],
            refetch_interval: Duration::ZERO,
        },
        HttpClient::new(
            entra.client_tls(),
            Duration::from_secs(5),
            Duration::from_secs(10),
        ),
    )
}

pub(crate) fn client(relay: &Relay, auth: ManagementAuth) -> ManagementClient {
    let http = HttpClient::new(
        relay.client_tls.clone(),
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    ManagementClient::new(relay.address(), http, Some(auth))
}

/// A fresh agent key pair: (PKCS#8 PEM, agentPublicKeyCertificate).
pub(crate) fn agent_keys() -> (String, String) {
    use base64::Engine;
    use rcgen::PublicKeyData;
    let pair = rcgen::KeyPair::generate().expect("key pair");
    let public = base64::engine::general_purpose::STANDARD.encode(pair.subject_public_key_info());
    (pair.serialize_pem(), public)
}

pub(crate) fn request(public_key: &str) -> ClusterRequest {
    ClusterRequest {
        location: "eastus".into(),
        tags: [("env".to_string(), "test".to_string())].into(),
        properties: RequestProperties {
            agent_public_key_certificate: public_key.into(),
            distribution: Some("k3s".into()),
            infrastructure: Some("generic".into()),
        },
    }
}

pub(crate) fn id(name: &str) -> ClusterId {
    ClusterId::new(clusterconnect::arm::DEFAULT_SUBSCRIPTION, "rg-test", name).expect("id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_owners_and_granted_users_get_a_send_token_and_it_opens_only_their_cluster() {
    let entra = Entra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_registry(
        &dir.path().join("registry.redb"),
        Some(validator(&entra, RELAY_AUDIENCE)),
    )
    .await;
    let owner_oid = "aaaaaaaa-0000-4000-8000-000000000001";
    let other_oid = "bbbbbbbb-0000-4000-8000-000000000002";
    let token_for =
        |upn: &str, oid: &str| entra.sign(&entra.user_claims(upn, oid, &[], RELAY_AUDIENCE, HOUR));
    let owner = client(
        &relay,
        ManagementAuth::Entra(static_token(&token_for("owner@contoso.com", owner_oid))),
    );
    let other = client(
        &relay,
        ManagementAuth::Entra(static_token(&token_for("other@contoso.com", other_oid))),
    );
    let admin = client(&relay, ManagementAuth::Key(admin_key()));

    let (_, public) = agent_keys();
    let created = owner
        .put(&id("prod"), &request(&public))
        .await
        .expect("register");
    assert_eq!(created.system_data.created_by, "owner@contoso.com");
    assert_eq!(
        created.properties.connectivity_status,
        ConnectivityStatus::Connecting
    );
    let (_, public2) = agent_keys();
    admin
        .put(&id("staging"), &request(&public2))
        .await
        .expect("admin registers");

    // A genuine key of a rule without the Manage right: known, not allowed (403, not 401).
    let sender = client(&relay, ManagementAuth::Key(support::tunnel::send_key()));
    let err = sender.get(&id("prod")).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("AuthorizationFailed"), "{err}");

    // Without a role: 403 on the resource and on the credential; invisible in lists.
    let err = other.list_user_credential(&id("prod")).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("AuthorizationFailed"), "{err}");
    assert!(other
        .list(clusterconnect::arm::DEFAULT_SUBSCRIPTION, None)
        .await
        .unwrap()
        .is_empty());
    // The owner sees only what it owns; the administrator sees everything.
    let mine: Vec<_> = owner
        .list(clusterconnect::arm::DEFAULT_SUBSCRIPTION, Some("rg-test"))
        .await
        .unwrap();
    assert_eq!(
        mine.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["prod"]
    );
    assert_eq!(
        admin
            .list(clusterconnect::arm::DEFAULT_SUBSCRIPTION, None)
            .await
            .unwrap()
            .len(),
        2
    );
    // Only an owner may grant; then the user gets a token.
    assert_eq!(
        other
            .grant_user(&id("prod"), other_oid)
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    owner
        .grant_user(&id("prod"), other_oid)
        .await
        .expect("grant");
    let config = other
        .list_user_credential(&id("prod"))
        .await
        .expect("user credential");
    assert!(config.expiration_time > clusterconnect::tunnel::sas::unix_now());

    // The token opens this cluster's hybrid connection and no other.
    let staging = admin
        .list_agent_credential(&id("staging"))
        .await
        .unwrap()
        .hybrid_connection_name;
    let listen = SasKey::parse(
        &admin
            .list_agent_credential(&id("prod"))
            .await
            .unwrap()
            .listen_key,
    )
    .unwrap();
    let api = ApiServer::start().await;
    // The relay-wide Listen rule does not reach a registered cluster's connection: the relay
    // refuses it, and the agent keeps retrying (a rotated key could fix it) without listening.
    let intruder_key = std::sync::Arc::new(clusterconnect::agent::KeySource::fixed(
        support::tunnel::listen_key(),
    ));
    let intruder = Agent::start_keyed(
        &relay,
        &api,
        intruder_key.clone(),
        &config.hybrid_connection_name,
        clusterconnect::agent::Authenticator::token_only(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while intruder_key.refusals() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never refused a relay-wide listen key on a registered cluster's connection"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        !intruder.task.is_finished(),
        "a refused agent keeps retrying"
    );
    intruder.stop().await;
    let _agent = Agent::start_for(&relay, &api, listen, &config.hybrid_connection_name).await;
    let dial = |entity: &str| {
        let url = relay.address().url(
            entity,
            clusterconnect::tunnel::protocol::Action::Connect,
            "t",
        );
        let token = clusterconnect::secret::Secret::new(config.token.clone());
        let tls = relay.client_tls.clone();
        async move { clusterconnect::tunnel::dial::dial(&url, Some(&token), &tls).await }
    };
    let mut opened = false;
    for _ in 0..100 {
        if dial(&config.hybrid_connection_name).await.is_ok() {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(opened, "the user token did not open its own cluster");
    let err = dial(&staging).await.unwrap_err();
    assert!(
        err.is_auth(),
        "another cluster's connection accepted the token: {err}"
    );

    // Deleting needs ownership too.
    assert_eq!(
        other.delete(&id("prod")).await.unwrap_err().status(),
        Some(403)
    );
    assert!(owner.delete(&id("prod")).await.unwrap());
    assert!(owner.get(&id("prod")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_by_name_and_resource_group_reaches_the_cluster_and_status_reports_show_it_connected()
{
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_registry(&dir.path().join("registry.redb"), None).await;
    let api = ApiServer::start().await;
    let admin = client(&relay, ManagementAuth::Key(admin_key()));
    let (private, public) = agent_keys();
    admin
        .put(&id("edge"), &request(&public))
        .await
        .expect("register");
    let agent_credential = admin.list_agent_credential(&id("edge")).await.unwrap();
    let listen = SasKey::parse(&agent_credential.listen_key).unwrap();
    let hc = agent_credential.hybrid_connection_name.clone();
    let _agent = Agent::start_for(&relay, &api, listen, &hc).await;
    // Registered connections take the cluster's own Send token, not the relay-wide key.
    let probe = admin.list_user_credential(&id("edge")).await.unwrap();
    let token = clusterconnect::secret::Secret::new(probe.token.clone());
    let url = relay.address().url(
        &hc,
        clusterconnect::tunnel::protocol::Action::Connect,
        "probe",
    );
    let mut listening = false;
    for _ in 0..200 {
        if clusterconnect::tunnel::dial::dial(&url, Some(&token), &relay.client_tls)
            .await
            .is_ok()
        {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        listening,
        "the agent never listened on its registered connection"
    );

    // The CLI's own resolution of `proxy -n edge -g rg-test`.
    let ca = dir.path().join("relay-ca.crt");
    std::fs::write(&ca, &relay.ca_pem).unwrap();
    let admin_file = dir.path().join("admin.key");
    std::fs::write(
        &admin_file,
        format!("SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}"),
    )
    .unwrap();
    let mut flags = clusterconnect::cli::clusters::ClusterFlags {
        relay: Some(format!("wss://127.0.0.1:{}", relay.addr.port())),
        relay_ca: Some(ca),
        cluster_name: Some("edge".into()),
        resource_group: Some("rg-test".into()),
        token: Some(api.token()),
        ..Default::default()
    };
    flags.registry.admin_key_file = Some(admin_file);
    let clusters = flags.resolve().await.expect("resolve -n/-g");
    assert_eq!(clusters[0].name, "edge");
    let proxy = LocalProxy::start_configs(clusters, dir.path()).await;
    kubectl_ok(&proxy.kubeconfig, &["--context", "edge", "get", "pods"]).await;

    // A signed status report: Connected, with versions and counts from the apiserver.
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.agent_token());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let heartbeat = clusterconnect::agent::heartbeat::Heartbeat {
        registry: ManagementClient::new(
            relay.address(),
            HttpClient::new(
                relay.client_tls.clone(),
                Duration::from_secs(5),
                Duration::from_secs(10),
            ),
            None,
        ),
        id: id("edge"),
        key: clusterconnect::agent::heartbeat::load_key(&private).unwrap(),
        kube: kube::Client::try_from(config).unwrap(),
    };
    heartbeat.report().await.expect("status report");
    let shown = admin.get(&id("edge")).await.unwrap().unwrap();
    let p = &shown.properties;
    assert_eq!(p.connectivity_status, ConnectivityStatus::Connected);
    assert_eq!(p.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert!(
        p.kubernetes_version
            .as_deref()
            .is_some_and(|v| v.starts_with('v')),
        "{p:?}"
    );
    assert_eq!(p.total_node_count, Some(3));
    assert_eq!(p.total_core_count, Some(12));
    assert!(p.last_connectivity_time.is_some());

    // A report signed with another key is refused.
    let (other_private, _) = agent_keys();
    let forged = clusterconnect::agent::heartbeat::Heartbeat {
        key: clusterconnect::agent::heartbeat::load_key(&other_private).unwrap(),
        ..heartbeat
    };
    let err = clusterconnect::tunnel::http::error_chain(&forged.report().await.unwrap_err());
    assert!(err.contains("InvalidSignature"), "{err}");
}

/// A token for Azure Resource Manager is an Azure credential: the relay refuses it with a 401
/// that says which audience to sign in for, and a token for its own audience works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_audience_token_is_refused_and_the_relays_own_audience_works() {
    let entra = Entra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let callers = EntraCallers {
        own: validator(&entra, RELAY_AUDIENCE),
        audience: Some(RELAY_AUDIENCE.into()),
        arm: Vec::new(),
    };
    let registry = Registry::open_with(&dir.path().join("registry.redb"), Some(callers)).unwrap();
    let relay = InProcessRelay::start(registry).await;
    let oid = "aaaaaaaa-0000-4000-8000-000000000001";
    let as_user = |audience: &str| {
        let token = entra.sign(&entra.user_claims("owner@contoso.com", oid, &[], audience, HOUR));
        relay.client(ManagementAuth::Entra(static_token(&token)))
    };
    let (_, public) = agent_keys();
    as_user(RELAY_AUDIENCE)
        .put(&id("prod"), &request(&public))
        .await
        .expect("a token for the relay's audience registers");

    for arm in [
        ARM,
        "https://management.azure.com",
        "https://management.usgovcloudapi.net/",
    ] {
        let err = as_user(arm).get(&id("prod")).await.unwrap_err();
        assert_eq!(err.status(), Some(401), "{arm}: {err}");
        let message = err.to_string();
        for part in [
            "InvalidAuthenticationToken",
            "the token is for Azure Resource Manager",
            "--relay-audience api://clusterconnect-relay",
            "allow_arm_audience",
        ] {
            assert!(message.contains(part), "{arm}: {part:?} not in {message}");
        }
    }
    // Another application's token: the audience named, no signature work needed to refuse it.
    let err = as_user("api://some-other-app")
        .get(&id("prod"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(
        err.to_string()
            .contains("audience api://some-other-app is not this relay's management API"),
        "{err}"
    );
    relay.stop().await;
}

/// `allow_arm_audience = true`: the operator accepts ARM tokens (weaker), next to its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_audience_tokens_are_accepted_only_when_the_operator_allows_them() {
    let entra = Entra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let arm = arm_audiences_of(Cloud::AzurePublicCloud)
        .into_iter()
        .map(|a| (a.clone(), validator(&entra, &a)))
        .collect();
    let callers = EntraCallers {
        own: validator(&entra, RELAY_AUDIENCE),
        audience: Some(RELAY_AUDIENCE.into()),
        arm,
    };
    let registry = Registry::open_with(&dir.path().join("registry.redb"), Some(callers)).unwrap();
    let relay = InProcessRelay::start(registry).await;
    let oid = "aaaaaaaa-0000-4000-8000-000000000001";
    let as_user = |audience: &str| {
        let token = entra.sign(&entra.user_claims("owner@contoso.com", oid, &[], audience, HOUR));
        relay.client(ManagementAuth::Entra(static_token(&token)))
    };
    let (_, public) = agent_keys();
    as_user(ARM)
        .put(&id("prod"), &request(&public))
        .await
        .expect("an ARM token registers when allowed");
    for audience in ["https://management.azure.com", RELAY_AUDIENCE] {
        let shown = as_user(audience).get(&id("prod")).await.expect(audience);
        assert_eq!(shown.expect("registered").name, "prod");
    }
    // Another cloud's ARM is still not this relay's.
    let err = as_user("https://management.chinacloudapi.cn/")
        .get(&id("prod"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    relay.stop().await;
}

/// A relay serving `registry` in this process, for Entra callers set up beyond what
/// `Relay::start_with_registry` takes (its own audience and ARM's).
struct InProcessRelay {
    address: clusterconnect::tunnel::protocol::RelayAddress,
    client_tls: std::sync::Arc<rustls::ClientConfig>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessRelay {
    async fn start(registry: Registry) -> InProcessRelay {
        use clusterconnect::relay::{RelayConfig, Rule};
        use clusterconnect::tls::{self, CertificateAuthority};
        use std::sync::Arc;
        let ca = CertificateAuthority::generate("test relay CA").expect("CA");
        let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).expect("leaf");
        let config = RelayConfig {
            hostnames: vec!["127.0.0.1".into(), "localhost".into()],
            public_port: None,
            limits: Default::default(),
            proxy_protocol: None,
            cluster: None,
            rules: clusterconnect::relay::RuleSet::new(vec![Rule {
                name: "admin".into(),
                key: clusterconnect::secret::Secret::new(ADMIN_KEY),
                secondary_key: None,
                listen: true,
                send: true,
                manage: true,
                entity: None,
            }]),
            clusters: Some(Arc::new(registry)),
            tls: tls::server_config(
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
                &[tls::ALPN_HTTP11],
            )
            .expect("tls"),
            max_connections: 100,
            stats: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                clusterconnect::relay::run(listener, config, stop)
                    .await
                    .expect("relay runs");
            }
        });
        InProcessRelay {
            address: clusterconnect::tunnel::protocol::RelayAddress::parse(&format!(
                "wss://127.0.0.1:{}",
                addr.port()
            ))
            .expect("address"),
            client_tls: tls::client_config_with_roots(
                tls::roots_from_pem(ca.cert_pem().as_bytes()).expect("roots"),
                &[],
            )
            .expect("client tls"),
            stop,
            task,
        }
    }

    fn client(&self, auth: ManagementAuth) -> ManagementClient {
        let http = HttpClient::new(
            self.client_tls.clone(),
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        ManagementClient::new(self.address.clone(), http, Some(auth))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The real relay binary keeps registrations across a restart; `list` and `show` print them
/// the way `az connectedk8s` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_from_the_binaries_survive_a_relay_restart() {
    use support::processes::{run_to_end, start_relay_with};
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "hostnames = []\n\n[[rules]]\nname = \"admin\"\nkey = \"{ADMIN_KEY}\"\nrights = [\"manage\"]\n"
    );
    let mut relay = start_relay_with(dir.path(), &toml, &[]).await;
    let admin_file = dir.path().join("admin.key");
    std::fs::write(
        &admin_file,
        format!("SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}"),
    )
    .unwrap();
    let tls = clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).unwrap();
    let management = ManagementClient::new(
        clusterconnect::tunnel::protocol::RelayAddress::parse(&relay.url).unwrap(),
        HttpClient::new(tls, Duration::from_secs(5), Duration::from_secs(10)),
        Some(ManagementAuth::Key(admin_key())),
    );
    let (_, public) = agent_keys();
    management
        .put(&id("prod"), &request(&public))
        .await
        .expect("register");

    // Restart: same config, same registry file.
    relay.process.terminate();
    relay
        .process
        .wait(Duration::from_secs(20))
        .await
        .expect("relay exits");
    let relay = start_relay_with(dir.path(), &toml, &[]).await;
    let common = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--relay".into(),
            relay.url.clone(),
            "--relay-ca".into(),
            relay.ca_path.display().to_string(),
            "--admin-key-file".into(),
            admin_file.display().to_string(),
        ]);
        args
    };
    let table = run_to_end(
        &common(&["list", "-g", "rg-test", "-o", "table"]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(table.status.success(), "{}", describe(&table));
    let stdout = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["Name", "Location", "ResourceGroup"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["prod", "eastus", "rg-test"]
    );

    let shown = run_to_end(
        &common(&["show", "-n", "prod", "-g", "rg-test"]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(shown.status.success(), "{}", describe(&shown));
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("json");
    for field in [
        "agentPublicKeyCertificate",
        "agentVersion",
        "connectivityStatus",
        "distribution",
        "id",
        "identity",
        "infrastructure",
        "kubernetesVersion",
        "lastConnectivityTime",
        "location",
        "name",
        "provisioningState",
        "resourceGroup",
        "systemData",
        "tags",
        "totalCoreCount",
        "totalNodeCount",
        "type",
    ] {
        assert!(json.get(field).is_some(), "show lacks {field}: {json}");
    }
    assert_eq!(json["connectivityStatus"], "Connecting");
    assert_eq!(json["type"], "microsoft.kubernetes/connectedclusters");

    let id_only = run_to_end(
        &common(&[
            "show", "-n", "prod", "-g", "rg-test", "--query", "id", "-o", "tsv",
        ]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&id_only.stdout).trim(),
        id("prod").path()
    );

    // A real JMESPath filter and multiselect, as `az ... --query` takes them.
    let filtered = run_to_end(
        &common(&[
            "list",
            "-g",
            "rg-test",
            "--query",
            "[?connectivityStatus=='Connecting'].{Name:name, Group:resourceGroup}",
        ]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(filtered.status.success(), "{}", describe(&filtered));
    let filtered: serde_json::Value =
        serde_json::from_slice(&filtered.stdout).expect("--query output is JSON");
    assert_eq!(
        filtered,
        serde_json::json!([{"Name": "prod", "Group": "rg-test"}])
    );
    let bad = run_to_end(
        &common(&["list", "-g", "rg-test", "--query", "[?name=="]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not a JMESPath expression"),
        "{}",
        describe(&bad)
    );

    let missing = run_to_end(
        &common(&["show", "-n", "nope", "-g", "rg-test"]),
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("was not found"),
        "{}",
        describe(&missing)
    );
}

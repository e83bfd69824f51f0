//! Issue 4, onboarding: `connect` installs the agent and registers the cluster, re-runs change
//! nothing, refuses a name registered to another cluster, waits for the rollout within its
//! timeout, writes the manifests for GitOps without touching anything; `disconnect` removes it
//! all; `token create` prints a service-account token kubectl can use. Relay hardening: a
//! namespace the user already had is refused without `--use-existing-namespace` and, with it,
//! left alone with everything in it by connect and disconnect; `token create` needs an explicit
//! role and issues expiring tokens unless `--no-expiry`. Against the stand-in apiserver and
//! the in-process relay with its registry, and the real binary.

use crate::support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use clusterconnect::arm::client::{ManagementAuth, ManagementClient};
use clusterconnect::arm::{ClusterId, ClusterRequest, RequestProperties, DEFAULT_SUBSCRIPTION};
use clusterconnect::entra::http::HttpClient;
use clusterconnect::onboard::install::{self, ConnectError, ConnectRequest};
use clusterconnect::onboard::keys::AgentKey;
use clusterconnect::onboard::remove;
use clusterconnect::onboard::token::{self, TokenSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use serde_json::Value;

use support::check::{describe, text};
use support::processes::run_to_end;
use support::tunnel::{Relay, ADMIN_KEY};
use support::{kubectl_available, kubectl_ok, ApiServer};

const GROUP: &str = "rg-onboard";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const NS: &str = "azure-arc";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/azure-arc/deployments/clusterconnect-agent";
const SECRET: &str = "/api/v1/namespaces/azure-arc/secrets/clusterconnect-agent";
const SERVICE_ACCOUNT: &str = "/api/v1/namespaces/azure-arc/serviceaccounts/clusterconnect-agent";
const NAMESPACE: &str = "/api/v1/namespaces/azure-arc";
const CLUSTER_ROLE: &str = "/apis/rbac.authorization.k8s.io/v1/clusterroles/clusterconnect-agent";
const CLUSTER_ROLE_BINDING: &str =
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/clusterconnect-agent";
const ALL_OBJECTS: [&str; 6] = [
    NAMESPACE,
    SERVICE_ACCOUNT,
    CLUSTER_ROLE,
    CLUSTER_ROLE_BINDING,
    SECRET,
    DEPLOYMENT,
];

/// A stand-in cluster, a relay with a registry, and clients for both.
struct Setup {
    api: ApiServer,
    relay: Relay,
    registry: ManagementClient,
    kube: kube::Client,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let api = ApiServer::start().await;
        let relay = Relay::start_with_registry(&dir.path().join("registry.redb"), None).await;
        let http = HttpClient::new(
            relay.client_tls.clone(),
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        let registry = ManagementClient::new(
            relay.address(),
            http,
            Some(ManagementAuth::Key(support::tunnel::admin_key())),
        );
        let kube = kube_client(&api, &api.token()).await;
        Setup {
            api,
            relay,
            registry,
            kube,
            dir,
        }
    }

    fn relay_url(&self) -> String {
        format!("wss://127.0.0.1:{}", self.relay.addr.port())
    }

    fn request(&self, name: &str) -> ConnectRequest {
        ConnectRequest {
            id: ClusterId::new(DEFAULT_SUBSCRIPTION, GROUP, name).unwrap(),
            location: "westeurope".into(),
            tags: BTreeMap::from([("env".to_string(), "test".to_string())]),
            distribution: "openshift".into(),
            infrastructure: "azure".into(),
            namespace: NS.into(),
            use_existing_namespace: false,
            image: "registry.example/clusterconnect:test".into(),
            tenants: vec![TENANT.into()],
            relay_ca: Some(self.relay.ca_pem.clone()),
            cloud: None,
            timeout: Duration::from_secs(20),
        }
    }

    async fn connect(
        &self,
        request: &ConnectRequest,
    ) -> Result<clusterconnect::arm::ConnectedCluster, ConnectError> {
        install::connect(&self.kube, &self.registry, request, &mut |_| {}).await
    }

    /// Files the binary needs: the kubeconfig, the admin key and the relay's CA.
    fn files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let kubeconfig = self
            .api
            .write_kubeconfig(self.dir.path(), &self.api.token());
        let admin = self.dir.path().join("admin.key");
        std::fs::write(
            &admin,
            format!("SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}"),
        )
        .unwrap();
        let ca = self.dir.path().join("relay-ca.crt");
        std::fs::write(&ca, &self.relay.ca_pem).unwrap();
        (kubeconfig, admin, ca)
    }

    fn resource_versions(&self) -> Vec<String> {
        ALL_OBJECTS
            .iter()
            .map(|p| {
                let o = self.api.object(p).unwrap_or_else(|| panic!("{p} exists"));
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }
}

async fn kube_client(api: &ApiServer, token: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&api.kubeconfig_yaml(token)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn decoded(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {secret}"));
    text(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
}

fn args_of(deployment: &Value) -> Vec<String> {
    serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_installs_the_agent_registers_the_cluster_and_a_rerun_changes_nothing() {
    let s = Setup::start().await;
    let request = s.request("edge");
    let cluster = s.connect(&request).await.unwrap();
    assert_eq!(cluster.id, request.id.path());
    assert_eq!(cluster.location, "westeurope");
    assert_eq!(cluster.tags["env"], "test");
    assert_eq!(
        cluster.properties.distribution.as_deref(),
        Some("openshift")
    );
    assert_eq!(cluster.properties.infrastructure.as_deref(), Some("azure"));

    for path in ALL_OBJECTS {
        let o = s
            .api
            .object(path)
            .unwrap_or_else(|| panic!("{path} was created"));
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "clusterconnect",
            "{path}"
        );
        assert_eq!(
            labels["app.kubernetes.io/name"], "clusterconnect-agent",
            "{path}"
        );
        let annotations = &o["metadata"]["annotations"];
        assert_eq!(
            annotations["clusterconnect.io/created-by"], "connect",
            "{path}"
        );
        assert_eq!(
            annotations["clusterconnect.io/cluster-id"],
            request.id.path(),
            "{path}"
        );
    }

    // Only impersonation, SubjectAccessReviews and reading nodes.
    let role = s.api.object(CLUSTER_ROLE).unwrap();
    let rules: Vec<(Vec<String>, Vec<String>, Vec<String>)> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |f: &str| serde_json::from_value(r[f].clone()).unwrap();
            (list("apiGroups"), list("resources"), list("verbs"))
        })
        .collect();
    let s_ = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        vec![
            (
                s_(&[""]),
                s_(&["users", "groups", "serviceaccounts"]),
                s_(&["impersonate"])
            ),
            (
                s_(&["authentication.k8s.io"]),
                s_(&["*"]),
                s_(&["impersonate"])
            ),
            (
                s_(&["authorization.k8s.io"]),
                s_(&["subjectaccessreviews"]),
                s_(&["create"])
            ),
            (
                s_(&["authentication.k8s.io"]),
                s_(&["tokenreviews"]),
                s_(&["create"])
            ),
            (s_(&[""]), s_(&["nodes"]), s_(&["get", "list"])),
        ]
    );
    let binding = s.api.object(CLUSTER_ROLE_BINDING).unwrap();
    assert_eq!(binding["roleRef"]["name"], "clusterconnect-agent");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["namespace"], NS);

    // The Secret: the registry's Listen key, the key whose public half is registered, the CA.
    let secret = s.api.object(SECRET).unwrap();
    let hc = request.id.hybrid_connection();
    assert!(decoded(&secret, "listen.key")
        .starts_with(&format!("SharedAccessKeyName={hc}-listen;SharedAccessKey=")));
    let agent_key = AgentKey::from_pem(&decoded(&secret, "agent.key"), "test").unwrap();
    assert!(agent_key.matches(&cluster.properties.agent_public_key_certificate));
    assert_eq!(decoded(&secret, "relay-ca.crt"), s.relay.ca_pem);

    // The Deployment: two replicas, restricted security, probes, the mounted Secret, the args.
    let d = s.api.object(DEPLOYMENT).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "clusterconnect-agent");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["securityContext"].get("runAsUser").is_none());
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/clusterconnect:test");
    assert!(c["securityContext"].get("runAsUser").is_none());
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["cpu"].is_string());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 8081);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8081);
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/clusterconnect");
    assert_eq!(c["volumeMounts"][0]["readOnly"], true);
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "clusterconnect-agent"
    );
    let expected: Vec<String> = [
        "agent",
        "--relay",
        &s.relay_url(),
        "--connection",
        &hc,
        "--key-file",
        "/etc/clusterconnect/listen.key",
        "--cluster-id",
        &request.id.path(),
        "--agent-key-file",
        "/etc/clusterconnect/agent.key",
        "--relay-ca",
        "/etc/clusterconnect/relay-ca.crt",
        "--tenant",
        TENANT,
        "--health-addr=$(POD_IP):8081",
        "--metrics-addr=$(POD_IP):9090",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    assert_eq!(args_of(&d), expected);
    // The health port on the pod IP only, which Kubernetes puts in $(POD_IP).
    assert_eq!(
        c["env"],
        serde_json::json!([{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}])
    );
    assert_eq!(d["status"]["availableReplicas"], 2);

    // Again: the same registration and key, no object rewritten.
    let before = s.resource_versions();
    let again = s.connect(&request).await.unwrap();
    assert_eq!(
        again.properties.agent_public_key_certificate,
        cluster.properties.agent_public_key_certificate
    );
    assert_eq!(again.system_data.created_at, cluster.system_data.created_at);
    assert_eq!(s.resource_versions(), before);
    let listed = s
        .registry
        .list(DEFAULT_SUBSCRIPTION, Some(GROUP))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
}

/// Registers `id` directly with `key`'s public half, as another connect would have.
async fn register_with(s: &Setup, id: &ClusterId, key: &AgentKey) {
    s.registry
        .put(
            id,
            &ClusterRequest {
                location: "eastus".into(),
                tags: BTreeMap::new(),
                properties: RequestProperties {
                    agent_public_key_certificate: key.public_certificate().into(),
                    distribution: None,
                    infrastructure: None,
                },
            },
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_stopped_after_registering_can_be_run_again() {
    let s = Setup::start().await;
    let request = s.request("half-done");
    // The registration exists, its key is lost with the process that made it.
    let lost = AgentKey::generate().unwrap();
    register_with(&s, &request.id, &lost).await;
    let cluster = s.connect(&request).await.expect("the re-run completes");
    assert_ne!(
        cluster.properties.agent_public_key_certificate,
        lost.public_certificate()
    );
    assert!(s.api.object(NAMESPACE).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_registered_with_another_agent_key_is_refused_and_nothing_is_installed() {
    let s = Setup::start().await;
    let request = s.request("taken");
    let other = AgentKey::generate().unwrap();
    register_with(&s, &request.id, &other).await;
    // While no agent has ever reported, the name would be taken over (a half-finished
    // connect); an agent that reported makes it another cluster's.
    let status = clusterconnect::arm::AgentStatus {
        agent_version: "0.1.0".into(),
        kubernetes_version: None,
        total_node_count: None,
        total_core_count: None,
    };
    let key = clusterconnect::agent::heartbeat::load_key(other.private_pem().expose()).unwrap();
    s.registry
        .report_status(&request.id, &status, &key)
        .await
        .unwrap();
    let err = s.connect(&request).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::RegisteredElsewhere { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("already registered to another cluster"),
        "{message}"
    );
    assert!(
        message.contains("clusterconnect disconnect -n taken -g rg-onboard"),
        "{message}"
    );
    assert!(s.api.object(NAMESPACE).is_none());
    assert!(s.api.object(CLUSTER_ROLE).is_none());
    let kept = s.registry.get(&request.id).await.unwrap().unwrap();
    assert_eq!(
        kept.properties.agent_public_key_certificate,
        other.public_certificate()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_removes_every_object_and_the_registration_and_may_run_twice() {
    let s = Setup::start().await;
    let request = s.request("short-lived");
    s.connect(&request).await.unwrap();
    let removal = remove::disconnect(
        &s.kube,
        &s.registry,
        &request.id,
        NS,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(!removal.still_terminating);
    let removed = removal.removed.join("\n");
    for what in [
        "namespace/azure-arc",
        "clusterrolebinding/clusterconnect-agent",
        "clusterrole/clusterconnect-agent",
        "registration ",
    ] {
        assert!(removed.contains(what), "{what} in {removed}");
    }
    for path in ALL_OBJECTS {
        assert!(s.api.object(path).is_none(), "{path} is gone");
    }
    assert!(s.registry.get(&request.id).await.unwrap().is_none());
    let again = remove::disconnect(
        &s.kube,
        &s.registry,
        &request.id,
        NS,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(again.removed.is_empty(), "{:?}", again.removed);
}

/// The user's namespace `team-a` with their own ConfigMap and Deployment in it.
const USER_NS: &str = "team-a";
const USER_NAMESPACE: &str = "/api/v1/namespaces/team-a";
const USER_CONFIG_MAP: &str = "/api/v1/namespaces/team-a/configmaps/settings";
const USER_DEPLOYMENT: &str = "/apis/apps/v1/namespaces/team-a/deployments/web";
const OURS_IN_USER_NS: [&str; 3] = [
    "/api/v1/namespaces/team-a/serviceaccounts/clusterconnect-agent",
    "/api/v1/namespaces/team-a/secrets/clusterconnect-agent",
    "/apis/apps/v1/namespaces/team-a/deployments/clusterconnect-agent",
];

fn seed_user_namespace(api: &ApiServer, name: &str, labels: Value) {
    api.create_object(
        "/api/v1/namespaces",
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}),
    );
    api.create_object(
        &format!("/api/v1/namespaces/{name}/configmaps"),
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": name}, "data": {"mode": "prod"}}),
    );
    let selector = serde_json::json!({"app": "web"});
    api.create_object(
        &format!("/apis/apps/v1/namespaces/{name}/deployments"),
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": selector},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_the_user_had_is_refused_without_the_flag_and_left_alone_with_it() {
    let s = Setup::start().await;
    seed_user_namespace(&s.api, USER_NS, serde_json::json!({"team": "a"}));
    let namespace_before = s.api.object(USER_NAMESPACE).unwrap();
    let mut request = s.request("shared-ns");
    request.namespace = USER_NS.into();

    // Without the flag: refused before anything is registered or written.
    let err = s.connect(&request).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::ExistingNamespace { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("namespace team-a"), "{message}");
    assert!(message.contains("--use-existing-namespace"), "{message}");
    assert!(s.registry.get(&request.id).await.unwrap().is_none());
    assert!(s.api.object(CLUSTER_ROLE).is_none());
    for path in OURS_IN_USER_NS {
        assert!(s.api.object(path).is_none(), "{path} was not created");
    }
    assert_eq!(s.api.object(USER_NAMESPACE).unwrap(), namespace_before);

    // With it: the agent goes in, the namespace is not labelled or annotated as ours, and a
    // re-run rewrites nothing.
    request.use_existing_namespace = true;
    let mut progress = Vec::new();
    install::connect(&s.kube, &s.registry, &request, &mut |line| {
        progress.push(line.to_string())
    })
    .await
    .unwrap();
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("namespace/team-a exists and is not clusterconnect's")),
        "{progress:?}"
    );
    assert_eq!(s.api.object(USER_NAMESPACE).unwrap(), namespace_before);
    for path in OURS_IN_USER_NS
        .iter()
        .chain(&[CLUSTER_ROLE, CLUSTER_ROLE_BINDING])
    {
        let o = s
            .api
            .object(path)
            .unwrap_or_else(|| panic!("{path} exists"));
        assert_eq!(
            o["metadata"]["annotations"]["clusterconnect.io/created-by"], "connect",
            "{path}"
        );
    }
    let versions = |s: &Setup| -> Vec<Value> {
        OURS_IN_USER_NS
            .iter()
            .chain(&[USER_NAMESPACE, CLUSTER_ROLE, CLUSTER_ROLE_BINDING])
            .map(|p| s.api.object(p).unwrap()["metadata"]["resourceVersion"].clone())
            .collect()
    };
    let before = versions(&s);
    s.connect(&request).await.unwrap();
    assert_eq!(versions(&s), before, "a re-run changes nothing");

    // disconnect takes out only what connect made: the namespace and the user's objects stay.
    let removal = remove::disconnect(
        &s.kube,
        &s.registry,
        &request.id,
        USER_NS,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let removed = removal.removed.join("\n");
    for what in [
        "deployment/clusterconnect-agent",
        "secret/clusterconnect-agent",
        "serviceaccount/clusterconnect-agent",
        "clusterrolebinding/clusterconnect-agent",
        "clusterrole/clusterconnect-agent",
        "registration ",
    ] {
        assert!(removed.contains(what), "{what} in {removed}");
    }
    assert!(!removed.contains("namespace/"), "{removed}");
    assert!(
        removal
            .kept
            .iter()
            .any(|k| k.starts_with("namespace/team-a")),
        "{:?}",
        removal.kept
    );
    for path in OURS_IN_USER_NS
        .iter()
        .chain(&[CLUSTER_ROLE, CLUSTER_ROLE_BINDING])
    {
        assert!(s.api.object(path).is_none(), "{path} is gone");
    }
    let namespace_after = s.api.object(USER_NAMESPACE).expect("the namespace stays");
    assert!(namespace_after["metadata"]["deletionTimestamp"].is_null());
    assert_eq!(
        namespace_after["metadata"]["labels"],
        namespace_before["metadata"]["labels"]
    );
    assert_eq!(
        s.api.object(USER_CONFIG_MAP).unwrap()["data"]["mode"],
        "prod"
    );
    assert!(s.api.object(USER_DEPLOYMENT).is_some());
    assert!(s.registry.get(&request.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_leaves_an_object_without_this_registrations_annotations() {
    let s = Setup::start().await;
    // A namespace that carries the managed-by label but that connect did not create (someone
    // copied the label, or an older release adopted it): not ours either.
    seed_user_namespace(
        &s.api,
        USER_NS,
        serde_json::json!({"app.kubernetes.io/managed-by": "clusterconnect"}),
    );
    let mut request = s.request("labelled-ns");
    request.namespace = USER_NS.into();
    let err = s.connect(&request).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::ExistingNamespace { .. }),
        "{err:?}"
    );

    // In our own namespace, a ClusterRoleBinding of the agent's name but without our
    // annotations (made by hand) is kept by disconnect; everything else goes.
    let request = s.request("own-ns");
    s.connect(&request).await.unwrap();
    let bindings: kube::Api<ClusterRoleBinding> = kube::Api::all(s.kube.clone());
    let mut binding = bindings.get("clusterconnect-agent").await.unwrap();
    binding.metadata.annotations = None;
    bindings
        .replace("clusterconnect-agent", &Default::default(), &binding)
        .await
        .unwrap();
    let removal = remove::disconnect(
        &s.kube,
        &s.registry,
        &request.id,
        NS,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        removal
            .removed
            .iter()
            .any(|r| r.starts_with("namespace/azure-arc")),
        "{:?}",
        removal.removed
    );
    assert!(
        removal
            .kept
            .iter()
            .any(|k| k.starts_with("clusterrolebinding/clusterconnect-agent")),
        "{:?}",
        removal.kept
    );
    assert!(s.api.object(CLUSTER_ROLE_BINDING).is_some());
    assert!(s.api.object(CLUSTER_ROLE).is_none());
    assert!(s.api.object(NAMESPACE).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rollout_ends_within_the_timeout_naming_the_deployment() {
    let s = Setup::start().await;
    s.api.set_rollouts_stall(true);
    let mut request = s.request("stuck");
    request.timeout = Duration::from_secs(2);
    let mut progress = Vec::new();
    let started = Instant::now();
    let err = install::connect(&s.kube, &s.registry, &request, &mut |line| {
        progress.push(line.to_string())
    })
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    // Generous for a loaded machine: only a wait that ignores the 2 s timeout (the default
    // is minutes) fails it.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    let message = err.to_string();
    assert!(
        message.contains("azure-arc/clusterconnect-agent did not become available within 2s"),
        "{message}"
    );
    assert!(
        message.contains("`kubectl -n azure-arc describe deploy/clusterconnect-agent`"),
        "{message}"
    );
    assert!(message.contains("0/2 available"), "{message}");
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("Waiting for the agent rollout: ")),
        "{progress:?}"
    );
}

fn binary_env() -> Vec<(&'static str, &'static OsStr)> {
    Vec::new()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_connects_prints_the_resource_and_dry_run_touches_nothing() {
    let s = Setup::start().await;
    let (kubeconfig, admin, ca) = s.files();
    let relay = s.relay_url();
    let common = [
        "-n",
        "bin-edge",
        "-g",
        GROUP,
        "--relay",
        &relay,
        "--relay-ca",
        path(&ca),
        "--kubeconfig",
        path(&kubeconfig),
        "--distribution",
        "OpenShift",
        "--tags",
        "env=ci",
        "team=platform",
    ];

    // Dry run first: YAML of the six kinds, no keys, and no write reaches the apiserver.
    let mut dry: Vec<&str> = vec!["connect", "--dry-run", "-o", "yaml"];
    dry.extend(common);
    let out = run_to_end(&dry, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let yaml = text(&out.stdout);
    let kinds: Vec<String> = serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            v["kind"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Secret",
            "Deployment"
        ]
    );
    assert!(!yaml.contains("PRIVATE KEY"), "{yaml}");
    assert!(yaml.contains("placeholders"), "{yaml}");
    assert!(yaml.contains("--cluster-id"), "{yaml}");
    // Into a namespace the user has: the namespace is not among the manifests.
    let mut existing: Vec<&str> = vec!["connect", "--dry-run", "--use-existing-namespace"];
    existing.extend(common);
    let out = run_to_end(&existing, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Secret",
            "Deployment"
        ]
    );
    let writes: Vec<String> = s
        .api
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert!(s
        .registry
        .list(DEFAULT_SUBSCRIPTION, None)
        .await
        .unwrap()
        .is_empty());

    let mut connect: Vec<&str> = vec!["connect", "--admin-key-file", path(&admin)];
    connect.extend(common);
    let out = run_to_end(&connect, &binary_env(), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let shown: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    assert_eq!(shown["name"], "bin-edge");
    assert_eq!(shown["resourceGroup"], GROUP);
    assert_eq!(shown["distribution"], "openshift");
    assert_eq!(shown["tags"]["team"], "platform");
    assert_eq!(shown["type"], "microsoft.kubernetes/connectedclusters");
    assert!(shown["agentPublicKeyCertificate"].is_string());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("deployment/clusterconnect-agent created"),
        "{stderr}"
    );
    assert!(stderr.contains("The agent is available"), "{stderr}");
    assert!(!stderr.contains("SharedAccessKey="), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");

    // disconnect through the binary, without a terminal: --yes is required.
    let base = [
        "-n",
        "bin-edge",
        "-g",
        GROUP,
        "--relay",
        &relay,
        "--relay-ca",
        path(&ca),
        "--kubeconfig",
        path(&kubeconfig),
        "--admin-key-file",
        path(&admin),
    ];
    let mut unconfirmed = vec!["disconnect"];
    unconfirmed.extend(base);
    let out = run_to_end(&unconfirmed, &binary_env(), Duration::from_secs(30)).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--yes"), "{}", describe(&out));
    let mut confirmed = vec!["disconnect", "--yes"];
    confirmed.extend(base);
    let out = run_to_end(&confirmed, &binary_env(), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("removed namespace/azure-arc"),
        "{}",
        describe(&out)
    );
    assert!(s.api.object(DEPLOYMENT).is_none());
}

async fn pods_visible_with(api: &ApiServer, token: &str) -> Result<usize, kube::Error> {
    let client = kube_client(api, token).await;
    let pods: kube::Api<Pod> = kube::Api::all(client);
    pods.list(&Default::default()).await.map(|l| l.items.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_a_token_that_lists_pods_and_reruns_without_duplicates() {
    let s = Setup::start().await;
    let (kubeconfig, _, _) = s.files();
    let base = [
        "token",
        "create",
        "--service-account",
        "demo-user",
        "--kubeconfig",
        path(&kubeconfig),
    ];
    // The role is never implied.
    let out = run_to_end(&base, &binary_env(), Duration::from_secs(30)).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--cluster-role"), "{stderr}");
    assert!(
        stderr.contains("choose the role to bind, e.g. --cluster-role view"),
        "{stderr}"
    );
    assert!(s
        .api
        .objects("/api/v1/namespaces/default/serviceaccounts")
        .iter()
        .all(|o| o["metadata"]["name"] != "demo-user"));

    // --no-expiry: the long-lived Secret token, reused by a re-run.
    let mut args = base.to_vec();
    args.extend(["--cluster-role", "cluster-admin", "--no-expiry"]);
    let out = run_to_end(&args, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let token = text(&out.stdout).trim().to_string();
    assert!(
        !token.is_empty() && !token.contains('\n'),
        "{}",
        describe(&out)
    );
    assert!(pods_visible_with(&s.api, &token).await.unwrap() >= 2);
    if kubectl_available() {
        let dir = tempfile::tempdir().unwrap();
        let kc = s.api.write_kubeconfig(dir.path(), &token);
        let listed = kubectl_ok(&kc, &["get", "pods", "-A", "-o", "name"]).await;
        assert!(listed.contains("pod/web-0"), "{listed}");
    }

    let out = run_to_end(&args, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), token, "the same Secret's token");
    let named = |list: &str, name: &str| {
        s.api
            .objects(list)
            .iter()
            .filter(|o| o["metadata"]["name"] == name)
            .count()
    };
    assert_eq!(
        named("/api/v1/namespaces/default/serviceaccounts", "demo-user"),
        1
    );
    assert_eq!(
        named("/api/v1/namespaces/default/secrets", "demo-user-token"),
        1
    );
    let bindings = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings";
    assert_eq!(named(bindings, "demo-user-cluster-admin-binding"), 1);
    let binding = s
        .api
        .object(&format!("{bindings}/demo-user-cluster-admin-binding"))
        .unwrap();
    assert_eq!(binding["subjects"].as_array().unwrap().len(), 1);

    // Without --no-expiry: a TokenRequest for an hour, no Secret.
    let viewer = [
        "token",
        "create",
        "--service-account",
        "reader",
        "--cluster-role",
        "view",
        "--kubeconfig",
        path(&kubeconfig),
    ];
    let out = run_to_end(&viewer, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let expiring = text(&out.stdout).trim().to_string();
    assert!(pods_visible_with(&s.api, &expiring).await.unwrap() >= 2);
    assert_eq!(
        named("/api/v1/namespaces/default/secrets", "reader-token"),
        0
    );
    let requested: Vec<String> = s
        .api
        .requests()
        .iter()
        .filter(|r| {
            r.method == "POST" && r.path_and_query.contains("/serviceaccounts/reader/token")
        })
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(requested.len(), 1, "{requested:?}");
    let out = run_to_end(&viewer, &binary_env(), Duration::from_secs(30)).await;
    assert_ne!(
        text(&out.stdout).trim(),
        expiring,
        "each run issues a new token"
    );
    let mut both = viewer.to_vec();
    both.extend(["--no-expiry", "--duration", "2h"]);
    let out = run_to_end(&both, &binary_env(), Duration::from_secs(30)).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        describe(&out)
    );

    // --duration: a TokenRequest, no Secret; a view-bound account may list but not delete.
    let spec = TokenSpec {
        namespace: "default".into(),
        service_account: "viewer".into(),
        cluster_role: "view".into(),
        duration: Some(Duration::from_secs(3600)),
        timeout: Duration::from_secs(10),
    };
    let short = token::create(&s.kube, &spec).await.unwrap();
    assert_eq!(
        named("/api/v1/namespaces/default/secrets", "viewer-token"),
        0
    );
    assert!(pods_visible_with(&s.api, short.expose()).await.unwrap() >= 2);
    let again = token::create(&s.kube, &spec).await.unwrap();
    assert_ne!(
        again.expose(),
        short.expose(),
        "each TokenRequest is a new token"
    );
    assert_eq!(named(bindings, "viewer-view-binding"), 1);

    let too_short = TokenSpec {
        duration: Some(Duration::from_secs(60)),
        ..spec
    };
    let err = token::create(&s.kube, &too_short)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 10m"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_renew_moves_the_agent_to_a_renewed_key_and_refuses_the_key_in_use() {
    let s = Setup::start().await;
    let request = s.request("rotated");
    s.connect(&request).await.expect("connect");
    let installed = || decoded(&s.api.object(SECRET).unwrap(), "listen.key");
    let before = s.registry.list_keys(&request.id).await.unwrap();
    assert_eq!(installed(), before.primary_connection_string);
    let (kubeconfig, admin, ca) = s.files();
    let relay = s.relay_url();
    let common = [
        "-n",
        "rotated",
        "-g",
        GROUP,
        "--relay",
        &relay,
        "--relay-ca",
        path(&ca),
        "--admin-key-file",
        path(&admin),
        "--kubeconfig",
        path(&kubeconfig),
    ];
    let renew = |key: &'static str| {
        let mut args = vec!["keys", "renew", "--update-agent", "--key", key];
        args.extend(common);
        args
    };

    // The key the agent uses: refused before anything is renewed.
    let out = run_to_end(&renew("primary"), &binary_env(), Duration::from_secs(30)).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("the agent uses the Primary key now"),
        "{}",
        describe(&out)
    );
    let unchanged = s.registry.list_keys(&request.id).await.unwrap();
    assert_eq!(unchanged.primary_key, before.primary_key);
    assert_eq!(unchanged.secondary_key, before.secondary_key);

    // The other key: renewed, and the agent's Secret now holds it.
    let out = run_to_end(&renew("secondary"), &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let renewed = s.registry.list_keys(&request.id).await.unwrap();
    assert_ne!(renewed.secondary_key, before.secondary_key);
    assert_eq!(renewed.primary_key, before.primary_key);
    assert_eq!(printed["secondaryKey"], renewed.secondary_key.as_str());
    assert_eq!(installed(), renewed.secondary_connection_string);

    // Now the primary is free to renew; `keys list` shows what the registry holds.
    let out = run_to_end(&renew("primary"), &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let rotated = s.registry.list_keys(&request.id).await.unwrap();
    assert_ne!(rotated.primary_key, before.primary_key);
    assert_eq!(installed(), rotated.primary_connection_string);
    let mut list = vec!["keys", "list"];
    list.extend(&common[..common.len() - 2]);
    let out = run_to_end(&list, &binary_env(), Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", describe(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["primaryKey"], rotated.primary_key.as_str());
    assert_eq!(listed["secondaryKey"], rotated.secondary_key.as_str());
    // The Send key never leaves the relay, so it cannot go to the agent.
    let out = run_to_end(&renew("send"), &binary_env(), Duration::from_secs(30)).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(text(&out.stderr).contains("never leaves the relay"));
}

/// Arc's onboarding refuses kubeconfigs whose user signs in with an exec plugin (kubelogin,
/// aws, gke-gcloud-auth-plugin); ours runs the plugin as kubectl does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_disconnect_work_with_an_exec_plugin_kubeconfig() {
    let s = Setup::start().await;
    let (_, admin, ca) = s.files();
    let plugin_dir = s.dir.path().join("exec");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let kubeconfig = crate::up::exec_plugin_kubeconfig(&s.api, &plugin_dir, &s.api.token());
    assert!(!std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .contains(&s.api.token()));
    let relay = s.relay_url();
    let base = [
        "-n",
        "by-plugin",
        "-g",
        GROUP,
        "--relay",
        &relay,
        "--relay-ca",
        path(&ca),
        "--kubeconfig",
        path(&kubeconfig),
        "--admin-key-file",
        path(&admin),
    ];
    let mut connect = vec!["connect"];
    connect.extend(base);
    let out = run_to_end(&connect, &binary_env(), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(s.api.object(DEPLOYMENT).is_some());
    let mut disconnect = vec!["disconnect", "--yes"];
    disconnect.extend(base);
    let out = run_to_end(&disconnect, &binary_env(), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(s.api.object(DEPLOYMENT).is_none());
}

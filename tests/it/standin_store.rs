//! The stand-in's object store through real clients: kubectl apply/get/delete/rollout and
//! kube-rs `Api<T>`, the apiserver's error statuses, the simulated deployment and token
//! controllers, and RBAC deciding what a freshly minted service-account token may do.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use support::check::{describe, eventually, text};
use support::{kubectl, kubectl_available, kubectl_ok, ApiServer};

/// A stand-in server plus a kubeconfig for it with the tester's token.
struct Cluster {
    server: ApiServer,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let server = ApiServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = server.write_kubeconfig(dir.path(), &server.token());
        Cluster {
            server,
            kubeconfig,
            dir,
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.kubeconfig, args, &[]).await
    }

    /// [`kubectl_ok`] against this cluster: asserts success, returns stdout.
    async fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_ok(&self.kubeconfig, args).await
    }

    /// A kubeconfig for another token, in its own directory under the cluster's.
    fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("kubeconfig dir");
        self.server.write_kubeconfig(&dir, token)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write manifest");
        path
    }

    /// `kubectl apply -f` of `manifest`. kubectl's typed generators (`create configmap`,
    /// `create namespace`...) send protobuf, which the stand-in does not decode.
    async fn apply(&self, manifest: &str) -> Output {
        let file = self.write("apply.yaml", manifest);
        self.kubectl(&["apply", "-f", path_str(&file)]).await
    }

    async fn client(&self, token: &str) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.server.kubeconfig_yaml(token))
            .expect("kubeconfig parses");
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: demo-agent
  namespace: demo
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: demo-reader
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: demo-reader
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: demo-reader
subjects:
- kind: ServiceAccount
  name: demo-agent
  namespace: demo
---
apiVersion: v1
kind: Secret
metadata:
  name: demo-config
  namespace: demo
stringData:
  relay: wss://relay.example
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      serviceAccountName: demo-agent
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 8080
"#;

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/web";

#[tokio::test]
async fn kubectl_apply_rollout_get_and_delete_a_multi_document_manifest() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    let manifest = c.write("demo.yaml", MANIFEST);
    let stdout = c.kubectl_ok(&["apply", "-f", path_str(&manifest)]).await;
    for line in [
        "namespace/demo created",
        "serviceaccount/demo-agent created",
        "clusterrole.rbac.authorization.k8s.io/demo-reader created",
        "clusterrolebinding.rbac.authorization.k8s.io/demo-reader created",
        "secret/demo-config created",
        "deployment.apps/web created",
    ] {
        assert!(stdout.contains(line), "missing {line:?}: {}", stdout);
    }
    let secret = c
        .server
        .object("/api/v1/namespaces/demo/secrets/demo-config")
        .expect("secret stored");
    assert_eq!(secret["data"]["relay"], "d3NzOi8vcmVsYXkuZXhhbXBsZQ==");
    assert!(secret.get("stringData").is_none());

    let out = c
        .kubectl(&[
            "rollout",
            "status",
            "deployment/web",
            "-n",
            "demo",
            "--timeout=30s",
        ])
        .await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("successfully rolled out"),
        "{}",
        describe(&out)
    );

    let stdout = c
        .kubectl_ok(&["get", "deploy", "web", "-n", "demo", "-o", "json"])
        .await;
    let deployment: Value = serde_json::from_str(&stdout).expect("json");
    let meta = &deployment["metadata"];
    assert!(
        uuid::Uuid::parse_str(meta["uid"].as_str().unwrap()).is_ok(),
        "{meta}"
    );
    let rv: u64 = meta["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(rv > 0 && rv <= c.server.resource_version());
    assert_eq!(meta["generation"], 1);
    assert_eq!(meta["namespace"], "demo");
    assert_eq!(deployment["status"]["availableReplicas"], 2);
    assert_eq!(deployment["status"]["observedGeneration"], 1);

    // A second apply with a new image is a patch: same uid, a new generation.
    let changed = MANIFEST.replace("nginx:1.27", "nginx:1.28");
    let manifest = c.write("demo.yaml", &changed);
    let stdout = c.kubectl_ok(&["apply", "-f", path_str(&manifest)]).await;
    assert!(
        stdout.contains("deployment.apps/web configured")
            && stdout.contains("namespace/demo unchanged"),
        "{stdout}"
    );
    let deployment = c.server.object(DEPLOYMENT).expect("deployment");
    assert_eq!(deployment["metadata"]["uid"], meta["uid"]);
    assert_eq!(deployment["metadata"]["generation"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "nginx:1.28");
    // The strategic merge kept what the patch did not mention.
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    c.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "demo",
        "--timeout=30s",
    ])
    .await;
    let deployment = c.server.object(DEPLOYMENT).expect("deployment");
    assert_eq!(deployment["status"]["observedGeneration"], 2);

    // The namespace comes first in the file and takes its content along a moment after it
    // turns Terminating: on a loaded machine (as on a real cluster) the namespace controller
    // can win the race against the deletes that follow, so those may find nothing to delete.
    c.kubectl_ok(&["delete", "-f", path_str(&manifest), "--ignore-not-found"])
        .await;
    for path in [
        "/api/v1/namespaces/demo",
        "/api/v1/namespaces/demo/serviceaccounts/demo-agent",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/demo-reader",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/demo-reader",
        "/api/v1/namespaces/demo/secrets/demo-config",
        DEPLOYMENT,
    ] {
        assert!(c.server.object(path).is_none(), "{path} left behind");
    }
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    let manifest = c.write("demo.yaml", MANIFEST);
    let stdout = c
        .kubectl_ok(&["apply", "--server-side", "-f", path_str(&manifest)])
        .await;
    assert!(
        stdout.contains("deployment.apps/web serverside-applied"),
        "{stdout}"
    );
    c.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "demo",
        "--timeout=30s",
    ])
    .await;
}

#[tokio::test]
async fn a_stalled_rollout_times_out() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    c.server.set_rollouts_stall(true);
    let manifest = c.write("demo.yaml", MANIFEST);
    c.kubectl_ok(&["apply", "-f", path_str(&manifest)]).await;
    let out = c
        .kubectl(&[
            "rollout",
            "status",
            "deployment/web",
            "-n",
            "demo",
            "--timeout=2s",
        ])
        .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("timed out waiting for the condition"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        c.server.object(DEPLOYMENT).unwrap()["status"]["availableReplicas"],
        0
    );
}

#[tokio::test]
async fn a_stale_update_conflicts_and_a_duplicate_create_already_exists() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    const SETTINGS: &str = "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"settings\"}, \"data\": {\"a\": \"1\"}}";
    let out = c.apply(SETTINGS).await;
    assert!(out.status.success(), "{}", describe(&out));
    let out = c
        .kubectl(&["get", "configmap", "settings", "-o", "json"])
        .await;
    let mut stale: Value = serde_json::from_slice(&out.stdout).expect("json");
    c.kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"2"}}"#,
    ])
    .await;

    stale["data"]["a"] = json!("3");
    let file = c.write("stale.json", &stale.to_string());
    let out = c.kubectl(&["replace", "-f", path_str(&file)]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(
            "Operation cannot be fulfilled on configmaps \"settings\": the object has been modified"
        ),
        "{}",
        describe(&out)
    );
    let stored = c
        .server
        .object("/api/v1/namespaces/default/configmaps/settings")
        .unwrap();
    assert_eq!(stored["data"]["a"], "2");

    // Without a resourceVersion the replace is unconditional.
    stale["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let file = c.write("fresh.json", &stale.to_string());
    c.kubectl_ok(&["replace", "-f", path_str(&file)]).await;

    let file = c.write("settings.json", SETTINGS);
    let out = c.kubectl(&["create", "-f", path_str(&file)]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("configmaps \"settings\" already exists"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    let out = c
        .apply(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: doomed}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: doomed}
data: {k: v}
---
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: doomed}
stringData: {k: v}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa, namespace: doomed}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: doomed}
spec:
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec: {containers: [{name: d, image: nginx}]}
"#,
        )
        .await;
    assert!(out.status.success(), "{}", describe(&out));
    // Creating into a namespace that does not exist is refused.
    let out = c
        .apply("{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"c\", \"namespace\": \"nowhere\"}}")
        .await;
    assert!(
        text(&out.stderr).contains("namespaces \"nowhere\" not found"),
        "{}",
        describe(&out)
    );

    c.kubectl_ok(&["delete", "namespace", "doomed"]).await;
    for kind in ["configmaps", "secrets", "serviceaccounts"] {
        let path = format!("/api/v1/namespaces/doomed/{kind}");
        assert!(c.server.objects(&path).is_empty(), "{path} not empty");
    }
    assert!(c
        .server
        .objects("/apis/apps/v1/namespaces/doomed/deployments")
        .is_empty());
    // Other namespaces keep their objects.
    assert_eq!(c.server.objects("/api/v1/pods").len(), 2);
}

#[tokio::test]
async fn label_and_field_selectors_narrow_lists() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    let names = |out: &Output| -> Vec<String> {
        text(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let query = |selector: &'static str| {
        [
            "get",
            "pods",
            "-A",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]
    };
    let out = c.kubectl(&query("app=web")).await;
    assert_eq!(names(&out), ["web-0"], "{}", describe(&out));
    let out = c.kubectl(&query("app in (web,coredns)")).await;
    assert_eq!(names(&out), ["web-0", "coredns-0"], "{}", describe(&out));
    let out = c.kubectl(&query("app!=web")).await;
    assert_eq!(names(&out), ["coredns-0"], "{}", describe(&out));
    let out = c.kubectl(&query("!app")).await;
    assert!(names(&out).is_empty(), "{}", describe(&out));
    let out = c
        .kubectl(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "metadata.namespace=kube-system",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .await;
    assert_eq!(names(&out), ["coredns-0"], "{}", describe(&out));
    let stdout = c.kubectl_ok(&["get", "nodes"]).await;
    for node in ["node-1", "node-2", "node-3"] {
        let row = stdout.lines().find(|l| l.starts_with(node)).expect("row");
        assert!(row.contains("Ready") && row.contains("v1.32.0"), "{row}");
    }
    let node = c.server.object("/api/v1/nodes/node-2").expect("node");
    assert_eq!(node["status"]["capacity"]["cpu"], "4");
}

const FORBIDDEN_PODS: &str = "pods is forbidden: User \"system:serviceaccount:default:demo-user\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"";

#[tokio::test]
async fn a_token_secret_is_populated_and_its_token_is_authorized_by_bindings() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start().await;
    let manifest = c.write(
        "user.yaml",
        r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: demo-user
---
apiVersion: v1
kind: Secret
metadata:
  name: demo-user-token
  annotations:
    kubernetes.io/service-account.name: demo-user
type: kubernetes.io/service-account-token
"#,
    );
    c.kubectl_ok(&["apply", "-f", path_str(&manifest)]).await;
    let secret_path = "/api/v1/namespaces/default/secrets/demo-user-token";
    eventually("the token controller fills the secret", || {
        c.server
            .object(secret_path)
            .is_some_and(|s| s["data"]["token"].is_string())
    })
    .await;
    let secret = c.server.object(secret_path).unwrap();
    let decode = |field: &str| {
        use base64::Engine;
        let encoded = secret["data"][field].as_str().expect(field);
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(decode("ca.crt"), c.server.ca_pem());
    assert_eq!(decode("namespace"), "default");
    let token = decode("token");
    let user_config = c.kubeconfig_for("demo-user", &token);

    let stdout = kubectl_ok(&user_config, &["auth", "whoami", "-o", "json"]).await;
    let review: Value = serde_json::from_str(&stdout).unwrap();
    let info = &review["status"]["userInfo"];
    assert_eq!(info["username"], "system:serviceaccount:default:demo-user");
    assert_eq!(
        info["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:default",
            "system:authenticated"
        ])
    );

    let out = kubectl(&user_config, &["get", "pods"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(FORBIDDEN_PODS),
        "{}",
        describe(&out)
    );

    let out = c
        .apply(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: demo-user-view, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: ServiceAccount, name: demo-user, namespace: default}]
"#,
        )
        .await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = kubectl_ok(&user_config, &["get", "pods"]).await;
    assert!(stdout.contains("web-0"), "{stdout}");
    // The binding is namespaced and view does not cover secrets.
    let out = kubectl(&user_config, &["get", "pods", "-n", "kube-system"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let out = kubectl(&user_config, &["get", "secrets"], &[]).await;
    assert!(
        text(&out.stderr).contains("cannot list resource \"secrets\""),
        "{}",
        describe(&out)
    );

    // Deleting the account revokes its tokens.
    c.kubectl_ok(&["delete", "serviceaccount", "demo-user"])
        .await;
    let out = kubectl(&user_config, &["get", "pods"], &[]).await;
    assert!(
        text(&out.stderr).contains("You must be logged in to the server"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn kube_rs_token_request_mints_a_token_for_the_account() {
    let c = Cluster::start().await;
    let admin = c.client(&c.server.token()).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 600},
    }))
    .unwrap();
    let missing = accounts
        .create_token_request("nobody", &PostParams::default(), &request)
        .await
        .expect_err("no such account");
    match missing {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.message, "serviceaccounts \"nobody\" not found");
        }
        other => panic!("unexpected {other:?}"),
    }

    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "robot"}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("create account");
    let issued = accounts
        .create_token_request("robot", &PostParams::default(), &request)
        .await
        .expect("token request");
    let token = issued.status.and_then(|s| s.token).expect("a token");
    assert!(!token.is_empty());

    let robot = c.client(&token).await;
    let pods: Api<Pod> = Api::namespaced(robot, "default");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert_eq!(status.reason, "Forbidden");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    c.server
        .grant_cluster_admin("ServiceAccount", "default/robot");
    let listed = pods.list(&ListParams::default()).await.expect("list pods");
    assert_eq!(listed.items.len(), 1);

    accounts
        .delete("robot", &DeleteParams::default())
        .await
        .expect("delete account");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_rs_creates_gets_applies_and_deletes_a_deployment() {
    let c = Cluster::start().await;
    let client = c.client(&c.server.token()).await;
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "agent", "labels": {"app": "agent"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
            },
        },
    }))
    .unwrap();
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());

    match deployments
        .create(&PostParams::default(), &deployment)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (409, "AlreadyExists")
            );
            assert_eq!(status.message, "deployments.apps \"agent\" already exists");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    match deployments.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
            assert_eq!(status.message, "deployments.apps \"missing\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    let mut nameless = deployment.clone();
    nameless.metadata.name = None;
    match deployments.create(&PostParams::default(), &nameless).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
            assert!(
                status.message.contains("metadata.name: Required value"),
                "{}",
                status.message
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // The controller reports the rollout shortly after.
    let ready = async {
        loop {
            let d = deployments.get("agent").await.expect("get");
            if d.status.as_ref().and_then(|s| s.available_replicas) == Some(1) {
                return d;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let ready = tokio::time::timeout(std::time::Duration::from_secs(10), ready)
        .await
        .expect("rolled out");
    let conditions = ready.status.unwrap().conditions.unwrap();
    assert!(conditions
        .iter()
        .any(|c| c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("NewReplicaSetAvailable")));

    let applied = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "agent"},
        "spec": {"replicas": 3},
    });
    let params = PatchParams::apply("clusterconnect").force();
    let patched = deployments
        .patch("agent", &params, &Patch::Apply(&applied))
        .await
        .expect("apply");
    assert_eq!(patched.spec.replicas, Some(3));
    assert_eq!(patched.metadata.generation, Some(2));
    let template = &patched.spec.template;
    assert_eq!(
        template.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("agent:1")
    );

    // Server-side apply of an absent object creates it.
    let mut fresh = applied.clone();
    fresh["metadata"]["name"] = json!("fresh");
    fresh["spec"] = serde_json::to_value(&deployment.spec).unwrap();
    deployments
        .patch("fresh", &params, &Patch::Apply(&fresh))
        .await
        .expect("apply creates");
    assert!(c
        .server
        .object("/apis/apps/v1/namespaces/default/deployments/fresh")
        .is_some());

    deployments
        .delete("agent", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(c
        .server
        .object("/apis/apps/v1/namespaces/default/deployments/agent")
        .is_none());
    let names: Vec<String> = c
        .server
        .objects("/apis/apps/v1/deployments")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["fresh"]);
}

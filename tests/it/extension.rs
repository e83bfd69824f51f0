//! Issue 18: the Key Vault Secrets Provider as a cluster extension. The real binary's
//! `extension create|show|update|list|delete` against a relay with its registry and the
//! stand-in apiserver; the controller the Deployment describes, run as the kubelet would run
//! it (its own arguments, its service account's token, two replicas and a Lease), against the
//! Key Vault and Entra stand-ins; SecretProviderClasses applied with the real kubectl.

use crate::support;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clusterconnect::arm::client::{ManagementAuth, ManagementClient};
use clusterconnect::arm::{ClusterId, ClusterRequest, RequestProperties, DEFAULT_SUBSCRIPTION};
use clusterconnect::entra::http::HttpClient;
use clusterconnect::onboard::keys::AgentKey;
use serde_json::{json, Value};

use support::check::{describe, text};
use support::entra::Entra;
use support::keyvault::KeyVault;
use support::processes::{run_to_end, spawn, Process};
use support::tunnel::{Relay, ADMIN_KEY};
use support::{kubectl, kubectl_available, kubectl_ok, ApiServer};

const GROUP: &str = "rg-ext";
const CLUSTER: &str = "edge-ext";
const NAME: &str = "akvsecretsprovider";
const NS: &str = "apps";
const APP: &str = "66666666-0000-0000-0000-0000000000e1";
const APP_OID: &str = "e1000000-0000-0000-0000-0000000000e1";
const APP_SECRET: &str = "sp-secret-of-the-extension";
const DEPLOYMENT: &str =
    "/apis/apps/v1/namespaces/kube-system/deployments/clusterconnect-akv-controller";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/clusterconnect-akv-controller";
const SECRET: &str = "/api/v1/namespaces/apps/secrets/demo";
const CLASS_PATH: &str =
    "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/apps/secretproviderclasses/akvprovider-demo";
const STATUS_PATH: &str =
    "/apis/clusterconnect.io/v1/namespaces/apps/secretsyncstatuses/akvprovider-demo";
const SPC_CRD: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/secretproviderclasses.secrets-store.csi.x-k8s.io";

/// The Arc docs' class, with the service principal's secrets-store-creds in its namespace.
const CLASS: &str = r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: akvprovider-demo
  namespace: apps
spec:
  provider: azure
  secretObjects:
  - secretName: demo
    type: Opaque
    labels:
      app: demo
    data:
    - objectName: DemoSecret
      key: password
  parameters:
    usePodIdentity: "false"
    keyvaultName: contoso-kv
    objects: |
      array:
        - |
          objectName: DemoSecret
          objectType: secret
    tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47
"#;

pub struct World {
    pub registry: ManagementClient,
    pub entra: Entra,
    pub vault: KeyVault,
    pub api: ApiServer,
    pub relay: Relay,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub admin: PathBuf,
    pub relay_ca: PathBuf,
    pub bundle: PathBuf,
}

impl World {
    pub async fn start() -> World {
        let entra = Entra::start().await;
        entra.add_app_secret(APP, APP_SECRET, APP_OID);
        let vault = KeyVault::start(&entra).await;
        let api = ApiServer::start().await;
        api.create_object("/api/v1/namespaces", json!({"metadata": {"name": NS}}));
        let dir = tempfile::tempdir().unwrap();
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
        let id = ClusterId::new(DEFAULT_SUBSCRIPTION, GROUP, CLUSTER).unwrap();
        let key = AgentKey::generate().unwrap();
        registry
            .put(
                &id,
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
        let kubeconfig = api.write_kubeconfig(dir.path(), &api.token());
        let admin = dir.path().join("admin.key");
        std::fs::write(
            &admin,
            format!("SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}"),
        )
        .unwrap();
        let relay_ca = dir.path().join("relay-ca.crt");
        std::fs::write(&relay_ca, &relay.ca_pem).unwrap();
        let bundle = vault.write_ca_bundle(&entra, dir.path());
        World {
            registry,
            entra,
            vault,
            api,
            relay,
            dir,
            kubeconfig,
            admin,
            relay_ca,
            bundle,
        }
    }

    fn relay_url(&self) -> String {
        format!("wss://127.0.0.1:{}", self.relay.addr.port())
    }

    /// `extension <command> -c -g [--cluster-type] <args>` with the registry and kubeconfig.
    pub async fn extension(&self, command: &str, args: &[&str]) -> std::process::Output {
        let relay = self.relay_url();
        let mut all: Vec<&str> = vec![
            "extension",
            command,
            "-c",
            CLUSTER,
            "-g",
            GROUP,
            "--cluster-type",
            "connectedClusters",
            "--relay",
            &relay,
            "--relay-ca",
            self.relay_ca.to_str().unwrap(),
            "--admin-key-file",
            self.admin.to_str().unwrap(),
        ];
        if command != "list" {
            all.extend(["--kubeconfig", self.kubeconfig.to_str().unwrap()]);
        }
        all.extend(args);
        run_to_end(&all, &[], Duration::from_secs(60)).await
    }

    /// Runs the controller as the Deployment's pods would: its container's arguments, a token
    /// of its service account, `POD_NAME`; the vault name mapped to the stand-in's URL.
    pub async fn start_controller(&self, pod: &str) -> Process {
        let deployment = self
            .api
            .object(DEPLOYMENT)
            .expect("the controller Deployment");
        let args: Vec<String> = serde_json::from_value(
            deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
        )
        .unwrap();
        let token = self.service_account_token().await;
        let dir = self.dir.path().join(pod);
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = self.api.write_kubeconfig(&dir, token.trim());
        let mut full: Vec<OsString> = args.iter().map(OsString::from).collect();
        full.extend(
            [
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--vault-url",
                &format!("contoso-kv={}", self.vault.url()),
                "--log-format",
                "json",
            ]
            .map(OsString::from),
        );
        let host = self.entra.authority_host();
        spawn(
            &full,
            &[
                ("SSL_CERT_FILE", self.bundle.as_os_str()),
                ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
                ("POD_NAME", OsStr::new(pod)),
                ("RUST_LOG", OsStr::new("info,clusterconnect=debug")),
            ],
        )
    }

    /// A TokenRequest for the controller's service account (kubectl's `create token` speaks
    /// protobuf, which the stand-in does not).
    async fn service_account_token(&self) -> String {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client, "kube-system");
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
        let answer: Value = api
            .create_subresource(
                "token",
                "clusterconnect-akv-controller",
                &Default::default(),
                &request,
            )
            .await
            .expect("a token for the controller's service account");
        answer["status"]["token"].as_str().unwrap().to_string()
    }

    /// Applies the class with kubectl.
    pub async fn apply_class(&self, yaml: &str) {
        let file = self.dir.path().join("spc.yaml");
        std::fs::write(&file, yaml).unwrap();
        kubectl_ok(&self.kubeconfig, &["apply", "-f", file.to_str().unwrap()]).await;
    }
}

fn data(secret: &Value, key: &str) -> String {
    use base64::Engine;
    let b64 = secret["data"][key].as_str().unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default(),
    )
    .unwrap_or_default()
}

/// Polls `check` every 100 ms until it holds or `within` passes; returns how long it took.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

fn json_out(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", describe(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(out)))
}

fn secret_value(api: &ApiServer) -> Option<String> {
    api.object(SECRET).map(|s| data(&s, "password"))
}

fn events(api: &ApiServer, reason: &str) -> Vec<Value> {
    api.objects("/api/v1/namespaces/apps/events")
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

fn leader(api: &ApiServer) -> Option<String> {
    api.object(LEASE)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
        .filter(|h| !h.is_empty())
}

fn put_credentials(api: &ApiServer) {
    api.create_object(
        "/api/v1/namespaces/apps/secrets",
        json!({
            "metadata": {"name": "secrets-store-creds", "labels": {"secrets-store.csi.k8s.io/used": "true"}},
            "stringData": {"clientid": APP, "clientsecret": APP_SECRET},
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extension_syncs_rotates_removes_and_heals() {
    if !kubectl_available() {
        return;
    }
    let w = World::start().await;
    w.vault.set_secret("DemoSecret", "first-value");
    put_credentials(&w.api);

    // Bad input is refused with a message, before anything is recorded or installed.
    let out = w
        .extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--configuration-settings",
                "secrets-store-csi-driver.enableSecretRotaton=true",
            ],
        )
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown configuration setting"),
        "{}",
        describe(&out)
    );
    assert!(w.api.object(DEPLOYMENT).is_none());

    let out = w
        .extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--configuration-settings",
                "secrets-store-csi-driver.enableSecretRotation=true",
                "secrets-store-csi-driver.rotationPollInterval=2s",
                "--configuration-settings",
                "secrets-store-csi-driver.syncSecret.enabled=true",
                "--timeout",
                "30s",
            ],
        )
        .await;
    let created = json_out(&out);
    let id = created["id"].as_str().unwrap();
    assert!(
        id.ends_with(&format!(
            "/resourceGroups/{GROUP}/providers/Microsoft.Kubernetes/connectedClusters/{CLUSTER}/providers/Microsoft.KubernetesConfiguration/extensions/{NAME}"
        )),
        "{id}"
    );
    assert_eq!(created["name"], NAME);
    assert_eq!(
        created["type"],
        "Microsoft.KubernetesConfiguration/extensions"
    );
    assert_eq!(
        created["extensionType"],
        "Microsoft.AzureKeyVaultSecretsProvider"
    );
    assert_eq!(created["provisioningState"], "Succeeded", "{created}");
    assert_eq!(
        created["scope"]["cluster"]["releaseNamespace"],
        "kube-system"
    );
    assert_eq!(
        created["configurationSettings"]["secrets-store-csi-driver.syncSecret.enabled"],
        "true"
    );
    assert!(
        created["statuses"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{created}"
    );
    assert!(created["errorInfo"].is_null());
    assert_eq!(created["systemData"]["createdByType"], "Key");
    assert_eq!(created["resourceGroup"], GROUP);
    assert!(
        w.api.object(SPC_CRD).is_some(),
        "the SecretProviderClass CRD"
    );
    let deployment = w.api.object(DEPLOYMENT).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);

    // One instance per cluster.
    let out = w
        .extension(
            "create",
            &[
                "-n",
                "another",
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
            ],
        )
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("only one instance"),
        "{}",
        describe(&out)
    );

    // Two replicas, as the kubelet would run them: one leads.
    let mut controllers = vec![
        w.start_controller("controller-0").await,
        w.start_controller("controller-1").await,
    ];
    eventually(Duration::from_secs(20), "a leader", || {
        leader(&w.api).is_some()
    })
    .await;

    // kubectl apply a class: its Secret appears, whole, with a finalizer on the class.
    w.apply_class(CLASS).await;
    eventually(Duration::from_secs(20), "the Secret", || {
        secret_value(&w.api).as_deref() == Some("first-value")
    })
    .await;
    let secret = w.api.object(SECRET).unwrap();
    assert_eq!(secret["metadata"]["labels"]["app"], "demo");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "clusterconnect"
    );
    let class = w.api.object(CLASS_PATH).unwrap();
    assert!(
        class["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "clusterconnect.io/secret-sync"),
        "{class}"
    );
    eventually(Duration::from_secs(10), "a Synced status", || {
        w.api
            .object(STATUS_PATH)
            .is_some_and(|s| s["status"]["phase"] == "Synced")
    })
    .await;
    assert!(!events(&w.api, "SecretSynced").is_empty());
    // The status is readable with kubectl.
    let shown = kubectl_ok(
        &w.kubeconfig,
        &[
            "-n",
            NS,
            "get",
            "secretsyncstatuses",
            "akvprovider-demo",
            "-o",
            "jsonpath={.status.phase}",
        ],
    )
    .await;
    assert_eq!(shown, "Synced");

    // Rotation: a new version in Key Vault reaches the Secret within the interval (2 s).
    w.vault.set_secret("DemoSecret", "second-value");
    let took = eventually(Duration::from_secs(10), "the rotated value", || {
        secret_value(&w.api).as_deref() == Some("second-value")
    })
    .await;
    assert!(took < Duration::from_secs(6), "rotation took {took:?}");
    eventually(Duration::from_secs(5), "a SecretRotated event", || {
        !events(&w.api, "SecretRotated").is_empty()
    })
    .await;

    // Key Vault refusing: the last good content stays, and the status says so.
    w.vault.deny("DemoSecret");
    eventually(Duration::from_secs(10), "a Degraded status", || {
        w.api
            .object(STATUS_PATH)
            .is_some_and(|s| s["status"]["phase"] == "Degraded")
    })
    .await;
    assert_eq!(secret_value(&w.api).as_deref(), Some("second-value"));
    assert!(!events(&w.api, "KeptLastGoodContent").is_empty());
    w.vault.allow("DemoSecret");

    // The leader stops (SIGTERM hands the Lease back): the other replica carries on.
    let before = leader(&w.api).unwrap();
    let (index, other) = if before == "controller-0" {
        (0, "controller-1")
    } else {
        (1, "controller-0")
    };
    controllers[index].terminate();
    controllers[index]
        .wait(Duration::from_secs(10))
        .await
        .expect("the leader exits");
    eventually(Duration::from_secs(10), "the other replica leads", || {
        leader(&w.api).as_deref() == Some(other)
    })
    .await;
    w.vault.set_secret("DemoSecret", "third-value");
    eventually(
        Duration::from_secs(15),
        "rotation by the new leader",
        || secret_value(&w.api).as_deref() == Some("third-value"),
    )
    .await;

    // Deleting the class removes its Secret (kubectl waits for the finalizer).
    kubectl_ok(
        &w.kubeconfig,
        &[
            "-n",
            NS,
            "delete",
            "secretproviderclass",
            "akvprovider-demo",
        ],
    )
    .await;
    assert!(w.api.object(CLASS_PATH).is_none());
    assert!(
        w.api.object(SECRET).is_none(),
        "the synced Secret goes with its class"
    );
    assert!(w.api.object(STATUS_PATH).is_none());
    assert!(w
        .api
        .object("/api/v1/namespaces/apps/secrets/secrets-store-creds")
        .is_some());

    // Drift: the controller Deployment deleted is reported by show, and update restores it.
    kubectl_ok(
        &w.kubeconfig,
        &[
            "-n",
            "kube-system",
            "delete",
            "deployment",
            "clusterconnect-akv-controller",
        ],
    )
    .await;
    let shown = json_out(&w.extension("show", &["-n", NAME]).await);
    assert_eq!(shown["provisioningState"], "Failed", "{shown}");
    let messages: Vec<&str> = shown["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("Deployment kube-system/clusterconnect-akv-controller is missing")),
        "{messages:?}"
    );
    assert!(shown["errorInfo"]["message"]
        .as_str()
        .unwrap()
        .contains("missing"));
    let listed = w.extension("list", &["-o", "table"]).await;
    assert!(listed.status.success(), "{}", describe(&listed));
    assert!(
        text(&listed.stdout).contains("Failed"),
        "{}",
        describe(&listed)
    );
    let updated = json_out(
        &w.extension("update", &["-n", NAME, "--timeout", "30s"])
            .await,
    );
    assert_eq!(updated["provisioningState"], "Succeeded", "{updated}");
    assert!(w.api.object(DEPLOYMENT).is_some());
    // create again with the same name restores too, and keeps the settings it is given.
    kubectl_ok(
        &w.kubeconfig,
        &[
            "delete",
            "clusterrolebinding",
            "clusterconnect-akv-controller",
        ],
    )
    .await;
    let shown = json_out(&w.extension("show", &["-n", NAME]).await);
    assert_eq!(shown["provisioningState"], "Failed", "{shown}");
    let again = json_out(
        &w.extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--configuration-settings",
                "secrets-store-csi-driver.enableSecretRotation=true",
                "secrets-store-csi-driver.rotationPollInterval=2s",
                "secrets-store-csi-driver.syncSecret.enabled=true",
                "--timeout",
                "30s",
            ],
        )
        .await,
    );
    assert_eq!(again["provisioningState"], "Succeeded", "{again}");
    assert_eq!(
        again["systemData"]["createdAt"],
        created["systemData"]["createdAt"]
    );
    assert!(w
        .api
        .object(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/clusterconnect-akv-controller"
        )
        .is_some());
    let query = w
        .extension(
            "show",
            &["-n", NAME, "--query", "provisioningState", "-o", "yaml"],
        )
        .await;
    assert!(query.status.success(), "{}", describe(&query));
    assert_eq!(text(&query.stdout).trim(), "Succeeded");

    // A class synced again, then the extension deleted (its pods stop, as the kubelet would
    // stop them): the class loses the finalizer nobody would remove, and keeps its Secret.
    w.apply_class(CLASS).await;
    eventually(Duration::from_secs(20), "the Secret again", || {
        secret_value(&w.api).is_some()
            && w.api
                .object(CLASS_PATH)
                .is_some_and(|c| !c["metadata"]["finalizers"].is_null())
    })
    .await;
    let remaining = &mut controllers[1 - index];
    remaining.terminate();
    remaining
        .wait(Duration::from_secs(10))
        .await
        .expect("the controller exits");

    // delete: the controller's objects go, the CRD stays, the resource is gone.
    let out = w.extension("delete", &["-n", NAME, "--yes"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let class = w.api.object(CLASS_PATH).expect("the class stays");
    assert!(
        class["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty()),
        "{class}"
    );
    assert!(secret_value(&w.api).is_some(), "the synced Secret stays");
    assert!(w.api.object(DEPLOYMENT).is_none());
    assert!(w
        .api
        .object("/apis/rbac.authorization.k8s.io/v1/clusterroles/clusterconnect-akv-controller")
        .is_none());
    assert!(w.api.object(SPC_CRD).is_some(), "the CRD is kept");
    let out = w.extension("show", &["-n", NAME]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        describe(&out)
    );

    // Nothing secret in any log.
    for process in &controllers {
        let log = process.output();
        for value in ["first-value", "second-value", "third-value", APP_SECRET] {
            assert!(!log.contains(value), "{value} in a controller log:\n{log}");
        }
    }
}

/// kubectl's answer when the class's namespace lacks a credentials Secret and the pod has no
/// identity: the failure is reported on the class, and no Secret is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_that_cannot_sign_in_is_reported_and_writes_nothing() {
    if !kubectl_available() {
        return;
    }
    let w = World::start().await;
    w.vault.set_secret("DemoSecret", "value");
    let out = w
        .extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--configuration-settings",
                "secrets-store-csi-driver.syncSecret.enabled=true",
                "--timeout",
                "30s",
            ],
        )
        .await;
    json_out(&out);
    let controller = w.start_controller("controller-0").await;
    eventually(Duration::from_secs(20), "a leader", || {
        leader(&w.api).is_some()
    })
    .await;
    // Unlabelled credentials are ignored (with a warning), as the upstream driver requires.
    w.api.create_object(
        "/api/v1/namespaces/apps/secrets",
        json!({"metadata": {"name": "secrets-store-creds"}, "stringData": {"clientid": APP, "clientsecret": APP_SECRET}}),
    );
    w.apply_class(CLASS).await;
    eventually(Duration::from_secs(30), "a Failed status", || {
        w.api
            .object(STATUS_PATH)
            .is_some_and(|s| s["status"]["phase"] == "Failed")
    })
    .await;
    assert!(!events(&w.api, "CredentialsSecretNotLabelled").is_empty());
    assert!(!events(&w.api, "SyncFailed").is_empty());
    // Not the pod's own identity instead: the class did not opt in to it.
    let status = w.api.object(STATUS_PATH).unwrap();
    let message = status["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("secrets-store-creds") && message.contains("useVMManagedIdentity"),
        "{message}"
    );
    assert!(
        w.api.object(SECRET).is_none(),
        "no Secret without its content"
    );
    let out = kubectl(
        &w.kubeconfig,
        &["-n", NS, "get", "events", "-o", "json"],
        &[],
    )
    .await;
    assert!(
        text(&out.stdout).contains("SyncFailed"),
        "{}",
        describe(&out)
    );

    // Labelled: a retry (backing off from 5 s) signs in with it and the Secret appears.
    kubectl_ok(
        &w.kubeconfig,
        &[
            "-n",
            NS,
            "label",
            "secret",
            "secrets-store-creds",
            "secrets-store.csi.k8s.io/used=true",
        ],
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the Secret after the label",
        || secret_value(&w.api).as_deref() == Some("value"),
    )
    .await;

    // A Secret built from two objects, one of which Key Vault does not have: never written
    // with the other alone.
    let partial = CLASS
        .replace("name: akvprovider-demo", "name: partial-demo")
        .replace("secretName: demo", "secretName: partial")
        .replace(
            "      key: password\n",
            "      key: password\n    - objectName: Missing\n      key: other\n",
        )
        .replace(
            "          objectType: secret\n",
            "          objectType: secret\n        - |\n          objectName: Missing\n          objectType: secret\n",
        );
    assert!(
        partial.contains("objectName: Missing\n          objectType"),
        "{partial}"
    );
    w.apply_class(&partial).await;
    eventually(Duration::from_secs(20), "partial-demo Failed", || {
        w.api
            .object("/apis/clusterconnect.io/v1/namespaces/apps/secretsyncstatuses/partial-demo")
            .is_some_and(|s| {
                s["status"]["phase"] == "Failed"
                    && s["status"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("Missing")
            })
    })
    .await;
    assert!(w
        .api
        .object("/api/v1/namespaces/apps/secrets/partial")
        .is_none());

    // Another class naming the same secretName: refused, and deleting it leaves the Secret of
    // the class that owns it.
    let rival = CLASS.replace("name: akvprovider-demo", "name: rival-demo");
    w.apply_class(&rival).await;
    eventually(Duration::from_secs(20), "rival-demo Failed", || {
        w.api
            .object("/apis/clusterconnect.io/v1/namespaces/apps/secretsyncstatuses/rival-demo")
            .is_some_and(|s| {
                s["status"]["phase"] == "Failed"
                    && s["status"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("belongs to SecretProviderClass apps/akvprovider-demo")
            })
    })
    .await;
    kubectl_ok(
        &w.kubeconfig,
        &["-n", NS, "delete", "secretproviderclass", "rival-demo"],
    )
    .await;
    assert_eq!(
        secret_value(&w.api).as_deref(),
        Some("value"),
        "the owner's Secret stays"
    );
    drop(controller);
}

/// One unary gRPC call over the unix socket, as the driver's grpc-go client makes it:
/// HTTP/2, `application/grpc`, a length-prefixed message, the status in the trailers.
async fn grpc_call(
    socket: &std::path::Path,
    method: &str,
    message: &[u8],
) -> (u32, String, Vec<u8>) {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the socket");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            clusterconnect::extension::proto::frame(message),
        )))
        .unwrap();
    let response = sender.send_request(request).await.expect("a response");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let collected = response.into_body().collect().await.expect("the body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let code: u32 = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("grpc-status");
    let text = trailers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = collected.to_bytes();
    let message = if body.is_empty() {
        Vec::new()
    } else {
        clusterconnect::extension::proto::unframe(&body)
            .unwrap()
            .to_vec()
    };
    (code, text, message)
}

/// `csi.enabled=true` installs the provider DaemonSet (and only then); the provider it runs
/// answers the driver's `Version` and `Mount` on its socket with the class's objects as files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csi_provider_answers_version_and_mount_with_the_files() {
    use clusterconnect::extension::proto::{
        MountRequest, MountResponse, VersionRequest, VersionResponse, MOUNT_PATH, VERSION_PATH,
    };
    let w = World::start().await;
    let v1 = w.vault.set_secret("DemoSecret", "mounted-value");
    w.vault.set_secret("other", "6869"); // hex for "hi"
    const DAEMON_SET: &str =
        "/apis/apps/v1/namespaces/kube-system/daemonsets/clusterconnect-akv-provider";
    let created = json_out(
        &w.extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--timeout",
                "30s",
            ],
        )
        .await,
    );
    assert_eq!(created["provisioningState"], "Succeeded");
    assert!(
        w.api.object(DAEMON_SET).is_none(),
        "no provider without csi.enabled"
    );
    let updated = json_out(
        &w.extension(
            "update",
            &[
                "-n",
                NAME,
                "--configuration-settings",
                "csi.enabled=true",
                "--timeout",
                "30s",
            ],
        )
        .await,
    );
    assert_eq!(updated["configurationSettings"]["csi.enabled"], "true");
    let ds = w.api.object(DAEMON_SET).expect("the provider DaemonSet");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    assert_eq!(args[..2], ["extension".to_string(), "provider".to_string()]);
    assert!(
        args.contains(&"--socket=/provider/azure.sock".to_string()),
        "{args:?}"
    );
    assert_eq!(
        ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"],
        "/etc/kubernetes/secrets-store-csi-providers"
    );

    // The provider, with the socket somewhere this test may write.
    let socket = w.dir.path().join("azure.sock");
    let host = w.entra.authority_host();
    let vault_url = format!("contoso-kv={}", w.vault.url());
    let provider = spawn(
        &[
            OsStr::new(&args[0]),
            OsStr::new(&args[1]),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--vault-url"),
            OsStr::new(&vault_url),
            OsStr::new("--log-format"),
            OsStr::new("json"),
        ],
        &[
            ("SSL_CERT_FILE", w.bundle.as_os_str()),
            ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
        ],
    );
    eventually(Duration::from_secs(20), "the provider socket", || {
        socket.exists()
    })
    .await;

    let (code, _, message) = grpc_call(
        &socket,
        VERSION_PATH,
        &VersionRequest {
            version: "v1.4.0".into(),
        }
        .encode(),
    )
    .await;
    assert_eq!(code, 0);
    let version = VersionResponse::decode(&message).unwrap();
    assert_eq!(version.runtime_name, "clusterconnect-akv-provider");
    assert_eq!(version.version, "v1alpha1");

    // What the driver sends for a pod: the class's parameters and the pod's attributes, the
    // nodePublishSecretRef Secret's data, the file mode.
    let objects = "array:\n  - |\n    objectName: DemoSecret\n    objectType: secret\n  - |\n    objectName: other\n    objectType: secret\n    objectAlias: greeting\n    objectEncoding: hex\n";
    let attributes = json!({
        "keyvaultName": "contoso-kv",
        "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "objects": objects,
        "usePodIdentity": "false",
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "apps",
        "csi.storage.k8s.io/serviceAccount.name": "default",
    });
    let secrets = json!({"clientid": APP, "clientsecret": APP_SECRET});
    let request = MountRequest {
        attributes: attributes.to_string(),
        secrets: secrets.to_string(),
        target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/secrets-store-inline/mount"
            .into(),
        permission: "420".into(),
        current_object_version: vec![],
    };
    let (code, text_message, message) = grpc_call(&socket, MOUNT_PATH, &request.encode()).await;
    assert_eq!(code, 0, "{text_message}");
    let response = MountResponse::decode(&message).unwrap();
    let files: BTreeMap<&str, (&[u8], i32)> = response
        .files
        .iter()
        .map(|f| (f.path.as_str(), (f.contents.as_slice(), f.mode)))
        .collect();
    assert_eq!(
        files.get("DemoSecret"),
        Some(&(&b"mounted-value"[..], 420)),
        "{response:?}"
    );
    assert_eq!(
        files.get("greeting"),
        Some(&(&b"hi"[..], 420)),
        "{response:?}"
    );
    assert_eq!(response.files.len(), 2);
    let demo = response
        .object_version
        .iter()
        .find(|o| o.id == "secret/DemoSecret")
        .expect("DemoSecret's version");
    assert_eq!(demo.version, v1);

    // Bad input: an error status naming the problem, no files, no crash.
    let bad = MountRequest {
        attributes: "not json".into(),
        ..request.clone()
    };
    let (code, text_message, _) = grpc_call(&socket, MOUNT_PATH, &bad.encode()).await;
    assert_eq!(code, 3, "INVALID_ARGUMENT");
    assert!(text_message.contains("attributes"), "{text_message}");
    let wrong = MountRequest {
        secrets: json!({"clientid": APP, "clientsecret": "wrong"}).to_string(),
        ..request.clone()
    };
    let (code, _, message) = grpc_call(&socket, MOUNT_PATH, &wrong.encode()).await;
    assert_ne!(code, 0);
    assert!(message.is_empty());
    let (code, _, _) = grpc_call(&socket, "/v1alpha1.CSIDriverProvider/Unmount", &[]).await;
    assert_eq!(code, 12, "UNIMPLEMENTED");
    // Still serving after all that.
    let (code, _, _) = grpc_call(&socket, VERSION_PATH, &[]).await;
    assert_eq!(code, 0);

    let log = provider.output();
    for value in ["mounted-value", APP_SECRET] {
        assert!(!log.contains(value), "{value} in the provider log:\n{log}");
    }

    // csi.enabled=false again: the DaemonSet goes.
    json_out(
        &w.extension(
            "update",
            &[
                "-n",
                NAME,
                "--configuration-settings",
                "csi.enabled=false",
                "--timeout",
                "30s",
            ],
        )
        .await,
    );
    assert!(w.api.object(DAEMON_SET).is_none());
}

/// The registry on its own: one extension per cluster, only the Key Vault provider's type,
/// names checked, protected settings never kept, 404 for an extension that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_keeps_one_extension_per_cluster_of_the_one_type() {
    use clusterconnect::arm::{ExtensionProperties, ExtensionRequest};
    let w = World::start().await;
    let id = ClusterId::new(DEFAULT_SUBSCRIPTION, GROUP, CLUSTER).unwrap();
    let request = |kind: &str| ExtensionRequest {
        properties: ExtensionProperties {
            extension_type: kind.into(),
            configuration_settings: BTreeMap::from([(
                "csi.enabled".to_string(),
                "false".to_string(),
            )]),
            configuration_protected_settings: BTreeMap::from([(
                "token".to_string(),
                "hush".to_string(),
            )]),
            ..ExtensionProperties::default()
        },
    };
    let created = w
        .registry
        .put_extension(
            &id,
            "akv",
            &request("microsoft.azurekeyvaultsecretsprovider"),
        )
        .await
        .unwrap();
    assert_eq!(
        created.properties.extension_type,
        "Microsoft.AzureKeyVaultSecretsProvider"
    );
    assert_eq!(
        created.properties.scope.cluster.release_namespace,
        "kube-system"
    );
    assert!(created
        .properties
        .configuration_protected_settings
        .is_empty());
    let err = w
        .registry
        .put_extension(
            &id,
            "second",
            &request("Microsoft.AzureKeyVaultSecretsProvider"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("only one instance"), "{err}");
    let err = w
        .registry
        .put_extension(&id, "akv", &request("Microsoft.Flux"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let err = w
        .registry
        .put_extension(
            &id,
            "Bad_Name",
            &request("Microsoft.AzureKeyVaultSecretsProvider"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(w
        .registry
        .get_extension(&id, "second")
        .await
        .unwrap()
        .is_none());
    assert_eq!(w.registry.list_extensions(&id).await.unwrap().len(), 1);
    assert!(w.registry.delete_extension(&id, "akv").await.unwrap());
    assert!(!w.registry.delete_extension(&id, "akv").await.unwrap());
    assert!(w.registry.list_extensions(&id).await.unwrap().is_empty());
}

/// Rotation for one class through its annotation, with the extension's own rotation off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_annotation_turns_rotation_on_for_that_class() {
    if !kubectl_available() {
        return;
    }
    let w = World::start().await;
    w.vault.set_secret("DemoSecret", "before");
    put_credentials(&w.api);
    json_out(
        &w.extension(
            "create",
            &[
                "-n",
                NAME,
                "--extension-type",
                "Microsoft.AzureKeyVaultSecretsProvider",
                "--configuration-settings",
                "secrets-store-csi-driver.syncSecret.enabled=true",
                "--timeout",
                "30s",
            ],
        )
        .await,
    );
    let _controller = w.start_controller("controller-0").await;
    eventually(Duration::from_secs(20), "a leader", || {
        leader(&w.api).is_some()
    })
    .await;
    let annotated = CLASS.replace(
        "  namespace: apps\n",
        "  namespace: apps\n  annotations:\n    clusterconnect.io/rotation-poll-interval: 1s\n",
    );
    assert_ne!(annotated, CLASS);
    w.apply_class(&annotated).await;
    eventually(Duration::from_secs(20), "the Secret", || {
        secret_value(&w.api).as_deref() == Some("before")
    })
    .await;
    w.vault.set_secret("DemoSecret", "after");
    let took = eventually(Duration::from_secs(10), "the rotated value", || {
        secret_value(&w.api).as_deref() == Some("after")
    })
    .await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Without the annotation (and rotation off) the class is not polled any more.
    w.apply_class(CLASS).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.vault.set_secret("DemoSecret", "unseen");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(secret_value(&w.api).as_deref(), Some("after"));
}

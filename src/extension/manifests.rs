//! What `extension create` installs: the upstream SecretProviderClass CRD (only when the
//! cluster has none), the CRD of the controller's own status objects, the controller's
//! ServiceAccount with least-privilege RBAC, its Deployment (two replicas, one leader through a
//! Lease, the restricted pod security profile), and with `csi.enabled=true` the CSI provider
//! DaemonSet. Every object carries the `managed-by` label and the ownership annotations, so
//! `delete` removes exactly these (and never the CRDs, as Arc's documentation says).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::onboard::manifests::{CLUSTER_ID_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL};

pub const CONTROLLER_NAME: &str = "clusterconnect-akv-controller";
pub const PROVIDER_NAME: &str = "clusterconnect-akv-provider";
/// Whose objects these are: the annotation `connect` uses, with this value.
pub const CREATED_BY_ANNOTATION: &str = crate::onboard::manifests::CREATED_BY_ANNOTATION;
pub const CREATED_BY: &str = "extension";
pub const EXTENSION_ANNOTATION: &str = "clusterconnect.io/extension";

pub const SPC_GROUP: &str = "secrets-store.csi.x-k8s.io";
pub const SPC_CRD: &str = "secretproviderclasses.secrets-store.csi.x-k8s.io";
pub const STATUS_GROUP: &str = "clusterconnect.io";
pub const STATUS_KIND: &str = "SecretSyncStatus";
pub const STATUS_PLURAL: &str = "secretsyncstatuses";
pub const STATUS_CRD: &str = "secretsyncstatuses.clusterconnect.io";
/// Where the CSI driver looks for provider sockets on each node (upstream's default).
pub const PROVIDER_DIR: &str = "/etc/kubernetes/secrets-store-csi-providers";
/// The socket's name: the driver dials `<dir>/<provider>.sock` for `provider: azure`.
pub const PROVIDER_SOCKET: &str = "azure.sock";
pub const REPLICAS: i32 = 2;

/// What the manifests depend on.
#[derive(Clone, Debug)]
pub struct ExtensionSpec {
    pub name: String,
    pub namespace: String,
    pub cluster_id: String,
    pub image: String,
    pub sync: bool,
    pub rotation: bool,
    pub interval: std::time::Duration,
    pub csi: bool,
}

/// Everything, in the order it is applied.
#[derive(Clone, Debug)]
pub struct Manifests {
    /// Applied only when absent, never deleted.
    pub crds: Vec<CustomResourceDefinition>,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub deployment: Deployment,
    pub provider: Option<(ServiceAccount, DaemonSet)>,
}

/// The static shapes below always fit their types (a unit test builds every one).
fn typed<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("manifest shapes match their Kubernetes types")
}

fn metadata(spec: &ExtensionSpec, name: &str, namespaced: bool) -> Value {
    let mut meta = json!({
        "name": name,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY, NAME_LABEL: name},
        "annotations": {
            CREATED_BY_ANNOTATION: CREATED_BY,
            CLUSTER_ID_ANNOTATION: spec.cluster_id,
            EXTENSION_ANNOTATION: spec.name,
        },
    });
    if namespaced {
        meta["namespace"] = json!(spec.namespace);
    }
    meta
}

/// The controller's command line, as its Deployment runs it.
pub fn controller_args(spec: &ExtensionSpec) -> Vec<String> {
    let mut args = vec![
        "extension".to_string(),
        "controller".to_string(),
        format!("--lease-namespace={}", spec.namespace),
        format!("--lease-name={CONTROLLER_NAME}"),
        format!(
            "--rotation-poll-interval={}",
            humantime::format_duration(spec.interval)
        ),
    ];
    if spec.sync {
        args.push("--sync-secret".into());
    }
    if spec.rotation {
        args.push("--enable-secret-rotation".into());
    }
    args
}

pub fn build(spec: &ExtensionSpec) -> Manifests {
    let sa_subject =
        json!([{"kind": "ServiceAccount", "name": CONTROLLER_NAME, "namespace": spec.namespace}]);
    let cluster_role = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": metadata(spec, CONTROLLER_NAME, false),
        // Classes in every namespace: read them, and add or remove the finalizer (a merge
        // patch). Secrets: read the credentials Secret, write and remove the synced ones (by
        // name, never listed). Events: one per class and reason, read and patched when the
        // same thing is reported again.
        "rules": [
            {"apiGroups": [SPC_GROUP], "resources": ["secretproviderclasses"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update", "delete"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "create", "patch"]},
            {"apiGroups": [STATUS_GROUP], "resources": [STATUS_PLURAL], "verbs": ["get", "create", "update", "delete"]},
        ],
    }));
    let cluster_role_binding = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": metadata(spec, CONTROLLER_NAME, false),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER_NAME},
        "subjects": sa_subject,
    }));
    // The leader Lease lives in the release namespace only.
    let role = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": metadata(spec, CONTROLLER_NAME, true),
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [CONTROLLER_NAME], "verbs": ["get", "update"]},
        ],
    }));
    let role_binding = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": metadata(spec, CONTROLLER_NAME, true),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER_NAME},
        "subjects": sa_subject,
    }));
    Manifests {
        crds: vec![provider_class_crd(), status_crd()],
        service_account: typed(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": metadata(spec, CONTROLLER_NAME, true),
        })),
        cluster_role,
        cluster_role_binding,
        role,
        role_binding,
        deployment: deployment(spec),
        provider: spec.csi.then(|| provider(spec)),
    }
}

/// Non-root, no privilege escalation, every capability dropped, read-only root: the
/// restricted profile's container part.
fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn deployment(spec: &ExtensionSpec) -> Deployment {
    let selector = json!({NAME_LABEL: CONTROLLER_NAME});
    typed(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(spec, CONTROLLER_NAME, true),
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {MANAGED_BY_LABEL: MANAGED_BY, NAME_LABEL: CONTROLLER_NAME}},
                "spec": {
                    "serviceAccountName": CONTROLLER_NAME,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"},
                    }]}},
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [{
                        "name": "controller",
                        "image": spec.image,
                        "args": controller_args(spec),
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "resources": {
                            "requests": {"cpu": "20m", "memory": "32Mi"},
                            "limits": {"cpu": "500m", "memory": "256Mi"},
                        },
                        "securityContext": restricted_container(),
                    }],
                },
            },
        },
    }))
}

/// The provider DaemonSet: like the upstream Azure provider it needs the node's provider
/// directory (hostPath) and root to create its socket there, so it cannot run under the
/// restricted profile; it gets no API access (credentials arrive with each Mount request).
fn provider(spec: &ExtensionSpec) -> (ServiceAccount, DaemonSet) {
    let mut sa: ServiceAccount = typed(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": metadata(spec, PROVIDER_NAME, true),
    }));
    sa.automount_service_account_token = Some(false);
    let selector = json!({NAME_LABEL: PROVIDER_NAME});
    let daemon_set = typed(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": metadata(spec, PROVIDER_NAME, true),
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {MANAGED_BY_LABEL: MANAGED_BY, NAME_LABEL: PROVIDER_NAME}},
                "spec": {
                    "serviceAccountName": PROVIDER_NAME,
                    "automountServiceAccountToken": false,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "priorityClassName": "system-node-critical",
                    "containers": [{
                        "name": "provider",
                        "image": spec.image,
                        "args": ["extension", "provider", format!("--socket=/provider/{PROVIDER_SOCKET}")],
                        "resources": {
                            "requests": {"cpu": "20m", "memory": "32Mi"},
                            "limits": {"cpu": "500m", "memory": "256Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsUser": 0,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "providers", "mountPath": "/provider"}],
                    }],
                    "volumes": [{"name": "providers", "hostPath": {"path": PROVIDER_DIR, "type": "DirectoryOrCreate"}}],
                },
            },
        },
    }));
    (sa, daemon_set)
}

fn string_map() -> Value {
    json!({"type": "object", "additionalProperties": {"type": "string"}})
}

/// The SecretProviderClass schema of the upstream CRD (secrets-store-csi-driver
/// `secrets-store.csi.x-k8s.io_secretproviderclasses.yaml`): v1 stored, v1alpha1 still served.
fn provider_class_crd() -> CustomResourceDefinition {
    let schema = json!({
        "description": "SecretProviderClass is the Schema for the secretproviderclasses API",
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "description": "SecretProviderClassSpec defines the desired state of SecretProviderClass",
                "type": "object",
                "properties": {
                    "parameters": string_map(),
                    "provider": {"description": "Configuration for provider name", "type": "string"},
                    "secretObjects": {"type": "array", "items": {
                        "description": "SecretObject defines the desired state of synced K8s secret objects",
                        "type": "object",
                        "properties": {
                            "annotations": string_map(),
                            "data": {"type": "array", "items": {
                                "type": "object",
                                "properties": {"key": {"type": "string"}, "objectName": {"type": "string"}},
                            }},
                            "labels": string_map(),
                            "secretName": {"type": "string"},
                            "type": {"type": "string"},
                        },
                    }},
                },
            },
            "status": {
                "description": "SecretProviderClassStatus defines the observed state of SecretProviderClass",
                "type": "object",
                "properties": {"byPod": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "namespace": {"type": "string"}},
                }}},
            },
        },
    });
    let version = |name: &str, storage: bool| {
        json!({
            "name": name, "served": true, "storage": storage, "deprecated": !storage,
            "schema": {"openAPIV3Schema": schema},
            "subresources": {"status": {}},
        })
    };
    typed(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {
            "name": SPC_CRD,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        },
        "spec": {
            "group": SPC_GROUP,
            "names": {"kind": "SecretProviderClass", "listKind": "SecretProviderClassList", "plural": "secretproviderclasses", "singular": "secretproviderclass"},
            "scope": "Namespaced",
            "versions": [version("v1", true), version("v1alpha1", false)],
        },
    }))
}

/// The controller's status objects: one per class, same name and namespace, readable with
/// `kubectl get secretsyncstatuses` (the upstream class's status is empty by schema, so a real
/// apiserver drops anything written there).
fn status_crd() -> CustomResourceDefinition {
    typed(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": STATUS_CRD, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "spec": {
            "group": STATUS_GROUP,
            "names": {"kind": STATUS_KIND, "listKind": "SecretSyncStatusList", "plural": STATUS_PLURAL, "singular": "secretsyncstatus", "shortNames": ["syncstatus"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                }}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Last Sync", "type": "date", "jsonPath": ".status.lastSyncTime"},
                    {"name": "Message", "type": "string", "jsonPath": ".status.message"},
                ],
            }],
        },
    }))
}

/// The ownership annotations say this extension installed `object` for this cluster.
pub fn installed_by<K: kube::Resource>(object: &K, cluster_id: &str) -> bool {
    let annotations = object.meta().annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key));
    get(CREATED_BY_ANNOTATION).is_some_and(|v| v == CREATED_BY)
        && get(CLUSTER_ID_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case(cluster_id))
}

/// Labels for a class's status object and the controller's lookups.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(csi: bool) -> ExtensionSpec {
        ExtensionSpec {
            name: "akv".into(),
            namespace: "kube-system".into(),
            cluster_id: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/c".into(),
            image: "example/cc:1".into(),
            sync: true,
            rotation: true,
            interval: std::time::Duration::from_secs(120),
            csi,
        }
    }

    #[test]
    fn the_controller_runs_restricted_with_two_replicas_and_least_privilege() {
        let m = build(&spec(false));
        assert!(m.provider.is_none());
        let d = serde_json::to_value(&m.deployment).unwrap();
        assert_eq!(d["spec"]["replicas"], 2);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        assert!(args.contains(&"--sync-secret".to_string()), "{args:?}");
        assert!(args.contains(&"--rotation-poll-interval=2m".to_string()));
        let rules = serde_json::to_value(&m.cluster_role).unwrap()["rules"].clone();
        for rule in rules.as_array().unwrap() {
            let verbs = rule["verbs"].as_array().unwrap();
            assert!(!verbs.iter().any(|v| v == "*"), "{rule}");
            assert!(!rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "*"));
        }
        assert!(installed_by(&m.deployment, &spec(false).cluster_id));
        assert_eq!(m.crds.len(), 2);
        let (_, ds) = build(&spec(true)).provider.unwrap();
        let ds = serde_json::to_value(&ds).unwrap();
        assert_eq!(
            ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"],
            PROVIDER_DIR
        );
    }
}

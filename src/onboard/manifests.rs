//! The objects `connect` puts in a cluster, as plain data: built from an [`AgentSpec`], applied
//! by the `apply` module, or written out as multi-document YAML for GitOps (`connect --dry-run`).
//!
//! The agent Deployment is made to pass OpenShift's `restricted` (v2) SCC and the `restricted`
//! Pod Security Standard as is: non-root without a fixed uid (the SCC assigns one), no
//! privilege escalation, every capability dropped, the RuntimeDefault seccomp profile and a
//! read-only root filesystem. The ClusterRole grants only what the agent uses.
//!
//! Every object carries the ownership annotations ([`CREATED_BY_ANNOTATION`] and
//! [`CLUSTER_ID_ANNOTATION`]): `disconnect` deletes only what they mark as made by `connect`
//! for that registration. A namespace the user already had is not among the objects at all
//! (see [`AgentSpec::existing_namespace`]): it is used as is, never labelled or annotated.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    Namespace, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret as KubeSecret,
    SecretVolumeSource, SecurityContext, ServiceAccount, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use crate::entra::CloudDefinition;
use crate::secret::Secret;

/// The name of every namespaced object and of the ClusterRole and its binding.
pub const AGENT_NAME: &str = "clusterconnect-agent";
/// Arc's namespace, so `kubectl -n azure-arc` habits carry over.
pub const DEFAULT_NAMESPACE: &str = "azure-arc";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "clusterconnect";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Which registration the objects serve: lets `connect` notice a cluster that is already
/// connected under another name, and `disconnect` a kubeconfig pointing at the wrong cluster.
pub const CLUSTER_ID_ANNOTATION: &str = "clusterconnect.io/cluster-id";
/// Written when `connect` creates an object, with [`CLUSTER_ID_ANNOTATION`]: the proof of
/// ownership `disconnect` asks for before deleting. The managed-by label is not enough: it is a
/// common convention others may set, and older releases stamped it on namespaces they adopted.
pub const CREATED_BY_ANNOTATION: &str = "clusterconnect.io/created-by";
pub const CREATED_BY: &str = "connect";
/// On the pod template: a digest of the agent Secret's content (see [`secret_digest`]).
pub const SECRET_DIGEST_ANNOTATION: &str = "clusterconnect.io/secret-sha256";
/// Where the agent Secret is mounted in the pod.
pub const MOUNT_DIR: &str = "/etc/clusterconnect";
pub const LISTEN_KEY_FILE: &str = "listen.key";
pub const AGENT_KEY_FILE: &str = "agent.key";
pub const RELAY_CA_FILE: &str = "relay-ca.crt";
/// A custom cloud's definition (`--cloud-config`), in the Secret beside the keys.
pub const CLOUD_FILE: &str = "cloud.json";
/// The agent's `--health-addr` default port: /healthz and /readyz.
pub const HEALTH_PORT: i32 = 8081;
/// The agent's `--metrics-addr` port: Prometheus metrics at /metrics, on the pod IP like the
/// health port, and announced to scrapers by the pod's `prometheus.io/*` annotations.
pub const METRICS_PORT: i32 = 9090;
/// The container's environment variable holding the pod IP (downward API), which the agent's
/// `--health-addr` binds to: the kubelet probes the pod IP, and nothing needs the health port
/// on any other address of the pod's network namespace.
pub const POD_IP_ENV: &str = "POD_IP";
/// The pod's termination grace period, above the agent's default drain.
pub const GRACE_SECONDS: i64 = 30;
/// Two agents keep the cluster reachable through a node drain or a rolling update.
pub const REPLICAS: i32 = 2;
/// What `--dry-run` writes instead of key material.
pub const PLACEHOLDER: &str = "<filled in by clusterconnect connect>";

/// The agent image of this release.
pub fn default_image() -> String {
    format!(
        "ghcr.io/clusterconnect/clusterconnect:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Everything the manifests depend on.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub namespace: String,
    pub image: String,
    /// `wss://host[:port]` the agent listens on.
    pub relay: String,
    pub hybrid_connection: String,
    /// The ARM id of the registration, for the agent's signed status reports.
    pub cluster_id: String,
    /// Entra tenants whose users the agent accepts (empty: service-account tokens only).
    pub tenants: Vec<String>,
    /// Whether the Secret carries a CA for the relay (then the agent is told to trust it).
    pub relay_ca: bool,
    /// The tenants' cloud when not the public one: a built-in is named with `--cloud`, a
    /// custom one goes in the Secret as [`CLOUD_FILE`].
    pub cloud: Option<CloudDefinition>,
    /// The namespace exists and is the user's (`connect --use-existing-namespace`): it is not
    /// among the manifests, so nothing labels, annotates or deletes it.
    pub existing_namespace: bool,
}

/// What goes in the agent Secret.
#[derive(Clone, Debug)]
pub enum SecretContent {
    Keys {
        listen_key: Secret,
        agent_key: Secret,
        relay_ca: Option<String>,
    },
    /// For `--dry-run`: placeholders where the keys go.
    Placeholders,
}

/// The installed objects, in the order they are applied.
#[derive(Clone, Debug)]
pub struct Manifests {
    /// `None` when the namespace is the user's ([`AgentSpec::existing_namespace`]).
    pub namespace: Option<Namespace>,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
    pub secret: KubeSecret,
    pub deployment: Deployment,
}

pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (NAME_LABEL.to_string(), AGENT_NAME.to_string()),
    ])
}

/// The ownership annotations every object `connect` creates carries.
pub fn ownership(cluster_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CREATED_BY_ANNOTATION.to_string(), CREATED_BY.to_string()),
        (CLUSTER_ID_ANNOTATION.to_string(), cluster_id.to_string()),
    ])
}

/// Whether `connect` created `object` for the registration `cluster_id` (by its annotations).
pub fn created_for<K: kube::Resource>(object: &K, cluster_id: &str) -> bool {
    let annotations = object.meta().annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key));
    get(CREATED_BY_ANNOTATION).is_some_and(|v| v == CREATED_BY)
        && get(CLUSTER_ID_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case(cluster_id))
}

fn meta(spec: &AgentSpec, name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels()),
        annotations: Some(ownership(&spec.cluster_id)),
        ..ObjectMeta::default()
    }
}

fn strings(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| s.to_string()).collect())
}

pub fn build(spec: &AgentSpec, content: &SecretContent) -> Manifests {
    let ns = spec.namespace.as_str();
    Manifests {
        namespace: (!spec.existing_namespace).then(|| Namespace {
            metadata: meta(spec, ns, None),
            ..Namespace::default()
        }),
        service_account: ServiceAccount {
            metadata: meta(spec, AGENT_NAME, Some(ns)),
            ..ServiceAccount::default()
        },
        cluster_role: cluster_role(spec),
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(spec, AGENT_NAME, None),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: AGENT_NAME.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: AGENT_NAME.into(),
                namespace: Some(ns.to_string()),
                ..Subject::default()
            }]),
        },
        secret: secret(spec, content),
        deployment: deployment(spec, secret_digest(spec, content)),
    }
}

/// A digest of the Secret's content for the pod template, so pods restart when the Secret
/// changes. The agent follows its relay listen key in place (it re-reads the mounted file when
/// its content changes), but reads its status-report key and the relay CA only at start;
/// a restart also drops channels authorized by the old key at once.
fn secret_digest(spec: &AgentSpec, content: &SecretContent) -> Option<String> {
    use sha2::{Digest, Sha256};
    let SecretContent::Keys {
        listen_key,
        agent_key,
        relay_ca,
    } = content
    else {
        return None;
    };
    let mut hash = Sha256::new();
    let cloud = custom_cloud(spec).unwrap_or_default();
    for part in [
        listen_key.expose(),
        agent_key.expose(),
        relay_ca.as_deref().unwrap_or_default(),
        cloud.as_str(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    Some(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Impersonation (users, groups, service accounts, and in `authentication.k8s.io` uids and
/// user extras), SubjectAccessReviews, TokenReviews (the audit log names callers whose tokens
/// the agent passes through), and reading nodes for the status report's counts; nothing else. The agent impersonates an Entra caller (user, groups, extras `oid` and
/// `tid`) and, when a SubjectAccessReview says that caller may, whomever the caller asks to
/// be (`kubectl --as`, `--as-group`, `--as-uid`, `--as-user-extra`); extras can have any key,
/// and RBAC matches `userextras/<key>` only by name or by `*`, hence the wildcard, which
/// covers only the impersonate verb.
fn cluster_role(spec: &AgentSpec) -> ClusterRole {
    ClusterRole {
        metadata: meta(spec, AGENT_NAME, None),
        rules: Some(vec![
            PolicyRule {
                api_groups: strings(&[""]),
                resources: strings(&["users", "groups", "serviceaccounts"]),
                verbs: vec!["impersonate".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: strings(&["authentication.k8s.io"]),
                resources: strings(&["*"]),
                verbs: vec!["impersonate".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: strings(&["authorization.k8s.io"]),
                resources: strings(&["subjectaccessreviews"]),
                verbs: vec!["create".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: strings(&["authentication.k8s.io"]),
                resources: strings(&["tokenreviews"]),
                verbs: vec!["create".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: strings(&[""]),
                resources: strings(&["nodes"]),
                verbs: vec!["get".into(), "list".into()],
                ..PolicyRule::default()
            },
        ]),
        ..ClusterRole::default()
    }
}

/// The custom cloud's file, when the spec names a cloud that is not built in.
fn custom_cloud(spec: &AgentSpec) -> Option<String> {
    let cloud = spec.cloud.as_ref()?;
    match cloud.builtin() {
        Some(_) => None,
        None => serde_json::to_string_pretty(&cloud.to_az_json()).ok(),
    }
}

fn secret(spec: &AgentSpec, content: &SecretContent) -> KubeSecret {
    let mut secret = KubeSecret {
        metadata: meta(spec, AGENT_NAME, Some(&spec.namespace)),
        type_: Some("Opaque".into()),
        ..KubeSecret::default()
    };
    match content {
        SecretContent::Keys {
            listen_key,
            agent_key,
            relay_ca,
        } => {
            let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
            let mut data = BTreeMap::from([
                (LISTEN_KEY_FILE.to_string(), bytes(listen_key.expose())),
                (AGENT_KEY_FILE.to_string(), bytes(agent_key.expose())),
            ]);
            if let Some(ca) = relay_ca {
                data.insert(RELAY_CA_FILE.to_string(), bytes(ca));
            }
            if let Some(cloud) = custom_cloud(spec) {
                data.insert(CLOUD_FILE.to_string(), bytes(&cloud));
            }
            secret.data = Some(data);
        }
        SecretContent::Placeholders => {
            let mut data = BTreeMap::from([
                (LISTEN_KEY_FILE.to_string(), PLACEHOLDER.to_string()),
                (AGENT_KEY_FILE.to_string(), PLACEHOLDER.to_string()),
            ]);
            if spec.relay_ca {
                data.insert(RELAY_CA_FILE.to_string(), PLACEHOLDER.to_string());
            }
            // Not a secret: the cloud's endpoints are printed as they will be installed.
            if let Some(cloud) = custom_cloud(spec) {
                data.insert(CLOUD_FILE.to_string(), cloud);
            }
            secret.string_data = Some(data);
        }
    }
    secret
}

/// The agent's command line inside the pod.
pub fn agent_args(spec: &AgentSpec) -> Vec<String> {
    let file = |name: &str| format!("{MOUNT_DIR}/{name}");
    let mut args = vec![
        "agent".to_string(),
        "--relay".into(),
        spec.relay.clone(),
        "--connection".into(),
        spec.hybrid_connection.clone(),
        "--key-file".into(),
        file(LISTEN_KEY_FILE),
        "--cluster-id".into(),
        spec.cluster_id.clone(),
        "--agent-key-file".into(),
        file(AGENT_KEY_FILE),
    ];
    if spec.relay_ca {
        args.extend(["--relay-ca".into(), file(RELAY_CA_FILE)]);
    }
    for tenant in &spec.tenants {
        args.extend(["--tenant".into(), tenant.clone()]);
    }
    if let Some(cloud) = &spec.cloud {
        match cloud.builtin() {
            Some(builtin) => args.extend(["--cloud".into(), builtin.name().into()]),
            None => args.extend(["--cloud-config".into(), file(CLOUD_FILE)]),
        }
    }
    // Kubernetes expands `$(POD_IP)` from the container's env (see `agent_container`).
    args.push(format!("--health-addr=$({POD_IP_ENV}):{HEALTH_PORT}"));
    args.push(format!("--metrics-addr=$({POD_IP_ENV}):{METRICS_PORT}"));
    args.extend(["--log-format".into(), "json".into()]);
    args
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(HEALTH_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// A named TCP port of a container.
pub(crate) fn tcp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

pub(crate) fn quantities(cpu: &str, memory: &str) -> Option<BTreeMap<String, Quantity>> {
    Some(BTreeMap::from([
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(memory.to_string())),
    ]))
}

/// The agent container: non-root, read-only, every capability dropped, the Secret mounted.
fn agent_container(spec: &AgentSpec) -> Container {
    Container {
        name: "agent".into(),
        image: Some(spec.image.clone()),
        args: Some(agent_args(spec)),
        env: Some(vec![EnvVar {
            name: POD_IP_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            tcp_port("health", HEALTH_PORT),
            tcp_port("metrics", METRICS_PORT),
        ]),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: Some(ResourceRequirements {
            requests: quantities("50m", "64Mi"),
            limits: quantities("500m", "256Mi"),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: strings(&["ALL"]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "credentials".into(),
            mount_path: MOUNT_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// Prefers the two agents on different nodes, without refusing to schedule on one node.
fn spread(selector: &BTreeMap<String, String>) -> PodAntiAffinity {
    PodAntiAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector.clone()),
                    ..LabelSelector::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            },
        }]),
        ..PodAntiAffinity::default()
    }
}

/// The pod: the agent's service account, the restricted security context, the Secret volume.
fn pod_spec(spec: &AgentSpec, selector: &BTreeMap<String, String>) -> PodSpec {
    PodSpec {
        service_account_name: Some(AGENT_NAME.into()),
        // The agent's drain (25 s by default) fits inside it: requests and sessions in flight
        // finish on SIGTERM while new ones go to the other replica.
        termination_grace_period_seconds: Some(GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(spread(selector)),
            ..Affinity::default()
        }),
        containers: vec![agent_container(spec)],
        volumes: Some(vec![Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(AGENT_NAME.into()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
}

/// The Secret's digest (a changed key rolls the pods) and where Prometheus finds the metrics,
/// for scrape configurations that follow the common `prometheus.io/*` annotations.
pub(crate) fn pod_annotations(secret_digest: Option<String>) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    if let Some(d) = secret_digest {
        annotations.insert(SECRET_DIGEST_ANNOTATION.to_string(), d);
    }
    annotations
}

fn deployment(spec: &AgentSpec, secret_digest: Option<String>) -> Deployment {
    let selector = BTreeMap::from([(NAME_LABEL.to_string(), AGENT_NAME.to_string())]);
    Deployment {
        metadata: meta(spec, AGENT_NAME, Some(&spec.namespace)),
        spec: DeploymentSpec {
            replicas: Some(REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    annotations: Some(pod_annotations(secret_digest)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(spec, &selector)),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the {kind} manifest as YAML")]
pub struct YamlError {
    kind: &'static str,
    #[source]
    source: serde_norway::Error,
}

/// The manifests as one multi-document YAML stream, for `kubectl apply -f` or a GitOps repo.
pub fn to_yaml(manifests: &Manifests, placeholders: bool) -> Result<String, YamlError> {
    fn doc<T: serde::Serialize>(kind: &'static str, object: &T) -> Result<String, YamlError> {
        serde_norway::to_string(object).map_err(|source| YamlError { kind, source })
    }
    let mut secret_doc = doc("Secret", &manifests.secret)?;
    if placeholders {
        secret_doc = format!(
            "# The keys below are placeholders: `clusterconnect connect` registers the cluster and\n\
             # fills in the relay Listen key (listen.key), the agent's signing key (agent.key){}.\n\
             # Keep the real Secret out of Git (a sealed or external secret, or let connect write it).\n{secret_doc}",
            if manifests.secret.string_data.as_ref().is_some_and(|d| d.contains_key(RELAY_CA_FILE)) {
                " and the relay CA (relay-ca.crt)"
            } else {
                ""
            }
        );
    }
    let mut docs = Vec::new();
    if let Some(namespace) = &manifests.namespace {
        docs.push(doc("Namespace", namespace)?);
    }
    docs.extend([
        doc("ServiceAccount", &manifests.service_account)?,
        doc("ClusterRole", &manifests.cluster_role)?,
        doc("ClusterRoleBinding", &manifests.cluster_role_binding)?,
        secret_doc,
        doc("Deployment", &manifests.deployment)?,
    ]);
    Ok(docs
        .iter()
        .map(|d| format!("---\n{d}"))
        .collect::<Vec<_>>()
        .join(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentSpec {
        AgentSpec {
            namespace: DEFAULT_NAMESPACE.into(),
            image: default_image(),
            relay: "wss://relay.example".into(),
            hybrid_connection: "cc-0123".into(),
            cluster_id: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/prod".into(),
            tenants: vec!["72f988bf-86f1-41af-91ab-2d7cd011db47".into()],
            relay_ca: true,
            cloud: None,
            existing_namespace: false,
        }
    }

    #[test]
    fn the_agent_accepts_the_command_line_connect_installs() {
        use clap::Parser;
        let args = agent_args(&spec());
        let parsed = crate::cli::Cli::try_parse_from(
            std::iter::once("clusterconnect".to_string()).chain(args),
        );
        let cli =
            parsed.unwrap_or_else(|e| panic!("the agent refuses its own install's args: {e}"));
        assert!(matches!(cli.command, crate::cli::Command::Agent(_)));
    }

    #[test]
    fn the_agent_runs_under_the_restricted_profile_with_its_credentials_mounted() {
        let m = build(&spec(), &SecretContent::Placeholders);
        let d = serde_json::to_value(&m.deployment).unwrap();
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(d["spec"]["replicas"], 2);
        assert!(
            pod["terminationGracePeriodSeconds"].as_i64().unwrap()
                > crate::agent::DRAIN.as_secs() as i64
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        assert!(c["securityContext"].get("runAsUser").is_none());
        assert!(pod["securityContext"].get("runAsUser").is_none());
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], 8081);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        let joined = args.join(" ");
        assert!(joined.starts_with("agent --relay wss://relay.example --connection cc-0123 --key-file /etc/clusterconnect/listen.key --cluster-id /subscriptions/"), "{joined}");
        assert!(joined.contains("--agent-key-file /etc/clusterconnect/agent.key --relay-ca /etc/clusterconnect/relay-ca.crt --tenant 72f988bf"), "{joined}");
        assert!(
            joined.ends_with(
                "--health-addr=$(POD_IP):8081 --metrics-addr=$(POD_IP):9090 --log-format json"
            ),
            "{joined}"
        );
        assert_eq!(c["ports"][1]["name"], "metrics");
        assert_eq!(c["ports"][1]["containerPort"], 9090);
        let annotations = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "9090");
        assert_eq!(
            c["env"],
            serde_json::json!([{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}])
        );
    }

    #[test]
    fn every_object_carries_the_ownership_annotations() {
        let spec = spec();
        let m = build(&spec, &SecretContent::Placeholders);
        let metas = [
            m.namespace.as_ref().map(|n| &n.metadata).unwrap(),
            &m.service_account.metadata,
            &m.cluster_role.metadata,
            &m.cluster_role_binding.metadata,
            &m.secret.metadata,
            &m.deployment.metadata,
        ];
        for meta in metas {
            let annotations = meta.annotations.as_ref().unwrap();
            assert_eq!(annotations[CREATED_BY_ANNOTATION], CREATED_BY, "{meta:?}");
            assert_eq!(
                annotations[CLUSTER_ID_ANNOTATION], spec.cluster_id,
                "{meta:?}"
            );
        }
        assert!(created_for(&m.deployment, &spec.cluster_id.to_uppercase()));
        assert!(!created_for(&m.deployment, "/subscriptions/s/other"));
        let mut unannotated = m.deployment.clone();
        unannotated.metadata.annotations = None;
        assert!(!created_for(&unannotated, &spec.cluster_id));
    }

    #[test]
    fn an_existing_namespace_is_not_among_the_manifests() {
        let spec = AgentSpec {
            existing_namespace: true,
            ..spec()
        };
        let m = build(&spec, &SecretContent::Placeholders);
        assert!(m.namespace.is_none());
        let yaml = to_yaml(&m, true).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 5);
        assert!(!yaml.contains("kind: Namespace"), "{yaml}");
    }

    #[test]
    fn the_agent_gets_a_built_in_cloud_by_name_and_a_custom_one_as_a_file() {
        let china = AgentSpec {
            cloud: Some(crate::entra::Cloud::AzureChinaCloud.into()),
            ..spec()
        };
        let joined = agent_args(&china).join(" ");
        assert!(joined.contains("--cloud AzureChinaCloud"), "{joined}");
        let m = build(&china, &SecretContent::Placeholders);
        assert!(!m.secret.string_data.unwrap().contains_key(CLOUD_FILE));

        let custom = CloudDefinition {
            name: "ContosoStack".into(),
            authority_host: "https://login.contoso.test".into(),
            ..CloudDefinition::default()
        };
        let spec = AgentSpec {
            cloud: Some(custom.clone()),
            ..spec()
        };
        let joined = agent_args(&spec).join(" ");
        assert!(
            joined.contains("--cloud-config /etc/clusterconnect/cloud.json"),
            "{joined}"
        );
        let keys = SecretContent::Keys {
            listen_key: Secret::new("l"),
            agent_key: Secret::new("a"),
            relay_ca: None,
        };
        let m = build(&spec, &keys);
        let file = &m.secret.data.unwrap()[CLOUD_FILE];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLOUD_FILE);
        std::fs::write(&path, &file.0).unwrap();
        assert_eq!(CloudDefinition::from_file(&path, "x").unwrap(), custom);
        // Another cloud restarts the pods, like a new key.
        let digest = |spec: &AgentSpec| secret_digest(spec, &keys);
        assert_ne!(digest(&spec), digest(&self::spec()));
    }

    #[test]
    fn dry_run_yaml_has_six_documents_and_no_keys() {
        let m = build(&spec(), &SecretContent::Placeholders);
        let yaml = to_yaml(&m, true).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 6);
        assert!(yaml.contains("placeholders"));
        assert!(!yaml.contains("PRIVATE KEY"));
        assert!(yaml.contains(PLACEHOLDER));
        let keyed = build(
            &spec(),
            &SecretContent::Keys {
                listen_key: Secret::new("SharedAccessKeyName=l;SharedAccessKey=k"),
                agent_key: Secret::new("-----BEGIN PRIVATE KEY-----"),
                relay_ca: Some("ca".into()),
            },
        );
        let data = keyed.secret.data.unwrap();
        assert_eq!(data[AGENT_KEY_FILE].0, b"-----BEGIN PRIVATE KEY-----");
        assert!(data.contains_key(RELAY_CA_FILE));
    }
}

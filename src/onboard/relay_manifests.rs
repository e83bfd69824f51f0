//! The relay's own Kubernetes objects (`clusterconnect relay --dry-run -o yaml`), built from the
//! operator's relay configuration, for `kubectl apply` or a GitOps repository.
//!
//! The configuration goes in a ConfigMap with its paths moved to where the pod mounts things:
//! rule keys from a Secret the operator creates (never part of this output, not even with
//! placeholders: applied over the real one it would replace the keys; inline `key`s are moved
//! out of the file too), the TLS certificate from a `kubernetes.io/tls` Secret (what
//! cert-manager writes; the relay re-reads it when renewed), and the registry on a volume
//! claim. The embedded registry is one file with one writer, so there is one replica, replaced
//! with `Recreate`; the scale-out issue's NATS mode is what allows more. The pod runs under
//! the `restricted` Pod Security Standard like the agent's.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, Namespace,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::manifests::{
    pod_annotations, quantities, tcp_port, MANAGED_BY, MANAGED_BY_LABEL, METRICS_PORT, NAME_LABEL,
};

pub const RELAY_NAME: &str = "clusterconnect-relay";
pub const DEFAULT_RELAY_NAMESPACE: &str = "clusterconnect";
/// The Secret of rule keys, one `<rule>.key` each, which the operator creates.
pub const KEYS_SECRET: &str = "clusterconnect-relay-keys";
/// The `kubernetes.io/tls` Secret (cert-manager's `secretName`) the relay serves.
pub const TLS_SECRET: &str = "clusterconnect-relay-tls";
const CONFIG_DIR: &str = "/etc/clusterconnect/config";
const KEYS_DIR: &str = "/etc/clusterconnect/keys";
const TLS_DIR: &str = "/etc/clusterconnect/tls";
/// The Secret of NATS credentials (`[cluster]`'s files), which the operator creates.
pub const NATS_SECRET: &str = "clusterconnect-relay-nats";
const NATS_DIR: &str = "/etc/clusterconnect/nats";
/// `[cluster]`'s file settings and the key each has in the NATS Secret.
const NATS_FILES: [(&str, &str); 5] = [
    ("nats_credentials_file", "credentials"),
    ("nats_token_file", "token"),
    ("nats_ca_file", "ca.crt"),
    ("nats_cert_file", "tls.crt"),
    ("nats_key_file", "tls.key"),
];
const DATA_DIR: &str = "/var/lib/clusterconnect";
const CONFIG_FILE: &str = "relay.toml";
/// The port the relay listens on in the pod; the Service maps 443 to it.
pub const RELAY_PORT: i32 = 8443;
/// The image's user and group (distroless `nonroot`).
const IMAGE_GROUP: i64 = 65532;
/// Above the relay's drain (`drain_secs`, 10 by default), so tunnels get all of it.
pub const GRACE_SECONDS: i64 = 30;

#[derive(Clone, Debug)]
pub struct RelaySpec {
    pub namespace: String,
    pub image: String,
    /// Size of the registry's volume claim, e.g. "1Gi" (with `[cluster]`: NATS's store).
    pub storage: String,
    /// With `[cluster]` in the configuration: how many relay replicas the StatefulSet runs.
    pub replicas: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayManifestError {
    #[error("cannot read the relay config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay config {path} is not valid TOML: {message}")]
    Toml { path: String, message: String },
    #[error("relay config {path} has no hostnames: set `hostnames = [\"relay.example.com\"]`, the public name the Service's address will carry")]
    NoHostnames { path: String },
    #[error("relay config {path}: rule {name:?} cannot name a Secret key; use letters, digits, '-', '_' and '.'")]
    RuleName { path: String, name: String },
    #[error("relay config {path}: [cluster] needs nats_url and public_host; in Kubernetes point nats_url at nats://{NATS_NAME}.<namespace>:4222 (the NATS these manifests run) or at your own NATS")]
    Cluster { path: String },
    #[error("relay config {path}: [cluster] nats_url carries a user or password, which would be printed into the ConfigMap; put the secret in nats_token_file or nats_credentials_file (the Secret {NATS_SECRET} holds it in the pod)")]
    NatsUserinfo { path: String },
    #[error("--replicas applies to a relay with [cluster] (replicas on NATS); a relay with its embedded registry runs as one pod")]
    ReplicasWithoutCluster,
    #[error("cannot write the {kind} manifest")]
    Serialize {
        kind: &'static str,
        #[source]
        source: serde_norway::Error,
    },
}

/// The relay's objects, in the order they are applied.
pub struct RelayManifests {
    pub namespace: Namespace,
    pub service_account: ServiceAccount,
    pub config: ConfigMap,
    /// The rules whose keys the operator's Secret must hold, as `<rule>.key`.
    pub key_files: Vec<String>,
    /// With `[cluster]`: the keys the NATS Secret must hold (`token`, `ca.crt`, ...).
    pub nats_files: Vec<String>,
    /// The embedded registry's claim and the single-pod Deployment (no `[cluster]`).
    pub registry: Option<PersistentVolumeClaim>,
    pub deployment: Option<Deployment>,
    /// With `[cluster]`: the replicas, each with its own name and Service, and NATS.
    pub replicated: Option<Replicated>,
    pub service: Service,
    pub disruption_budget: PodDisruptionBudget,
}

/// What runs relay replicas on NATS: a StatefulSet (each pod a stable name,
/// `clusterconnect-relay-N`, which is its `public_host` under the first hostname), a
/// LoadBalancer Service per replica for the rendezvous addresses that name it, and, when
/// `nats_url` names it, a one-node NATS with JetStream on a volume.
pub struct Replicated {
    pub statefulset: StatefulSet,
    pub replica_services: Vec<Service>,
    pub nats: Option<Nats>,
}

/// The bundled NATS: token authentication from the NATS Secret, reachable only from the
/// relay's pods (it holds the registry, rule keys included).
pub struct Nats {
    pub config: ConfigMap,
    pub statefulset: StatefulSet,
    pub service: Service,
    pub policy: NetworkPolicy,
}

/// The NATS these manifests run when the configuration's `nats_url` names it.
pub const NATS_NAME: &str = "clusterconnect-nats";
/// NATS 2.9 and later work; the image these manifests run.
pub const NATS_IMAGE: &str = "nats:2.10-alpine";
const NATS_CONF_DIR: &str = "/etc/nats";
/// The bundled NATS: JetStream on its volume, and the token from the NATS Secret (NATS reads
/// `$NATS_TOKEN` from its environment).
const NATS_CONF: &str = "port: 4222\njetstream {\n  store_dir: \"/data\"\n}\nauthorization {\n  token: $NATS_TOKEN\n}\n";

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (NAME_LABEL.to_string(), RELAY_NAME.to_string()),
    ])
}

fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_string(), RELAY_NAME.to_string())])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

/// The configuration as the pod reads it, with the Secrets it needs.
#[derive(Debug)]
pub struct PodConfig {
    pub text: String,
    /// The rules whose keys the keys Secret holds.
    pub rules: Vec<String>,
    /// The keys the NATS Secret holds (`[cluster]` only).
    pub nats_files: Vec<String>,
}

/// The configuration as the pod reads it: paths moved to the pod's mounts, everything else in
/// the file (limits, `[entra]`, PROXY protocol) kept as written.
pub fn pod_config(path: &Path, text: &str) -> Result<PodConfig, RelayManifestError> {
    let shown = path.display().to_string();
    let mut doc: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| RelayManifestError::Toml {
                path: shown.clone(),
                message: e.message().to_string(),
            })?;
    let has_names = doc
        .get("hostnames")
        .and_then(|h| h.as_array())
        .is_some_and(|h| h.iter().any(|n| n.as_str().is_some_and(|n| !n.is_empty())));
    if !has_names {
        return Err(RelayManifestError::NoHostnames { path: shown });
    }
    doc.insert("listen".into(), format!("0.0.0.0:{RELAY_PORT}").into());
    doc.insert("public_port".into(), 443.into());
    // Metrics on by default, on a port the LoadBalancer Service does not expose.
    if !doc.contains_key("metrics_addr") {
        doc.insert(
            "metrics_addr".into(),
            format!("0.0.0.0:{METRICS_PORT}").into(),
        );
    }
    let mut nats_files = Vec::new();
    match doc.get_mut("cluster").and_then(|c| c.as_table_mut()) {
        // Replicas keep the registry in NATS; each pod's own name comes from --public-host.
        Some(cluster) => {
            let text_of = |k: &str| {
                cluster
                    .get(k)
                    .and_then(|v| v.as_str())
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            };
            let (Some(url), Some(_)) = (text_of("nats_url"), text_of("public_host")) else {
                return Err(RelayManifestError::Cluster { path: shown });
            };
            if url.split(',').any(|u| {
                let rest = u.trim().split_once("://").map_or(u, |(_, r)| r);
                rest.split('/').next().unwrap_or_default().contains('@')
            }) {
                return Err(RelayManifestError::NatsUserinfo { path: shown });
            }
            // The bundled NATS demands a token, so the relay must present one.
            let bundled = bundles_nats(&url);
            let has_auth = ["nats_credentials_file", "nats_token_file"]
                .iter()
                .any(|k| cluster.contains_key(*k));
            if bundled && !has_auth {
                cluster.insert("nats_token_file".into(), "token".into());
            }
            for (setting, key) in NATS_FILES {
                if cluster.contains_key(setting) {
                    cluster.insert(setting.into(), format!("{NATS_DIR}/{key}").into());
                    nats_files.push(key.to_string());
                }
            }
            doc.remove("registry_file");
        }
        None => {
            doc.insert(
                "registry_file".into(),
                format!("{DATA_DIR}/registry.redb").into(),
            );
        }
    }
    let mut tls = toml::Table::new();
    tls.insert("cert_file".into(), format!("{TLS_DIR}/tls.crt").into());
    tls.insert("key_file".into(), format!("{TLS_DIR}/tls.key").into());
    doc.insert("tls".into(), tls.into());
    let mut names = Vec::new();
    if let Some(rules) = doc.get_mut("rules").and_then(|r| r.as_array_mut()) {
        for rule in rules.iter_mut().filter_map(|r| r.as_table_mut()) {
            let name = rule
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string();
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return Err(RelayManifestError::RuleName { path: shown, name });
            }
            rule.remove("key");
            rule.insert("key_file".into(), format!("{KEYS_DIR}/{name}.key").into());
            names.push(name);
        }
    }
    let header = format!(
        "# Generated by `clusterconnect relay --dry-run` from {shown}: paths point at the pod's mounts.\n"
    );
    let body = toml::to_string(&doc).map_err(|e| RelayManifestError::Toml {
        path: shown,
        message: e.to_string(),
    })?;
    Ok(PodConfig {
        text: format!("{header}{body}"),
        rules: names,
        nats_files,
    })
}

/// Whether `nats_url` names the NATS these manifests run.
fn bundles_nats(url: &str) -> bool {
    url.contains(&format!("://{NATS_NAME}"))
}

pub fn build(
    spec: &RelaySpec,
    config_path: &Path,
    config_text: &str,
) -> Result<RelayManifests, RelayManifestError> {
    let PodConfig {
        text: config,
        rules,
        nats_files,
    } = pod_config(config_path, config_text)?;
    let doc: toml::Table =
        config
            .parse()
            .map_err(|e: toml::de::Error| RelayManifestError::Toml {
                path: config_path.display().to_string(),
                message: e.message().to_string(),
            })?;
    let cluster = doc.get("cluster").and_then(|c| c.as_table());
    if cluster.is_none() && spec.replicas != 1 {
        return Err(RelayManifestError::ReplicasWithoutCluster);
    }
    let first_host = doc
        .get("hostnames")
        .and_then(|h| h.as_array())
        .and_then(|h| h.iter().find_map(|n| n.as_str().filter(|n| !n.is_empty())))
        .unwrap_or_default()
        .to_string();
    let ns = Some(spec.namespace.as_str());
    let (registry, deployment, replicated) = match cluster {
        None => (Some(registry_claim(spec)), Some(deployment(spec)), None),
        Some(cluster) => {
            let nats_url = cluster
                .get("nats_url")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let nats = bundles_nats(nats_url).then(|| nats(spec));
            let replicated = Replicated {
                statefulset: statefulset(spec, &first_host, !nats_files.is_empty()),
                replica_services: (0..spec.replicas)
                    .map(|i| replica_service(spec, &format!("{RELAY_NAME}-{i}")))
                    .collect(),
                nats,
            };
            (None, None, Some(replicated))
        }
    };
    Ok(RelayManifests {
        namespace: Namespace {
            metadata: meta(&spec.namespace, None),
            ..Namespace::default()
        },
        service_account: ServiceAccount {
            metadata: meta(RELAY_NAME, ns),
            // The relay never calls the Kubernetes API.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        config: ConfigMap {
            metadata: meta(RELAY_NAME, ns),
            data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), config)])),
            ..ConfigMap::default()
        },
        key_files: rules.iter().map(|r| format!("{r}.key")).collect(),
        nats_files,
        registry,
        deployment,
        replicated,
        service: load_balancer(meta(RELAY_NAME, ns), selector()),
        disruption_budget: PodDisruptionBudget {
            metadata: meta(RELAY_NAME, ns),
            spec: Some(PodDisruptionBudgetSpec {
                // One voluntary eviction at a time; with a single replica a node drain still
                // proceeds (agents and proxies reconnect), with replicas it never empties them.
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector()),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        },
    })
}

fn registry_claim(spec: &RelaySpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(RELAY_NAME, Some(spec.namespace.as_str())),
        spec: Some(claim_spec(&spec.storage)),
        ..PersistentVolumeClaim::default()
    }
}

fn claim_spec(storage: &str) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(storage.to_string()),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    }
}

/// A LoadBalancer Service on 443 for the pods `selector` picks.
fn load_balancer(metadata: ObjectMeta, selector: BTreeMap<String, String>) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            // Per-address caps need the client's address, not a node's.
            external_traffic_policy: Some("Local".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("https".into()),
                port: 443,
                target_port: Some(IntOrString::String("https".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Service of one replica: rendezvous addresses that name it must reach it and only it.
fn replica_service(spec: &RelaySpec, pod: &str) -> Service {
    let selector = BTreeMap::from([(
        "statefulset.kubernetes.io/pod-name".to_string(),
        pod.to_string(),
    )]);
    load_balancer(meta(pod, Some(spec.namespace.as_str())), selector)
}

/// The relay replicas: each pod's name, `clusterconnect-relay-N`, under the first hostname
/// is its public host (`--public-host`), which DNS points at its own Service.
fn statefulset(spec: &RelaySpec, first_host: &str, nats_secret: bool) -> StatefulSet {
    let ns = Some(spec.namespace.as_str());
    let mut pod = pod_spec(spec, false);
    if nats_secret {
        pod.volumes
            .get_or_insert_with(Vec::new)
            .push(secret_volume("nats", NATS_SECRET));
    }
    if let Some(c) = pod.containers.first_mut() {
        c.env = Some(vec![pod_name_env()]);
        if nats_secret {
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(mount("nats", NATS_DIR, true));
        }
        if let Some(args) = c.args.as_mut() {
            args.push("--public-host".into());
            args.push(format!("$(POD_NAME).{first_host}"));
        }
    }
    StatefulSet {
        metadata: meta(RELAY_NAME, ns),
        spec: StatefulSetSpec {
            replicas: Some(i32::from(spec.replicas)),
            service_name: Some(RELAY_NAME.into()),
            // Replicas share nothing but NATS: they start and stop independently.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    annotations: Some(pod_annotations(None)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

fn pod_name_env() -> EnvVar {
    EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// One NATS node with JetStream on its own volume, reachable in the cluster only.
fn nats(spec: &RelaySpec) -> Nats {
    let ns = Some(spec.namespace.as_str());
    let nats_labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (NAME_LABEL.to_string(), NATS_NAME.to_string()),
    ]);
    let nats_selector = BTreeMap::from([(NAME_LABEL.to_string(), NATS_NAME.to_string())]);
    let metadata = ObjectMeta {
        name: Some(NATS_NAME.into()),
        namespace: ns.map(str::to_string),
        labels: Some(nats_labels.clone()),
        ..ObjectMeta::default()
    };
    let container = Container {
        name: "nats".into(),
        image: Some(NATS_IMAGE.into()),
        // The token the relays present (nats_token_file), from the NATS Secret.
        env: Some(vec![EnvVar {
            name: "NATS_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: NATS_SECRET.into(),
                    key: "token".into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        // The token stays out of the command line (which any process in the pod can read):
        // the configuration names the variable, which NATS resolves from its environment.
        command: Some(vec!["nats-server".into()]),
        args: Some(vec!["-c".into(), format!("{NATS_CONF_DIR}/nats.conf")]),
        ports: Some(vec![tcp_port("client", 4222)]),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("client".into()),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities("100m", "64Mi"),
            limits: quantities("1", "512Mi"),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted_container()),
        volume_mounts: Some(vec![
            mount("data", "/data", false),
            mount("conf", NATS_CONF_DIR, true),
        ]),
        ..Container::default()
    };
    let config = ConfigMap {
        metadata: metadata.clone(),
        data: Some(BTreeMap::from([(
            "nats.conf".to_string(),
            NATS_CONF.to_string(),
        )])),
        ..ConfigMap::default()
    };
    let statefulset = StatefulSet {
        metadata: metadata.clone(),
        spec: StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(NATS_NAME.into()),
            selector: LabelSelector {
                match_labels: Some(nats_selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(nats_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod()),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "conf".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: NATS_NAME.into(),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(claim_spec(&spec.storage)),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    };
    let service = Service {
        metadata,
        spec: Some(ServiceSpec {
            selector: Some(nats_selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("client".into()),
                port: 4222,
                target_port: Some(IntOrString::String("client".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    // Only the relay's pods reach NATS: it holds the registry, rule keys included.
    let policy = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(NATS_NAME.into()),
            namespace: ns.map(str::to_string),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(nats_selector),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(selector()),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(4222)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    };
    Nats {
        config,
        statefulset,
        service,
        policy,
    }
}

fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(IMAGE_GROUP),
        // Makes volumes writable for the image's user (65532); OpenShift assigns its own
        // fsGroup, so the comment in the YAML says to drop this line there.
        fs_group: Some(IMAGE_GROUP),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The arguments the pod runs the relay with; a test parses them with the real CLI.
pub fn relay_args() -> Vec<String> {
    vec![
        "relay".into(),
        "--config".into(),
        format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        "--log-format".into(),
        "json".into(),
    ]
}

/// TCP probes: the relay's port speaks TLS (and, behind a balancer, may require a PROXY
/// protocol header first), which an HTTP probe cannot always satisfy; accepting is the proof.
fn probe(period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("https".into()),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn container(spec: &RelaySpec) -> Container {
    Container {
        name: "relay".into(),
        image: Some(spec.image.clone()),
        args: Some(relay_args()),
        ports: Some(vec![
            tcp_port("https", RELAY_PORT),
            tcp_port("metrics", METRICS_PORT),
        ]),
        liveness_probe: Some(probe(10, 3)),
        readiness_probe: Some(probe(5, 2)),
        resources: Some(ResourceRequirements {
            requests: quantities("100m", "64Mi"),
            limits: quantities("2", "1Gi"),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR, true),
            mount("keys", KEYS_DIR, true),
            mount("tls", TLS_DIR, true),
            mount("registry", DATA_DIR, false),
        ]),
        ..Container::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The relay's pod: config, keys and certificate mounted; the registry volume only for the
/// embedded registry.
fn pod_spec(spec: &RelaySpec, registry: bool) -> PodSpec {
    let mut container = container(spec);
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: RELAY_NAME.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("keys", KEYS_SECRET),
        secret_volume("tls", TLS_SECRET),
    ];
    if registry {
        volumes.push(Volume {
            name: "registry".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: RELAY_NAME.into(),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        });
    } else if let Some(mounts) = container.volume_mounts.as_mut() {
        mounts.retain(|m| m.name != "registry");
    }
    let mut security = restricted_pod();
    // The image's user already; the Deployment has always left it to the image.
    security.run_as_user = None;
    PodSpec {
        service_account_name: Some(RELAY_NAME.into()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(GRACE_SECONDS),
        security_context: Some(security),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    }
}

fn deployment(spec: &RelaySpec) -> Deployment {
    let ns = Some(spec.namespace.as_str());
    Deployment {
        metadata: meta(RELAY_NAME, ns),
        spec: DeploymentSpec {
            replicas: Some(1),
            // The registry file has one writer: the old pod lets go before the new one opens it.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    annotations: Some(pod_annotations(None)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(spec, true)),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

impl RelayManifests {
    /// Every object as JSON, in apply order.
    pub fn items(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        use serde_json::to_value;
        let mut items = vec![
            to_value(&self.namespace)?,
            to_value(&self.service_account)?,
            to_value(&self.config)?,
        ];
        if let Some(registry) = &self.registry {
            items.push(to_value(registry)?);
        }
        if let Some(deployment) = &self.deployment {
            items.push(to_value(deployment)?);
        }
        if let Some(r) = &self.replicated {
            if let Some(nats) = &r.nats {
                items.push(to_value(&nats.config)?);
                items.push(to_value(&nats.statefulset)?);
                items.push(to_value(&nats.service)?);
                items.push(to_value(&nats.policy)?);
            }
            items.push(to_value(&r.statefulset)?);
            for service in &r.replica_services {
                items.push(to_value(service)?);
            }
        }
        items.push(to_value(&self.service)?);
        items.push(to_value(&self.disruption_budget)?);
        Ok(items)
    }

    /// The command that creates the rule-key Secret from key files named after the rules.
    pub fn keys_command(&self) -> String {
        let ns = self
            .config
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default();
        let files: Vec<String> = self
            .key_files
            .iter()
            .map(|f| format!("--from-file={f}=<path to {f}>"))
            .collect();
        format!(
            "kubectl -n {ns} create secret generic {KEYS_SECRET} {}",
            files.join(" ")
        )
    }

    /// The command that creates the NATS Secret (`[cluster]` with NATS files), if one is needed:
    /// a fresh random token for the bundled NATS, the named files otherwise.
    pub fn nats_command(&self) -> Option<String> {
        if self.nats_files.is_empty() {
            return None;
        }
        let ns = self
            .config
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default();
        let bundled = self.replicated.as_ref().is_some_and(|r| r.nats.is_some());
        let sources: Vec<String> = self
            .nats_files
            .iter()
            .map(|key| {
                if bundled && key == "token" {
                    r#"--from-literal=token="$(openssl rand -hex 32)""#.to_string()
                } else {
                    let setting = NATS_FILES
                        .iter()
                        .find(|(_, k)| k == key)
                        .map_or("", |(s, _)| *s);
                    format!("--from-file={key}=<path of {setting}>")
                }
            })
            .collect();
        Some(format!(
            "kubectl -n {ns} create secret generic {NATS_SECRET} {}",
            sources.join(" ")
        ))
    }

    /// One multi-document YAML stream; the Secrets the operator provides are explained where
    /// they are used.
    pub fn to_yaml(&self) -> Result<String, RelayManifestError> {
        fn doc<T: serde::Serialize>(
            kind: &'static str,
            object: &T,
        ) -> Result<String, RelayManifestError> {
            serde_norway::to_string(object)
                .map_err(|source| RelayManifestError::Serialize { kind, source })
        }
        let secrets_note = format!(
            "# Secrets these manifests do not hold; create them first:\n\
             # - {KEYS_SECRET}, the rule keys (clusterconnect sas new-key --name <rule>):\n\
             #   {}\n\
             # - {TLS_SECRET}, kubernetes.io/tls (cert-manager's Certificate secretName, or\n\
             #   kubectl create secret tls); renewals are picked up live.\n\
             # On OpenShift remove fsGroup: the restricted SCC assigns one.\n{}",
            self.keys_command(),
            self.nats_command()
                .map(|c| format!("# And {NATS_SECRET}, NATS's credentials:\n#   {c}\n"))
                .unwrap_or_default(),
        );
        let mut docs = vec![
            doc("Namespace", &self.namespace)?,
            doc("ServiceAccount", &self.service_account)?,
            doc("ConfigMap", &self.config)?,
        ];
        if let Some(registry) = &self.registry {
            docs.push(doc("PersistentVolumeClaim", registry)?);
        }
        if let Some(deployment) = &self.deployment {
            docs.push(format!("{secrets_note}{}", doc("Deployment", deployment)?));
        }
        if let Some(r) = &self.replicated {
            if let Some(nats) = &r.nats {
                docs.push(format!(
                    "# NATS with JetStream for the relay replicas (registry, offers, presence); it\n\
                     # demands the token in the Secret {NATS_SECRET}, and only the relay's pods reach it.\n{}",
                    doc("ConfigMap", &nats.config)?
                ));
                docs.push(doc("StatefulSet", &nats.statefulset)?);
                docs.push(doc("Service", &nats.service)?);
                docs.push(doc("NetworkPolicy", &nats.policy)?);
            }
            docs.push(format!(
                "{secrets_note}# Each replica's name under the first hostname (clusterconnect-relay-N.<host>) must\n\
                 # resolve to its own Service below, and the certificate must carry those names too\n\
                 # (a wildcard *.<host> next to <host>).\n{}",
                doc("StatefulSet", &r.statefulset)?
            ));
            for service in &r.replica_services {
                docs.push(doc("Service", service)?);
            }
        }
        docs.push(doc("Service", &self.service)?);
        docs.push(doc("PodDisruptionBudget", &self.disruption_budget)?);
        Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listen = "127.0.0.1:9443"
hostnames = ["relay.example.com"]
max_rendezvous_per_token = 2048
registry_file = "registry.redb"

[tls]
cert_file = "/somewhere/cert.pem"
key_file = "/somewhere/key.pem"

[[rules]]
name = "listen"
key = "inline-secret-key-material"
rights = ["listen"]

[[rules]]
name = "send"
key_file = "send.key"
rights = ["send"]
"#;

    fn spec() -> RelaySpec {
        RelaySpec {
            namespace: DEFAULT_RELAY_NAMESPACE.into(),
            image: super::super::manifests::default_image(),
            storage: "1Gi".into(),
            replicas: 1,
        }
    }

    #[test]
    fn the_pod_config_keeps_settings_and_points_at_the_mounts() {
        let PodConfig {
            text,
            rules,
            nats_files,
        } = pod_config(Path::new("relay.toml"), CONFIG).unwrap();
        assert!(nats_files.is_empty());
        assert_eq!(rules, ["listen", "send"]);
        assert!(!text.contains("inline-secret-key-material"), "{text}");
        let file: crate::relay::RelayFile = toml::from_str(&text).unwrap();
        assert_eq!(file.listen.unwrap().port(), 8443);
        assert_eq!(file.public_port, Some(443));
        assert_eq!(file.metrics_addr.as_deref(), Some("0.0.0.0:9090"));
        assert_eq!(file.max_rendezvous_per_token, Some(2048));
        assert_eq!(
            file.tls.unwrap().cert_file,
            Path::new("/etc/clusterconnect/tls/tls.crt")
        );
        let keys: Vec<_> = file.rules.iter().map(|r| r.key_file.clone()).collect();
        assert_eq!(
            keys,
            [
                Some("/etc/clusterconnect/keys/listen.key".into()),
                Some("/etc/clusterconnect/keys/send.key".into())
            ]
        );
    }

    #[test]
    fn nats_files_move_to_the_nats_secret_and_passwords_stay_out_of_the_config_map() {
        let cluster = "hostnames = [\"r.example\"]\n[cluster]\npublic_host = \"x\"\n";
        let own = format!(
            "{cluster}nats_url = \"tls://nats.example:4222\"\nnats_ca_file = \"/home/me/ca.pem\"\nnats_credentials_file = \"me.creds\"\n"
        );
        let c = pod_config(Path::new("r.toml"), &own).unwrap();
        assert_eq!(c.nats_files, ["credentials", "ca.crt"]);
        assert!(c
            .text
            .contains("nats_ca_file = \"/etc/clusterconnect/nats/ca.crt\""));
        assert!(!c.text.contains("/home/me"), "{}", c.text);
        // The bundled NATS: a token, always.
        let bundled = format!("{cluster}nats_url = \"nats://{NATS_NAME}.clusterconnect:4222\"\n");
        let c = pod_config(Path::new("r.toml"), &bundled).unwrap();
        assert_eq!(c.nats_files, ["token"]);
        for url in ["nats://me:hunter2@nats:4222", "a:4222, nats://tok@b:4222"] {
            let err = pod_config(
                Path::new("r.toml"),
                &format!("{cluster}nats_url = \"{url}\"\n"),
            )
            .unwrap_err();
            assert!(
                matches!(err, RelayManifestError::NatsUserinfo { .. }),
                "{err}"
            );
            assert!(!err.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn bad_configs_are_named() {
        let no_names = pod_config(Path::new("r.toml"), "listen = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(no_names.to_string().contains("hostnames"), "{no_names}");
        let bad_rule = CONFIG.replace("name = \"send\"", "name = \"../x\"");
        let err = pod_config(Path::new("r.toml"), &bad_rule).unwrap_err();
        assert!(err.to_string().contains("\"../x\""), "{err}");
        let not_toml = pod_config(Path::new("r.toml"), "listen = ").unwrap_err();
        assert!(
            not_toml.to_string().contains("not valid TOML"),
            "{not_toml}"
        );
    }

    #[test]
    fn the_relay_runs_restricted_with_its_command_line_accepted() {
        use clap::Parser;
        let parsed = crate::cli::Cli::try_parse_from(
            std::iter::once("clusterconnect".to_string()).chain(relay_args()),
        );
        let cli = parsed.unwrap_or_else(|e| panic!("the relay refuses its manifest's args: {e}"));
        assert!(matches!(cli.command, crate::cli::Command::Relay(_)));

        let m = build(&spec(), Path::new("relay.toml"), CONFIG).unwrap();
        let d = serde_json::to_value(&m.deployment).unwrap();
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["automountServiceAccountToken"], false);
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], "https");
        assert_eq!(c["ports"][1]["containerPort"], 9090);
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
            "9090"
        );
        let s = serde_json::to_value(&m.service).unwrap();
        assert_eq!(s["spec"]["ports"][0]["port"], 443);
        // The metrics port is not on the internet-facing Service.
        assert_eq!(s["spec"]["ports"].as_array().unwrap().len(), 1);
        let yaml = m.to_yaml().unwrap();
        assert_eq!(yaml.matches("---\n").count(), 7);
        assert!(!yaml.contains("inline-secret-key-material"));
        assert!(!yaml.contains("kind: Secret"), "{yaml}");
        assert!(
            yaml.contains("--from-file=listen.key=<path to listen.key> --from-file=send.key="),
            "{yaml}"
        );
    }
}

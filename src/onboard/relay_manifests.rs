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

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, Namespace, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, TCPSocketAction, Volume,
    VolumeMount, VolumeResourceRequirements,
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
    /// Size of the registry's volume claim, e.g. "1Gi".
    pub storage: String,
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
    pub registry: PersistentVolumeClaim,
    pub deployment: Deployment,
    pub service: Service,
    pub disruption_budget: PodDisruptionBudget,
}

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

/// The configuration as the pod reads it, and the names of the rules whose keys the Secret
/// holds. Everything else in the file (limits, `[entra]`, PROXY protocol) is kept as written.
pub fn pod_config(path: &Path, text: &str) -> Result<(String, Vec<String>), RelayManifestError> {
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
    doc.insert(
        "registry_file".into(),
        format!("{DATA_DIR}/registry.redb").into(),
    );
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
    Ok((format!("{header}{body}"), names))
}

pub fn build(
    spec: &RelaySpec,
    config_path: &Path,
    config_text: &str,
) -> Result<RelayManifests, RelayManifestError> {
    let (config, rules) = pod_config(config_path, config_text)?;
    let ns = Some(spec.namespace.as_str());
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
        registry: PersistentVolumeClaim {
            metadata: meta(RELAY_NAME, ns),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(spec.storage.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        },
        deployment: deployment(spec),
        service: Service {
            metadata: meta(RELAY_NAME, ns),
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                // Per-address caps need the client's address, not a node's.
                external_traffic_policy: Some("Local".into()),
                selector: Some(selector()),
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
        },
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

fn deployment(spec: &RelaySpec) -> Deployment {
    let ns = Some(spec.namespace.as_str());
    let secret = |name: &str, secret: &str| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
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
                spec: Some(PodSpec {
                    service_account_name: Some(RELAY_NAME.into()),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(GRACE_SECONDS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        // Makes the registry volume writable for the image's user (65532);
                        // OpenShift assigns its own fsGroup, so the comment in the YAML says
                        // to drop this line there.
                        fs_group: Some(IMAGE_GROUP),
                        fs_group_change_policy: Some("OnRootMismatch".into()),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container(spec)],
                    volumes: Some(vec![
                        Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: RELAY_NAME.into(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        secret("keys", KEYS_SECRET),
                        secret("tls", TLS_SECRET),
                        Volume {
                            name: "registry".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: RELAY_NAME.into(),
                                ..PersistentVolumeClaimVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

impl RelayManifests {
    /// Every object as JSON, in apply order.
    pub fn items(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        Ok(vec![
            serde_json::to_value(&self.namespace)?,
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.config)?,
            serde_json::to_value(&self.registry)?,
            serde_json::to_value(&self.deployment)?,
            serde_json::to_value(&self.service)?,
            serde_json::to_value(&self.disruption_budget)?,
        ])
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
        let deployment = format!(
            "# Two Secrets are not part of these manifests; create them first:\n\
             # - {KEYS_SECRET}, the rule keys (clusterconnect sas new-key --name <rule>):\n\
             #   {}\n\
             # - {TLS_SECRET}, kubernetes.io/tls (cert-manager's Certificate secretName, or\n\
             #   kubectl create secret tls); renewals are picked up live.\n\
             # On OpenShift remove fsGroup: the restricted SCC assigns one.\n{}",
            self.keys_command(),
            doc("Deployment", &self.deployment)?
        );
        let docs = [
            doc("Namespace", &self.namespace)?,
            doc("ServiceAccount", &self.service_account)?,
            doc("ConfigMap", &self.config)?,
            doc("PersistentVolumeClaim", &self.registry)?,
            deployment,
            doc("Service", &self.service)?,
            doc("PodDisruptionBudget", &self.disruption_budget)?,
        ];
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
        }
    }

    #[test]
    fn the_pod_config_keeps_settings_and_points_at_the_mounts() {
        let (text, rules) = pod_config(Path::new("relay.toml"), CONFIG).unwrap();
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

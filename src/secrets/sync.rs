//! One synchronisation pass: fetch every object of the class, write the files of the mount
//! directory, and create or update the Kubernetes Secrets of `secretObjects`. The syncer keeps
//! the last good content of every object, so a later pass (the rotation module repeats them)
//! can tell what rotated and keep serving an object Key Vault briefly fails to return.
//!
//! Kubernetes Secrets carry `app.kubernetes.io/managed-by: clusterconnect` and the versions of
//! the objects they were built from; an existing Secret without that label is never overwritten.
//! Values never reach a log line or an error: only object names and versions do.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use super::keyvault::{Fetched, KeyVaultClient, KeyVaultError};
use super::mount::{write_file, MountError};
use super::pem::{blocks, Base64Error};
use super::provider_class::{Encoding, ObjectSpec, ProviderClass, SecretObject};
use crate::tunnel::http::error_chain;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "clusterconnect";
/// JSON object of object name (or alias) -> Key Vault version the Secret was built from.
pub const VERSIONS_ANNOTATION: &str = "clusterconnect.io/object-versions";
pub const CLASS_ANNOTATION: &str = "clusterconnect.io/secret-provider-class";
/// Who wrote the Secret and alone may rewrite or delete it: see [`class_owner`] and
/// [`cli_owner`]. The managed-by label is not enough: other parts of clusterconnect (the
/// onboarding agent's Secret) carry it too, and two classes may name the same secretName.
pub const OWNER_ANNOTATION: &str = "clusterconnect.io/secret-owner";

/// The owner of the Secrets the extension writes for one class: its namespace, name and uid,
/// so a class deleted and created again under the same name is a different owner.
pub fn class_owner(namespace: &str, name: &str, uid: &str) -> String {
    format!("SecretProviderClass {namespace}/{name} uid {uid}")
}

/// The owner of the Secrets `clusterconnect secrets sync` writes from a class file.
pub fn cli_owner(namespace: &str, class_name: &str) -> String {
    format!("secrets sync {namespace}/{class_name}")
}

/// Whether `existing` carries the label of the Secrets clusterconnect writes.
fn is_managed(existing: &KubeSecret) -> bool {
    existing
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// Whether `existing` was written for `owner`. A Secret written before owners were recorded
/// (no [`OWNER_ANNOTATION`]) belongs to the class its [`CLASS_ANNOTATION`] names.
pub fn owned_by(existing: &KubeSecret, owner: &str, class_name: &str) -> bool {
    let managed = is_managed(existing);
    let annotations = existing.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    managed
        && match annotation(OWNER_ANNOTATION) {
            Some(o) => o == owner,
            None => annotation(CLASS_ANNOTATION).is_some_and(|c| c == class_name),
        }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Several causes, so each is written out with its own chain rather than kept as a source.
    #[error("{count} of {total} objects could not be fetched: {}", .errors.iter().map(|e| error_chain(e)).collect::<Vec<_>>().join("; "))]
    Fetch {
        count: usize,
        total: usize,
        errors: Vec<KeyVaultError>,
    },
    #[error("object {object}: objectEncoding base64 does not fit its content")]
    Base64 {
        object: String,
        #[source]
        source: Base64Error,
    },
    #[error("object {object}: objectEncoding hex does not fit its content")]
    Hex {
        object: String,
        #[source]
        source: HexError,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("Kubernetes Secret {namespace}/{name}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Kubernetes Secret {namespace}/{name} exists and is not managed by clusterconnect (no {MANAGED_BY_LABEL}={MANAGED_BY} label); delete it or choose another secretName")]
    NotManaged { namespace: String, name: String },
    #[error("Kubernetes Secret {namespace}/{name} belongs to {}, not to {owner}; it is left alone: choose another secretName", .other.as_deref().unwrap_or("another part of clusterconnect"))]
    NotOwned {
        namespace: String,
        name: String,
        owner: String,
        other: Option<String>,
    },
}

/// Why a hex value does not decode; never quotes the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexError {
    #[error("odd number of hex digits")]
    OddLength,
    #[error("not a hex digit pair at offset {0}")]
    NotHex(usize),
}

/// What happened to one Kubernetes Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Objects whose version changed since the previous pass: (file name, new version).
    pub rotated: Vec<(String, String)>,
    /// Objects Key Vault failed to return whose last good content was kept.
    pub kept: Vec<String>,
    pub files_written: Vec<String>,
    pub secrets: Vec<(String, Outcome)>,
}

/// Where a pass delivers.
pub struct Targets {
    pub mount_dir: Option<PathBuf>,
    /// Secrets of the target namespace; `None` leaves `secretObjects` alone.
    pub secrets: Option<SecretTarget>,
}

/// The namespace `secretObjects` are written to, and who writes them.
pub struct SecretTarget {
    pub api: Api<KubeSecret>,
    pub namespace: String,
    /// [`class_owner`] or [`cli_owner`]: only Secrets of this owner are rewritten.
    pub owner: String,
}

pub struct Syncer {
    client: KeyVaultClient,
    class: ProviderClass,
    targets: Targets,
    /// Last good content by file name.
    last: BTreeMap<String, Fetched>,
}

impl Syncer {
    pub fn new(client: KeyVaultClient, class: ProviderClass, targets: Targets) -> Syncer {
        Syncer {
            client,
            class,
            targets,
            last: BTreeMap::new(),
        }
    }

    pub fn class(&self) -> &ProviderClass {
        &self.class
    }

    /// The version of every object's last good content, by file name.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.last
            .iter()
            .map(|(name, fetched)| (name.clone(), fetched.version.clone()))
            .collect()
    }

    /// The last good content of every object, encoded as its file holds it (the CSI
    /// provider's Mount answer).
    pub fn files(&self) -> Result<BTreeMap<String, Vec<u8>>, SyncError> {
        let mut files = BTreeMap::new();
        for spec in &self.class.objects {
            if let Some(fetched) = self.last.get(spec.file_name()) {
                files.insert(spec.file_name().to_string(), encode(spec, fetched)?);
            }
        }
        Ok(files)
    }

    /// Fetches everything and delivers what changed. Objects that fail keep their last good
    /// content; a pass fails only when an object has never been fetched.
    pub async fn pass(&mut self) -> Result<PassReport, SyncError> {
        let mut report = PassReport::default();
        let mut current = BTreeMap::new();
        let mut errors = Vec::new();
        for spec in &self.class.objects {
            let name = spec.file_name().to_string();
            match self.client.fetch(&spec.object, spec.format).await {
                Ok(fetched) => {
                    if let Some(previous) = self.last.get(&name) {
                        if previous.version != fetched.version || previous.value != fetched.value {
                            tracing::info!(object = %name, kind = %spec.object.kind, version = %fetched.version, previous_version = %previous.version, "object rotated");
                            report.rotated.push((name.clone(), fetched.version.clone()));
                        }
                    }
                    current.insert(name, fetched);
                }
                Err(e) => match self.last.get(&name) {
                    Some(previous) => {
                        tracing::warn!(object = %name, error = %error_chain(&e), version = %previous.version, "Key Vault did not return the object; keeping the last good version");
                        report.kept.push(name.clone());
                        current.insert(name, previous.clone());
                    }
                    None => errors.push(e),
                },
            }
        }
        if !errors.is_empty() {
            return Err(SyncError::Fetch {
                count: errors.len(),
                total: self.class.objects.len(),
                errors,
            });
        }
        let mut contents = BTreeMap::new();
        for spec in &self.class.objects {
            let name = spec.file_name();
            if let Some(fetched) = current.get(name) {
                contents.insert(name.to_string(), encode(spec, fetched)?);
            }
        }
        if let Some(dir) = &self.targets.mount_dir {
            for (name, bytes) in &contents {
                if write_file(dir, name, bytes)? {
                    report.files_written.push(name.clone());
                }
            }
        }
        if let Some(target) = &self.targets.secrets {
            let namespace = &target.namespace;
            // Every Secret is checked before any is written: a class that may not write one of
            // its Secrets writes none.
            let mut existing = Vec::new();
            for object in &self.class.secret_objects {
                existing.push(
                    writable(
                        &target.api,
                        namespace,
                        &target.owner,
                        &self.class.name,
                        &object.secret_name,
                    )
                    .await?,
                );
            }
            for (object, existing) in self.class.secret_objects.iter().zip(existing) {
                let desired =
                    build_secret(&self.class.name, &target.owner, object, &contents, &current);
                let outcome = write(&target.api, namespace, existing, desired).await?;
                if outcome != Outcome::Unchanged {
                    tracing::info!(secret = %object.secret_name, namespace = %namespace, outcome = ?outcome, "Kubernetes Secret synced");
                }
                report.secrets.push((object.secret_name.clone(), outcome));
            }
        }
        self.last = current;
        Ok(report)
    }
}

/// The file content of an object: its text, or the bytes its base64 or hex encodes.
fn encode(spec: &ObjectSpec, fetched: &Fetched) -> Result<Vec<u8>, SyncError> {
    let text = fetched.value.expose();
    let object = spec.file_name().to_string();
    match spec.encoding {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => STANDARD.decode(text.trim()).map_err(|e| SyncError::Base64 {
            object,
            source: e.into(),
        }),
        Encoding::Hex => {
            decode_hex(text.trim()).map_err(|source| SyncError::Hex { object, source })
        }
    }
}

fn decode_hex(text: &str) -> Result<Vec<u8>, HexError> {
    if !text.len().is_multiple_of(2) {
        return Err(HexError::OddLength);
    }
    text.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or(HexError::NotHex(i * 2))
        })
        .collect()
}

/// The Secret `object` describes. For `kubernetes.io/tls`, `tls.key` and `tls.crt` take the
/// private key and the certificates out of the PEM object, as the CSI driver does.
pub fn build_secret(
    class_name: &str,
    owner: &str,
    object: &SecretObject,
    contents: &BTreeMap<String, Vec<u8>>,
    fetched: &BTreeMap<String, Fetched>,
) -> KubeSecret {
    let tls = object.secret_type == "kubernetes.io/tls";
    let mut data = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for item in &object.data {
        let Some(bytes) = contents.get(&item.object_name) else {
            continue;
        };
        let value = match (tls, item.key.as_str()) {
            (true, "tls.key") => {
                blocks(&String::from_utf8_lossy(bytes), "PRIVATE KEY").into_bytes()
            }
            (true, "tls.crt") => {
                blocks(&String::from_utf8_lossy(bytes), "CERTIFICATE").into_bytes()
            }
            _ => bytes.clone(),
        };
        data.insert(item.key.clone(), ByteString(value));
        if let Some(f) = fetched.get(&item.object_name) {
            versions.insert(item.object_name.clone(), f.version.clone());
        }
    }
    let mut labels = object.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let mut annotations = object.annotations.clone();
    annotations.insert(
        VERSIONS_ANNOTATION.into(),
        serde_json::to_string(&versions).unwrap_or_default(),
    );
    annotations.insert(CLASS_ANNOTATION.into(), class_name.to_string());
    annotations.insert(OWNER_ANNOTATION.into(), owner.to_string());
    KubeSecret {
        metadata: ObjectMeta {
            name: Some(object.secret_name.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        type_: Some(object.secret_type.clone()),
        data: Some(data),
        ..KubeSecret::default()
    }
}

/// Whether `existing` already holds everything `desired` sets.
fn same(existing: &KubeSecret, desired: &KubeSecret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>,
                  have: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    existing.data == desired.data
        && existing.type_ == desired.type_
        && subset(&desired.metadata.labels, &existing.metadata.labels)
        && subset(
            &desired.metadata.annotations,
            &existing.metadata.annotations,
        )
}

/// Reads Secret `name` and checks that `owner` may write it: `None` when there is none yet.
/// A Secret without the managed-by label, or of another owner, is refused.
pub async fn writable(
    api: &Api<KubeSecret>,
    namespace: &str,
    owner: &str,
    class_name: &str,
    name: &str,
) -> Result<Option<KubeSecret>, SyncError> {
    let existing = api.get_opt(name).await.map_err(|source| SyncError::Kube {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    })?;
    let Some(existing) = existing else {
        return Ok(None);
    };
    let managed = is_managed(&existing);
    if !managed {
        return Err(SyncError::NotManaged {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    }
    if !owned_by(&existing, owner, class_name) {
        return Err(SyncError::NotOwned {
            namespace: namespace.to_string(),
            name: name.to_string(),
            owner: owner.to_string(),
            other: existing
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNER_ANNOTATION))
                .map(|o| crate::secret::clip(o, 200)),
        });
    }
    Ok(Some(existing))
}

/// Creates the Secret, or replaces it when its content differs, once [`writable`] has said
/// yes; unchanged Secrets are not written (their resourceVersion stays).
async fn write(
    api: &Api<KubeSecret>,
    namespace: &str,
    existing: Option<KubeSecret>,
    mut desired: KubeSecret,
) -> Result<Outcome, SyncError> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let kube = |source: kube::Error| SyncError::Kube {
        namespace: namespace.to_string(),
        name: name.clone(),
        source,
    };
    match existing {
        None => {
            api.create(&PostParams::default(), &desired)
                .await
                .map_err(kube)?;
            Ok(Outcome::Created)
        }
        Some(existing) => {
            if same(&existing, &desired) {
                return Ok(Outcome::Unchanged);
            }
            desired.metadata.resource_version = existing.metadata.resource_version.clone();
            api.replace(&name, &PostParams::default(), &desired)
                .await
                .map_err(kube)?;
            Ok(Outcome::Updated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::secrets::provider_class::SecretObjectData;

    #[test]
    fn a_tls_secret_splits_the_pem_and_records_versions() {
        let object = SecretObject {
            secret_name: "web-tls".into(),
            secret_type: "kubernetes.io/tls".into(),
            labels: BTreeMap::from([("team".to_string(), "web".to_string())]),
            annotations: BTreeMap::new(),
            data: vec![
                SecretObjectData {
                    object_name: "tls".into(),
                    key: "tls.key".into(),
                },
                SecretObjectData {
                    object_name: "tls".into(),
                    key: "tls.crt".into(),
                },
            ],
        };
        let pem = "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let contents = BTreeMap::from([("tls".to_string(), pem.as_bytes().to_vec())]);
        let fetched = BTreeMap::from([(
            "tls".to_string(),
            Fetched {
                value: Secret::new(pem),
                version: "v1".into(),
                content_type: None,
            },
        )]);
        let owner = class_owner("apps", "web", "u1");
        let secret = build_secret("web", &owner, &object, &contents, &fetched);
        let data = secret.data.as_ref().unwrap();
        assert!(String::from_utf8_lossy(&data["tls.key"].0).contains("AAA"));
        assert!(!String::from_utf8_lossy(&data["tls.key"].0).contains("BBB"));
        assert!(String::from_utf8_lossy(&data["tls.crt"].0).contains("BBB"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels["team"], "web");
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[VERSIONS_ANNOTATION], r#"{"tls":"v1"}"#);
        assert!(same(&secret, &secret.clone()));
        assert_eq!(annotations[OWNER_ANNOTATION], owner);
    }

    fn existing(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> KubeSecret {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        KubeSecret {
            metadata: ObjectMeta {
                name: Some("shared".into()),
                labels: map(labels),
                annotations: map(annotations),
                ..ObjectMeta::default()
            },
            ..KubeSecret::default()
        }
    }

    #[test]
    fn only_the_owner_may_rewrite_or_delete_a_secret() {
        let managed = [(MANAGED_BY_LABEL, MANAGED_BY)];
        let a = class_owner("apps", "a", "uid-a");
        let b = class_owner("apps", "b", "uid-b");
        let of_a = existing(&managed, &[(OWNER_ANNOTATION, &a), (CLASS_ANNOTATION, "a")]);
        assert!(owned_by(&of_a, &a, "a"));
        // Another class naming the same secretName.
        assert!(!owned_by(&of_a, &b, "b"));
        // The same name again with another uid (deleted and created anew).
        assert!(!owned_by(&of_a, &class_owner("apps", "a", "uid-2"), "a"));
        // The onboarding agent's Secret: the managed-by label and nothing else.
        let agent = existing(&managed, &[]);
        assert!(!owned_by(&agent, &a, "a"));
        // No label: never ours, whatever the annotations say.
        assert!(!owned_by(
            &existing(&[], &[(OWNER_ANNOTATION, &a)]),
            &a,
            "a"
        ));
        // Written before owners were recorded: the class it names adopts it.
        let legacy = existing(&managed, &[(CLASS_ANNOTATION, "a")]);
        assert!(owned_by(&legacy, &a, "a"));
        assert!(!owned_by(&legacy, &b, "b"));
    }

    #[test]
    fn base64_errors_never_quote_the_value() {
        let spec: ObjectSpec = ProviderClass::parse(
            r#"{"apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
                "metadata": {"name": "app", "namespace": "apps"},
                "spec": {"provider": "azure", "parameters": {"keyvaultName": "contoso-kv", "tenantId": "t",
                "objects": "array:\n  - |\n    objectName: a\n    objectType: secret\n    objectEncoding: base64\n"}}}"#,
        )
        .unwrap()
        .objects
        .remove(0);
        // '=' (61) inside the text: base64's own error would say "Invalid symbol 61, offset 2".
        let fetched = Fetched {
            value: Secret::new("QU=B"),
            version: "v1".into(),
            content_type: None,
        };
        let err = error_chain(&encode(&spec, &fetched).unwrap_err());
        assert!(!err.contains("61") && !err.contains("symbol 6"), "{err}");
        assert!(err.contains("offset 2"), "{err}");
    }

    #[test]
    fn hex_decodes_and_says_where_it_fails_without_the_value() {
        assert_eq!(decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        let err = decode_hex("zz").unwrap_err().to_string();
        assert!(err.contains("offset 0") && !err.contains("zz"), "{err}");
    }
}

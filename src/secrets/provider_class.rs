//! A `secrets-store.csi.x-k8s.io/v1` SecretProviderClass with provider `azure`, read the way the
//! Azure provider reads it: `parameters` is a map of strings, and `objects` is YAML inside one
//! of those strings (`array:` of YAML documents, each again a string). `secretObjects` says
//! which Kubernetes Secrets to build from the fetched objects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::keyvault::{Format, ObjectRef, ObjectType};
use crate::entra::cloud::AZURE_STACK_CLOUD;
use crate::entra::Cloud;

/// Why a SecretProviderClass cannot be used; each variant names the part that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProviderClassError {
    #[error("SecretProviderClass: not valid YAML")]
    Yaml(#[source] serde_norway::Error),
    #[error("SecretProviderClass: expected apiVersion secrets-store.csi.x-k8s.io/v1 and kind SecretProviderClass, found {api_version} {kind}")]
    NotAProviderClass { api_version: String, kind: String },
    #[error("SecretProviderClass: '{name}' is for provider {provider:?}; only provider azure (Key Vault) is supported")]
    Provider { name: String, provider: String },
    #[error("SecretProviderClass: '{0}' has no parameters.keyvaultName")]
    NoKeyVault(String),
    #[error("SecretProviderClass: cloudName: {0}")]
    Cloud(String),
    #[error("SecretProviderClass: parameter {name} is {value:?}; use \"true\" or \"false\"")]
    Flag { name: String, value: String },
    #[error("SecretProviderClass: '{0}' sets usePodIdentity, and AAD pod identity is retired: use workload identity (clientID) or a managed identity (useVMManagedIdentity) instead")]
    PodIdentity(String),
    #[error("SecretProviderClass: '{0}' lists no objects (parameters.objects: array: ...)")]
    NoObjects(String),
    #[error("SecretProviderClass: object file name {0:?} must be a plain file name (no '/')")]
    FileName(String),
    #[error("SecretProviderClass: two objects are named {0:?}; give one an objectAlias")]
    DuplicateObject(String),
    #[error("SecretProviderClass: secretObjects '{0}' has no data")]
    EmptySecretObject(String),
    #[error("SecretProviderClass: secretObjects '{secret}' refers to objectName {object:?}, which is not the name or alias of any object in parameters.objects")]
    UnknownObject { secret: String, object: String },
    #[error(
        "SecretProviderClass: parameters.objects is not the expected 'array:' of YAML strings"
    )]
    ObjectsArray(#[source] serde_norway::Error),
    #[error("SecretProviderClass: objects entry {index}")]
    ObjectEntry {
        index: usize,
        #[source]
        source: serde_norway::Error,
    },
    /// `objectType` or `objectFormat` with a value those types do not parse.
    #[error("SecretProviderClass: object {object:?}: {reason}")]
    ObjectField { object: String, reason: String },
    #[error("SecretProviderClass: object {object:?}: unknown objectEncoding {encoding:?}; use utf-8, base64 or hex")]
    ObjectEncoding { object: String, encoding: String },
}

/// How the written file is encoded from the object's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Utf8,
    /// The value is base64 and the file holds the decoded bytes.
    Base64,
    /// The value is hex and the file holds the decoded bytes.
    Hex,
}

/// One entry of `objects`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectSpec {
    pub object: ObjectRef,
    pub alias: Option<String>,
    pub format: Format,
    pub encoding: Encoding,
}

impl ObjectSpec {
    /// The file name under the mount and the name `secretObjects` refer to.
    pub fn file_name(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.object.name)
    }
}

/// Which identity the class asks for (`usePodIdentity` is refused: AAD pod identity is retired).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Identity {
    /// No identity parameter: the credential chain (or `--credentials-secret`).
    #[default]
    Default,
    /// `useVMManagedIdentity: "true"`, with `userAssignedIdentityID` when given.
    ManagedIdentity { client_id: Option<String> },
    /// `clientID`: workload identity federation for that application.
    WorkloadIdentity { client_id: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretObjectData {
    /// The `objectName`: an object's alias or name.
    pub object_name: String,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretObject {
    pub secret_name: String,
    pub secret_type: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub data: Vec<SecretObjectData>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderClass {
    pub name: String,
    pub namespace: Option<String>,
    pub keyvault_name: String,
    pub tenant_id: Option<String>,
    /// `cloudName`: a built-in cloud's name, or `AzureStackCloud` with `cloudEnvFileName`.
    pub cloud: Option<String>,
    /// `cloudEnvFileName`: the Go SDK's environment file describing `AzureStackCloud`.
    pub cloud_env_file: Option<PathBuf>,
    pub identity: Identity,
    pub objects: Vec<ObjectSpec>,
    pub secret_objects: Vec<SecretObject>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    provider: String,
    #[serde(default)]
    parameters: BTreeMap<String, Option<serde_norway::Value>>,
    #[serde(default)]
    secret_objects: Vec<RawSecretObject>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSecretObject {
    secret_name: String,
    #[serde(rename = "type")]
    secret_type: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    data: Vec<RawData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawData {
    object_name: String,
    key: String,
}

#[derive(Deserialize)]
struct ObjectArray {
    #[serde(default)]
    array: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawObject {
    object_name: String,
    #[serde(default)]
    object_type: Option<String>,
    #[serde(default)]
    object_version: Option<String>,
    #[serde(default)]
    object_alias: Option<String>,
    #[serde(default)]
    object_format: Option<String>,
    #[serde(default)]
    object_encoding: Option<String>,
    /// Read and ignored: version history directories are not written.
    #[serde(default)]
    object_version_history: Option<serde_norway::Value>,
}

/// A parameter as text: YAML may make `"false"` a string and `false` a bool; empty is absent.
fn text(params: &Parameters, name: &str) -> Option<String> {
    let value = params.get(name)?.as_ref()?;
    let s = match value {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Bool(b) => b.to_string(),
        serde_norway::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

type Parameters = BTreeMap<String, Option<serde_norway::Value>>;

fn flag(params: &Parameters, name: &str) -> Result<bool, ProviderClassError> {
    match text(params, name)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ProviderClassError::Flag {
            name: name.to_string(),
            value: other.to_string(),
        }),
    }
}

/// A name that is safe as a single file name under the mount directory.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 253
}

impl ProviderClass {
    pub fn parse(yaml: &str) -> Result<ProviderClass, ProviderClassError> {
        let doc: Document = serde_norway::from_str(yaml).map_err(ProviderClassError::Yaml)?;
        check_kind(&doc)?;
        let name = doc.metadata.name;
        let params = &doc.spec.parameters;
        let keyvault_name = text(params, "keyvaultName")
            .ok_or_else(|| ProviderClassError::NoKeyVault(name.clone()))?;
        let cloud = text(params, "cloudName")
            .map(|c| {
                let stack = c.eq_ignore_ascii_case(AZURE_STACK_CLOUD);
                match c.parse::<Cloud>() {
                    Ok(builtin) => Ok(builtin.name().to_string()),
                    Err(_) if stack => Ok(AZURE_STACK_CLOUD.to_string()),
                    Err(e) => Err(ProviderClassError::Cloud(format!(
                        "{e}; the CSI driver also knows {AZURE_STACK_CLOUD} (with cloudEnvFileName)"
                    ))),
                }
            })
            .transpose()?;
        let cloud_env_file = text(params, "cloudEnvFileName").map(PathBuf::from);
        let identity = identity(&name, params)?;
        let objects = parse_objects(&text(params, "objects").unwrap_or_default())?;
        if objects.is_empty() {
            return Err(ProviderClassError::NoObjects(name));
        }
        let file_names = unique_file_names(&objects)?;
        let secret_objects = doc
            .spec
            .secret_objects
            .into_iter()
            .map(|raw| secret_object(raw, &file_names))
            .collect::<Result<_, _>>()?;
        Ok(ProviderClass {
            name,
            namespace: doc.metadata.namespace,
            keyvault_name,
            tenant_id: text(params, "tenantId").or_else(|| text(params, "tenantID")),
            cloud,
            cloud_env_file,
            identity,
            objects,
            secret_objects,
        })
    }
}

/// Only `secrets-store.csi.x-k8s.io` SecretProviderClasses of provider `azure`.
fn check_kind(doc: &Document) -> Result<(), ProviderClassError> {
    if !doc.api_version.starts_with("secrets-store.csi.x-k8s.io/")
        || doc.kind != "SecretProviderClass"
    {
        return Err(ProviderClassError::NotAProviderClass {
            api_version: doc.api_version.clone(),
            kind: doc.kind.clone(),
        });
    }
    if doc.spec.provider != "azure" {
        return Err(ProviderClassError::Provider {
            name: doc.metadata.name.clone(),
            provider: doc.spec.provider.clone(),
        });
    }
    Ok(())
}

/// The identity the parameters ask for; `usePodIdentity` is refused.
fn identity(name: &str, params: &Parameters) -> Result<Identity, ProviderClassError> {
    if flag(params, "usePodIdentity")? {
        return Err(ProviderClassError::PodIdentity(name.to_string()));
    }
    Ok(if let Some(client_id) = text(params, "clientID") {
        Identity::WorkloadIdentity { client_id }
    } else if flag(params, "useVMManagedIdentity")? {
        Identity::ManagedIdentity {
            client_id: text(params, "userAssignedIdentityID"),
        }
    } else {
        Identity::Default
    })
}

/// The objects' file names, each a plain file name and none twice.
fn unique_file_names(objects: &[ObjectSpec]) -> Result<BTreeSet<String>, ProviderClassError> {
    let mut seen = BTreeSet::new();
    for o in objects {
        if !valid_file_name(o.file_name()) {
            return Err(ProviderClassError::FileName(o.file_name().to_string()));
        }
        if !seen.insert(o.file_name().to_string()) {
            return Err(ProviderClassError::DuplicateObject(
                o.file_name().to_string(),
            ));
        }
    }
    Ok(seen)
}

/// One `secretObjects` entry, whose data must name objects of the class.
fn secret_object(
    raw: RawSecretObject,
    file_names: &BTreeSet<String>,
) -> Result<SecretObject, ProviderClassError> {
    if raw.data.is_empty() {
        return Err(ProviderClassError::EmptySecretObject(raw.secret_name));
    }
    let mut data = Vec::new();
    for d in raw.data {
        if !file_names.contains(&d.object_name) {
            return Err(ProviderClassError::UnknownObject {
                secret: raw.secret_name,
                object: d.object_name,
            });
        }
        data.push(SecretObjectData {
            object_name: d.object_name,
            key: d.key,
        });
    }
    Ok(SecretObject {
        secret_name: raw.secret_name,
        secret_type: raw.secret_type,
        labels: raw.labels,
        annotations: raw.annotations,
        data,
    })
}

fn parse_objects(text: &str) -> Result<Vec<ObjectSpec>, ProviderClassError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let array: ObjectArray =
        serde_norway::from_str(text).map_err(ProviderClassError::ObjectsArray)?;
    array
        .array
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let raw: RawObject = serde_norway::from_str(entry).map_err(|source| {
                ProviderClassError::ObjectEntry {
                    index: i + 1,
                    source,
                }
            })?;
            object_spec(raw)
        })
        .collect()
}

/// One entry of `objects`, its type, format and encoding checked.
fn object_spec(raw: RawObject) -> Result<ObjectSpec, ProviderClassError> {
    let field = |reason: String| ProviderClassError::ObjectField {
        object: raw.object_name.clone(),
        reason,
    };
    let kind = match raw
        .object_type
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        None => ObjectType::Secret,
        Some(t) => t.parse::<ObjectType>().map_err(field)?,
    };
    let format: Format = raw
        .object_format
        .as_deref()
        .unwrap_or("")
        .parse()
        .map_err(field)?;
    let encoding = encoding(&raw)?;
    let _ = raw.object_version_history;
    Ok(ObjectSpec {
        object: ObjectRef {
            kind,
            name: raw.object_name.trim().to_string(),
            version: raw
                .object_version
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty()),
        },
        alias: raw
            .object_alias
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty()),
        format,
        encoding,
    })
}

fn encoding(raw: &RawObject) -> Result<Encoding, ProviderClassError> {
    match raw
        .object_encoding
        .as_deref()
        .map(|e| e.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("utf-8") | Some("utf8") => Ok(Encoding::Utf8),
        Some("base64") => Ok(Encoding::Base64),
        Some("hex") => Ok(Encoding::Hex),
        Some(other) => Err(ProviderClassError::ObjectEncoding {
            object: raw.object_name.clone(),
            encoding: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's class (Arc extension docs), with the placeholders filled in.
    pub(crate) const SEED: &str = r#"
# This is a SecretProviderClass example using service principal to access Keyvault
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: akvprovider-demo
spec:
  provider: azure
  parameters:
    usePodIdentity: "false"
    keyvaultName: contoso-kv
    cloudName:                           # Defaults to AzurePublicCloud
    objects:  |
      array:
        - |
          objectName: DemoSecret
          objectType: secret             # object types: secret, key or cert
          objectVersion: ""              # [OPTIONAL] object versions, default to latest if empty
    tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47                # The tenant ID of the Azure Key Vault instance
"#;

    #[test]
    fn the_seed_class_parses() {
        let spc = ProviderClass::parse(SEED).unwrap();
        assert_eq!(spc.name, "akvprovider-demo");
        assert_eq!(spc.keyvault_name, "contoso-kv");
        assert_eq!(spc.cloud, None);
        assert_eq!(spc.identity, Identity::Default);
        assert_eq!(
            spc.tenant_id.as_deref(),
            Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
        );
        assert_eq!(spc.objects.len(), 1);
        let o = &spc.objects[0];
        assert_eq!(o.object.kind, ObjectType::Secret);
        assert_eq!(o.object.name, "DemoSecret");
        assert_eq!(o.object.version, None);
        assert_eq!(o.file_name(), "DemoSecret");
        assert!(spc.secret_objects.is_empty());
    }

    #[test]
    fn every_object_field_and_secret_objects_parse() {
        let yaml = r#"
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: web, namespace: apps}
spec:
  provider: azure
  secretObjects:
  - secretName: web-tls
    type: kubernetes.io/tls
    labels: {team: web}
    data:
    - {objectName: tls, key: tls.key}
    - {objectName: tls, key: tls.crt}
  parameters:
    useVMManagedIdentity: "true"
    userAssignedIdentityID: 00000000-0000-0000-0000-0000000000aa
    keyvaultName: kv1
    cloudName: AzureUSGovernmentCloud
    objects: |
      array:
        - |
          objectName: web-cert
          objectType: cert
          objectAlias: tls
          objectFormat: pem
        - |
          objectName: signing
          objectType: key
          objectVersion: 0123abcd
        - |
          objectName: blob
          objectEncoding: base64
"#;
        let spc = ProviderClass::parse(yaml).unwrap();
        assert_eq!(spc.namespace.as_deref(), Some("apps"));
        assert_eq!(spc.cloud.as_deref(), Some("AzureUSGovernmentCloud"));
        let stack = yaml.replace(
            "cloudName: AzureUSGovernmentCloud",
            "cloudName: AzureStackCloud\n    cloudEnvFileName: /etc/kubernetes/azurestackcloud.json",
        );
        let spc = ProviderClass::parse(&stack).unwrap();
        assert_eq!(spc.cloud.as_deref(), Some("AzureStackCloud"));
        assert_eq!(
            spc.cloud_env_file.as_deref(),
            Some(std::path::Path::new("/etc/kubernetes/azurestackcloud.json"))
        );
        let mars = yaml.replace("cloudName: AzureUSGovernmentCloud", "cloudName: Mars");
        assert!(ProviderClass::parse(&mars).is_err());
        assert_eq!(
            spc.identity,
            Identity::ManagedIdentity {
                client_id: Some("00000000-0000-0000-0000-0000000000aa".into())
            }
        );
        assert_eq!(spc.objects[0].file_name(), "tls");
        assert_eq!(spc.objects[0].object.kind, ObjectType::Cert);
        assert_eq!(spc.objects[1].object.version.as_deref(), Some("0123abcd"));
        assert_eq!(spc.objects[2].encoding, Encoding::Base64);
        assert_eq!(spc.secret_objects[0].secret_type, "kubernetes.io/tls");
        assert_eq!(spc.secret_objects[0].data.len(), 2);

        let bad_ref = yaml.replace(
            "{objectName: tls, key: tls.crt}",
            "{objectName: web-cert, key: tls.crt}",
        );
        let err = ProviderClass::parse(&bad_ref).unwrap_err().to_string();
        assert!(
            err.contains("\"web-cert\", which is not the name or alias"),
            "{err}"
        );
        let pod = SEED.replace("usePodIdentity: \"false\"", "usePodIdentity: \"true\"");
        assert!(ProviderClass::parse(&pod)
            .unwrap_err()
            .to_string()
            .contains("workload identity"));
        let gcp = SEED.replace("provider: azure", "provider: gcp");
        assert!(ProviderClass::parse(&gcp)
            .unwrap_err()
            .to_string()
            .contains("only provider azure"));
        let traversal = SEED.replace(
            "objectName: DemoSecret",
            "objectName: DemoSecret\n          objectAlias: ../etc",
        );
        assert!(ProviderClass::parse(&traversal)
            .unwrap_err()
            .to_string()
            .contains("plain file name"));
    }
}

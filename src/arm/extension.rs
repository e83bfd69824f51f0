//! The cluster extension resource as ARM shapes it
//! (`Microsoft.KubernetesConfiguration/extensions`, what `az k8s-extension show` prints), one
//! per connected cluster, under the cluster's id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::resource::{ClusterId, ErrorDetail, SystemData};

pub const EXTENSION_RESOURCE_TYPE: &str = "Microsoft.KubernetesConfiguration/extensions";
/// The one extension type served: the Azure Key Vault Secrets Provider.
pub const KEY_VAULT_EXTENSION_TYPE: &str = "Microsoft.AzureKeyVaultSecretsProvider";

/// `<cluster id>/providers/Microsoft.KubernetesConfiguration/extensions/<name>`.
pub fn extension_path(cluster: &ClusterId, name: &str) -> String {
    format!(
        "{}/providers/{EXTENSION_RESOURCE_TYPE}/{name}",
        cluster.path()
    )
}

/// Extension names follow ARM's rules for nested resources (and Helm's for release names).
pub fn check_extension_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "extension name {:?} must be 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit",
            crate::secret::clip(name, 100)
        ))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Extension {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub properties: ExtensionProperties,
    pub system_data: SystemData,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProperties {
    pub extension_type: String,
    #[serde(default)]
    pub auto_upgrade_minor_version: bool,
    #[serde(default)]
    pub release_train: String,
    /// The version installed (`None` until an install succeeded), as `az` shows it.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub current_version: Option<String>,
    #[serde(default)]
    pub scope: ExtensionScope,
    #[serde(default)]
    pub configuration_settings: BTreeMap<String, String>,
    /// Never stored: accepted and dropped, like ARM never returns them.
    #[serde(default)]
    pub configuration_protected_settings: BTreeMap<String, String>,
    /// Creating, Succeeded, Failed, Updating, Deleting.
    #[serde(default)]
    pub provisioning_state: String,
    #[serde(default)]
    pub statuses: Vec<ExtensionStatus>,
    #[serde(default)]
    pub error_info: Option<ErrorDetail>,
    #[serde(default)]
    pub is_system_extension: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionScope {
    pub cluster: ClusterScope,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterScope {
    pub release_namespace: String,
}

/// One entry of `statuses`, as the Arc extension operator reports them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionStatus {
    pub code: String,
    pub display_status: String,
    /// Information, Warning or Error.
    pub level: String,
    pub message: String,
    pub time: String,
}

/// What a PUT carries: the caller's part (type, settings, namespace) and, from the installer
/// that applied it, the state it found, as the Arc extension agent reports it.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionRequest {
    pub properties: ExtensionProperties,
}

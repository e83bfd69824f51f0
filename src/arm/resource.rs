//! The connected-cluster resource as ARM shapes it, its id, and the cluster user role.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const RESOURCE_TYPE: &str = "Microsoft.Kubernetes/connectedClusters";
pub const API_VERSION: &str = "2024-01-01";
/// The self-hosted default subscription: a namespace for resource groups, nothing more.
pub const DEFAULT_SUBSCRIPTION: &str = "00000000-0000-0000-0000-000000000000";
/// The built-in "Azure Arc Enabled Kubernetes Cluster User Role", the one role that may list
/// user credentials.
pub const CLUSTER_USER_ROLE: &str = "00493d72-78f6-4148-b6c5-d3ce8e4799dd";

/// Where a cluster lives: `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Kubernetes/connectedClusters/{name}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterId {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

impl ClusterId {
    /// Checks the parts the way ARM does (length and characters); the error names the part
    /// that is wrong.
    pub fn new(subscription: &str, resource_group: &str, name: &str) -> Result<ClusterId, IdError> {
        check_part("subscription", subscription, 64, &['-'])?;
        check_part(
            "resource group",
            resource_group,
            90,
            &['-', '_', '.', '(', ')'],
        )?;
        check_part("cluster name", name, 63, &['-', '_', '.'])?;
        Ok(ClusterId {
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            name: name.to_string(),
        })
    }

    /// Parses a full resource id, as `connect` passes it to the agent.
    pub fn parse(id: &str) -> Result<ClusterId, IdError> {
        let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            [s, sub, r, rg, p, ns, t, name]
                if s.eq_ignore_ascii_case("subscriptions")
                    && r.eq_ignore_ascii_case("resourceGroups")
                    && p.eq_ignore_ascii_case("providers")
                    && format!("{ns}/{t}").eq_ignore_ascii_case(RESOURCE_TYPE) =>
            {
                ClusterId::new(sub, rg, name)
            }
            _ => Err(IdError::NotAClusterId(crate::secret::clip(id, 300))),
        }
    }

    pub fn path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{RESOURCE_TYPE}/{}",
            self.subscription, self.resource_group, self.name
        )
    }

    /// ARM ids compare case-insensitively; this is the store's key.
    pub fn key(&self) -> String {
        self.path().to_ascii_lowercase()
    }

    /// The hybrid connection that carries this cluster's traffic: derived from the id, so it
    /// is stable, unique and always a valid entity name.
    pub fn hybrid_connection(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.key().as_bytes());
        let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
        format!("cc-{hex}")
    }
}

/// Why a name or id is not a connected cluster's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{part} {value:?} must be 1-{max} letters, digits or {}", quoted(.allowed))]
    Part {
        part: &'static str,
        value: String,
        max: usize,
        allowed: &'static [char],
    },
    #[error("{0:?} is not a connected cluster id (/subscriptions/<s>/resourceGroups/<rg>/providers/{RESOURCE_TYPE}/<name>)")]
    NotAClusterId(String),
}

fn check_part(
    part: &'static str,
    value: &str,
    max: usize,
    allowed: &'static [char],
) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || allowed.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(IdError::Part {
            part,
            value: crate::secret::clip(value, 100),
            max,
            allowed,
        })
    }
}

/// `'-', '_'`: the extra characters a part may have, for the message.
fn quoted(chars: &[char]) -> String {
    chars
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectivityStatus {
    Connecting,
    Connected,
    Offline,
    Expired,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectedCluster {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub identity: Identity,
    pub properties: Properties,
    pub system_data: SystemData,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    #[serde(rename = "type")]
    pub kind: String,
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Properties {
    pub agent_public_key_certificate: String,
    pub agent_version: Option<String>,
    pub connectivity_status: ConnectivityStatus,
    pub distribution: Option<String>,
    pub infrastructure: Option<String>,
    pub kubernetes_version: Option<String>,
    pub last_connectivity_time: Option<String>,
    pub provisioning_state: String,
    pub total_core_count: Option<u32>,
    pub total_node_count: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SystemData {
    pub created_at: String,
    pub created_by: String,
    pub created_by_type: String,
    pub last_modified_at: String,
    pub last_modified_by: String,
    pub last_modified_by_type: String,
}

/// What a PUT carries: the caller's part of the resource.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRequest {
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub properties: RequestProperties,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RequestProperties {
    pub agent_public_key_certificate: String,
    pub distribution: Option<String>,
    pub infrastructure: Option<String>,
}

/// `listClusterUserCredential`'s answer, as Arc returns it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialResults {
    pub hybrid_connection_config: HybridConnectionConfig,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HybridConnectionConfig {
    /// `wss://host[:port]` of the relay.
    pub relay: String,
    pub hybrid_connection_name: String,
    /// A Send SAS token for this cluster's hybrid connection only.
    pub token: String,
    /// Unix seconds.
    pub expiration_time: u64,
}

/// `listAgentCredential`'s answer: what the installer puts in the agent's Secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCredential {
    pub relay: String,
    pub hybrid_connection_name: String,
    /// `SharedAccessKeyName=...;SharedAccessKey=...` with Listen rights on that connection.
    pub listen_key: String,
}

/// `listKeys` and `regenerateKeys`' answer, in Azure Relay's shape for an authorization
/// rule: the agent's Listen rule with both its keys, each also as a key-file line.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessKeys {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// `SharedAccessKeyName=...;SharedAccessKey=...`, what the agent's `--key-file` holds.
    pub primary_connection_string: String,
    pub secondary_connection_string: String,
}

impl std::fmt::Debug for AccessKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeys")
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

// Debug without the credentials they carry.
impl std::fmt::Debug for HybridConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridConnectionConfig")
            .field("relay", &self.relay)
            .field("hybrid_connection_name", &self.hybrid_connection_name)
            .field("token", &"***")
            .field("expiration_time", &self.expiration_time)
            .finish()
    }
}

impl std::fmt::Debug for AgentCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredential")
            .field("relay", &self.relay)
            .field("hybrid_connection_name", &self.hybrid_connection_name)
            .field("listen_key", &"***")
            .finish()
    }
}

/// ARM's error body: `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_map_to_a_stable_connection() {
        let id = ClusterId::new(DEFAULT_SUBSCRIPTION, "rg-1", "prod").unwrap();
        assert_eq!(
            id.path(),
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-1/providers/Microsoft.Kubernetes/connectedClusters/prod"
        );
        let same = ClusterId::new(DEFAULT_SUBSCRIPTION, "RG-1", "Prod").unwrap();
        assert_eq!(id.hybrid_connection(), same.hybrid_connection());
        assert!(id.hybrid_connection().starts_with("cc-"));
        assert_eq!(ClusterId::parse(&id.path()).unwrap(), id);
        assert!(ClusterId::parse("/subscriptions/s/resourceGroups/rg").is_err());
        let err = ClusterId::new(DEFAULT_SUBSCRIPTION, "rg", "a/b").unwrap_err();
        assert!(
            matches!(
                err,
                IdError::Part {
                    part: "cluster name",
                    ..
                }
            ),
            "{err}"
        );
    }
}

//! The management API's handlers for authenticated callers: one function per method and
//! path, each given the caller and the whole (bounded) body. They read and write the store,
//! so they block: `api` runs them on a blocking worker.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::caller::Caller;
use super::error::ApiError;
use super::path::Scope;
use super::reply::{self, Body};
use super::store::{Change, Record, Store};
use super::view::{present, rfc3339, status_of};
use crate::arm::{
    agent_key, AccessKeys, AgentCredential, ClusterId, ClusterRequest, ConnectedCluster,
    ConnectivityStatus, CredentialResults, HybridConnectionConfig, Identity, Properties,
    SystemData, CLUSTER_USER_ROLE, RESOURCE_TYPE,
};
use crate::secret::Secret;
use crate::tunnel::protocol::RelayAddress;
use crate::tunnel::sas::{unix_now, SasKey};

/// Lifetime of the Send tokens `listClusterUserCredential` mints.
pub const USER_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// One authenticated request, owned, so it can move to a blocking worker.
pub struct Call {
    pub store: Store,
    pub caller: Caller,
    /// The `host[:port]` clients should use for this relay.
    pub relay_host: Option<String>,
    pub body: Bytes,
}

pub type Reply = Result<Response<Body>, ApiError>;

/// `GET .../connectedClusters`: the clusters in scope the caller has a role on.
pub fn list(call: &Call, scope: &Scope) -> Reply {
    let prefix = scope.prefix();
    let value: Vec<ConnectedCluster> = call
        .store
        .all()?
        .into_iter()
        .filter(|r| r.resource.id.to_ascii_lowercase().starts_with(&prefix))
        .filter(|r| may_read(&call.caller, r))
        .map(|r| present(&r))
        .collect();
    Ok(reply::json(StatusCode::OK, &json!({ "value": value })))
}

/// `GET .../{name}`.
pub fn show(call: &Call, id: &ClusterId) -> Reply {
    let record = readable(call, id)?;
    Ok(reply::json(StatusCode::OK, &present(&record)))
}

/// `PUT .../{name}`: registers a cluster (201) or updates the caller's own registration (200).
pub fn put(call: &Call, id: &ClusterId) -> Reply {
    let request: ClusterRequest =
        serde_json::from_slice(&call.body).map_err(ApiError::ClusterBody)?;
    if request.location.trim().is_empty() {
        return Err(ApiError::LocationRequired);
    }
    agent_key(&request.properties.agent_public_key_certificate).map_err(ApiError::AgentKey)?;
    let caller = &call.caller;
    let now = rfc3339(unix_now());
    let (record, created) = call.store.update(&id.key(), |current| {
        let (record, created) = match current {
            Some(mut record) => {
                owner(caller, &record, id)?;
                update_record(&mut record, caller, request.clone(), now.clone());
                (record, false)
            }
            None => (new_record(caller, id, request.clone(), now.clone()), true),
        };
        Ok::<_, ApiError>((Change::Put(Box::new(record.clone())), (record, created)))
    })?;
    tracing::info!(cluster = %id.path(), by = caller.display_name(), created, "cluster registered");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply::json(status, &present(&record)))
}

/// `DELETE .../{name}`: 200 when there was a registration, 204 when there was none.
pub fn delete(call: &Call, id: &ClusterId) -> Reply {
    let deleted = call.store.update(&id.key(), |current| match current {
        None => Ok((Change::Keep, false)),
        Some(record) => {
            owner(&call.caller, &record, id)?;
            Ok::<_, ApiError>((Change::Delete, true))
        }
    })?;
    if deleted {
        tracing::info!(cluster = %id.path(), by = call.caller.display_name(), "cluster registration deleted");
    }
    Ok(reply::changed(deleted))
}

/// `POST .../{name}/listClusterUserCredential`: a Send token for that cluster only.
pub fn list_user_credential(call: &Call, id: &ClusterId) -> Reply {
    let record = readable(call, id)?;
    if status_of(&record) == ConnectivityStatus::Expired {
        return Err(ApiError::Expired(id.name.clone()));
    }
    let relay = relay_address(call.relay_host.as_deref())?;
    // A principal's token is signed with a key that exists only while they hold a role, so
    // withdrawing the role revokes it (and the relay closes what it opened).
    let key = match &call.caller {
        Caller::Principal { object_id, .. } => SasKey {
            name: record.user_send_rule(object_id),
            key: record.user_send_key(object_id),
        },
        Caller::Admin { .. } => SasKey {
            name: record.send_rule(),
            key: Secret::new(record.send_key.clone()),
        },
    };
    let expiration_time = unix_now() + USER_TOKEN_TTL.as_secs();
    let token = key.mint_until(
        &relay.resource_uri(&record.hybrid_connection),
        expiration_time,
    );
    let results = CredentialResults {
        hybrid_connection_config: HybridConnectionConfig {
            relay: format!("wss://{}", relay.authority()),
            hybrid_connection_name: record.hybrid_connection.clone(),
            token: token.expose().to_string(),
            expiration_time,
        },
    };
    tracing::info!(cluster = %id.path(), by = call.caller.display_name(), "user credential issued");
    Ok(reply::json(StatusCode::OK, &results))
}

/// `POST .../{name}/listAgentCredential` (owners): the agent's Listen key, for the installer.
pub fn list_agent_credential(call: &Call, id: &ClusterId) -> Reply {
    let record = existing(&call.store, id)?;
    owner(&call.caller, &record, id)?;
    let relay = relay_address(call.relay_host.as_deref())?;
    let credential = AgentCredential {
        relay: format!("wss://{}", relay.authority()),
        hybrid_connection_name: record.hybrid_connection.clone(),
        listen_key: format!(
            "SharedAccessKeyName={}-listen;SharedAccessKey={}",
            record.hybrid_connection, record.listen_key
        ),
    };
    Ok(reply::json(StatusCode::OK, &credential))
}

/// `POST .../{name}/listKeys` (owners): the agent's Listen rule with both keys.
pub fn list_keys(call: &Call, id: &ClusterId) -> Reply {
    let record = existing(&call.store, id)?;
    owner(&call.caller, &record, id)?;
    Ok(reply::json(StatusCode::OK, &access_keys(&record)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Regenerate {
    key_type: KeyType,
}

/// Azure Relay's names for the keys, and ours for the Send key.
#[derive(Deserialize, Clone, Copy, Debug)]
enum KeyType {
    #[serde(rename = "PrimaryKey")]
    Primary,
    #[serde(rename = "SecondaryKey")]
    Secondary,
    /// The relay's own key behind every user token: renewing it ends every user's session.
    #[serde(rename = "SendKey")]
    Send,
}

/// `POST .../{name}/regenerateKeys` (owners) with `{"keyType": ...}`: a new value for one
/// key. What the old value authorized (listeners, tunnels, user tokens) is closed at once.
pub fn regenerate_keys(call: &Call, id: &ClusterId) -> Reply {
    let request: Regenerate = serde_json::from_slice(&call.body).map_err(ApiError::KeyTypeBody)?;
    let record = call.store.update(&id.key(), |current| {
        let mut record = current.ok_or_else(|| ApiError::not_found(id))?;
        owner(&call.caller, &record, id)?;
        match request.key_type {
            KeyType::Primary => record.listen_key = random_key(),
            KeyType::Secondary => record.listen_key_secondary = Some(random_key()),
            KeyType::Send => record.send_key = random_key(),
        }
        Ok::<_, ApiError>((Change::Put(Box::new(record.clone())), record))
    })?;
    tracing::info!(cluster = %id.path(), by = call.caller.display_name(), key = ?request.key_type, "key regenerated");
    Ok(reply::json(StatusCode::OK, &access_keys(&record)))
}

fn access_keys(record: &Record) -> AccessKeys {
    let name = record.listen_rule();
    let line = |key: &str| format!("SharedAccessKeyName={name};SharedAccessKey={key}");
    // Registrations from before the secondary key existed get one on their first renewal.
    let secondary = record.listen_key_secondary.clone().unwrap_or_default();
    AccessKeys {
        primary_connection_string: line(&record.listen_key),
        secondary_connection_string: if secondary.is_empty() {
            String::new()
        } else {
            line(&secondary)
        },
        key_name: name.clone(),
        primary_key: record.listen_key.clone(),
        secondary_key: secondary,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Assignment {
    properties: AssignmentProperties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentProperties {
    principal_id: String,
    role_definition_id: String,
}

/// `PUT .../{name}/providers/Microsoft.Authorization/roleAssignments/{id}` (owners): grants
/// the cluster user role.
pub fn grant_role(call: &Call, id: &ClusterId, assignment: &str) -> Reply {
    let request: Assignment =
        serde_json::from_slice(&call.body).map_err(ApiError::AssignmentBody)?;
    let role = request
        .properties
        .role_definition_id
        .rsplit('/')
        .next()
        .unwrap_or_default();
    if !role.eq_ignore_ascii_case(CLUSTER_USER_ROLE) {
        return Err(ApiError::RoleNotAssignable);
    }
    let principal = request.properties.principal_id.to_ascii_lowercase();
    call.store.update(&id.key(), |current| {
        let mut record = current.ok_or_else(|| ApiError::not_found(id))?;
        owner(&call.caller, &record, id)?;
        record
            .assignments
            .insert(assignment.to_string(), principal.clone());
        Ok::<_, ApiError>((Change::Put(Box::new(record)), ()))
    })?;
    tracing::info!(cluster = %id.path(), principal, assignment, "cluster user role granted");
    Ok(reply::json(
        StatusCode::OK,
        &json!({
            "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{assignment}", id.path()),
            "name": assignment,
            "properties": {"principalId": principal, "roleDefinitionId": CLUSTER_USER_ROLE, "scope": id.path()}
        }),
    ))
}

/// `DELETE .../roleAssignments/{id}` (owners): 200 when it existed, 204 when it did not.
pub fn revoke_role(call: &Call, id: &ClusterId, assignment: &str) -> Reply {
    let removed = call.store.update(&id.key(), |current| {
        let mut record = current.ok_or_else(|| ApiError::not_found(id))?;
        owner(&call.caller, &record, id)?;
        let removed = record.assignments.remove(assignment);
        Ok::<_, ApiError>((Change::Put(Box::new(record)), removed))
    })?;
    if let Some(principal) = &removed {
        tracing::info!(cluster = %id.path(), principal, assignment, "cluster user role revoked");
    }
    Ok(reply::changed(removed.is_some()))
}

/// A re-registration by an owner: the caller's part of the resource and who changed it when.
fn update_record(record: &mut Record, caller: &Caller, request: ClusterRequest, now: String) {
    let r = &mut record.resource;
    r.location = request.location;
    r.tags = request.tags;
    r.properties.agent_public_key_certificate = request.properties.agent_public_key_certificate;
    r.properties.distribution = request.properties.distribution;
    r.properties.infrastructure = request.properties.infrastructure;
    r.system_data.last_modified_at = now;
    r.system_data.last_modified_by = caller.display_name().to_string();
    r.system_data.last_modified_by_type = caller.kind().to_string();
}

/// A first registration: the caller owns it; it gets fresh Listen and Send keys.
fn new_record(caller: &Caller, id: &ClusterId, request: ClusterRequest, now: String) -> Record {
    let owners = match caller {
        Caller::Principal { object_id, .. } => vec![object_id.to_ascii_lowercase()],
        Caller::Admin { .. } => Vec::new(),
    };
    Record {
        resource: new_resource(caller, id, request, now),
        owners,
        assignments: Default::default(),
        hybrid_connection: id.hybrid_connection(),
        listen_key: random_key(),
        listen_key_secondary: Some(random_key()),
        send_key: random_key(),
        last_heartbeat: None,
        last_report_timestamp: 0,
        extension: None,
    }
}

fn new_resource(
    caller: &Caller,
    id: &ClusterId,
    request: ClusterRequest,
    now: String,
) -> ConnectedCluster {
    ConnectedCluster {
        id: id.path(),
        name: id.name.clone(),
        kind: RESOURCE_TYPE.to_string(),
        location: request.location,
        tags: request.tags,
        identity: Identity {
            kind: "None".into(),
            principal_id: None,
            tenant_id: None,
        },
        properties: Properties {
            agent_public_key_certificate: request.properties.agent_public_key_certificate,
            agent_version: None,
            connectivity_status: ConnectivityStatus::Connecting,
            distribution: request.properties.distribution,
            infrastructure: request.properties.infrastructure,
            kubernetes_version: None,
            last_connectivity_time: None,
            provisioning_state: "Succeeded".into(),
            total_core_count: None,
            total_node_count: None,
        },
        system_data: SystemData {
            created_at: now.clone(),
            created_by: caller.display_name().to_string(),
            created_by_type: caller.kind().to_string(),
            last_modified_at: now,
            last_modified_by: caller.display_name().to_string(),
            last_modified_by_type: caller.kind().to_string(),
        },
    }
}

fn random_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

pub(super) fn may_read(caller: &Caller, record: &Record) -> bool {
    match caller {
        Caller::Admin { .. } => true,
        Caller::Principal { object_id, .. } => {
            let id = object_id.to_ascii_lowercase();
            record.owners.contains(&id) || record.assignments.values().any(|p| *p == id)
        }
    }
}

pub(super) fn owner(caller: &Caller, record: &Record, id: &ClusterId) -> Result<(), ApiError> {
    let ok = match caller {
        Caller::Admin { .. } => true,
        Caller::Principal { object_id, .. } => {
            record.owners.contains(&object_id.to_ascii_lowercase())
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotOwner {
            caller: caller.display_name().to_string(),
            cluster: id.path(),
        })
    }
}

pub(super) fn existing(store: &Store, id: &ClusterId) -> Result<Record, ApiError> {
    store.get(&id.key())?.ok_or_else(|| ApiError::not_found(id))
}

pub(super) fn readable(call: &Call, id: &ClusterId) -> Result<Record, ApiError> {
    let record = existing(&call.store, id)?;
    if !may_read(&call.caller, &record) {
        return Err(ApiError::NoRole {
            caller: call.caller.display_name().to_string(),
            cluster: id.path(),
        });
    }
    Ok(record)
}

fn relay_address(host: Option<&str>) -> Result<RelayAddress, ApiError> {
    let host = host.ok_or(ApiError::NoHost)?;
    RelayAddress::parse(&format!("wss://{host}")).map_err(ApiError::RelayAddress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::clusters::view::{EXPIRED_AFTER, OFFLINE_AFTER};

    #[test]
    fn status_follows_the_last_report() {
        let caller = Caller::Admin {
            rule: "admin".into(),
        };
        let id = ClusterId::new("s", "rg", "c").unwrap();
        let mut record = new_record(&caller, &id, ClusterRequest::default(), rfc3339(0));
        assert_eq!(status_of(&record), ConnectivityStatus::Connecting);
        let now = unix_now();
        record.last_heartbeat = Some(now - 30);
        assert_eq!(status_of(&record), ConnectivityStatus::Connected);
        record.last_heartbeat = Some(now - OFFLINE_AFTER.as_secs() - 1);
        assert_eq!(status_of(&record), ConnectivityStatus::Offline);
        record.last_heartbeat = Some(now - EXPIRED_AFTER.as_secs() - 1);
        assert_eq!(status_of(&record), ConnectivityStatus::Expired);
        assert_eq!(
            present(&record).properties.connectivity_status,
            ConnectivityStatus::Expired
        );
    }
}

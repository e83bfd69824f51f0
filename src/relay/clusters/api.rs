//! The management API's HTTP surface: ARM paths, ARM error bodies, and the cluster actions.
//!
//! - `GET /subscriptions/{s}/providers/Microsoft.Kubernetes/connectedClusters` and the same
//!   under `/resourceGroups/{rg}`: the clusters the caller has a role on;
//! - `PUT|GET|DELETE .../connectedClusters/{name}`;
//! - `POST .../{name}/listClusterUserCredential`: a Send token for that cluster only;
//! - `POST .../{name}/listAgentCredential` (owners): the agent's Listen key, for the installer;
//! - `POST .../{name}/agentStatus`: the agent's heartbeat, signed with its registered key;
//! - `PUT|DELETE .../{name}/providers/Microsoft.Authorization/roleAssignments/{id}` (owners):
//!   grant or revoke the cluster user role.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::caller::{authenticate, Caller};
use super::registry::Registry;
use super::store::{Change, Record, StoreError};
use crate::arm::{
    agent_key, signed_message, AgentCredential, AgentStatus, ClusterId, ClusterRequest,
    ConnectedCluster, ConnectivityStatus, CredentialResults, HybridConnectionConfig, Identity,
    Properties, SystemData, CLUSTER_USER_ROLE, HEADER_SIGNATURE, HEADER_TIMESTAMP, RESOURCE_TYPE,
};
use crate::relay::rule::FindRule;
use crate::secret::Secret;
use crate::tunnel::protocol::RelayAddress;
use crate::tunnel::sas::{unix_now, SasKey};

/// The relay answers with whole bodies.
type Body = Full<Bytes>;

/// A cluster whose agent has not reported for this long is Offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(5 * 60);
/// ... and after this long its credential has lapsed: Expired, and no more user tokens.
pub const EXPIRED_AFTER: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of the Send tokens `listClusterUserCredential` mints.
pub const USER_TOKEN_TTL: Duration = Duration::from_secs(3600);

const MAX_BODY: usize = 1024 * 1024;
/// A status report is a few hundred bytes.
const MAX_REPORT: usize = 16 * 1024;

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Refusal> {
    Ok(Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| {
            (
                413,
                "RequestTooLarge",
                format!("the request body is larger than {} KiB", limit / 1024),
            )
        })?
        .to_bytes())
}
/// How far an agent's report timestamp may be from the relay's clock.
const REPORT_SKEW: Duration = Duration::from_secs(5 * 60);

/// What a path names.
enum Target {
    List {
        subscription: String,
        resource_group: Option<String>,
    },
    Cluster(ClusterId),
    Action(ClusterId, String),
    RoleAssignment(ClusterId, String),
}

fn parse(path: &str) -> Option<Result<Target, String>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let provider = |i: usize| {
        parts.get(i).is_some_and(|p| eq(p, "providers"))
            && parts
                .get(i + 1)
                .is_some_and(|p| eq(p, "Microsoft.Kubernetes"))
            && parts.get(i + 2).is_some_and(|p| eq(p, "connectedClusters"))
    };
    if !parts.first().is_some_and(|p| eq(p, "subscriptions")) {
        return None;
    }
    let subscription = parts.get(1)?.to_string();
    if provider(2) && parts.len() == 5 {
        return Some(Ok(Target::List {
            subscription,
            resource_group: None,
        }));
    }
    if !parts.get(2).is_some_and(|p| eq(p, "resourceGroups")) || !provider(4) {
        return Some(Err("unknown path".into()));
    }
    let resource_group = parts.get(3)?.to_string();
    if parts.len() == 7 {
        return Some(Ok(Target::List {
            subscription,
            resource_group: Some(resource_group),
        }));
    }
    let id = match ClusterId::new(&subscription, &resource_group, parts.get(7)?) {
        Ok(id) => id,
        Err(e) => return Some(Err(e.to_string())),
    };
    Some(Ok(match &parts[8..] {
        [] => Target::Cluster(id),
        [action] => Target::Action(id, action.to_string()),
        [p, ns, ra, assignment]
            if eq(p, "providers")
                && eq(ns, "Microsoft.Authorization")
                && eq(ra, "roleAssignments") =>
        {
            Target::RoleAssignment(id, assignment.to_ascii_lowercase())
        }
        _ => return Some(Err("unknown path".into())),
    }))
}

/// `Some` when `path` is a management path; the relay's own routes otherwise.
pub(crate) async fn handle(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    relay_host: Option<String>,
    req: Request<Incoming>,
) -> Option<Response<Body>> {
    let target = parse(req.uri().path())?;
    Some(match target {
        Err(e) => error(404, "InvalidResourceType", &e),
        Ok(target) => serve(registry, rule, hosts, relay_host, req, target)
            .await
            .unwrap_or_else(|(status, code, message)| error(status, code, &message)),
    })
}

type Refusal = (u16, &'static str, String);

async fn serve(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    relay_host: Option<String>,
    req: Request<Incoming>,
    target: Target,
) -> Result<Response<Body>, Refusal> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    // The agent's report is authenticated by its signature over the body: a small body, read
    // before the check. Everything else is authenticated from the headers before any body
    // is read.
    if let Target::Action(id, action) = &target {
        if action.eq_ignore_ascii_case("agentStatus") && method == Method::POST {
            let body = read_body(body, MAX_REPORT).await?;
            return agent_status(registry, id, &path, &parts.headers, &body);
        }
    }
    let caller = authenticate(registry, rule, hosts, &parts.headers)
        .await
        .map_err(|(code, message)| (401, code, message))?;
    let body = read_body(body, MAX_BODY).await?;
    let store = &registry.store;
    let internal = |e: StoreError| (500, "InternalServerError", e.to_string());
    match (target, method) {
        (
            Target::List {
                subscription,
                resource_group,
            },
            Method::GET,
        ) => {
            let prefix = match &resource_group {
                Some(rg) => format!("/subscriptions/{subscription}/resourcegroups/{rg}/")
                    .to_ascii_lowercase(),
                None => format!("/subscriptions/{subscription}/").to_ascii_lowercase(),
            };
            let value: Vec<ConnectedCluster> = store
                .all()
                .map_err(internal)?
                .into_iter()
                .filter(|r| r.resource.id.to_ascii_lowercase().starts_with(&prefix))
                .filter(|r| may_read(&caller, r))
                .map(|r| present(&r))
                .collect();
            Ok(json_response(200, &json!({ "value": value })))
        }
        (Target::Cluster(id), Method::GET) => {
            let record = readable(registry, &caller, &id)?;
            Ok(json_response(200, &present(&record)))
        }
        (Target::Cluster(id), Method::PUT) => put(registry, &caller, &id, &body),
        (Target::Cluster(id), Method::DELETE) => {
            let deleted = store
                .update(&id.key(), |current| match current {
                    None => Ok((Change::Keep, false)),
                    Some(record) => {
                        owner(&caller, &record, &id)?;
                        Ok((Change::Delete, true))
                    }
                })
                .map_err(internal)??;
            if deleted {
                tracing::info!(cluster = %id.path(), by = caller.display_name(), "cluster registration deleted");
            }
            Ok(empty(if deleted { 200 } else { 204 }))
        }
        (Target::Action(id, action), Method::POST)
            if action.eq_ignore_ascii_case("listClusterUserCredential") =>
        {
            let record = readable(registry, &caller, &id)?;
            if status_of(&record) == ConnectivityStatus::Expired {
                return Err((409, "ClusterExpired", format!("{}: the agent's credential has lapsed (no heartbeat for 90 days); run `clusterconnect connect` again", id.name)));
            }
            let relay = relay_address(relay_host.as_deref())?;
            let key = SasKey {
                name: format!("{}-send", record.hybrid_connection),
                key: Secret::new(record.send_key.clone()),
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
            tracing::info!(cluster = %id.path(), by = caller.display_name(), "user credential issued");
            Ok(json_response(200, &results))
        }
        (Target::Action(id, action), Method::POST)
            if action.eq_ignore_ascii_case("listAgentCredential") =>
        {
            let record = existing(registry, &id)?;
            owner(&caller, &record, &id)?;
            let relay = relay_address(relay_host.as_deref())?;
            let credential = AgentCredential {
                relay: format!("wss://{}", relay.authority()),
                hybrid_connection_name: record.hybrid_connection.clone(),
                listen_key: format!(
                    "SharedAccessKeyName={}-listen;SharedAccessKey={}",
                    record.hybrid_connection, record.listen_key
                ),
            };
            Ok(json_response(200, &credential))
        }
        (Target::RoleAssignment(id, assignment), Method::PUT) => {
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
            let request: Assignment = serde_json::from_slice(&body).map_err(|e| {
                (400, "InvalidRequestContent", format!("a role assignment is {{\"properties\": {{\"principalId\", \"roleDefinitionId\"}}}}: {e}"))
            })?;
            let role = request
                .properties
                .role_definition_id
                .rsplit('/')
                .next()
                .unwrap_or_default();
            if !role.eq_ignore_ascii_case(CLUSTER_USER_ROLE) {
                return Err((400, "InvalidRoleDefinitionId", format!("only the cluster user role ({CLUSTER_USER_ROLE}, \"Azure Arc Enabled Kubernetes Cluster User Role\") can be assigned here")));
            }
            let principal = request.properties.principal_id.to_ascii_lowercase();
            store
                .update(&id.key(), |current| {
                    let mut record = current.ok_or_else(|| not_found(&id))?;
                    owner(&caller, &record, &id)?;
                    record
                        .assignments
                        .insert(assignment.clone(), principal.clone());
                    Ok((Change::Put(Box::new(record)), ()))
                })
                .map_err(internal)??;
            tracing::info!(cluster = %id.path(), principal, assignment, "cluster user role granted");
            Ok(json_response(
                200,
                &json!({
                    "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{assignment}", id.path()),
                    "name": assignment,
                    "properties": {"principalId": principal, "roleDefinitionId": CLUSTER_USER_ROLE, "scope": id.path()}
                }),
            ))
        }
        (Target::RoleAssignment(id, assignment), Method::DELETE) => {
            let removed = store
                .update(&id.key(), |current| {
                    let mut record = current.ok_or_else(|| not_found(&id))?;
                    owner(&caller, &record, &id)?;
                    let removed = record.assignments.remove(&assignment);
                    Ok((Change::Put(Box::new(record)), removed))
                })
                .map_err(internal)??;
            if let Some(principal) = &removed {
                tracing::info!(cluster = %id.path(), principal, assignment, "cluster user role revoked");
            }
            Ok(empty(if removed.is_some() { 200 } else { 204 }))
        }
        (_, method) => Err((
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on this path"),
        )),
    }
}

fn put(
    registry: &Registry,
    caller: &Caller,
    id: &ClusterId,
    body: &Bytes,
) -> Result<Response<Body>, Refusal> {
    let request: ClusterRequest = serde_json::from_slice(body).map_err(|e| {
        (400, "InvalidRequestContent", format!("the body must be a connected cluster with location and properties.agentPublicKeyCertificate: {e}"))
    })?;
    if request.location.trim().is_empty() {
        return Err((400, "LocationRequired", "location is required".into()));
    }
    agent_key(&request.properties.agent_public_key_certificate)
        .map_err(|e| (400, "InvalidAgentPublicKeyCertificate", e.to_string()))?;
    let internal = |e: StoreError| (500, "InternalServerError", e.to_string());
    let now = rfc3339(unix_now());
    let (record, created) = registry
        .store
        .update(&id.key(), |current| {
            let (record, created) = match current {
                Some(mut record) => {
                    owner(caller, &record, id)?;
                    let r = &mut record.resource;
                    r.location = request.location;
                    r.tags = request.tags;
                    r.properties.agent_public_key_certificate =
                        request.properties.agent_public_key_certificate;
                    r.properties.distribution = request.properties.distribution;
                    r.properties.infrastructure = request.properties.infrastructure;
                    r.system_data.last_modified_at = now;
                    r.system_data.last_modified_by = caller.display_name().to_string();
                    r.system_data.last_modified_by_type = caller.kind().to_string();
                    (record, false)
                }
                None => (new_record(caller, id, request, now), true),
            };
            Ok((Change::Put(Box::new(record.clone())), (record, created)))
        })
        .map_err(internal)??;
    tracing::info!(cluster = %id.path(), by = caller.display_name(), created, "cluster registered");
    Ok(json_response(
        if created { 201 } else { 200 },
        &present(&record),
    ))
}

/// A first registration: the caller owns it; it gets fresh Listen and Send keys.
fn new_record(caller: &Caller, id: &ClusterId, request: ClusterRequest, now: String) -> Record {
    let random_key = || {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    };
    let resource = ConnectedCluster {
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
    };
    let owners = match caller {
        Caller::Principal { object_id, .. } => vec![object_id.to_ascii_lowercase()],
        Caller::Admin { .. } => Vec::new(),
    };
    Record {
        resource,
        owners,
        assignments: Default::default(),
        hybrid_connection: id.hybrid_connection(),
        listen_key: random_key(),
        send_key: random_key(),
        last_heartbeat: None,
        last_report_timestamp: 0,
    }
}

/// Verifies and records an agent's status report. Every refusal is the same 401, so the
/// endpoint does not tell an unauthenticated caller which clusters exist.
fn agent_status(
    registry: &Registry,
    id: &ClusterId,
    path: &str,
    headers: &http::HeaderMap,
    body: &Bytes,
) -> Result<Response<Body>, Refusal> {
    let internal = |e: StoreError| (500, "InternalServerError", e.to_string());
    let refused = |why: &str| {
        (
            401,
            "InvalidSignature",
            format!("agent status refused: {why}"),
        )
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp: u64 = header(HEADER_TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| refused("no timestamp header"))?;
    let signature = header(HEADER_SIGNATURE)
        .and_then(|s| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(s).ok()
        })
        .ok_or_else(|| refused("no signature header"))?;
    let now = unix_now();
    if timestamp.abs_diff(now) > REPORT_SKEW.as_secs() {
        return Err(refused(
            "its timestamp is more than five minutes from the relay's clock",
        ));
    }
    let status: AgentStatus = serde_json::from_slice(body)
        .map_err(|e| (400, "InvalidRequestContent", format!("agent status: {e}")))?;
    registry
        .store
        .update(&id.key(), |current| {
            let not_verified =
                || refused("the signature does not match the cluster's agentPublicKeyCertificate");
            let mut record = current.ok_or_else(not_verified)?;
            let key = agent_key(&record.resource.properties.agent_public_key_certificate)
                .map_err(|_| not_verified())?;
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
                .verify(&signed_message(timestamp, path, body), &signature)
                .map_err(|_| not_verified())?;
            if timestamp <= record.last_report_timestamp {
                return Err(refused(
                    "a report with this timestamp was already accepted (replay)",
                ));
            }
            let p = &mut record.resource.properties;
            p.agent_version = Some(status.agent_version);
            p.kubernetes_version = status.kubernetes_version;
            p.total_node_count = status.total_node_count;
            p.total_core_count = status.total_core_count;
            record.last_heartbeat = Some(now);
            record.last_report_timestamp = timestamp;
            Ok((Change::Put(Box::new(record)), ()))
        })
        .map_err(internal)??;
    Ok(empty(204))
}

fn status_of(record: &Record) -> ConnectivityStatus {
    match record.last_heartbeat {
        None => ConnectivityStatus::Connecting,
        Some(at) => {
            let silent = unix_now().saturating_sub(at);
            if silent > EXPIRED_AFTER.as_secs() {
                ConnectivityStatus::Expired
            } else if silent > OFFLINE_AFTER.as_secs() {
                ConnectivityStatus::Offline
            } else {
                ConnectivityStatus::Connected
            }
        }
    }
}

/// The resource as callers see it, with the status as of now.
fn present(record: &Record) -> ConnectedCluster {
    let mut resource = record.resource.clone();
    resource.properties.connectivity_status = status_of(record);
    resource.properties.last_connectivity_time = record.last_heartbeat.map(rfc3339);
    resource
}

fn may_read(caller: &Caller, record: &Record) -> bool {
    match caller {
        Caller::Admin { .. } => true,
        Caller::Principal { object_id, .. } => {
            let id = object_id.to_ascii_lowercase();
            record.owners.contains(&id) || record.assignments.values().any(|p| *p == id)
        }
    }
}

fn owner(caller: &Caller, record: &Record, id: &ClusterId) -> Result<(), Refusal> {
    let ok = match caller {
        Caller::Admin { .. } => true,
        Caller::Principal { object_id, .. } => {
            record.owners.contains(&object_id.to_ascii_lowercase())
        }
    };
    if ok {
        Ok(())
    } else {
        Err((
            403,
            "AuthorizationFailed",
            format!(
                "'{}' is not an owner of {}; ask an owner or an administrator",
                caller.display_name(),
                id.path()
            ),
        ))
    }
}

fn existing(registry: &Registry, id: &ClusterId) -> Result<Record, Refusal> {
    registry
        .store
        .get(&id.key())
        .map_err(|e| (500, "InternalServerError", e.to_string()))?
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &ClusterId) -> Refusal {
    (
        404,
        "ResourceNotFound",
        format!(
            "the connected cluster '{}' under resource group '{}' was not found",
            id.name, id.resource_group
        ),
    )
}

fn readable(registry: &Registry, caller: &Caller, id: &ClusterId) -> Result<Record, Refusal> {
    let record = existing(registry, id)?;
    if !may_read(caller, &record) {
        return Err((
            403,
            "AuthorizationFailed",
            format!(
                "'{}' has no role on {}; an owner can grant the cluster user role",
                caller.display_name(),
                id.path()
            ),
        ));
    }
    Ok(record)
}

fn relay_address(host: Option<&str>) -> Result<RelayAddress, Refusal> {
    let host = host.ok_or_else(|| (400, "BadRequest", "no Host header".to_string()))?;
    RelayAddress::parse(&format!("wss://{host}")).map_err(|e| (400, "BadRequest", e.to_string()))
}

fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn json_response<T: serde::Serialize>(status: u16, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn empty(status: u16) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp
}

fn error(status: u16, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

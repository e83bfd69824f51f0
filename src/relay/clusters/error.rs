//! Every refusal of the management API, and the one place that turns it into an HTTP status
//! and ARM's error body `{"error": {"code", "message"}}`.

use http::{Method, Response, StatusCode};
use serde_json::json;

use super::caller::AuthError;
use super::reply::{self, Body};
use super::store::StoreError;
use crate::arm::{AgentKeyError, ClusterId, IdError, CLUSTER_USER_ROLE, KEY_VAULT_EXTENSION_TYPE};
use crate::tunnel::http::error_chain;
use crate::tunnel::protocol::AddressError;
use crate::tunnel::sas::SasError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unknown path")]
    UnknownPath,
    #[error(transparent)]
    ClusterId(IdError),
    #[error("the request body is larger than {} KiB", .0 / 1024)]
    BodyTooLarge(usize),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("{0} is not supported on this path")]
    MethodNotAllowed(Method),
    #[error("the body must be a connected cluster with location and properties.agentPublicKeyCertificate")]
    ClusterBody(#[source] serde_json::Error),
    #[error(
        "regenerateKeys takes {{\"keyType\": \"PrimaryKey\" | \"SecondaryKey\" | \"SendKey\"}}"
    )]
    KeyTypeBody(#[source] serde_json::Error),
    #[error("location is required")]
    LocationRequired,
    #[error("{0}")]
    ExtensionName(String),
    #[error("the body must be an extension: {{\"properties\": {{\"extensionType\", \"configurationSettings\", ...}}}}")]
    ExtensionBody(#[source] serde_json::Error),
    #[error("extension type {0:?} is not available here; the one type served is {KEY_VAULT_EXTENSION_TYPE}")]
    ExtensionType(String),
    #[error("the cluster already has extension '{existing}' of type {KEY_VAULT_EXTENSION_TYPE}; only one instance per cluster is allowed (update it, or delete it first)")]
    ExtensionExists { existing: String },
    #[error("extension '{name}' of connected cluster '{cluster}' was not found")]
    ExtensionNotFound { name: String, cluster: String },
    #[error(transparent)]
    ExtensionSettings(crate::extension::settings::SettingsError),
    #[error("releaseNamespace cannot change: extension '{name}' is installed in namespace '{existing}', not '{requested}'; delete it first to install it elsewhere")]
    ReleaseNamespaceImmutable {
        name: String,
        existing: String,
        requested: String,
    },
    #[error(transparent)]
    AgentKey(AgentKeyError),
    #[error("a role assignment is {{\"properties\": {{\"principalId\", \"roleDefinitionId\"}}}}")]
    AssignmentBody(#[source] serde_json::Error),
    #[error("only the cluster user role ({CLUSTER_USER_ROLE}, \"Azure Arc Enabled Kubernetes Cluster User Role\") can be assigned here")]
    RoleNotAssignable,
    #[error("agent status")]
    StatusBody(#[source] serde_json::Error),
    #[error("agent status refused: {0}")]
    ReportRefused(ReportRefusal),
    #[error("'{caller}' is not an owner of {cluster}; ask an owner or an administrator")]
    NotOwner { caller: String, cluster: String },
    #[error("'{caller}' has no role on {cluster}; an owner can grant the cluster user role")]
    NoRole { caller: String, cluster: String },
    #[error(
        "the connected cluster '{name}' under resource group '{resource_group}' was not found"
    )]
    NotFound {
        name: String,
        resource_group: String,
    },
    #[error("{0}: the agent's credential has lapsed (no heartbeat for 90 days); run `clusterconnect connect` again")]
    Expired(String),
    #[error("no Host header")]
    NoHost,
    #[error(transparent)]
    RelayAddress(AddressError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the cluster registry is busy (no worker free within {}s); retry", .0.as_secs())]
    Busy(std::time::Duration),
    #[error("the cluster registry's worker failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// Why an agent's status report is refused. All are the same 401, so the endpoint does not
/// tell an unauthenticated caller which clusters exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefusal {
    #[error("no timestamp header")]
    NoTimestamp,
    #[error("no signature header")]
    NoSignature,
    #[error("its timestamp is more than five minutes from the relay's clock")]
    Skewed,
    #[error("the signature does not match the cluster's agentPublicKeyCertificate")]
    NotVerified,
    #[error("a report with this timestamp was already accepted (replay)")]
    Replay,
}

impl From<ReportRefusal> for ApiError {
    fn from(why: ReportRefusal) -> ApiError {
        ApiError::ReportRefused(why)
    }
}

impl ApiError {
    pub fn not_found(id: &ClusterId) -> ApiError {
        ApiError::NotFound {
            name: id.name.clone(),
            resource_group: id.resource_group.clone(),
        }
    }

    /// The HTTP status and ARM's error code.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            UnknownPath | ClusterId(_) => (StatusCode::NOT_FOUND, "InvalidResourceType"),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLarge"),
            // A genuine key (its signature checks out first) of a rule without Manage: who
            // the caller is, is known; what it asks is not allowed.
            Unauthenticated(AuthError::SasToken(SasError::MissingRight { .. })) => {
                (StatusCode::FORBIDDEN, "AuthorizationFailed")
            }
            Unauthenticated(e) => (StatusCode::UNAUTHORIZED, e.code()),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            ClusterBody(_) | AssignmentBody(_) | StatusBody(_) | KeyTypeBody(_) => {
                (StatusCode::BAD_REQUEST, "InvalidRequestContent")
            }
            LocationRequired => (StatusCode::BAD_REQUEST, "LocationRequired"),
            ExtensionName(_) | ExtensionBody(_) => {
                (StatusCode::BAD_REQUEST, "InvalidRequestContent")
            }
            ExtensionType(_) => (StatusCode::BAD_REQUEST, "ExtensionTypeNotSupported"),
            ExtensionExists { .. } => (StatusCode::CONFLICT, "ExtensionAlreadyExists"),
            ExtensionNotFound { .. } => (StatusCode::NOT_FOUND, "ResourceNotFound"),
            ExtensionSettings(_) => (StatusCode::BAD_REQUEST, "InvalidConfigurationSettings"),
            ReleaseNamespaceImmutable { .. } => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            AgentKey(_) => (StatusCode::BAD_REQUEST, "InvalidAgentPublicKeyCertificate"),
            RoleNotAssignable => (StatusCode::BAD_REQUEST, "InvalidRoleDefinitionId"),
            ReportRefused(_) => (StatusCode::UNAUTHORIZED, "InvalidSignature"),
            NotOwner { .. } | NoRole { .. } => (StatusCode::FORBIDDEN, "AuthorizationFailed"),
            NotFound { .. } => (StatusCode::NOT_FOUND, "ResourceNotFound"),
            Expired(_) => (StatusCode::CONFLICT, "ClusterExpired"),
            NoHost | RelayAddress(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
            Store(_) | Worker(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
            Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServerBusy"),
        }
    }

    /// ARM's error body; the message is the whole chain of causes.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        // Causes may quote the caller's body (serde_json does): bounded, like every answer.
        let message = crate::secret::clip(&error_chain(&self), 1000);
        reply::json(
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(e: ApiError) -> (u16, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn refusals_become_arm_error_bodies_with_the_whole_cause() {
        let (status, body) = answer(ApiError::BodyTooLarge(16 * 1024)).await;
        assert_eq!(status, 413);
        assert_eq!(
            body,
            json!({"error": {"code": "RequestTooLarge", "message": "the request body is larger than 16 KiB"}})
        );
        let cause = serde_json::from_slice::<u8>(b"x").unwrap_err();
        let (status, body) = answer(ApiError::StatusBody(cause)).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "InvalidRequestContent");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("agent status: expected"));
        let (status, body) = answer(ReportRefusal::Replay.into()).await;
        assert_eq!(status, 401);
        assert_eq!(
            body["error"]["message"],
            "agent status refused: a report with this timestamp was already accepted (replay)"
        );
        let (status, body) = answer(AuthError::NoEntra.into()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("AuthenticationFailed"))
        );
    }
}

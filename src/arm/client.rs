//! A client for the relay's management API, for the CLI (connect, list, show, proxy -n -g)
//! and for the agent's signed status reports.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;

use super::extension::{extension_path, Extension, ExtensionRequest, EXTENSION_RESOURCE_TYPE};
use super::report::{signed_message, AgentStatus, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use super::resource::{
    AccessKeys, AgentCredential, ClusterId, ClusterRequest, ConnectedCluster, CredentialResults,
    ErrorResponse, HybridConnectionConfig, API_VERSION, CLUSTER_USER_ROLE, RESOURCE_TYPE,
};
use crate::auth::{CredentialError, CredentialSource};
use crate::entra::http::{HttpClient, HttpError, HttpResponse};
use crate::tunnel::protocol::RelayAddress;
use crate::tunnel::sas::{unix_now, SasKey};

#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error("{code}: {message} (HTTP {status})")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the relay's management API")]
    Send(#[source] HttpError),
    #[error("cannot reach the relay's management API")]
    EncodeRequest(#[source] serde_json::Error),
    #[error("cannot reach the relay's management API: unexpected answer")]
    DecodeAnswer(#[source] serde_json::Error),
    #[error("no credential for the relay's management API")]
    Token(#[source] CredentialError),
    #[error("no credential for the relay's management API: pass --admin-key-file, or make an Entra ID credential available")]
    NoCredential,
    #[error("no credential for the relay's management API: signing the status report failed")]
    SignReport,
}

impl ArmError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ArmError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How the CLI proves who it is to the registry.
#[derive(Clone)]
pub enum ManagementAuth {
    /// A key of a relay rule with the Manage right: administrator.
    Key(SasKey),
    /// An Entra ID token for the relay's management audience.
    Entra(Arc<dyn CredentialSource>),
}

#[derive(Clone)]
pub struct ManagementClient {
    relay: RelayAddress,
    http: HttpClient,
    auth: Option<ManagementAuth>,
}

/// Admin SAS tokens only need to outlive one request.
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(300);

impl ManagementClient {
    /// `auth` may be `None` for the agent, whose reports are signed instead.
    pub fn new(relay: RelayAddress, http: HttpClient, auth: Option<ManagementAuth>) -> Self {
        ManagementClient { relay, http, auth }
    }

    pub fn relay(&self) -> &RelayAddress {
        &self.relay
    }

    fn url(&self, path: &str) -> String {
        format!(
            "https://{}{path}?api-version={API_VERSION}",
            self.relay.authority()
        )
    }

    async fn authorization(&self) -> Result<String, ArmError> {
        match &self.auth {
            Some(ManagementAuth::Key(key)) => Ok(key
                .mint(&self.relay.resource_uri(""), ADMIN_TOKEN_TTL)
                .expose()
                .to_string()),
            Some(ManagementAuth::Entra(source)) => source
                .token()
                .await
                .map(|t| format!("Bearer {}", t.expose()))
                .map_err(ArmError::Token),
            None => Err(ArmError::NoCredential),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<HttpResponse, ArmError> {
        let auth = self.authorization().await?;
        let url = self.url(path);
        let headers = [("authorization", auth.as_str())];
        let resp = match body {
            Some(json) => self.http.send_json(method, &url, &headers, json).await,
            None => {
                self.http
                    .send(method, &url, &headers, bytes::Bytes::new())
                    .await
            }
        }
        .map_err(ArmError::Send)?;
        check(resp)
    }

    pub async fn get(&self, id: &ClusterId) -> Result<Option<ConnectedCluster>, ArmError> {
        match self.call(Method::GET, &id.path(), None).await {
            Ok(resp) => decode(&resp).map(Some),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put(
        &self,
        id: &ClusterId,
        request: &ClusterRequest,
    ) -> Result<ConnectedCluster, ArmError> {
        let body = serde_json::to_value(request).map_err(ArmError::EncodeRequest)?;
        decode(&self.call(Method::PUT, &id.path(), Some(&body)).await?)
    }

    /// `true` when there was a registration to delete.
    pub async fn delete(&self, id: &ClusterId) -> Result<bool, ArmError> {
        let resp = self.call(Method::DELETE, &id.path(), None).await?;
        Ok(resp.status.as_u16() == 200)
    }

    pub async fn list(
        &self,
        subscription: &str,
        resource_group: Option<&str>,
    ) -> Result<Vec<ConnectedCluster>, ArmError> {
        let path = match resource_group {
            Some(rg) => format!(
                "/subscriptions/{subscription}/resourceGroups/{rg}/providers/{RESOURCE_TYPE}"
            ),
            None => format!("/subscriptions/{subscription}/providers/{RESOURCE_TYPE}"),
        };
        #[derive(serde::Deserialize)]
        struct List {
            value: Vec<ConnectedCluster>,
        }
        let list: List = decode(&self.call(Method::GET, &path, None).await?)?;
        Ok(list.value)
    }

    pub async fn list_user_credential(
        &self,
        id: &ClusterId,
    ) -> Result<HybridConnectionConfig, ArmError> {
        let path = format!("{}/listClusterUserCredential", id.path());
        let results: CredentialResults = decode(
            &self
                .call(Method::POST, &path, Some(&serde_json::json!({})))
                .await?,
        )?;
        Ok(results.hybrid_connection_config)
    }

    pub async fn list_agent_credential(&self, id: &ClusterId) -> Result<AgentCredential, ArmError> {
        let path = format!("{}/listAgentCredential", id.path());
        decode(
            &self
                .call(Method::POST, &path, Some(&serde_json::json!({})))
                .await?,
        )
    }

    /// The agent's Listen rule with both its keys (owners only).
    pub async fn list_keys(&self, id: &ClusterId) -> Result<AccessKeys, ArmError> {
        let path = format!("{}/listKeys", id.path());
        decode(
            &self
                .call(Method::POST, &path, Some(&serde_json::json!({})))
                .await?,
        )
    }

    /// A new value for one key, `keyType` being `PrimaryKey`, `SecondaryKey` or `SendKey`;
    /// what the old value authorized is closed by the relay.
    pub async fn regenerate_keys(
        &self,
        id: &ClusterId,
        key_type: &str,
    ) -> Result<AccessKeys, ArmError> {
        let path = format!("{}/regenerateKeys", id.path());
        let body = serde_json::json!({ "keyType": key_type });
        decode(&self.call(Method::POST, &path, Some(&body)).await?)
    }

    /// Grants `principal_id` the cluster user role; returns the assignment's name (its id's
    /// last segment), which [`ManagementClient::revoke`] takes.
    pub async fn grant_user(&self, id: &ClusterId, principal_id: &str) -> Result<String, ArmError> {
        let assignment = uuid::Uuid::new_v4().to_string();
        let path = format!(
            "{}/providers/Microsoft.Authorization/roleAssignments/{assignment}",
            id.path()
        );
        let body = serde_json::json!({"properties": {
            "principalId": principal_id,
            "roleDefinitionId": format!("/providers/Microsoft.Authorization/roleDefinitions/{CLUSTER_USER_ROLE}"),
        }});
        self.call(Method::PUT, &path, Some(&body)).await?;
        Ok(assignment)
    }

    /// Removes a role assignment by name.
    pub async fn revoke(&self, id: &ClusterId, assignment: &str) -> Result<(), ArmError> {
        let path = format!(
            "{}/providers/Microsoft.Authorization/roleAssignments/{assignment}",
            id.path()
        );
        self.call(Method::DELETE, &path, None).await.map(|_| ())
    }

    /// The cluster's extension `name`, `None` when there is none by that name.
    pub async fn get_extension(
        &self,
        id: &ClusterId,
        name: &str,
    ) -> Result<Option<Extension>, ArmError> {
        match self
            .call(Method::GET, &extension_path(id, name), None)
            .await
        {
            Ok(resp) => decode(&resp).map(Some),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put_extension(
        &self,
        id: &ClusterId,
        name: &str,
        request: &ExtensionRequest,
    ) -> Result<Extension, ArmError> {
        let body = serde_json::to_value(request).map_err(ArmError::EncodeRequest)?;
        decode(
            &self
                .call(Method::PUT, &extension_path(id, name), Some(&body))
                .await?,
        )
    }

    /// `true` when there was an extension to delete.
    pub async fn delete_extension(&self, id: &ClusterId, name: &str) -> Result<bool, ArmError> {
        let resp = self
            .call(Method::DELETE, &extension_path(id, name), None)
            .await?;
        Ok(resp.status.as_u16() == 200)
    }

    pub async fn list_extensions(&self, id: &ClusterId) -> Result<Vec<Extension>, ArmError> {
        let path = format!("{}/providers/{EXTENSION_RESOURCE_TYPE}", id.path());
        #[derive(serde::Deserialize)]
        struct List {
            value: Vec<Extension>,
        }
        let list: List = decode(&self.call(Method::GET, &path, None).await?)?;
        Ok(list.value)
    }

    /// Sends the agent's status, signed with its key (PKCS#8 DER of an ECDSA P-256 key).
    pub async fn report_status(
        &self,
        id: &ClusterId,
        status: &AgentStatus,
        key: &ring::signature::EcdsaKeyPair,
    ) -> Result<(), ArmError> {
        use base64::Engine;
        let path = format!("{}/agentStatus", id.path());
        let body = serde_json::to_vec(status).map_err(ArmError::EncodeRequest)?;
        let timestamp = unix_now();
        let signature = key
            .sign(
                &ring::rand::SystemRandom::new(),
                &signed_message(timestamp, &path, &body),
            )
            .map_err(|_| ArmError::SignReport)?;
        let signature = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
        let timestamp = timestamp.to_string();
        let headers = [
            ("content-type", "application/json"),
            (HEADER_TIMESTAMP, timestamp.as_str()),
            (HEADER_SIGNATURE, signature.as_str()),
        ];
        let resp = self
            .http
            .send(Method::POST, &self.url(&path), &headers, body.into())
            .await
            .map_err(ArmError::Send)?;
        check(resp).map(|_| ())
    }
}

fn check(resp: HttpResponse) -> Result<HttpResponse, ArmError> {
    if resp.status.is_success() {
        return Ok(resp);
    }
    let status = resp.status.as_u16();
    Err(match serde_json::from_slice::<ErrorResponse>(&resp.body) {
        Ok(e) => ArmError::Refused {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => ArmError::Refused {
            status,
            code: resp
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            message: resp.text_excerpt(),
        },
    })
}

fn decode<T: DeserializeOwned>(resp: &HttpResponse) -> Result<T, ArmError> {
    serde_json::from_slice(&resp.body).map_err(ArmError::DecodeAnswer)
}

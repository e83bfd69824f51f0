//! Group membership from Microsoft Graph for tokens with a groups overage: Entra leaves the
//! `groups` claim out when an identity is in more than 200 groups. Arc refuses such users;
//! the agent looks their groups up with its own identity and caches the answer briefly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use tokio::time::Instant;

use super::http::HttpClient;
use crate::auth::CredentialSource;

/// Long enough that a burst of kubectl calls makes one lookup, short enough that a removal
/// from a group takes effect within minutes (tokens themselves live an hour).
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(5 * 60);
/// Cached identities; beyond this the cache starts over rather than grow without bound.
const MAX_CACHED: usize = 10_000;

/// Object ids are GUIDs; anything else is escaped so it stays one path segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Groups of one identity and when they were looked up.
type Cached = (Arc<Vec<String>>, Instant);

/// Why a group lookup in Microsoft Graph failed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("no token for Microsoft Graph")]
    Token(#[source] crate::auth::CredentialError),
    #[error("Microsoft Graph request failed")]
    Http(#[source] super::http::HttpError),
    #[error("{url}: HTTP {status}{hint}: {body}")]
    Refused {
        url: String,
        status: u16,
        hint: &'static str,
        body: String,
    },
}

pub struct GroupResolver {
    http: HttpClient,
    /// Graph base URL, e.g. `https://graph.microsoft.com`.
    graph: String,
    /// The agent's own identity, for a token with the Graph audience.
    credential: Arc<dyn CredentialSource>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl GroupResolver {
    pub fn new(http: HttpClient, graph: String, credential: Arc<dyn CredentialSource>) -> Self {
        GroupResolver {
            http,
            graph: graph.trim_end_matches('/').to_string(),
            credential,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Every security group the object `object_id` of `tenant` is a member of, transitively
    /// (what a `groups` claim would have held).
    pub async fn member_of(
        &self,
        tenant: &str,
        object_id: &str,
    ) -> Result<Arc<Vec<String>>, GraphError> {
        let key = format!("{tenant}/{object_id}");
        if let Some(groups) = self.cached(&key) {
            return Ok(groups);
        }
        let token = self.credential.token().await.map_err(GraphError::Token)?;
        let url = format!(
            "{}/v1.0/directoryObjects/{}/getMemberObjects",
            self.graph,
            percent_encoding::utf8_percent_encode(object_id, PATH_SEGMENT)
        );
        let auth = format!("Bearer {}", token.expose());
        let resp = self
            .http
            .send_json(
                Method::POST,
                &url,
                &[("authorization", &auth)],
                &serde_json::json!({ "securityEnabledOnly": true }),
            )
            .await
            .map_err(GraphError::Http)?;
        if !resp.status.is_success() {
            let hint = match resp.status.as_u16() {
                401 | 403 => " (the agent's identity needs the Microsoft Graph application permission GroupMember.Read.All or Directory.Read.All)",
                _ => "",
            };
            return Err(GraphError::Refused {
                url,
                status: resp.status.as_u16(),
                hint,
                body: resp.text_excerpt(),
            });
        }
        #[derive(Deserialize)]
        struct Members {
            value: Vec<String>,
        }
        let members: Members = resp.json(&url).map_err(GraphError::Http)?;
        let groups = Arc::new(members.value);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, (groups.clone(), Instant::now()));
        Ok(groups)
    }

    fn cached(&self, key: &str) -> Option<Arc<Vec<String>>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (groups, at) = cache.get(key)?;
        (at.elapsed() < MEMBERSHIP_TTL).then(|| groups.clone())
    }
}

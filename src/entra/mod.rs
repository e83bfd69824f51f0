//! Microsoft Entra ID: the authority and clouds, the HTTP client for identity endpoints, and
//! the token shapes they share, the proxy's credential sources, and the agent's token validation
//! ([`validate`]) and group lookup ([`graph`]).
//!
//! The proxy's credential chain ([`chain`]) tries, in order: a service principal from the
//! environment ([`client_credential`]), workload identity ([`workload_identity`]), managed
//! identity ([`managed_identity`]: Azure IMDS or an Arc-enabled server's HIMDS), the Azure CLI
//! ([`azure_cli`]) and the device-code sign-in ([`device_code`]). Every source reports "not
//! configured" without touching the network, so the chain is quick where most are absent.

pub mod azure_cli;
pub mod chain;
pub mod client_credential;
pub mod cloud;
pub mod device_code;
pub mod graph;
pub mod http;
pub mod managed_identity;
pub mod pop;
pub mod source;
pub mod token_endpoint;
pub mod validate;
pub mod workload_identity;

#[cfg(test)]
pub(crate) mod test_server;

use std::time::Duration;

use serde::Deserialize;

use crate::auth::refresh::ExpiringToken;
use crate::secret::Secret;

pub use cloud::{Authority, Cloud, CloudDefinition};

/// The Azure Arc server application: the audience of tokens for cluster connect.
pub const ARC_SERVER_APP_ID: &str = "6256c85f-0aad-4d50-b960-e6e9b21efe35";
/// The Azure Arc client application: the public client users sign in with.
pub const ARC_CLIENT_APP_ID: &str = "3f4439ff-e698-4d6d-84fe-09c9d574f06b";

/// The `.default` scope for a resource (an app id GUID, `api://...` or a URL).
pub fn default_scope(resource: &str) -> String {
    format!("{}/.default", resource.trim_end_matches('/'))
}

/// A successful answer from a token endpoint (v2 fields; IMDS sends numbers as strings, and
/// App Service and Cloud Shell only `expires_on`, in Unix seconds).
#[derive(Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default, deserialize_with = "number_or_string")]
    pub expires_in: Option<u64>,
    #[serde(default, deserialize_with = "number_or_string")]
    pub expires_on: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
}

impl TokenResponse {
    pub fn into_expiring(self) -> (ExpiringToken, Option<Secret>) {
        // Entra always says; an hour is its usual lifetime when a source does not.
        let from_expires_on = || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            self.expires_on.map(|on| on.saturating_sub(now))
        };
        let lifetime =
            Duration::from_secs(self.expires_in.or_else(from_expires_on).unwrap_or(3600));
        (
            ExpiringToken::new(Secret::new(self.access_token), lifetime),
            self.refresh_token.map(Secret::new),
        )
    }
}

/// An OAuth error answer: `error`, `error_description`.
#[derive(Deserialize, Default)]
pub struct OAuthError {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub error_description: String,
}

impl OAuthError {
    /// The first line of the description: Entra appends trace and correlation ids.
    pub fn summary(&self) -> String {
        let first = self.error_description.lines().next().unwrap_or("").trim();
        match (self.error.is_empty(), first.is_empty()) {
            (true, true) => "no error details".into(),
            (false, true) => self.error.clone(),
            (true, false) => first.to_string(),
            (false, false) => format!("{}: {first}", self.error),
        }
    }
}

/// Why a credential source gave no token. The chain moves on after `NotConfigured` and
/// `Unavailable` and stops at `Failed`: a configured identity that Entra rejects must be fixed,
/// not silently replaced by whichever identity comes next (azure-identity's rule too).
#[derive(Debug, Clone)]
pub enum SourceError {
    /// The source's settings are absent (environment variables, `az` on PATH).
    NotConfigured(Reason),
    /// Configured, but not usable here (no IMDS answering, `az` not logged in, no terminal).
    Unavailable(Reason),
    /// Configured and tried, and the identity provider or the source itself refused.
    Failed(Reason),
}

impl SourceError {
    pub fn cause(&self) -> &Reason {
        match self {
            SourceError::NotConfigured(r)
            | SourceError::Unavailable(r)
            | SourceError::Failed(r) => r,
        }
    }

    /// The reason and everything under it, on one line.
    pub fn reason(&self) -> String {
        crate::tunnel::http::error_chain(self.cause())
    }

    pub fn into_credential_error(self, source_name: &str) -> crate::auth::CredentialError {
        let reason = match self {
            SourceError::NotConfigured(r)
            | SourceError::Unavailable(r)
            | SourceError::Failed(r) => r,
        };
        crate::auth::CredentialError::unavailable(source_name, reason)
    }
}

/// Why a source gave no token: a message, and the lower error it comes from when there is one
/// (shared, because the chain keeps a source's set-up error and answers it again).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct Reason {
    text: String,
    #[source]
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl Reason {
    /// `text`, caused by `source` (which is not repeated in `text`).
    pub fn new(
        text: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Reason {
            text: text.into(),
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// The message alone, without the lower error.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Reason { text, source: None }
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Reason::from(text.to_string())
    }
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u64),
        Str(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        Some(N::Num(n)) => Some(n),
        Some(N::Str(s)) => s.trim().parse().ok(),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_beyond_reason_is_held_to_the_longest_lifetime() {
        for answer in [
            r#"{"access_token":"a","expires_in":"18446744073709551615"}"#,
            r#"{"access_token":"a","expires_on":18446744073709551615}"#,
        ] {
            let response: TokenResponse = serde_json::from_str(answer).unwrap();
            let (token, _) = response.into_expiring();
            assert_eq!(
                token.expires_at - token.issued_at,
                crate::auth::refresh::MAX_LIFETIME,
                "{answer}"
            );
        }
    }

    #[test]
    fn token_responses_accept_numbers_as_strings() {
        let imds: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"3599","resource":"r"}"#)
                .unwrap();
        assert_eq!(imds.expires_in, Some(3599));
        let entra: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":3599,"refresh_token":"r"}"#)
                .unwrap();
        assert_eq!(entra.expires_in, Some(3599));
        assert!(entra.refresh_token.is_some());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let app_service: TokenResponse = serde_json::from_str(&format!(
            r#"{{"access_token":"a","expires_on":"{}","resource":"r","token_type":"Bearer"}}"#,
            now + 600
        ))
        .unwrap();
        let (token, _) = app_service.into_expiring();
        let lifetime = token.expires_at - token.issued_at;
        assert!(lifetime <= Duration::from_secs(600) && lifetime >= Duration::from_secs(590));
        let e: OAuthError = serde_json::from_str(
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret.\r\nTrace ID: x"}"#,
        )
        .unwrap();
        assert_eq!(
            e.summary(),
            "invalid_client: AADSTS7000215: Invalid client secret."
        );
        assert_eq!(
            default_scope(ARC_SERVER_APP_ID),
            "6256c85f-0aad-4d50-b960-e6e9b21efe35/.default"
        );
    }
}

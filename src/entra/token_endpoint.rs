//! The form POSTs to Entra's v2 `/token` and `/devicecode` endpoints, and what their answers
//! mean. Errors name the endpoint's host and Entra's own error summary; a successful answer's
//! body never reaches a message (it holds tokens).

use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{HttpClient, HttpError, HttpResponse};
use super::{OAuthError, SourceError, TokenResponse};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Entra answered with an OAuth error (`invalid_grant`, `authorization_pending`, ...).
    #[error("{host} refused the request: {summary}")]
    OAuth {
        host: String,
        status: StatusCode,
        /// The OAuth `error` code, for callers that act on it.
        code: String,
        summary: String,
    },
    #[error("{host} answered HTTP {status} without an OAuth error: {excerpt}")]
    Unexpected {
        host: String,
        status: StatusCode,
        excerpt: String,
    },
    #[error("{host} answered HTTP 200 but not with the expected JSON")]
    Malformed {
        host: String,
        #[source]
        source: JsonPosition,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// Where and how a successful answer's JSON did not fit: serde's own message can quote a
/// value it did not expect (a token), so only the category and position are kept.
#[derive(Debug, thiserror::Error)]
#[error("{category:?} at line {line} column {column}")]
pub struct JsonPosition {
    pub category: serde_json::error::Category,
    pub line: usize,
    pub column: usize,
}

impl JsonPosition {
    fn of(e: &serde_json::Error) -> Self {
        JsonPosition {
            category: e.classify(),
            line: e.line(),
            column: e.column(),
        }
    }
}

impl EndpointError {
    /// The OAuth error code, when Entra gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            EndpointError::OAuth { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How a source reports it: a refusal means the configured identity does not work
    /// (`Failed`); a network problem may clear by itself but is still a failure of a configured
    /// source, so the chain does not fall through to another identity either.
    pub fn into_source_error(self, source: &str) -> SourceError {
        SourceError::Failed(super::Reason::new(source, self))
    }
}

/// `POST {url}` with `form`; the token on 200, the OAuth error otherwise.
pub async fn request_token(
    http: &HttpClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<TokenResponse, EndpointError> {
    let resp = http
        .post_form(url, &[("accept", "application/json")], form)
        .await?;
    decode(url, &resp)
}

/// Entra's answer to `POST /devicecode`.
#[derive(Deserialize)]
pub struct DeviceCodeResponse {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    /// The text to show the user: where to go and which code to enter.
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default = "default_expires_in")]
    pub expires_in: u64,
    #[serde(default = "default_interval")]
    pub interval: u64,
}

/// RFC 8628's defaults when the server leaves them out.
fn default_expires_in() -> u64 {
    900
}

fn default_interval() -> u64 {
    5
}

pub async fn request_device_code(
    http: &HttpClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<DeviceCodeResponse, EndpointError> {
    let resp = http
        .post_form(url, &[("accept", "application/json")], form)
        .await?;
    decode(url, &resp)
}

/// The success shape on 2xx, the OAuth error on anything else.
pub fn decode<T: DeserializeOwned>(url: &str, resp: &HttpResponse) -> Result<T, EndpointError> {
    let host = host_of(url);
    if resp.status.is_success() {
        // serde's message can quote a value it did not expect; only its position is safe to show.
        return serde_json::from_slice(&resp.body).map_err(|e| EndpointError::Malformed {
            host,
            source: JsonPosition::of(&e),
        });
    }
    match serde_json::from_slice::<OAuthError>(&resp.body) {
        Ok(err) if !err.error.is_empty() || !err.error_description.is_empty() => {
            Err(EndpointError::OAuth {
                host,
                status: resp.status,
                code: err.error.clone(),
                summary: err.summary(),
            })
        }
        _ => Err(EndpointError::Unexpected {
            host,
            status: resp.status,
            excerpt: resp.text_excerpt(),
        }),
    }
}

/// `scheme://host[:port]` of a URL, for messages (paths carry tenant ids, queries resources).
pub fn host_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => super::http::redact(url),
        },
        Err(_) => super::http::redact(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn errors_name_the_host_and_the_oauth_summary_never_a_success_body() {
        let url = "https://login.example/tenant/oauth2/v2.0/token";
        let err = decode::<TokenResponse>(
            url,
            &response(
                400,
                r#"{"error":"invalid_grant","error_description":"AADSTS70000: expired.\r\nTrace ID: 1"}"#,
            ),
        )
        .err()
        .unwrap();
        assert_eq!(err.code(), Some("invalid_grant"));
        assert_eq!(
            err.to_string(),
            "https://login.example refused the request: invalid_grant: AADSTS70000: expired."
        );
        let err = decode::<TokenResponse>(url, &response(200, r#"{"token":"sekrit-value"}"#))
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("sekrit"), "{err}");
        assert!(err.contains("login.example"), "{err}");
        let err = decode::<TokenResponse>(url, &response(502, "bad gateway"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("502") && err.contains("bad gateway"), "{err}");
        assert_eq!(host_of("http://127.0.0.1:9/x?y=z"), "http://127.0.0.1:9");
    }
}

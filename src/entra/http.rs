//! A small HTTP(S) client for the identity and Azure service endpoints (Entra, IMDS, HIMDS,
//! Graph, Key Vault): whole bodies, bounded time and size, errors that name the URL but never
//! a query string (some carry client ids and resources) or a body (some carry tokens).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use serde::de::DeserializeOwned;

/// Identity responses are a few KiB; a Key Vault page or Graph member list a few hundred.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// A cause whose type varies (hyper, http, or a plain message).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `step` names what failed ("sending the request", "reading the response", ...).
    #[error("{url}: {step}")]
    Transport {
        url: String,
        step: String,
        #[source]
        source: BoxError,
        /// The connection attempt itself timed out (an endpoint that is not there).
        connect_timed_out: bool,
    },
    #[error("{url}: no answer within {}s", .after.as_secs())]
    Timeout { url: String, after: Duration },
    #[error("{url}: response is not the expected JSON")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json<T: DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode {
            url: redact(url),
            source: e,
        })
    }

    /// The body as text for an error message, cut short.
    pub fn text_excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(300) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text.to_string(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<crate::tunnel::outbound::Connector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client trusting `tls`'s roots for https:// and speaking plain http:// too (IMDS and
    /// HIMDS are plain HTTP on link-local and loopback addresses).
    pub fn new(tls: Arc<ClientConfig>, connect_timeout: Duration, timeout: Duration) -> Self {
        // Through HTTPS_PROXY where the environment says so (the relay's management API,
        // Entra ID, Key Vault); plain-HTTP endpoints such as IMDS always direct.
        let http = crate::tunnel::outbound::Connector {
            timeout: connect_timeout,
        };
        // hyper-rustls sets ALPN itself and refuses (panics on) a config that names any.
        let mut tls = (*tls).clone();
        tls.alpn_protocols.clear();
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        HttpClient { client, timeout }
    }

    /// The system roots plus `extra_ca` (a TLS-inspection or test CA), else plus the
    /// environment's `REQUESTS_CA_BUNDLE`, which azure-identity for Python honors.
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are read with the system roots already.)
    pub fn with_system_roots(
        extra_ca: Option<&std::path::Path>,
    ) -> Result<Self, crate::tls::TlsError> {
        let bundle = std::env::var_os("REQUESTS_CA_BUNDLE")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from);
        let tls = crate::tls::client_config(extra_ca.or(bundle.as_deref()), &[])?;
        Ok(HttpClient::new(
            tls,
            Duration::from_secs(10),
            Duration::from_secs(30),
        ))
    }

    /// The same client with a different overall time limit per request.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        HttpClient {
            client: self.client.clone(),
            timeout,
        }
    }

    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, HttpError> {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }

    pub async fn post_form(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Result<HttpResponse, HttpError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
        all.extend_from_slice(headers);
        self.send(Method::POST, url, &all, Bytes::from(body)).await
    }

    pub async fn send_json(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        json: &serde_json::Value,
    ) -> Result<HttpResponse, HttpError> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        let body = Bytes::from(json.to_string());
        self.send(method, url, &all, body).await
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<HttpResponse, HttpError> {
        let shown = redact(url);
        let transport = |step: String, source: BoxError| HttpError::Transport {
            url: shown.clone(),
            step,
            source,
            connect_timed_out: false,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(body))
            .map_err(|e| transport("not a valid request".into(), e.into()))?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| transport(format!("header {name}"), e.into()))?;
            // The value's own error would say nothing more; the value may be a secret.
            let value = HeaderValue::from_str(value).map_err(|e| {
                transport(
                    format!("header {name} has characters HTTP does not allow"),
                    e.into(),
                )
            })?;
            req.headers_mut().append(name, value);
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport {
                    url: shown.clone(),
                    step: "sending the request".into(),
                    connect_timed_out: e.is_connect() && has_timed_out_io(&e),
                    source: e.into(),
                })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport("reading the response".into(), e))?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                url: shown,
                after: self.timeout,
            }),
        }
    }
}

/// Whether an `io::Error` of kind `TimedOut` is among the causes.
fn has_timed_out_io(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A client for the plain-HTTP identity endpoints (IMDS, HIMDS): no TLS roots needed or loaded.
pub fn plain_http_client(
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<HttpClient, rustls::Error> {
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Ok(HttpClient::new(Arc::new(tls), connect_timeout, timeout))
}

/// The URL without its query string.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?..."),
        None => url.to_string(),
    }
}

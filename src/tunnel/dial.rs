//! Dialing out to a relay: TCP, TLS (rustls, verified), then the WebSocket handshake that
//! carries the SAS token. Each phase has its own timeout and its own error, so a user sees
//! whether the relay was unreachable, its certificate untrusted, or the token refused.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;
use url::Url;

use super::outbound::ConnectError;
use super::protocol::HEADER_AUTHORIZATION;
use super::ws_config;
use crate::secret::Secret;

pub type RelayIo = TlsStream<TcpStream>;
pub type RelayStream = WebSocketStream<RelayIo>;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// A sender's handshake completes only once a listener accepts, which the relay allows 30 s for.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid relay URL {0:?}")]
    Url(String),
    #[error("cannot reach relay {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach relay {addr} through the outbound proxy")]
    Proxy {
        addr: String,
        #[source]
        source: super::outbound::ProxyError,
    },
    #[error("relay {0} did not answer within {1:?}")]
    ConnectTimeout(String, Duration),
    #[error(
        "TLS with relay {addr} failed (if the relay uses a private CA, pass it with --relay-ca)"
    )]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay {0} did not complete the WebSocket handshake within {1:?}")]
    HandshakeTimeout(String, Duration),
    #[error("relay answered HTTP {status}: {description}")]
    Rejected { status: u16, description: String },
    #[error("WebSocket handshake with relay {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: WsError,
    },
}

impl DialError {
    /// The relay refused our token: retrying with the same credential cannot help.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            DialError::Rejected {
                status: 401 | 403,
                ..
            }
        )
    }

    /// No listener is connected for the hybrid connection.
    pub fn is_no_listener(&self) -> bool {
        matches!(self, DialError::Rejected { status: 404, .. })
    }
}

/// Opens a WebSocket to `url` (a `wss://` relay URL), authenticating with `token` when given.
pub async fn dial(
    url: &str,
    token: Option<&Secret>,
    tls: &Arc<ClientConfig>,
) -> Result<RelayStream, DialError> {
    dial_with(url, token, tls, false).await.map(|(ws, _)| ws)
}

/// What a relay replica says about itself in a listener's handshake (see
/// `relay::replicas`): its own name and its live peers'. Empty from a single relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicas {
    pub me: Option<String>,
    pub all: Vec<String>,
}

/// Replica names kept from one handshake, at most.
const MAX_ANNOUNCED: usize = 64;

impl Replicas {
    fn from_headers(headers: &http::HeaderMap) -> Replicas {
        let name = |v: &str| {
            let v = v.trim().to_ascii_lowercase();
            (!v.is_empty() && v.len() <= 255 && v.parse::<http::uri::Authority>().is_ok())
                .then_some(v)
        };
        let me = headers
            .get("x-clusterconnect-replica")
            .and_then(|v| v.to_str().ok())
            .and_then(name);
        let all = headers
            .get("x-clusterconnect-replicas")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').filter_map(name).take(MAX_ANNOUNCED).collect())
            .unwrap_or_default();
        Replicas { me, all }
    }
}

/// [`dial`] for a listener: asks for updates of the replica list
/// ([`super::protocol::HEADER_HEARS_REPLICAS`]) and returns what the relay announced about its
/// replicas.
pub async fn dial_answered(
    url: &str,
    token: Option<&Secret>,
    tls: &Arc<ClientConfig>,
) -> Result<(RelayStream, Replicas), DialError> {
    dial_with(url, token, tls, true).await
}

async fn dial_with(
    url: &str,
    token: Option<&Secret>,
    tls: &Arc<ClientConfig>,
    hears_replicas: bool,
) -> Result<(RelayStream, Replicas), DialError> {
    let parsed = Url::parse(url).map_err(|_| DialError::Url(url.into()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| DialError::Url(url.into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port().unwrap_or(443);
    let addr = format!("{}:{port}", parsed.host_str().unwrap_or(&host));

    let tcp = match super::outbound::connect(&host, port, CONNECT_TIMEOUT).await {
        Ok(tcp) => tcp,
        Err(ConnectError::Timeout(_)) => {
            return Err(DialError::ConnectTimeout(addr, CONNECT_TIMEOUT))
        }
        Err(ConnectError::Direct(source)) => return Err(DialError::Connect { addr, source }),
        Err(ConnectError::Proxy(source)) => return Err(DialError::Proxy { addr, source }),
    };
    let _ = tcp.set_nodelay(true);

    let server_name = ServerName::try_from(host.clone()).map_err(|_| DialError::Url(url.into()))?;
    let tls_stream = tokio::time::timeout(
        TLS_TIMEOUT,
        TlsConnector::from(tls.clone()).connect(server_name, tcp),
    )
    .await
    .map_err(|_| DialError::ConnectTimeout(addr.clone(), TLS_TIMEOUT))?
    .map_err(|source| DialError::Tls {
        addr: addr.clone(),
        source,
    })?;

    let mut request = url
        .into_client_request()
        .map_err(|_| DialError::Url(url.into()))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(token.expose()).map_err(|_| DialError::Rejected {
            status: 0,
            description: "token contains characters not allowed in an HTTP header".into(),
        })?;
        request.headers_mut().insert(HEADER_AUTHORIZATION, value);
    }
    if hears_replicas {
        request.headers_mut().insert(
            super::protocol::HEADER_HEARS_REPLICAS,
            HeaderValue::from_static("1"),
        );
    }
    let handshake =
        tokio_tungstenite::client_async_with_config(request, tls_stream, Some(ws_config()));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => Err(DialError::HandshakeTimeout(addr, HANDSHAKE_TIMEOUT)),
        Ok(Ok((stream, response))) => Ok((stream, Replicas::from_headers(response.headers()))),
        Ok(Err(WsError::Http(response))) => Err(refusal(&response)),
        Ok(Err(source)) => Err(DialError::Handshake { addr, source }),
    }
}

/// The relay's HTTP answer instead of a WebSocket: its status and (the start of) its body.
fn refusal(response: &http::Response<Option<Vec<u8>>>) -> DialError {
    let description = response
        .body()
        .as_deref()
        .map(|b| {
            String::from_utf8_lossy(b)
                .trim()
                .chars()
                .take(500)
                .collect::<String>()
        })
        .filter(|d| !d.is_empty())
        .or_else(|| response.status().canonical_reason().map(String::from))
        .unwrap_or_default();
    DialError::Rejected {
        status: response.status().as_u16(),
        description,
    }
}

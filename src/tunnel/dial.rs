//! Dialing out to a relay: TCP, TLS (rustls, verified), then the WebSocket handshake that
//! carries the SAS token. Each phase has its own timeout and its own error, so a user sees
//! whether the relay was unreachable, its certificate untrusted, or the token refused.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;
use url::Url;

use super::outbound::ConnectError;
use super::protocol::HEADER_AUTHORIZATION;
use super::{ws_config, WsStream};
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

    /// The relay is down or restarting (refused, unreachable, too slow to answer, or
    /// answering that it is busy): trying again later can help, unlike a wrong name, CA or key.
    pub fn is_unreachable(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            DialError::Connect { source, .. } => matches!(
                source.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | NetworkUnreachable
                    | HostUnreachable
            ),
            DialError::ConnectTimeout(..) | DialError::HandshakeTimeout(..) => true,
            DialError::Rejected { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
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
    Ok(dial_with(url, token, tls, false).await?.websocket().await)
}

/// [`dial`] for a rendezvous that carries the tunnel's bytes: the connection as a byte stream
/// of its own framing ([`WsStream`]), which writes and reads payloads without tungstenite's
/// message copies.
pub async fn dial_stream(
    url: &str,
    token: Option<&Secret>,
    tls: &Arc<ClientConfig>,
) -> Result<WsStream<RelayIo>, DialError> {
    let dialed = dial_with(url, token, tls, false).await?;
    Ok(WsStream::new(dialed.io, dialed.read_ahead))
}

/// A relay connection whose upgrade the relay accepted.
struct Dialed {
    io: RelayIo,
    /// What the relay sent right behind its answer: the first bytes of the WebSocket.
    read_ahead: Vec<u8>,
    replicas: Replicas,
}

impl Dialed {
    async fn websocket(self) -> RelayStream {
        WebSocketStream::from_partially_read(
            self.io,
            self.read_ahead,
            Role::Client,
            Some(ws_config()),
        )
        .await
    }
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
    let mut dialed = dial_with(url, token, tls, true).await?;
    let replicas = std::mem::take(&mut dialed.replicas);
    Ok((dialed.websocket().await, replicas))
}

async fn dial_with(
    url: &str,
    token: Option<&Secret>,
    tls: &Arc<ClientConfig>,
    hears_replicas: bool,
) -> Result<Dialed, DialError> {
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
    let mut tls_stream = tls_stream;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade(&mut tls_stream, request)).await {
        Err(_) => Err(DialError::HandshakeTimeout(addr, HANDSHAKE_TIMEOUT)),
        Ok(Ok((response, read_ahead))) => Ok(Dialed {
            io: tls_stream,
            read_ahead,
            replicas: Replicas::from_headers(response.headers()),
        }),
        Ok(Err(WsError::Http(response))) => Err(refusal(&response)),
        Ok(Err(source)) => Err(DialError::Handshake { addr, source }),
    }
}

/// The most a relay's answer to the upgrade (status line and headers) may take.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The most of a refusal's body read for its description, and how long it may take to come.
const MAX_REFUSAL_BODY: usize = 4 * 1024;
const REFUSAL_BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// The client side of the WebSocket upgrade (RFC 6455 4.1) over `io`: the request as
/// tungstenite builds it, then the relay's answer, checked. Done here rather than by
/// tungstenite so that the bytes the relay sent right behind its answer (the far end may speak
/// first) are handed back, for whichever WebSocket reads the connection next.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: Request,
) -> Result<(Response, Vec<u8>), WsError> {
    let (request, key) = request_bytes(&request)?;
    io.write_all(&request).await?;
    io.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let (head, mut response) = loop {
        if let Some(parsed) = Response::try_parse(&buf)? {
            break parsed;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(WsError::Capacity(CapacityError::MessageTooLong {
                size: buf.len(),
                max_size: MAX_RESPONSE_HEAD,
            }));
        }
        let mut limited = (&mut *io).take((MAX_RESPONSE_HEAD - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(WsError::Protocol(ProtocolError::HandshakeIncomplete));
        }
    };
    let mut rest = buf.split_off(head);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        read_refusal_body(io, &response, &mut rest).await;
        *response.body_mut() = Some(rest);
        return Err(WsError::Http(Box::new(response)));
    }
    let headers = response.headers();
    if !super::upgrade::header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(WsError::Protocol(
            ProtocolError::MissingUpgradeWebSocketHeader,
        ));
    }
    if !super::upgrade::header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(WsError::Protocol(
            ProtocolError::MissingConnectionUpgradeHeader,
        ));
    }
    let accept = derive_accept_key(key.as_bytes());
    if headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(accept.as_bytes())
    {
        return Err(WsError::Protocol(
            ProtocolError::SecWebSocketAcceptKeyMismatch,
        ));
    }
    Ok((response, rest))
}

/// The upgrade request as it goes on the wire, and its `Sec-WebSocket-Key`. Written here, not
/// by tungstenite's `generate_request`, which logs the whole request at trace level: the SAS
/// token in it would reach the log of anyone running with `RUST_LOG=trace`.
fn request_bytes(request: &Request) -> Result<(Vec<u8>, String), WsError> {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut bytes = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    // The WebSocket headers in the case RFC 6455 writes them (some servers compare it), first.
    const UPGRADE_HEADERS: [(&str, &str); 5] = [
        ("Host", "host"),
        ("Connection", "connection"),
        ("Upgrade", "upgrade"),
        ("Sec-WebSocket-Version", "sec-websocket-version"),
        ("Sec-WebSocket-Key", "sec-websocket-key"),
    ];
    let headers = request.headers();
    for (written, name) in UPGRADE_HEADERS {
        let value = headers.get(name).ok_or_else(|| {
            WsError::Protocol(ProtocolError::InvalidHeader(Box::new(
                http::HeaderName::from_static(name),
            )))
        })?;
        bytes.extend_from_slice(written.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if UPGRADE_HEADERS.iter().any(|(_, h)| *h == name.as_str()) {
            continue;
        }
        bytes.extend_from_slice(name.as_str().as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    let key = headers
        .get("sec-websocket-key")
        .and_then(|k| k.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((bytes, key))
}

/// Reads a refusal's body (as much as its `Content-Length` says, up to
/// [`MAX_REFUSAL_BODY`]) into `body`, which holds what came with the head. Best effort: the
/// status alone still makes the error.
async fn read_refusal_body<S: AsyncRead + Unpin>(
    io: &mut S,
    response: &Response,
    body: &mut Vec<u8>,
) {
    let want = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REFUSAL_BODY);
    let _ = tokio::time::timeout(REFUSAL_BODY_TIMEOUT, async {
        while body.len() < want {
            let mut limited = (&mut *io).take((want - body.len()) as u64);
            match limited.read_buf(body).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    body.truncate(MAX_REFUSAL_BODY);
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

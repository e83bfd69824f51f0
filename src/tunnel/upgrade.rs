//! Server side of a WebSocket handshake inside a hyper service: check the request, answer 101,
//! and take the upgraded connection once hyper hands it over, either raw (the relay's splice
//! reads frames itself) or as a `WebSocketStream`.

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::ws_config;

/// An upgraded connection as bytes. Bytes hyper read past the request are not lost: `Upgraded`
/// hands them out first.
pub type RawStream = TokioIo<Upgraded>;

pub type ServerStream = WebSocketStream<RawStream>;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    header_has_token(req.headers(), header::UPGRADE, "websocket")
        && header_has_token(req.headers(), header::CONNECTION, "upgrade")
}

pub fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The 101 response for a valid WebSocket request, or `None` when the request lacks a key or
/// asks for a version other than 13.
pub fn switching_protocols<B, T: Default>(req: &Request<B>) -> Option<Response<T>> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY)?;
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return None;
    }
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()?;
    let mut response = Response::new(T::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Some(response)
}

/// Waits for hyper to hand over the upgraded connection.
pub async fn upgraded(on_upgrade: OnUpgrade) -> Result<RawStream, hyper::Error> {
    Ok(TokioIo::new(on_upgrade.await?))
}

/// Waits for hyper to hand over the upgraded connection and wraps it as a server WebSocket
/// with the tunnel's limits ([`ws_config`]).
pub async fn server_stream(on_upgrade: OnUpgrade) -> Result<ServerStream, hyper::Error> {
    server_stream_with(on_upgrade, ws_config()).await
}

/// [`server_stream`] with other limits.
pub async fn server_stream_with(
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
) -> Result<ServerStream, hyper::Error> {
    let raw = upgraded(on_upgrade).await?;
    Ok(WebSocketStream::from_raw_socket(raw, Role::Server, Some(config)).await)
}

//! `pods/portforward` as the kubelet serves it (`portforward.k8s.io`), where every port of the
//! pod is an echo service. The same SPDY session runs over a plain `Upgrade: SPDY/3.1`
//! connection or tunnelled inside WebSocket binary messages (kubectl 1.32's default).

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use super::spdy;

/// The WebSocket subprotocol under which client-go tunnels SPDY frames.
pub const WEBSOCKET_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
pub const SPDY_PROTOCOLS: [&str; 1] = ["portforward.k8s.io"];

/// Serves forwarded connections until the client closes the session. For each one client-go
/// opens an `error` stream and then a `data` stream sharing a `requestid`.
pub async fn serve<IO>(io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut conn = spdy::Connection::new(io);
    let mut error_streams: HashMap<String, spdy::StreamWriter> = HashMap::new();
    let mut echoes = JoinSet::new();
    while let Some(stream) = conn.accept().await {
        // Old clients sent no request id; the port then pairs the two streams.
        let request = stream
            .header("requestid")
            .or_else(|| stream.header("port"))
            .unwrap_or_default()
            .to_string();
        match stream.header("streamtype") {
            Some("error") => {
                error_streams.insert(request, stream.writer);
            }
            Some("data") => {
                let error = error_streams.remove(&request);
                let port_ok = stream
                    .header("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .is_some_and(|p| p != 0);
                if !port_ok {
                    if let Some(error) = &error {
                        error.write("invalid port".into());
                    }
                }
                echoes.spawn(echo(stream, error, port_ok));
            }
            _ => stream.writer.finish(),
        }
    }
    drop(echoes);
    conn.close().await;
}

/// Writes back every byte, then half-closes the data stream and the paired error stream once
/// the client half-closed its side; an empty error stream tells client-go all went well.
async fn echo(mut stream: spdy::Stream, error: Option<spdy::StreamWriter>, port_ok: bool) {
    while let Some(chunk) = stream.incoming.recv().await {
        if port_ok && !stream.writer.write(chunk) {
            break;
        }
    }
    stream.writer.finish();
    if let Some(error) = error {
        error.finish();
    }
}

//! What both ends of the tunnel share: the Hybrid Connections protocol (addresses, control
//! messages), SAS tokens, dialing a relay, serving a WebSocket handshake, and the adapter that
//! turns a WebSocket into a byte stream for HTTP to run over.

pub mod backoff;
pub mod dial;
pub mod frame;
pub mod http;
pub mod keepalive;
pub mod outbound;
pub mod protocol;
pub mod request_id;
pub mod sas;
pub mod upgrade;
pub mod ws_stream;

pub use ws_stream::WsStream;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// WebSocket limits for every hop. Messages are at most 64 KiB from our side; 16 MiB leaves
/// room for peers that send larger frames while still bounding what one message can cost.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(17 * 1024 * 1024)
        .max_message_size(Some(16 * 1024 * 1024))
        .max_frame_size(Some(16 * 1024 * 1024))
}

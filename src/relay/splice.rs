//! Joining a sender's and a listener's WebSocket: messages are forwarded as they are, both
//! ways, without looking inside. Either side closing or failing ends both.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::tunnel::upgrade::ServerStream;

/// After one side closes, how long the other may take to finish its own close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub sender_to_listener: u64,
    pub listener_to_sender: u64,
}

pub async fn splice(sender: ServerStream, listener: ServerStream) -> Counts {
    let started = Instant::now();
    let (mut s_tx, mut s_rx) = sender.split();
    let (mut l_tx, mut l_rx) = listener.split();
    let up = forward(&mut s_rx, &mut l_tx);
    let down = forward(&mut l_rx, &mut s_tx);
    tokio::pin!(up, down);
    let mut counts = Counts::default();
    tokio::select! {
        n = &mut up => {
            counts.sender_to_listener = n;
            if let Ok(n) = tokio::time::timeout(CLOSE_GRACE, &mut down).await {
                counts.listener_to_sender = n;
            }
        }
        n = &mut down => {
            counts.listener_to_sender = n;
            if let Ok(n) = tokio::time::timeout(CLOSE_GRACE, &mut up).await {
                counts.sender_to_listener = n;
            }
        }
    }
    tracing::debug!(
        bytes.up = counts.sender_to_listener,
        bytes.down = counts.listener_to_sender,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "rendezvous closed"
    );
    counts
}

async fn forward<R, W>(rx: &mut R, tx: &mut W) -> u64
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: futures_util::Sink<Message> + Unpin,
{
    let mut bytes = 0u64;
    loop {
        match rx.next().await {
            Some(Ok(msg @ (Message::Binary(_) | Message::Text(_)))) => {
                bytes += msg.len() as u64;
                if tx.send(msg).await.is_err() {
                    return bytes;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let _ = tx.send(Message::Close(frame)).await;
                return bytes;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "peer went away".into(),
                };
                let _ = tx.send(Message::Close(Some(frame))).await;
                return bytes;
            }
        }
    }
}

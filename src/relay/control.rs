//! A listener's control channel: delivers `accept` messages, takes `renewToken`, keeps the
//! connection alive with pings, and closes with 1008 when the listener's token lapses.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::auth::{authorize, Right};
use super::rendezvous::Rendezvous;
use super::state::Shared;
use crate::tunnel::protocol::ControlMessage;
use crate::tunnel::sas::unix_now;
use crate::tunnel::upgrade::ServerStream;

/// Load balancers on 443 drop idle connections after a minute or so; ping well inside that.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A listener silent for this long (no pong, no message) is gone.
pub const DEAD_PEER: Duration = Duration::from_secs(75);
/// Accept messages queued for one listener; a listener this far behind gets no more senders.
const QUEUE: usize = 64;

pub async fn run(
    mut ws: ServerStream,
    entity: String,
    mut expiry: u64,
    hosts: Vec<String>,
    shared: Shared,
    rendezvous: Rendezvous,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let _guard = rendezvous.add_listener(&entity, tx);
    tracing::info!(entity = %entity, listeners = rendezvous.listener_count(&entity), "listener connected");
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.reset();
    let mut last_seen = Instant::now();
    let close = |code: CloseCode, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        let expires_at = Instant::now() + Duration::from_secs(expiry.saturating_sub(unix_now()));
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let Ok(json) = serde_json::to_string(&msg) else { continue };
                if ws.send(Message::text(json)).await.is_err() {
                    break;
                }
            }
            incoming = ws.next() => {
                last_seen = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(ControlMessage::RenewToken(renew)) = serde_json::from_str(&text) {
                            match authorize(|n| shared.rule(n), &hosts, &renew.token, &entity, Right::Listen, unix_now()) {
                                Ok(new_expiry) => {
                                    expiry = new_expiry;
                                    tracing::debug!(entity = %entity, "listener token renewed");
                                }
                                Err(e) => {
                                    tracing::warn!(entity = %entity, error = %e, "listener sent an invalid renewToken");
                                    let _ = ws.send(close(CloseCode::Policy, "renewToken rejected")).await;
                                    break;
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > DEAD_PEER {
                    tracing::info!(entity = %entity, "listener stopped answering pings");
                    break;
                }
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            _ = sleep_until(expires_at) => {
                tracing::info!(entity = %entity, "listener token expired without renewal");
                let _ = ws.send(close(CloseCode::Policy, "token expired")).await;
                break;
            }
            _ = shutdown.cancelled() => {
                let _ = ws.send(close(CloseCode::Restart, "relay shutting down")).await;
                break;
            }
        }
    }
    drop(_guard);
    tracing::info!(entity = %entity, listeners = rendezvous.listener_count(&entity), "listener disconnected");
}

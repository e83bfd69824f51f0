//! A listener's control channel: delivers `accept` messages, takes `renewToken`, keeps the
//! connection alive with pings, and closes with 1008 when the listener's token lapses or what
//! authorized it is revoked.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::auth::{authorize, check_listener_lifetime, Right};
use super::rendezvous::{ListenerGuard, ListenersFull, Rendezvous};
use super::rule::{Grant, ListenerGrant};
use super::state::{rule_changed, Shared};
use crate::tunnel::keepalive::{DEAD_PEER, PING_INTERVAL};
use crate::tunnel::protocol::ControlMessage;
use crate::tunnel::sas::unix_now;
use crate::tunnel::upgrade::ServerStream;

/// Longer than any listener token may live; bounds the deadline computed from an expiry.
const MAX_WAIT_SECS: u64 = 366 * 24 * 3600;

/// Accept messages queued for one listener; a listener this far behind gets no more senders.
/// Queued boxed: a channel allocates its first block of 32 slots at once, and at a pointer
/// each (not a whole message) that stays small for every idle listener.
const QUEUE: usize = 64;

/// The largest message (and frame) a listener may send on its control channel. Its messages
/// are small JSON (`renewToken` carries a SAS token of a few hundred bytes); the tunnel's
/// 16 MiB cap (`tunnel::ws_config`) is for data, which never crosses a control channel.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// How long the relay tries to send a close frame before it drops the connection anyway.
const CLOSE_SEND: Duration = Duration::from_secs(5);

/// WebSocket limits of a control channel: small messages, small buffers, as many channels as
/// there are listeners. The read buffer is held for the channel's life and grows for the
/// rare larger message; listeners send only pings and `renewToken`.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(4 * MAX_CONTROL_MESSAGE)
        .max_message_size(Some(MAX_CONTROL_MESSAGE))
        .max_frame_size(Some(MAX_CONTROL_MESSAGE))
}

/// One listener's control channel, from its upgrade to its close.
struct Channel {
    ws: ServerStream,
    entity: String,
    /// Unix seconds when the listener's token lapses; a `renewToken` moves it.
    expiry: u64,
    /// What authorized the listener's current token; the rendezvous it accepts watch it too.
    grant: ListenerGrant,
    hosts: Vec<String>,
    shared: Shared,
    last_seen: Instant,
}

/// What the loop does after one event.
enum Next {
    Continue,
    Stop,
}

/// A listener's place in the rendezvous table and the queue of messages for it, taken before
/// the listener's handshake is answered (so a listener over the cap is refused with a status).
pub struct Registration {
    pub guard: ListenerGuard,
    pub rx: mpsc::Receiver<Box<ControlMessage>>,
    grant: ListenerGrant,
}

/// Registers a listener of `entity` reached at `authority` and authorized by `grant`, within
/// the per-connection cap.
pub fn register(
    rendezvous: &Rendezvous,
    entity: &str,
    reach: (String, std::net::IpAddr),
    grant: Grant,
    told: super::rendezvous::Told,
    max: usize,
) -> Result<Registration, ListenersFull> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let grant = ListenerGrant::new(grant);
    let guard = rendezvous.add_listener(entity, tx, reach, grant.clone(), told, max)?;
    Ok(Registration { guard, rx, grant })
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    ws: ServerStream,
    registration: Registration,
    entity: String,
    expiry: u64,
    hosts: Vec<String>,
    shared: Shared,
    rendezvous: Rendezvous,
    shutdown: CancellationToken,
) {
    let Registration {
        guard,
        mut rx,
        grant,
    } = registration;
    let mut changes = shared.rule_changes();
    let stats = shared.stats.clone();
    stats
        .listeners_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let open = crate::metrics::Open::new(&stats.metrics.listeners);
    tracing::info!(entity = %entity.escape_debug(), listeners = rendezvous.listener_count(&entity), "listener connected");
    let mut channel = Channel {
        ws,
        entity,
        expiry,
        grant,
        hosts,
        shared,
        last_seen: Instant::now(),
    };
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.reset();
    // A revocation between the listener's authorization and the subscription above.
    let mut next = channel.recheck().await;
    while let Next::Continue = next {
        // Expiries are capped at authorization; `min` keeps the arithmetic safe regardless.
        let remaining = channel.expiry.saturating_sub(unix_now()).min(MAX_WAIT_SECS);
        let expires_at = Instant::now() + Duration::from_secs(remaining);
        next = tokio::select! {
            msg = rx.recv() => channel.deliver(msg).await,
            incoming = channel.ws.next() => channel.receive(incoming).await,
            _ = ping.tick() => channel.ping().await,
            _ = sleep_until(expires_at) => {
                tracing::info!(entity = %channel.entity.escape_debug(), "listener token expired without renewal");
                channel.close(CloseCode::Policy, "token expired").await
            }
            _ = rule_changed(&mut changes) => channel.recheck().await,
            _ = shutdown.cancelled() => channel.close(CloseCode::Restart, "relay shutting down").await,
        };
    }
    drop((guard, open));
    stats
        .listeners_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(entity = %channel.entity.escape_debug(), listeners = rendezvous.listener_count(&channel.entity), "listener disconnected");
}

impl Channel {
    /// Sends an `accept` (or other control message) down to the listener.
    async fn deliver(&mut self, msg: Option<Box<ControlMessage>>) -> Next {
        let Some(msg) = msg else { return Next::Stop };
        let Ok(json) = serde_json::to_string(&msg) else {
            return Next::Continue;
        };
        match self.ws.send(Message::text(json)).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }

    /// Anything from the listener shows it is alive; a `renewToken` moves the expiry.
    async fn receive(&mut self, incoming: Option<Result<Message, WsError>>) -> Next {
        self.last_seen = Instant::now();
        match incoming {
            Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                Ok(ControlMessage::RenewToken(renew)) => self.renew(&renew.token).await,
                _ => Next::Continue,
            },
            // Told why, as RFC 6455 7.4.1 codes say, rather than dropped without a word.
            Some(Err(WsError::Capacity(_))) => {
                self.close(CloseCode::Size, "message larger than 64 KiB")
                    .await
            }
            Some(Err(WsError::Protocol(_))) => {
                self.close(CloseCode::Protocol, "WebSocket protocol error")
                    .await
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Next::Stop,
            Some(Ok(_)) => Next::Continue,
        }
    }

    async fn renew(&mut self, token: &str) -> Next {
        let shared = &self.shared;
        let now = unix_now();
        let authorized = authorize(
            |n| shared.rule(n),
            &self.hosts,
            token,
            &self.entity,
            Right::Listen,
            now,
        )
        .and_then(|a| {
            check_listener_lifetime(a.expiry, now, shared.limits.max_listener_token_lifetime)?;
            Ok(a)
        });
        match authorized {
            Ok(authorized) => {
                self.expiry = authorized.expiry;
                self.grant.set(authorized.grant);
                tracing::debug!(entity = %self.entity.escape_debug(), "listener token renewed");
                Next::Continue
            }
            Err(e) => {
                shared
                    .stats
                    .metrics
                    .auth_failure(super::auth::failure_reason(&e));
                tracing::warn!(entity = %self.entity.escape_debug(), error = %e.to_string().escape_debug(), "listener sent an invalid renewToken");
                self.close(CloseCode::Policy, "renewToken rejected").await
            }
        }
    }

    /// After a registry change: closes the channel when its grant is gone (the rendezvous it
    /// accepted see the same and close themselves).
    async fn recheck(&mut self) -> Next {
        let grant = self.grant.get();
        if self.shared.still_authorized(&grant) {
            return Next::Continue;
        }
        tracing::info!(entity = %self.entity.escape_debug(), rule = %grant.rule, "listener's authorization revoked; closing it");
        self.close(CloseCode::Policy, "authorization revoked").await
    }

    async fn ping(&mut self) -> Next {
        if self.last_seen.elapsed() > DEAD_PEER {
            tracing::info!(entity = %self.entity.escape_debug(), "listener stopped answering pings");
            return Next::Stop;
        }
        match self.ws.send(Message::Ping(Default::default())).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }

    /// Closes the channel with `code`, waiting at most [`CLOSE_SEND`] to send it; the loop
    /// ends either way.
    async fn close(&mut self, code: CloseCode, reason: &'static str) -> Next {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // Bounded: a listener that reads nothing must not hold the channel open.
        let _ = tokio::time::timeout(CLOSE_SEND, self.ws.send(Message::Close(Some(frame)))).await;
        Next::Stop
    }
}

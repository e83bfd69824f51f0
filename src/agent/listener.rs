//! One listener: a control channel to the relay that stays open for the agent's lifetime.
//!
//! States and transitions:
//! - connecting: re-read the key file if it changed, dial `listen` with a fresh SAS token.
//!   Success -> listening. A 401/403 (a wrong or rotated key, a rule without Listen) is logged
//!   as a warning, the key file is re-read, -> backing off, woken early when the key changes:
//!   rotating the key (or fixing the relay's rule) heals a running agent. Anything else ->
//!   backing off.
//! - listening: each `accept` spawns a rendezvous; pings every 30 s; renews the token at
//!   three quarters of its lifetime, with the key the file holds then. Close 1008 (token
//!   lapsed) after a stable connection -> connecting at once; any other end -> backing off.
//! - backing off: jittered exponential wait (1 s doubling to 60 s) -> connecting. The wait
//!   starts from 1 s again only after a connection that stayed up for a minute, so a relay
//!   that accepts and drops at once is not hammered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::replicas::Claim;
use super::{forward, AgentConfig, Shared};
use crate::metrics::Counted;
use crate::tunnel::backoff::{Backoff, STABLE_AFTER};
use crate::tunnel::dial::{dial, dial_answered, dial_stream, RelayStream};
use crate::tunnel::http::error_chain;
use crate::tunnel::keepalive::{DEAD_PEER, PING_INTERVAL};
use crate::tunnel::protocol::{
    Accept, Action, ControlMessage, RenewToken, QUERY_STATUS_CODE, QUERY_STATUS_DESCRIPTION,
};

enum Ended {
    /// The relay refused our token (401/403): the key is wrong, rotated or lacks Listen.
    Refused,
    /// The relay closed with 1008: our token lapsed; reconnect with a fresh one now.
    TokenLapsed,
    Lost(String),
    /// The relay said it is going away (1001, 1012) after serving us a while: it restarts or
    /// drains, and a replacement or another replica is worth trying at once.
    Restarting(String),
    Shutdown,
}

/// A channel up this long before the relay said it was restarting was served: the next wait
/// starts from the base again. Shorter, a relay that accepts and goes at once is backed off
/// from like any failure.
const SERVED_BEFORE_RESTART: Duration = Duration::from_secs(5);

/// The longest wait between attempts: a refused connection costs a down relay next to
/// nothing, and an agent away is a cluster out of reach.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Times in a row a listener re-dials after landing on a replica another listener holds;
/// then it stays (a balancer that always picks the same replica).
const MAX_CROWDED: u32 = 16;

/// How long a leaving listener waits for the relay to answer its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `shutdown` ends the listener; `streams` (cancelled once every listener has gone) tells the
/// tunnel streams to drain.
pub async fn run(
    index: usize,
    config: Arc<AgentConfig>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    (shutdown, streams): (CancellationToken, CancellationToken),
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), MAX_BACKOFF);
    let resource = config.relay.resource_uri(&config.entity);
    let mut key_changes = config.key.changes();
    // Landings in a row on a replica another listener already holds.
    let mut crowded = 0;
    loop {
        config.key.reload();
        key_changes.mark_unchanged();
        let key = config.key.current();
        let token = key.mint(&resource, config.token_ttl);
        let url = config
            .relay
            .url(&config.entity, Action::Listen, &Uuid::new_v4().to_string());
        let dialed = tokio::select! {
            r = dial_answered(&url, Some(&token), &config.relay_tls) => r,
            _ = shutdown.cancelled() => return,
        };
        let ended = match dialed {
            Ok((ws, replicas)) => {
                let claim = shared
                    .replicas
                    .claim(index, &replicas, config.relay_replicas);
                if claim == Claim::Elsewhere && crowded < MAX_CROWDED {
                    // Behind one name, a balancer picks the replica: dial again for another.
                    crowded += 1;
                    // The relay may have offered it a sender already: served, not dropped.
                    close_draining(ws, &config, &shared, &tasks, &streams).await;
                    let pause = Duration::from_millis(50 + rand::random::<u64>() % 200);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
                crowded = 0;
                if claim == Claim::Elsewhere {
                    shared.replicas.claim(index, &replicas, 0);
                }
                let replica = replicas.me.as_deref().unwrap_or_default();
                tracing::info!(listener = index, relay = %config.relay.authority(), replica, replicas_held = shared.replicas.distinct(), connection = %config.entity, "listening");
                let ended = listen_counted(
                    (ws, index),
                    &config,
                    &shared,
                    &tasks,
                    (&shutdown, &streams),
                    &mut backoff,
                )
                .await;
                shared.replicas.release(index);
                ended
            }
            Err(e) if e.is_auth() => {
                config.metrics.auth_failure("relay_refused");
                let changed = config.key.refused();
                let file = config
                    .key
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                tracing::warn!(listener = index, connection = %config.entity, key_name = %key.name, key_file = %file, refusals = config.key.refusals(), error = %error_chain(&e), "the relay refused the listen token. Check --key-file and that its rule has the Listen right for this connection; the agent re-reads the key file and retries");
                if changed {
                    continue;
                }
                Ended::Refused
            }
            Err(e) => Ended::Lost(error_chain(&e)),
        };
        match ended {
            Ended::Shutdown => return,
            Ended::Refused => {
                let delay = backoff.next_delay();
                tracing::debug!(
                    listener = index,
                    retry_in_ms = delay.as_millis() as u64,
                    "waiting for a new key or the back-off"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = key_changes.changed() => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            Ended::TokenLapsed => {
                tracing::info!(
                    listener = index,
                    "relay closed the control channel for an expired token; reconnecting"
                );
                continue;
            }
            Ended::Restarting(ref reason) | Ended::Lost(ref reason) => {
                let delay = backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                if matches!(ended, Ended::Restarting(_)) {
                    tracing::info!(listener = index, reason = %reason, retry_in_ms, "the relay is restarting or draining; reconnecting");
                } else {
                    tracing::warn!(listener = index, reason = %reason, retry_in_ms, "relay connection lost");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// What the relay's close frame means for the listener. 1008 is the relay's word for a token
/// it no longer accepts: one that lapsed is renewed by reconnecting at once, while a revoked
/// or rejected one is a failure, backed off from and reported as the relay worded it.
fn closed_by_relay(code: CloseCode, reason: &str) -> Ended {
    let said = escape_reason(reason);
    match code {
        CloseCode::Policy if reason.contains("revoked") => Ended::Lost(format!(
            "the relay revoked this listener's authorization ({said}): its registration, rule or key was removed"
        )),
        CloseCode::Policy if reason.contains("rejected") => {
            Ended::Lost(format!("the relay rejected the renewed token ({said})"))
        }
        CloseCode::Policy => Ended::TokenLapsed,
        CloseCode::Restart | CloseCode::Away => Ended::Restarting(format!(
            "relay closed the channel ({}: {said})",
            u16::from(code)
        )),
        other => Ended::Lost(format!(
            "relay closed the channel ({}: {said})",
            u16::from(other)
        )),
    }
}

/// A close reason as the relay sent it, made safe for one log field.
fn escape_reason(reason: &str) -> String {
    reason
        .chars()
        .take(123)
        .flat_map(char::escape_debug)
        .collect()
}

/// One connected control channel, counted in `/readyz`, until it ends; how long it stayed
/// up decides the next back-off.
async fn listen_counted(
    (ws, index): (RelayStream, usize),
    config: &Arc<AgentConfig>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    (shutdown, streams): (&CancellationToken, &CancellationToken),
    backoff: &mut Backoff,
) -> Ended {
    shared.listening.fetch_add(1, Ordering::Relaxed);
    let open = crate::metrics::Open::new(&config.metrics.listeners);
    let connected_at = Instant::now();
    let ended = listen((ws, index), config, shared, tasks, (shutdown, streams)).await;
    shared.listening.fetch_sub(1, Ordering::Relaxed);
    drop(open);
    let up_for = connected_at.elapsed();
    backoff.connection_ended(up_for);
    match ended {
        // A token that lapsed on a channel that never proved stable (a clock far off, a relay
        // capping lifetimes below ours) is backed off from like any other failure rather than
        // retried in a tight loop.
        Ended::TokenLapsed if up_for < STABLE_AFTER => {
            Ended::Lost("the relay closed the channel for an expired token".into())
        }
        Ended::Restarting(reason) if up_for < SERVED_BEFORE_RESTART => Ended::Lost(reason),
        Ended::Restarting(reason) => {
            backoff.reset();
            Ended::Restarting(reason)
        }
        other => other,
    }
}

async fn listen(
    (mut ws, index): (RelayStream, usize),
    config: &Arc<AgentConfig>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    (shutdown, streams): (&CancellationToken, &CancellationToken),
) -> Ended {
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.reset();
    let renew_every = config.token_ttl.mul_f64(0.75);
    let mut renew_at = Instant::now() + renew_every;
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            msg = ws.next() => {
                last_seen = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ControlMessage>(&text) {
                        Ok(ControlMessage::Accept(accept)) => spawn_rendezvous(accept, config.clone(), shared.clone(), tasks, streams),
                        Ok(ControlMessage::Replicas(list)) => shared.replicas.update(index, list.all),
                        Ok(ControlMessage::Request(request)) => refuse_http(&request.address, config, shared, tasks),
                        Ok(other) => tracing::debug!(?other, "ignoring control message"),
                        Err(e) => tracing::debug!(error = %e, "ignoring unknown control message"),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return match frame {
                            Some(f) => closed_by_relay(f.code, &f.reason),
                            None => Ended::Lost("relay closed the channel".into()),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(e.to_string()),
                    None => return Ended::Lost("relay closed the connection".into()),
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > DEAD_PEER {
                    return Ended::Lost(format!("no answer from relay for {}s", DEAD_PEER.as_secs()));
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    return Ended::Lost(e.to_string());
                }
            }
            _ = tokio::time::sleep_until(renew_at) => {
                config.key.reload();
                let token = config.key.current().mint(&config.relay.resource_uri(&config.entity), config.token_ttl);
                let msg = ControlMessage::RenewToken(RenewToken { token: token.expose().to_string() });
                let Ok(json) = serde_json::to_string(&msg) else { return Ended::Lost("cannot encode renewToken".into()) };
                if let Err(e) = ws.send(Message::text(json)).await {
                    config.metrics.token_renewal("failed");
                    return Ended::Lost(e.to_string());
                }
                config.metrics.token_renewal("ok");
                renew_at = Instant::now() + renew_every;
                tracing::debug!("listener token renewed");
            }
            _ = shutdown.cancelled() => {
                close_draining(ws, config, shared, tasks, streams).await;
                return Ended::Shutdown;
            }
        }
    }
}

/// Leaving: the relay is told first (our close frame takes this listener out of its
/// rotation), and accepts it sent before it read that frame are still served, until its
/// close answer or [`CLOSE_WAIT`]. Only then do the open streams start draining.
async fn close_draining(
    mut ws: RelayStream,
    config: &Arc<AgentConfig>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    streams: &CancellationToken,
) {
    // All of it, the close frame's own send included, within CLOSE_WAIT: a stalled relay
    // socket cannot hold the drain up.
    let answered = tokio::time::timeout(CLOSE_WAIT, async {
        if ws.send(Message::Close(None)).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(text) = msg {
                if let Ok(ControlMessage::Accept(accept)) = serde_json::from_str(&text) {
                    spawn_rendezvous(accept, config.clone(), shared.clone(), tasks, streams);
                }
            }
        }
    });
    if answered.await.is_err() {
        tracing::debug!("the relay did not answer our close in time");
    }
}

/// A sender's HTTP request (Azure Relay's `request` gesture) is not for an agent, whose
/// hybrid connection carries kubectl's tunnels: the sender is told so at once (501) instead of
/// waiting for the relay's timeout.
fn refuse_http(
    address: &str,
    config: &Arc<AgentConfig>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
) {
    if let Err(refused) = config.relay.check_rendezvous(address) {
        if !shared.replicas.allows(address) {
            tracing::warn!(reason = %refused, "refusing a rendezvous address from the relay");
            return;
        }
    }
    tracing::info!("refusing an HTTP request sent to the agent's hybrid connection");
    reject(
        address,
        "501",
        "this hybrid connection belongs to a clusterconnect agent; it carries kubectl through `clusterconnect proxy`, not HTTP requests",
        config,
        shared,
        tasks,
    );
}

/// Answers a rendezvous address with a rejection (`status`, `description`), within
/// [`CLOSE_WAIT`]; at most `rejecting`'s count of such answers are in flight.
fn reject(
    address: &str,
    status: &str,
    description: &str,
    config: &Arc<AgentConfig>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
) {
    let Ok(rejecting) = shared.rejecting.clone().try_acquire_owned() else {
        tracing::warn!("too many rejections in flight; leaving a sender to the relay's timeout");
        return;
    };
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair(QUERY_STATUS_CODE, status);
    query.append_pair(QUERY_STATUS_DESCRIPTION, description);
    let address = format!("{address}&{}", query.finish());
    let config = config.clone();
    tasks.spawn(async move {
        let _rejecting = rejecting;
        let _ = tokio::time::timeout(CLOSE_WAIT, dial(&address, None, &config.relay_tls)).await;
    });
}

fn spawn_rendezvous(
    accept: Accept,
    config: Arc<AgentConfig>,
    shared: Arc<Shared>,
    tasks: &TaskTracker,
    streams: &CancellationToken,
) {
    // Checked before anything is dialed, the busy answer included.
    // The relay's own host, or a replica the relay announced to a listener held now.
    if let Err(refused) = config.relay.check_rendezvous(&accept.address) {
        if !shared.replicas.allows(&accept.address) {
            tracing::warn!(reason = %refused, "refusing a rendezvous address from the relay");
            return;
        }
    }
    // Each rendezvous holds buffers and an apiserver connection; beyond this many at once a
    // new sender is rejected with 503 rather than exhausting the agent's memory.
    let Ok(permit) = shared.rendezvous.clone().try_acquire_owned() else {
        tracing::warn!("too many open tunnel streams; rejecting a sender");
        reject(
            &accept.address,
            "503",
            "agent busy",
            &config,
            &shared,
            tasks,
        );
        return;
    };
    let (streams, sessions) = (streams.clone(), tasks.clone());
    // The relay's and the proxy's logs name this rendezvous by the same id (the proxy's part
    // before the relay's `_` suffix).
    let id: Arc<str> = accept.id.as_str().into();
    let span = tracing::info_span!("rendezvous", sb_hc_id = %id, connection = %config.entity);
    tasks.spawn(
        async move {
            let _permit = permit;
            match dial_stream(&accept.address, None, &config.relay_tls).await {
                Ok(ws) => {
                    tracing::debug!("rendezvous accepted");
                    shared.streams.fetch_add(1, Ordering::Relaxed);
                    let metrics = &config.metrics;
                    let open = crate::metrics::Open::new(&metrics.tunnels);
                    let io = Counted::new(ws, metrics.received.clone(), metrics.sent.clone());
                    let served = Arc::new(forward::Served {
                        upstream: shared.upstream.clone(),
                        auth: config.auth.clone(),
                        audit: config.audit.clone(),
                        cluster: config.entity.as_str().into(),
                        metrics: metrics.clone(),
                        sessions,
                        hard_stop: shared.hard_stop.clone(),
                        first_request: Default::default(),
                        max_concurrent_streams: config.streams_per_connection,
                    });
                    forward::serve(io, served, id, streams).await;
                    shared.streams.fetch_sub(1, Ordering::Relaxed);
                    drop(open);
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "could not complete a rendezvous")
                }
            }
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(ended: Ended) -> String {
        match ended {
            Ended::Lost(reason) => reason,
            _ => panic!("not a loss"),
        }
    }

    #[test]
    fn the_relay_close_decides_what_comes_next() {
        // The relay's own words (relay/control.rs), and Azure Relay's expiry close.
        assert!(matches!(
            closed_by_relay(CloseCode::Policy, "token expired"),
            Ended::TokenLapsed
        ));
        let revoked = lost(closed_by_relay(CloseCode::Policy, "authorization revoked"));
        assert!(
            revoked.contains("revoked") && !revoked.contains("expired"),
            "{revoked}"
        );
        let rejected = lost(closed_by_relay(CloseCode::Policy, "renewToken rejected"));
        assert!(rejected.contains("rejected"), "{rejected}");
        assert!(matches!(
            closed_by_relay(CloseCode::Restart, "relay shutting down"),
            Ended::Restarting(_)
        ));
        assert!(matches!(
            closed_by_relay(CloseCode::Away, ""),
            Ended::Restarting(_)
        ));
        let odd = lost(closed_by_relay(CloseCode::Size, "a\nb\u{1b}[31m"));
        assert!(
            odd.contains("1009") && !odd.contains('\n') && !odd.contains('\u{1b}'),
            "{odd}"
        );
    }
}

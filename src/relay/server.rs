//! The relay's HTTP front: TLS, then one HTTP/1.1 request per connection that is either a
//! listener's control channel (`listen`), a sender (`connect`) or a listener's rendezvous
//! (`accept`). After the rendezvous the relay only splices bytes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::auth::{
    authorize, check_listener_lifetime, failure_reason, status_for, Authorized, Right,
};
use super::gauge::Place;
use super::rendezvous::{AcceptOutcome, NotOffered};
use super::rule::{Grant, ListenerGrant};
use super::state::rule_changed;
use super::state::Ctx;
use super::{clusters, control, splice};
use crate::tunnel::protocol::{
    Accept, Action, ControlMessage, HcTarget, RemoteEndpoint, HEADER_AUTHORIZATION, QUERY_ACTION,
    QUERY_ID, QUERY_STATUS_CODE, QUERY_STATUS_DESCRIPTION, QUERY_TOKEN,
};
use crate::tunnel::sas::unix_now;
use crate::tunnel::upgrade::{is_websocket, server_stream_with, switching_protocols, upgraded};

/// Longest `/$hc/` path (a connection name of up to 260 characters plus a suffix) a sender
/// may use.
pub(super) const MAX_HC_PATH: usize = 1024;

/// How long an accept address stays usable, as in Azure Relay.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers are whole (`text`) except an HTTP listener's response, which streams.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A whole answer as the relay's [`Body`].
pub fn whole(body: Full<Bytes>) -> Body {
    body.map_err(|never| match never {}).boxed_unsync()
}

pub fn text(status: u16, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(whole(Full::new(Bytes::from(msg.into()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether `req` is authenticated only once its body is read: an agent's status report
/// (`POST .../agentStatus`), signed over its body.
/// The last segment is compared as the management API routes it: without case.
pub fn authenticated_by_body<B>(req: &Request<B>) -> bool {
    let last = req
        .uri()
        .path()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    req.method() == http::Method::POST && last.eq_ignore_ascii_case("agentStatus")
}

pub async fn handle(
    mut req: Request<Incoming>,
    ctx: Ctx,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/healthz" {
        return Ok(text(200, "ok"));
    }
    if let Some(clusters) = &ctx.shared.clusters {
        if req.uri().path().starts_with("/subscriptions/") {
            let hosts = accepted_hosts(&ctx);
            let host = public_host(&ctx, &req);
            // The whole call, body included, within the deadline: a caller that withholds
            // its body is answered 408 and the connection closed.
            let deadline = ctx.shared.limits.request_timeout;
            let rule = |name: &str| ctx.shared.rule(name);
            let call = clusters::handle(clusters, &rule, &hosts, host, req);
            return Ok(match tokio::time::timeout(deadline, call).await {
                Ok(Some(resp)) => resp.map(whole),
                Ok(None) => text(404, "not a management path"),
                Err(_) => {
                    let mut resp = text(408, "request not completed in time");
                    resp.headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                    resp
                }
            });
        }
    }
    let Some(target) = HcTarget::parse(req.uri().path(), req.uri().query()) else {
        // Any other path is an HTTP request for a hybrid connection's listener.
        return Ok(super::hc_http::handle(req, &ctx, peer).await);
    };
    let Some(action) = target.get(QUERY_ACTION).and_then(Action::parse) else {
        return Ok(text(
            400,
            "missing or unknown sb-hc-action; expected listen, connect, accept or request",
        ));
    };
    if !is_websocket(&req) {
        return Ok(text(400, "this endpoint only accepts WebSocket upgrades"));
    }
    let Some(switching) = switching_protocols::<_, Body>(&req) else {
        return Ok(text(
            400,
            "invalid WebSocket handshake (needs Sec-WebSocket-Key and version 13)",
        ));
    };
    let response = match action {
        Action::Listen => listen(&mut req, &target, &ctx, peer, switching),
        Action::Connect => connect(&mut req, &target, &ctx, peer, switching).await,
        // A listener at a request's rendezvous comes exactly as to an accept's.
        Action::Accept | Action::Request => accept(&mut req, &target, &ctx, switching),
    };
    Ok(response)
}

fn token<'a>(req: &'a Request<Incoming>, target: &'a HcTarget) -> Option<&'a str> {
    req.headers()
        .get(HEADER_AUTHORIZATION)
        .map(header_token)
        .or_else(|| target.get(QUERY_TOKEN))
}

/// A token header's value. One that is not visible ASCII cannot be a SAS token: it is refused
/// as not one (401, counted as malformed), not passed over as if no token had been sent.
pub(super) fn header_token(value: &http::HeaderValue) -> &str {
    value.to_str().unwrap_or("(not visible ASCII)")
}

/// The key a sender token's rendezvous are counted under: its [`crate::tunnel::sas::SasToken::identity`] (the
/// token was verified before, so it parses).
pub(super) fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    match crate::tunnel::sas::SasToken::parse(token) {
        Ok(parsed) => parsed.identity(),
        Err(_) => sha2::Sha256::digest(token.as_bytes()).into(),
    }
}

/// The host the client used to reach us, which is where the listener must come back to.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// The `host[:port]` clients should use for this relay: the one the caller used, unless the
/// relay has configured names and that is not one of them (tokens must name a configured
/// host to be accepted).
fn public_host(ctx: &Ctx, req: &Request<Incoming>) -> Option<String> {
    let used = request_host(req)?;
    let Some(first) = ctx.shared.hostnames.first() else {
        return Some(used);
    };
    let (name, port) = split_host(&used);
    if ctx
        .shared
        .hostnames
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&name))
    {
        return Some(used);
    }
    Some(match port {
        Some(p) => format!("{first}:{p}"),
        None => first.clone(),
    })
}

/// The names a token's resource may carry: the configured ones (a relay always has some).
fn accepted_hosts(ctx: &Ctx) -> Vec<String> {
    ctx.shared.hostnames.to_vec()
}

/// `host[:port]` as the Host header has it; an IPv6 literal keeps its brackets. Something
/// that is not an authority is all host.
fn split_host(used: &str) -> (String, Option<String>) {
    match used.parse::<http::uri::Authority>() {
        Ok(a) => (
            a.host().to_string(),
            a.port().map(|p| p.as_str().to_string()),
        ),
        Err(_) => (used.to_string(), None),
    }
}

/// What the token grants, or the status and message to refuse the request with.
fn check(
    req: &Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
    right: Right,
) -> Result<Authorized, (u16, String)> {
    check_entity(req, target, &target.entity, ctx, right)
}

/// [`check`] for `entity`, which a sender's path may extend with a suffix.
fn check_entity(
    req: &Request<Incoming>,
    target: &HcTarget,
    entity: &str,
    ctx: &Ctx,
    right: Right,
) -> Result<Authorized, (u16, String)> {
    check_token(token(req, target), entity, ctx, right)
}

/// What `token` grants on `entity`, or the status and message to refuse it with.
pub(super) fn check_token(
    token: Option<&str>,
    entity: &str,
    ctx: &Ctx,
    right: Right,
) -> Result<Authorized, (u16, String)> {
    let Some(token) = token else {
        ctx.shared.stats.metrics.auth_failure("missing_token");
        return Err((
            401,
            format!("no SAS token: send it in the {HEADER_AUTHORIZATION} header or the {QUERY_TOKEN} query parameter"),
        ));
    };
    authorize(
        |name| ctx.shared.rule(name),
        &accepted_hosts(ctx),
        token,
        entity,
        right,
        unix_now(),
    )
    .map_err(|e| {
        ctx.shared.stats.metrics.auth_failure(failure_reason(&e));
        log_refusal(entity, &e.to_string());
        (status_for(&e), e.to_string())
    })
}

/// Refusals logged per second at most: anyone can send requests that are refused, and a flood
/// of them must not become a flood of log lines. The rest are counted (and always in
/// `clusterconnect_relay_auth_failures_total`), their number logged with the next one.
const REFUSALS_LOGGED_PER_SECOND: u32 = 20;
static REFUSALS: LogBudget = LogBudget::new(REFUSALS_LOGGED_PER_SECOND);

/// Logs a refused token. The entity and the reason carry what the caller sent (a path, a rule
/// name): escaped (Debug), so a newline or terminal escape in them cannot forge a log line,
/// and cut short.
fn log_refusal(entity: &str, reason: &str) {
    let Some(left_out) = REFUSALS.take() else {
        return;
    };
    let entity = clip_for_log(entity);
    let reason = clip_for_log(reason);
    if left_out > 0 {
        tracing::info!(entity = ?entity, error = ?reason, left_out, "token refused (and {left_out} more not logged)");
    } else {
        tracing::info!(entity = ?entity, error = ?reason, "token refused");
    }
}

/// At most 200 characters of a caller's string, for a log line.
fn clip_for_log(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// A per-second allowance of log lines, and how many were left out since the last one.
struct LogBudget {
    per_second: u32,
    state: std::sync::Mutex<Budget>,
}

struct Budget {
    second: Option<std::time::Instant>,
    logged: u32,
    left_out: u64,
}

impl LogBudget {
    const fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            state: std::sync::Mutex::new(Budget {
                second: None,
                logged: 0,
                left_out: 0,
            }),
        }
    }

    /// `Some(left out before this one)` when one more line may be logged now.
    fn take(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if state
            .second
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            state.second = Some(now);
            state.logged = 0;
        }
        if state.logged < self.per_second {
            state.logged += 1;
            Some(std::mem::take(&mut state.left_out))
        } else {
            state.left_out += 1;
            None
        }
    }
}

fn listen(
    req: &mut Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
    peer: SocketAddr,
    switching: Response<Body>,
) -> Response<Body> {
    let authorized = match check(req, target, ctx, Right::Listen).and_then(|authorized| {
        check_listener_lifetime(
            authorized.expiry,
            unix_now(),
            ctx.shared.limits.max_listener_token_lifetime,
        )
        .map_err(|e| {
            ctx.shared.stats.metrics.auth_failure(failure_reason(&e));
            (status_for(&e), e.to_string())
        })?;
        Ok(authorized)
    }) {
        Ok(a) => a,
        Err((code, msg)) => return text(code, msg),
    };
    if let Some(refused) = id_too_long(target, ctx) {
        return refused;
    }
    let authority = ctx
        .shared
        .rendezvous_authority(request_host(req).as_deref());
    let max = ctx.shared.limits.max_listeners_per_connection;
    let told = super::rendezvous::Told {
        replicas: ctx
            .shared
            .replicas
            .as_ref()
            .map(|r| r.peers())
            .unwrap_or_default(),
        updates: req
            .headers()
            .contains_key(crate::tunnel::protocol::HEADER_HEARS_REPLICAS),
    };
    let registration = match control::register(
        &ctx.rendezvous,
        &target.entity,
        (authority, peer.ip()),
        authorized.grant,
        told.clone(),
        max,
    ) {
        Ok(r) => r,
        Err(full) => {
            ctx.shared
                .stats
                .metrics
                .limit_hit("max_listeners_per_connection");
            return quota_exceeded(&target.entity, full.max);
        }
    };
    let Some(permit) = ctx.slot() else {
        return at_capacity(ctx);
    };
    let mut switching = switching;
    // A replica takes offers for this connection from the others while the listener stays,
    // and tells the listener which replicas may send it rendezvous addresses.
    let holding = ctx.shared.replicas.as_ref().map(|replicas| {
        announce(&mut switching, replicas.me(), &told.replicas);
        replicas.hold(&target.entity)
    });
    // Renewals must name the same host the listener first connected with.
    let hosts = accepted_hosts(ctx);
    let on_upgrade = hyper::upgrade::on(req);
    let (entity, shared, rendezvous, shutdown) = (
        target.entity.clone(),
        ctx.shared.clone(),
        ctx.rendezvous.clone(),
        ctx.shutdown.clone(),
    );
    ctx.tasks.spawn(async move {
        let _held = (permit, holding);
        match server_stream_with(on_upgrade, control::ws_config()).await {
            Ok(ws) => {
                control::run(
                    ws,
                    registration,
                    entity,
                    authorized.expiry,
                    hosts,
                    shared,
                    rendezvous,
                    shutdown,
                )
                .await
            }
            Err(e) => tracing::debug!(error = %e, "listener upgrade failed"),
        }
    });
    switching
}

async fn connect(
    req: &mut Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
    peer: SocketAddr,
    switching: Response<Body>,
) -> Response<Body> {
    let started = std::time::Instant::now();
    if let Some(refused) = id_too_long(target, ctx) {
        return refused;
    }
    // Routing below looks up each `/`-bounded prefix before the caller is authenticated:
    // bounded by this, not by how long a request line the caller sends.
    if target.entity.len() > MAX_HC_PATH {
        return text(
            414,
            format!("hybrid connection path longer than {MAX_HC_PATH} characters"),
        );
    }
    // `/$hc/<name>/more/path`: the longest name with listeners takes it, as Azure Relay routes.
    let (entity, suffix) = route(&ctx.rendezvous, &target.entity);
    if ctx.rendezvous.listener_count(entity) == 0 {
        if let Some(replicas) = ctx.shared.replicas.clone() {
            return connect_remote(req, target, ctx, (peer, started), switching, &replicas).await;
        }
    }
    let grant = match check_entity(req, target, entity, ctx, Right::Send) {
        Ok(authorized) => authorized.grant,
        Err((code, msg)) => return text(code, msg),
    };
    let (token_place, sender_permit) = match sender_places(req, target, ctx) {
        Ok(places) => places,
        Err(refused) => return *refused,
    };
    let id = rendezvous_id(target);
    // The relay sees a rendezvous, not the requests inside it (one carries many HTTP/2
    // streams): its span is keyed by the id the listener accepts with, the sender's own
    // `sb-hc-id` plus a suffix, which the proxy and the agent log as well.
    let span = tracing::info_span!("rendezvous", sb_hc_id = %id, entity = %entity.escape_debug());
    let accept = accept_message(req, target, (entity, suffix), &id, peer);
    let wait = ctx.rendezvous.add_pending(&id, entity);
    let max_per_listener = ctx.shared.limits.max_rendezvous_per_listener;
    let offered = ctx.rendezvous.offer(entity, max_per_listener, |authority| {
        let mut accept = accept.clone();
        accept.address = format!("wss://{authority}{}", accept.address);
        ControlMessage::Accept(accept)
    });
    let offered = match offered {
        Ok(offered) => offered,
        Err(not) => return not_offered(ctx, entity, not),
    };
    // The listener's rendezvous connection is a stranger until it upgrades: its address
    // may hold one more place for it while this sender waits.
    let _expected = ctx.admission.keep_place_for(offered.peer);
    let sender_upgrade = hyper::upgrade::on(req);
    let joined = Joined {
        started,
        entity,
        sender_upgrade,
        sender_permit,
        revocation: Revocation {
            sender: grant,
            listener: offered.grant,
        },
        places: (token_place, Some(offered.place)),
    };
    finish_connect(ctx, joined, wait, switching)
        .instrument(span)
        .await
}

pub(super) type SenderPlaces = (Place<[u8; 32]>, Arc<OwnedSemaphorePermit>);

/// The sender's place under its token's cap, then its connection slot: taken only once it is
/// authenticated, so a token is not a stranger's.
fn sender_places(
    req: &Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
) -> Result<SenderPlaces, Box<Response<Body>>> {
    places_for_token(token(req, target), ctx)
}

/// [`sender_places`] for the sender that presented `token`.
pub(super) fn places_for_token(
    token: Option<&str>,
    ctx: &Ctx,
) -> Result<SenderPlaces, Box<Response<Body>>> {
    let max_per_token = ctx.shared.limits.max_rendezvous_per_token;
    let token_digest = token.map(token_digest).unwrap_or_default();
    let Some(token_place) = ctx.per_token.take(token_digest, max_per_token) else {
        ctx.shared
            .stats
            .metrics
            .limit_hit("max_rendezvous_per_token");
        return Err(Box::new(text(
            429,
            format!("this token already has {max_per_token} rendezvous open (the relay's max_rendezvous_per_token); close some, or give each client its own token"),
        )));
    };
    let Some(sender_permit) = ctx.slot() else {
        return Err(Box::new(at_capacity(ctx)));
    };
    Ok((token_place, sender_permit))
}

/// The documented answers when no listener took the offer.
pub(super) fn not_offered(ctx: &Ctx, entity: &str, not: NotOffered) -> Response<Body> {
    let metrics = &ctx.shared.stats.metrics;
    let max_per_listener = ctx.shared.limits.max_rendezvous_per_listener;
    match not {
        NotOffered::NoListener => {
            metrics.accept("no_listener");
            text(
                404,
                format!("no listener is connected for hybrid connection '{entity}' (is the cluster agent running?)"),
            )
        }
        NotOffered::Busy => {
            metrics.accept("busy");
            metrics.limit_hit("max_rendezvous_per_listener");
            text(
                503,
                format!("every listener of hybrid connection '{entity}' is busy ({max_per_listener} rendezvous open, the relay's max_rendezvous_per_listener, or its accept queue full); retry shortly"),
            )
        }
    }
}

/// Puts this replica's name and its live peers' in a listener's handshake answer.
fn announce(switching: &mut Response<Body>, me: &str, told: &[String]) {
    let peers = told.join(",");
    let headers = switching.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(me) {
        headers.insert(super::replicas::HEADER_REPLICA, v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&peers) {
        headers.insert(super::replicas::HEADER_REPLICAS, v);
    }
}

/// Hybrid connections a path may name, longest first: the whole path, then each `/`-bounded
/// prefix, at most this many (the cost of routing a sender through NATS is one request each).
const MAX_REMOTE_ROUTES: usize = 8;

/// Each hybrid connection `path` may name that `token` covers for sending, longest first, as
/// the listener's own replica would route it: a token scoped to a connection covers it with a
/// path suffix too.
pub(super) fn remote_routes<'p>(
    token: Option<&str>,
    path: &'p str,
    ctx: &Ctx,
) -> Vec<(&'p str, &'p str, Authorized)> {
    let Some(token) = token else {
        return Vec::new();
    };
    let mut ends: Vec<usize> = vec![path.len()];
    ends.extend(
        path.match_indices('/')
            .map(|(i, _)| i)
            .filter(|i| *i > 0)
            .rev(),
    );
    ends.into_iter()
        .take(MAX_REMOTE_ROUTES)
        .filter_map(|end| {
            let (entity, suffix) = path.split_at(end);
            authorize(
                |name| ctx.shared.rule(name),
                &accepted_hosts(ctx),
                token,
                entity,
                Right::Send,
                unix_now(),
            )
            .ok()
            .map(|authorized| (entity, suffix, authorized))
        })
        .collect()
}

/// A sender on a replica where no listener of its connection is: the offer goes through NATS
/// to a replica that holds one, which hands the listener an address naming this replica.
async fn connect_remote(
    req: &mut Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
    (peer, started): (SocketAddr, std::time::Instant),
    switching: Response<Body>,
    replicas: &super::replicas::Replicas,
) -> Response<Body> {
    use super::replicas::RemoteNot;
    let routes = remote_routes(token(req, target), &target.entity, ctx);
    if routes.is_empty() {
        // The refusal a single relay gives for the whole path.
        return match check_entity(req, target, &target.entity, ctx, Right::Send) {
            Err((code, msg)) => text(code, msg),
            Ok(_) => not_offered(ctx, &target.entity, NotOffered::NoListener),
        };
    }
    let (token_place, sender_permit) = match sender_places(req, target, ctx) {
        Ok(places) => places,
        Err(refused) => return *refused,
    };
    for (entity, suffix, authorized) in routes {
        let id = rendezvous_id(target);
        let span =
            tracing::info_span!("rendezvous", sb_hc_id = %id, entity = %entity.escape_debug());
        let mut accept = accept_message(req, target, (entity, suffix), &id, peer);
        accept.address = format!("wss://{}{}", replicas.me(), accept.address);
        let wait = ctx.rendezvous.add_pending(&id, entity);
        let listener = match replicas
            .offer(entity, &accept, false)
            .instrument(span.clone())
            .await
        {
            Ok(grant) => grant,
            Err(not) => {
                drop(wait);
                match not {
                    RemoteNot::NoListener => continue,
                    RemoteNot::Busy => return not_offered(ctx, entity, NotOffered::Busy),
                    RemoteNot::Unavailable => {
                        ctx.shared.stats.metrics.accept("replicas_unavailable");
                        return text(
                            503,
                            format!("no listener of hybrid connection '{entity}' is on this relay replica, and the other replicas cannot be reached (NATS unavailable); retry shortly"),
                        );
                    }
                }
            }
        };
        let joined = Joined {
            started,
            entity,
            sender_upgrade: hyper::upgrade::on(req),
            sender_permit,
            revocation: Revocation {
                sender: authorized.grant,
                listener: ListenerGrant::new(listener),
            },
            places: (token_place, None),
        };
        return finish_connect(ctx, joined, wait, switching)
            .instrument(span)
            .await;
    }
    not_offered(ctx, &target.entity, NotOffered::NoListener)
}

/// A sender waiting for its listener's answer.
struct Joined<'a> {
    /// When the sender's request came.
    started: std::time::Instant,
    entity: &'a str,
    sender_upgrade: OnUpgrade,
    sender_permit: Arc<OwnedSemaphorePermit>,
    revocation: Revocation,
    /// Its places under the per-token and per-listener caps, held until the splice ends.
    places: Places,
}

/// Its place under its listener's cap is on this replica only when the listener is.
type Places = (Place<[u8; 32]>, Option<Place<u64>>);

/// What authorized a rendezvous: when either is revoked, it ends.
pub(super) struct Revocation {
    pub(super) sender: Grant,
    pub(super) listener: ListenerGrant,
}

impl Revocation {
    /// Completes when the sender's grant, or the listener's current one, is revoked.
    pub(super) async fn revoked(&self, shared: &super::state::Shared) -> &'static str {
        // Subscribed before the first check: a change between authorization and now is
        // seen by that check, and any later one wakes the wait.
        let mut changes = shared.rule_changes();
        loop {
            if !shared.still_authorized(&self.sender) {
                return "sender";
            }
            if !shared.still_authorized(&self.listener.get()) {
                return "listener";
            }
            rule_changed(&mut changes).await;
        }
    }
}

/// The sender's answer once its listener accepted, rejected, or let the offer lapse.
async fn finish_connect(
    ctx: &Ctx,
    joined: Joined<'_>,
    mut wait: super::rendezvous::PendingWait<'_>,
    mut switching: Response<Body>,
) -> Response<Body> {
    let Joined {
        started,
        entity,
        sender_upgrade,
        sender_permit,
        revocation,
        places,
    } = joined;
    let metrics = &ctx.shared.stats.metrics;
    match tokio::time::timeout(ACCEPT_TIMEOUT, wait.reply()).await {
        Ok(Ok(AcceptOutcome::Accepted(listener_upgrade, listener_permit, protocol))) => {
            metrics.accept("accepted");
            metrics
                .accept_duration
                .observe(started.elapsed().as_secs_f64());
            let permits = (sender_permit, listener_permit);
            let upgrades = (sender_upgrade, listener_upgrade);
            tracing::debug!("rendezvous accepted");
            spawn_splice(ctx, entity, upgrades, (permits, places), revocation);
            // The sender learns the subprotocol the listener chose, as Azure Relay tells it.
            if let Some(protocol) = protocol {
                switching
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
            }
            switching
        }
        Ok(Ok(AcceptOutcome::Rejected {
            status,
            description,
        })) => {
            metrics.accept("rejected");
            text(status, description)
        }
        Ok(Err(_)) => {
            metrics.accept("dropped");
            text(502, "listener dropped the connection before accepting it")
        }
        Err(_) => {
            metrics.accept("timeout");
            drop(wait);
            text(
                504,
                format!(
                    "listener did not accept within {}s",
                    ACCEPT_TIMEOUT.as_secs()
                ),
            )
        }
    }
}

/// The hybrid connection a sender's path names, and the rest of the path: the longest
/// `/`-bounded prefix that has listeners, else the whole path (which then has none).
pub(super) fn route<'a>(
    rendezvous: &super::rendezvous::Rendezvous,
    path: &'a str,
) -> (&'a str, &'a str) {
    let mut end = path.len();
    loop {
        let candidate = &path[..end];
        if rendezvous.listener_count(candidate) > 0 {
            return (candidate, &path[end..]);
        }
        match candidate.rfind('/') {
            Some(slash) if slash > 0 => end = slash,
            _ => return (path, ""),
        }
    }
}

/// Every `max_connections` slot is held by an authenticated connection.
fn at_capacity(ctx: &Ctx) -> Response<Body> {
    ctx.shared.stats.metrics.limit_hit("max_connections");
    text(503, "the relay is at capacity; retry later")
}

/// Azure Relay's answer to one listener too many.
fn quota_exceeded(entity: &str, max: usize) -> Response<Body> {
    let message = format!(
        "QuotaExceeded: hybrid connection '{entity}' already has {max} listeners, the most allowed"
    );
    text(403, message)
}

/// A `sb-hc-id` longer than the relay allows is refused, as Azure Relay refuses it.
/// A refusal for an `sb-hc-id` that is too long, or that holds control characters: the id is
/// logged with every line of its rendezvous, where a newline would forge a line.
pub(super) fn id_too_long(target: &HcTarget, ctx: &Ctx) -> Option<Response<Body>> {
    let max = ctx.shared.limits.max_id_len;
    let id = target.get(QUERY_ID)?;
    if id.len() > max {
        ctx.shared.stats.metrics.limit_hit("max_id_len");
        return Some(text(
            400,
            format!("{QUERY_ID} is longer than {max} characters"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Some(text(400, format!("{QUERY_ID} holds control characters")));
    }
    None
}

/// What the listener is offered: where to accept (the path and query; the relay's host for
/// this listener is put in front by [`Rendezvous::offer`]), and who the sender is.
fn accept_message(
    req: &Request<Incoming>,
    target: &HcTarget,
    (entity, suffix): (&str, &str),
    id: &str,
    peer: SocketAddr,
) -> Accept {
    Accept {
        address: rendezvous_path(Action::Accept, entity, suffix, id, target),
        id: id.to_string(),
        connect_headers: connect_headers(req),
        remote_endpoint: Some(RemoteEndpoint {
            address: peer.ip().to_string(),
            port: peer.port(),
        }),
    }
}

/// The sender's `sb-hc-id` (when short enough) made unique, or a fresh id.
pub(super) fn rendezvous_id(target: &HcTarget) -> String {
    target
        .get(QUERY_ID)
        .filter(|s| !s.is_empty() && s.len() <= 64)
        .map(|s| format!("{s}_{}", Uuid::new_v4().simple()))
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string())
}

/// `/$hc/<entity><suffix>?sb-hc-action=<action>&sb-hc-id=<id>` plus the sender's own query
/// parameters (those not `sb-hc-*`), every part encoded.
pub(super) fn rendezvous_path(
    action: Action,
    entity: &str,
    suffix: &str,
    id: &str,
    target: &HcTarget,
) -> String {
    let segment = |s: &str| {
        s.split('/')
            .map(|p| percent_encoding::utf8_percent_encode(p, UNRESERVED).to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair(QUERY_ACTION, action.as_str());
    query.append_pair(QUERY_ID, id);
    for (k, v) in &target.query {
        if !k.starts_with("sb-hc-") {
            query.append_pair(k, v);
        }
    }
    format!(
        "/$hc/{}{}?{}",
        segment(entity),
        segment(suffix),
        query.finish()
    )
}

/// Everything but RFC 3986's unreserved characters is encoded in a path segment.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The sender's headers for the listener, its WebSocket handshake included (a listener such
/// as Microsoft's hyco-ws completes the handshake from them), without its credential.
fn connect_headers(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.headers()
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !(n.eq_ignore_ascii_case(HEADER_AUTHORIZATION) || n == "authorization")
        })
        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Joins the sender's and the listener's WebSockets once both upgrades complete; both
/// connection slots are held until the splice ends. The splice reads frames itself from the
/// raw upgraded connections (see `splice`), so no message is ever assembled here.
fn spawn_splice(
    ctx: &Ctx,
    entity: &str,
    (sender_upgrade, listener_upgrade): (OnUpgrade, OnUpgrade),
    permits: (
        (Arc<OwnedSemaphorePermit>, Arc<OwnedSemaphorePermit>),
        Places,
    ),
    revocation: Revocation,
) {
    let entity = entity.to_string();
    let stats = ctx.shared.stats.clone();
    let closing = ctx.closing.clone();
    let shared = ctx.shared.clone();
    let buffer = ctx.shared.limits.splice_buffer;
    // Cancelled when what authorized either side is revoked: 1008 "revoked" to both.
    let revoked = CancellationToken::new();
    ctx.tasks.spawn(async move {
        let _permits = permits;
        match tokio::try_join!(upgraded(sender_upgrade), upgraded(listener_upgrade)) {
            Ok((s, l)) => {
                stats.rendezvous_total.fetch_add(1, Ordering::Relaxed);
                stats.rendezvous_open.fetch_add(1, Ordering::Relaxed);
                let open = crate::metrics::Open::new(&stats.metrics.tunnels);
                let counters = (
                    stats.metrics.sender_to_listener.clone(),
                    stats.metrics.listener_to_sender.clone(),
                );
                let splice =
                    splice::splice(s, l, buffer, (closing, revoked.clone()), counters);
                tokio::pin!(splice);
                let counts = tokio::select! {
                    counts = &mut splice => counts,
                    side = revocation.revoked(&shared) => {
                        tracing::info!(entity = %entity.escape_debug(), side, "authorization revoked; closing the rendezvous");
                        revoked.cancel();
                        splice.await
                    }
                };
                tracing::debug!(
                    entity = %entity.escape_debug(),
                    bytes.up = counts.sender_to_listener,
                    bytes.down = counts.listener_to_sender,
                    "rendezvous ended"
                );
                stats.rendezvous_open.fetch_sub(1, Ordering::Relaxed);
                drop(open);
            }
            Err(e) => {
                tracing::debug!(entity = %entity.escape_debug(), error = %e, "rendezvous upgrade failed")
            }
        }
    }
    // The rendezvous span of `connect`, which this splice outlives.
    .in_current_span());
}

/// A listener that answers an accept address with `sb-hc-statusCode` rejects the sender.
fn listener_rejection(target: &HcTarget) -> Option<AcceptOutcome> {
    let code = target.get(QUERY_STATUS_CODE)?;
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|s| (400..600).contains(s))
        .unwrap_or(502);
    let description = target
        .get(QUERY_STATUS_DESCRIPTION)
        .unwrap_or("rejected by listener")
        .chars()
        .take(500)
        .collect();
    Some(AcceptOutcome::Rejected {
        status,
        description,
    })
}

/// The subprotocol the listener chose (the one it asks for when accepting): it goes back to
/// the listener and on to the sender.
fn chosen_protocol(req: &Request<Incoming>) -> Option<http::HeaderValue> {
    req.headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .and_then(|p| http::HeaderValue::from_str(p).ok())
}

fn accept(
    req: &mut Request<Incoming>,
    target: &HcTarget,
    ctx: &Ctx,
    mut switching: Response<Body>,
) -> Response<Body> {
    let Some(id) = target.get(QUERY_ID) else {
        return text(400, "accept without sb-hc-id");
    };
    // The address itself is the credential: random, single-use and short-lived.
    let Some(reply) = ctx.rendezvous.take_pending(id, &target.entity) else {
        return text(404, "unknown or expired rendezvous address");
    };
    if let Some(rejection) = listener_rejection(target) {
        let _ = reply.send(rejection);
        return text(410, "rejection delivered");
    }
    let protocol = chosen_protocol(req);
    let Some(permit) = ctx.slot() else {
        let _ = reply.send(AcceptOutcome::Rejected {
            status: 503,
            description: "the relay is at capacity".into(),
        });
        return at_capacity(ctx);
    };
    if let Some(p) = &protocol {
        switching
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    if reply
        .send(AcceptOutcome::Accepted(
            hyper::upgrade::on(req),
            permit,
            protocol,
        ))
        .is_err()
    {
        return text(410, "the sender gave up waiting");
    }
    switching
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_from_their_ports_ipv6_literals_too() {
        let split = |s: &str| {
            let (h, p) = split_host(s);
            (h, p)
        };
        assert_eq!(
            split("relay.test:8443"),
            ("relay.test".into(), Some("8443".into()))
        );
        assert_eq!(split("relay.test"), ("relay.test".into(), None));
        assert_eq!(split("[::1]:443"), ("[::1]".into(), Some("443".into())));
        assert_eq!(split("[::1]"), ("[::1]".into(), None));
        assert_eq!(split("127.0.0.1:1"), ("127.0.0.1".into(), Some("1".into())));
    }

    #[test]
    fn refusals_are_logged_within_a_budget_and_the_rest_counted() {
        let budget = LogBudget::new(3);
        assert_eq!(
            (0..5).map(|_| budget.take()).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(0), None, None]
        );
        std::thread::sleep(Duration::from_millis(1100));
        // The next second's first line says how many were left out.
        assert_eq!(budget.take(), Some(2));
        assert_eq!(budget.take(), Some(0));
    }

    #[test]
    fn caller_strings_are_cut_for_the_log_at_a_character_boundary() {
        assert_eq!(clip_for_log("short"), "short");
        let long = "é".repeat(300);
        assert_eq!(clip_for_log(&long).chars().count(), 200);
        // Debug formatting, as the log line uses, escapes what could forge a line.
        assert_eq!(
            format!("{:?}", clip_for_log("a\nlistener connected\u{1b}[31m")),
            "\"a\\nlistener connected\\u{1b}[31m\""
        );
    }
}

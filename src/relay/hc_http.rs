//! Hybrid Connections HTTP, Azure Relay's `request` gesture: a sender's plain HTTPS request to
//! `https://<relay>/<hybrid connection>[/more][?query]` reaches a listener (Microsoft's
//! `hyco-https`, .NET's `HybridConnectionListener`), whose `response` is the answer.
//!
//! The protocol lets the service choose, request by request, between the control channel and
//! a rendezvous; this relay always chooses the rendezvous. The control channel carries only a
//! notice (address and id), the listener comes to the address, and the request's head and body
//! go there, the response comes back there, each body frame by frame through a fixed buffer:
//! no body is held whole, and no upload waits in a listener's control channel. Each request has
//! its own rendezvous, closed once the response has ended.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tracing::Instrument;

use super::admission::{Books, KeptPlace};
use super::auth::Right;
use super::gauge::Place;
use super::rendezvous::{AcceptOutcome, NotOffered};
use super::rule::ListenerGrant;
use super::server::{
    check_token, header_token, id_too_long, not_offered, places_for_token, remote_routes,
    rendezvous_id, rendezvous_path, route, text, Body, Revocation, SenderPlaces, ACCEPT_TIMEOUT,
    MAX_HC_PATH,
};
use super::state::{Ctx, Shared};
use crate::tunnel::frame::{
    apply_mask, close_code, parse_header, write_close, write_server_header, FrameError, Opcode,
    Sequence, MAX_CONTROL_PAYLOAD, MAX_SERVER_HEADER,
};
use crate::tunnel::protocol::{
    Accept, Action, ControlMessage, HcTarget, HttpRequest, HttpResponse, RemoteEndpoint,
    ResponseMessage, HEADER_AUTHORIZATION, QUERY_TOKEN,
};
use crate::tunnel::upgrade::{is_websocket, upgraded, RawStream};

/// How long the response head waits for the body's first piece: one that comes with the head
/// (nearly every body) is checked before the head goes out, so a body broken from the start is
/// a 502 with a status line; a body that starts later (a stream of events) does not hold the
/// head back.
const HEAD_HOLD: Duration = Duration::from_millis(250);

/// The largest response head (the JSON text message), the control channel's 64 KiB.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Body bytes read from the listener at once: the buffer of each direction.
const READ_CHUNK: usize = 16 * 1024;

/// Headers that belong to one HTTP connection (RFC 7230 and its hop-by-hop list), which Azure
/// Relay strips on both ways; and the relay's own credential header.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "close",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

/// A sender's HTTP request for a hybrid connection's listener.
pub async fn handle(req: Request<Incoming>, ctx: &Ctx, peer: SocketAddr) -> Response<Body> {
    let books = req.extensions().get::<Books>().cloned();
    let mut resp = relay_request(req, ctx, peer, books).await;
    if resp.extensions().get::<Authenticated>().is_some() {
        // Off the unauthenticated books since it authenticated: the connection ends with
        // this request rather than idle in keep-alive, unaccounted.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Marks the answer to a request that authenticated and took the connection off the books.
#[derive(Clone, Copy)]
struct Authenticated;

async fn relay_request(
    req: Request<Incoming>,
    ctx: &Ctx,
    peer: SocketAddr,
    books: Option<Books>,
) -> Response<Body> {
    let started = Instant::now();
    let Some(target) = HcTarget::parse_http(req.uri().path(), req.uri().query()) else {
        return text(400, "the request path is not UTF-8 once percent-decoded");
    };
    if target.entity.is_empty() {
        return text(
            404,
            "no hybrid connection named: send HTTP requests to /<hybrid connection>[/path] and WebSockets to /$hc/<hybrid connection>",
        );
    }
    // Routing looks up each `/`-bounded prefix before the caller is authenticated.
    if target.entity.len() > MAX_HC_PATH {
        return text(
            414,
            format!("hybrid connection path longer than {MAX_HC_PATH} characters"),
        );
    }
    if let Some(refused) = id_too_long(&target, ctx) {
        return refused;
    }
    // An HTTP/1.0 response without a length ends with the connection, so a body the listener
    // broke off would look complete to such a sender.
    if req.version() < http::Version::HTTP_11 {
        return text(
            505,
            "HTTP/1.1 or later is required for requests to a listener",
        );
    }
    if req.method() == Method::CONNECT {
        return text(405, "CONNECT cannot be relayed to a listener");
    }
    if is_websocket(&req) {
        return text(
            400,
            "WebSocket senders connect to /$hc/<hybrid connection>?sb-hc-action=connect",
        );
    }
    let (token, by_authorization) = credential(&req, &target);
    let token = token.map(str::to_owned);
    let offer = match offer(&target, token.as_deref(), ctx, peer).await {
        Ok(offer) => offer,
        Err(refused) => return *refused,
    };
    // Authenticated, holding a connection slot: it no longer counts among the strangers.
    if let Some(books) = books {
        books.leave();
    }
    let mut resp = answer(offer, req, by_authorization, ctx, peer, started).await;
    resp.extensions_mut().insert(Authenticated);
    resp
}

/// The listener's answer to an admitted request: its rendezvous awaited, then the exchange.
async fn answer(
    offer: Offer<'_>,
    req: Request<Incoming>,
    by_authorization: bool,
    ctx: &Ctx,
    peer: SocketAddr,
    started: Instant,
) -> Response<Body> {
    let Offer {
        entity,
        id,
        address,
        mut wait,
        revocation,
        places,
        sender,
        expected,
    } = offer;
    let span = tracing::info_span!("request", sb_hc_id = %id, entity = %entity.escape_debug());
    let metrics = &ctx.shared.stats.metrics;
    let (listener_upgrade, listener_permit) =
        match tokio::time::timeout(ACCEPT_TIMEOUT, wait.reply()).await {
            Ok(Ok(AcceptOutcome::Accepted(upgrade, permit, _))) => (upgrade, permit),
            Ok(Ok(AcceptOutcome::Rejected {
                status,
                description,
            })) => {
                metrics.accept("rejected");
                return text(status, description);
            }
            Ok(Err(_)) => {
                metrics.accept("dropped");
                return text(502, "the listener dropped the request before taking it");
            }
            Err(_) => {
                metrics.accept("timeout");
                return text(
                    504,
                    format!(
                        "the listener did not come for the request within {}s",
                        ACCEPT_TIMEOUT.as_secs()
                    ),
                );
            }
        };
    drop(expected);
    metrics.accept("accepted");
    metrics
        .accept_duration
        .observe(started.elapsed().as_secs_f64());
    let Ok(Ok(io)) = tokio::time::timeout(ACCEPT_TIMEOUT, upgraded(listener_upgrade)).await else {
        return text(502, "the listener's rendezvous failed");
    };
    let head = HttpRequest {
        address,
        id: id.clone(),
        request_target: Some(request_target(&req)),
        method: Some(req.method().to_string()),
        request_headers: Some(forwarded_headers(&req, by_authorization)),
        remote_endpoint: Some(RemoteEndpoint {
            address: peer.ip().to_string(),
            port: peer.port(),
        }),
        body: Some(!req.body().is_end_stream()),
    };
    let head_only = req.method() == Method::HEAD;
    let hold = Hold {
        _places: (places, sender, listener_permit),
    };
    let exchange = Exchange {
        id,
        head,
        shared: ctx.shared.clone(),
        revocation,
        hold,
    };
    exchange
        .run(io, req.into_body(), head_only)
        .instrument(span)
        .await
}

/// What an admitted request holds until its response has ended: its places under the
/// per-token and per-listener caps and both connection slots.
struct Hold {
    _places: (
        Option<Place<u64>>,
        SenderPlaces,
        std::sync::Arc<tokio::sync::OwnedSemaphorePermit>,
    ),
}

/// A listener took the notice of a request and will come to `address`.
struct Offer<'a> {
    entity: &'a str,
    id: String,
    address: String,
    wait: super::rendezvous::PendingWait<'a>,
    revocation: Revocation,
    /// Its place under the listener's cap, when the listener is on this replica.
    places: Option<Place<u64>>,
    sender: SenderPlaces,
    /// A place kept for the listener's rendezvous connection, when it is on this replica.
    expected: Option<KeptPlace>,
}

/// Authenticates the sender, takes its places and hands the request's notice to a listener,
/// on this replica or (through NATS) another.
async fn offer<'a>(
    target: &'a HcTarget,
    token: Option<&str>,
    ctx: &'a Ctx,
    peer: SocketAddr,
) -> Result<Offer<'a>, Box<Response<Body>>> {
    let (entity, suffix) = route(&ctx.rendezvous, &target.entity);
    let replicas = ctx.shared.replicas.clone();
    let remote = ctx.rendezvous.listener_count(entity) == 0 && replicas.is_some();
    let routes = if remote {
        remote_routes(token, &target.entity, ctx)
    } else {
        let authorized = check_token(token, entity, ctx, Right::Send)
            .map_err(|(code, msg)| Box::new(text(code, msg)))?;
        vec![(entity, suffix, authorized)]
    };
    if routes.is_empty() {
        // The refusal a single relay gives for the whole path.
        check_token(token, &target.entity, ctx, Right::Send)
            .map_err(|(code, msg)| Box::new(text(code, msg)))?;
        return Err(Box::new(no_listener(ctx, &target.entity)));
    }
    let sender = places_for_token(token, ctx)?;
    for (entity, suffix, authorized) in routes {
        let id = rendezvous_id(target);
        let path = rendezvous_path(Action::Request, entity, suffix, &id, target);
        let wait = ctx.rendezvous.add_pending(&id, entity);
        let (address, listener, places, expected) = match &replicas {
            Some(replicas) if remote => {
                use super::replicas::RemoteNot;
                let address = format!("wss://{}{path}", replicas.me());
                let accept = Accept {
                    address: address.clone(),
                    id: id.clone(),
                    connect_headers: Default::default(),
                    remote_endpoint: Some(RemoteEndpoint {
                        address: peer.ip().to_string(),
                        port: peer.port(),
                    }),
                };
                match replicas.offer(entity, &accept, true).await {
                    Ok(grant) => (address, ListenerGrant::new(grant), None, None),
                    Err(RemoteNot::NoListener) => continue,
                    Err(RemoteNot::Busy) => {
                        return Err(Box::new(not_offered(ctx, entity, NotOffered::Busy)))
                    }
                    Err(RemoteNot::Unavailable) => {
                        ctx.shared.stats.metrics.accept("replicas_unavailable");
                        return Err(Box::new(text(
                            503,
                            format!("no listener of hybrid connection '{entity}' is on this relay replica, and the other replicas cannot be reached (NATS unavailable); retry shortly"),
                        )));
                    }
                }
            }
            _ => {
                let max = ctx.shared.limits.max_rendezvous_per_listener;
                let mut address = String::new();
                let offered = ctx.rendezvous.offer(entity, max, |authority| {
                    address = format!("wss://{authority}{path}");
                    ControlMessage::Request(HttpRequest::notice(&address, &id))
                });
                match offered {
                    Ok(offered) => {
                        let expected = ctx.admission.keep_place_for(offered.peer);
                        (address, offered.grant, Some(offered.place), Some(expected))
                    }
                    Err(NotOffered::NoListener) => return Err(Box::new(no_listener(ctx, entity))),
                    Err(busy) => return Err(Box::new(not_offered(ctx, entity, busy))),
                }
            }
        };
        return Ok(Offer {
            entity,
            id,
            address,
            wait,
            revocation: Revocation {
                sender: authorized.grant,
                listener,
            },
            places,
            sender,
            expected,
        });
    }
    Err(Box::new(no_listener(ctx, &target.entity)))
}

/// Azure Relay answers an HTTP request for a connection without listeners with 502.
fn no_listener(ctx: &Ctx, entity: &str) -> Response<Body> {
    ctx.shared.stats.metrics.accept("no_listener");
    text(
        502,
        format!("no listener is connected for hybrid connection '{entity}'"),
    )
}

/// The sender's relay credential and whether it came in `Authorization`: `sb-hc-token` in the
/// query, else the `ServiceBusAuthorization` header, else `Authorization`, as Azure Relay
/// looks for it. Only an `Authorization` header that served as the credential is withheld
/// from the listener; otherwise it is the listener's own business.
fn credential<'r>(req: &'r Request<Incoming>, target: &'r HcTarget) -> (Option<&'r str>, bool) {
    if let Some(token) = target.get(QUERY_TOKEN) {
        return (Some(token), false);
    }
    let header = |name: &str| req.headers().get(name).map(header_token);
    if let Some(token) = header(HEADER_AUTHORIZATION) {
        return (Some(token), false);
    }
    match header(header::AUTHORIZATION.as_str()) {
        Some(token) => (Some(token), true),
        None => (None, false),
    }
}

/// The request target as the sender wrote it, without its `sb-hc-*` query parameters (each
/// other parameter keeps its own encoding).
fn request_target(req: &Request<Incoming>) -> String {
    let path = req.uri().path();
    let kept: Vec<&str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            !key.to_ascii_lowercase().starts_with("sb-hc-")
        })
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The sender's headers for the listener: all but the connection's own and the relay
/// credential; repeated ones joined with ", ".
fn forwarded_headers(
    req: &Request<Incoming>,
    by_authorization: bool,
) -> std::collections::BTreeMap<String, String> {
    // Headers the sender's `Connection` names are that connection's too (RFC 7230 6.1).
    let named: Vec<String> = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in req.headers() {
        let n = name.as_str();
        if NOT_FORWARDED.contains(&n)
            || named.iter().any(|t| t == n)
            || n.eq_ignore_ascii_case(HEADER_AUTHORIZATION)
            || (by_authorization && *name == header::AUTHORIZATION)
        {
            continue;
        }
        // JSON carries text: bytes outside UTF-8 (obs-text) arrive replaced, not dropped.
        let value = String::from_utf8_lossy(value.as_bytes());
        let value = value.as_ref();
        out.entry(n.to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    out
}

/// One request's exchange over its rendezvous.
struct Exchange {
    id: String,
    head: HttpRequest,
    shared: Shared,
    revocation: Revocation,
    hold: Hold,
}

/// Why an exchange failed, for the sender's 502 or 504.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("the listener broke the WebSocket protocol: {0}")]
    Protocol(#[from] FrameError),
    #[error("the listener's rendezvous failed: {0}")]
    Io(#[from] io::Error),
    #[error("the listener closed the rendezvous before it had answered")]
    Closed,
    #[error("the listener's response head is longer than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLong,
    #[error("the listener's response is not a response message: {0}")]
    BadResponse(String),
    #[error("the listener did not answer within {0}s")]
    Timeout(u64),
    #[error("the request body was not received in time, or broke off")]
    RequestBody,
    #[error("authorization revoked ({0})")]
    Revoked(&'static str),
}

impl Exchange {
    async fn run(self, io: RawStream, body: Incoming, head_only: bool) -> Response<Body> {
        let (rx, tx) = tokio::io::split(io);
        let mut listener = Rendezvous {
            reader: FrameReader::new(rx),
            tx,
            idle: self.shared.limits.http_idle,
        };
        let exchanged = {
            let talk = listener.request_and_response_head(&self.head, body, &self.id);
            tokio::select! {
                done = talk => done,
                side = self.revocation.revoked(&self.shared) => Err(ExchangeError::Revoked(side)),
            }
        };
        let response = match exchanged {
            Ok(response) => response,
            Err(e) => return listener.failed(e).await,
        };
        let bodiless = head_only
            || response.status == StatusCode::NO_CONTENT
            || response.status == StatusCode::NOT_MODIFIED;
        let mut builder = Response::builder().status(response.status);
        for (name, value) in &response.headers {
            builder = builder.header(name, value);
        }
        // A length is the listener's to state for a body it sends, or for HEAD's (never with
        // 204 or 304); hyper then holds the body to it.
        let length = response.content_length.filter(|_| {
            let no_length = response.status == StatusCode::NO_CONTENT
                || response.status == StatusCode::NOT_MODIFIED;
            !no_length && (head_only || response.body)
        });
        if let Some(n) = length {
            builder = builder.header(header::CONTENT_LENGTH, n);
        }
        if let Some(reason) = response.reason {
            builder = builder.extension(reason);
        }
        let body = if response.body && !bodiless {
            // The first piece, when it comes with the head, is read before the head goes out:
            // a body that fails at once is the sender's 502, not a response without a status
            // line.
            let first = tokio::select! {
                first = listener.first_piece() => first,
                side = self.revocation.revoked(&self.shared) => Err(ExchangeError::Revoked(side)),
            };
            // A body that ends with its first piece is held to its length here, while the
            // sender can still be told.
            let first = first.and_then(|first| match (length, &first) {
                (Some(n), Some((bytes, true))) if bytes.len() as u64 != n => {
                    Err(ExchangeError::BadResponse(format!(
                        "its body has {} bytes, its Content-Length says {n}",
                        bytes.len()
                    )))
                }
                _ => Ok(first),
            });
            let first = match first {
                Ok(first) => first,
                Err(e) => return listener.failed(e).await,
            };
            let span = tracing::Span::current();
            response_body(
                first,
                listener,
                (self.shared, self.revocation, self.hold),
                span,
            )
        } else {
            listener.close(close_code::NORMAL, "").await;
            Empty::new().map_err(|never| match never {}).boxed_unsync()
        };
        tracing::debug!(status = response.status.as_u16(), "HTTP request relayed");
        builder
            .body(body)
            .unwrap_or_else(|_| text(502, "the listener's response could not be built"))
    }
}

/// A listener's response head, checked.
struct ResponseHead {
    status: StatusCode,
    reason: Option<hyper::ext::ReasonPhrase>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The listener's Content-Length, checked.
    content_length: Option<u64>,
    body: bool,
}

/// The listener's side of one request's rendezvous.
struct Rendezvous {
    reader: FrameReader<ReadHalf<RawStream>>,
    tx: WriteHalf<RawStream>,
    /// `Limits::http_idle`.
    idle: Duration,
}

impl Rendezvous {
    async fn request_and_response_head(
        &mut self,
        head: &HttpRequest,
        mut body: Incoming,
        id: &str,
    ) -> Result<ResponseHead, ExchangeError> {
        let json = serde_json::to_vec(&serde_json::json!({ "request": head }))
            .map_err(|e| ExchangeError::BadResponse(e.to_string()))?;
        self.write_frame(true, Opcode::Text, &json).await?;
        if head.body == Some(true) {
            // One binary message, fragmented as the body comes.
            let mut opcode = Opcode::Binary;
            loop {
                let frame = match tokio::time::timeout(self.idle, body.frame()).await {
                    Ok(Some(Ok(frame))) => frame,
                    Ok(None) => break,
                    Ok(Some(Err(_))) | Err(_) => return Err(ExchangeError::RequestBody),
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                self.write_frame(false, opcode, &data).await?;
                opcode = Opcode::Continuation;
            }
            self.write_frame(true, opcode, &[]).await?;
        }
        // One deadline for the whole head, however the listener paces it (pings included).
        let text = tokio::time::timeout(self.idle, self.response_text())
            .await
            .map_err(|_| ExchangeError::Timeout(self.idle.as_secs()))??;
        let message: ResponseMessage =
            serde_json::from_slice(&text).map_err(|e| ExchangeError::BadResponse(e.to_string()))?;
        checked(message.response, id)
    }

    /// The response's JSON text message, pings on the way answered.
    async fn response_text(&mut self) -> Result<Vec<u8>, ExchangeError> {
        let mut text = Vec::new();
        loop {
            match self.reader.next().await? {
                Piece::Data {
                    opcode: Opcode::Text,
                    bytes,
                    end_of_message,
                } => {
                    // What the frame announces counts, not only what came of it yet.
                    let announced = (text.len() + bytes.len()) as u64 + self.reader.remaining;
                    if announced > MAX_RESPONSE_HEAD as u64 {
                        return Err(ExchangeError::HeadTooLong);
                    }
                    text.extend_from_slice(&bytes);
                    if end_of_message {
                        return Ok(text);
                    }
                }
                Piece::Data { .. } => {
                    return Err(ExchangeError::BadResponse(
                        "a binary message came before the response".into(),
                    ))
                }
                Piece::Ping(payload) => self.write_frame(true, Opcode::Pong, &payload).await?,
                Piece::Pong => {}
                Piece::Close => return Err(ExchangeError::Closed),
            }
        }
    }

    /// The body's first piece with data (or its end), pings on the way answered, if it comes
    /// within [`HEAD_HOLD`]; `None` for a body that starts later (a stream of events).
    async fn first_piece(&mut self) -> Result<Option<(Bytes, bool)>, ExchangeError> {
        let until = tokio::time::Instant::now() + HEAD_HOLD;
        loop {
            // Only the read races the clock (it is cancel-safe); a pong is written whole.
            let piece = tokio::select! {
                piece = self.reader.next() => piece?,
                () = tokio::time::sleep_until(until) => return Ok(None),
            };
            match piece {
                Piece::Data {
                    opcode: Opcode::Text,
                    ..
                } => {
                    return Err(ExchangeError::BadResponse(
                        "a text message where the body was announced".into(),
                    ))
                }
                Piece::Data {
                    bytes,
                    end_of_message,
                    ..
                } => {
                    if !bytes.is_empty() || end_of_message {
                        return Ok(Some((bytes, end_of_message)));
                    }
                }
                Piece::Ping(payload) => self.write_frame(true, Opcode::Pong, &payload).await?,
                Piece::Pong => {}
                Piece::Close => return Err(ExchangeError::Closed),
            }
        }
    }

    /// One unmasked frame, within `idle`: a listener that stops reading fails the request.
    async fn write_frame(
        &mut self,
        fin: bool,
        opcode: Opcode,
        payload: &[u8],
    ) -> Result<(), ExchangeError> {
        let mut header = [0u8; MAX_SERVER_HEADER];
        let n = write_server_header(&mut header, fin, opcode, payload.len() as u64);
        let write = async {
            self.tx.write_all(&header[MAX_SERVER_HEADER - n..]).await?;
            self.tx.write_all(payload).await?;
            self.tx.flush().await
        };
        tokio::time::timeout(self.idle, write)
            .await
            .map_err(|_| ExchangeError::Timeout(self.idle.as_secs()))??;
        Ok(())
    }

    /// The sender's answer when the exchange failed before the response head went out; the
    /// rendezvous is closed.
    async fn failed(&mut self, e: ExchangeError) -> Response<Body> {
        tracing::info!(error = %e.to_string().escape_debug(), "HTTP request through the relay failed");
        self.close(close_code::GOING_AWAY, "request failed").await;
        let status = match e {
            ExchangeError::Timeout(_) => 504,
            ExchangeError::RequestBody => 408,
            ExchangeError::Revoked(_) => 403,
            _ => 502,
        };
        text(status, e.to_string())
    }

    /// Closes the rendezvous with `code`, without waiting long for a listener that is gone.
    async fn close(&mut self, code: u16, reason: &str) {
        let mut frame = [0u8; 2 + MAX_CONTROL_PAYLOAD];
        let n = write_close(&mut frame, code, reason);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.tx.write_all(&frame[..n]).await;
            let _ = self.tx.shutdown().await;
        })
        .await;
    }
}

/// The response head the listener sent for request `id`, as HTTP.
fn checked(response: HttpResponse, id: &str) -> Result<ResponseHead, ExchangeError> {
    if response.request_id != id {
        return Err(ExchangeError::BadResponse(
            "it answers another request id".into(),
        ));
    }
    let code = match &response.status_code {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let status = code
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| {
            ExchangeError::BadResponse("statusCode is not a final HTTP status (200-999)".into())
        })?;
    let reason = response
        .status_description
        .as_deref()
        .filter(|d| !d.is_empty() && Some(*d) != status.canonical_reason())
        .and_then(|d| hyper::ext::ReasonPhrase::try_from(d.as_bytes().to_vec()).ok());
    // Values as text: strings, numbers (node's `Content-Length: 12`), lists of either.
    let values = |value: &serde_json::Value| -> Vec<String> {
        let one = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match value {
            serde_json::Value::Array(items) => items.iter().filter_map(one).collect(),
            other => one(other).into_iter().collect(),
        }
    };
    // Headers the listener's own `Connection` names belong to that connection too.
    let named: Vec<String> = response
        .response_headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| values(value))
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut headers = Vec::new();
    let mut content_length = None;
    for (name, value) in &response.response_headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if name == header::CONTENT_LENGTH {
            // As a proxy must (RFC 9112 6.3): a length that is not one plain number, or
            // several that differ, is an error, not a guess.
            for v in values(value) {
                let n = plain_length(&v).ok_or_else(|| {
                    ExchangeError::BadResponse("Content-Length is not a length".into())
                })?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(ExchangeError::BadResponse(
                        "Content-Length values differ".into(),
                    ));
                }
                content_length = Some(n);
            }
            continue;
        }
        if NOT_FORWARDED.contains(&name.as_str()) || named.iter().any(|t| t == name.as_str()) {
            continue;
        }
        for value in values(value) {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.push((name.clone(), value));
            }
        }
    }
    Ok(ResponseHead {
        status,
        reason,
        headers,
        content_length,
        body: response.body,
    })
}

/// A Content-Length value: ASCII digits only (no sign, no space), at most 2^53 (what every
/// client's parser takes).
fn plain_length(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 16 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|n| *n <= 1 << 53)
}

/// The response body as it comes from the listener, `first` piece first: each piece goes to
/// the sender as the sender takes it (hyper polls this only then), so a fast listener waits
/// for a slow sender instead of filling memory. A listener that pauses longer than `idle`,
/// breaks off or loses its authorization cuts the body short, which the sender sees as an
/// incomplete response, never as a complete one.
fn response_body(
    first: Option<(Bytes, bool)>,
    listener: Rendezvous,
    (shared, revocation, hold): (Shared, Revocation, Hold),
    span: tracing::Span,
) -> Body {
    let state = BodyState {
        listener,
        shared,
        revocation,
        _hold: hold,
        first,
        ended: false,
    };
    let pieces = stream::unfold(state, move |mut st| {
        async move {
            let frame = st.next().await?;
            Some((frame, st))
        }
        .instrument(span.clone())
    });
    StreamBody::new(pieces).boxed_unsync()
}

/// A response body on its way from the listener.
struct BodyState {
    listener: Rendezvous,
    shared: Shared,
    revocation: Revocation,
    _hold: Hold,
    /// The piece read before the head went out, and whether the body ends with it.
    first: Option<(Bytes, bool)>,
    ended: bool,
}

impl BodyState {
    async fn next(&mut self) -> Option<io::Result<Frame<Bytes>>> {
        if self.ended {
            return None;
        }
        loop {
            let piece = match self.first.take() {
                Some((bytes, end_of_message)) => Piece::Data {
                    opcode: Opcode::Binary,
                    bytes,
                    end_of_message,
                },
                None => match self.read().await {
                    Ok(piece) => piece,
                    Err((code, why)) => return Some(Err(self.fail(code, why).await)),
                },
            };
            match piece {
                Piece::Data {
                    opcode: Opcode::Text,
                    ..
                } => {
                    let why = "a text message inside the response body".to_string();
                    return Some(Err(self.fail(close_code::PROTOCOL_ERROR, why).await));
                }
                Piece::Data {
                    bytes,
                    end_of_message,
                    ..
                } => {
                    if end_of_message {
                        self.end(close_code::NORMAL, "").await;
                    }
                    if !bytes.is_empty() {
                        return Some(Ok(Frame::data(bytes)));
                    }
                    if end_of_message {
                        return None;
                    }
                }
                Piece::Ping(payload) => {
                    if let Err(e) = self
                        .listener
                        .write_frame(true, Opcode::Pong, &payload)
                        .await
                    {
                        return Some(Err(self.fail(close_code::GOING_AWAY, e.to_string()).await));
                    }
                }
                Piece::Pong => {}
                Piece::Close => {
                    let why = "the listener closed mid-body".to_string();
                    return Some(Err(self.fail(close_code::GOING_AWAY, why).await));
                }
            }
        }
    }

    /// The listener's next piece, within `idle`, unless what authorized the request is
    /// revoked first; else the close code for the listener and why.
    async fn read(&mut self) -> Result<Piece, (u16, String)> {
        let next = tokio::time::timeout(self.listener.idle, self.listener.reader.next());
        tokio::select! {
            piece = next => match piece {
                Ok(Ok(piece)) => Ok(piece),
                Ok(Err(e)) => Err((close_code::GOING_AWAY, e.to_string())),
                Err(_) => Err((
                    close_code::GOING_AWAY,
                    format!("the listener paused over {}s", self.listener.idle.as_secs()),
                )),
            },
            side = self.revocation.revoked(&self.shared) => {
                Err((close_code::POLICY, format!("authorization revoked ({side})")))
            }
        }
    }

    /// The body is over: the rendezvous is closed with `code`, once.
    async fn end(&mut self, code: u16, reason: &str) {
        self.ended = true;
        self.listener.close(code, reason).await;
    }

    /// The body broke off for `why`: logged, the rendezvous closed, the error for hyper.
    async fn fail(&mut self, code: u16, why: String) -> io::Error {
        tracing::info!(error = %why.escape_debug(), "HTTP response body from the listener broke off");
        self.end(code, "request failed").await;
        io::Error::other(why)
    }
}

/// What [`FrameReader::next`] read.
enum Piece {
    /// Part of a data frame (unmasked), at most [`READ_CHUNK`] bytes; `end_of_message` on the
    /// last part of a message's final frame.
    Data {
        opcode: Opcode,
        bytes: Bytes,
        end_of_message: bool,
    },
    Ping(Bytes),
    Pong,
    Close,
}

impl From<ExchangeError> for io::Error {
    fn from(e: ExchangeError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

/// Reads a client's (the listener's) frames in pieces through one bounded buffer.
struct FrameReader<R> {
    rx: R,
    buf: BytesMut,
    sequence: Sequence,
    /// The data frame being read: its opcode (of the message), FIN, key, what is left.
    opcode: Opcode,
    fin: bool,
    key: [u8; 4],
    offset: u64,
    remaining: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rx: R) -> Self {
        FrameReader {
            rx,
            buf: BytesMut::with_capacity(READ_CHUNK),
            sequence: Sequence::default(),
            opcode: Opcode::Binary,
            fin: true,
            key: [0; 4],
            offset: 0,
            remaining: 0,
        }
    }

    /// Cancel-safe: nothing is taken from the buffer before the frame's state is kept (a
    /// control frame is taken whole, at most 127 + 4 bytes), so a `select!` may drop it.
    async fn next(&mut self) -> Result<Piece, ExchangeError> {
        if self.remaining == 0 {
            let (header, len) = loop {
                match parse_header(&self.buf)? {
                    Some((h, n))
                        if h.opcode.is_control() && self.buf.len() < n + h.len as usize =>
                    {
                        self.fill().await?
                    }
                    Some(parsed) => break parsed,
                    None => self.fill().await?,
                }
            };
            self.sequence.check(&header)?;
            let _ = self.buf.split_to(len);
            let key = header.mask.unwrap_or_default();
            if header.opcode.is_control() {
                let mut payload = self.buf.split_to(header.len as usize);
                apply_mask(&mut payload, key, 0);
                return Ok(match header.opcode {
                    Opcode::Ping => Piece::Ping(payload.freeze()),
                    Opcode::Pong => Piece::Pong,
                    _ => Piece::Close,
                });
            }
            if header.opcode != Opcode::Continuation {
                self.opcode = header.opcode;
            }
            self.fin = header.fin;
            self.key = key;
            self.offset = 0;
            self.remaining = header.len;
            if header.len == 0 {
                return Ok(Piece::Data {
                    opcode: self.opcode,
                    bytes: Bytes::new(),
                    end_of_message: header.fin,
                });
            }
        }
        if self.buf.is_empty() {
            self.fill().await?;
        }
        let n = (self.buf.len() as u64).min(self.remaining) as usize;
        let mut bytes = self.buf.split_to(n);
        apply_mask(&mut bytes, self.key, self.offset);
        self.offset += n as u64;
        self.remaining -= n as u64;
        Ok(Piece::Data {
            opcode: self.opcode,
            bytes: bytes.freeze(),
            end_of_message: self.remaining == 0 && self.fin,
        })
    }

    /// Reads more, at most [`READ_CHUNK`] bytes held at once.
    async fn fill(&mut self) -> Result<(), ExchangeError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        let room = READ_CHUNK.saturating_sub(self.buf.len()).max(1);
        let mut limited = (&mut self.rx).take(room as u64);
        match limited.read_buf(&mut self.buf).await? {
            0 => Err(ExchangeError::Closed),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(json: serde_json::Value) -> HttpResponse {
        serde_json::from_value::<ResponseMessage>(json)
            .unwrap()
            .response
    }

    #[test]
    fn response_heads_become_http_and_bad_ones_are_refused() {
        let head = checked(
            response(serde_json::json!({"response": {
                "requestId": "r1", "statusCode": "201", "statusDescription": "Made It",
                "responseHeaders": {"Content-Type": "text/plain", "Content-Length": 12,
                    "X-Many": ["a", 2], "Transfer-Encoding": "chunked", "Bad\nName": "x",
                    "X-Bad-Value": "a\r\nb"},
                "body": true}})),
            "r1",
        )
        .unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.reason.unwrap().as_bytes(), b"Made It");
        let names: Vec<_> = head
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            ["content-type: text/plain", "x-many: a", "x-many: 2"]
        );
        assert_eq!(head.content_length, Some(12));
        let length = |v: serde_json::Value| {
            checked(
                response(
                    serde_json::json!({"response": {"requestId": "r1", "statusCode": 200,
                    "responseHeaders": {"Content-Length": v}}}),
                ),
                "r1",
            )
            .map(|h| h.content_length)
        };
        assert_eq!(length(serde_json::json!(["7", 7])).unwrap(), Some(7));
        for bad in [
            serde_json::json!("+5"),
            serde_json::json!(" 5"),
            serde_json::json!("-1"),
            serde_json::json!("18446744073709551615"),
            serde_json::json!(["5", "7"]),
            serde_json::json!(["x", "7"]),
        ] {
            assert!(length(bad.clone()).is_err(), "{bad}");
        }
        let named = checked(
            response(
                serde_json::json!({"response": {"requestId": "r1", "statusCode": 200,
                "responseHeaders": {"Connection": "x-secret", "X-Secret": "1", "X-Kept": "2"}}}),
            ),
            "r1",
        )
        .unwrap();
        let names: Vec<_> = named.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert!(head.body);
        let wrong_id =
            response(serde_json::json!({"response": {"requestId": "other", "statusCode": 200}}));
        assert!(matches!(
            checked(wrong_id, "r1"),
            Err(ExchangeError::BadResponse(_))
        ));
        for status in [
            serde_json::json!(101),
            serde_json::json!("x"),
            serde_json::json!(1000),
        ] {
            let bad = response(
                serde_json::json!({"response": {"requestId": "r1", "statusCode": status}}),
            );
            assert!(checked(bad, "r1").is_err());
        }
    }

    #[tokio::test]
    async fn a_listeners_frames_are_read_in_bounded_pieces_with_their_boundaries() {
        use crate::tunnel::frame::push_client_header;
        let key = [1, 2, 3, 4];
        let mut wire = Vec::new();
        let frame = |wire: &mut Vec<u8>, first: u8, payload: &[u8]| {
            let mut masked = payload.to_vec();
            apply_mask(&mut masked, key, 0);
            let start = wire.len();
            push_client_header(wire, Opcode::Binary, payload.len() as u64, key);
            wire[start] = first;
            wire.extend_from_slice(&masked);
        };
        let big = vec![7u8; 40_000];
        frame(&mut wire, 0x02, &big); // binary, not final
        frame(&mut wire, 0x89, b"hi"); // ping between fragments
        frame(&mut wire, 0x80, b"end"); // final continuation
        let mut reader = FrameReader::new(&wire[..]);
        let mut body = Vec::new();
        let mut pings = 0;
        loop {
            match reader.next().await.unwrap() {
                Piece::Data {
                    bytes,
                    end_of_message,
                    opcode,
                } => {
                    assert_eq!(opcode, Opcode::Binary);
                    assert!(bytes.len() <= READ_CHUNK);
                    body.extend_from_slice(&bytes);
                    if end_of_message {
                        break;
                    }
                }
                Piece::Ping(p) => {
                    assert_eq!(&p[..], b"hi");
                    pings += 1;
                }
                _ => panic!("unexpected piece"),
            }
        }
        assert_eq!(pings, 1);
        assert_eq!(body.len(), 40_003);
        assert!(body[..40_000].iter().all(|b| *b == 7));
        assert_eq!(&body[40_000..], b"end");
        assert!(matches!(reader.next().await, Err(ExchangeError::Closed)));
    }
}

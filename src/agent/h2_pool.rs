//! The agent's HTTP/2 connections to the apiserver: requests and watches from every tunnel
//! stream share a few of them, each carrying as many streams as the apiserver allows
//! (its `SETTINGS_MAX_CONCURRENT_STREAMS`, read from the connection); a new connection opens
//! only when every open one is at that limit, up to `agent --apiserver-connections`.
//!
//! Why not hyper's pooled client: it puts every request on one HTTP/2 connection, and past the
//! server's stream limit requests queue inside it, behind watches that stay open for hours.
//! The old way out, an HTTP/1.1 connection per watch, costs a TLS connection (buffers both
//! ways, a task) per watch in the agent and in the apiserver.
//!
//! An apiserver that does not offer `h2` in ALPN gets HTTP/1.1 (the caller's fallback
//! client); that is re-checked every [`NO_H2_RECHECK`]. Upgrades (exec, attach,
//! port-forward) never come here: they need HTTP/1.1 connections of their own.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::tunnel::http::{BoxError, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW};
use crate::tunnel::keepalive::{PING_INTERVAL, PING_TIMEOUT};

/// HTTP/2 connections to the apiserver at most, by default (`agent --apiserver-connections`).
/// At kube-apiserver's stream limits (100 to 1,000 per connection) that is tens of thousands
/// of watches; past it, requests wait [`QUEUE_WAIT`] for a stream to free.
pub const APISERVER_CONNECTIONS: usize = 256;
/// How long a request waits for a free stream when every connection is full.
pub const QUEUE_WAIT: Duration = Duration::from_secs(30);
/// Connecting (TCP and TLS) to the apiserver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without streams for this long is closed (the first one stays).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// After the apiserver chose HTTP/1.1, how long until HTTP/2 is tried again.
pub const NO_H2_RECHECK: Duration = Duration::from_secs(600);
/// Streams a connection is assumed to allow until the apiserver's SETTINGS say otherwise
/// (RFC 9113 recommends servers allow at least 100).
const INITIAL_MAX_STREAMS: usize = 100;
/// Set in `open` of a connection that is closing: no stream is reserved on it any more (the
/// count below it still falls as streams end).
const CLOSING: usize = 1 << (usize::BITS - 2);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to the apiserver (timed out after {0:?})")]
    ConnectTimeout(Duration),
    #[error("cannot connect to the apiserver")]
    Connect(#[source] std::io::Error),
    #[error("TLS with the apiserver failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP/2 with the apiserver failed")]
    H2(#[from] h2::Error),
    #[error("every HTTP/2 connection to the apiserver ({0}, --apiserver-connections) is at its stream limit; waited {1:?}")]
    Busy(usize, Duration),
}

/// What [`H2Pool::send`] made of a request.
pub enum Sent<B> {
    Response(Response<H2Body>),
    /// The apiserver speaks only HTTP/1.1: the request comes back, to be sent that way.
    Http1(Request<B>),
}

pub struct H2Pool {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    max_connections: usize,
    conns: Mutex<Vec<Conn>>,
    /// One dial at a time: a burst of requests waits for one new connection, not many.
    dialing: tokio::sync::Mutex<()>,
    /// Told when a stream is given back.
    freed: Arc<Notify>,
    next_id: AtomicU64,
    /// Until when the apiserver is taken to speak only HTTP/1.1.
    http1_until: Mutex<Option<Instant>>,
}

struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    /// Streams in flight (until the response body is dropped), with [`CLOSING`] set once no
    /// new ones may start.
    open: Arc<AtomicUsize>,
}

/// A stream's place on its connection, given back when dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

impl H2Pool {
    /// A pool for the apiserver at `uri` (https), trusting what `tls` trusts; the pool sets
    /// its own ALPN (`h2`, `http/1.1`).
    pub fn new(uri: &Uri, tls: &ClientConfig, max_connections: usize) -> Option<H2Pool> {
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string()).ok()?;
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![
            crate::tls::ALPN_H2.to_vec(),
            crate::tls::ALPN_HTTP11.to_vec(),
        ];
        Some(H2Pool {
            host: host.to_string(),
            port: uri.port_u16().unwrap_or(443),
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            max_connections: max_connections.max(1),
            conns: Mutex::new(Vec::new()),
            dialing: tokio::sync::Mutex::new(()),
            freed: Arc::new(Notify::new()),
            next_id: AtomicU64::new(0),
            http1_until: Mutex::new(None),
        })
    }

    /// Open connections, and the streams they carry.
    /// The same pool with at most `n` connections.
    pub fn with_max_connections(mut self, n: usize) -> H2Pool {
        self.max_connections = n.max(1);
        self
    }

    fn connections(conns: &[Conn]) -> (usize, usize) {
        let streams = conns
            .iter()
            .map(|c| c.open.load(Ordering::Relaxed) & !CLOSING)
            .sum();
        (conns.len(), streams)
    }

    /// Sends `req` (absolute `https` URI, no connection-specific headers) on a stream of a
    /// pooled connection, opening one when all are full.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Sent<B>, PoolError>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        if self.speaks_http1() {
            return Ok(Sent::Http1(req));
        }
        let deadline = Instant::now() + QUEUE_WAIT;
        let (mut sender, slot) = loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some((mut sender, slot)) = self.reserve() {
                if poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                    break (sender, slot);
                }
                // Broken or going away (GOAWAY): no new streams on it; the request has not
                // left, so it goes on another.
                slot.open.fetch_or(CLOSING, Ordering::AcqRel);
                continue;
            }
            // Boxed: rare, and large (TCP, TLS and HTTP/2 handshakes); inline, every
            // request's future would be its size.
            match Box::pin(self.open()).await? {
                Opened::Yes | Opened::Raced => continue,
                Opened::Http1 => return Ok(Sent::Http1(req)),
                Opened::Full => {}
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(PoolError::Busy(self.max_connections, QUEUE_WAIT));
            }
        };
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        *head.version_mut() = Version::HTTP_2;
        let end_of_stream = body.is_end_stream();
        let (response, stream) = match sender.send_request(head, end_of_stream) {
            Ok(sent) => sent,
            Err(e) => {
                slot.open.fetch_or(CLOSING, Ordering::AcqRel);
                return Err(e.into());
            }
        };
        let slot = Arc::new(slot);
        if !end_of_stream {
            tokio::spawn(send_body(body, stream, slot.clone()));
        }
        let resp = response.await?;
        Ok(Sent::Response(resp.map(|recv| H2Body {
            recv,
            data_done: false,
            _slot: slot,
        })))
    }

    fn speaks_http1(&self) -> bool {
        let mut until = self.http1_until.lock().unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// A stream on the oldest connection with room: streams pack onto few connections.
    fn reserve(&self) -> Option<(h2::client::SendRequest<Bytes>, Slot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| c.open.load(Ordering::Acquire) & CLOSING == 0);
        conns.iter().find_map(|c| {
            let limit = c.sender.current_max_send_streams();
            c.open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .ok()?;
            Some((
                c.sender.clone(),
                Slot {
                    open: c.open.clone(),
                    freed: self.freed.clone(),
                },
            ))
        })
    }

    async fn open(&self) -> Result<Opened, PoolError> {
        let _dialing = self.dialing.lock().await;
        {
            let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let room = conns
                .iter()
                .any(|c| c.open.load(Ordering::Acquire) < c.sender.current_max_send_streams());
            if room {
                return Ok(Opened::Raced);
            }
            if conns.len() >= self.max_connections {
                return Ok(Opened::Full);
            }
        }
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(PoolError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(PoolError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            tracing::info!(
                recheck_secs = NO_H2_RECHECK.as_secs(),
                "the apiserver does not offer HTTP/2; using HTTP/1.1"
            );
            *self.http1_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + NO_H2_RECHECK);
            return Ok(Opened::Http1);
        }
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .max_send_buffer_size(1024 * 1024)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await?;
        let open = Arc::new(AtomicUsize::new(0));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ping = conn.ping_pong();
        tokio::spawn(drive(conn, ping, open.clone(), id));
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.push(Conn { sender, open });
        let (connections, streams) = H2Pool::connections(&conns);
        tracing::debug!(
            connections,
            streams,
            "opened an HTTP/2 connection to the apiserver"
        );
        Ok(Opened::Yes)
    }
}

enum Opened {
    Yes,
    /// Another caller's connection made room meanwhile.
    Raced,
    /// At the pool's maximum.
    Full,
    Http1,
}

/// Runs one connection: its frames, a ping every [`PING_INTERVAL`] (a dead apiserver or
/// network is noticed within [`PING_TIMEOUT`], and streams on it end), and closing it after
/// [`IDLE_TIMEOUT`] without streams (except the first connection).
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
    open: Arc<AtomicUsize>,
    id: u64,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let keepalive = async {
        let Some(mut ping) = ping else {
            return std::future::pending().await;
        };
        let mut idle_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            if open.load(Ordering::Acquire) == 0 {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if id != 0
                    && since.elapsed() >= IDLE_TIMEOUT
                    && open
                        .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    return "idle";
                }
            } else {
                idle_since = None;
            }
            match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return "ping failed",
                Err(_) => return "no answer to ping",
            }
        }
    };
    let ended = tokio::select! {
        ended = &mut conn => match ended {
            Ok(()) => "closed",
            Err(e) => {
                tracing::debug!(error = %e, "apiserver connection ended with error");
                "error"
            }
        },
        why = keepalive => why,
    };
    // No new streams on it (for a connection that ended, those in flight have failed).
    open.fetch_or(CLOSING, Ordering::AcqRel);
    tracing::debug!(reason = ended, "apiserver connection closed");
}

/// Copies a request body to its stream as the apiserver's flow control allows.
async fn send_body<B>(body: B, mut stream: h2::SendStream<Bytes>, _slot: Arc<Slot>)
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError> + Send,
{
    let mut body = body;
    let copied = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "request body ended with error");
            })?;
            let frame = match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        stream.reserve_capacity(data.len());
                        let n = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(Ok(n)) => n,
                            _ => return Err(()),
                        };
                        if n == 0 {
                            continue;
                        }
                        let chunk = data.split_to(n.min(data.len()));
                        stream.send_data(chunk, false).map_err(|_| ())?;
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                stream.send_trailers(trailers).map_err(|_| ())?;
                return Ok(false);
            }
        }
        Ok(true)
    };
    match copied.await {
        Ok(true) => {
            let _ = stream.send_data(Bytes::new(), true);
        }
        Ok(false) => {}
        Err(()) => stream.send_reset(h2::Reason::CANCEL),
    }
}

/// A response body from the apiserver, holding its stream's place until dropped (dropping
/// it early resets the stream: the watch ends at the apiserver too).
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    _slot: Arc<Slot>,
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Given back as it is handed on: the next hop's flow control is what
                    // holds a slow reader back.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

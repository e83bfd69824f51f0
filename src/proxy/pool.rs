//! Tunnelled connections to the agent, through the relay. Ordinary requests share a few
//! long-lived HTTP/2 connections, each over one rendezvous WebSocket, so a burst of kubectl
//! calls costs no new relay handshakes. Upgrades get a dedicated HTTP/1.1 rendezvous each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{CredentialError, CredentialSource};
use crate::tunnel::dial::{dial, DialError, RelayIo};
use crate::tunnel::http::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW};
use crate::tunnel::keepalive::{PING_INTERVAL, PING_TIMEOUT};
use crate::tunnel::protocol::{Action, RelayAddress};
use crate::tunnel::sas::SasKey;
use crate::tunnel::WsStream;

/// What the proxy sends through the tunnel: kubectl's request bodies, or its own probes.
pub type SendBody = BoxBody<Bytes, hyper::Error>;

/// How the proxy reaches one cluster's agent.
#[derive(Clone)]
pub struct RelayTarget {
    pub relay: RelayAddress,
    pub entity: String,
    pub send: SendCredential,
    pub tls: Arc<ClientConfig>,
}

/// Where the relay Send tokens come from.
#[derive(Clone)]
pub enum SendCredential {
    /// A rule's key: the proxy mints its own tokens.
    Key(SasKey),
    /// Tokens issued by someone else (the registry's `listClusterUserCredential`), renewed
    /// ahead of expiry by the source.
    Issued(Arc<dyn CredentialSource>),
}

/// Send tokens are minted per connection and only need to outlive the handshake.
const SEND_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP over the tunnel failed")]
    Http(#[from] hyper::Error),
    #[error("no relay send token")]
    SendToken(#[from] CredentialError),
}

impl RelayTarget {
    /// A fresh rendezvous and its `sb-hc-id`, which the relay and the agent log too (with the
    /// relay's `_<suffix>` added), so one tunnel can be followed across the three logs.
    async fn open(&self) -> Result<(Arc<str>, WsStream<RelayIo>), TunnelError> {
        let id: Arc<str> = Uuid::new_v4().to_string().into();
        let io = self.dial(&id).await?;
        tracing::debug!(sb_hc_id = %id, "rendezvous opened");
        Ok((id, io))
    }

    async fn dial(&self, id: &str) -> Result<WsStream<RelayIo>, TunnelError> {
        let url = self.relay.url(&self.entity, Action::Connect, id);
        let source = match &self.send {
            SendCredential::Key(key) => {
                let token = key.mint(&self.relay.resource_uri(&self.entity), SEND_TOKEN_TTL);
                return Ok(WsStream::new(dial(&url, Some(&token), &self.tls).await?));
            }
            SendCredential::Issued(source) => source,
        };
        let token = source.token().await?;
        match dial(&url, Some(&token), &self.tls).await {
            // An issued token stops working before its expiry when its key is renewed: one
            // fresh token, and the refusal stands if that is refused too (the role is gone).
            Err(e) if e.is_auth() => {
                tracing::info!(source = %source.describe(), "relay refused the send token; fetching a fresh one");
                source.refused(&token);
                let token = source.token().await?;
                Ok(WsStream::new(dial(&url, Some(&token), &self.tls).await?))
            }
            dialed => Ok(WsStream::new(dialed?)),
        }
    }

    /// Opens a dedicated HTTP/1.1 tunnel for one upgrade request and sends it.
    pub async fn send_upgrade(
        &self,
        req: Request<SendBody>,
    ) -> Result<Response<Incoming>, TunnelError> {
        let (id, io) = self.open().await?;
        tracing::Span::current().record("sb_hc_id", &*id);
        let (mut sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upgrade tunnel ended with error");
                }
            }
            .instrument(tracing::info_span!("rendezvous", sb_hc_id = %id)),
        );
        Ok(sender.send_request(req).await?)
    }
}

/// A pooled connection and the `sb-hc-id` of the rendezvous it runs over.
type Pooled = (http2::SendRequest<SendBody>, Arc<str>);

/// A few HTTP/2 connections over rendezvous streams, re-opened when they fail.
pub struct Pool {
    target: RelayTarget,
    slots: Vec<Mutex<Option<Pooled>>>,
    next: AtomicUsize,
}

/// Two connections: one rendezvous failing (a relay node restarting) leaves the other warm,
/// and HTTP/2 multiplexing makes more unnecessary.
pub const POOL_SIZE: usize = 2;

impl Pool {
    pub fn new(target: RelayTarget, size: usize) -> Self {
        Pool {
            target,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn target(&self) -> &RelayTarget {
        &self.target
    }

    /// Sends `req` on a pooled connection; the caller's span (a `sb_hc_id` field, when it
    /// has one) learns which rendezvous carried it.
    pub async fn send(&self, req: Request<SendBody>) -> Result<Response<Incoming>, TunnelError> {
        let (mut sender, id) = self.connection().await?;
        tracing::Span::current().record("sb_hc_id", &*id);
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    /// A live connection, opening one if this slot has none. The slot's lock makes concurrent
    /// callers wait for a single dial instead of each opening its own.
    pub async fn connection(&self) -> Result<Pooled, TunnelError> {
        let idx = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[idx].lock().await;
        if let Some((sender, id)) = slot.as_ref() {
            if !sender.is_closed() {
                return Ok((sender.clone(), id.clone()));
            }
        }
        let (id, io) = self.target.open().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(1024 * 1024)
            // Keeps the rendezvous alive through idle-dropping load balancers, and notices a
            // dead relay or agent before the next kubectl call does.
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "pooled tunnel connection ended");
                }
            }
            .instrument(tracing::info_span!("rendezvous", sb_hc_id = %id)),
        );
        tracing::debug!(slot = idx, sb_hc_id = %id, "opened pooled tunnel connection");
        *slot = Some((sender.clone(), id.clone()));
        Ok((sender, id))
    }
}

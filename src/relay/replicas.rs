//! Relay replicas on NATS: several relays behind one name, none of them special.
//!
//! - A replica that holds a listener of hybrid connection `hc` subscribes to `hc`'s offer
//!   subject in a queue group named after `hc`. A sender that lands on replica X where `hc`
//!   has no listener gets its rendezvous slot on X, and X sends the offer (accept id, the
//!   sender's headers, and an address naming X itself) as a NATS request: NATS hands it to one
//!   replica holding a listener of `hc` (chosen at random, as Azure Relay chooses among
//!   listeners), which pushes the `accept` down its listener's control channel. The listener
//!   dials X directly and X splices; tunnel bytes never cross NATS. With no listener anywhere
//!   NATS answers "no responders" at once, and the sender gets the documented 404.
//! - Each replica has its own public host name (`[cluster] public_host`), used in every
//!   rendezvous address it makes, and announces it and its live peers to its listeners in the
//!   listen handshake (`x-clusterconnect-replica`, `x-clusterconnect-replicas`), so an agent
//!   accepts rendezvous addresses naming those hosts and nothing else.
//! - The registry lives in a JetStream key-value bucket (see `clusters::kv`), watched by
//!   every replica, so revocation on one replica reaches all of them.
//! - Presence: every replica publishes its name every [`PRESENCE_EVERY`] and hears the
//!   others'; those heard within [`PRESENCE_TTL`] are what it announces.
//!
//! Works with NATS 2.9 and later (JetStream enabled).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::rendezvous::{NotOffered, Rendezvous};
use super::rule::{Grant, KeyDigest};
use crate::tunnel::protocol::{Accept, ControlMessage, HttpRequest};

/// The listen handshake's header naming the replica that answered.
pub const HEADER_REPLICA: &str = "x-clusterconnect-replica";
/// The listen handshake's header listing every live replica (comma-separated `host[:port]`).
pub const HEADER_REPLICAS: &str = "x-clusterconnect-replicas";
/// How long a replica no longer heard from is still announced.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// How often a replica announces itself to the others.
const PRESENCE_EVERY: Duration = Duration::from_secs(2);
/// Replicas announced at most: a bound on the header and on what an agent keeps.
pub const MAX_REPLICAS: usize = 64;
/// How long a sender's replica waits for the listener's replica to take an offer.
pub const OFFER_WAIT: Duration = Duration::from_secs(2);
/// A replica answered that its listeners left or are busy: ask NATS again this often.
const OFFER_TRIES: u32 = 3;
/// Largest offer (the sender's headers travel with it); bigger ones are refused locally.
const MAX_OFFER: usize = 64 * 1024;

/// `[cluster]`: run as one replica of several, coordinated through NATS.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// `nats://host:4222` or `tls://host:4222` (several, comma-separated, for a NATS cluster);
    /// user and password may be in the URL.
    pub nats_url: String,
    /// This replica's own name (`host` or `host:port`), which rendezvous addresses name and
    /// which listeners must be able to reach directly; without a port, `public_port` (or the
    /// listen port) is used.
    pub public_host: String,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub nats_credentials_file: Option<PathBuf>,
    /// A file holding a NATS token.
    pub nats_token_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the NATS server's certificate; implies TLS.
    pub nats_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) when NATS asks for one.
    pub nats_cert_file: Option<PathBuf>,
    pub nats_key_file: Option<PathBuf>,
    /// Prefix of every subject and bucket this relay uses (default `clusterconnect`): relays
    /// with different names keep apart on one NATS, but only NATS permissions (a user per
    /// deployment allowed its own subjects and bucket) keep one from reading the other.
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("[cluster] name {0:?}: use letters, digits, '-' and '_' only")]
    Name(String),
    #[error("[cluster] public_host {0:?} is not a host or host:port")]
    PublicHost(String),
    #[error("[cluster] {what} {}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url} (is nats-server running with JetStream, -js?)")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS: {0}")]
    Nats(String),
}

/// Why an offer to another replica found no listener.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoteNot {
    /// No replica holds a listener of the hybrid connection.
    NoListener,
    /// Every listener is at its cap or has a full accept queue.
    Busy,
    /// NATS is unreachable or did not answer in time.
    Unavailable,
}

/// What travels to the listener's replica.
#[derive(Serialize, Deserialize)]
struct Offer {
    entity: String,
    accept: Accept,
    /// An HTTP request's rendezvous: the listener gets a `request` notice (address and id)
    /// instead of the accept. A replica of an older release ignores this and sends the accept;
    /// the listener then comes to the same address, which serves the request all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    request: bool,
}

/// What comes back.
#[derive(Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer {
    Accepted { rule: String, key: String },
    Busy,
    NoListener,
}

/// This replica's link to the others.
pub struct Replicas {
    client: async_nats::Client,
    prefix: String,
    /// This replica's `host[:port]`, as rendezvous addresses name it.
    me: String,
    /// Live replicas (this one included), refreshed from the presence bucket.
    peers: RwLock<Arc<Vec<String>>>,
    /// Offer subscriptions, one per hybrid connection with a listener here.
    subscribed: Mutex<HashMap<String, Held>>,
    /// Where offers taken from NATS are delivered, and their per-listener cap.
    rendezvous: Rendezvous,
    max_per_listener: usize,
}

struct Held {
    listeners: usize,
    stop: CancellationToken,
}

/// A listener's part in its hybrid connection's offer subscription; the last one to go
/// unsubscribes.
pub struct Holding {
    replicas: Arc<Replicas>,
    entity: String,
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut subs = self.replicas.lock();
        if let Some(held) = subs.get_mut(&self.entity) {
            held.listeners -= 1;
            if held.listeners == 0 {
                held.stop.cancel();
                subs.remove(&self.entity);
            }
        }
    }
}

/// The subject token for a hybrid connection: its name may hold characters NATS subjects
/// cannot (`.`, `/`), and case does not matter, as in the rendezvous table.
fn token(entity: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(entity.to_ascii_lowercase().as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// `host[:port]` for `public_host`, the port added when it has none and is not 443.
pub fn public_authority(public_host: &str, port: u16) -> Result<String, ReplicaError> {
    let bad = || ReplicaError::PublicHost(public_host.to_string());
    let authority: http::uri::Authority = public_host.parse().map_err(|_| bad())?;
    if authority.host().is_empty() || public_host.contains('@') {
        return Err(bad());
    }
    let host = authority.host().to_ascii_lowercase();
    Ok(match authority.port_u16() {
        Some(p) if p != 443 => format!("{host}:{p}"),
        Some(_) => host,
        None if port == 443 => host,
        None => format!("{host}:{port}"),
    })
}

/// The prefix of subjects and buckets.
pub fn prefix(file: &ClusterFile) -> Result<String, ReplicaError> {
    let name = file.name.clone().unwrap_or_else(|| "clusterconnect".into());
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(name)
    } else {
        Err(ReplicaError::Name(name))
    }
}

/// Connects to NATS with the file's credentials and TLS. Fails (rather than waits) when NATS
/// is unreachable at start: a replica without its registry cannot serve.
pub async fn connect(file: &ClusterFile, me: &str) -> Result<async_nats::Client, ReplicaError> {
    let read = |what: &'static str, path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| ReplicaError::File {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("clusterconnect relay {me}"))
        .connection_timeout(Duration::from_secs(5))
        // Forever, with the client's jittered back-off: a replica outlives a NATS restart.
        .max_reconnects(None)
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event");
        });
    if let Some(path) = &file.nats_credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| ReplicaError::File {
                what: "nats_credentials_file",
                path: path.clone(),
                source,
            })?;
    }
    if let Some(path) = &file.nats_token_file {
        options = options.token(read("nats_token_file", path)?.trim().to_string());
    }
    if let Some(path) = &file.nats_ca_file {
        read("nats_ca_file", path)?;
        options = options
            .add_root_certificates(path.clone())
            .require_tls(true);
    }
    match (&file.nats_cert_file, &file.nats_key_file) {
        (Some(cert), Some(key)) => {
            read("nats_cert_file", cert)?;
            read("nats_key_file", key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => {
            return Err(ReplicaError::Nats(
                "[cluster] nats_cert_file and nats_key_file go together".into(),
            ))
        }
    }
    let urls: Vec<async_nats::ServerAddr> = file
        .nats_url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| ReplicaError::Nats(format!("[cluster] nats_url: {e}")))?;
    options
        .connect(urls)
        .await
        .map_err(|source| ReplicaError::Connect {
            url: redact(&file.nats_url),
            source,
        })
}

/// The URL without any password in it, for messages.
fn redact(url: &str) -> String {
    // With or without a scheme: async-nats takes `user:pass@host:4222` as `nats://...`.
    url.split(',')
        .map(|u| {
            let start = u.find("://").map_or(0, |i| i + 3);
            let authority_end = u[start..].find('/').map_or(u.len(), |i| start + i);
            match u[start..authority_end].rfind('@') {
                Some(at) => format!("{}***@{}", &u[..start], &u[start + at + 1..]),
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Replicas {
    /// Joins the replicas: starts writing this replica's presence and reading its peers'.
    pub async fn start(
        client: async_nats::Client,
        prefix: String,
        me: String,
        rendezvous: Rendezvous,
        max_per_listener: usize,
        shutdown: CancellationToken,
    ) -> Result<Arc<Replicas>, ReplicaError> {
        let subject = format!("{prefix}.replicas");
        let heard = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ReplicaError::Nats(format!("subscribe to {subject}: {e}")))?;
        let replicas = Arc::new(Replicas {
            client,
            prefix,
            me: me.clone(),
            peers: RwLock::new(Arc::new(vec![me])),
            subscribed: Mutex::new(HashMap::new()),
            rendezvous,
            max_per_listener,
        });
        tokio::spawn(replicas.clone().presence(subject, heard, shutdown));
        Ok(replicas)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.subscribed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This replica's `host[:port]`.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The live replicas, this one first.
    pub fn peers(&self) -> Arc<Vec<String>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Announces this replica on `subject` every [`PRESENCE_EVERY`] and hears the others':
    /// a replica not heard from for [`PRESENCE_TTL`] is no longer announced.
    async fn presence(
        self: Arc<Self>,
        subject: String,
        mut heard: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        let mut seen: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Bounded: the client stops taking messages while it reconnects, and
                    // peers must still expire meanwhile.
                    let hello = self.client.publish(subject.clone(), Bytes::from(self.me.clone()));
                    match tokio::time::timeout(PRESENCE_EVERY, hello).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "cannot announce this replica"),
                        Err(_) => tracing::debug!("cannot announce this replica: NATS is not taking messages"),
                    }
                }
                msg = heard.next() => {
                    let Some(msg) = msg else { return };
                    let name = String::from_utf8_lossy(&msg.payload).to_string();
                    let valid = name != self.me && public_authority(&name, 443).is_ok_and(|a| a == name);
                    if valid && (seen.len() < MAX_REPLICAS || seen.contains_key(&name)) {
                        seen.insert(name, tokio::time::Instant::now());
                    }
                }
                () = shutdown.cancelled() => return,
            }
            seen.retain(|_, at| at.elapsed() < PRESENCE_TTL);
            let mut names = vec![self.me.clone()];
            let mut others: Vec<String> = seen.keys().cloned().collect();
            others.sort();
            names.extend(others);
            let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
            if **peers != names {
                tracing::info!(peers = names.len(), replicas = ?names, "relay replicas");
                let names = Arc::new(names);
                *peers = names.clone();
                drop(peers);
                self.rendezvous.announce_replicas(names);
            }
        }
    }

    /// A replica seen in an offer is live: announced from now on, before its presence is read.
    fn learn(&self, replica: &str) {
        if replica.is_empty() || self.peers().iter().any(|p| p == replica) {
            return;
        }
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if peers.len() < MAX_REPLICAS && !peers.iter().any(|p| p == replica) {
            let mut next = peers.as_ref().clone();
            next.push(replica.to_string());
            *peers = Arc::new(next);
            tracing::info!(
                replica,
                peers = peers.len(),
                "relay replica learned from an offer"
            );
        }
    }

    /// Called for each listener of `entity` this replica holds: the first one subscribes to
    /// the hybrid connection's offers, the last one's [`Holding`] unsubscribes.
    pub fn hold(self: &Arc<Self>, entity: &str) -> Holding {
        let key = entity.to_ascii_lowercase();
        let mut subs = self.lock();
        match subs.get_mut(&key) {
            Some(held) => held.listeners += 1,
            None => {
                let stop = CancellationToken::new();
                tokio::spawn(self.clone().serve_offers(key.clone(), stop.clone()));
                subs.insert(key.clone(), Held { listeners: 1, stop });
            }
        }
        Holding {
            replicas: self.clone(),
            entity: key,
        }
    }

    /// Takes offers for `entity` from other replicas and hands each to a local listener,
    /// until `stop`. Re-subscribed by the NATS client itself after a reconnect.
    async fn serve_offers(self: Arc<Self>, entity: String, stop: CancellationToken) {
        let t = token(&entity);
        let subject = format!("{}.offer.{t}", self.prefix);
        // Until it subscribes or its listeners leave: while it cannot, only offers made on
        // this replica reach them.
        let mut backoff = crate::tunnel::backoff::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(5),
        );
        let mut sub = loop {
            let subscribe = self.client.queue_subscribe(subject.clone(), t.clone());
            match tokio::time::timeout(OFFER_WAIT, subscribe).await {
                Ok(Ok(sub)) => break sub,
                Ok(Err(e)) => {
                    tracing::warn!(%entity, error = %e, "cannot subscribe to offers from other replicas; retrying");
                }
                Err(_) => {
                    tracing::warn!(%entity, "cannot subscribe to offers from other replicas (NATS is not taking messages); retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = stop.cancelled() => return,
            }
        };
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                () = stop.cancelled() => break,
            };
            let Some(msg) = msg else { break };
            let Some(reply) = msg.reply else { continue };
            let answer = match serde_json::from_slice::<Offer>(&msg.payload) {
                Ok(offer) if offer.entity.eq_ignore_ascii_case(&entity) => self.take(offer),
                _ => continue,
            };
            let Ok(json) = serde_json::to_vec(&answer) else {
                continue;
            };
            let answered = self.client.publish(reply, Bytes::from(json));
            match tokio::time::timeout(OFFER_WAIT, answered).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot answer an offer"),
                Err(_) => tracing::debug!("cannot answer an offer: NATS is not taking messages"),
            }
        }
        let _ = tokio::time::timeout(OFFER_WAIT, sub.unsubscribe()).await;
    }

    /// One offer from another replica, to a local listener.
    fn take(&self, offer: Offer) -> Answer {
        let Offer {
            entity,
            accept,
            request,
        } = offer;
        // Only a listener told about the sender's replica accepts an address naming it.
        let sender = authority_of(&accept.address);
        self.learn(&sender);
        let offered = self.rendezvous.offer_if(
            &entity,
            self.max_per_listener,
            |told| told.contains(&sender),
            |_| {
                if request {
                    ControlMessage::Request(HttpRequest::notice(&accept.address, &accept.id))
                } else {
                    ControlMessage::Accept(accept.clone())
                }
            },
        );
        match offered {
            // The rendezvous lives on the sender's replica, which watches the grant; the
            // place under this listener's cap is for rendezvous made here.
            Ok(offered) => {
                let grant = offered.grant.get();
                Answer::Accepted {
                    rule: grant.rule,
                    key: grant.key.to_hex(),
                }
            }
            Err(NotOffered::Busy) => Answer::Busy,
            Err(NotOffered::NoListener) => Answer::NoListener,
        }
    }

    /// Offers `accept` (whose address names this replica) to a listener of `entity` on
    /// another replica: the listener's grant when one took it. With `request`, the listener
    /// is asked to that address for an HTTP request instead.
    pub async fn offer(
        &self,
        entity: &str,
        accept: &Accept,
        request: bool,
    ) -> Result<Grant, RemoteNot> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(RemoteNot::Unavailable);
        }
        let offer = Offer {
            entity: entity.to_string(),
            accept: accept.clone(),
            request,
        };
        let payload = serde_json::to_vec(&offer).map_err(|_| RemoteNot::Unavailable)?;
        if payload.len() > MAX_OFFER {
            return Err(RemoteNot::Busy);
        }
        let subject = format!("{}.offer.{}", self.prefix, token(entity));
        let mut last = RemoteNot::NoListener;
        for attempt in 0..OFFER_TRIES {
            if attempt > 0 {
                // Another member of the queue group may have a free listener; a short
                // jittered pause keeps retries of many senders apart.
                use rand::Rng;
                let ms = rand::rng().random_range(0..=2 * u64::from(attempt));
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let request = self
                .client
                .request(subject.clone(), Bytes::from(payload.clone()));
            let answer = match tokio::time::timeout(OFFER_WAIT, request).await {
                Err(_) => return Err(RemoteNot::Unavailable),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    return Err(RemoteNot::NoListener)
                }
                Ok(Err(_)) => return Err(RemoteNot::Unavailable),
                Ok(Ok(msg)) => serde_json::from_slice::<Answer>(&msg.payload),
            };
            match answer {
                Ok(Answer::Accepted { rule, key }) => {
                    let key = KeyDigest::from_hex(&key).ok_or(RemoteNot::Unavailable)?;
                    return Ok(Grant { rule, key });
                }
                Ok(Answer::Busy) => last = RemoteNot::Busy,
                Ok(Answer::NoListener) => {}
                Err(_) => return Err(RemoteNot::Unavailable),
            }
        }
        Err(last)
    }
}

/// `host[:port]` of a `wss://` rendezvous address, as replicas name themselves.
fn authority_of(address: &str) -> String {
    let Ok(url) = url::Url::parse(address) else {
        return String::new();
    };
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    match url.port() {
        Some(p) if p != 443 => format!("{host}:{p}"),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_hosts_get_the_port_clients_use() {
        assert_eq!(
            public_authority("Relay-0.Example.com", 443).unwrap(),
            "relay-0.example.com"
        );
        assert_eq!(
            public_authority("relay-0.example.com", 8443).unwrap(),
            "relay-0.example.com:8443"
        );
        assert_eq!(
            public_authority("relay-0.example.com:9443", 443).unwrap(),
            "relay-0.example.com:9443"
        );
        assert_eq!(
            public_authority("127.0.0.1:443", 8443).unwrap(),
            "127.0.0.1"
        );
        assert!(public_authority("user@host", 443).is_err());
        assert!(public_authority("", 443).is_err());
        assert!(public_authority("a b", 443).is_err());
    }

    #[test]
    fn subjects_hide_the_connection_name_and_ignore_case() {
        assert_eq!(token("Cc-ABC/x"), token("cc-abc/x"));
        assert_ne!(token("a"), token("b"));
        assert!(token("a.b>*").chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn passwords_in_nats_urls_stay_out_of_messages() {
        assert_eq!(
            redact("nats://u:secret@n1:4222,nats://n2"),
            "nats://***@n1:4222,nats://n2"
        );
        assert_eq!(redact("u:secret@n1:4222, tok@n2"), "***@n1:4222,***@n2");
        assert_eq!(redact("tls://n1:4222/a@b"), "tls://n1:4222/a@b");
        assert!(prefix(&ClusterFile {
            name: Some("a.b".into()),
            ..file()
        })
        .is_err());
        assert_eq!(prefix(&file()).unwrap(), "clusterconnect");
    }

    fn file() -> ClusterFile {
        ClusterFile {
            nats_url: "nats://127.0.0.1:4222".into(),
            public_host: "r0".into(),
            nats_credentials_file: None,
            nats_token_file: None,
            nats_ca_file: None,
            nats_cert_file: None,
            nats_key_file: None,
            name: None,
        }
    }
}

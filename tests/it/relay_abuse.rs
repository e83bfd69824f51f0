//! The relay under an unauthenticated attacker: connections that finish TLS and then withhold
//! a body, trickle headers, sit idle on keep-alive, or never start TLS. None of them may take
//! the slots real agents and proxies need, each is closed within its deadline, and one
//! source address cannot hold more than its share. Attackers use 127.0.0.2 and up, so the
//! real agent and proxy (127.0.0.1) are never the ones capped.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::support::tunnel::{listen_key, send_key, wait_for_listener, Agent, LocalProxy, Relay};
use crate::support::{kubectl_available, kubectl_ok, ApiServer};

/// Short deadlines so the test runs in seconds; production defaults are in `Limits`.
const DEADLINE: Duration = Duration::from_millis(1500);
/// Generous bound on "closed within the deadline": scheduling on a busy machine, not slack in
/// the relay.
const CLOSED_WITHIN: Duration = Duration::from_secs(6);
const MAX_CONNECTIONS: usize = 8;
const PER_IP: usize = 4;

fn limits() -> clusterconnect::relay::Limits {
    clusterconnect::relay::Limits {
        handshake_timeout: DEADLINE,
        request_timeout: DEADLINE,
        max_unauthenticated_per_ip: PER_IP,
        ..Default::default()
    }
}

async fn tcp_from(source: &str, relay: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(relay).await.expect("TCP connect")
}

async fn tls_from(source: &str, relay: &Relay) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = tcp_from(source, relay.addr).await;
    TlsConnector::from(relay.client_tls.clone())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS")
}

/// Whether the relay closes `io` within `within` (reading and discarding what it sends).
async fn closed_within<S: AsyncRead + Unpin>(io: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A real agent, proxy and kubectl through `relay`: the apiserver, agent and proxy, once
/// `kubectl get ns` answered through them.
async fn kubectl_works_through(
    relay: &Relay,
    dir: &std::path::Path,
) -> (ApiServer, Agent, LocalProxy) {
    let api = ApiServer::start().await;
    let agent = Agent::start(relay, &api, listen_key()).await;
    wait_for_listener(relay).await;
    let proxy = LocalProxy::start(relay, send_key(), &api.token(), dir).await;
    let out = kubectl_ok(&proxy.kubeconfig, &["get", "ns", "-o", "name"]).await;
    assert!(out.contains("namespace/"), "{out}");
    (api, agent, proxy)
}

/// A TLS connection from `source` that got its answer to one `/healthz` and now sits idle on
/// keep-alive.
async fn answered_then_idle(
    source: &str,
    relay: &Relay,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = tls_from(source, relay).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s
}

enum Stalled {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Tcp(TcpStream),
}

async fn stall(kind: usize, source: &str, relay: &Relay) -> Stalled {
    match kind % 4 {
        // Headers of an agent status report (whose signature covers the body, so the body is
        // read before anything is authenticated) announcing a body that never comes.
        0 => {
            let mut s = tls_from(source, relay).await;
            s.write_all(b"POST /subscriptions/0/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/x/agentStatus?api-version=2024-01-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").await.unwrap();
            Stalled::Tls(Box::new(s))
        }
        // Headers trickled: the first bytes, then nothing more.
        1 => {
            let mut s = tls_from(source, relay).await;
            s.write_all(b"GET /$hc/x?sb-hc-action=connect HTTP/1.1\r\nHo")
                .await
                .unwrap();
            Stalled::Tls(Box::new(s))
        }
        // One complete request, then idle on keep-alive.
        2 => Stalled::Tls(Box::new(answered_then_idle(source, relay).await)),
        // TCP only: no TLS ClientHello at all.
        _ => Stalled::Tcp(tcp_from(source, relay.addr).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_strangers_neither_hold_slots_nor_outlive_their_deadlines() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay =
        Relay::start_limited(&dir.path().join("registry.redb"), limits(), MAX_CONNECTIONS).await;

    // Twice max_connections stalled connections, spread over four attacker addresses.
    let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let mut stalled = Vec::new();
    for i in 0..2 * MAX_CONNECTIONS {
        stalled.push(stall(i, sources[i % sources.len()], &relay).await);
    }
    let opened = Instant::now();

    // One address past its share is turned away at once, before TLS.
    let mut extra = tcp_from("127.0.0.2", relay.addr).await;
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "a fifth unauthenticated connection from one address was held"
    );

    // Meanwhile a real agent and kubectl through the proxy work.
    let (_api, agent, proxy) = kubectl_works_through(&relay, dir.path()).await;

    // And every stalled connection is closed within its deadline.
    for (i, s) in stalled.iter_mut().enumerate() {
        let left = CLOSED_WITHIN
            .saturating_sub(opened.elapsed())
            .max(Duration::from_millis(500));
        let closed = match s {
            Stalled::Tls(s) => closed_within(s, left).await,
            Stalled::Tcp(s) => closed_within(s, left).await,
        };
        assert!(
            closed,
            "stalled connection {i} (kind {}) still open after {:?}",
            i % 4,
            opened.elapsed()
        );
    }
    proxy.stop().await;
    agent.stop().await;
}

/// The relay's slots go to authenticated connections only: with every slot held by real
/// listeners, a further listener is told the relay is at capacity (503), and strangers
/// still get their answers (a 404 for a wrong path) because they need no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_taken_only_after_authentication() {
    use clusterconnect::tunnel::dial::{dial, DialError};
    use clusterconnect::tunnel::protocol::Action;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 2).await;
    let token = listen_key().mint(
        &relay
            .address()
            .resource_uri(crate::support::tunnel::CONNECTION),
        Duration::from_secs(600),
    );
    let url = |id: &str| {
        relay
            .address()
            .url(crate::support::tunnel::CONNECTION, Action::Listen, id)
    };
    let _a = dial(&url("a"), Some(&token), &relay.client_tls)
        .await
        .expect("first listener");
    let _b = dial(&url("b"), Some(&token), &relay.client_tls)
        .await
        .expect("second listener");
    match dial(&url("c"), Some(&token), &relay.client_tls).await {
        Err(DialError::Rejected { status: 503, .. }) => {}
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("a third listener got a slot beyond max_connections"),
    }
    let mut s = tls_from("127.0.0.6", &relay).await;
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .ok();
    // Still answered with the relay full: an HTTP request without a token is refused before
    // it could need a slot.
    assert!(
        answer.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A stranger that sends requests ahead and never reads the answers (its receive window
/// shut) holds neither its connections nor its address's places: each connection ends after a
/// bounded number of answers, and a write that makes no progress ends at the deadline. Its
/// address can connect again once they are gone; a request head past the relay's bound is
/// refused (431) rather than buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_that_never_reads_its_answers_frees_its_places() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 8).await;
    let source = "127.0.0.8";
    // 3.4 MB of pipelined requests per connection, their answers (8 MB) more than the
    // kernel buffers hold (tcp_wmem at most 4 MiB), never read.
    let requests = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(80_000);
    let mut held = Vec::new();
    for _ in 0..PER_IP {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        socket
            .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
            .unwrap();
        let tcp = socket.connect(relay.addr).await.unwrap();
        let tls = TlsConnector::from(relay.client_tls.clone())
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("TLS");
        let (reader, mut writer) = tokio::io::split(tls);
        let requests = requests.clone();
        held.push((
            reader,
            tokio::spawn(async move {
                let _ = writer.write_all(&requests).await;
                writer
            }),
        ));
    }
    let started = Instant::now();
    let answered = loop {
        let mut s = tls_from_or_refused(source, &relay).await;
        if let Some(s) = s.as_mut() {
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .await
                .is_ok()
            {
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
                if answer.starts_with(b"HTTP/1.1 200") {
                    break true;
                }
            }
        }
        if started.elapsed() > CLOSED_WITHIN {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        answered,
        "the address's places were still held {:?} after its connections stopped reading",
        started.elapsed()
    );
    drop(held);

    // A request head larger than the bound gets 431, not a buffer of its size.
    let mut s = tls_from("127.0.0.9", &relay).await;
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
}

/// Strangers holding every unauthenticated place with idle keep-alive connections (one
/// request, then nothing, well within the deadlines) do not lock agents and proxies out: a
/// newcomer takes the place of an idle connection of the address holding the most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_filling_every_place_give_way_to_agents_and_proxies() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), two_full_shares(), 8).await;
    let mut idle = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..PER_IP {
            idle.push(answered_then_idle(source, &relay).await);
        }
    }
    // Every place is held. A newcomer takes the place of one idle connection, which closes.
    let _newcomer = answered_then_idle("127.0.0.4", &relay).await;
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 1,
        "one idle connection gave its place to the newcomer"
    );

    let (_api, agent, proxy) = kubectl_works_through(&relay, dir.path()).await;
    proxy.stop().await;
    agent.stop().await;
    drop(idle);
}

/// Thousands of addresses holding one idle keep-alive place each (here eight, at a cap of
/// eight) lock nobody out either: a newcomer holding no place takes the oldest idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idle_place_at_each_of_many_addresses_gives_way_to_agents_and_proxies() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), two_full_shares(), 8).await;
    let mut idle = Vec::new();
    for i in 0..2 * PER_IP {
        idle.push(answered_then_idle(&format!("127.0.0.{}", 2 + i), &relay).await);
    }
    // The oldest goes first.
    let _newcomer = answered_then_idle("127.0.0.20", &relay).await;
    assert!(closed_within(&mut idle[0], Duration::from_secs(2)).await);
    for s in &mut idle[1..] {
        assert!(!closed_within(s, Duration::from_millis(100)).await);
    }
    // Settled strangers give way to any newcomer, even one whose address holds places in
    // their handshake already (an agent opening a rendezvous while its listener connects).
    // Refused, it would wait out the 30 s accept timeout, kubectl retrying behind it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_api, agent, proxy) = tokio::time::timeout(
        Duration::from_secs(25),
        kubectl_works_through(&relay, dir.path()),
    )
    .await
    .expect("agent, proxy and kubectl got their places at once");
    proxy.stop().await;
    agent.stop().await;
    drop(idle);
}

/// The same with every place held by agent status reports whose body never comes (read before
/// anything is authenticated): such a request does not keep its place from a newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_status_report_bodies_give_way_to_newcomers() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), two_full_shares(), 8).await;
    let mut pending = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        for i in 0..PER_IP {
            // Either case: the management API routes it without.
            let action = if i % 2 == 0 {
                "agentStatus"
            } else {
                "AGENTSTATUS"
            };
            let mut s = tls_from(source, &relay).await;
            s.write_all(format!("POST /subscriptions/0/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/x/{action}?api-version=2024-01-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{{").as_bytes())
                .await
                .unwrap();
            pending.push(s);
        }
    }
    // Let the relay start reading those bodies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut newcomer = tls_from_or_refused("127.0.0.4", &relay)
        .await
        .expect("a newcomer takes the place of a withheld status report");
    newcomer
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), newcomer.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(pending);
}

/// Room for two addresses' full shares of unauthenticated places, with deadlines long enough
/// that none frees a place during a test.
fn two_full_shares() -> clusterconnect::relay::Limits {
    clusterconnect::relay::Limits {
        handshake_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(120),
        max_unauthenticated: 2 * PER_IP,
        max_unauthenticated_per_ip: PER_IP,
        ..Default::default()
    }
}

/// A TLS connection from `source`, or `None` when the relay turns it away (at its cap, it
/// closes before TLS).
async fn tls_from_or_refused(
    source: &str,
    relay: &Relay,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(source, relay.addr).await;
    TlsConnector::from(relay.client_tls.clone())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .ok()
}

/// A management API refusal never grows with the caller's input: serde_json quotes string
/// values in its errors, and a 1 MiB body must not come back as a 1 MiB error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_errors_stay_small_whatever_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 8).await;
    let token = crate::support::tunnel::admin_key()
        .mint(&relay.address().resource_uri(""), Duration::from_secs(600));
    let huge = "A".repeat(200 * 1024);
    let body = format!(r#"{{"location":"x","properties":"{huge}"}}"#);
    let mut s = tls_from("127.0.0.7", &relay).await;
    let head = format!(
        "PUT /subscriptions/0/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/big?api-version=2024-01-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        token.expose(),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(answer.len() < 2048, "a {}-byte refusal", answer.len());
    assert!(!text.contains(&huge[..2000]));
}

/// One sender token cannot hold more than `max_rendezvous_per_token` rendezvous (429), and no
/// listener more than `max_rendezvous_per_listener` (the next listener takes over; with all at
/// their cap, 503). Places come back when tunnels close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_are_capped_per_token_and_per_listener() {
    use clusterconnect::tunnel::dial::{dial, DialError, RelayStream};
    use clusterconnect::tunnel::protocol::Action;

    let dir = tempfile::tempdir().unwrap();
    let limits = clusterconnect::relay::Limits {
        max_rendezvous_per_token: 2,
        max_rendezvous_per_listener: 2,
        ..limits()
    };
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits, 64).await;
    let api = ApiServer::start().await;
    let agent = Agent::start(&relay, &api, listen_key()).await;
    wait_for_listener(&relay).await;
    let address = relay.address();
    let uri = address.resource_uri(crate::support::tunnel::CONNECTION);
    // Distinct expiries make distinct tokens of the same key.
    let token = |minutes: u64| send_key().mint(&uri, Duration::from_secs(60 * minutes));
    let open = |t: clusterconnect::secret::Secret| {
        let url = address.url(crate::support::tunnel::CONNECTION, Action::Connect, "cap");
        let tls = relay.client_tls.clone();
        async move { dial(&url, Some(&t), &tls).await }
    };
    let status = |r: &Result<RelayStream, DialError>| match r {
        Err(DialError::Rejected { status, .. }) => *status,
        Err(_) => 0,
        Ok(_) => 101,
    };
    let (a, b) = (token(10), token(11));
    let a1 = open(a.clone()).await.expect("first with token a");
    let a2 = open(a.clone()).await.expect("second with token a");
    let a3 = open(a.clone()).await;
    assert_eq!(status(&a3), 429, "a third rendezvous with one token");
    // The same token padded with a field the relay ignores, a repeat, or spaces is the same.
    for padded in [
        format!("{}&pad=1", a.expose()),
        format!("{}&skn={}", a.expose(), send_key().name),
        format!(" {} ", a.expose()),
    ] {
        let refused = open(clusterconnect::secret::Secret::new(padded)).await;
        assert_eq!(status(&refused), 429, "a padded copy of token a");
    }
    let b1 = open(b.clone())
        .await
        .expect("token b has places of its own");
    // The agent keeps two listeners, two rendezvous each: with three open, one more fits and
    // the next finds both at their cap.
    let b2 = open(b.clone())
        .await
        .expect("the fourth rendezvous, on the second listener");
    let c = open(token(12)).await;
    assert_eq!(status(&c), 503, "both listeners were at their cap");
    drop(a1);
    drop(b2);
    // Closed tunnels give their places back: to the listener, and to token a.
    eventually_open(&open, token(12)).await;
    eventually_open(&open, a.clone()).await;
    drop((a2, b1));
    agent.stop().await;
}

/// Places come back once the relay has seen a tunnel close: retries briefly, never a sleep
/// standing in for a condition.
async fn eventually_open<F, Fut>(open: &F, token: clusterconnect::secret::Secret)
where
    F: Fn(clusterconnect::secret::Secret) -> Fut,
    Fut: std::future::Future<
        Output = Result<
            clusterconnect::tunnel::dial::RelayStream,
            clusterconnect::tunnel::dial::DialError,
        >,
    >,
{
    for _ in 0..100 {
        if open(token.clone()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no place came back after tunnels closed");
}

/// A hand-written HTTP listener on `relay`'s hybrid connection `connection`: for each request
/// it comes to the rendezvous, reads the request's head (sent on `heads`) and hands the
/// rendezvous and the request's id to `behave`, each in a task of its own.
async fn raw_http_listener<F, Fut>(
    relay: &Relay,
    connection: &str,
    behave: F,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<String>,
)
where
    F: Fn(clusterconnect::tunnel::dial::RelayStream, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use clusterconnect::tunnel::dial::dial;
    use clusterconnect::tunnel::protocol::{Action, ControlMessage};
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let address = relay.address();
    let listen = listen_key().mint(&address.resource_uri(connection), Duration::from_secs(600));
    let url = address.url(connection, Action::Listen, "raw-http-listener");
    let mut control = dial(&url, Some(&listen), &relay.client_tls)
        .await
        .expect("listen");
    let (heads, seen) = tokio::sync::mpsc::channel(16);
    let tls = relay.client_tls.clone();
    let behave = std::sync::Arc::new(behave);
    let task = tokio::spawn(async move {
        while let Some(Ok(Message::Text(text))) = control.next().await {
            let Ok(ControlMessage::Request(notice)) = serde_json::from_str(&text) else {
                continue;
            };
            // Each request at once, as Microsoft's listeners take them.
            let (tls, heads, behave) = (tls.clone(), heads.clone(), behave.clone());
            tokio::spawn(async move {
                let mut rendezvous = dial(&notice.address, None, &tls).await.expect("rendezvous");
                let Some(Ok(Message::Text(head))) = rendezvous.next().await else {
                    return;
                };
                let _ = heads.send(head.to_string()).await;
                behave(rendezvous, notice.id).await
            });
        }
    });
    (task, seen)
}

/// `GET /<path>` with a Send token for the hybrid connection `path` starts with.
fn authenticated_get(relay: &Relay, path: &str, close: bool) -> String {
    let connection = path.split('/').next().unwrap_or_default();
    let uri = relay.address().resource_uri(connection);
    let token = send_key().mint(&uri, Duration::from_secs(600));
    format!(
        "GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nServiceBusAuthorization: {}\r\n{}\r\n",
        token.expose(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// A plain HTTP request that authenticated holds a connection slot, not its address's place
/// among strangers: senders waiting on a slow listener do not lock their own address (or a
/// NAT's, shared with listeners) out of the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_in_progress_leave_their_address_places_free() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 64).await;
    // A listener that never answers.
    let connection = crate::support::tunnel::CONNECTION;
    let (listener, mut seen) = raw_http_listener(&relay, connection, |rendezvous, _| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(rendezvous);
    })
    .await;
    let source = "127.0.0.9";
    let mut waiting = Vec::new();
    for i in 0..PER_IP {
        let mut s = tls_from(source, &relay).await;
        let request = authenticated_get(&relay, &format!("{connection}/slow/{i}"), false);
        s.write_all(request.as_bytes()).await.unwrap();
        waiting.push(s);
    }
    for _ in 0..PER_IP {
        let head = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("the listener gets each request")
            .expect("a head");
        assert!(head.contains("\"method\":\"GET\""), "{head}");
    }
    // Every one of them is in progress; their address still gets in, and is answered.
    let mut s = tls_from_or_refused(source, &relay)
        .await
        .expect("a new connection from the senders' address is admitted");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(waiting);
    listener.abort();
}

/// The answer to an authenticated `GET /<path>` from 127.0.0.10, within `within`.
async fn ask(relay: &Relay, path: &str, within: Duration) -> String {
    let mut s = tls_from("127.0.0.10", relay).await;
    s.write_all(authenticated_get(relay, path, true).as_bytes())
        .await
        .unwrap();
    read_answer(&mut s, within).await
}

/// What comes on `s` until it closes, or `within` passes.
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

/// A listener's pings do not stretch the time it has to answer an HTTP request, and a body
/// that breaks at once still gives the sender a status line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_listener_answers_within_its_deadline_or_the_sender_gets_a_clear_status() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_millis(1500);
    let limits = clusterconnect::relay::Limits {
        http_idle: idle,
        ..limits()
    };
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits, 64).await;
    let (listener, _seen) = raw_http_listener(&relay, "pings", |mut rendezvous, _| async move {
        // Pings, twice a deadline's worth, and never an answer.
        for _ in 0..12 {
            if rendezvous
                .send(Message::Ping(Default::default()))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let started = Instant::now();
    let answer = ask(&relay, "pings", Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    // The deadline runs from the request, whatever the pings: 1.5 s, not the 3 s of pings.
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "answered after {:?}",
        started.elapsed()
    );
    listener.abort();

    // A response head announcing a body, then a text message where the body should be.
    let (listener, _seen) =
        raw_http_listener(&relay, "text-body", |mut rendezvous, id| async move {
            let head =
                serde_json::json!({"response": {"requestId": id, "statusCode": 200, "body": true}});
            let _ = rendezvous.send(Message::text(head.to_string())).await;
            let _ = rendezvous.send(Message::text("not a body")).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
    let answer = ask(&relay, "text-body", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
    listener.abort();

    // A whole body shorter than the length its head states: the sender is told, not left
    // with an empty reply.
    let (listener, _seen) =
        raw_http_listener(&relay, "short-body", |mut rendezvous, id| async move {
            let head = serde_json::json!({"response": {"requestId": id, "statusCode": 200,
            "responseHeaders": {"Content-Length": "10"}, "body": true}});
            let _ = rendezvous.send(Message::text(head.to_string())).await;
            let _ = rendezvous.send(Message::binary(&b"12345"[..])).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
    let answer = ask(&relay, "short-body", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
    assert!(answer.contains("Content-Length says 10"), "{answer:?}");
    listener.abort();

    // A body that starts later (a stream of events, within the listener's 1.5 s here) does
    // not hold the head back.
    let (listener, _seen) = raw_http_listener(&relay, "events", |mut rendezvous, id| async move {
        let head = serde_json::json!({"response": {"requestId": id, "statusCode": 200,
            "responseHeaders": {"Content-Type": "text/event-stream"}, "body": true}});
        let _ = rendezvous.send(Message::text(head.to_string())).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let _ = rendezvous.send(Message::binary(&b"data: one"[..])).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let mut s = tls_from("127.0.0.10", &relay).await;
    s.write_all(authenticated_get(&relay, "events", true).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(1000), async {
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    })
    .await
    .expect("the head before the first event");
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut event = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut event))
        .await
        .expect("the event")
        .unwrap();
    assert!(String::from_utf8_lossy(&event[..n]).contains("data: one"));
    listener.abort();

    // HTTP/1.0 ends a body without a length with the connection, where a cut body would look
    // whole: such a sender is refused.
    let mut s = tls_from("127.0.0.10", &relay).await;
    let request = authenticated_get(&relay, "short-body", true).replacen("HTTP/1.1", "HTTP/1.0", 1);
    s.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut s, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.0 505") || answer.starts_with("HTTP/1.1 505"),
        "{answer:?}"
    );
}

/// A burst of requests to one listener, more than its address's share of strangers: each of
/// the listener's rendezvous connections is a stranger until it upgrades, and its address
/// holds a place more for each rendezvous it was asked to, so none of them is refused (the
/// sender would wait for the accept timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_http_requests_finds_room_for_the_listeners_rendezvous() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 64).await;
    let (listener, _seen) = raw_http_listener(&relay, "burst", |mut rendezvous, id| async move {
        let head =
            serde_json::json!({"response": {"requestId": id, "statusCode": 200, "body": true}});
        let _ = rendezvous.send(Message::text(head.to_string())).await;
        let _ = rendezvous.send(Message::binary(&b"ok"[..])).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let senders = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"];
    let requests = senders.iter().flat_map(|source| {
        let relay = &relay;
        (0..PER_IP).map(move |_| async move {
            let mut s = tls_from(source, relay).await;
            s.write_all(authenticated_get(relay, "burst", true).as_bytes())
                .await
                .unwrap();
            read_answer(&mut s, Duration::from_secs(20)).await
        })
    });
    let answers = futures_util::future::join_all(requests).await;
    let answered = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    assert_eq!(answered, senders.len() * PER_IP, "{answers:#?}");
    listener.abort();
}

/// A token header that is not ASCII is refused as no SAS token can be, and says so, whether
/// the sender asks for a WebSocket or sends an HTTP request; a query token beside it does not
/// make it go unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_header_that_is_not_ascii_is_named_as_not_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 8).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for (target, extra) in [
        ("/$hc/c?sb-hc-action=connect&sb-hc-token=x", upgrade),
        ("/c", ""),
    ] {
        let mut s = tls_from("127.0.0.11", &relay).await;
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\nServiceBusAuthorization: SharedAccessSignature sr="
        )
        .into_bytes();
        request.extend_from_slice(b"\xff\xfe\r\n\r\n");
        s.write_all(&request).await.unwrap();
        let answer = read_answer(&mut s, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("not a SharedAccessSignature"), "{answer}");
    }
}
/// Plain HTTP on the relay's TLS port (someone typed http://) gets a plain answer saying so,
/// and the connection closes; TLS clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_limited(&dir.path().join("registry.redb"), limits(), 8).await;
    let mut s = tcp_from("127.0.0.12", relay.addr).await;
    s.write_all(b"GET /$hc/c?sb-hc-action=connect HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("use https:// or wss://"), "{answer}");
    let mut tls = tls_from("127.0.0.12", &relay).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut tls, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

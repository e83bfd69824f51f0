//! The relay behind an L4 load balancer speaking the PROXY protocol (v1 and v2): admission
//! caps each declared client rather than the balancer, connections without a header are
//! closed at once, rendezvous and the health endpoint work through either version and the
//! listener learns the sender's real address; with the setting off, a header is garbage.
//! The test plays the balancer: it connects from 127.0.0.x and writes the header itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use clusterconnect::relay::proxy_protocol::parse;
use clusterconnect::relay::{Limits, ProxyProtocol};
use clusterconnect::tunnel::protocol::{Action, ControlMessage, HEADER_AUTHORIZATION};

use crate::support::tunnel::{listen_key, send_key, Relay, CONNECTION};

/// Every step (a connect, a handshake, a message) must happen within this.
const STEP: Duration = Duration::from_secs(10);
/// A refused connection must be closed well before the handshake deadline would close it.
const PROMPTLY: Duration = Duration::from_secs(3);
/// Long enough that a deadline closing a connection cannot pass for a prompt refusal, and
/// that connections held on purpose stay open on a busy machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn limits(per_ip: usize) -> Limits {
    limits_with(per_ip, DEADLINE)
}

fn limits_with(per_ip: usize, deadline: Duration) -> Limits {
    Limits {
        handshake_timeout: deadline,
        request_timeout: deadline,
        max_unauthenticated_per_ip: per_ip,
        ..Default::default()
    }
}

fn any_peer() -> ProxyProtocol {
    ProxyProtocol::default()
}

fn v1(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        relay.ip(),
        client.port(),
        relay.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (client.ip(), relay.ip()) else {
        panic!("IPv4 only in these tests");
    };
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x21, 0x11]);
    // Twelve bytes of addresses and a seven-byte TLV (PP2_TYPE_AUTHORITY), which is skipped.
    b.extend_from_slice(&19u16.to_be_bytes());
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&client.port().to_be_bytes());
    b.extend_from_slice(&relay.port().to_be_bytes());
    b.extend_from_slice(&[0x02, 0x00, 0x04, b'r', b'e', b'l', b'y']);
    b
}

fn v2_local() -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    b
}

fn client(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

/// What dialing the relay through the test balancer takes (a spawned task needs it owned).
#[derive(Clone)]
struct Balancer {
    relay: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
}

impl Balancer {
    fn to(relay: &Relay) -> Balancer {
        Balancer {
            relay: relay.addr,
            client_tls: relay.client_tls.clone(),
        }
    }

    /// TCP from `source` (the balancer's address) to the relay, `header` written first.
    async fn tcp(&self, source: &str, header: &[u8]) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
            .unwrap();
        let mut tcp = tokio::time::timeout(STEP, socket.connect(self.relay))
            .await
            .expect("TCP connect in time")
            .expect("TCP connect");
        tcp.write_all(header).await.unwrap();
        tcp
    }

    /// TLS after `header`, or the handshake's error (the relay closed the connection).
    async fn tls(&self, source: &str, header: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp(source, header).await;
        tokio::time::timeout(
            STEP,
            TlsConnector::from(self.client_tls.clone())
                .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp),
        )
        .await
        .expect("the TLS handshake ends (either way) in time")
    }

    /// A WebSocket to `url` (on the relay) with `header` first.
    async fn ws(&self, url: &str, header: &[u8], token: Option<&str>) -> Ws {
        let tls = self.tls("127.0.0.6", header).await.expect("TLS");
        let mut request = url.into_client_request().expect("request");
        if let Some(token) = token {
            request
                .headers_mut()
                .insert(HEADER_AUTHORIZATION, HeaderValue::from_str(token).unwrap());
        }
        // A sender's handshake waits for a listener to accept.
        tokio::time::timeout(STEP * 3, tokio_tungstenite::client_async(request, tls))
            .await
            .expect("WebSocket handshake in time")
            .expect("WebSocket handshake")
            .0
    }
}

async fn tls_after(
    source: &str,
    relay: &Relay,
    header: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    Balancer::to(relay).tls(source, header).await
}

async fn balancer_tcp(source: &str, relay: &Relay, header: &[u8]) -> TcpStream {
    Balancer::to(relay).tcp(source, header).await
}

/// `GET /healthz` on `tls`: whether the relay answers 200.
async fn healthy(tls: &mut TlsStream<TcpStream>) -> bool {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(STEP, tls.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].starts_with(b"HTTP/1.1 200"),
        _ => false,
    }
}

/// Whether the relay closes `tcp` within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_cap_applies_to_each_declared_client_not_to_the_balancer() {
    let relay = Relay::start_proxy_protocol(limits(2), any_peer()).await;
    let balancer = "127.0.0.2";
    let seven = client("203.0.113.7:40000");
    // Two connections for 203.0.113.7 (v1, then v2) finish TLS, so their headers have been
    // read and charged, and then stall on keep-alive.
    let mut held = Vec::new();
    for header in [v1(seven, relay.addr), v2(seven, relay.addr)] {
        let mut tls = tls_after(balancer, &relay, &header)
            .await
            .expect("admitted");
        assert!(healthy(&mut tls).await);
        held.push(tls);
    }
    // A third for 203.0.113.7 is refused before TLS, long before the handshake deadline.
    let started = std::time::Instant::now();
    assert!(
        tls_after(balancer, &relay, &v1(seven, relay.addr))
            .await
            .is_err(),
        "a third unauthenticated connection declaring 203.0.113.7 was admitted"
    );
    assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());
    // Another client behind the same balancer is admitted, through either version.
    let eight = client("203.0.113.8:40001");
    for header in [v1(eight, relay.addr), v2(eight, relay.addr)] {
        let mut tls = tls_after(balancer, &relay, &header)
            .await
            .expect("203.0.113.8 has its own share");
        assert!(healthy(&mut tls).await);
    }
    // The balancer's own health checks (LOCAL, UNKNOWN) count against its own address.
    for header in [v2_local(), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut tls = tls_after(balancer, &relay, &header)
            .await
            .expect("health check");
        assert!(healthy(&mut tls).await);
    }
    // Closing one of 203.0.113.7's connections gives its place back.
    drop(held.pop());
    let mut admitted = None;
    for _ in 0..50 {
        if let Ok(tls) = tls_after(balancer, &relay, &v2(seven, relay.addr)).await {
            admitted = Some(tls);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy(&mut admitted.expect("a freed place is reusable")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_header_are_closed_at_once() {
    let relay = Relay::start_proxy_protocol(limits(8), any_peer()).await;
    let seven = client("203.0.113.7:40000");
    // A TLS ClientHello where the header should be.
    let started = std::time::Instant::now();
    assert!(tls_after("127.0.0.3", &relay, b"").await.is_err());
    assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());
    // Plain HTTP, a malformed v1 line, an oversized v2 header.
    let mut oversized = v2(seven, relay.addr);
    oversized[14..16].copy_from_slice(&4000u16.to_be_bytes());
    for garbage in [
        b"GET /healthz HTTP/1.1\r\n\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 nowhere 1 2\r\n".to_vec(),
        format!("PROXY UNKNOWN {}", "x".repeat(200)).into_bytes(),
        oversized,
    ] {
        let mut tcp = balancer_tcp("127.0.0.3", &relay, &garbage).await;
        assert!(
            closed_within(&mut tcp, PROMPTLY).await,
            "{:?} was held",
            String::from_utf8_lossy(&garbage)
        );
    }
    // The relay still serves a well-formed one.
    let mut tls = tls_after("127.0.0.3", &relay, &v1(seven, relay.addr))
        .await
        .expect("valid header");
    assert!(healthy(&mut tls).await);

    // A header that never ends is closed by the handshake deadline.
    let short = Duration::from_millis(1500);
    let relay = Relay::start_proxy_protocol(limits_with(8, short), any_peer()).await;
    let mut tcp = balancer_tcp("127.0.0.3", &relay, b"PROXY TCP4 203.0").await;
    assert!(closed_within(&mut tcp, short + PROMPTLY).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_taken_only_from_the_configured_balancers() {
    let trusted = ProxyProtocol {
        trusted: vec!["127.0.0.4".parse().unwrap()],
    };
    let relay = Relay::start_proxy_protocol(limits(8), trusted).await;
    let header = v1(client("203.0.113.7:40000"), relay.addr);
    let mut tls = tls_after("127.0.0.4", &relay, &header)
        .await
        .expect("from the balancer");
    assert!(healthy(&mut tls).await);
    let mut stranger = balancer_tcp("127.0.0.5", &relay, &header).await;
    assert!(closed_within(&mut stranger, PROMPTLY).await);
}

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// The next text or binary message, skipping pings and pongs.
async fn next_data(ws: &mut Ws) -> Message {
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(_)) => {}
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a message in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_works_through_v1_and_v2_and_names_the_real_sender() {
    let relay = Relay::start_proxy_protocol(limits(8), any_peer()).await;
    let resource = relay.address().resource_uri(CONNECTION);
    let listen_token = listen_key().mint(&resource, Duration::from_secs(600));
    let send_token = send_key().mint(&resource, Duration::from_secs(600));
    let agent = client("198.51.100.1:50000");
    let balancer = Balancer::to(&relay);
    let mut listener = balancer
        .ws(
            &relay.address().url(CONNECTION, Action::Listen, "l"),
            &v1(agent, relay.addr),
            Some(listen_token.expose()),
        )
        .await;
    // The listener is registered once the relay's control loop answers its ping.
    listener
        .send(Message::Ping(b"registered?".to_vec().into()))
        .await
        .unwrap();
    tokio::time::timeout(STEP, async {
        while let Some(Ok(m)) = listener.next().await {
            if matches!(m, Message::Pong(_)) {
                return;
            }
        }
        panic!("control channel ended");
    })
    .await
    .expect("pong");

    let kubectl_user = client("203.0.113.9:41000");
    let sender = tokio::spawn({
        let url = relay.address().url(CONNECTION, Action::Connect, "s");
        let header = v2(kubectl_user, relay.addr);
        let token = send_token.expose().to_string();
        let balancer = Balancer::to(&relay);
        async move { balancer.ws(&url, &header, Some(&token)).await }
    });
    let accept = match next_data(&mut listener).await {
        Message::Text(t) => match serde_json::from_str(&t).expect("JSON") {
            ControlMessage::Accept(a) => a,
            other => panic!("expected accept, got {other:?}"),
        },
        other => panic!("expected a control message, got {other:?}"),
    };
    let endpoint = accept.remote_endpoint.expect("remoteEndpoint");
    assert_eq!(
        (endpoint.address.as_str(), endpoint.port),
        ("203.0.113.9", 41000),
        "the listener is told the sender's address from the PROXY header"
    );
    // The agent's rendezvous dial arrives through the balancer too (v1 UNKNOWN this time).
    let mut accepted = balancer
        .ws(&accept.address, b"PROXY UNKNOWN\r\n", None)
        .await;
    let mut sender = tokio::time::timeout(STEP * 4, sender)
        .await
        .expect("sender in time")
        .expect("sender task");
    sender
        .send(Message::Binary(b"to the agent".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut accepted).await,
        Message::Binary(b"to the agent".to_vec().into())
    );
    accepted
        .send(Message::Binary(b"to kubectl".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut sender).await,
        Message::Binary(b"to kubectl".to_vec().into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_setting_off_a_proxy_header_is_garbage_to_tls() {
    let relay = Relay::start().await;
    let header = v1(client("203.0.113.7:40000"), relay.addr);
    assert_eq!(
        parse(&header).unwrap().map(|(h, _)| h.client(relay.addr)),
        Some(client("203.0.113.7:40000")),
        "the header is well formed"
    );
    assert!(tls_after("127.0.0.7", &relay, &header).await.is_err());
    assert!(tls_after("127.0.0.7", &relay, &v2_local()).await.is_err());
    // Connections without one are served as ever.
    let mut tls = tls_after("127.0.0.7", &relay, b"").await.expect("TLS");
    assert!(healthy(&mut tls).await);
}

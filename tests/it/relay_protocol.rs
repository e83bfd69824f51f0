//! The relay against the Azure Relay Hybrid Connections protocol as documented (listen,
//! accept, connect, renewToken), driven by raw WebSocket clients: no agent, no proxy.
//! https://learn.microsoft.com/azure/azure-relay/relay-hybrid-connections-protocol

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clusterconnect::secret::Secret;
use clusterconnect::tunnel::dial::{dial, DialError, RelayStream};
use clusterconnect::tunnel::protocol::{
    Accept, Action, ControlMessage, RenewToken, HEADER_AUTHORIZATION, QUERY_TOKEN,
};
use clusterconnect::tunnel::sas::{unix_now, SasKey};
use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use support::tunnel::{listen_key, send_key, Relay, CONNECTION};

/// Every single step (a handshake, a message) must happen within this.
const STEP: Duration = Duration::from_secs(10);

fn resource(relay: &Relay, entity: &str) -> String {
    relay.address().resource_uri(entity)
}

fn listen_token(relay: &Relay) -> Secret {
    listen_key().mint(&resource(relay, CONNECTION), Duration::from_secs(3600))
}

fn send_token(relay: &Relay) -> Secret {
    send_key().mint(&resource(relay, CONNECTION), Duration::from_secs(3600))
}

fn url(relay: &Relay, action: Action, id: &str) -> String {
    relay.address().url(CONNECTION, action, id)
}

/// A test client's WebSocket settings: room for messages well beyond 1 MiB either way, so the
/// relay is what is under test, not the client.
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_write_buffer_size(64 * 1024 * 1024)
        .max_message_size(Some(64 * 1024 * 1024))
        .max_frame_size(Some(64 * 1024 * 1024))
}

/// How a handshake the relay refused looked.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: String,
}

/// Opens a WebSocket to a `wss://127.0.0.1:PORT/...` relay URL with extra request headers.
/// Returns the stream and its local address, or the status and body the relay refused with.
async fn raw_dial(
    url: &str,
    headers: &[(&str, &str)],
    tls: &Arc<ClientConfig>,
) -> Result<(RelayStream, SocketAddr), Refused> {
    let parsed = url::Url::parse(url).expect("url");
    let host = parsed.host_str().expect("host").to_string();
    let port = parsed.port().expect("port");
    let tcp = tokio::time::timeout(STEP, TcpStream::connect((host.as_str(), port)))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    let local = tcp.local_addr().expect("local addr");
    let name = ServerName::try_from(host).expect("server name");
    let tls_stream = tokio::time::timeout(STEP, TlsConnector::from(tls.clone()).connect(name, tcp))
        .await
        .expect("TLS in time")
        .expect("TLS");
    let mut request = url.into_client_request().expect("request");
    for (k, v) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let handshake =
        tokio_tungstenite::client_async_with_config(request, tls_stream, Some(client_ws_config()));
    // A sender's handshake waits for a listener; the relay allows 30 s for that.
    match tokio::time::timeout(Duration::from_secs(40), handshake)
        .await
        .expect("handshake in time")
    {
        Ok((ws, _)) => Ok((ws, local)),
        Err(WsError::Http(response)) => Err(Refused {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        }),
        Err(e) => panic!("handshake with {url} failed: {e}"),
    }
}

/// Listens on `CONNECTION` and returns once the relay has registered the control channel.
async fn listen(relay: &Relay, token: &Secret) -> RelayStream {
    let mut ws = dial(
        &url(relay, Action::Listen, "l"),
        Some(token),
        &relay.client_tls,
    )
    .await
    .expect("listen");
    registered(&mut ws).await;
    ws
}

/// The relay answers a ping only from its control loop, which runs once the listener is in
/// the registry: a pong proves senders can be routed to this listener.
async fn registered(ws: &mut RelayStream) {
    ws.send(Message::Ping(b"registered?".to_vec().into()))
        .await
        .expect("ping");
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) if p.as_ref() == b"registered?" => return,
                Some(Ok(Message::Text(t))) => panic!("unexpected control message {t}"),
                Some(Ok(_)) => {}
                other => panic!("control channel ended before it was registered: {other:?}"),
            }
        }
    })
    .await
    .expect("the relay answers the listener's ping");
}

/// The next data or close message, skipping pings and pongs; `None` when the stream ended.
async fn next_message(ws: &mut RelayStream) -> Option<Message> {
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("a message (or the end) within the step timeout")
}

/// The next control message on a listener's channel, as raw JSON.
async fn next_control_json(listener: &mut RelayStream) -> serde_json::Value {
    match next_message(listener).await {
        Some(Message::Text(t)) => serde_json::from_str(&t).expect("control messages are JSON"),
        other => panic!("expected a control message, got {other:?}"),
    }
}

async fn next_accept(listener: &mut RelayStream) -> Accept {
    let json = next_control_json(listener).await;
    match serde_json::from_value(json.clone()) {
        Ok(ControlMessage::Accept(a)) => a,
        other => panic!("expected accept, got {other:?} from {json}"),
    }
}

fn spawn_sender(
    url: String,
    headers: Vec<(String, String)>,
    tls: Arc<ClientConfig>,
) -> JoinHandle<Result<(RelayStream, SocketAddr), Refused>> {
    tokio::spawn(async move {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        raw_dial(&url, &headers, &tls).await
    })
}

async fn joined<T>(task: JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .expect("task finished in time")
        .expect("task did not panic")
}

fn auth_header(token: &Secret) -> Vec<(String, String)> {
    vec![(HEADER_AUTHORIZATION.to_string(), token.expose().to_string())]
}

fn expect_rejected(result: Result<RelayStream, DialError>) -> (u16, String) {
    match result {
        Err(DialError::Rejected {
            status,
            description,
        }) => (status, description),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got a WebSocket"),
    }
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A rendezvous through the relay: (sender side, listener side).
async fn rendezvous(relay: &Relay, listener: &mut RelayStream) -> (RelayStream, RelayStream) {
    let sender = spawn_sender(
        url(relay, Action::Connect, "pair"),
        auth_header(&send_token(relay)),
        relay.client_tls.clone(),
    );
    let accept = next_accept(listener).await;
    let (accepted, _) = raw_dial(&accept.address, &[], &relay.client_tls)
        .await
        .expect("the listener accepts");
    let (sender, _) = joined(sender).await.expect("the sender is connected");
    (sender, accepted)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_use_the_documented_status_codes() {
    let relay = Relay::start().await;
    let tls = &relay.client_tls;
    let uri = resource(&relay, CONNECTION);

    // No listener: 404, and the description says so.
    let (status, description) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, "c"),
            Some(&send_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 404, "{description}");
    assert!(description.contains("no listener"), "{description}");

    // Expired: 401, naming the expiry.
    let expired = send_key().mint_until(&uri, unix_now() - 30);
    let (status, description) =
        expect_rejected(dial(&url(&relay, Action::Connect, "c"), Some(&expired), tls).await);
    assert_eq!(status, 401, "{description}");
    assert!(description.contains("expired"), "{description}");

    // Signed with a different key under the right rule name: 401, for either action.
    let forged_key =
        SasKey::parse("SharedAccessKeyName=send;SharedAccessKey=not-the-key-0123456789")
            .expect("key");
    let forged = forged_key.mint(&uri, Duration::from_secs(600));
    let (status, description) =
        expect_rejected(dial(&url(&relay, Action::Connect, "c"), Some(&forged), tls).await);
    assert_eq!(status, 401, "{description}");
    let forged_listen =
        SasKey::parse("SharedAccessKeyName=listen;SharedAccessKey=not-the-key-0123456789")
            .expect("key")
            .mint(&uri, Duration::from_secs(600));
    let (status, _) =
        expect_rejected(dial(&url(&relay, Action::Listen, "l"), Some(&forged_listen), tls).await);
    assert_eq!(status, 401);

    // No token at all: 401.
    let (status, description) =
        expect_rejected(dial(&url(&relay, Action::Listen, "l"), None, tls).await);
    assert_eq!(status, 401, "{description}");

    // A valid token, but the wrong right for the action: 403 both ways.
    let (status, description) = expect_rejected(
        dial(
            &url(&relay, Action::Listen, "l"),
            Some(&send_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 403, "{description}");
    let (status, _) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, "c"),
            Some(&listen_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 403);

    // A valid token for another hybrid connection: 403.
    let other = listen_key().mint(&resource(&relay, "other-cluster"), Duration::from_secs(600));
    let (status, _) =
        expect_rejected(dial(&url(&relay, Action::Listen, "l"), Some(&other), tls).await);
    assert_eq!(status, 403);

    // Nothing was registered by any of this.
    let (status, _) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, "c"),
            Some(&send_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_as_the_sb_hc_token_query_parameter() {
    let relay = Relay::start().await;
    let listen_url = format!(
        "{}&{QUERY_TOKEN}={}",
        url(&relay, Action::Listen, "q"),
        encode(listen_token(&relay).expose())
    );
    let mut listener = dial(&listen_url, None, &relay.client_tls)
        .await
        .expect("a listener with its token in the query");
    registered(&mut listener).await;

    let send = send_token(&relay);
    let connect_url = format!(
        "{}&{QUERY_TOKEN}={}",
        url(&relay, Action::Connect, "q"),
        encode(send.expose())
    );
    let sender = spawn_sender(connect_url, vec![], relay.client_tls.clone());
    let accept = next_accept(&mut listener).await;
    // The sender's credential is not handed on to the listener.
    assert!(
        !accept.address.contains(QUERY_TOKEN) && !accept.address.contains("sig="),
        "{}",
        accept.address
    );
    let (mut accepted, _) = raw_dial(&accept.address, &[], &relay.client_tls)
        .await
        .expect("accept");
    let (mut sender, _) = joined(sender)
        .await
        .expect("a sender with its token in the query");
    sender
        .send(Message::binary(&b"via query"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(&b"via query"[..]))
    );

    // A broken token in the query is refused like one in the header.
    let bad = format!(
        "{}&{QUERY_TOKEN}={}",
        url(&relay, Action::Connect, "q"),
        encode("SharedAccessSignature sr=x&sig=y&se=1&skn=send")
    );
    let (status, _) = expect_rejected(dial(&bad, None, &relay.client_tls).await);
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_then_frames_flow_unchanged_both_ways() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;

    let mut headers = auth_header(&send_token(&relay));
    headers.push(("X-Trace".into(), "abc-123".into()));
    let sender = spawn_sender(
        url(&relay, Action::Connect, "trace42"),
        headers,
        relay.client_tls.clone(),
    );

    // The accept message, exactly as documented.
    let json = next_control_json(&mut listener).await;
    let accept = &json["accept"];
    assert!(accept.is_object(), "{json}");
    let address = accept["address"].as_str().expect("address");
    let id = accept["id"].as_str().expect("id");
    let parsed = url::Url::parse(address).expect("the address is a URL");
    assert_eq!(parsed.scheme(), "wss", "{json}");
    assert_eq!(parsed.host_str(), Some("127.0.0.1"), "{json}");
    assert_eq!(parsed.port(), Some(relay.addr.port()), "{json}");
    let path = percent_encoding::percent_decode_str(parsed.path())
        .decode_utf8()
        .expect("utf-8 path");
    assert_eq!(path, format!("/$hc/{CONNECTION}"), "{json}");
    let query: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    assert!(
        query.contains(&("sb-hc-action".into(), "accept".into()))
            && query.contains(&("sb-hc-id".into(), id.to_string())),
        "{json}"
    );
    assert!(
        id.contains("trace42"),
        "the sender's id is kept for tracing: {json}"
    );
    let connect_headers = accept["connectHeaders"]
        .as_object()
        .expect("connectHeaders");
    let header = |name: &str| {
        connect_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-trace"), Some("abc-123"), "{json}");
    assert!(header("host").is_some(), "{json}");
    assert_eq!(
        header(HEADER_AUTHORIZATION),
        None,
        "the sender's token must not reach the listener: {json}"
    );
    let remote = &accept["remoteEndpoint"];
    assert_eq!(remote["address"].as_str(), Some("127.0.0.1"), "{json}");
    let remote_port = remote["port"].as_u64().expect("port");

    let (mut accepted, _) = raw_dial(address, &[], &relay.client_tls)
        .await
        .expect("accept");
    let (mut sender, sender_local) = joined(sender).await.expect("sender connected");
    assert_eq!(remote_port, u64::from(sender_local.port()));

    // Binary messages of many sizes, 1 MiB and more included, arrive unchanged and in order, both ways;
    // text stays text.
    let sizes = [
        1usize,
        0,
        125,
        126,
        65_535,
        65_536,
        200_000,
        1024 * 1024,
        3 * 1024 * 1024,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let up = pattern(size, i as u64 + 1);
        sender
            .send(Message::binary(up.clone()))
            .await
            .expect("sender sends");
        let got = next_message(&mut accepted).await;
        assert!(
            matches!(&got, Some(Message::Binary(b)) if b.as_ref() == up.as_slice()),
            "sender -> listener, {size} bytes: got {:?}",
            got.map(|m| m.len())
        );
        let down = pattern(size, 1000 + i as u64);
        accepted
            .send(Message::binary(down.clone()))
            .await
            .expect("listener sends");
        let got = next_message(&mut sender).await;
        assert!(
            matches!(&got, Some(Message::Binary(b)) if b.as_ref() == down.as_slice()),
            "listener -> sender, {size} bytes: got {:?}",
            got.map(|m| m.len())
        );
    }
    // Several in flight at once keep their order.
    let burst: Vec<Vec<u8>> = (0..20)
        .map(|i| pattern(10_000 + i, 77 + i as u64))
        .collect();
    for b in &burst {
        sender.feed(Message::binary(b.clone())).await.expect("feed");
    }
    sender.flush().await.expect("flush");
    for b in &burst {
        assert_eq!(
            next_message(&mut accepted).await,
            Some(Message::binary(b.clone()))
        );
    }
    accepted.send(Message::text("héllo")).await.expect("text");
    assert_eq!(
        next_message(&mut sender).await,
        Some(Message::text("héllo"))
    );

    // The address was good for one use only.
    let again = raw_dial(address, &[], &relay.client_tls)
        .await
        .expect_err("a used address must not connect again");
    assert_eq!(again.status, 404, "{again:?}");

    // The rendezvous still works after that attempt.
    sender
        .send(Message::binary(&b"still here"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(&b"still here"[..]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_can_reject_a_sender_with_a_status_and_description() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;
    let sender = spawn_sender(
        url(&relay, Action::Connect, "r"),
        auth_header(&send_token(&relay)),
        relay.client_tls.clone(),
    );
    let accept = next_accept(&mut listener).await;
    let reject = format!(
        "{}&sb-hc-statusCode=403&sb-hc-statusDescription=go%20away",
        accept.address
    );
    // The documented outcome of a rejection handshake: an intentional 410, no WebSocket.
    let answer = raw_dial(&reject, &[], &relay.client_tls)
        .await
        .expect_err("a rejection handshake opens no WebSocket");
    assert_eq!(answer.status, 410, "{answer:?}");

    let refused = joined(sender)
        .await
        .expect_err("the rejected sender gets no WebSocket");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.body.trim(), "go away");

    // The address is spent: accepting it now fails.
    let late = raw_dial(&accept.address, &[], &relay.client_tls)
        .await
        .expect_err("spent address");
    assert_eq!(late.status, 404, "{late:?}");

    // The listener's control channel is unaffected and serves the next sender.
    let (mut sender, mut accepted) = rendezvous(&relay, &mut listener).await;
    accepted
        .send(Message::binary(&b"welcome"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut sender).await,
        Some(Message::binary(&b"welcome"[..]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_are_spread_across_the_listeners_of_a_connection() {
    let relay = Relay::start().await;
    let token = listen_token(&relay);
    let mut listeners = [listen(&relay, &token).await, listen(&relay, &token).await];
    let mut counts = [0usize; 2];
    for i in 0..6 {
        let sender = spawn_sender(
            url(&relay, Action::Connect, &format!("s{i}")),
            auth_header(&send_token(&relay)),
            relay.client_tls.clone(),
        );
        let [first, second] = &mut listeners;
        let (which, msg) = tokio::time::timeout(STEP, async {
            tokio::select! {
                m = first.next() => (0, m),
                m = second.next() => (1, m),
            }
        })
        .await
        .expect("one listener gets the accept");
        let Some(Ok(Message::Text(text))) = msg else {
            panic!("listener {which}: unexpected {msg:?}");
        };
        let Ok(ControlMessage::Accept(accept)) = serde_json::from_str(&text) else {
            panic!("listener {which}: not an accept: {text}");
        };
        assert!(accept.id.contains(&format!("s{i}")), "{}", accept.id);
        counts[which] += 1;
        let (mut accepted, _) = raw_dial(&accept.address, &[], &relay.client_tls)
            .await
            .expect("accept");
        let (mut sender, _) = joined(sender).await.expect("sender connected");
        sender
            .send(Message::binary(vec![i as u8]))
            .await
            .expect("send");
        assert_eq!(
            next_message(&mut accepted).await,
            Some(Message::binary(vec![i as u8]))
        );
    }
    // Round robin: with both listeners registered, each takes every other sender.
    assert_eq!(counts, [3, 3], "senders per listener");
}

/// Waits for the relay to close a listener's control channel; returns the close frame.
async fn closed_by_relay(listener: &mut RelayStream, within: Duration) -> Option<CloseFrame> {
    let frame = tokio::time::timeout(within, async {
        loop {
            match listener.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Text(t))) => panic!("unexpected control message {t}"),
                Some(Ok(_)) => {}
                other => panic!("control channel ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the relay closes the control channel in time");
    // Then the connection ends (the relay has dropped the listener by now).
    let _ = tokio::time::timeout(STEP, async {
        while let Some(Ok(_)) = listener.next().await {}
    })
    .await;
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_token_keeps_a_listener_past_its_first_expiry() {
    let relay = Relay::start().await;
    let uri = resource(&relay, CONNECTION);
    let first_expiry = unix_now() + 3;
    let short = listen_key().mint_until(&uri, first_expiry);
    let mut renewing = listen(&relay, &short).await;
    let mut lapsing = listen(&relay, &short).await;

    let renew = ControlMessage::RenewToken(RenewToken {
        token: listen_key()
            .mint(&uri, Duration::from_secs(3600))
            .expose()
            .to_string(),
    });
    renewing
        .send(Message::text(serde_json::to_string(&renew).expect("json")))
        .await
        .expect("renewToken");
    assert_eq!(
        serde_json::to_value(&renew).expect("json")["renewToken"]["token"]
            .as_str()
            .map(|t| t.starts_with("SharedAccessSignature ")),
        Some(true)
    );

    // The listener that did not renew is closed with 1008 once its token lapses.
    let frame = closed_by_relay(&mut lapsing, Duration::from_secs(10))
        .await
        .expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    assert!(
        unix_now() >= first_expiry,
        "closed before the token expired"
    );

    // Past the first expiry by a clear margin (the relay works in whole seconds)...
    tokio::time::timeout(STEP, async {
        while unix_now() < first_expiry + 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the clock moves");

    // ...the renewed listener is still registered and gets the next sender.
    let (mut sender, mut accepted) = rendezvous(&relay, &mut renewing).await;
    sender
        .send(Message::binary(&b"after renewal"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(&b"after renewal"[..]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_renew_token_closes_the_control_channel_with_1008() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;
    let forged = SasKey::parse("SharedAccessKeyName=listen;SharedAccessKey=not-the-key-0123456789")
        .expect("key")
        .mint(&resource(&relay, CONNECTION), Duration::from_secs(3600));
    let renew = ControlMessage::RenewToken(RenewToken {
        token: forged.expose().to_string(),
    });
    listener
        .send(Message::text(serde_json::to_string(&renew).expect("json")))
        .await
        .expect("renewToken");
    let frame = closed_by_relay(&mut listener, STEP)
        .await
        .expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");

    // It is no longer a listener.
    let (status, _) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, "c"),
            Some(&send_token(&relay)),
            &relay.client_tls,
        )
        .await,
    );
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_closing_mid_stream_closes_the_sender_too() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;

    // A clean close: the sender sees the listener's close code and reason.
    let (mut sender, mut accepted) = rendezvous(&relay, &mut listener).await;
    sender
        .send(Message::binary(&b"request"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(&b"request"[..]))
    );
    accepted
        .send(Message::binary(&b"partial answer"[..]))
        .await
        .expect("send");
    accepted
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "listener done".into(),
        }))
        .await
        .expect("close");
    assert_eq!(
        next_message(&mut sender).await,
        Some(Message::binary(&b"partial answer"[..]))
    );
    match next_message(&mut sender).await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "listener done");
        }
        other => panic!("expected the listener's close, got {other:?}"),
    }
    assert_eq!(
        next_message(&mut sender).await,
        None,
        "then the stream ends"
    );

    // An abrupt end (the listener's connection just drops): the sender is closed too.
    let (mut sender, accepted) = rendezvous(&relay, &mut listener).await;
    drop(accepted);
    match next_message(&mut sender).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
        None => {}
        other => panic!("expected the sender to be closed, got {other:?}"),
    }
    assert_eq!(next_message(&mut sender).await, None);

    // The control channel outlives its rendezvous.
    let (mut sender, mut accepted) = rendezvous(&relay, &mut listener).await;
    sender
        .send(Message::binary(&b"next"[..]))
        .await
        .expect("send");
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(&b"next"[..]))
    );
}

// --- The relay on the open internet: what a hostile caller cannot make it do. ----------------

/// A sender's forged `Host` never reaches the listener: the accept address names the relay's
/// configured host (and the port it is reached on), whatever the sender claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_host_header_does_not_choose_where_the_listener_dials() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;
    let mut headers = auth_header(&send_token(&relay));
    headers.push(("host".into(), "attacker.example:443".into()));
    let sender = spawn_sender(
        url(&relay, Action::Connect, "forged"),
        headers,
        relay.client_tls.clone(),
    );
    let accept = next_accept(&mut listener).await;
    let address = url::Url::parse(&accept.address).expect("accept address");
    assert_eq!(address.host_str(), Some("127.0.0.1"), "{}", accept.address);
    assert_eq!(
        address.port(),
        Some(relay.addr.port()),
        "{}",
        accept.address
    );
    assert!(!accept.address.contains("attacker"), "{}", accept.address);
    // The sender's WebSocket handshake reaches the listener, as Azure Relay passes it on; its
    // credential does not.
    for name in [
        "sec-websocket-key",
        "sec-websocket-version",
        "upgrade",
        "connection",
    ] {
        assert!(
            accept.connect_headers.contains_key(name),
            "{name}: {:?}",
            accept.connect_headers.keys()
        );
    }
    assert!(!accept
        .connect_headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case(HEADER_AUTHORIZATION)));
    let (_accepted, _) = raw_dial(&accept.address, &[], &relay.client_tls)
        .await
        .expect("the listener accepts at the configured host");
    joined(sender).await.expect("the sender is connected");
}

/// Azure Relay's quotas: 25 listeners per hybrid connection, bounded ids, and listener
/// tokens whose lifetime the relay caps (an `se` of u64::MAX is refused, not a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_are_enforced_with_documented_statuses() {
    let relay = Relay::start().await;
    let tls = &relay.client_tls;
    let token = listen_token(&relay);
    let mut listeners = Vec::new();
    for _ in 0..25 {
        listeners.push(listen(&relay, &token).await);
    }
    let (status, description) =
        expect_rejected(dial(&url(&relay, Action::Listen, "l26"), Some(&token), tls).await);
    assert_eq!(status, 403, "{description}");
    assert!(description.contains("25"), "{description}");
    // One leaves, another may come.
    drop(listeners.pop());
    let mut again = None;
    for _ in 0..50 {
        match dial(&url(&relay, Action::Listen, "l25"), Some(&token), tls).await {
            Ok(ws) => {
                again = Some(ws);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(again.is_some(), "a freed listener slot is usable again");

    // A path of thousands of segments is refused before any routing work.
    let deep = format!(
        "wss://127.0.0.1:{}/$hc/{}?sb-hc-action=connect",
        relay.addr.port(),
        "a/".repeat(4000) + "a"
    );
    let (status, _) = expect_rejected(dial(&deep, Some(&send_token(&relay)), tls).await);
    assert_eq!(status, 414);

    let long_id = "x".repeat(10 * 1024);
    let (status, description) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, &long_id),
            Some(&send_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 400, "{description}");
    assert!(
        !description.contains(&long_id[..200]),
        "the id is not echoed"
    );
    // Every log line of a rendezvous carries its id: one with a newline could forge lines.
    let (status, description) = expect_rejected(
        dial(
            &url(&relay, Action::Connect, "a%0Alistener%20connected"),
            Some(&send_token(&relay)),
            tls,
        )
        .await,
    );
    assert_eq!(status, 400, "{description}");
    assert!(description.contains("control characters"), "{description}");

    for se in [u64::MAX, 1 << 62, unix_now() + 400 * 24 * 3600] {
        let forever = listen_key().mint_until(&resource(&relay, "other-connection"), se);
        let mut u = relay.address().url("other-connection", Action::Listen, "x");
        u.push_str("&x=1");
        let (status, description) = expect_rejected(dial(&u, Some(&forever), tls).await);
        assert_eq!(status, 401, "se={se}: {description}");
        assert!(description.contains("at most"), "{description}");
    }
}

/// An unknown rule and a wrong key read the same, so a stranger cannot probe which rules
/// (and so which registered clusters) exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_rules_and_wrong_keys_are_indistinguishable() {
    let relay = Relay::start().await;
    let tls = &relay.client_tls;
    let uri = resource(&relay, CONNECTION);
    let wrong_key =
        SasKey::parse("SharedAccessKeyName=send;SharedAccessKey=not-the-key-0123456789")
            .unwrap()
            .mint(&uri, Duration::from_secs(600));
    let no_rule =
        SasKey::parse("SharedAccessKeyName=cc-nosuch;SharedAccessKey=not-the-key-0123456789")
            .unwrap()
            .mint(&uri, Duration::from_secs(600));
    let connect = url(&relay, Action::Connect, "probe");
    let (s1, d1) = expect_rejected(dial(&connect, Some(&wrong_key), tls).await);
    let (s2, d2) = expect_rejected(dial(&connect, Some(&no_rule), tls).await);
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(
        d1.replace("'send'", "'R'"),
        d2.replace("'cc-nosuch'", "'R'"),
        "the two refusals differ only in the rule name the caller sent"
    );
}

/// `/$hc/<name>/more/path?q=1` reaches the listener of `<name>`, which sees the path suffix
/// and the sender's own query in its accept address, as Azure Relay routes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_suffix_is_routed_to_the_longest_listening_name() {
    let relay = Relay::start().await;
    let mut listener = listen(&relay, &listen_token(&relay)).await;
    let sender_url = format!(
        "wss://127.0.0.1:{}/$hc/{CONNECTION}/api/v1/pods?sb-hc-action=connect&sb-hc-id=sfx&watch=true",
        relay.addr.port()
    );
    let sender = spawn_sender(
        sender_url,
        auth_header(&send_token(&relay)),
        relay.client_tls.clone(),
    );
    let accept = next_accept(&mut listener).await;
    let address = url::Url::parse(&accept.address).expect("accept address");
    assert_eq!(
        address.path(),
        format!("/$hc/{CONNECTION}/api/v1/pods"),
        "{}",
        accept.address
    );
    let query: Vec<(String, String)> = address.query_pairs().into_owned().collect();
    assert!(
        query.contains(&("watch".into(), "true".into())),
        "{query:?}"
    );
    assert!(
        query.contains(&("sb-hc-action".into(), "accept".into())),
        "{query:?}"
    );
    let (mut accepted, _) = raw_dial(&accept.address, &[], &relay.client_tls)
        .await
        .expect("the listener accepts the suffixed address");
    let (mut sender, _) = joined(sender).await.expect("the sender is connected");
    sender
        .send(Message::binary(b"hello".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut accepted).await,
        Some(Message::binary(b"hello".to_vec()))
    );
}

/// One HTTP/1.1 request over TLS to the relay, answered and closed within 20 s: the status
/// and the whole answer.
async fn https_exchange(relay: &Relay, request: String) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(relay.addr).await.expect("TCP connect");
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let mut tls = TlsConnector::from(relay.client_tls.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 20 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_to_an_agents_connection_is_refused_at_once_and_strangers_get_401() {
    let api = support::apiserver::ApiServer::start().await;
    let relay = Relay::start().await;
    let agent = support::tunnel::Agent::start(&relay, &api, listen_key()).await;
    support::tunnel::wait_for_listener(&relay).await;
    let token = send_key().mint(
        &relay.address().resource_uri(CONNECTION),
        Duration::from_secs(600),
    );
    let host = format!("127.0.0.1:{}", relay.addr.port());
    let started = std::time::Instant::now();
    let (status, answer) = https_exchange(
        &relay,
        format!(
            "GET /{CONNECTION}/api/v1/pods HTTP/1.1\r\nHost: {host}\r\nServiceBusAuthorization: {}\r\nConnection: close\r\n\r\n",
            token.expose()
        ),
    )
    .await;
    // The agent answers the relay's request notice with a rejection, not with silence that
    // would leave the sender to the relay's 30 s timeout.
    assert_eq!(status, 501, "{answer}");
    assert!(answer.contains("clusterconnect agent"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Without a token, or with a forged one, nothing reaches a listener.
    let (status, answer) = https_exchange(
        &relay,
        format!("GET /{CONNECTION}/api HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    let forged = token.expose().replace("sig=", "sig=AA");
    let (status, answer) = https_exchange(
        &relay,
        format!(
            "POST /{CONNECTION}/api HTTP/1.1\r\nHost: {host}\r\nAuthorization: {forged}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        ),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        !answer.contains("sig="),
        "the answer echoes the token: {answer}"
    );
    agent.stop().await;
}

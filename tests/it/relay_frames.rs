//! The relay's splice streams WebSocket frames instead of assembling messages: eight senders
//! each pushing one 14 MiB message at a listener that reads them one at a time must cost the
//! relay (the real binary, a process of its own, so its memory is its own) little more than
//! its per-direction buffers. Splicing whole messages, as the relay once did, grew it by
//! about 113 MiB here: every sender's message held in the relay while the listener was busy.

use std::collections::HashMap;
use std::time::Duration;

use clusterconnect::secret::Secret;
use clusterconnect::tunnel::dial::dial;
use clusterconnect::tunnel::protocol::{Accept, Action, ControlMessage, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

use crate::support::processes::start_relay;

const CONNECTION: &str = "frames";
const SENDERS: usize = 8;
const MESSAGE: usize = 14 * 1024 * 1024;
/// What the whole test may grow the relay by: buffers, TLS sessions and allocator slack for
/// 16 connections, far below one message per sender (8 x 14 MiB).
const MAX_GROWTH_KIB: u64 = 32 * 1024;
/// Everything, 112 MiB through TLS both ways in a debug build, is done by then.
const WITHIN: Duration = Duration::from_secs(240);
/// How long the listener dawdles before reading each rendezvous: the senders behind it wait.
const DAWDLE: Duration = Duration::from_millis(300);

/// Sender `i`'s message: pseudo-random bytes (nothing compresses or repeats), `i` first.
fn message(i: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    let mut data = Vec::with_capacity(MESSAGE + 8);
    while data.len() < MESSAGE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(MESSAGE);
    data[0] = i as u8;
    data
}

async fn next_accept<S>(control: &mut S) -> Accept
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match control.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                Ok(ControlMessage::Accept(a)) => return a,
                other => panic!("unexpected control message {other:?}"),
            },
            Some(Ok(_)) => {}
            other => panic!("control channel ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_14_mib_messages_at_a_slow_listener_cost_the_relay_buffers_not_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let tls = clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).expect("TLS");
    let address = RelayAddress::parse(&relay.url).expect("relay address");
    let token = |key: &std::path::Path| -> Secret {
        SasKey::from_file(key)
            .expect("key file")
            .mint(&address.resource_uri(CONNECTION), Duration::from_secs(3600))
    };
    let (listen, send) = (token(&relay.listen_key), token(&relay.send_key));

    tokio::time::timeout(WITHIN, async {
        let mut control = dial(
            &address.url(CONNECTION, Action::Listen, "frames-listener"),
            Some(&listen),
            &tls,
        )
        .await
        .expect("listen");

        let connect = |id: String| {
            let (url, send, tls) = (
                address.url(CONNECTION, Action::Connect, &id),
                send.clone(),
                tls.clone(),
            );
            async move { dial(&url, Some(&send), &tls).await.expect("connect") }
        };

        // One small rendezvous first, so what the relay allocates once is in the baseline.
        let warm = tokio::spawn(connect("warm-up".into()));
        let accept = next_accept(&mut control).await;
        let mut listener = dial(&accept.address, None, &tls).await.expect("accept");
        let mut sender = warm.await.expect("join");
        sender
            .send(Message::binary(vec![1u8; 100_000]))
            .await
            .expect("send");
        match listener.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(b.len(), 100_000),
            other => panic!("warm-up message: {other:?}"),
        }
        drop((sender, listener));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let baseline = relay.process.rss_kib();
        assert!(baseline > 0, "the relay's /proc status is readable");

        let senders: Vec<_> = (0..SENDERS)
            .map(|i| {
                let connecting = connect(format!("sender-{i}"));
                tokio::spawn(async move {
                    let mut ws = connecting.await;
                    let data = message(i);
                    let digest: [u8; 32] = Sha256::digest(&data).into();
                    ws.send(Message::binary(data)).await.expect("send");
                    // The listener closes once it has everything.
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                    (i, digest)
                })
            })
            .collect();
        let mut rendezvous = Vec::new();
        for _ in 0..SENDERS {
            let accept = next_accept(&mut control).await;
            rendezvous.push(dial(&accept.address, None, &tls).await.expect("accept"));
        }

        let mut received = HashMap::new();
        let mut peak_rss = 0;
        for mut ws in rendezvous {
            tokio::time::sleep(DAWDLE).await;
            peak_rss = peak_rss.max(relay.process.rss_kib());
            let data = loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => break b,
                    Some(Ok(_)) => {}
                    other => panic!("rendezvous ended before its message: {other:?}"),
                }
            };
            assert_eq!(data.len(), MESSAGE);
            let digest: [u8; 32] = Sha256::digest(&data).into();
            assert!(
                received.insert(data[0] as usize, digest).is_none(),
                "one message per sender"
            );
            drop(data);
            ws.close(None).await.expect("close");
            while let Some(Ok(_)) = ws.next().await {}
        }
        for sender in senders {
            let (i, digest) = sender.await.expect("sender");
            assert!(
                received.get(&i) == Some(&digest),
                "sender {i}'s 14 MiB arrived intact"
            );
        }
        let growth = relay
            .process
            .peak_rss_kib()
            .max(peak_rss)
            .saturating_sub(baseline);
        eprintln!("relay memory: baseline {baseline} KiB, grew by {growth} KiB");
        assert!(
            growth < MAX_GROWTH_KIB,
            "the relay grew by {} MiB (baseline {} MiB) splicing {SENDERS} x 14 MiB messages",
            growth / 1024,
            baseline / 1024
        );
    })
    .await
    .expect("the whole exchange within its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_cross_the_relay_and_are_answered_by_the_far_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let tls = clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).expect("TLS");
    let address = RelayAddress::parse(&relay.url).expect("relay address");
    let token = |key: &std::path::Path| -> Secret {
        SasKey::from_file(key)
            .expect("key file")
            .mint(&address.resource_uri(CONNECTION), Duration::from_secs(3600))
    };
    let (listen, send) = (token(&relay.listen_key), token(&relay.send_key));
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut control = dial(
            &address.url(CONNECTION, Action::Listen, "ping-listener"),
            Some(&listen),
            &tls,
        )
        .await
        .expect("listen");
        let sender = tokio::spawn({
            let (url, tls) = (
                address.url(CONNECTION, Action::Connect, "pinger"),
                tls.clone(),
            );
            async move { dial(&url, Some(&send), &tls).await.expect("connect") }
        });
        let accept = next_accept(&mut control).await;
        let mut listener = dial(&accept.address, None, &tls).await.expect("accept");
        let mut sender = sender.await.expect("join");
        // Not answered by the relay: the far end's pong proves the whole path alive.
        sender
            .send(Message::Ping(bytes::Bytes::from_static(b"hb")))
            .await
            .expect("ping");
        match listener.next().await {
            Some(Ok(Message::Ping(p))) => assert_eq!(&p[..], b"hb"),
            other => panic!("the listener should see the sender's ping: {other:?}"),
        }
        // The listener's automatic pong goes out with its next read.
        let _ = tokio::time::timeout(Duration::from_millis(200), listener.next()).await;
        match tokio::time::timeout(Duration::from_secs(10), sender.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"hb"),
            other => panic!("the sender should get the listener's pong: {other:?}"),
        }
        // Both ways.
        listener
            .send(Message::Ping(bytes::Bytes::from_static(b"back")))
            .await
            .expect("ping");
        match sender.next().await {
            Some(Ok(Message::Ping(p))) => assert_eq!(&p[..], b"back"),
            other => panic!("the sender should see the listener's ping: {other:?}"),
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), sender.next()).await;
        match tokio::time::timeout(Duration::from_secs(10), listener.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"back"),
            other => panic!("the listener should get the sender's pong: {other:?}"),
        }
    })
    .await
    .expect("pings within their bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_channel_message_over_64_kib_closes_the_channel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let tls = clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).expect("TLS");
    let address = RelayAddress::parse(&relay.url).expect("relay address");
    let listen = SasKey::from_file(&relay.listen_key)
        .expect("key file")
        .mint(&address.resource_uri(CONNECTION), Duration::from_secs(3600));
    let mut control = dial(
        &address.url(CONNECTION, Action::Listen, "big-talker"),
        Some(&listen),
        &tls,
    )
    .await
    .expect("listen");
    // Messages are small JSON; 64 KiB passes, anything larger ends the channel.
    control
        .send(Message::text("x".repeat(64 * 1024)))
        .await
        .expect("send");
    control
        .send(Message::text("x".repeat(64 * 1024 + 1)))
        .await
        .expect("send");
    // Ended with the reason: 1009, message too big.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match control.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Err(_)) | None => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(
        ended,
        Ok(Some(1009)),
        "the relay must end a control channel that sends 64 KiB + 1, saying why"
    );
}

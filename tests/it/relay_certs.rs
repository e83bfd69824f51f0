//! The relay follows its certificate files: a pair renewed in place (cert-manager, ACME) is
//! presented at the next handshake while an open listener and an open tunnel carry on. The
//! real binary.

use crate::support;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clusterconnect::tls::CertificateAuthority;
use clusterconnect::tunnel::dial::dial;
use clusterconnect::tunnel::protocol::ControlMessage;
use clusterconnect::tunnel::protocol::{Action, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::processes::{spawn, START_TIMEOUT};

const LISTEN_KEY: &str =
    "SharedAccessKeyName=listen;SharedAccessKey=bGlzdGVuLWtleS1mb3ItY2VydC10ZXN0cy0wMTIz";
const SEND_KEY: &str =
    "SharedAccessKeyName=send;SharedAccessKey=c2VuZC1rZXktZm9yLWNlcnQtdGVzdHMtMDEyMzQ1";

/// The next data message on `ws` (pings and pongs skipped), within 10 s.
async fn next_data(ws: &mut clusterconnect::tunnel::dial::RelayStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(m)) => return m,
                other => panic!("the stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a message within 10 s")
}

/// The certificate the relay at `addr` presents now.
async fn presented(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .expect("handshake");
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_place_is_presented_without_dropping_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("renewal test CA").unwrap();
    let first = ca.issue_server(&["127.0.0.1"]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    std::fs::write(dir.path().join("listen.key"), LISTEN_KEY).unwrap();
    std::fs::write(dir.path().join("send.key"), SEND_KEY).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "hostnames = [\"127.0.0.1\"]\n\n[tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n\n[[rules]]\nname = \"listen\"\nkey_file = \"listen.key\"\nrights = [\"listen\"]\n\n[[rules]]\nname = \"send\"\nkey_file = \"send.key\"\nrights = [\"send\"]\n",
    )
    .unwrap();
    let relay = spawn(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--log-format"),
            OsStr::new("json"),
        ],
        &[],
    );
    let record = relay
        .wait_for_log(START_TIMEOUT, "relay listening")
        .await
        .unwrap_or_else(|out| panic!("relay did not start:\n{out}"));
    let addr: SocketAddr = record["fields"]["addr"].as_str().unwrap().parse().unwrap();
    let roots = clusterconnect::tls::roots_from_pem(ca.cert_pem().as_bytes()).unwrap();
    let tls = clusterconnect::tls::client_config_with_roots(roots, &[]).unwrap();
    assert_eq!(presented(addr, &tls).await, der(&first.cert_pem));

    // A listener that stays connected through the renewal.
    let address = RelayAddress::parse(&format!("wss://127.0.0.1:{}", addr.port())).unwrap();
    let listen = SasKey::parse(LISTEN_KEY).unwrap();
    let token = listen.mint(&address.resource_uri("c1"), Duration::from_secs(600));
    let mut listener = dial(&address.url("c1", Action::Listen, "l"), Some(&token), &tls)
        .await
        .expect("listen");

    // And a tunnel (a watch's stream, as far as the relay can tell) open through it.
    let send = SasKey::parse(SEND_KEY).unwrap();
    let send_token = send.mint(&address.resource_uri("c1"), Duration::from_secs(600));
    let sender = tokio::spawn({
        let (url, tls) = (address.url("c1", Action::Connect, "s"), tls.clone());
        async move { dial(&url, Some(&send_token), &tls).await }
    });
    let accept = match next_data(&mut listener).await {
        Message::Text(text) => match serde_json::from_str(&text) {
            Ok(ControlMessage::Accept(accept)) => accept,
            other => panic!("expected an accept, got {other:?}"),
        },
        other => panic!("expected an accept, got {other:?}"),
    };
    let mut far_end = dial(&accept.address, None, &tls).await.expect("rendezvous");
    let mut near_end = sender.await.unwrap().expect("sender connected");
    near_end
        .send(Message::text("before the renewal"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut far_end).await,
        Message::text("before the renewal")
    );

    let second = ca.issue_server(&["127.0.0.1"]).unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while presented(addr, &tls).await != der(&second.cert_pem) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not presented within 30 s:\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The tunnel opened under the old certificate carries on, both ways.
    near_end
        .send(Message::text("after the renewal"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut far_end).await,
        Message::text("after the renewal")
    );
    far_end.send(Message::text("and back")).await.unwrap();
    assert_eq!(next_data(&mut near_end).await, Message::text("and back"));
    let still_open = tokio::time::timeout(Duration::from_millis(300), listener.next()).await;
    assert!(
        matches!(still_open, Err(_) | Ok(Some(Ok(_)))),
        "the listener was dropped by the renewal: {still_open:?}"
    );
}

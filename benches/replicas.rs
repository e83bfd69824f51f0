//! Relay replicas on NATS: accept latency (a sender's connect to the first byte from its
//! listener) when the sender lands on the listener's own replica and when it lands on another
//! replica and the offer crosses NATS, measured interleaved in one run; and what each replica
//! holds while it runs.
//!
//! Runs a real `nats-server -js` (Debian's package; `scripts/test` installs it) on 127.0.0.1
//! and two in-process relay replicas. `cargo bench --bench replicas [-- ROUNDS]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use clusterconnect::relay::replicas;
use clusterconnect::relay::{ClusterLink, RelayConfig, RelayStats, Rule, RuleSet};
use clusterconnect::secret::Secret;
use clusterconnect::tls::{self, CertificateAuthority};
use clusterconnect::tunnel::dial::{dial, dial_answered};
use clusterconnect::tunnel::protocol::{Action, ControlMessage, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;

const KEY: &str = "bench-admin-key-0123456789abcdef";
const CONNECTION: &str = "bench";

fn nats_server() -> PathBuf {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            eprintln!("nats-server is not installed: install Debian's nats-server package (scripts/test does)");
            std::process::exit(2)
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn replica(
    nats: u16,
    tls: Arc<rustls::ServerConfig>,
    shutdown: &CancellationToken,
) -> (SocketAddr, Arc<RelayStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let file = replicas::ClusterFile {
        nats_url: format!("nats://127.0.0.1:{nats}"),
        public_host: "127.0.0.1".into(),
        nats_credentials_file: None,
        nats_token_file: None,
        nats_ca_file: None,
        nats_cert_file: None,
        nats_key_file: None,
        name: None,
    };
    let me = replicas::public_authority(&file.public_host, addr.port()).unwrap();
    let client = replicas::connect(&file, &me).await.expect("NATS");
    let stats = Arc::new(RelayStats::default());
    let config = RelayConfig {
        hostnames: vec!["localhost".into(), "127.0.0.1".into()],
        rules: RuleSet::new(vec![Rule {
            name: "admin".into(),
            key: Secret::new(KEY),
            secondary_key: None,
            listen: true,
            send: true,
            manage: true,
            entity: None,
        }]),
        clusters: None,
        tls,
        max_connections: 10_000,
        stats: stats.clone(),
        public_port: None,
        limits: Default::default(),
        proxy_protocol: None,
        cluster: Some(ClusterLink {
            client,
            prefix: "bench".into(),
            me,
        }),
    };
    let shutdown = shutdown.clone();
    tokio::spawn(async move { clusterconnect::relay::run(listener, config, shutdown).await });
    (addr, stats)
}

/// A listener on `relay` that answers every accepted sender with one byte.
async fn listener(relay: &RelayAddress, tls: Arc<rustls::ClientConfig>) {
    let key = SasKey {
        name: "admin".into(),
        key: Secret::new(KEY),
    };
    let token = key.mint(&relay.resource_uri(CONNECTION), Duration::from_secs(3600));
    let url = relay.url(CONNECTION, Action::Listen, "bench-listener");
    let (mut ws, _) = dial_answered(&url, Some(&token), &tls)
        .await
        .expect("listen");
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let Ok(ControlMessage::Accept(accept)) = serde_json::from_str(&text) else {
                continue;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(mut rendezvous) = dial(&accept.address, None, &tls).await {
                    let _ = rendezvous.send(Message::binary(vec![1u8])).await;
                    while let Some(Ok(_)) = rendezvous.next().await {}
                }
            });
        }
    });
}

/// One sender on `relay`: milliseconds from its connect to its first byte.
async fn accept_ms(relay: &RelayAddress, tls: &Arc<rustls::ClientConfig>) -> f64 {
    let key = SasKey {
        name: "admin".into(),
        key: Secret::new(KEY),
    };
    let token = key.mint(&relay.resource_uri(CONNECTION), Duration::from_secs(600));
    let url = relay.url(CONNECTION, Action::Connect, "bench-sender");
    let started = Instant::now();
    let mut ws = dial(&url, Some(&token), tls).await.expect("sender");
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(_))) => break,
            Some(Ok(_)) => continue,
            other => panic!("no first byte: {other:?}"),
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = ws.close(None).await;
    ms
}

fn write_ca(dir: &Path, ca: &CertificateAuthority) -> PathBuf {
    let path = dir.join("ca.crt");
    std::fs::write(&path, ca.cert_pem()).unwrap();
    path
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(rounds));
}

async fn run(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut nats = std::process::Command::new(nats_server())
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path().join("nats"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = CertificateAuthority::generate("bench CA").unwrap();
    let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
    let server_tls = tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &[tls::ALPN_HTTP11],
    )
    .unwrap();
    let client_tls = tls::client_config(Some(&write_ca(dir.path(), &ca)), &[]).unwrap();
    let shutdown = CancellationToken::new();
    let (a, a_stats) = replica(port, server_tls.clone(), &shutdown).await;
    let (b, b_stats) = replica(port, server_tls, &shutdown).await;
    let at = |addr: SocketAddr| {
        RelayAddress::parse(&format!("wss://localhost:{}", addr.port())).unwrap()
    };
    let (a, b) = (at(a), at(b));
    // Replica A knows B once it has heard B's heartbeat; the listener connects after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    listener(&a, client_tls.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for _ in 0..20 {
        accept_ms(&a, &client_tls).await;
        accept_ms(&b, &client_tls).await;
    }
    let (mut same, mut cross) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        same.push(accept_ms(&a, &client_tls).await);
        cross.push(accept_ms(&b, &client_tls).await);
    }
    same.sort_by(f64::total_cmp);
    cross.sort_by(f64::total_cmp);
    let (s50, c50) = (percentile(&same, 0.5), percentile(&cross, 0.5));
    println!("accept latency, sender connect to first byte ({rounds} rounds each, interleaved):");
    println!(
        "  same replica:  p50 {s50:.3} ms  p99 {:.3} ms",
        percentile(&same, 0.99)
    );
    println!(
        "  cross replica: p50 {c50:.3} ms  p99 {:.3} ms",
        percentile(&cross, 0.99)
    );
    println!(
        "  cross-replica offers add p50 {:+.3} ms (bar: at most +0.5 ms)",
        c50 - s50
    );
    println!(
        "held: replica A {} listener(s), {} rendezvous made; replica B {} listener(s), {} rendezvous made",
        a_stats.listeners(),
        a_stats.total(),
        b_stats.listeners(),
        b_stats.total()
    );
    shutdown.cancel();
    let _ = nats.kill();
    let _ = nats.wait();
}

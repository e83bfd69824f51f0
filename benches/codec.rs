//! Micro-benchmarks of the tunnel's hot pieces: SAS token mint/parse/verify (every listener
//! connect, every rendezvous and every relay accept pays for one) and the WebSocket byte
//! stream (`WsStream`) that carries every tunnelled byte, from one end's writes through a
//! relay's unmasking to the other end's reads, over in-memory duplex pipes; and
//! the cost of one TLS leg (records sealed by one side, opened by the other, in memory), the
//! figure behind the choice to keep TLS on the loopback leg between kubectl and the proxy.
//!
//! Run: `cargo bench --bench codec`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clusterconnect::tunnel::frame::{apply_mask, header_len, parse_header, write_server_header};
use clusterconnect::tunnel::protocol::RelayAddress;
use clusterconnect::tunnel::sas::{unix_now, SasKey, SasToken};
use clusterconnect::tunnel::WsStream;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

const KEY: &str =
    "SharedAccessKeyName=send;SharedAccessKey=c2VuZC1rZXktZm9yLWJlbmNoLTAxMjM0NTY3ODk=";

fn sas(c: &mut Criterion) {
    let key = SasKey::parse(KEY).expect("key");
    let address = RelayAddress::parse("wss://relay.example.com:8443").expect("address");
    let resource = address.resource_uri("edge-cluster");
    let token = key.mint(&resource, Duration::from_secs(3600));
    let hosts = vec!["relay.example.com".to_string()];
    let now = unix_now();

    let mut group = c.benchmark_group("sas");
    group.bench_function("mint", |b| {
        b.iter(|| key.mint(black_box(&resource), Duration::from_secs(3600)))
    });
    group.bench_function("parse", |b| {
        b.iter(|| SasToken::parse(black_box(token.expose())).expect("parse"))
    });
    let parsed = SasToken::parse(token.expose()).expect("parse");
    group.bench_function("verify", |b| {
        b.iter(|| black_box(&parsed).verify(&key.key, now).expect("valid"))
    });
    // What the relay does per connection: parse, check the resource, verify.
    group.bench_function("parse_covers_verify", |b| {
        b.iter(|| {
            let t = SasToken::parse(black_box(token.expose())).expect("parse");
            assert!(t.covers(&hosts, "edge-cluster"));
            t.verify(&key.key, now).expect("valid");
        })
    });
    group.finish();
}

/// What the relay does between the two ends, reduced to its work per byte: each masked frame
/// from `from` goes on to `to` unmasked, its payload through one 64 KiB buffer.
async fn unmask_frames(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut header = [0u8; 14];
    loop {
        if from.read_exact(&mut header[..2]).await.is_err() {
            break;
        }
        let need = header_len([header[0], header[1]]);
        from.read_exact(&mut header[2..need]).await.expect("header");
        let (frame, _) = parse_header(&header[..need])
            .expect("frame")
            .expect("whole");
        let key = frame.mask.expect("masked");
        let mut out = [0u8; 10];
        let n = write_server_header(&mut out, frame.fin, frame.opcode, frame.len);
        to.write_all(&out[10 - n..]).await.expect("write");
        let mut done = 0u64;
        while done < frame.len {
            let chunk = (frame.len - done).min(buf.len() as u64) as usize;
            from.read_exact(&mut buf[..chunk]).await.expect("payload");
            apply_mask(&mut buf[..chunk], key, done);
            to.write_all(&buf[..chunk]).await.expect("write");
            done += chunk as u64;
        }
        to.flush().await.expect("flush");
    }
}

/// Writes `total` bytes through one end's `WsStream`, cycling through the write sizes of
/// `pattern`, and reads them all from the other end's, a relay's unmasking between them.
/// Returns the elapsed time.
async fn ws_transfer(
    total: usize,
    pattern: &'static [usize],
    pipe: usize,
    payload: &'static [u8],
) -> Duration {
    let (a, relay_in) = tokio::io::duplex(pipe);
    let (relay_out, b) = tokio::io::duplex(pipe);
    let (mut client, mut server) = (WsStream::new(a, Vec::new()), WsStream::new(b, Vec::new()));
    let relay = tokio::spawn(unmask_frames(relay_in, relay_out));
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut left = total;
        for write_size in pattern.iter().cycle() {
            if left == 0 {
                break;
            }
            let n = left.min(*write_size);
            client.write_all(&payload[..n]).await.expect("write");
            left -= n;
        }
        client.flush().await.expect("flush");
        client.shutdown().await.expect("shutdown");
        client
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    loop {
        let n = server.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    let elapsed = started.elapsed();
    drop(writer.await.expect("writer"));
    relay.await.expect("relay");
    assert_eq!(got, total);
    elapsed
}

fn ws_stream(c: &mut Criterion) {
    const TOTAL: usize = 16 * 1024 * 1024;
    static PAYLOAD: [u8; 256 * 1024] = [0x5a; 256 * 1024];
    let runtime = Runtime::new().expect("runtime");

    let mut group = c.benchmark_group("ws_stream");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    // 64 KiB: the largest message (MAX_MESSAGE); 256 KiB writes are split at it. 16 KiB: one
    // h2 DATA frame at the default frame size. "h2_frames": what hyper's h2 would write for
    // each 16 KiB DATA frame if the transport were not vectored (WsStream is, so h2 sends the
    // 9-byte header and the payload as one write): the header with the first 1015 payload
    // bytes copied behind it, then the rest of the payload, so two frames per DATA frame.
    const CASES: [(&str, &[usize]); 4] = [
        ("16KiB_writes", &[16 * 1024]),
        ("64KiB_writes", &[64 * 1024]),
        ("256KiB_writes", &[256 * 1024]),
        ("h2_frames_1024+15369", &[1024, 16 * 1024 + 9 - 1024]),
    ];
    for (name, pattern) in CASES {
        group.bench_with_input(
            BenchmarkId::new("16MiB_duplex", name),
            &pattern,
            |b, &pattern| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total +=
                            runtime.block_on(ws_transfer(TOTAL, pattern, 256 * 1024, &PAYLOAD));
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

/// A rustls client and server of this crate's configurations, handshaken in memory.
fn tls_pair() -> (rustls::Connection, rustls::Connection) {
    use clusterconnect::tls;
    let ca = tls::CertificateAuthority::generate("bench CA").expect("CA");
    let leaf = ca.issue_server(&["127.0.0.1"]).expect("leaf");
    let server_config = tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &[tls::ALPN_H2],
    )
    .expect("server TLS");
    let roots = tls::roots_from_pem(ca.cert_pem().as_bytes()).expect("roots");
    let client_config = tls::client_config_with_roots(roots, &[]).expect("client TLS");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut client: rustls::Connection = rustls::ClientConnection::new(client_config, name)
        .expect("client")
        .into();
    let mut server: rustls::Connection = rustls::ServerConnection::new(server_config)
        .expect("server")
        .into();
    while client.is_handshaking() || server.is_handshaking() {
        move_records(&mut client, &mut server);
        move_records(&mut server, &mut client);
    }
    (client, server)
}

/// Moves what `from` has to send into `to` and lets `to` open it.
fn move_records(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("write_tls");
    }
    let mut cursor = std::io::Cursor::new(wire);
    while (cursor.position() as usize) < cursor.get_ref().len() {
        to.read_tls(&mut cursor).expect("read_tls");
        to.process_new_packets().expect("records open");
    }
}

/// One TLS leg: the server seals `size`-byte writes (a response), the client opens them, as
/// the proxy and kubectl do on the loopback leg for every response byte.
fn tls_leg(c: &mut Criterion) {
    use std::io::{Read, Write};
    let mut group = c.benchmark_group("tls_leg");
    group.sample_size(20);
    // 2 KiB: a small GET's answer; 16 KiB: a full record, as bulk data goes.
    for size in [2 * 1024, 16 * 1024] {
        let (mut client, mut server) = tls_pair();
        let payload = vec![0x5au8; size];
        let mut out = vec![0u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal_open", size), &size, |b, _| {
            b.iter(|| {
                server.writer().write_all(&payload).expect("write");
                move_records(&mut server, &mut client);
                client.reader().read_exact(&mut out).expect("read");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sas, ws_stream, tls_leg);
criterion_main!(benches);

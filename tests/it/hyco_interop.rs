//! Microsoft's own Hybrid Connections client, `hyco-ws` (Azure/azure-relay-node), as listener
//! and as sender through our relay, unchanged: the compatibility bar is that a program written
//! for Azure Relay works against clusterconnect's relay. The npm package is installed by
//! scripts/test into tests/interop/hyco (its version pinned in package-lock.json).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::kubectl::in_ci;
use crate::support::tunnel::{Relay, LISTEN_KEY, SEND_KEY};

const WITHIN: Duration = Duration::from_secs(30);

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/hyco")
}

/// Whether node and the installed hyco-ws are here; under CI their absence fails the test.
fn hyco_available() -> bool {
    let installed = interop_dir()
        .join("node_modules/hyco-ws/index.js")
        .is_file();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed && node {
        return true;
    }
    let what = "node and hyco-ws (run ./scripts/test, which runs `npm ci` in tests/interop/hyco)";
    if in_ci() {
        panic!("CI is set and {what} are missing");
    }
    eprintln!("skipping: {what} are missing");
    false
}

/// The relay's CA for node (`NODE_EXTRA_CA_CERTS`), in a directory removed with the test.
fn ca_file(relay: &Relay) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("relay-ca.pem");
    std::fs::write(&ca, &relay.ca_pem).expect("write CA for node");
    (dir, ca)
}

fn node(
    relay: &Relay,
    ca: &Path,
    script: &str,
    path: &str,
    key: (&str, &str),
    extra: &[(&str, String)],
) -> Command {
    let dir = interop_dir();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script))
        .current_dir(&dir)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env("RELAY", format!("127.0.0.1:{}", relay.addr.port()))
        .env("PATH_NAME", path)
        .env("KEY_NAME", key.0)
        .env("KEY", key.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// Starts a hyco-ws listener and waits until its control channel is open.
async fn start_listener(relay: &Relay, ca: &Path, path: &str) -> Child {
    let mut child = node(relay, ca, "listener.js", path, ("listen", LISTEN_KEY), &[])
        .spawn()
        .expect("start node");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(WITHIN, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "listening" {
                return true;
            }
        }
        false
    })
    .await;
    if ready != Ok(true) {
        let _ = child.kill().await;
        let out = child.wait_with_output().await.expect("listener output");
        panic!(
            "the hyco-ws listener did not start listening: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child
}

/// Runs the hyco-ws sender to its end and returns its JSON report.
async fn send(relay: &Relay, ca: &Path, path: &str, extra: &[(&str, String)]) -> serde_json::Value {
    let child = node(relay, ca, "sender.js", path, ("send", SEND_KEY), extra)
        .spawn()
        .expect("start node");
    let out = tokio::time::timeout(WITHIN + Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("the hyco-ws sender ends")
        .expect("sender output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hyco-ws sender failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

#[tokio::test]
async fn hyco_ws_listener_and_sender_talk_through_our_relay() {
    if !hyco_available() {
        return;
    }
    let relay = Relay::start().await;
    let (_ca_dir, ca) = ca_file(&relay);
    let mut listener = start_listener(&relay, &ca, "hyco-echo").await;

    let plain = send(&relay, &ca, "hyco-echo", &[]).await;
    assert_eq!(plain["replyOk"], true, "{plain}");

    // The subprotocol the listener picked reaches the sender in the 101, as Azure Relay does.
    let negotiated = send(
        &relay,
        &ca,
        "hyco-echo",
        &[("PROTOCOLS", "chat.v1,chat.v2".into())],
    )
    .await;
    assert_eq!(negotiated["replyOk"], true, "{negotiated}");
    assert_eq!(negotiated["protocol"], "chat.v2", "{negotiated}");

    // A message larger than any one frame of ours crosses intact both ways.
    let big = send(
        &relay,
        &ca,
        "hyco-echo",
        &[("BYTES", (3 * 1024 * 1024).to_string())],
    )
    .await;
    assert_eq!(big["replyOk"], true, "{}", big["replyBytes"]);

    let _ = listener.kill().await;
}

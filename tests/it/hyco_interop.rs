//! Microsoft's own Hybrid Connections clients (Azure/azure-relay-node), `hyco-ws` as listener
//! and as sender and `hyco-https` as HTTP listener behind node's own HTTPS requests, through our
//! relay, unchanged: the compatibility bar is that a program written for Azure Relay works
//! against clusterconnect's relay. The npm packages are installed by scripts/test into
//! tests/interop/hyco (their versions pinned in package-lock.json).

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
pub(crate) fn hyco_available() -> bool {
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
    let at = format!("127.0.0.1:{}", relay.addr.port());
    node_at(&at, ca, script, path, key, extra)
}

/// `script` against the relay at `relay` (`host:port`), trusting `ca`, with `key` (rule name
/// and key) for `path`.
pub(crate) fn node_at(
    relay: &str,
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
        .env("RELAY", relay)
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
    start_script(relay, ca, "listener.js", path).await
}

/// Starts the listener in `script` and waits until its control channel is open.
async fn start_script(relay: &Relay, ca: &Path, script: &str, path: &str) -> Child {
    listening(
        node(relay, ca, script, path, ("listen", LISTEN_KEY), &[]),
        script,
    )
    .await
}

/// Starts the listener `cmd` runs and waits until its control channel is open.
pub(crate) async fn listening(mut cmd: Command, script: &str) -> Child {
    let mut child = cmd.spawn().expect("start node");
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
            "the {script} listener did not start listening: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child
}

/// Runs the hyco-ws sender to its end and returns its JSON report.
async fn send(relay: &Relay, ca: &Path, path: &str, extra: &[(&str, String)]) -> serde_json::Value {
    run_sender(relay, ca, "sender.js", path, extra).await
}

/// Runs the sender in `script` to its end and returns its JSON report.
async fn run_sender(
    relay: &Relay,
    ca: &Path,
    script: &str,
    path: &str,
    extra: &[(&str, String)],
) -> serde_json::Value {
    finished(
        node(relay, ca, script, path, ("send", SEND_KEY), extra),
        script,
    )
    .await
}

/// Runs the sender `cmd` runs to its end and returns its JSON report.
pub(crate) async fn finished(mut cmd: Command, script: &str) -> serde_json::Value {
    let child = cmd.spawn().expect("start node");
    let out = tokio::time::timeout(WITHIN + Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("the sender ends")
        .expect("sender output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}): {stdout}{}",
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

#[tokio::test]
async fn hyco_https_listener_answers_https_requests_through_our_relay() {
    if !hyco_available() {
        return;
    }
    let relay = Relay::start().await;
    let (_ca_dir, ca) = ca_file(&relay);
    let mut listener = start_script(&relay, &ca, "https_listener.js", "hyco-http").await;
    let got = run_sender(&relay, &ca, "https_sender.js", "hyco-http", &[]).await;

    // The request as the listener saw it: method, target without sb-hc-* parameters (the rest
    // in their own encoding), the sender's headers without the relay credential or Host.
    let get = &got["get"];
    assert_eq!(get["status"], 200, "{got}");
    let seen: serde_json::Value = serde_json::from_str(get["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["method"], "GET", "{seen}");
    assert_eq!(
        seen["url"], "/hyco-http/sub/dir?foo=bar&name=hello%20world&flag",
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-custom"], "yes", "{seen}");
    for withheld in ["servicebusauthorization", "host", "connection"] {
        assert!(
            seen["headers"].get(withheld).is_none(),
            "{withheld}: {seen}"
        );
    }
    assert_eq!(get["headers"]["content-type"], "application/json", "{got}");

    // 200 KiB each way: more than the control channel's 64 KiB, so hyco-https answers over its
    // own rendezvous; the upload arrives whole and the answer (twice as long) too.
    let post = &got["post"];
    assert_eq!(post["status"], 200, "{got}");
    assert_eq!(post["headers"]["x-received"], "204800", "{got}");
    assert_eq!(post["bodyLength"], 2 * 204800, "{got}");
    assert_eq!(post["echoedTwice"], true, "{got}");

    // The listener's status and reason phrase reach the sender as it set them.
    assert_eq!(got["teapot"]["status"], 418, "{got}");
    assert_eq!(got["teapot"]["message"], "Short And Stout", "{got}");
    assert_eq!(got["teapot"]["body"], "tea", "{got}");

    // The token may come in the query instead; it is not passed on.
    let query = &got["query_token"];
    assert_eq!(query["status"], 200, "{got}");
    let seen: serde_json::Value = serde_json::from_str(query["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["url"], "/hyco-http?kept=1", "{seen}");

    // Azure Relay's refusals: a bad signature is 401, a connection nobody listens on is 502.
    assert_eq!(got["bad_token"]["status"], 401, "{got}");
    assert_eq!(got["no_listener"]["status"], 502, "{got}");

    let _ = listener.kill().await;
}

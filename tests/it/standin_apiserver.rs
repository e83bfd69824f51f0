//! The stand-in API server against the real kubectl, with no tunnel in between: proves the
//! stand-in speaks the wire protocols kubectl 1.32 uses, so tunnel tests can rely on it.

use crate::support;

use support::check::{describe, eventually, text, PROMPT};

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::spdy::{self, HeaderCompressor, HeaderDecompressor, DICTIONARY};
use support::{
    kubectl, kubectl_available, kubectl_ok, kubectl_ok_with, spawn_kubectl, ApiServer, SeenRequest,
    SERVICE_ACCOUNT,
};

/// A stand-in server plus a kubeconfig for it with the valid token.
struct Cluster {
    server: ApiServer,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let server = ApiServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = server.write_kubeconfig(dir.path(), &server.token());
        Cluster {
            server,
            kubeconfig,
            _dir: dir,
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.kubeconfig, args, &[]).await
    }

    /// [`kubectl_ok`] against this cluster: asserts success, returns stdout.
    async fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_ok(&self.kubeconfig, args).await
    }
}

#[tokio::test]
async fn kubectl_version_prints_server_version() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster.kubectl_ok(&["version"]).await;
    assert!(stdout.contains("Server Version: v1.32.0"), "{stdout}");
}

#[test]
fn spdy_dictionary_has_the_specified_length() {
    assert_eq!(DICTIONARY.len(), 1423);
}

#[test]
fn spdy_header_blocks_round_trip_through_one_zlib_context() {
    let mut compressor = HeaderCompressor::new();
    let mut decompressor = HeaderDecompressor::new();
    let blocks = [
        vec![("streamtype".to_string(), "error".to_string())],
        vec![
            ("streamtype".to_string(), "data".to_string()),
            ("port".to_string(), "8080".to_string()),
        ],
        vec![],
    ];
    for block in blocks {
        let wire = compressor.compress(&block);
        assert_eq!(decompressor.decompress(&wire).expect("decompress"), block);
    }
}

/// Lines kubectl has finished writing; a read can end mid-line.
fn full_lines(s: &str) -> impl Iterator<Item = &str> {
    s.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n'))
}

/// Polls `condition` every 20 ms for up to 30 s; tests wait on server state, never on sleeps.
#[tokio::test]
async fn get_pods_in_all_namespaces_lists_both_pods() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster.kubectl_ok(&["get", "pods", "-A"]).await;
    let header = stdout.lines().next().unwrap_or_default();
    for column in ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"] {
        assert!(header.contains(column), "{stdout}");
    }
    for (namespace, pod) in [("default", "web-0"), ("kube-system", "coredns-0")] {
        let row = stdout
            .lines()
            .find(|l| l.contains(pod))
            .unwrap_or_else(|| panic!("no row for {pod}: {}", stdout));
        assert!(row.starts_with(namespace), "{row}");
        assert!(row.contains("1/1") && row.contains("Running"), "{row}");
    }
}

#[tokio::test]
async fn get_namespaces_as_json_lists_both_namespaces() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster.kubectl_ok(&["get", "ns", "-o", "json"]).await;
    let list: Value = serde_json::from_str(&stdout).expect("kubectl printed JSON");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|ns| ns["metadata"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["default", "kube-system"]);
    assert_eq!(list["items"][0]["status"]["phase"], "Active");
}

#[tokio::test]
async fn get_pod_as_yaml_prints_the_object() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster
        .kubectl_ok(&["get", "pod", "web-0", "-o", "yaml"])
        .await;
    for expected in [
        "kind: Pod",
        "name: web-0",
        "namespace: default",
        "image: nginx:1.27",
        "phase: Running",
        "creationTimestamp:",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?}: {}",
            stdout
        );
    }
}

#[tokio::test]
async fn get_missing_pod_reports_not_found() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let out = cluster.kubectl(&["get", "pod", "nope"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("pods \"nope\" not found"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn api_resources_lists_pods_and_namespaces() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster.kubectl_ok(&["api-resources"]).await;
    let pods = stdout
        .lines()
        .find(|l| l.starts_with("pods "))
        .unwrap_or_else(|| panic!("no pods row: {}", stdout));
    assert!(pods.contains(" po ") && pods.contains("Pod"), "{pods}");
    assert!(stdout
        .lines()
        .any(|l| l.starts_with("namespaces ") && l.contains(" ns ")));
}

/// kubectl's HTTP version for ordinary requests; client-go's `DISABLE_HTTP2` forces HTTP/1.1,
/// as a proxy in front of the stand-in might.
#[derive(Clone, Copy, Debug)]
enum Http {
    Two,
    One,
}

impl Http {
    fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Http::Two => vec![],
            Http::One => vec![("DISABLE_HTTP2", "1")],
        }
    }

    fn version(self) -> http::Version {
        match self {
            Http::Two => http::Version::HTTP_2,
            Http::One => http::Version::HTTP_11,
        }
    }
}

async fn watch_sees_added_pod(http: Http) {
    let cluster = Cluster::start().await;
    let mut watch = spawn_kubectl(
        &cluster.kubeconfig,
        &["get", "pods", "-w"],
        &http.env(),
        false,
    );
    watch
        .read_stdout_until(PROMPT, |s| s.contains("web-0"))
        .await
        .expect("initial list");
    eventually("the watch is open", || cluster.server.open_watches() > 0).await;
    cluster.server.add_pod("default", "web-1");
    let seen = watch
        .read_stdout_until(PROMPT, |s| full_lines(s).any(|l| l.contains("web-1")))
        .await;
    let out = watch.kill().await;
    let seen = seen.unwrap_or_else(|_| panic!("web-1 never printed: {}", describe(&out)));
    let row = seen.lines().find(|l| l.contains("web-1")).expect("row");
    assert!(row.contains("Running"), "{row}");
    // The server notices the client went away and forgets the watch.
    eventually("the watch is closed", || cluster.server.open_watches() == 0).await;
    let requests = cluster.server.requests();
    let watch_request = requests
        .iter()
        .find(|r| r.path_and_query.contains("watch=true"))
        .expect("watch request");
    assert_eq!(watch_request.version, http.version());
}

#[tokio::test]
async fn watch_prints_a_pod_added_after_it_started_over_http2() {
    if kubectl_available() {
        watch_sees_added_pod(Http::Two).await;
    }
}

#[tokio::test]
async fn watch_prints_a_pod_added_after_it_started_over_http1() {
    if kubectl_available() {
        watch_sees_added_pod(Http::One).await;
    }
}

#[tokio::test]
async fn watch_reports_deleted_pods() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let args = ["get", "pods", "-A", "-w", "--output-watch-events"];
    let mut watch = spawn_kubectl(&cluster.kubeconfig, &args, &[], false);
    watch
        .read_stdout_until(PROMPT, |s| s.contains("coredns-0"))
        .await
        .expect("initial events");
    eventually("the watch is open", || cluster.server.open_watches() > 0).await;
    cluster.server.delete_pod("kube-system", "coredns-0");
    let seen = watch
        .read_stdout_until(PROMPT, |s| full_lines(s).any(|l| l.starts_with("DELETED")))
        .await;
    let out = watch.kill().await;
    let seen = seen.unwrap_or_else(|_| panic!("no DELETED event: {}", describe(&out)));
    let deleted = seen
        .lines()
        .find(|l| l.starts_with("DELETED"))
        .expect("row");
    assert!(
        deleted.contains("kube-system") && deleted.contains("coredns-0"),
        "{deleted}"
    );
}

async fn logs_follow_sees_appended_line(http: Http) {
    let cluster = Cluster::start().await;
    let mut logs = spawn_kubectl(
        &cluster.kubeconfig,
        &["logs", "-f", "web-0"],
        &http.env(),
        false,
    );
    logs.read_stdout_until(PROMPT, |s| s.contains("ready\n"))
        .await
        .expect("existing lines");
    eventually("the log follow is open", || {
        cluster.server.open_log_follows() > 0
    })
    .await;
    cluster
        .server
        .append_log("default", "web-0", "GET /healthz 200");
    let seen = logs
        .read_stdout_until(PROMPT, |s| s.contains("GET /healthz 200\n"))
        .await;
    let out = logs.kill().await;
    let seen = seen.unwrap_or_else(|_| panic!("appended line never printed: {}", describe(&out)));
    assert_eq!(seen, "listening on :8080\nready\nGET /healthz 200\n");
    eventually("the log follow is closed", || {
        cluster.server.open_log_follows() == 0
    })
    .await;
}

#[tokio::test]
async fn logs_follow_prints_an_appended_line_over_http2() {
    if kubectl_available() {
        logs_follow_sees_appended_line(Http::Two).await;
    }
}

#[tokio::test]
async fn logs_follow_prints_an_appended_line_over_http1() {
    if kubectl_available() {
        logs_follow_sees_appended_line(Http::One).await;
    }
}

#[tokio::test]
async fn logs_print_existing_lines() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let stdout = cluster.kubectl_ok(&["logs", "web-0", "--tail", "1"]).await;
    assert_eq!(stdout, "ready\n");
}

/// How kubectl carries exec/attach and port-forward, chosen through its environment switches.
#[derive(Clone, Copy, Debug)]
enum Transport {
    WebSocket,
    Spdy,
}

impl Transport {
    fn exec_env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Transport::WebSocket => vec![],
            Transport::Spdy => vec![("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
        }
    }

    fn port_forward_env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Transport::WebSocket => vec![],
            Transport::Spdy => vec![("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")],
        }
    }

    /// Every request to the subresource used this transport (so kubectl did not quietly fall
    /// back from WebSocket to SPDY), and there was at least one.
    fn assert_used(self, requests: &[SeenRequest], subresource: &str) {
        let upgrades: Vec<String> = requests
            .iter()
            .filter(|r| r.path_and_query.contains(subresource))
            .map(|r| {
                r.headers
                    .get("upgrade")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_ascii_lowercase()
            })
            .collect();
        let expected = match self {
            Transport::WebSocket => "websocket",
            Transport::Spdy => "spdy/3.1",
        };
        assert!(!upgrades.is_empty(), "no request to {subresource}");
        assert!(
            upgrades.iter().all(|u| u == expected),
            "{subresource} upgrades {upgrades:?}, expected only {expected}"
        );
    }
}

async fn exec_echo(transport: Transport) {
    let cluster = Cluster::start().await;
    let env = transport.exec_env();
    let stdout = kubectl_ok_with(
        &cluster.kubeconfig,
        &["exec", "web-0", "--", "echo", "hi"],
        &env,
    )
    .await;
    assert_eq!(stdout, "hi\n", "{stdout}");
    transport.assert_used(&cluster.server.requests(), "/pods/web-0/exec");
}

async fn exec_cat_round_trips_stdin(transport: Transport) {
    let cluster = Cluster::start().await;
    let env = transport.exec_env();
    let mut cat = spawn_kubectl(
        &cluster.kubeconfig,
        &["exec", "-i", "web-0", "--", "cat"],
        &env,
        true,
    );
    cat.write_stdin(b"first line\n").await.expect("write stdin");
    cat.read_stdout_until(PROMPT, |s| s.contains("first line\n"))
        .await
        .expect("first line echoed");
    cat.write_stdin(b"second line\n")
        .await
        .expect("write stdin");
    let out = cat.finish(PROMPT).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "first line\nsecond line\n");
    transport.assert_used(&cluster.server.requests(), "/pods/web-0/exec");
}

async fn exec_exit_code_propagates(transport: Transport) {
    let cluster = Cluster::start().await;
    let env = transport.exec_env();
    let out = kubectl(
        &cluster.kubeconfig,
        &["exec", "web-0", "--", "sh", "-c", "exit 7"],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    transport.assert_used(&cluster.server.requests(), "/pods/web-0/exec");
}

#[tokio::test]
async fn exec_echo_over_websocket() {
    if kubectl_available() {
        exec_echo(Transport::WebSocket).await;
    }
}

#[tokio::test]
async fn exec_echo_over_spdy() {
    if kubectl_available() {
        exec_echo(Transport::Spdy).await;
    }
}

#[tokio::test]
async fn exec_stdin_over_websocket() {
    if kubectl_available() {
        exec_cat_round_trips_stdin(Transport::WebSocket).await;
    }
}

#[tokio::test]
async fn exec_stdin_over_spdy() {
    if kubectl_available() {
        exec_cat_round_trips_stdin(Transport::Spdy).await;
    }
}

#[tokio::test]
async fn exec_exit_code_over_websocket() {
    if kubectl_available() {
        exec_exit_code_propagates(Transport::WebSocket).await;
    }
}

#[tokio::test]
async fn exec_exit_code_over_spdy() {
    if kubectl_available() {
        exec_exit_code_propagates(Transport::Spdy).await;
    }
}

#[tokio::test]
async fn exec_unknown_command_exits_127_with_a_message() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let out = cluster
        .kubectl(&["exec", "web-0", "--", "frobnicate"])
        .await;
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("frobnicate: command not found"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn attach_round_trips_stdin() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut attach = spawn_kubectl(&cluster.kubeconfig, &["attach", "-i", "web-0"], &[], true);
    attach
        .write_stdin(b"attached\n")
        .await
        .expect("write stdin");
    attach
        .read_stdout_until(PROMPT, |s| s.contains("attached\n"))
        .await
        .expect("stdin echoed");
    let out = attach.finish(PROMPT).await;
    assert!(out.status.success(), "{}", describe(&out));
    Transport::WebSocket.assert_used(&cluster.server.requests(), "/pods/web-0/attach");
}

async fn port_forward_echoes(transport: Transport) {
    let cluster = Cluster::start().await;
    let env = transport.port_forward_env();
    let mut forward = spawn_kubectl(
        &cluster.kubeconfig,
        &["port-forward", "pod/web-0", ":8080"],
        &env,
        false,
    );
    let announced = forward
        .read_stdout_until(PROMPT, |s| {
            full_lines(s)
                .any(|l| l.starts_with("Forwarding from 127.0.0.1:") && l.ends_with("-> 8080"))
        })
        .await;
    let announced = match announced {
        Ok(text) => text,
        Err(_) => panic!("no forwarding line: {}", describe(&forward.kill().await)),
    };
    let port: u16 = announced
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("local port");

    // Two connections in turn: each becomes its own pair of SPDY streams.
    for message in [&b"hello through the pod"[..], &[7u8; 100_000][..]] {
        let exchange = async {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            conn.write_all(message).await?;
            let mut echoed = vec![0u8; message.len()];
            conn.read_exact(&mut echoed).await?;
            conn.shutdown().await?;
            Ok::<_, std::io::Error>(echoed)
        };
        let echoed = tokio::time::timeout(PROMPT, exchange).await;
        match echoed {
            Ok(Ok(echoed)) => assert!(echoed == message, "echo differs"),
            other => panic!(
                "echo failed: {other:?}: {}",
                describe(&forward.kill().await)
            ),
        }
    }
    forward.kill().await;
    transport.assert_used(&cluster.server.requests(), "/pods/web-0/portforward");
}

#[tokio::test]
async fn port_forward_over_websocket() {
    if kubectl_available() {
        port_forward_echoes(Transport::WebSocket).await;
    }
}

#[tokio::test]
async fn port_forward_over_spdy() {
    if kubectl_available() {
        port_forward_echoes(Transport::Spdy).await;
    }
}

#[tokio::test]
async fn wrong_token_is_unauthorized() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = cluster.server.write_kubeconfig(dir.path(), "not-the-token");
    let out = kubectl(&kubeconfig, &["get", "pods"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("You must be logged in to the server"),
        "{}",
        describe(&out)
    );
    let requests = cluster.server.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.user, None);
        assert_eq!(request.headers["authorization"], "Bearer not-the-token");
    }
}

#[tokio::test]
async fn requests_are_recorded_with_token_identity_and_http2() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    cluster.kubectl_ok(&["get", "pods"]).await;
    let requests = cluster.server.requests();
    let list = requests
        .iter()
        .find(|r| {
            r.method == "GET"
                && r.path_and_query
                    .starts_with("/api/v1/namespaces/default/pods")
        })
        .unwrap_or_else(|| panic!("no pod list among {requests:#?}"));
    assert_eq!(list.version, http::Version::HTTP_2);
    let bearer = format!("Bearer {}", cluster.server.token());
    assert_eq!(list.headers["authorization"], bearer.as_str());
    assert_eq!(list.user.as_deref(), Some(SERVICE_ACCOUNT));
    assert!(list.headers["accept"]
        .to_str()
        .unwrap()
        .contains("as=Table"));
}

#[tokio::test]
async fn impersonation_is_recorded_and_reported() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    // Only the agent's account may impersonate.
    let agent_dir = tempfile::tempdir().expect("temp dir");
    let agent_kubeconfig = cluster
        .server
        .write_kubeconfig(agent_dir.path(), &cluster.server.agent_token());
    let stdout = kubectl_ok(
        &agent_kubeconfig,
        &[
            "auth",
            "whoami",
            "--as",
            "alice",
            "--as-group",
            "devs",
            "-o",
            "json",
        ],
    )
    .await;
    let review: Value = serde_json::from_str(&stdout).expect("kubectl printed JSON");
    assert_eq!(review["status"]["userInfo"]["username"], "alice");
    let groups = review["status"]["userInfo"]["groups"]
        .as_array()
        .expect("groups");
    assert!(groups.iter().any(|g| g == "devs"), "{groups:?}");
    let requests = cluster.server.requests();
    let review_request = requests
        .iter()
        .find(|r| r.path_and_query.contains("selfsubjectreviews"))
        .expect("review request");
    assert_eq!(review_request.headers["impersonate-user"], "alice");
    assert_eq!(review_request.headers["impersonate-group"], "devs");
    assert_eq!(review_request.user.as_deref(), Some("alice"));
    assert!(review_request.groups.iter().any(|g| g == "devs"));
}

#[tokio::test]
async fn the_tester_account_may_not_impersonate() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let out = cluster
        .kubectl(&[
            "get",
            "--raw",
            "/api/v1/namespaces/default/pods",
            "--as",
            "alice",
        ])
        .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(&format!(
            "users \"alice\" is forbidden: User \"{SERVICE_ACCOUNT}\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"
        )),
        "{}",
        describe(&out)
    );
    let requests = cluster.server.requests();
    // kubectl's discovery requests already carry the impersonation and are refused.
    let refused = requests
        .iter()
        .find(|r| r.headers.contains_key("impersonate-user"))
        .expect("an impersonating request");
    assert_eq!(refused.user.as_deref(), Some(SERVICE_ACCOUNT));
}

#[tokio::test]
async fn dropping_the_server_ends_open_streams() {
    if !kubectl_available() {
        return;
    }
    let cluster = Cluster::start().await;
    let watch = spawn_kubectl(&cluster.kubeconfig, &["get", "pods", "-w"], &[], false);
    eventually("the watch is open", || cluster.server.open_watches() > 0).await;
    let Cluster {
        server,
        kubeconfig: _k,
        _dir,
    } = cluster;
    drop(server);
    // kubectl's watch ends with the connection; it exits instead of hanging.
    let out = watch.finish(PROMPT).await;
    assert!(out.status.code().is_some(), "{}", describe(&out));
}

async fn next_frame<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> spdy::Frame {
    tokio::time::timeout(Duration::from_secs(5), spdy::read_frame(reader))
        .await
        .expect("a frame in time")
        .expect("readable")
        .expect("not at end of stream")
}

fn syn_stream(id: u32, streamtype: &str, compressor: &mut HeaderCompressor) -> Vec<u8> {
    let headers = [
        ("streamtype", streamtype),
        ("port", "8080"),
        ("requestid", "0"),
    ]
    .map(|(n, v)| (n.to_string(), v.to_string()));
    let mut payload = id.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0; 6]); // associated stream, priority, slot
    payload.extend(compressor.compress(&headers));
    spdy::control_frame(spdy::SYN_STREAM, 0, &payload)
}

/// A hand-driven SPDY client over an in-memory pipe covers what a short kubectl run does not
/// reliably exercise: PING, a stray RST_STREAM, and the FIN pairing of data and error streams.
#[tokio::test]
async fn spdy_port_forward_session_over_raw_frames() {
    let (client, server) = tokio::io::duplex(1 << 16);
    let session = tokio::spawn(support::portforward::serve(server));
    let (mut reader, mut writer) = tokio::io::split(client);
    let mut compressor = HeaderCompressor::new();
    let mut decompressor = HeaderDecompressor::new();

    for (id, streamtype) in [(1u32, "error"), (3, "data")] {
        writer
            .write_all(&syn_stream(id, streamtype, &mut compressor))
            .await
            .unwrap();
        match next_frame(&mut reader).await {
            spdy::Frame::Control {
                kind: spdy::SYN_REPLY,
                payload,
                ..
            } => {
                assert_eq!(payload[..4], id.to_be_bytes());
                assert_eq!(decompressor.decompress(&payload[4..]).unwrap(), vec![]);
            }
            other => panic!("expected SYN_REPLY for {id}, got {other:?}"),
        }
    }

    let ping = spdy::control_frame(spdy::PING, 0, &7u32.to_be_bytes());
    writer.write_all(&ping).await.unwrap();
    match next_frame(&mut reader).await {
        spdy::Frame::Control {
            kind: spdy::PING,
            payload,
            ..
        } => assert_eq!(payload[..], 7u32.to_be_bytes()),
        other => panic!("expected PING, got {other:?}"),
    }

    let stray_reset = spdy::control_frame(spdy::RST_STREAM, 0, &[0, 0, 0, 99, 0, 0, 0, 5]);
    writer.write_all(&stray_reset).await.unwrap();
    let mut frames = bytes::BytesMut::new();
    spdy::data_frame(&mut frames, 3, false, b"abc");
    spdy::data_frame(&mut frames, 3, true, b"");
    writer.write_all(&frames).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        match next_frame(&mut reader).await {
            spdy::Frame::Data {
                stream_id,
                flags,
                payload,
            } => seen.push((stream_id, flags & spdy::FLAG_FIN != 0, payload.to_vec())),
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            (3, false, b"abc".to_vec()),
            (3, true, vec![]),
            (1, true, vec![]),
        ]
    );

    drop((reader, writer));
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .expect("the session ends when the client goes away")
        .unwrap();
}

//! The agent's audit log (`agent --audit-log`): real kubectl through the relay, agent and proxy
//! binaries to the stand-in apiserver, then the lines the agent wrote.

use crate::support;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use support::check::{describe, eventually, PROMPT};
use support::processes::{logs, start_agent_with, start_proxy, start_relay};
use support::{kubectl, kubectl_available, kubectl_ok, spawn_kubectl, ApiServer, SERVICE_ACCOUNT};

const CONNECTION: &str = "audited-cluster";

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn find(lines: &[Value], what: impl Fn(&Value) -> bool) -> Option<&Value> {
    lines.iter().find(|l| what(l))
}

/// Stand-in apiserver, relay, an agent writing `audit.log` (with `agent_flags` more) and a
/// proxy with the tester's token, whose kubeconfig is `kubeconfig`.
struct Setup {
    api: ApiServer,
    dir: tempfile::TempDir,
    relay: support::processes::RelayProcess,
    agent: support::processes::Process,
    _proxy: support::processes::Process,
    audit_log: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
}

impl Setup {
    async fn start(
        agent_token: Option<&str>,
        agent_flags: &[&OsStr],
        envs: &[(&str, &OsStr)],
    ) -> Setup {
        let api = ApiServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (relay_dir, agent_dir) = (dir.path().join("relay"), dir.path().join("agent"));
        for d in [&relay_dir, &agent_dir] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let relay = start_relay(&relay_dir).await;
        let own = agent_token.map_or_else(|| api.agent_token(), String::from);
        let agent_kubeconfig = api.write_kubeconfig(&agent_dir, &own);
        let audit_log = agent_dir.join("audit.log");
        let mut flags = vec![OsStr::new("--audit-log"), audit_log.as_os_str()];
        flags.extend_from_slice(agent_flags);
        let agent = start_agent_with(&relay, &agent_kubeconfig, CONNECTION, &flags, envs).await;
        let kubeconfig = dir.path().join("kubeconfig");
        let (proxy, _) = start_proxy(
            &relay,
            CONNECTION,
            &api.token(),
            &kubeconfig,
            &dir.path().join("proxy"),
        )
        .await;
        Setup {
            api,
            dir,
            relay,
            agent,
            _proxy: proxy,
            audit_log,
            kubeconfig,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_for_get_watch_exec_and_a_refused_request() {
    if !kubectl_available() {
        return;
    }
    // The agent's own token makes the TokenReviews; at debug, the agent logs each request it
    // forwards, within its spans.
    let Setup {
        api,
        dir,
        relay,
        agent,
        _proxy,
        audit_log,
        kubeconfig,
    } = Setup::start(
        None,
        &[],
        &[("RUST_LOG", OsStr::new("info,clusterconnect=debug"))],
    )
    .await;
    let bad_kubeconfig = dir.path().join("bad-kubeconfig");
    let (_bad_proxy, _) = start_proxy(
        &relay,
        CONNECTION,
        "not-the-token",
        &bad_kubeconfig,
        &dir.path().join("bad-proxy"),
    )
    .await;

    let stdout = kubectl_ok(&kubeconfig, &["get", "pods", "-A"]).await;
    assert!(stdout.contains("web-0"), "{stdout}");

    let mut watch = spawn_kubectl(&kubeconfig, &["get", "pods", "-w"], &[], false);
    eventually("the watch reaches the apiserver", || api.open_watches() > 0).await;
    api.add_pod("default", "watched-arrival");
    let seen = watch
        .read_stdout_until(PROMPT, |out| out.contains("watched-arrival"))
        .await;
    let out = watch.kill().await;
    assert!(seen.is_ok(), "{}", describe(&out));

    let stdout = kubectl_ok(&kubeconfig, &["exec", "web-0", "--", "echo", "hi"]).await;
    assert_eq!(stdout, "hi\n");

    let out = kubectl(&bad_kubeconfig, &["get", "pods"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));

    // Lines are written when a request's answer ends: the watch's when kubectl went away, the
    // session's when exec finished.
    let done = |lines: &[Value]| {
        let has = |event: &str, verb: &str| {
            lines
                .iter()
                .any(|l| l["event"] == event && l["verb"] == verb)
        };
        has("request", "list")
            && has("request", "watch")
            && has("session_start", "exec")
            && has("session_end", "exec")
            && lines.iter().any(|l| l["status"] == 401)
    };
    eventually("the audit log has every line", || done(&lines(&audit_log))).await;
    let text = std::fs::read_to_string(&audit_log).expect("read audit log");
    let lines = lines(&audit_log);

    for token in [api.token(), api.agent_token(), "not-the-token".to_string()] {
        assert!(
            !text.contains(&token),
            "a token is in the audit log:\n{text}"
        );
    }
    let seen = api.requests();
    for line in &lines {
        assert_eq!(line["cluster"], CONNECTION, "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(line["duration_ms"].is_u64(), "{line}");
        let path = line["path"].as_str().expect("path");
        assert!(!path.contains('?'), "{line}");
        // The id the apiserver kept as its audit id, for every request it saw.
        let id = line["request_id"].as_str().expect("request_id");
        if line["status"] != 0 {
            assert!(
                seen.iter().any(|r| r
                    .headers
                    .get("audit-id")
                    .is_some_and(|v| v.to_str().ok() == Some(id))),
                "no apiserver request has the audit id of {line}"
            );
        }
    }

    let tester = |l: &Value| {
        l["user"] == SERVICE_ACCOUNT
            && l["credential"] == "service-account"
            && l["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g == "system:serviceaccounts"))
    };
    let list = find(&lines, |l| {
        l["verb"] == "list" && l["path"] == "/api/v1/pods"
    })
    .unwrap_or_else(|| panic!("no line for the list:\n{text}"));
    assert!(tester(list), "{list}");
    assert_eq!(list["event"], "request");
    assert_eq!(list["status"], 200);
    assert!(list["bytes_out"].as_u64() > Some(0), "{list}");
    assert_eq!(list["bytes_in"], 0);

    let watch = find(&lines, |l| l["verb"] == "watch")
        .unwrap_or_else(|| panic!("no line for the watch:\n{text}"));
    assert!(tester(watch), "{watch}");
    assert_eq!(watch["path"], "/api/v1/namespaces/default/pods");
    assert_eq!(watch["status"], 200);
    assert!(watch["bytes_out"].as_u64() > Some(0), "{watch}");

    let start = find(&lines, |l| l["event"] == "session_start")
        .unwrap_or_else(|| panic!("no session start:\n{text}"));
    let end = find(&lines, |l| l["event"] == "session_end")
        .unwrap_or_else(|| panic!("no session end:\n{text}"));
    for l in [start, end] {
        assert!(tester(l), "{l}");
        assert_eq!(l["verb"], "exec");
        assert_eq!(l["path"], "/api/v1/namespaces/default/pods/web-0/exec");
        assert_eq!(l["status"], 101);
    }
    assert_eq!(start["request_id"], end["request_id"]);
    // "hi" and the exit status came back; the client's side of the protocol went up.
    assert!(end["bytes_out"].as_u64() > Some(2), "{end}");
    assert!(end["bytes_in"].as_u64() > Some(0), "{end}");

    let refused = find(&lines, |l| l["status"] == 401)
        .unwrap_or_else(|| panic!("no line for the refused request:\n{text}"));
    assert_eq!(refused["user"], Value::Null, "{refused}");
    assert_eq!(refused["credential"], "bearer", "{refused}");

    // The agent's log joins the line: the request's span has its id, method and path (no
    // query), inside the span of the rendezvous that carried it, keyed by the relay's id.
    let forwarded = logs(&agent.output(), "forwarded");
    let record = forwarded
        .iter()
        .find(|r| r["span"]["request_id"] == list["request_id"])
        .unwrap_or_else(|| panic!("no agent log record for {list}:\n{}", agent.output()));
    assert_eq!(record["span"]["name"], "request");
    assert_eq!(record["span"]["cluster"], CONNECTION);
    assert_eq!(record["span"]["method"], "GET");
    assert_eq!(record["span"]["path"], "/api/v1/pods");
    let rendezvous = record["span"]["sb_hc_id"].as_str().expect("sb_hc_id");
    assert!(rendezvous.contains('_'), "the relay's suffix: {rendezvous}");
    assert!(
        record["spans"].as_array().is_some_and(|spans| spans
            .iter()
            .any(|s| s["name"] == "rendezvous" && s["sb_hc_id"] == rendezvous)),
        "{record}"
    );

    // Many requests with the tester's token (discovery, list, watch, exec): one review. A
    // token the apiserver refused (401) costs none: garbage tokens cannot make the agent
    // flood the apiserver with reviews.
    assert_eq!(api.token_reviews(&api.token()), 1);
    assert_eq!(api.token_reviews("not-the-token"), 0);
}

/// An agent whose drain period ends with a watch and an exec session still open closes them
/// and writes their lines before it exits: a restart loses nothing from the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_drain_period_cuts_is_still_on_record() {
    if !kubectl_available() {
        return;
    }
    let Setup {
        api,
        dir: _dir,
        relay: _relay,
        mut agent,
        _proxy,
        audit_log,
        kubeconfig,
    } = Setup::start(
        Some("agent-has-no-say"),
        &[OsStr::new("--drain-timeout"), OsStr::new("1s")],
        &[],
    )
    .await;
    let watch = spawn_kubectl(&kubeconfig, &["get", "pods", "-w"], &[], false);
    let mut cat = spawn_kubectl(
        &kubeconfig,
        &["exec", "-i", "web-0", "--", "cat"],
        &[],
        true,
    );
    cat.write_stdin(b"on record\n").await.expect("stdin");
    cat.read_stdout_until(Duration::from_secs(20), |t| t.contains("on record"))
        .await
        .unwrap_or_else(|seen| panic!("exec did not echo; it printed:\n{seen}"));
    eventually("the watch reaches the apiserver", || api.open_watches() > 0).await;

    agent.terminate();
    let status = agent.wait(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "agent: {status:?}\n{}",
        agent.output()
    );
    let _ = watch.kill().await;
    let _ = cat.kill().await;
    let lines = lines(&audit_log);
    assert!(
        find(&lines, |l| l["verb"] == "watch" && l["event"] == "request").is_some(),
        "no line for the watch the drain cut: {lines:#?}"
    );
    assert!(
        find(&lines, |l| l["verb"] == "exec"
            && l["event"] == "session_end")
        .is_some(),
        "no end line for the exec session the drain cut: {lines:#?}"
    );
}

//! Prometheus metrics of the real binaries: relay, agent and proxy started with
//! `--metrics-addr` on a free port, the real kubectl through them, every `/metrics` scraped
//! over HTTP, parsed, and its counters checked against the traffic that was made.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support;
use support::check::{describe, eventually, PROMPT};
use support::processes::{
    agent_args, proxy_args, proxy_port, run_to_end, spawn, Process, RelayProcess, RELAY_TOML,
    START_TIMEOUT, TOKEN_FILE_NAME,
};
use support::{kubectl, kubectl_available, kubectl_ok, spawn_kubectl, ApiServer};

const CONNECTION: &str = "metrics-cluster";

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: its content type and samples.
#[derive(Debug)]
struct Scrape {
    content_type: String,
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// The sum of `name`'s samples that carry every label in `with` (any other labels
    /// summed over); 0 when there are none.
    fn value(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// Parses the text exposition format (OpenMetrics or Prometheus 0.0.4): comments skipped,
/// label values unescaped.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = value.parse().map_err(|_| format!("bad value in: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels: {line}"))?;
                (name.to_string(), parse_labels(body)?)
            }
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name: {line}"));
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(samples)
}

fn parse_labels(body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return Ok(labels);
        }
        if chars.next() != Some('"') {
            return Err(format!("label {key} without a quoted value: {body}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return Err(format!("dangling escape: {body}")),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated value: {body}")),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// `GET path` over plain HTTP/1.1; the status line, headers and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(PROMPT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8(answer).expect("UTF-8");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a header block");
    (head.to_string(), body.to_string())
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    // hyper answers with a Content-Length, never chunked, for a full body.
    let samples = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    Scrape {
        content_type,
        samples,
        text: body,
    }
}

/// Scrapes until `ok` holds (the counters move as the traffic is served, not before kubectl
/// returns), then returns that scrape; fails with the last one after 30 s.
async fn scrape_until(addr: SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = scrape(addr).await;
    for _ in 0..300 {
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = scrape(addr).await;
    }
    panic!(
        "timed out waiting until {what}; last scrape:\n{}",
        last.text
    );
}

/// The address in a process's "metrics listening" record.
async fn metrics_addr(process: &Process, role: &str) -> SocketAddr {
    let record = match process
        .wait_for_log(START_TIMEOUT, "metrics listening")
        .await
    {
        Ok(r) => r,
        Err(out) => panic!("{role} did not serve metrics:\n{out}"),
    };
    record["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{role}'s metrics record has no address: {record}"))
}

fn with_metrics(mut args: Vec<OsString>) -> Vec<OsString> {
    args.extend(["--metrics-addr", "127.0.0.1:0"].map(OsString::from));
    args
}

/// `relay --dev-self-signed` on 127.0.0.1:0 with metrics on.
async fn start_relay(dir: &Path) -> (RelayProcess, SocketAddr) {
    let config = dir.join("relay.toml");
    std::fs::write(&config, RELAY_TOML).expect("write relay.toml");
    let args = [
        OsStr::new("relay"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--dev-self-signed"),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]
    .map(OsString::from)
    .to_vec();
    let process = spawn(&with_metrics(args), &[]);
    let record = match process.wait_for_log(START_TIMEOUT, "relay listening").await {
        Ok(r) => r,
        Err(out) => panic!("relay did not start listening:\n{out}"),
    };
    let addr: SocketAddr = record["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("relay address");
    let metrics = metrics_addr(&process, "relay").await;
    let relay = RelayProcess {
        process,
        url: format!("wss://127.0.0.1:{}", addr.port()),
        ca_path: dir.join("relay-dev-ca.crt"),
        listen_key: dir.join("listen.key"),
        send_key: dir.join("send.key"),
    };
    (relay, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_real_kubectl_traffic_on_every_role() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay_dir, agent_dir, user_dir, config_dir) = (
        dir.path().join("relay"),
        dir.path().join("agent"),
        dir.path().join("user"),
        dir.path().join("proxy-config"),
    );
    for d in [&relay_dir, &agent_dir, &user_dir, &config_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }

    let (relay, relay_metrics) = start_relay(&relay_dir).await;
    // Off unless asked: other paths are not served.
    let (head, _) = http_get(relay_metrics, "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "agent-has-no-say");
    let agent = spawn(
        &with_metrics(agent_args(
            &relay,
            &agent_kubeconfig,
            CONNECTION,
            &relay.listen_key,
        )),
        &[],
    );
    let agent_metrics = metrics_addr(&agent, "agent").await;
    // Both of the agent's control channels, as each side counts them.
    scrape_until(agent_metrics, "the agent has two listeners", |s| {
        s.value("clusterconnect_agent_listeners", &[]) == 2.0
    })
    .await;
    let relay_start = scrape_until(relay_metrics, "the relay has two listeners", |s| {
        s.value("clusterconnect_relay_listeners", &[]) == 2.0
    })
    .await;
    assert!(
        relay_start
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        relay_start.content_type
    );

    let token_file = config_dir.join(TOKEN_FILE_NAME);
    std::fs::write(&token_file, api.token()).expect("write the token file");
    let kubeconfig = user_dir.join("config");
    let proxy = spawn(
        &with_metrics(proxy_args(
            &relay,
            CONNECTION,
            &relay.send_key,
            &token_file,
            0,
            &kubeconfig,
        )),
        &[("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str())],
    );
    if let Err(out) = proxy
        .wait_for(START_TIMEOUT, |text| proxy_port(text).is_some())
        .await
    {
        panic!("proxy did not start listening:\n{out}");
    }
    let proxy_metrics = metrics_addr(&proxy, "proxy").await;

    let relay_before = scrape(relay_metrics).await;
    let agent_before = scrape(agent_metrics).await;
    let proxy_before = scrape(proxy_metrics).await;

    // Traffic: a list, three gets, a watch, an exec session.
    const GETS: f64 = 3.0;
    let listed = kubectl_ok(&kubeconfig, &["get", "pods", "-A"]).await;
    assert!(listed.contains("web-0"), "{listed}");
    for _ in 0..GETS as usize {
        kubectl_ok(&kubeconfig, &["get", "pod", "web-0", "-n", "default"]).await;
    }
    let watch = spawn_kubectl(&kubeconfig, &["get", "pods", "-w"], &[], false);
    eventually("the watch reaches the apiserver", || api.open_watches() > 0).await;
    let echoed = kubectl_ok(&kubeconfig, &["exec", "web-0", "--", "echo", "hi"]).await;
    assert!(echoed.contains("hi"), "{echoed}");

    // Refused: a token that is not the kubeconfig's, at the proxy; a send with a key whose
    // rule has no Send right, at the relay.
    let refused = kubectl(&kubeconfig, &["--token", "not-ours", "get", "pods"], &[]).await;
    assert!(!refused.status.success(), "{}", describe(&refused));
    let wrong_send = run_to_end(
        &proxy_args(
            &relay,
            CONNECTION,
            &relay.listen_key,
            &token_file,
            0,
            &dir.path().join("unused-kubeconfig"),
        ),
        &[("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str())],
        START_TIMEOUT,
    )
    .await;
    assert!(!wrong_send.status.success(), "{}", describe(&wrong_send));

    let grew = |after: &Scrape, before: &Scrape, name: &str, with: &[(&str, &str)]| {
        after.value(name, with) - before.value(name, with)
    };

    let agent_after = scrape_until(agent_metrics, "the agent counted the traffic", |s| {
        let requests = "clusterconnect_agent_requests_total";
        grew(
            s,
            &agent_before,
            requests,
            &[("verb", "get"), ("code", "2xx")],
        ) >= GETS
            && grew(
                s,
                &agent_before,
                requests,
                &[("verb", "list"), ("code", "2xx")],
            ) >= 1.0
            && grew(s, &agent_before, requests, &[("verb", "watch")]) >= 1.0
            && grew(
                s,
                &agent_before,
                "clusterconnect_agent_sessions_total",
                &[("kind", "exec")],
            ) >= 1.0
    })
    .await;
    for direction in ["received", "sent"] {
        assert!(
            grew(
                &agent_after,
                &agent_before,
                "clusterconnect_agent_bytes_total",
                &[("direction", direction)]
            ) > 0.0,
            "{direction}:\n{}",
            agent_after.text
        );
    }
    assert_eq!(
        agent_after.value("clusterconnect_agent_listeners", &[]),
        2.0
    );
    // The pooled tunnel and the watch's own are open now.
    assert!(
        agent_after.value("clusterconnect_agent_tunnels", &[]) >= 1.0,
        "{}",
        agent_after.text
    );

    let proxy_after = scrape_until(proxy_metrics, "the proxy counted the traffic", |s| {
        let requests = "clusterconnect_proxy_requests_total";
        grew(
            s,
            &proxy_before,
            requests,
            &[("verb", "get"), ("code", "2xx")],
        ) >= GETS
            && grew(s, &proxy_before, requests, &[("verb", "watch")]) >= 1.0
            && grew(
                s,
                &proxy_before,
                "clusterconnect_proxy_sessions_total",
                &[("kind", "exec"), ("cluster", CONNECTION)],
            ) >= 1.0
            && grew(
                s,
                &proxy_before,
                "clusterconnect_proxy_auth_failures_total",
                &[("reason", "local_credential")],
            ) >= 1.0
    })
    .await;
    assert!(
        proxy_after.value(
            "clusterconnect_proxy_tunnels_opened_total",
            &[("cluster", CONNECTION)]
        ) >= 1.0,
        "{}",
        proxy_after.text
    );
    assert!(
        grew(
            &proxy_after,
            &proxy_before,
            "clusterconnect_proxy_request_duration_seconds_count",
            &[]
        ) >= GETS,
        "{}",
        proxy_after.text
    );

    let relay_after = scrape_until(relay_metrics, "the relay counted the traffic", |s| {
        grew(
            s,
            &relay_before,
            "clusterconnect_relay_accepts_total",
            &[("result", "accepted")],
        ) >= 1.0
            && grew(
                s,
                &relay_before,
                "clusterconnect_relay_auth_failures_total",
                &[("reason", "missing_right")],
            ) >= 1.0
    })
    .await;
    for direction in ["sender_to_listener", "listener_to_sender"] {
        assert!(
            grew(
                &relay_after,
                &relay_before,
                "clusterconnect_relay_bytes_total",
                &[("direction", direction)]
            ) > 0.0,
            "{direction}:\n{}",
            relay_after.text
        );
    }
    assert!(
        relay_after.value("clusterconnect_relay_accept_duration_seconds_count", &[]) >= 1.0,
        "{}",
        relay_after.text
    );
    assert!(
        relay_after.value("clusterconnect_relay_tunnels", &[]) >= 1.0,
        "{}",
        relay_after.text
    );
    // No sample names a user, a path or a token.
    for scrape in [&relay_after, &agent_after, &proxy_after] {
        assert!(!scrape.text.contains(&api.token()));
        assert!(!scrape.text.contains("/api/v1"));
        for s in &scrape.samples {
            assert!(s.name.starts_with("clusterconnect_"), "{}", s.name);
        }
    }

    watch.kill().await;
    drop((agent, proxy, relay));
}

#[test]
fn the_parser_reads_labels_escapes_and_plain_samples() {
    let samples = parse(
        "# HELP a_total A.\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\nb 2.5\n# EOF\n",
    )
    .unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].labels["y"], "q\"uote");
    assert_eq!(samples[0].labels["x"], "1");
    assert_eq!(samples[1].value, 2.5);
    assert!(parse("bad{x=1} 2").is_err());
}

/// `up --metrics-addr`: one endpoint with the relay's, agent's and proxy's families, all
/// moving with kubectl through the tunnel `up` made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_every_roles_metrics_on_one_endpoint() {
    if !support::kubectl_available() {
        return;
    }
    let api = support::ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.token());
    let up = support::processes::spawn(
        &[
            OsStr::new("up"),
            OsStr::new("--kubeconfig"),
            kubeconfig.as_os_str(),
            OsStr::new("--port"),
            OsStr::new("0"),
            OsStr::new("--metrics-addr"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--log-format"),
            OsStr::new("json"),
        ],
        &[],
    );
    let addr = metrics_addr(&up, "up").await;
    up.wait_for_output(START_TIMEOUT, "ready: kubectl")
        .await
        .unwrap_or_else(|out| panic!("up did not get ready:\n{out}"));
    support::kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    let scraped = scrape_until(addr, "every role counted the list", |s| {
        s.value("clusterconnect_relay_listeners", &[]) >= 1.0
            && s.value("clusterconnect_agent_requests_total", &[("verb", "list")]) >= 1.0
            && s.value("clusterconnect_proxy_requests_total", &[("verb", "list")]) >= 1.0
    })
    .await;
    assert!(!scraped.text.contains(&api.token()));
}

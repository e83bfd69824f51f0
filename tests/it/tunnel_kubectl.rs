//! The real kubectl through proxy -> relay -> agent -> stand-in apiserver, every hop on
//! loopback with real TLS.

use crate::support;

use support::check::{describe, eventually, text, PROMPT};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::tunnel::{
    listen_key, send_key, wait_for_listener, Agent, LocalProxy, Relay, Stack, CONNECTION,
};
use support::{
    apiserver, kubectl, kubectl_available, kubectl_ok, kubectl_ok_with, spawn_kubectl, ApiServer,
    KubectlProcess, SERVICE_ACCOUNT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_version_and_discovery_through_the_tunnel() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    let k = &s.proxy.kubeconfig;

    let stdout = kubectl_ok(k, &["get", "pods", "-A"]).await;
    assert!(
        stdout.contains("web-0") && stdout.contains("coredns-0"),
        "{stdout}"
    );

    let stdout = kubectl_ok(k, &["get", "ns", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let names: Vec<_> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"default") && names.contains(&"kube-system"),
        "{names:?}"
    );

    let stdout = kubectl_ok(k, &["version"]).await;
    assert!(stdout.contains("Server Version: v1.32"), "{stdout}");

    let stdout = kubectl_ok(k, &["api-resources"]).await;
    assert!(stdout.contains("pods"), "{stdout}");

    // What reached the apiserver: the proxy's real token, never the kubeconfig's local one,
    // and the caller's identity (service-account mode passes the token through).
    let requests = s.api.requests();
    assert!(!requests.is_empty());
    let local = format!("Bearer {}", s.proxy.local_secret.expose());
    for r in &requests {
        let auth = r
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(
            auth,
            format!("Bearer {}", s.api.token()),
            "{} {}",
            r.method,
            r.path_and_query
        );
        assert_ne!(auth, local);
        assert_eq!(r.user.as_deref(), Some(SERVICE_ACCOUNT));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_reuses_pooled_tunnel_connections() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    // Stack::start probes the relay once per attempt; count from here.
    let before = s.relay.stats.total();
    for _ in 0..5 {
        kubectl_ok(&s.proxy.kubeconfig, &["get", "pods", "-n", "default"]).await;
    }
    // Each kubectl run makes several requests (discovery, list); all of them together must
    // have travelled over the pool's few HTTP/2 connections.
    let seen = s.api.requests().len();
    assert!(seen >= 5, "{seen} requests");
    let opened = s.relay.stats.total() - before;
    assert!(
        opened <= clusterconnect::proxy::POOL_SIZE as u64,
        "{opened} rendezvous for {seen} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_receives_events_pushed_after_it_started() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    let mut watch = spawn_kubectl(&s.proxy.kubeconfig, &["get", "pods", "-w"], &[], false);
    eventually("the watch reaches the apiserver", || {
        s.api.open_watches() > 0
    })
    .await;
    s.api.add_pod("default", "late-arrival");
    let seen = watch
        .read_stdout_until(PROMPT, |out| out.contains("late-arrival"))
        .await;
    let out = watch.kill().await;
    assert!(seen.is_ok(), "{}", describe(&out));
    eventually("the watch is closed at the apiserver", || {
        s.api.open_watches() == 0
    })
    .await;
}

/// Relay, agent and proxy in front of `api`, and the directory holding the proxy's files.
async fn stack_for(api: &ApiServer) -> (Relay, Agent, LocalProxy, tempfile::TempDir) {
    let relay = Relay::start().await;
    let agent = Agent::start(&relay, api, listen_key()).await;
    wait_for_listener(&relay).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = LocalProxy::start(&relay, send_key(), &api.token(), dir.path()).await;
    (relay, agent, proxy, dir)
}

/// `n` kubectl watches through `proxy`, once all of them are open at `api`.
async fn open_watches(api: &ApiServer, proxy: &LocalProxy, n: usize) -> Vec<KubectlProcess> {
    let watches: Vec<_> = (0..n)
        .map(|_| spawn_kubectl(&proxy.kubeconfig, &["get", "pods", "-w"], &[], false))
        .collect();
    eventually("every watch reaches the apiserver", || {
        api.open_watches() == n
    })
    .await;
    watches
}

async fn close_watches(api: &ApiServer, watches: Vec<KubectlProcess>) {
    for watch in watches {
        watch.kill().await;
    }
    eventually("the watches are closed at the apiserver", || {
        api.open_watches() == 0
    })
    .await;
}

/// Whether every watch request reached `api` over `version`.
fn watches_went_over(api: &ApiServer, version: http::Version) -> bool {
    let watches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("watch=true"))
        .collect();
    !watches.is_empty() && watches.iter().all(|r| r.version == version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_requests_share_one_http2_connection_to_the_apiserver() {
    if !kubectl_available() {
        return;
    }
    // Every kubectl here (discovery, lists, a watch each) from one agent: one connection
    // carries all of it, within the apiserver's 200 streams.
    let api = ApiServer::start().await;
    let (_relay, _agent, proxy, _dir) = stack_for(&api).await;
    let watches = open_watches(&api, &proxy, 6).await;
    kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    assert_eq!(api.connections(), (1, 0), "(HTTP/2, HTTP/1.1) connections");
    assert!(watches_went_over(&api, http::Version::HTTP_2));
    close_watches(&api, watches).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_opens_another_apiserver_connection_when_streams_run_out() {
    if !kubectl_available() {
        return;
    }
    // Two streams per connection: five watches need three connections at least. Were one
    // over the limit, it would queue behind the others and never reach the apiserver.
    let api = ApiServer::start_with(apiserver::Options {
        h2_max_streams: 2,
        ..Default::default()
    })
    .await;
    let (_relay, _agent, proxy, _dir) = stack_for(&api).await;
    let watches = open_watches(&api, &proxy, 5).await;
    let (h2, http1) = api.connections();
    assert!(
        h2 >= 3,
        "{h2} HTTP/2 connections for 5 watches at 2 streams each"
    );
    assert_eq!(http1, 0);
    assert!(watches_went_over(&api, http::Version::HTTP_2));
    close_watches(&api, watches).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_without_http2_gets_http1() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start_with(apiserver::Options {
        http2: false,
        ..Default::default()
    })
    .await;
    let (_relay, _agent, proxy, _dir) = stack_for(&api).await;
    let watches = open_watches(&api, &proxy, 2).await;
    let stdout = kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    assert!(stdout.contains("web-0"), "{stdout}");
    let (h2, http1) = api.connections();
    assert_eq!(h2, 0);
    // A connection of its own for each watch, as before HTTP/2.
    assert!(http1 >= 2, "{http1} HTTP/1.1 connections");
    assert!(watches_went_over(&api, http::Version::HTTP_11));
    close_watches(&api, watches).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_new_lines() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    let mut logs = spawn_kubectl(&s.proxy.kubeconfig, &["logs", "-f", "web-0"], &[], false);
    eventually("the log stream reaches the apiserver", || {
        s.api.open_log_follows() > 0
    })
    .await;
    s.api
        .append_log("default", "web-0", "line pushed through the tunnel");
    let seen = logs
        .read_stdout_until(PROMPT, |out| out.contains("line pushed through the tunnel"))
        .await;
    let out = logs.kill().await;
    assert!(seen.is_ok(), "{}", describe(&out));
}

async fn exec_works(env: &[(&str, &str)], expected_upgrade: &str) {
    let s = Stack::start().await;
    let stdout = kubectl_ok_with(
        &s.proxy.kubeconfig,
        &["exec", "web-0", "--", "echo", "hi"],
        env,
    )
    .await;
    assert_eq!(stdout, "hi\n");

    let mut cat = spawn_kubectl(
        &s.proxy.kubeconfig,
        &["exec", "-i", "web-0", "--", "cat"],
        env,
        true,
    );
    cat.write_stdin(b"round trip through the relay\n")
        .await
        .expect("stdin");
    let out = cat.finish(PROMPT).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "round trip through the relay\n");

    let out = kubectl(
        &s.proxy.kubeconfig,
        &["exec", "web-0", "--", "sh", "-c", "exit 7"],
        env,
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));

    let upgrades: Vec<_> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("/exec"))
        .filter_map(|r| {
            r.headers
                .get("upgrade")
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase)
        })
        .collect();
    assert!(
        !upgrades.is_empty() && upgrades.iter().all(|u| u == expected_upgrade),
        "{upgrades:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket() {
    if kubectl_available() {
        exec_works(&[], "websocket").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy() {
    if kubectl_available() {
        exec_works(
            &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
            "spdy/3.1",
        )
        .await;
    }
}

async fn port_forward_works(env: &[(&str, &str)]) {
    let s = Stack::start().await;
    let mut forward = spawn_kubectl(
        &s.proxy.kubeconfig,
        &["port-forward", "pod/web-0", ":8080"],
        env,
        false,
    );
    let announced = match forward
        .read_stdout_until(PROMPT, |o| o.contains("-> 8080\n"))
        .await
    {
        Ok(t) => t,
        Err(_) => panic!("no forwarding line: {}", describe(&forward.kill().await)),
    };
    let port: u16 = announced
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("local port");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut rd, mut wr) = conn.split();
        let write = async {
            wr.write_all(&payload).await?;
            Ok::<_, std::io::Error>(())
        };
        let mut echoed = vec![0u8; payload.len()];
        let read = rd.read_exact(&mut echoed);
        tokio::try_join!(write, read)?;
        Ok::<_, std::io::Error>(echoed)
    };
    let result = tokio::time::timeout(PROMPT, exchange).await;
    let out = forward.kill().await;
    match result {
        Ok(Ok(echoed)) => assert!(echoed == payload, "echoed bytes differ"),
        other => panic!("port-forward echo failed: {other:?}\n{}", describe(&out)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_websocket_tunnelled_spdy() {
    if kubectl_available() {
        port_forward_works(&[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_spdy() {
    if kubectl_available() {
        port_forward_works(&[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bearer_token_gets_the_apiservers_401() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let relay = support::tunnel::Relay::start().await;
    let _agent = Agent::start(&relay, &api, listen_key()).await;
    wait_for_listener(&relay).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = LocalProxy::start(&relay, send_key(), "not-the-token", dir.path()).await;
    let out = kubectl(&proxy.kubeconfig, &["get", "pods"], &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("You must be logged in to the server"),
        "{}",
        describe(&out)
    );
    // It reached the apiserver, which refused it: the 401 is the apiserver's own.
    assert!(api.requests().iter().any(|r| r.user.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_gives_kubectl_a_readable_502() {
    if !kubectl_available() {
        return;
    }
    let relay = support::tunnel::Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = LocalProxy::start(&relay, send_key(), "token", dir.path()).await;
    let out = kubectl(&proxy.kubeconfig, &["get", "pods"], &[]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the cluster agent for '{CONNECTION}' is not connected"
        )),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_serve_and_losing_one_keeps_new_requests_working() {
    if !kubectl_available() {
        return;
    }
    let mut s = Stack::start().await;
    let second = Agent::start(&s.relay, &s.api, listen_key()).await;
    s.agents.push(second);
    for _ in 0..4 {
        kubectl_ok(&s.proxy.kubeconfig, &["get", "pods"]).await;
    }
    let first = s.agents.remove(0);
    first.stop().await;
    // The proxy's pooled connections ran through whichever agent accepted them; new requests
    // must find the surviving agent, even if a pooled connection died with the first.
    for _ in 0..4 {
        kubectl_ok(&s.proxy.kubeconfig, &["get", "pods"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_local_credential_is_refused_before_the_relay() {
    let s = Stack::start().await;
    let before = s.api.requests().len();
    let roots = clusterconnect::tls::roots_from_pem(s.proxy.ca_pem.as_bytes()).unwrap();
    let tls = clusterconnect::tls::client_config_with_roots(roots, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    conn.write_all(b"GET /api/v1/pods HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer guess\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    let _ = tokio::time::timeout(PROMPT, conn.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert_eq!(
        s.api.requests().len(),
        before,
        "an unauthenticated request reached the apiserver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_client_does_not_hold_up_kubectl() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    // Connections that never send a TLS hello: each would block the proxy's accept loop for
    // its handshake timeout (10 s) if handshakes ran there instead of in their own tasks.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap());
    }
    kubectl_ok(
        &s.proxy.kubeconfig,
        &["get", "pods", "--request-timeout=5s"],
    )
    .await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_callers_impersonation_reaches_the_apiserver_unchanged() {
    if !kubectl_available() {
        return;
    }
    let s = Stack::start().await;
    let k = &s.proxy.kubeconfig;
    const PODS: &str = "/api/v1/namespaces/default/pods";
    // The apiserver, not the agent, judges a passed-through caller's impersonation: without a
    // binding the refusal is the apiserver's own, about the caller's service account.
    let out = kubectl(k, &["get", "--raw", PODS, "--as", "bob"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(&format!(
            "users \"bob\" is forbidden: User \"{SERVICE_ACCOUNT}\" cannot impersonate resource \"users\""
        )),
        "{}",
        describe(&out)
    );

    s.api.grant_rules(
        "impersonator",
        serde_json::json!([{"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]}]),
        "ServiceAccount",
        "default/tester",
    );
    let stdout = kubectl_ok(
        k,
        &[
            "auth",
            "whoami",
            "--as",
            "bob",
            "--as-group",
            "g1",
            "-o",
            "json",
        ],
    )
    .await;
    let review: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let info = &review["status"]["userInfo"];
    assert_eq!(info["username"], "bob", "{stdout}");
    let groups = info["groups"].as_array().expect("groups");
    assert!(groups.iter().any(|g| g == "g1"), "{groups:?}");
    assert!(
        groups.iter().any(|g| g == "system:authenticated"),
        "{groups:?}"
    );
    let seen = s
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.path_and_query.contains("selfsubjectreviews"))
        .expect("the review reached the apiserver");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {}", s.api.token()).as_str()
    );
    assert_eq!(seen.headers["impersonate-user"], "bob");
    assert_eq!(seen.headers["impersonate-group"], "g1");
    assert_eq!(seen.user.as_deref(), Some("bob"));
    // Nothing was asked of the apiserver on the caller's behalf.
    assert!(!s
        .api
        .requests()
        .iter()
        .any(|r| r.path_and_query.contains("subjectaccessreviews")));
}

/// One id per request, made at the proxy, reaches the apiserver as `Audit-ID` (which it keeps
/// as the request's audit id): distinct for every request kubectl makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_reaches_the_apiserver_with_its_own_audit_id() {
    if !kubectl_available() {
        return;
    }
    let stack = Stack::start().await;
    let before = stack.api.requests().len();
    kubectl_ok(&stack.proxy.kubeconfig, &["get", "pods", "-A"]).await;
    kubectl_ok(&stack.proxy.kubeconfig, &["get", "ns"]).await;
    let ids: Vec<String> = stack.api.requests()[before..]
        .iter()
        .map(|r| {
            r.headers
                .get("audit-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{} arrived without an Audit-ID", r.path_and_query))
                .to_string()
        })
        .collect();
    assert!(ids.len() >= 2, "{ids:?}");
    for id in &ids {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "ids repeat: {ids:?}");
}

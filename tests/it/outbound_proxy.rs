//! Agent and proxy reach the relay through a corporate outbound proxy named in HTTPS_PROXY
//! (HTTP CONNECT with basic authentication), as Arc's `--proxy-https` does, and say clearly
//! when the proxy refuses their credentials. The real binaries, the real kubectl.

use crate::support;

use std::ffi::OsStr;

use support::check::eventually;
use support::connect_proxy::ConnectProxy;
use support::processes::{
    agent_args, proxy_args, proxy_port, spawn, start_relay, START_TIMEOUT, TOKEN_FILE_NAME,
};
use support::{kubectl_available, kubectl_ok, ApiServer};

const CONNECTION: &str = "through-proxy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_proxy_reach_the_relay_through_https_proxy() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay_dir = dir.path().join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let relay = start_relay(&relay_dir).await;
    let relay_target = relay.url.trim_start_matches("wss://").to_string();
    let corp = ConnectProxy::start("build", "pa55").await;
    let good = corp.url("build", "pa55");
    let env = |url: &str| -> Vec<(&'static str, std::ffi::OsString)> {
        vec![("HTTPS_PROXY", url.into()), ("NO_PROXY", "".into())]
    };

    // Wrong credentials: the agent says what the proxy wants, and keeps trying.
    let bad_env = env(&corp.url("build", "wrong"));
    let bad_refs: Vec<(&str, &OsStr)> = bad_env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let agent_kubeconfig = api.write_kubeconfig(dir.path(), "agent-has-no-say");
    let refused = spawn(
        &agent_args(&relay, &agent_kubeconfig, CONNECTION, &relay.listen_key),
        &bad_refs,
    );
    refused
        .wait_for_output(START_TIMEOUT, "asks for credentials (407)")
        .await
        .unwrap_or_else(|out| panic!("no clear 407 message:\n{out}"));
    assert!(!refused.output().contains("pa55"));
    drop(refused);

    let good_env = env(&good);
    let refs: Vec<(&str, &OsStr)> = good_env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let agent = spawn(
        &agent_args(&relay, &agent_kubeconfig, CONNECTION, &relay.listen_key),
        &refs,
    );
    agent
        .wait_for_log(START_TIMEOUT, "listening")
        .await
        .unwrap_or_else(|out| panic!("agent did not listen through the proxy:\n{out}"));
    // Both of its listeners dialed the relay through the proxy.
    eventually("the agent's two listeners went through the proxy", || {
        corp.tunnels_to(&relay_target) >= 2
    })
    .await;
    let agent_tunnels = corp.tunnels_to(&relay_target);

    let config_dir = dir.path().join("proxy-config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let token_file = config_dir.join(TOKEN_FILE_NAME);
    std::fs::write(&token_file, api.token()).unwrap();
    let kubeconfig = dir.path().join("user-kubeconfig");
    let mut proxy_env = refs.clone();
    proxy_env.push(("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str()));
    let proxy = spawn(
        &proxy_args(
            &relay,
            CONNECTION,
            &relay.send_key,
            &token_file,
            0,
            &kubeconfig,
        ),
        &proxy_env,
    );
    proxy
        .wait_for(START_TIMEOUT, |text| proxy_port(text).is_some())
        .await
        .unwrap_or_else(|out| panic!("proxy did not start:\n{out}"));
    let pods = kubectl_ok(&kubeconfig, &["get", "pods", "-A"]).await;
    assert!(pods.contains("web-0"), "{pods}");
    assert!(
        corp.tunnels_to(&relay_target) > agent_tunnels,
        "the proxy's tunnel did not go through the outbound proxy"
    );
    assert!(*corp.refused.lock().unwrap() >= 1);
}

//! The agent follows its relay key file: a key the relay refuses is retried, not fatal, and a
//! key written the way the kubelet updates a mounted Secret (an atomic symlink swap) is used
//! for the next connection.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clusterconnect::agent::{Authenticator, KeySource};
use clusterconnect::tunnel::dial::dial;
use clusterconnect::tunnel::protocol::Action;
use support::check::PROMPT;
use support::tunnel::{
    send_key, wait_for_listener, Agent, LocalProxy, Relay, CONNECTION, LISTEN_KEY,
};
use support::{kubectl_available, kubectl_ok, ApiServer};

/// A Secret volume as the kubelet writes it: `listen.key -> ..data/listen.key`,
/// `..data -> ..<version>/`, updated by writing a new version directory and renaming a new
/// `..data` link over the old one.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(content: &str) -> SecretVolume {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut volume = SecretVolume { dir, version: 0 };
        volume.write(content);
        std::os::unix::fs::symlink("..data/listen.key", volume.path()).expect("key link");
        volume
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("listen.key")
    }

    fn write(&mut self, content: &str) {
        self.version += 1;
        let root = self.dir.path();
        let version = format!("..v{}", self.version);
        std::fs::create_dir(root.join(&version)).expect("version dir");
        std::fs::write(root.join(&version).join("listen.key"), content).expect("write key");
        let staged = root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).expect("stage link");
        std::fs::rename(&staged, root.join("..data")).expect("swap link");
    }
}

fn listen_key_text(key: &str) -> String {
    format!("SharedAccessKeyName=listen;SharedAccessKey={key}")
}

async fn until(what: &str, within: Duration, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (bounded) until the relay pairs a sender with the agent's listener.
async fn until_listening(relay: &Relay, within: Duration, what: &str) {
    let addr = relay.address();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let token = send_key().mint(&addr.resource_uri(CONNECTION), Duration::from_secs(60));
        let url = addr.url(CONNECTION, Action::Connect, "probe");
        if dial(&url, Some(&token), &relay.client_tls).await.is_ok() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn start_agent(relay: &Relay, api: &ApiServer, path: &Path) -> (Agent, Arc<KeySource>) {
    let key = Arc::new(KeySource::from_file(path).expect("key file"));
    let agent = Agent::start_keyed(
        relay,
        api,
        key.clone(),
        CONNECTION,
        Authenticator::token_only(),
    )
    .await;
    (agent, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_connects_once_its_key_file_is_corrected() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let relay = Relay::start().await;
    let mut volume = SecretVolume::new(&listen_key_text("a-key-the-relay-never-had-0123"));
    let (agent, key) = start_agent(&relay, &api, &volume.path()).await;

    until("the relay refused the agent's key twice", PROMPT, || {
        key.refusals() >= 2
    })
    .await;
    assert!(!agent.task.is_finished(), "a refused agent gave up");

    volume.write(&listen_key_text(LISTEN_KEY));
    // The next attempt, at most one back-off step away (or sooner, woken by the change),
    // uses the corrected key.
    until_listening(
        &relay,
        Duration::from_secs(10),
        "the agent did not connect within seconds of the key file's correction",
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = LocalProxy::start(&relay, send_key(), &api.token(), dir.path()).await;
    let pods = kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    assert!(pods.contains("web-0"), "{pods}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_is_used_for_the_next_reconnect() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let relay = Relay::start().await;
    let mut volume = SecretVolume::new(&listen_key_text(LISTEN_KEY));
    let (agent, key) = start_agent(&relay, &api, &volume.path()).await;
    wait_for_listener(&relay).await;

    // The rotation: the Secret gets the new key, then the relay accepts only it and cuts
    // the channels the old key authorized.
    let rotated = "rotated-listen-key-0123456789";
    volume.write(&listen_key_text(rotated));
    until("the agent read the new key", PROMPT, || {
        key.current().key.expose() == rotated
    })
    .await;
    // (That the relay closes the old key's channels is tests/it/revocation.rs's subject.)
    relay.rekey_listen(rotated);
    until_listening(
        &relay,
        Duration::from_secs(20),
        "the agent did not reconnect with the rotated key",
    )
    .await;
    // Every reconnect used the new key: the relay never refused one.
    assert_eq!(key.refusals(), 0);
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = LocalProxy::start(&relay, send_key(), &api.token(), dir.path()).await;
    let pods = kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    assert!(pods.contains("web-0"), "{pods}");

    // A broken file after a change keeps the key in use.
    volume.write("SharedAccessKey=only-half-of-a-key");
    assert!(!key.reload());
    assert_eq!(key.current().key.expose(), rotated);
    agent.stop().await;
}

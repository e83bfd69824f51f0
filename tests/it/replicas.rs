//! Relay replicas on NATS, end to end with the real binaries: three `relay` processes sharing a
//! real `nats-server -js`, a round-robin TCP balancer standing in for the L4 load balancer in
//! front of them, agents that re-home, a proxy and the real kubectl.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusterconnect::arm::client::{ManagementAuth, ManagementClient};
use clusterconnect::entra::http::HttpClient;
use clusterconnect::secret::Secret;
use clusterconnect::tls::CertificateAuthority;
use clusterconnect::tunnel::dial::dial;
use clusterconnect::tunnel::protocol::{Action, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;

use crate::registry::{agent_keys, id, request};
use crate::support;
use support::check::{eventually, PROMPT};
use support::processes::{logs, proxy_port, spawn, Process, START_TIMEOUT, TOKEN_FILE_NAME};
use support::{kubectl, kubectl_available, kubectl_ok, spawn_kubectl, ApiServer};

const ADMIN_KEY: &str = "replicas-admin-key-0123456789abcdef";

/// How long agents take to re-home after a replica dies: the listener notices at once (the
/// connection is reset), backs off 1-2 s, and lands on a live replica through the balancer.
const REHOME: Duration = Duration::from_secs(10);

pub(crate) fn nats_server() -> PathBuf {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    which("nats-server").unwrap_or_else(|| {
        panic!("nats-server is not installed: scripts/test installs Debian's nats-server package")
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    })
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `nats-server -js` on 127.0.0.1:`port`, storing JetStream under `store`.
struct Nats {
    child: std::process::Child,
    port: u16,
}

impl Nats {
    async fn start(port: u16, store: &Path) -> Nats {
        let child = std::process::Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nats { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A round-robin TCP balancer over a changing set of backends; a backend that refuses the
/// connection is skipped, as a balancer's health check would.
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let shared = backends.clone();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let list = shared.lock().unwrap().clone();
                let start = next;
                next += 1;
                tokio::spawn(async move {
                    for i in 0..list.len() {
                        let backend = list[(start + i) % list.len()];
                        let connect = tokio::net::TcpStream::connect(backend);
                        if let Ok(Ok(mut server)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            addr,
            backends,
            task,
        }
    }

    fn set(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The files every replica shares: certificate, key, admin key and CA.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    admin_key_file: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca = CertificateAuthority::generate("replicas test CA").unwrap();
    let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
    std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    let admin_key_file = dir.join("admin.key");
    std::fs::write(
        &admin_key_file,
        format!("SharedAccessKeyName=admin;SharedAccessKey={ADMIN_KEY}\n"),
    )
    .unwrap();
    Pki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.crt"),
        admin_key_file,
    }
}

/// One `relay` replica process on 127.0.0.1:`port`.
struct Replica {
    process: Process,
    addr: SocketAddr,
}

impl Replica {
    async fn start(pki: &Pki, index: usize, port: u16, nats: u16) -> Replica {
        let config = pki.dir.join(format!("relay-{index}.toml"));
        let toml = format!(
            r#"hostnames = ["localhost"]
listen = "127.0.0.1:{port}"
drain_secs = 1

[tls]
cert_file = "relay.crt"
key_file = "relay.key"

[[rules]]
name = "admin"
key = "{ADMIN_KEY}"
rights = ["manage"]

[cluster]
nats_url = "nats://127.0.0.1:{nats}"
public_host = "127.0.0.1"
"#
        );
        std::fs::write(&config, toml).unwrap();
        let process = spawn(
            &[
                OsStr::new("relay"),
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("--log-format"),
                OsStr::new("json"),
            ],
            &[("RUST_LOG", OsStr::new("info"))],
        );
        if let Err(out) = process.wait_for_log(START_TIMEOUT, "relay listening").await {
            panic!("relay replica {index} did not start:\n{out}");
        }
        Replica {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn url(&self) -> String {
        format!("wss://localhost:{}", self.addr.port())
    }

    /// Listener control channels this replica holds now.
    fn listeners(&self) -> usize {
        let out = self.process.output();
        logs(&out, "listener connected")
            .len()
            .saturating_sub(logs(&out, "listener disconnected").len())
    }
}

fn management(url: &str, ca: &Path) -> ManagementClient {
    let tls = clusterconnect::tls::client_config(Some(ca), &[]).unwrap();
    let http = HttpClient::new(tls, Duration::from_secs(5), Duration::from_secs(10));
    let key = SasKey {
        name: "admin".into(),
        key: Secret::new(ADMIN_KEY),
    };
    ManagementClient::new(
        RelayAddress::parse(url).unwrap(),
        http,
        Some(ManagementAuth::Key(key)),
    )
}

fn agent(relay_url: &str, pki: &Pki, connection: &str, key: &Path, kubeconfig: &Path) -> Process {
    let args: Vec<OsString> = [
        OsStr::new("agent"),
        OsStr::new("--relay"),
        OsStr::new(relay_url),
        OsStr::new("--connection"),
        OsStr::new(connection),
        OsStr::new("--key-file"),
        key.as_os_str(),
        OsStr::new("--relay-ca"),
        pki.ca.as_os_str(),
        OsStr::new("--kubeconfig"),
        kubeconfig.as_os_str(),
        OsStr::new("--health-addr"),
        OsStr::new("off"),
        OsStr::new("--relay-replicas"),
        OsStr::new("2"),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]
    .iter()
    .map(|s| s.to_os_string())
    .collect();
    spawn(&args, &[])
}

/// A proxy to `connection` through `relay_url` with the admin key; returns it and its
/// kubeconfig once it listens.
async fn proxy(
    relay_url: &str,
    pki: &Pki,
    connection: &str,
    token: &str,
    dir: &Path,
    context: impl Fn() -> Vec<(String, String)>,
) -> (Process, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let token_file = dir.join(TOKEN_FILE_NAME);
    std::fs::write(&token_file, token).unwrap();
    let kubeconfig = dir.join("config");
    let args: Vec<OsString> = [
        OsStr::new("proxy"),
        OsStr::new("--relay"),
        OsStr::new(relay_url),
        OsStr::new("--connection"),
        OsStr::new(connection),
        OsStr::new("--key-file"),
        pki.admin_key_file.as_os_str(),
        OsStr::new("--relay-ca"),
        pki.ca.as_os_str(),
        OsStr::new("--token-file"),
        token_file.as_os_str(),
        OsStr::new("--port"),
        OsStr::new("0"),
        OsStr::new("--file"),
        kubeconfig.as_os_str(),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]
    .iter()
    .map(|s| s.to_os_string())
    .collect();
    let process = spawn(&args, &[("CLUSTERCONNECT_CONFIG_DIR", dir.as_os_str())]);
    if let Err(out) = process
        .wait_for(START_TIMEOUT, |text| proxy_port(text).is_some())
        .await
    {
        let relays: String = context()
            .iter()
            .map(|(n, o)| format!("\n--- {n}:\n{o}"))
            .collect();
        panic!("proxy did not start:\n{out}{relays}");
    }
    (process, kubeconfig)
}

/// Registers `name` through `via` and returns its hybrid connection and the agent's Listen
/// key file.
async fn register(via: &ManagementClient, name: &str, dir: &Path) -> (String, PathBuf) {
    let (_, public) = agent_keys();
    via.put(&id(name), &request(&public))
        .await
        .expect("register");
    let credential = via.list_agent_credential(&id(name)).await.unwrap();
    let key_file = dir.join(format!("{name}-listen.key"));
    std::fs::write(&key_file, &credential.listen_key).unwrap();
    (credential.hybrid_connection_name, key_file)
}

/// Opens a raw sender (as Microsoft's clients do) on `relay_url` and returns the relay's
/// refusal status, or 101 when a listener accepted.
async fn sender_status(relay_url: &str, pki: &Pki, connection: &str) -> u16 {
    let address = RelayAddress::parse(relay_url).unwrap();
    let key = SasKey {
        name: "admin".into(),
        key: Secret::new(ADMIN_KEY),
    };
    let token = key.mint(&address.resource_uri(connection), Duration::from_secs(600));
    let tls = clusterconnect::tls::client_config(Some(&pki.ca), &[]).unwrap();
    let url = address.url(connection, Action::Connect, "replica-test");
    match dial(&url, Some(&token), &tls).await {
        Ok(_) => 101,
        Err(clusterconnect::tunnel::dial::DialError::Rejected { status, .. }) => status,
        Err(e) => panic!("sender on {relay_url}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_route_offers_share_the_registry_and_survive_losing_one() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats_dir = dir.path().join("nats");
    let nats = Nats::start(free_port(), &nats_dir).await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(&pki, i, free_port(), nats.port).await);
    }
    know_each_other(&replicas).await;
    let api = ApiServer::start().await;
    let agent_kubeconfig = api.write_kubeconfig(dir.path(), "agent-token");

    // Point 3: registered through replica 0, visible through replica 1 within a second.
    let a = management(&replicas[0].url(), &pki.ca);
    let b = management(&replicas[1].url(), &pki.ca);
    let (connection, listen_key) = register(&a, "prod", dir.path()).await;
    let registered = Instant::now();
    loop {
        if b.get(&id("prod")).await.unwrap().is_some() {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(1),
            "a cluster registered through replica 0 was not visible through replica 1 within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Agents reach the replicas through the balancer, at first only replicas 0 and 1 (so
    // replica 2 holds no listener at all), and spread their listeners over both.
    let balancer = Balancer::start(vec![replicas[0].addr, replicas[1].addr]).await;
    let shared_url = format!("wss://localhost:{}", balancer.addr.port());
    let agents: Vec<Process> = (0..2)
        .map(|_| {
            agent(
                &shared_url,
                &pki,
                &connection,
                &listen_key,
                &agent_kubeconfig,
            )
        })
        .collect();
    let held = || replicas.iter().map(Replica::listeners).collect::<Vec<_>>();
    eventually(
        "both agents hold listeners on both replicas behind the balancer",
        || {
            let h = held();
            h[0] == 2 && h[1] == 2 && h[2] == 0
        },
    )
    .await;

    // Point 1: kubectl through every replica; through replica 2 every offer crosses to
    // another replica, through 0 and 1 they stay or cross as NATS and the listeners choose.
    for (i, replica) in replicas.iter().enumerate() {
        let (proxy_process, kubeconfig) = proxy(
            &replica.url(),
            &pki,
            &connection,
            &api.token(),
            &dir.path().join(format!("proxy-{i}")),
            || {
                let mut all: Vec<(String, String)> = agents
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("agent {i}"), a.output()))
                    .collect();
                all.extend(
                    replicas
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (format!("replica {i}"), r.process.output())),
                );
                all
            },
        )
        .await;
        let pods = kubectl_ok(&kubeconfig, &["get", "pods", "-A"]).await;
        assert!(pods.contains("web-0"), "through replica {i}: {pods}");
        let exec = kubectl(
            &kubeconfig,
            &["exec", "web-0", "-v=6", "--", "echo", "hi"],
            &[],
        )
        .await;
        if !exec.status.success() || support::check::text(&exec.stdout).trim() != "hi" {
            let mut logs = format!("proxy:\n{}\n", proxy_process.output());
            for (i, a) in agents.iter().enumerate() {
                logs.push_str(&format!("agent {i}:\n{}\n", a.output()));
            }
            for (i, r) in replicas.iter().enumerate() {
                logs.push_str(&format!("replica {i}:\n{}\n", r.process.output()));
            }
            panic!(
                "exec through replica {i} did not echo: {}\n{logs}",
                support::check::describe(&exec)
            );
        }
        let mut watch = spawn_kubectl(&kubeconfig, &["get", "pods", "-w"], &[], false);
        if let Err(seen) = watch
            .read_stdout_until(PROMPT, |o| o.contains("web-0"))
            .await
        {
            panic!("watch through replica {i} showed nothing: {seen}");
        }
        watch.kill().await;
        port_forward_echoes(&kubeconfig, i).await;
    }
    // A sender for a connection no replica listens for gets the documented 404 at once.
    let started = Instant::now();
    assert_eq!(
        sender_status(&replicas[2].url(), &pki, "nobody-listens").await,
        404
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Point 2: replica 0 killed mid-loop. The agents re-home through the balancer (now over
    // all three replicas); afterwards no new request fails.
    balancer.set(replicas.iter().map(|r| r.addr).collect());
    let (_proxy, kubeconfig) = proxy(
        &shared_url,
        &pki,
        &connection,
        &api.token(),
        &dir.path().join("proxy-shared"),
        Vec::new,
    )
    .await;
    kubectl_ok(&kubeconfig, &["get", "pods"]).await;
    // A watch whose tunnel is on replica 0 (its proxy dials replica 0 itself), and a
    // client-go style re-watch loop through the shared name.
    let (_proxy0, kubeconfig0) = proxy(
        &replicas[0].url(),
        &pki,
        &connection,
        &api.token(),
        &dir.path().join("proxy-0-watch"),
        Vec::new,
    )
    .await;
    let mut doomed = spawn_kubectl(&kubeconfig0, &["get", "pods", "-w"], &[], false);
    if let Err(seen) = doomed
        .read_stdout_until(PROMPT, |o| o.contains("web-0"))
        .await
    {
        panic!("the watch through replica 0 showed nothing: {seen}");
    }
    let rewatch = {
        let kubeconfig = kubeconfig.clone();
        tokio::spawn(async move {
            let mut runs = 0;
            loop {
                runs += 1;
                let mut w = spawn_kubectl(
                    &kubeconfig,
                    &["get", "pods", "-w", "--output-watch-events"],
                    &[],
                    false,
                );
                if w.read_stdout_until(Duration::from_secs(60), |o| o.contains("MODIFIED"))
                    .await
                    .is_ok()
                {
                    w.kill().await;
                    return runs;
                }
                w.kill().await;
                assert!(runs < 100, "the re-watch loop never saw the change");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let killed = replicas.remove(0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed.process.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed_at = Instant::now();
    balancer.set(replicas.iter().map(|r| r.addr).collect());
    // During the re-homing window requests may fail; the agents must be back within REHOME.
    loop {
        let listeners: usize = replicas.iter().map(Replica::listeners).sum();
        let distinct = replicas.iter().filter(|r| r.listeners() > 0).count();
        if listeners == 4 && distinct == 2 {
            break;
        }
        assert!(
            killed_at.elapsed() < REHOME,
            "agents did not re-home within {REHOME:?}: {:?}",
            replicas.iter().map(Replica::listeners).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failures = Vec::new();
    for _ in 0..20 {
        let out = kubectl(&kubeconfig, &["get", "pods"], &[]).await;
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "requests failed after re-homing: {failures:?}"
    );
    // The watch on the dead replica ended by itself, as kubectl's watch does when its stream
    // ends; the re-watch loop is watching again and sees a change made now.
    let ended = doomed.finish(Duration::from_secs(15)).await;
    assert!(
        ended.status.code().is_some(),
        "the watch through the killed replica did not end by itself"
    );
    kubectl_ok(
        &kubeconfig,
        &["label", "pod", "web-0", "rewatched=yes", "--overwrite"],
    )
    .await;
    let runs = tokio::time::timeout(Duration::from_secs(60), rewatch)
        .await
        .expect("the re-watch loop saw the change")
        .unwrap();
    assert!(runs >= 1);

    // Point 3, revocation: disconnect through replica 2 cuts the listeners held elsewhere.
    let c = management(&replicas[1].url(), &pki.ca);
    assert!(c.delete(&id("prod")).await.unwrap());
    eventually(
        "the removed cluster's listeners are closed on every replica",
        || replicas.iter().all(|r| r.listeners() == 0),
    )
    .await;
    drop(agents);
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_keeps_tunnels_and_the_registry_and_cross_replica_offers_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats_dir = dir.path().join("nats");
    let nats_port = free_port();
    let mut nats = Nats::start(nats_port, &nats_dir).await;
    let r0 = Replica::start(&pki, 0, free_port(), nats_port).await;
    let api = ApiServer::start().await;
    let agent_kubeconfig = api.write_kubeconfig(dir.path(), "agent-token");
    let (connection, listen_key) =
        register(&management(&r0.url(), &pki.ca), "prod", dir.path()).await;
    // The agent sits on replica 0 only, and connected before replica 1 existed: replica 0
    // tells its listeners of replica 1 when it hears of it, and replica 1 reaches the agent
    // through NATS.
    let _agent = agent(&r0.url(), &pki, &connection, &listen_key, &agent_kubeconfig);
    eventually("the agent listens on replica 0", || r0.listeners() == 2).await;
    let r1 = Replica::start(&pki, 1, free_port(), nats_port).await;
    let (r0, r1) = {
        let both = vec![r0, r1];
        know_each_other(&both).await;
        let mut both = both.into_iter();
        (both.next().unwrap(), both.next().unwrap())
    };
    assert_eq!(sender_status(&r1.url(), &pki, &connection).await, 101);

    // An established tunnel (through replica 1, listener on replica 0) outlives NATS.
    let address = RelayAddress::parse(&r1.url()).unwrap();
    let key = SasKey {
        name: "admin".into(),
        key: Secret::new(ADMIN_KEY),
    };
    let token = key.mint(&address.resource_uri(&connection), Duration::from_secs(600));
    let tls = clusterconnect::tls::client_config(Some(&pki.ca), &[]).unwrap();
    let url = address.url(&connection, Action::Connect, "held");
    let mut held = clusterconnect::tunnel::dial::dial_stream(&url, Some(&token), &tls)
        .await
        .unwrap();

    nats.stop();
    // New offers that must cross replicas get a clear 503; the replicas keep running.
    eventually_async(
        "a cross-replica offer is refused 503 while NATS is down",
        || {
            let url = r1.url();
            let pki = &pki;
            let connection = connection.clone();
            async move { sender_status(&url, pki, &connection).await == 503 }
        },
    )
    .await;
    // Offers on the listener's own replica need no NATS.
    assert_eq!(sender_status(&r0.url(), &pki, &connection).await, 101);
    // The held tunnel still carries bytes: an HTTP/1.1 request to the apiserver through it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(
            format!(
                "GET /version HTTP/1.1\r\nHost: cluster\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                api.token()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        held.flush().await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), held.read_to_end(&mut answer));
        let _ = read.await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // NATS back on the same port and store: the registry is intact and offers cross again.
    let _nats = Nats::start(nats_port, &nats_dir).await;
    eventually_async(
        "cross-replica offers work again after NATS restarts",
        || {
            let url = r1.url();
            let pki = &pki;
            let connection = connection.clone();
            async move { sender_status(&url, pki, &connection).await == 101 }
        },
    )
    .await;
    let shown = management(&r1.url(), &pki.ca)
        .get(&id("prod"))
        .await
        .unwrap();
    assert!(
        shown.is_some(),
        "the registration survived the NATS restart"
    );
    assert!(r0.process.output().contains("relay listening"));
}

/// `kubectl port-forward` through `kubeconfig`: bytes sent to the local port come back from
/// the stand-in pod's echo service.
async fn port_forward_echoes(kubeconfig: &Path, replica: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut forward = spawn_kubectl(
        kubeconfig,
        &["port-forward", "pod/web-0", ":8080"],
        &[],
        false,
    );
    let announced = match forward
        .read_stdout_until(PROMPT, |o| o.contains("-> 8080\n"))
        .await
    {
        Ok(t) => t,
        Err(_) => panic!(
            "no port-forward through replica {replica}: {:?}",
            forward.kill().await
        ),
    };
    let port: u16 = announced
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("local port");
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut rd, mut wr) = conn.split();
        let mut echoed = vec![0u8; payload.len()];
        tokio::try_join!(wr.write_all(&payload), rd.read_exact(&mut echoed))?;
        Ok::<_, std::io::Error>(echoed)
    };
    let echoed = tokio::time::timeout(PROMPT, exchange).await;
    forward.kill().await;
    match echoed {
        Ok(Ok(echoed)) => assert!(
            echoed == payload,
            "port-forward through replica {replica} changed bytes"
        ),
        other => panic!("port-forward through replica {replica}: {other:?}"),
    }
}

/// Waits until every replica announces all of them (presence is read every 2 s), so that the
/// listeners connected next are told every replica.
async fn know_each_other(replicas: &[Replica]) {
    let n = replicas.len();
    eventually("every replica knows every replica", || {
        replicas.iter().all(|r| {
            let out = r.process.output();
            let joined = logs(&out, "relay replica joined").iter().any(|l| {
                l["fields"]["peers"]
                    .as_str()
                    .is_some_and(|p| p.matches(':').count() == n)
            });
            joined
                || logs(&out, "relay replicas")
                    .iter()
                    .any(|l| l["fields"]["peers"].as_u64() == Some(n as u64))
        })
    })
    .await;
}

/// `eventually` for a condition that must await.
async fn eventually_async<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Microsoft's hyco-https listener on one replica answers a plain HTTPS request sent to the
/// other: the request's notice crosses NATS and the listener comes to the sender's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_reaches_a_hyco_https_listener_on_another_replica() {
    if !crate::hyco_interop::hyco_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats_port = free_port();
    let _nats = Nats::start(nats_port, &dir.path().join("nats")).await;
    let replicas = vec![
        Replica::start(&pki, 0, free_port(), nats_port).await,
        Replica::start(&pki, 1, free_port(), nats_port).await,
    ];
    know_each_other(&replicas).await;
    let at = |r: &Replica| format!("localhost:{}", r.addr.port());
    let key = ("admin", ADMIN_KEY);
    let listener = crate::hyco_interop::node_at(
        &at(&replicas[0]),
        &pki.ca,
        "https_listener.js",
        "web",
        key,
        &[],
    );
    let mut listener = crate::hyco_interop::listening(listener, "https_listener.js").await;
    eventually("the listener is on replica 0", || {
        replicas[0].listeners() == 1
    })
    .await;
    let sender = crate::hyco_interop::node_at(
        &at(&replicas[1]),
        &pki.ca,
        "https_sender.js",
        "web",
        key,
        &[],
    );
    let got = crate::hyco_interop::finished(sender, "https_sender.js").await;
    assert_eq!(got["get"]["status"], 200, "{got}");
    let seen: serde_json::Value =
        serde_json::from_str(got["get"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        seen["url"], "/web/sub/dir?foo=bar&name=hello%20world&flag",
        "{seen}"
    );
    assert_eq!(got["post"]["echoedTwice"], true, "{got}");
    assert_eq!(got["teapot"]["status"], 418, "{got}");
    assert_eq!(got["no_listener"]["status"], 502, "{got}");
    let _ = listener.kill().await;
}

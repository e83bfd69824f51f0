//! The real `clusterconnect` binary as separate processes: relay, agent and proxy started the
//! way an operator would, on loopback, each with a private HOME, their output captured.
//!
//! Every wait is bounded; every child is killed when its [`Process`] is dropped.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a role may take to print the line that says it is up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The token file `start_proxy` writes into its `config_dir`.
pub const TOKEN_FILE_NAME: &str = "sa.token";

/// The binary under test: this build's, unless a bench comparing two builds named another
/// (see [`run_binary`]).
pub fn binary() -> PathBuf {
    let other = OTHER_BINARY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    other.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_clusterconnect")))
}

static OTHER_BINARY: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Processes spawned while `f` runs are `path`, not this build's binary: the bench's A/B of
/// two builds (`cargo bench --bench tunnel -- profile`); the tests always run this build.
#[allow(dead_code)]
pub async fn run_binary<T>(path: PathBuf, f: impl std::future::Future<Output = T>) -> T {
    *OTHER_BINARY.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    let out = f.await;
    *OTHER_BINARY.lock().unwrap_or_else(|p| p.into_inner()) = None;
    out
}

/// A running `clusterconnect` child: its output (stdout and stderr interleaved by line) is
/// collected in the background as it comes.
pub struct Process {
    child: Child,
    pid: u32,
    output: Arc<Mutex<String>>,
    /// Bumped after every captured line, and once more when a pipe ends.
    changed: watch::Receiver<u64>,
    readers: Vec<JoinHandle<()>>,
    _home: tempfile::TempDir,
}

fn pump(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    output: Arc<Mutex<String>>,
    changed: Arc<watch::Sender<u64>>,
    open_pipes: Arc<Mutex<u8>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
                    out.push_str(&text);
                    if !text.ends_with('\n') {
                        out.push('\n');
                    }
                    drop(out);
                    changed.send_modify(|v| *v += 1);
                }
            }
        }
        *open_pipes.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        changed.send_modify(|v| *v += 1);
    })
}

/// Starts `clusterconnect <args>` with `envs` added, HOME pointing at a fresh temp dir and
/// none of the caller's CLUSTERCONNECT_*, AZURE_*, KUBECONFIG, trust-store or proxy variables.
pub fn spawn<A: AsRef<OsStr>>(args: &[A], envs: &[(&str, &OsStr)]) -> Process {
    let home = tempfile::Builder::new()
        .prefix("clusterconnect-home-")
        .tempdir()
        .expect("create a private HOME");
    let mut cmd = command(args, envs, home.path());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn clusterconnect");
    let pid = child.id().expect("a just-spawned child has a pid");
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, changed) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let open_pipes = Arc::new(Mutex::new(2u8));
    let readers = vec![
        pump(
            child.stdout.take().expect("piped stdout"),
            output.clone(),
            tx.clone(),
            open_pipes.clone(),
        ),
        pump(
            child.stderr.take().expect("piped stderr"),
            output.clone(),
            tx,
            open_pipes,
        ),
    ];
    Process {
        child,
        pid,
        output,
        changed,
        readers,
        _home: home,
    }
}

/// [`spawn`], but nobody reads the child's output: its stdout and stderr are pipes whose
/// reading ends are closed at once, as when a supervisor or `| head -1` has gone away.
pub fn spawn_unread<A: AsRef<OsStr>>(
    args: &[A],
    envs: &[(&str, &OsStr)],
    home: &Path,
) -> tokio::process::Child {
    let mut cmd = command(args, envs, home);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn clusterconnect");
    drop(child.stdout.take());
    drop(child.stderr.take());
    child
}

fn command<A: AsRef<OsStr>>(args: &[A], envs: &[(&str, &OsStr)], home: &Path) -> Command {
    // Profiling: `BENCH_HEAPTRACK=proxy` (or another role) runs that role under heaptrack,
    // its trace in the temp dir (heaptrack.<role>.<pid>.zst). Killing the child leaves the
    // program running: kill it by its pid to end the trace with what it held then.
    let role = args
        .first()
        .map(|a| a.as_ref().to_string_lossy().into_owned());
    let mut cmd = match std::env::var("BENCH_HEAPTRACK") {
        Ok(profiled) if Some(&profiled) == role.as_ref() => {
            let mut cmd = Command::new("heaptrack");
            cmd.arg("-o")
                .arg(std::env::temp_dir().join(format!("heaptrack.{profiled}")))
                .arg(binary());
            cmd
        }
        _ => Command::new(binary()),
    };
    cmd.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        // The caller's own Azure identity must not leak into a test's credential chain.
        if n.starts_with("CLUSTERCONNECT_") || n.starts_with("AZURE_") {
            cmd.env_remove(&name);
        }
    }
    for name in [
        "IDENTITY_ENDPOINT",
        "IMDS_ENDPOINT",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(name);
    }
    for proxy in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(proxy);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `clusterconnect <args>` to completion (stdin closed, private HOME); panics after
/// `within`, killing it.
pub async fn run_to_end<A: AsRef<OsStr>>(
    args: &[A],
    envs: &[(&str, &OsStr)],
    within: Duration,
) -> Output {
    let home = tempfile::tempdir().expect("temp HOME");
    let mut cmd = command(args, envs, home.path());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn clusterconnect");
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for clusterconnect"),
        Err(_) => panic!(
            "clusterconnect {:?} did not finish within {within:?}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        ),
    }
}

impl Process {
    /// The private HOME the process runs with (removed when the `Process` is dropped).
    pub fn home(&self) -> &Path {
        self._home.path()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// For the bench's CPU readings (benches/tunnel.rs shares this file).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident set size in KiB (`VmRSS` of /proc/<pid>/status); 0 once the process is gone.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The highest resident set size so far in KiB (`VmHWM`); 0 once the process is gone.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn pipes_closed(&self) -> bool {
        self.readers.iter().all(JoinHandle::is_finished)
    }

    /// Waits until the output contains `needle`. `Ok` carries the output then; `Err` the
    /// output when `within` ran out or the process closed its output without printing it.
    pub async fn wait_for_output(&self, within: Duration, needle: &str) -> Result<String, String> {
        self.wait_for(within, |text| text.contains(needle)).await
    }

    /// Like [`Process::wait_for_output`] with any condition on the whole output so far.
    pub async fn wait_for(
        &self,
        within: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changed = self.changed.clone();
        loop {
            changed.borrow_and_update();
            let text = self.output();
            if done(&text) {
                return Ok(text);
            }
            if self.pipes_closed() {
                return Err(text);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // The reader tasks are gone: one last look, then give up.
                Ok(Err(_)) => {
                    let text = self.output();
                    return if done(&text) { Ok(text) } else { Err(text) };
                }
                Err(_) => return Err(self.output()),
            }
        }
    }

    /// Waits until some output line is a JSON log record whose `fields.message` is `message`,
    /// and returns that record.
    pub async fn wait_for_log(
        &self,
        within: Duration,
        message: &str,
    ) -> Result<serde_json::Value, String> {
        let text = self
            .wait_for(within, |text| find_log(text, message).is_some())
            .await?;
        Ok(find_log(&text, message).expect("just found"))
    }

    /// Sends SIGTERM (ignored if the process is already gone). A system call rather than the
    /// `kill` program, so no external program can be missing.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("pid fits in i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// Sends SIGHUP: a relay re-reads its rules.
    pub fn hang_up(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("pid fits in i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
    }

    /// Waits up to `within` for the process to exit; `None` if it is still running. After an
    /// exit, the remaining output is collected before returning.
    pub async fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()?;
        for reader in &mut self.readers {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        Some(status)
    }
}

/// The JSON log records in `text` whose `fields.message` is `message`, in order.
pub fn logs(text: &str, message: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str() == Some(message))
        .collect()
}

/// The first JSON log record in `text` whose `fields.message` is `message`.
pub fn find_log(text: &str, message: &str) -> Option<serde_json::Value> {
    logs(text, message).into_iter().next()
}

/// How many listeners for `connection` the relay has registered so far (its "listener
/// connected" records).
fn listeners_registered(relay_output: &str, connection: &str) -> usize {
    logs(relay_output, "listener connected")
        .iter()
        .filter(|r| r["fields"]["entity"].as_str() == Some(connection))
        .count()
}

/// A relay process in development mode (self-signed certificate, generated keys).
pub struct RelayProcess {
    pub process: Process,
    /// `wss://127.0.0.1:PORT`
    pub url: String,
    /// The dev CA the relay wrote next to its config (`relay-dev-ca.crt`).
    pub ca_path: PathBuf,
    /// `SharedAccessKeyName=listen;SharedAccessKey=...`, created by the relay.
    pub listen_key: PathBuf,
    /// `SharedAccessKeyName=send;SharedAccessKey=...`, created by the relay.
    pub send_key: PathBuf,
}

/// The relay.toml `start_relay` writes: a listen rule and a send rule, keys in files.
pub const RELAY_TOML: &str = r#"hostnames = []

[[rules]]
name = "listen"
key_file = "listen.key"
rights = ["listen"]

[[rules]]
name = "send"
key_file = "send.key"
rights = ["send"]
"#;

/// Writes `dir/relay.toml` and runs `relay --dev-self-signed` on 127.0.0.1:0; returns once it
/// logged "relay listening".
pub async fn start_relay(dir: &Path) -> RelayProcess {
    start_relay_with(dir, RELAY_TOML, &[]).await
}

/// [`start_relay`] with `toml` as the configuration and `envs` in its environment.
pub async fn start_relay_with(dir: &Path, toml: &str, envs: &[(&str, &OsStr)]) -> RelayProcess {
    let config = dir.join("relay.toml");
    std::fs::write(&config, toml).expect("write relay.toml");
    let process = spawn(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--dev-self-signed"),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--log-format"),
            OsStr::new("json"),
        ],
        envs,
    );
    let record = match process.wait_for_log(START_TIMEOUT, "relay listening").await {
        Ok(r) => r,
        Err(out) => panic!("relay did not start listening:\n{out}"),
    };
    let addr: SocketAddr = record["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("relay listening record without an addr: {record}"));
    RelayProcess {
        process,
        url: format!("wss://127.0.0.1:{}", addr.port()),
        ca_path: dir.join("relay-dev-ca.crt"),
        listen_key: dir.join("listen.key"),
        send_key: dir.join("send.key"),
    }
}

/// The agent's command line against `relay`, with `key_file` as its listen key.
pub fn agent_args(
    relay: &RelayProcess,
    apiserver_kubeconfig: &Path,
    connection: &str,
    key_file: &Path,
) -> Vec<OsString> {
    [
        OsStr::new("agent"),
        OsStr::new("--relay"),
        OsStr::new(&relay.url),
        OsStr::new("--connection"),
        OsStr::new(connection),
        OsStr::new("--key-file"),
        key_file.as_os_str(),
        OsStr::new("--relay-ca"),
        relay.ca_path.as_os_str(),
        OsStr::new("--kubeconfig"),
        apiserver_kubeconfig.as_os_str(),
        OsStr::new("--health-addr"),
        OsStr::new("off"),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]
    .iter()
    .map(|s| s.to_os_string())
    .collect()
}

/// Runs an agent with the relay's listen key; returns once one of its listeners logged
/// "listening" and the relay logged that it registered it (so a sender is routed to it).
pub async fn start_agent(
    relay: &RelayProcess,
    apiserver_kubeconfig: &Path,
    connection: &str,
) -> Process {
    start_agent_with(relay, apiserver_kubeconfig, connection, &[], &[]).await
}

/// [`start_agent`] with `extra` flags on its command line and `envs` in its environment.
pub async fn start_agent_with(
    relay: &RelayProcess,
    apiserver_kubeconfig: &Path,
    connection: &str,
    extra: &[&OsStr],
    envs: &[(&str, &OsStr)],
) -> Process {
    let before = listeners_registered(&relay.process.output(), connection);
    let mut args = agent_args(relay, apiserver_kubeconfig, connection, &relay.listen_key);
    args.extend(extra.iter().map(|a| a.to_os_string()));
    let process = spawn(&args, envs);
    if let Err(out) = process.wait_for_log(START_TIMEOUT, "listening").await {
        panic!("agent did not start listening:\n{out}");
    }
    if let Err(out) = relay
        .process
        .wait_for(START_TIMEOUT, |text| {
            listeners_registered(text, connection) > before
        })
        .await
    {
        panic!(
            "the relay never registered the agent's listener:\n{out}\nagent:\n{}",
            process.output()
        );
    }
    process
}

/// The proxy's command line against `relay`, with `key_file` as its send key.
pub fn proxy_args(
    relay: &RelayProcess,
    connection: &str,
    key_file: &Path,
    token_file: &Path,
    port: u16,
    kubeconfig_out: &Path,
) -> Vec<OsString> {
    let port = port.to_string();
    [
        OsStr::new("proxy"),
        OsStr::new("--relay"),
        OsStr::new(&relay.url),
        OsStr::new("--connection"),
        OsStr::new(connection),
        OsStr::new("--key-file"),
        key_file.as_os_str(),
        OsStr::new("--relay-ca"),
        relay.ca_path.as_os_str(),
        OsStr::new("--token-file"),
        token_file.as_os_str(),
        OsStr::new("--port"),
        OsStr::new(&port),
        OsStr::new("--file"),
        kubeconfig_out.as_os_str(),
        OsStr::new("--log-format"),
        OsStr::new("json"),
    ]
    .iter()
    .map(|s| s.to_os_string())
    .collect()
}

/// The port in the proxy's "Proxy is listening on https://127.0.0.1:PORT" line.
pub fn proxy_port(output: &str) -> Option<u16> {
    const PREFIX: &str = "Proxy is listening on https://127.0.0.1:";
    let rest = &output[output.find(PREFIX)? + PREFIX.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Runs a proxy on a free port with the relay's send key, `token` in
/// `config_dir/`[`TOKEN_FILE_NAME`] and `CLUSTERCONNECT_CONFIG_DIR=config_dir`, writing its
/// context into `kubeconfig_out`. Returns once it printed the port it listens on.
pub async fn start_proxy(
    relay: &RelayProcess,
    connection: &str,
    token: &str,
    kubeconfig_out: &Path,
    config_dir: &Path,
) -> (Process, u16) {
    start_proxy_with(relay, connection, token, (kubeconfig_out, config_dir), &[]).await
}

/// [`start_proxy`] with `envs` in its environment.
pub async fn start_proxy_with(
    relay: &RelayProcess,
    connection: &str,
    token: &str,
    (kubeconfig_out, config_dir): (&Path, &Path),
    envs: &[(&str, &OsStr)],
) -> (Process, u16) {
    std::fs::create_dir_all(config_dir).expect("create the proxy's config dir");
    let token_file = config_dir.join(TOKEN_FILE_NAME);
    std::fs::write(&token_file, token).expect("write the token file");
    let process = spawn(
        &proxy_args(
            relay,
            connection,
            &relay.send_key,
            &token_file,
            0,
            kubeconfig_out,
        ),
        &[
            &[("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str())],
            envs,
        ]
        .concat(),
    );
    match process
        .wait_for(START_TIMEOUT, |text| proxy_port(text).is_some())
        .await
    {
        Ok(out) => {
            let port = proxy_port(&out).expect("just found");
            (process, port)
        }
        Err(out) => panic!("proxy did not start listening:\n{out}"),
    }
}

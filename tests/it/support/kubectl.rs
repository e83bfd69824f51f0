//! Running the real kubectl against any kubeconfig (the stand-in directly, or a proxy in
//! front of it), isolated from the user's own ~/.kube and bounded in time.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use super::check::{describe, text};

/// Longest any single kubectl invocation may take before the test fails.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// `/usr/bin/kubectl`, else the first `kubectl` on PATH.
pub fn kubectl_binary() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/kubectl");
    if fixed.is_file() {
        return Some(fixed.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|candidate| candidate.is_file())
}

/// How to get the kubectl the end-to-end tests need.
pub const INSTALL_KUBECTL: &str = "install kubectl 1.32 as /usr/bin/kubectl, e.g. \
    curl -fsSLo /usr/bin/kubectl https://dl.k8s.io/release/v1.32.0/bin/linux/amd64/kubectl \
    && chmod 0755 /usr/bin/kubectl";

/// Whether the environment variable `CI` is set: there, a test never skips for want of a
/// program; it fails and says what to install.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Whether tests can use kubectl. When not, says so, so a skipped test is visibly skipped;
/// under CI (`CI` set) it panics instead, so a missing kubectl fails the run.
pub fn kubectl_available() -> bool {
    if kubectl_binary().is_some() {
        return true;
    }
    assert!(
        !in_ci(),
        "kubectl is not at /usr/bin/kubectl nor on PATH, and CI is set, so the kubectl \
         tests may not be skipped: {INSTALL_KUBECTL}"
    );
    eprintln!("skipping: kubectl is not at /usr/bin/kubectl nor on PATH ({INSTALL_KUBECTL})");
    false
}

fn command(kubeconfig: &Path, args: &[&str], envs: &[(&str, &str)], home: &Path) -> Command {
    let binary = kubectl_binary().expect("kubectl not found; check kubectl_available() first");
    let mut cmd = Command::new(binary);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        // A private HOME keeps discovery caches and config out of the real ~/.kube.
        .env("HOME", home)
        .env("KUBECACHEDIR", home.join("cache"))
        .env_remove("KUBECONFIG")
        .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
        .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS");
    // Tests choose their own proxy settings; the machine's must not leak in.
    for proxy in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(proxy);
    }
    cmd.envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn private_home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kubectl-home-")
        .tempdir()
        .expect("create kubectl home")
}

/// Runs `kubectl --kubeconfig <kubeconfig> <args>` to completion with stdin closed. Panics
/// (killing kubectl) if it takes longer than [`KUBECTL_TIMEOUT`].
pub async fn kubectl(kubeconfig: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let home = private_home();
    let child = command(kubeconfig, args, envs, home.path())
        .spawn()
        .expect("spawn kubectl");
    match tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.expect("wait for kubectl"),
        Err(_) => panic!("kubectl {args:?} did not finish within {KUBECTL_TIMEOUT:?}"),
    }
}

/// Runs kubectl like [`kubectl`] (no extra environment) and asserts that it succeeded, with
/// its arguments, status, stdout and stderr in the panic message; returns its stdout.
pub async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    kubectl_ok_with(kubeconfig, args, &[]).await
}

/// [`kubectl_ok`] with extra environment variables for kubectl.
pub async fn kubectl_ok_with(kubeconfig: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = kubectl(kubeconfig, args, envs).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        describe(&out)
    );
    text(&out.stdout)
}

/// A running kubectl whose stdin the test writes and whose stdout it reads as it comes:
/// `exec -i`, `port-forward`, `get -w`, `logs -f`.
pub struct KubectlProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    seen: Vec<u8>,
    stdout_done: bool,
    stderr: JoinHandle<Vec<u8>>,
    _home: tempfile::TempDir,
}

/// Starts kubectl; with `stdin` true its stdin is a pipe the test controls, else it is closed.
pub fn spawn_kubectl(
    kubeconfig: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: bool,
) -> KubectlProcess {
    let home = private_home();
    let mut cmd = command(kubeconfig, args, envs, home.path());
    if stdin {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn kubectl");
    let mut stderr = child.stderr.take().expect("piped stderr");
    // Drained in the background so a chatty kubectl never blocks on a full pipe.
    let stderr = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    KubectlProcess {
        stdin: child.stdin.take(),
        stdout: child.stdout.take().expect("piped stdout"),
        child,
        seen: Vec::new(),
        stdout_done: false,
        stderr,
        _home: home,
    }
}

impl KubectlProcess {
    pub async fn write_stdin(&mut self, data: &[u8]) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed"))?;
        stdin.write_all(data).await?;
        stdin.flush().await
    }

    /// Closes kubectl's stdin (end of input for `exec -i`).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Everything read from stdout so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads stdout until `done` holds for everything read so far. `Err` carries what was read
    /// when the time ran out or stdout ended first.
    pub async fn read_stdout_until(
        &mut self,
        within: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.stdout_so_far();
            if done(&text) {
                return Ok(text);
            }
            if self.stdout_done {
                return Err(text);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stdout.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.stdout_done = true,
                Ok(Ok(n)) => self.seen.extend_from_slice(&chunk[..n]),
                Err(_) => return Err(text),
            }
        }
    }

    /// Closes stdin and waits for kubectl to exit by itself, killing it after `within`.
    /// The output's stdout includes what was already read.
    pub async fn finish(mut self, within: Duration) -> Output {
        self.close_stdin();
        let deadline = tokio::time::Instant::now() + within;
        let mut rest = Vec::new();
        if !self.stdout_done {
            let _ = tokio::time::timeout_at(deadline, self.stdout.read_to_end(&mut rest)).await;
        }
        self.seen.extend_from_slice(&rest);
        let status = match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait for kubectl"),
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await.expect("wait for killed kubectl")
            }
        };
        self.collect(status).await
    }

    /// Kills kubectl (for commands that never end by themselves) and returns its output.
    pub async fn kill(mut self) -> Output {
        let _ = self.child.start_kill();
        let status = self.child.wait().await.expect("wait for killed kubectl");
        self.collect(status).await
    }

    async fn collect(self, status: std::process::ExitStatus) -> Output {
        let stderr = tokio::time::timeout(Duration::from_secs(5), self.stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Output {
            status,
            stdout: self.seen,
            stderr,
        }
    }
}

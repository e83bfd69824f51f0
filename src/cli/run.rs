//! `clusterconnect run -- CMD`: the proxy for exactly as long as one command needs it. Made
//! for CI: nothing to start in the background, nothing to kill, the user's kubeconfig never
//! read or written, and the exit status is the command's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::clusters::ClusterFlags;
use super::proxy::{start, wait_ready, NotReady};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub clusters: ClusterFlags,
    /// How long to wait for the tunnel to answer before giving up.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    pub wait: Duration,
    /// Start $SHELL (or /bin/sh) with KUBECONFIG set, instead of a command.
    #[arg(long, conflicts_with = "command")]
    pub shell: bool,
    /// The command and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
    /// Serve the proxy's Prometheus metrics on HOST:PORT at /metrics (plain HTTP) while the
    /// command runs; off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let command: Vec<String> = if args.shell {
        vec![std::env::var("SHELL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".into())]
    } else {
        args.command.clone()
    };
    let Some((program, program_args)) = command.split_first() else {
        anyhow::bail!("nothing to run: give a command after `--` (e.g. `clusterconnect run ... -- kubectl get pods`), or --shell");
    };
    let clusters = args.clusters.resolve().await?;
    let mut registry = crate::metrics::registry();
    let metrics = crate::metrics::ProxyMetrics::register(&mut registry);
    if let Some(addr) = &args.metrics_addr {
        crate::metrics::start(addr, registry, shutdown.clone()).await?;
    }
    let started = start(clusters, Some(0), (metrics, Default::default())).await?;
    let names = started.proxy.cluster_names();

    // A private directory (0700) holds the kubeconfig; it is removed on every way out.
    let dir = tempfile::Builder::new()
        .prefix("clusterconnect-run-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("cannot create a private temporary directory")?;
    let kubeconfig: PathBuf = dir.path().join("kubeconfig");
    started.write_kubeconfig(&kubeconfig, false, false)?;

    let prober = started.proxy.prober();
    let proxy_stop = CancellationToken::new();
    let serving = tokio::spawn(started.proxy.serve(started.listener, proxy_stop.clone()));

    let ready = tokio::select! {
        r = wait_ready(&prober, &names, args.wait) => r,
        _ = shutdown.cancelled() => Err(NotReady::Interrupted),
    };
    if let Err(e) = ready {
        proxy_stop.cancel();
        let _ = serving.await;
        return Err(anyhow::Error::new(e).context("the tunnel is not usable"));
    }
    tracing::info!(contexts = %names.join(","), "tunnel ready; starting {program}");

    let mut child = tokio::process::Command::new(program)
        .args(program_args)
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {program:?}"))?;

    let status = tokio::select! {
        status = child.wait() => status,
        _ = shutdown.cancelled() => {
            // Pass the stop request on and let the command decide how to end; a second
            // signal ends clusterconnect itself (see main).
            forward_terminate(&child);
            child.wait().await
        }
    }
    .context("waiting for the command failed")?;
    proxy_stop.cancel();
    let _ = serving.await;
    drop(dir);
    Ok(exit_code(status))
}

#[cfg(unix)]
fn forward_terminate(child: &tokio::process::Child) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

#[cfg(not(unix))]
fn forward_terminate(_child: &tokio::process::Child) {}

/// The command's exit status, or 128+signal when a signal ended it (as shells report it).
fn exit_code(status: std::process::ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + signal).unwrap_or(255);
        }
    }
    1
}

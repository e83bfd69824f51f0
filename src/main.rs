//! The `clusterconnect` binary: parse flags, set up logging and signals, run a role.
#![forbid(unsafe_code)]

use std::io::Write as _;

use clap::Parser;
use clusterconnect::cli::{Cli, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// `RUST_LOG`, or `info`. rustls logs each stranger's broken handshake (an alert, a stray
/// ChangeCipherSpec) at warn, a flood anyone can cause on a relay, so it logs errors only
/// unless `RUST_LOG` names it.
fn log_filter() -> EnvFilter {
    let wanted = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = match EnvFilter::try_new(if wanted.trim().is_empty() {
        "info"
    } else {
        &wanted
    }) {
        Ok(filter) => filter,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "warning: RUST_LOG is not a valid filter ({e}); logging at info"
            );
            EnvFilter::new("info")
        }
    };
    if !wanted.contains("rustls") {
        if let Ok(quiet) = "rustls=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    filter
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = log_filter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its default reports a failed write with eprintln!, which panics when nobody reads
        // standard error any more: the task that logged (a signal handler, a request) died.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads() {
        runtime.worker_threads(threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        match clusterconnect::cli::run(cli, shutdown).await {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// First SIGINT/SIGTERM: stop accepting and drain. A second one: exit now.
async fn on_signal(shutdown: CancellationToken) {
    let mut count = 0;
    loop {
        wait_for_signal().await;
        count += 1;
        if count > 1 {
            let _ = writeln!(std::io::stderr(), "second signal: exiting without draining");
            std::process::exit(130);
        }
        tracing::info!("shutting down (signal again to force)");
        shutdown.cancel();
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

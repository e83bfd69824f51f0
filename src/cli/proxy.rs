//! `clusterconnect proxy`, and the start-up both it and `run` share: local CA, listener,
//! tunnels, kubeconfig entries.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::clusters::ClusterFlags;
use crate::metrics::ProxyMetrics;
use crate::proxy::kubeconfig::{self, Entry};
use crate::proxy::{
    local_ca, local_token, new_local_secret, server_url, ClusterConfig, ProbeError, Prober, Proxy,
    ProxyConfig, TunnelError, DEFAULT_PORT,
};
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::http::error_chain;

/// Ports tried after the default when another proxy already holds it.
const PORT_RANGE: u16 = 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub clusters: ClusterFlags,
    /// Local port on 127.0.0.1 [default: 47011, or the next free one up to 47030].
    #[arg(long)]
    pub port: Option<u16>,
    /// Kubeconfig to write the contexts into ("-" prints it); default $KUBECONFIG or ~/.kube/config.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Add the contexts without changing current-context.
    #[arg(long)]
    pub keep_context: bool,
    /// Replace a same-name context, cluster or user that clusterconnect did not write (by
    /// default the proxy refuses to touch it).
    #[arg(long)]
    pub overwrite_context: bool,
    /// Format of the readiness line printed on stdout once traffic flows.
    #[arg(long, short = 'o', value_enum, default_value_t = ReadyFormat::Text)]
    pub output: ReadyFormat,
    /// Serve Prometheus metrics on HOST:PORT at /metrics (plain HTTP); off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Requests and watches in flight on one tunnel connection before another is opened (at
    /// most 64 per cluster); keep it under the agent's 1,024 streams per connection.
    #[arg(long, default_value_t = crate::proxy::STREAMS_PER_CONNECTION as u16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub streams_per_connection: u16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReadyFormat {
    Text,
    Json,
}

/// A proxy bound and warmed up, not yet serving.
pub struct Started {
    pub proxy: Proxy,
    pub listener: TcpListener,
    pub port: u16,
    pub ca_pem: String,
    pub local_secret: Secret,
}

impl Started {
    pub fn entries(&self) -> Vec<(String, String)> {
        self.proxy
            .cluster_names()
            .into_iter()
            .map(|n| {
                let url = server_url(self.port, &n);
                (n, url)
            })
            .collect()
    }

    /// Merges one context per cluster into the kubeconfig at `path`, all under one lock; the
    /// first becomes current unless `keep_context`. Same-name entries clusterconnect did not
    /// write are refused unless `overwrite`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        keep_context: bool,
        overwrite: bool,
    ) -> anyhow::Result<()> {
        let entries = self.entries();
        let tokens: Vec<Secret> = entries
            .iter()
            .map(|(name, _)| local_token(&self.local_secret, name))
            .collect();
        let entries: Vec<Entry> = entries
            .iter()
            .zip(&tokens)
            .map(|((name, server), token)| Entry {
                name,
                server,
                ca_pem: &self.ca_pem,
                token,
            })
            .collect();
        let options = kubeconfig::Options {
            set_current: !keep_context,
            overwrite,
            lock_wait: kubeconfig::LOCK_WAIT,
        };
        kubeconfig::write_many(path, &entries, &options)
            .context("cannot write the kubeconfig context")?;
        Ok(())
    }

    pub fn kubeconfig_text(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        for (i, (name, server)) in self.entries().iter().enumerate() {
            let token = local_token(&self.local_secret, name);
            let entry = Entry {
                name,
                server,
                ca_pem: &self.ca_pem,
                token: &token,
            };
            let options = kubeconfig::Options {
                set_current: i == 0,
                ..kubeconfig::Options::default()
            };
            text = kubeconfig::merge(&text, &entry, &options, Path::new("-"))?;
        }
        Ok(text)
    }
}

async fn bind(port: Option<u16>) -> anyhow::Result<TcpListener> {
    let candidates: Vec<u16> = match port {
        Some(p) => vec![p],
        None => (DEFAULT_PORT..DEFAULT_PORT + PORT_RANGE).collect(),
    };
    for p in &candidates {
        match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, *p))).await {
            Ok(l) => {
                if port.is_none() && *p != DEFAULT_PORT {
                    tracing::info!(
                        port = p,
                        "port {DEFAULT_PORT} is taken (another proxy?); using the next free one"
                    );
                }
                return Ok(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(anyhow::anyhow!("cannot listen on 127.0.0.1:{p}: {e}")),
        }
    }
    match port {
        Some(p) => anyhow::bail!("port {p} on 127.0.0.1 is already in use (another proxy?); pass --port with a free port"),
        None => anyhow::bail!(
            "ports {DEFAULT_PORT}-{} on 127.0.0.1 are all in use; pass --port with a free port",
            DEFAULT_PORT + PORT_RANGE - 1
        ),
    }
}

pub async fn start(
    clusters: Vec<ClusterConfig>,
    port: Option<u16>,
    (metrics, pool): (ProxyMetrics, crate::proxy::PoolLimits),
) -> anyhow::Result<Started> {
    let listener = bind(port).await?;
    let port = listener.local_addr()?.port();
    let (ca, leaf) = local_ca::load_or_create(&local_ca::config_dir())?;
    let local_tls = tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &[tls::ALPN_H2, tls::ALPN_HTTP11],
    )?;
    let local_secret = new_local_secret();
    let proxy = Proxy::new(ProxyConfig {
        clusters,
        local_tls,
        local_secret: local_secret.clone(),
        metrics,
        pool,
    });
    for (name, result) in proxy.warm_up().await {
        match result {
            Ok(()) => {}
            Err(TunnelError::Dial(e)) if e.is_no_listener() => {
                tracing::warn!(cluster = %name, "the cluster agent is not connected to the relay yet; requests fail until it is")
            }
            Err(TunnelError::Dial(e)) if e.is_unreachable() => {
                tracing::warn!(cluster = %name, error = %error_chain(&e), "the relay is not reachable yet; requests to this cluster fail until it is, and each one tries it again")
            }
            Err(TunnelError::Dial(e)) if e.is_auth() => anyhow::bail!(
                "cluster '{name}': the relay refused the send token: {e}. Check --key-file and that its rule has the Send right"
            ),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cluster '{name}': cannot reach it through the relay"))),
        }
    }
    Ok(Started {
        proxy,
        listener,
        port,
        ca_pem: ca.cert_pem().to_string(),
        local_secret,
    })
}

/// Why the tunnel did not become usable.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("cluster '{cluster}'")]
    Failed {
        cluster: String,
        #[source]
        source: ProbeError,
    },
    #[error("cluster '{cluster}' did not answer within {}s", within.as_secs())]
    Timeout { cluster: String, within: Duration },
    #[error("interrupted while waiting for the tunnel")]
    Interrupted,
}

/// Waits until every cluster answers `/version` through the tunnel, retrying failures that
/// can clear by themselves (agent not yet connected) until `within` runs out.
pub async fn wait_ready(
    prober: &Prober,
    names: &[String],
    within: Duration,
) -> Result<(), NotReady> {
    let deadline = tokio::time::Instant::now() + within;
    for name in names {
        loop {
            let attempt = tokio::time::timeout_at(deadline, prober.probe(name)).await;
            match attempt {
                Ok(Ok(())) => break,
                Ok(Err(e))
                    if tokio::time::Instant::now() + Duration::from_millis(250) < deadline
                        && e.is_transient() =>
                {
                    tracing::debug!(cluster = %name, error = %error_chain(&e), "not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(Err(source)) => {
                    return Err(NotReady::Failed {
                        cluster: name.clone(),
                        source,
                    })
                }
                Err(_) => {
                    return Err(NotReady::Timeout {
                        cluster: name.clone(),
                        within,
                    })
                }
            }
        }
    }
    Ok(())
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let clusters = args.clusters.resolve().await?;
    let kubeconfig_path = match args.file.as_deref() {
        Some(p) if p.as_os_str() == "-" => None,
        other => Some(
            other
                .map(PathBuf::from)
                .unwrap_or_else(kubeconfig::default_path),
        ),
    };
    // A context that is not ours is refused before the proxy connects anywhere.
    if let (Some(path), false) = (&kubeconfig_path, args.overwrite_context) {
        let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
        kubeconfig::check_foreign(path, &names).context("cannot write the kubeconfig context")?;
    }
    let mut registry = crate::metrics::registry();
    let metrics = ProxyMetrics::register(&mut registry);
    if let Some(addr) = &args.metrics_addr {
        crate::metrics::start(addr, registry, shutdown.clone()).await?;
    }
    let pool = crate::proxy::PoolLimits {
        streams_per_connection: usize::from(args.streams_per_connection),
        ..Default::default()
    };
    let started = start(clusters, args.port, (metrics, pool)).await?;
    let names = started.proxy.cluster_names();
    let kubeconfig_on_stdout = kubeconfig_path.is_none();
    let target = match kubeconfig_path {
        None => {
            out!("{}", started.kubeconfig_text()?);
            "standard output".to_string()
        }
        Some(path) => {
            started.write_kubeconfig(&path, args.keep_context, args.overwrite_context)?;
            path.display().to_string()
        }
    };
    let port = started.port;
    errln!(
        "Proxy is listening on https://127.0.0.1:{port} for {}.",
        names.join(", ")
    );
    errln!(
        "Context(s) {} written to {target}. Press Ctrl+C to stop.",
        names.join(", ")
    );

    // The readiness line: printed once every cluster really answers, for tools that start the
    // proxy themselves and must not guess when it is usable.
    let prober = started.proxy.prober();
    let ready_names = names.clone();
    let format = args.output;
    let ready_stop = shutdown.clone();
    tokio::spawn(async move {
        // A cause that does not clear by itself (a refused credential) is warned about a
        // few times, then once a minute, not every two seconds for as long as it lasts.
        let mut pause = Duration::from_secs(2);
        loop {
            match wait_ready(&prober, &ready_names, Duration::from_secs(30)).await {
                Ok(()) => {
                    print_ready(format, port, &ready_names, (&target, kubeconfig_on_stdout));
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), retry_in_s = pause.as_secs(), "not ready yet; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = ready_stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(60));
        }
    });
    started.proxy.serve(started.listener, shutdown).await?;
    Ok(0)
}

/// The readiness line, on standard output unless the kubeconfig went there (`--file -`): then
/// standard output holds the kubeconfig alone, and the line goes to standard error.
fn print_ready(
    format: ReadyFormat,
    port: u16,
    names: &[String],
    (kubeconfig, on_stdout): (&str, bool),
) {
    let line = match format {
        ReadyFormat::Text => format!(
            "ready port={port} contexts={} kubeconfig={kubeconfig}",
            names.join(",")
        ),
        ReadyFormat::Json => serde_json::json!({"event": "ready", "port": port, "contexts": names, "kubeconfig": kubeconfig}).to_string(),
    };
    if on_stdout {
        errln!("{line}");
    } else {
        outln!("{line}");
    }
}

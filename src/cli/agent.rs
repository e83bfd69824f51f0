//! `clusterconnect agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::RelayFlags;
use crate::agent::{AgentConfig, Upstream, DEFAULT_TOKEN_TTL};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub relay: RelayFlags,
    /// Kubeconfig for reaching the apiserver when not running in a pod.
    #[arg(long, env = "CLUSTERCONNECT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context in that kubeconfig.
    #[arg(long)]
    pub context: Option<String>,
    /// Listener control channels to keep open (the relay spreads connections across them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=25))]
    pub listeners: u16,
    /// Address for /healthz and /readyz, or "off".
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub health_addr: String,
    /// Lifetime of the listen tokens the agent mints (renewed at three quarters).
    #[arg(long, value_parser = super::parse_duration)]
    pub token_ttl: Option<Duration>,
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (relay, key, tls) = args.relay.resolve()?;
    let upstream = Upstream::load(args.kubeconfig.clone(), args.context.clone()).await?;
    let health = match args.health_addr.as_str() {
        "off" | "" => None,
        addr => {
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("--health-addr {addr:?} is not host:port or \"off\""))?;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for health probes on {addr}"))?,
            )
        }
    };
    let ttl = args.token_ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl < Duration::from_secs(60) {
        anyhow::bail!("--token-ttl must be at least 60s");
    }
    let config = AgentConfig {
        relay,
        entity: args.relay.connection.clone(),
        key,
        relay_tls: tls,
        listeners: args.listeners as usize,
        token_ttl: ttl,
    };
    crate::agent::run(config, upstream, health, shutdown).await?;
    Ok(())
}

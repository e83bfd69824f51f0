//! `clusterconnect proxy`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::RelayFlags;
use crate::auth::{CredentialSource, StaticToken, TokenFile};
use crate::proxy::kubeconfig::{self, Entry};
use crate::proxy::{
    local_ca, new_local_secret, Proxy, ProxyConfig, RelayTarget, TunnelError, DEFAULT_PORT,
};
use crate::secret::Secret;
use crate::tls;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub relay: RelayFlags,
    /// Bearer token for the apiserver (a service-account token). Prefer --token-file or the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        env = "CLUSTERCONNECT_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token; re-read as it rotates.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Local port on 127.0.0.1.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Kubeconfig to write the context into ("-" prints it); default $KUBECONFIG or ~/.kube/config.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Add the context without making it the current one.
    #[arg(long)]
    pub keep_context: bool,
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (relay, key, relay_tls) = args.relay.resolve()?;
    let credential: Arc<dyn CredentialSource> = match (&args.token, &args.token_file) {
        (Some(t), None) if !t.trim().is_empty() => Arc::new(StaticToken::new(Secret::new(t.trim()))),
        (None, Some(path)) => {
            let source = TokenFile::new(path.clone());
            source.token().await?;
            Arc::new(source)
        }
        _ => anyhow::bail!("the proxy needs a credential for the apiserver: pass --token, --token-file or CLUSTERCONNECT_TOKEN"),
    };

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("port {} on 127.0.0.1 is already in use (another proxy?); pass --port with a free port", args.port)
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    let port = listener.local_addr()?.port();

    let config_dir = local_ca::config_dir();
    let (ca, leaf) = local_ca::load_or_create(&config_dir)?;
    let local_tls = tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &[tls::ALPN_H2, tls::ALPN_HTTP11],
    )?;
    let local_secret = new_local_secret();
    let name = args.relay.connection.replace('/', "-");
    let server = format!("https://127.0.0.1:{port}");
    let entry = Entry {
        name: &name,
        server: &server,
        ca_pem: ca.cert_pem(),
        token: &local_secret,
    };

    let proxy = Proxy::new(ProxyConfig {
        target: RelayTarget {
            relay,
            entity: args.relay.connection.clone(),
            key,
            tls: relay_tls,
        },
        credential,
        local_tls,
        local_secret: local_secret.clone(),
    });
    match proxy.warm_up().await {
        Ok(()) => {}
        Err(TunnelError::Dial(e)) if e.is_no_listener() => {
            tracing::warn!(connection = %args.relay.connection, "the cluster agent is not connected to the relay yet; requests will fail until it is")
        }
        Err(TunnelError::Dial(e)) if e.is_auth() => {
            return Err(anyhow::anyhow!("the relay refused the send token: {e}. Check --key-file and that its rule has the Send right for '{}'", args.relay.connection))
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot reach the cluster through the relay")),
    }

    let target = match args.file.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            let text = kubeconfig::merge("", &entry, true, p)?;
            print!("{text}");
            "standard output".to_string()
        }
        other => {
            let path = other
                .map(PathBuf::from)
                .unwrap_or_else(kubeconfig::default_path);
            kubeconfig::write(&path, &entry, !args.keep_context)
                .context("cannot write the kubeconfig context")?;
            path.display().to_string()
        }
    };
    eprintln!(
        "Proxy is listening on {server} for connection '{}'.",
        args.relay.connection
    );
    eprintln!("Context '{name}' written to {target}. Press Ctrl+C to stop.");
    proxy.serve(listener, shutdown).await?;
    Ok(())
}

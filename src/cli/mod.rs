//! Command-line entry: one file per subcommand, each turning flags into a role's config and
//! running it. Errors become messages that say what was wrong and what to do.

mod agent;
pub mod clusters;
mod completion;
mod connect;
mod entra;
mod extension;
mod inventory;
mod keys;
mod kubeclient;
mod output;
mod proxy;
mod registry;
pub(crate) mod relay;
mod run;
mod sas;
mod secrets;
mod token;
mod up;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "clusterconnect",
    version,
    about = "Reach Kubernetes clusters behind outbound-only firewalls with plain kubectl",
    long_about = "Reach Kubernetes clusters behind outbound-only firewalls with plain kubectl.\n\n\
        relay  runs where both sides can reach it (TLS, port 443)\n\
        agent  runs next to the cluster and dials out to the relay\n\
        proxy  runs next to kubectl, serves 127.0.0.1:47011 and writes a kubeconfig context\n\n\
        The relay speaks the Azure Relay Hybrid Connections protocol, so agent and proxy also\n\
        work against an Azure Relay namespace."
)]
pub struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads running the async work; by default one for `proxy`, `run` and the short
    /// commands (one machine's kubectl load: a single thread spares the wake-ups of idle
    /// ones, about 0.05 ms per request), one per CPU for `relay`, `agent` and `up`.
    #[arg(long, global = true, env = "CLUSTERCONNECT_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The runtime's worker threads: the flag's, else the role's (`None`: one per CPU).
    pub fn worker_threads(&self) -> Option<usize> {
        if let Some(n) = self.worker_threads {
            return Some(n.into());
        }
        match self.command {
            Command::Relay(_) | Command::Agent(_) | Command::Up(_) => None,
            _ => Some(1),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Try it in one command: relay, agent and proxy in this process against your current
    /// kubeconfig context, and a `clusterconnect-<context>` context through the whole tunnel.
    Up(up::Args),
    /// Run the relay (rendezvous service both sides dial out to).
    Relay(relay::Args),
    /// Run the cluster agent (listens on the relay, forwards to the apiserver).
    Agent(agent::Args),
    /// Run the local proxy for kubectl and write a kubeconfig context per cluster.
    Proxy(proxy::Args),
    /// Run one command (kubectl, helm, a script) with a private kubeconfig through the tunnel;
    /// exits with the command's status. Made for CI.
    Run(run::Args),
    /// Make relay keys and SAS tokens.
    #[command(subcommand)]
    Sas(sas::Command),
    /// List the clusters registered with a relay (like `az connectedk8s list`).
    List(inventory::ListArgs),
    /// Show one registered cluster (like `az connectedk8s show`).
    Show(inventory::ShowArgs),
    /// Install the agent in the cluster of your kubeconfig and register it with the relay
    /// (like `az connectedk8s connect`); safe to run again.
    Connect(Box<connect::ConnectArgs>),
    /// Remove the agent from the cluster and its registration (like `az connectedk8s delete`).
    Disconnect(Box<connect::DisconnectArgs>),
    /// A registered cluster's agent keys: list them, or renew one (like `az relay hyco
    /// authorization-rule keys`); what an old key authorized is closed at once.
    #[command(subcommand)]
    Keys(Box<keys::Command>),
    /// Shell completions for bash, zsh, fish, elvish or PowerShell, on standard output.
    Completion(completion::CompletionArgs),
    /// The manual page (roff), or a subcommand's, on standard output.
    Man(completion::ManArgs),
    /// Service-account tokens for kubectl through the proxy.
    #[command(subcommand)]
    Token(token::Command),
    /// Azure Key Vault secrets, keys and certificates: print one, or sync a SecretProviderClass
    /// into Kubernetes Secrets and files, with rotation.
    #[command(subcommand)]
    Secrets(secrets::Command),
    /// The Azure Key Vault Secrets Provider as a cluster extension (like `az k8s-extension`):
    /// create, update, show, list, delete.
    #[command(subcommand)]
    Extension(Box<extension::Command>),
}

/// Runs the chosen subcommand; the result is the process exit status.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<u8> {
    match cli.command {
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Relay(args) => relay::run(args, shutdown).await.map(|()| 0),
        Command::Agent(args) => agent::run(args, shutdown).await.map(|()| 0),
        Command::Proxy(args) => proxy::run(args, shutdown).await,
        Command::Run(args) => run::run(args, shutdown).await,
        Command::Sas(cmd) => sas::run(cmd).map(|()| 0),
        Command::List(args) => inventory::list(args).await.map(|()| 0),
        Command::Show(args) => inventory::show(args).await.map(|()| 0),
        Command::Connect(args) => connect::connect(*args).await.map(|()| 0),
        Command::Disconnect(args) => connect::disconnect(*args).await.map(|()| 0),
        Command::Completion(args) => completion::completion(args).map(|()| 0),
        Command::Man(args) => completion::man(args).map(|()| 0),
        Command::Keys(cmd) => keys::run(*cmd).await.map(|()| 0),
        Command::Token(cmd) => token::run(cmd).await.map(|()| 0),
        Command::Secrets(cmd) => secrets::run(cmd, shutdown).await,
        Command::Extension(cmd) => extension::run(*cmd, shutdown).await,
    }
}

/// The relay connection flags agent and proxy share.
#[derive(clap::Args, Debug)]
pub struct RelayFlags {
    /// Relay address: wss://host[:port] (sb://<namespace>.servicebus.windows.net for Azure Relay).
    #[arg(long, env = "CLUSTERCONNECT_RELAY")]
    pub relay: String,
    /// Hybrid connection name; one per cluster.
    #[arg(long, env = "CLUSTERCONNECT_CONNECTION")]
    pub connection: String,
    /// File holding the rule's key: "SharedAccessKeyName=<rule>;SharedAccessKey=<key>" (an Azure
    /// connection string works too).
    #[arg(long, env = "CLUSTERCONNECT_KEY_FILE")]
    pub key_file: PathBuf,
    /// Extra CA certificate (PEM) to trust for the relay, besides the system roots.
    #[arg(long, env = "CLUSTERCONNECT_RELAY_CA")]
    pub relay_ca: Option<PathBuf>,
}

impl RelayFlags {
    pub fn resolve(
        &self,
    ) -> anyhow::Result<(
        crate::tunnel::protocol::RelayAddress,
        crate::tunnel::sas::SasKey,
        std::sync::Arc<rustls::ClientConfig>,
    )> {
        let relay = crate::tunnel::protocol::RelayAddress::parse(&self.relay)?;
        crate::tunnel::protocol::validate_entity(&self.connection)?;
        let key = crate::tunnel::sas::SasKey::from_file(&self.key_file)?;
        let tls = crate::tls::client_config(self.relay_ca.as_deref(), &[])
            .context("cannot set up TLS for the relay connection")?;
        Ok((relay, key, tls))
    }
}

/// Asks `question` on the terminal (y/N) unless `yes`; without a terminal `--yes` is required
/// and `without_terminal` says what would have been done.
pub(crate) fn confirm(yes: bool, without_terminal: &str, question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal};
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{without_terminal}; pass --yes to confirm when not at a terminal");
    }
    err!("{question} (y/N): ");
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

/// Durations such as "90s", "30m", "1h", at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 30m, 1h)"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{s} is longer than any wait or lifetime here; at most 3650d"
        ));
    }
    Ok(d)
}

/// The longest duration a flag takes (ten years): the flags are timeouts, deadlines and token
/// lifetimes, and a longer one would overflow the clock it is added to.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(3650 * 24 * 3600);

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_bounded() {
        assert_eq!(
            super::parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert!(super::parse_duration("3650d").is_ok());
        let err = super::parse_duration("10000000000000000000s").unwrap_err();
        assert!(err.contains("at most 3650d"), "{err}");
        assert!(super::parse_duration("soon")
            .unwrap_err()
            .contains("examples"));
    }

    #[test]
    fn every_subcommand_has_consistent_flags() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

//! clusterconnect: reach Kubernetes API servers that sit behind firewalls allowing no inbound
//! traffic. Three roles share one tunnel:
//!
//! - [`relay`]: the rendezvous service both sides dial out to (Azure Relay Hybrid Connections
//!   protocol, so a real Azure Relay namespace can stand in for it);
//! - [`agent`]: runs next to the cluster, listens on the relay and forwards to the apiserver;
//! - [`proxy`]: runs next to `kubectl`, serves 127.0.0.1 and carries every request through the relay.
//!
//! Shared mechanisms: [`tunnel`] (protocol, SAS tokens, WebSocket byte streams), [`tls`] (rustls
//! configuration and certificate generation), [`auth`] (credential sources) and [`entra`]
//! (Microsoft Entra ID: token acquisition and validation). [`onboard`] installs the agent in a
//! cluster and registers it (`connect`, `disconnect`, `token create`); [`extension`] installs
//! the Key Vault Secrets Provider extension and is its in-cluster controller.
//! Dependency direction (docs/architecture.md explains it):
//! `cli -> {relay, agent, proxy, onboard, secrets, extension} -> {arm, entra, auth} -> tunnel ->
//! {tls, net, files, secret}` (`extension` builds on `secrets` and `onboard`); [`metrics`] (Prometheus) is used by the roles and uses only
//! `net`. No role imports another, nothing imports upward, and no two
//! files import each other.
#![forbid(unsafe_code)]

/// `println!` that ignores a standard output nobody reads any more instead of panicking:
/// `clusterconnect list | head -1`, or a supervisor that stopped reading a running proxy's
/// output, must neither crash a command nor stop a proxy.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!`, as `outln`: a closed standard output is not an error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = write!(stdout, $($arg)*);
        let _ = stdout.flush();
    }};
}

/// `eprintln!` that ignores a closed standard error (see `outln`).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!`, as `errln`.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, $($arg)*);
        let _ = stderr.flush();
    }};
}

pub mod agent;
pub mod arm;
pub mod auth;
pub mod cli;
pub mod entra;
pub mod extension;
pub mod files;
pub mod metrics;
pub mod net;
pub mod onboard;
pub mod proxy;
pub mod relay;
pub mod secret;
pub mod secrets;
pub mod tls;
pub mod tunnel;

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

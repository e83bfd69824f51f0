//! Shared integration-test support: a stand-in Kubernetes API server that real kubectl talks
//! to, and helpers that run kubectl in isolation.
// tests/it uses all of it; benches/tunnel.rs uses a part, through tests/it/bench_support.rs.

pub mod apiserver;
pub mod body;
pub mod check;
pub mod connect_proxy;
pub mod discovery;
pub mod entra;
pub mod imds;
pub mod keyvault;
pub mod kubectl;
pub mod objects;
pub mod patch;
pub mod portforward;
pub mod processes;
pub mod rbac;
pub mod remotecommand;
pub mod resources;
pub mod serve;
pub mod spdy;
pub mod tunnel;
pub mod ws_bytes;

pub use apiserver::{ApiServer, SeenRequest, SERVICE_ACCOUNT};
pub use entra::{Entra, TokenRequest};
pub use imds::{Himds, Imds};
pub use kubectl::{
    kubectl, kubectl_available, kubectl_binary, kubectl_ok, kubectl_ok_with, spawn_kubectl,
    KubectlProcess,
};

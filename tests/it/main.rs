//! The integration tests: one test binary, so the shared support code (the stand-in
//! apiserver, the Entra/IMDS/Key Vault stand-ins, the tunnel harness) is compiled once.
//! Each area is a module; run one with `cargo test --test it <module>::`.
//!
//! Every test shares this process: none may set environment variables, change the current
//! directory, bind fixed ports or install a global tracing subscriber.

mod support;

mod audit;

mod ci_and_clusters;
mod cli_binaries;
mod drain;
mod entra_auth;
mod entra_clouds;
mod entra_standin;
mod extension;
mod files;
mod hyco_interop;
mod metrics;
mod onboarding;
mod outbound_proxy;
mod parsers;
mod pop;
mod registry;
mod relay_abuse;
mod relay_certs;
mod relay_frames;
mod relay_protocol;
mod relay_proxy_protocol;
mod replicas;
mod revocation;
mod secrets;
mod standin_apiserver;
mod standin_store;
mod tunnel_key_rotation;
mod tunnel_kubectl;
mod up;

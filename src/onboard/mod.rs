//! Onboarding a cluster, the self-hosted `az connectedk8s connect/delete`: the agent's key
//! pair ([`keys`]), the objects installed in the cluster ([`manifests`]), applying them
//! ([`apply`]) and waiting for the rollout ([`rollout`]), the whole `connect` ([`install`])
//! and `disconnect` ([`remove`]), and service-account tokens for kubectl ([`token`]).
//!
//! The registry side goes through [`crate::arm::client::ManagementClient`]; the cluster side
//! through kube-rs with the caller's own kubeconfig (direct cluster access, as `az` needs).

pub mod apply;
pub mod install;
pub mod keys;
pub mod manifests;
pub mod relay_manifests;
pub mod remove;
pub mod rollout;
pub mod token;

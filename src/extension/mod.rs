//! The Azure Key Vault Secrets Provider as a cluster extension, the way `az k8s-extension`
//! installs `Microsoft.AzureKeyVaultSecretsProvider` on an Arc cluster: users `kubectl apply`
//! SecretProviderClasses and their Secrets appear, stay current and heal.
//!
//! - [`settings`]: the configuration settings, by the Arc extension's names;
//! - [`manifests`]: what is installed (CRDs, RBAC, the controller Deployment, the provider
//!   DaemonSet);
//! - [`install`]: applying, checking and removing them through the user's kubeconfig;
//! - [`controller`]: the in-cluster controller, a kube-rs runtime `Controller` (one leader
//!   through [`leader`]), reporting
//!   through [`report`];
//! - [`vault`]: a Key Vault client per class, shared with [`provider`], the Secrets Store CSI
//!   driver's provider gRPC service ([`proto`] is its wire format).
//!
//! It builds on `secrets` (Key Vault, SecretProviderClass, sync) and `onboard` (apply,
//! rollout); the registry side is [`crate::arm::Extension`].

pub mod controller;
pub mod install;
pub mod leader;
pub mod manifests;
pub mod proto;
pub mod provider;
pub mod report;
pub mod settings;
pub mod vault;

//! The agent's status reports to the cluster registry: agent and Kubernetes versions, node
//! and core counts, signed with the key whose public half is the registration's
//! `agentPublicKeyCertificate`. The registry shows the cluster Connected while they arrive,
//! Offline when they stop.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use tokio_util::sync::CancellationToken;

use crate::arm::client::ManagementClient;
use crate::arm::{AgentStatus, ClusterId};

pub const INTERVAL: Duration = Duration::from_secs(60);

pub struct Heartbeat {
    pub registry: ManagementClient,
    pub id: ClusterId,
    pub key: EcdsaKeyPair,
    /// The agent's own view of the cluster (its service account).
    pub kube: kube::Client,
}

/// Reads the agent key (PKCS#8 PEM, ECDSA P-256) that `connect` generated.
pub fn load_key(pem: &str) -> Result<EcdsaKeyPair, String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "the agent key file must hold a PKCS#8 PEM private key".to_string())?;
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|_| "the agent key must be an ECDSA P-256 key".to_string())
}

impl Heartbeat {
    /// Reports now and then every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.report().await {
                Ok(()) if failing => {
                    tracing::info!("status reports to the registry work again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    // Once per outage, not once a minute.
                    if !failing {
                        tracing::warn!(error = %crate::tunnel::http::error_chain(&e), "status report to the registry failed; the cluster will show Offline until one succeeds");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    pub async fn report(&self) -> Result<(), crate::arm::client::ArmError> {
        let status = self.status().await;
        self.registry
            .report_status(&self.id, &status, &self.key)
            .await
    }

    /// What the agent can see; fields it cannot read stay empty rather than fail the report.
    async fn status(&self) -> AgentStatus {
        let kubernetes_version = match self.kube.apiserver_version().await {
            Ok(v) => Some(v.git_version),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the apiserver version");
                None
            }
        };
        let (nodes, cores) = match Api::<Node>::all(self.kube.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => {
                let cores = list
                    .items
                    .iter()
                    .filter_map(|n| n.status.as_ref()?.capacity.as_ref()?.get("cpu"))
                    .filter_map(|q| cpu_cores(&q.0))
                    .sum();
                (Some(list.items.len() as u32), Some(cores))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list nodes (the agent's role grants get/list on nodes)");
                (None, None)
            }
        };
        AgentStatus {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kubernetes_version,
            total_node_count: nodes,
            total_core_count: cores,
        }
    }
}

/// Whole cores of a CPU quantity ("4", "3500m" counts as 3).
fn cpu_cores(quantity: &str) -> Option<u32> {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().ok().map(|m| (m / 1000) as u32),
        None => quantity
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite() && *c >= 0.0)
            .map(|c| c as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_count_whole_cores() {
        assert_eq!(cpu_cores("4"), Some(4));
        assert_eq!(cpu_cores("3500m"), Some(3));
        assert_eq!(cpu_cores("2.5"), Some(2));
        assert_eq!(cpu_cores("lots"), None);
    }
}

//! The agent's signed status report: its body, what is signed, the headers that carry the
//! signature, and the agent's public key as the registration holds it.

use serde::{Deserialize, Serialize};

/// The agent's signed status report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub agent_version: String,
    pub kubernetes_version: Option<String>,
    pub total_node_count: Option<u32>,
    pub total_core_count: Option<u32>,
}

/// Headers of a signed agent status report.
pub const HEADER_TIMESTAMP: &str = "x-clusterconnect-timestamp";
pub const HEADER_SIGNATURE: &str = "x-clusterconnect-signature";

/// What the agent signs: the timestamp, the path and the body, so a captured report cannot
/// be replayed later or for another cluster.
pub fn signed_message(timestamp: u64, path: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{timestamp}\n{}\n", path.to_ascii_lowercase()).into_bytes();
    message.extend_from_slice(body);
    message
}

/// Why an `agentPublicKeyCertificate` is not an agent key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AgentKeyError {
    #[error("agentPublicKeyCertificate is not base64")]
    NotBase64,
    #[error("agentPublicKeyCertificate must be an ECDSA P-256 public key (SubjectPublicKeyInfo DER, base64)")]
    NotP256,
}

/// The raw P-256 point of an `agentPublicKeyCertificate` (base64 SubjectPublicKeyInfo DER).
pub fn agent_key(certificate: &str) -> Result<Vec<u8>, AgentKeyError> {
    use base64::Engine;
    // SubjectPublicKeyInfo of an uncompressed P-256 key: this fixed header, then the point.
    const P256_SPKI_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let der = base64::engine::general_purpose::STANDARD
        .decode(certificate.trim())
        .map_err(|_| AgentKeyError::NotBase64)?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err(AgentKeyError::NotP256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_p256_public_keys_are_agent_keys() {
        use base64::Engine;
        use rcgen::PublicKeyData;
        let pair = rcgen::KeyPair::generate().unwrap();
        let spki = base64::engine::general_purpose::STANDARD.encode(pair.subject_public_key_info());
        assert_eq!(agent_key(&spki).unwrap().len(), 65);
        assert_eq!(agent_key("bm90IGEga2V5"), Err(AgentKeyError::NotP256));
        assert_eq!(agent_key("%%%"), Err(AgentKeyError::NotBase64));
    }
}

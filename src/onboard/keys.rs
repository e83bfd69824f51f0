//! The agent's key pair: an ECDSA P-256 key whose public half the registry holds as the
//! cluster's `agentPublicKeyCertificate` and whose private half (PKCS#8 PEM) lives only in
//! the cluster's agent Secret, where the agent signs its status reports with it.
//!
//! The key is also how `connect` tells "this cluster" from "another cluster with the same
//! name": a registration whose public key is not the one in this cluster's Secret belongs
//! elsewhere.

use base64::Engine;
use rcgen::{KeyPair, PublicKeyData, PKCS_ECDSA_P256_SHA256};

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate the agent key pair")]
    Generate(#[source] rcgen::Error),
    #[error("the agent key in Secret {location} is not a PKCS#8 PEM ECDSA P-256 key; delete the Secret and run `clusterconnect connect` again, or `clusterconnect disconnect` first")]
    Unreadable {
        location: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the agent key in Secret {location} is not a P-256 key; delete the Secret and run `clusterconnect connect` again, or `clusterconnect disconnect` first")]
    NotP256 { location: String },
}

/// The agent's key pair. `Debug` never prints the private half.
pub struct AgentKey {
    private_pem: Secret,
    /// base64 of the SubjectPublicKeyInfo DER: the registry's `agentPublicKeyCertificate`.
    public: String,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl AgentKey {
    pub fn generate() -> Result<AgentKey, KeyError> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(AgentKey::from_pair(&pair))
    }

    /// The key stored in a cluster's agent Secret; `location` names that Secret in errors.
    pub fn from_pem(pem: &str, location: &str) -> Result<AgentKey, KeyError> {
        let pair = KeyPair::from_pem(pem).map_err(|source| KeyError::Unreadable {
            location: location.to_string(),
            source,
        })?;
        if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(KeyError::NotP256 {
                location: location.to_string(),
            });
        }
        Ok(AgentKey::from_pair(&pair))
    }

    fn from_pair(pair: &KeyPair) -> AgentKey {
        AgentKey {
            private_pem: Secret::new(pair.serialize_pem()),
            public: base64::engine::general_purpose::STANDARD
                .encode(pair.subject_public_key_info()),
        }
    }

    pub fn private_pem(&self) -> &Secret {
        &self.private_pem
    }

    /// The `agentPublicKeyCertificate` for this key.
    pub fn public_certificate(&self) -> &str {
        &self.public
    }

    /// Whether a registration's `agentPublicKeyCertificate` is this key's public half.
    pub fn matches(&self, certificate: &str) -> bool {
        self.public == certificate.trim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_what_the_registry_accepts_and_survives_a_round_trip() {
        let key = AgentKey::generate().unwrap();
        crate::relay::clusters::agent_key(key.public_certificate()).unwrap();
        let again = AgentKey::from_pem(key.private_pem().expose(), "azure-arc/x").unwrap();
        assert!(again.matches(key.public_certificate()));
        assert!(!AgentKey::generate()
            .unwrap()
            .matches(key.public_certificate()));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_foreign_key_is_refused_with_the_secret_named() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = AgentKey::from_pem(&ed.serialize_pem(), "azure-arc/clusterconnect-agent")
            .unwrap_err()
            .to_string();
        assert!(err.contains("azure-arc/clusterconnect-agent"), "{err}");
        let err = AgentKey::from_pem("junk", "ns/s").unwrap_err().to_string();
        assert!(err.contains("ns/s"), "{err}");
    }
}

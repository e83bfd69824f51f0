//! The relay's configuration: a TOML file (see `config/relay.toml`), validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use serde::Deserialize;

use super::clusters::Registry;
use super::rule::Rule;
use super::state::RelayStats;
use crate::secret::Secret;
use crate::tls;
use crate::tunnel::protocol::validate_entity;
use crate::tunnel::sas::SasKey;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("relay config: {0}")]
    Invalid(String),
    #[error("relay TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// The file as written by the operator.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// Address to listen on, e.g. "0.0.0.0:443".
    pub listen: Option<SocketAddr>,
    /// Names clients use to reach this relay; a SAS token must be minted for one of them.
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    /// Upper bound on simultaneous client connections (control channels, senders, rendezvous).
    pub max_connections: Option<usize>,
    /// The cluster registry's file (default `registry.redb` next to this config).
    pub registry_file: Option<PathBuf>,
    /// Entra ID callers of the management API.
    pub entra: Option<EntraFile>,
}

/// `[entra]`: which Entra tenants may call the management API, with tokens for which
/// audience (default: Azure Resource Manager's, what `az account get-access-token` returns).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraFile {
    pub tenants: Vec<String>,
    pub audience: Option<String>,
    pub cloud: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: String,
    pub key: Option<String>,
    pub key_file: Option<PathBuf>,
    pub rights: Vec<String>,
    /// Limits the rule to one hybrid connection; absent means every connection on this relay.
    pub entity: Option<String>,
}

/// Everything the relay needs to run, validated.
#[derive(Clone)]
pub struct RelayConfig {
    pub hostnames: Vec<String>,
    pub rules: Arc<Vec<Rule>>,
    /// The connected-cluster registry and management API; `None` serves only the relay.
    pub clusters: Option<Arc<Registry>>,
    pub tls: Arc<ServerConfig>,
    pub max_connections: usize,
    pub stats: Arc<RelayStats>,
}

/// Connections beyond this wait for a slot rather than exhausting file descriptors; each costs
/// a TLS session and two small WebSocket buffers (about 150 KiB), so 10k is ~1.5 GiB at worst.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl RelayFile {
    pub fn load(path: &Path) -> Result<RelayFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks the rules and reads their keys; the TLS material is checked by the caller, who
    /// may substitute a development certificate.
    /// Creates each rule's missing `key_file` with a fresh random key (development mode only,
    /// announced on stderr), so a first `relay --dev-self-signed` works on a fresh machine.
    pub fn create_missing_keys(&self, base: &Path) -> Result<Vec<PathBuf>, ConfigError> {
        use base64::Engine;
        let mut created = Vec::new();
        for r in &self.rules {
            let Some(f) = &r.key_file else { continue };
            let path = base.join(f);
            if path.exists() {
                continue;
            }
            let key: [u8; 32] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            // The connection-string form, so the same file serves as agent/proxy --key-file.
            let text = format!("SharedAccessKeyName={};SharedAccessKey={key}\n", r.name);
            crate::files::write_private(&path, text.as_bytes()).map_err(|source| {
                ConfigError::Read {
                    path: path.clone(),
                    source,
                }
            })?;
            created.push(path);
        }
        Ok(created)
    }

    pub fn rules(&self, base: &Path) -> Result<Vec<Rule>, ConfigError> {
        let mut rules = Vec::new();
        for r in &self.rules {
            if r.name.trim().is_empty() {
                return Err(ConfigError::Invalid("a rule has an empty name".into()));
            }
            if rules.iter().any(|x: &Rule| x.name == r.name) {
                return Err(ConfigError::Invalid(format!(
                    "rule '{}' is defined twice",
                    r.name
                )));
            }
            let key = match (&r.key, &r.key_file) {
                (Some(k), None) => k.trim().to_string(),
                (None, Some(f)) => {
                    let f = base.join(f);
                    let text = std::fs::read_to_string(&f).map_err(|source| ConfigError::Read {
                        path: f.clone(),
                        source,
                    })?;
                    // Either the bare key or the connection-string form agents and proxies read.
                    if text.contains("SharedAccessKey=") {
                        let key = SasKey::parse(&text).map_err(|reason| {
                            ConfigError::Invalid(format!("key file {}: {reason}", f.display()))
                        })?;
                        if key.name != r.name {
                            return Err(ConfigError::Invalid(format!(
                                "key file {} is for rule '{}', but rule '{}' uses it",
                                f.display(),
                                key.name,
                                r.name
                            )));
                        }
                        key.key.expose().to_string()
                    } else {
                        text.trim().to_string()
                    }
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "rule '{}' needs exactly one of 'key' or 'key_file'",
                        r.name
                    )))
                }
            };
            if key.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "rule '{}' has a key shorter than 16 characters; generate one with 'clusterconnect sas new-key'",
                    r.name
                )));
            }
            let (mut listen, mut send, mut manage) = (false, false, false);
            for right in &r.rights {
                match right.to_ascii_lowercase().as_str() {
                    "listen" => listen = true,
                    "send" => send = true,
                    "manage" => {
                        listen = true;
                        send = true;
                        manage = true
                    }
                    other => {
                        return Err(ConfigError::Invalid(format!(
                            "rule '{}' has unknown right '{other}'; use listen, send or manage",
                            r.name
                        )))
                    }
                }
            }
            if !listen && !send {
                return Err(ConfigError::Invalid(format!(
                    "rule '{}' grants no rights; add rights = [\"listen\"] or [\"send\"]",
                    r.name
                )));
            }
            if let Some(entity) = &r.entity {
                validate_entity(entity).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
            let reserved = |s: &str| s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("cc-"));
            if reserved(&r.name) || r.entity.as_deref().is_some_and(reserved) {
                return Err(ConfigError::Invalid(format!(
                    "rule '{}': names and entities starting with \"cc-\" are reserved for registered clusters",
                    r.name
                )));
            }
            rules.push(Rule {
                name: r.name.clone(),
                key: Secret::new(key),
                listen,
                send,
                manage,
                entity: r.entity.clone(),
            });
        }
        if rules.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[rules]]: nobody could listen or send; see config/relay.toml".into(),
            ));
        }
        Ok(rules)
    }
}

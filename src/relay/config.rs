//! The relay's configuration: a TOML file (see `config/relay.toml`), validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use serde::Deserialize;

use super::auth::is_registered_entity;
use super::clusters::Registry;
pub use super::limits::Limits;
use super::limits::{MAX_SPLICE_BUFFER, MIN_IPV6_PREFIX_LEN};
use super::proxy_protocol::{Cidr, CidrError, ProxyProtocol};
use super::rule::{Rule, RuleSet};
use super::splice::MIN_BUFFER as MIN_SPLICE_BUFFER;
use super::state::RelayStats;
use crate::secret::Secret;
use crate::tunnel::protocol::{validate_entity, AddressError};
use crate::tunnel::sas::SasKey;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay config {} is not valid", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "relay config: splice_buffer_kib = {0} is outside {min}..={max}",
        min = MIN_SPLICE_BUFFER / 1024,
        max = MAX_SPLICE_BUFFER / 1024
    )]
    SpliceBuffer(usize),
    #[error(
        "relay config: ipv6_prefix_len = {0} is outside {min}..=128",
        min = MIN_IPV6_PREFIX_LEN
    )]
    Ipv6PrefixLen(u8),
    #[error("relay config: max_connections = {0} is outside 1..={max}", max = MAX_CONNECTIONS_LIMIT)]
    MaxConnections(usize),
    #[error("relay config: a rule has an empty name")]
    EmptyRuleName,
    #[error("relay config: rule '{0}' is defined twice")]
    DuplicateRule(String),
    #[error("relay config: rule '{0}' needs exactly one of 'key' or 'key_file'")]
    KeySource(String),
    #[error("relay config: key file {}", .path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: crate::tunnel::sas::KeyFormatError,
    },
    #[error("relay config: key file {} is for rule '{key_rule}', but rule '{rule}' uses it", .path.display())]
    KeyFileForOtherRule {
        path: PathBuf,
        key_rule: String,
        rule: String,
    },
    #[error("relay config: rule '{0}' has a key shorter than 16 characters; generate one with 'clusterconnect sas new-key'")]
    ShortKey(String),
    #[error("relay config: rule '{0}' has a key with spaces or angle brackets, which no generated key has (a placeholder left in place?); make one with `clusterconnect sas new-key --name {0}`")]
    PlaceholderKey(String),
    #[error("relay config: rule '{rule}' has unknown right '{right}'; use listen, send or manage")]
    UnknownRight { rule: String, right: String },
    #[error("relay config: rule '{0}' grants no rights; add rights = [\"listen\"] or [\"send\"]")]
    NoRights(String),
    #[error("relay config")]
    Entity(#[source] AddressError),
    #[error("relay config: rule '{0}': names and entities starting with \"cc-\" are reserved for registered clusters")]
    Reserved(String),
    #[error("relay config: no [[rules]]: nobody could listen or send; see config/relay.toml")]
    NoRules,
    #[error("relay config: proxy_protocol_from")]
    ProxyProtocolFrom(#[source] CidrError),
    #[error("relay config: proxy_protocol_from is set but proxy_protocol is not true")]
    ProxyProtocolOff,
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
    /// The port clients reach this relay on, used in the rendezvous addresses sent to
    /// listeners (default: the listen port; set 443 behind a load balancer that maps it).
    pub public_port: Option<u16>,
    /// Listeners one hybrid connection may have at once (Azure Relay: 25).
    pub max_listeners_per_connection: Option<usize>,
    /// The longest a listener token may be valid for, in seconds (default one day); a
    /// listener renews with `renewToken` well before.
    pub max_listener_token_lifetime_secs: Option<u64>,
    /// Unauthenticated connections (TLS, headers, management API calls) one source address
    /// may hold at once (default 64).
    pub max_unauthenticated_per_ip: Option<usize>,
    /// IPv6 sources share `max_unauthenticated_per_ip` per network of this prefix length
    /// (default 64, from 32 to 128; 128 counts each address alone).
    pub ipv6_prefix_len: Option<u8>,
    /// Rendezvous open at once with one sender token (default 1024).
    pub max_rendezvous_per_token: Option<usize>,
    /// Rendezvous open at once through one listener (default 4096).
    pub max_rendezvous_per_listener: Option<usize>,
    /// Seconds an HTTP request's listener has for its response head and then for each pause
    /// in its body, and its sender for each pause in its upload (default 60, Azure Relay's).
    pub http_idle_secs: Option<u64>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from an L4 load
    /// balancer, whose client address then counts for admission and logs (default false).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The balancers' addresses or networks (CIDR); headers from other peers are refused.
    /// Empty: any peer, so the relay must be reachable only through the balancers.
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
    /// KiB of buffer per direction of a rendezvous (default 64, from 4 to 1024).
    pub splice_buffer_kib: Option<usize>,
    /// On shutdown, seconds open rendezvous get to finish (default 10).
    pub drain_secs: Option<u64>,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP), e.g. "0.0.0.0:9090";
    /// absent: not served.
    pub metrics_addr: Option<String>,
    /// Run as one of several replicas coordinated through NATS (see `relay::replicas`).
    pub cluster: Option<super::replicas::ClusterFile>,
}

/// `[entra]`: which Entra tenants may call the management API, with tokens for which
/// audience: the management API's own Entra application (required; checked in `cli::relay`).
/// Tokens for Azure Resource Manager are refused unless `allow_arm_audience`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraFile {
    pub tenants: Vec<String>,
    /// The management API's application ID URI or application (client) id.
    pub audience: Option<String>,
    /// Also accept tokens for Azure Resource Manager (weaker: clients then send this relay
    /// credentials that are valid against Azure).
    #[serde(default)]
    pub allow_arm_audience: bool,
    /// AzurePublicCloud [default], AzureUSGovernmentCloud, AzureChinaCloud, or the name of the
    /// cloud `cloud_config` describes.
    pub cloud: Option<String>,
    /// A custom cloud's endpoints (`az cloud register --cloud-config` JSON), relative to this
    /// file [default: CLUSTERCONNECT_CLOUD_CONFIG]; its ARM resource ids are what
    /// `allow_arm_audience` accepts.
    pub cloud_config: Option<PathBuf>,
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
    /// The configuration's rules; replace them to revoke (see [`RuleSet::replace`]).
    pub rules: RuleSet,
    /// The connected-cluster registry and management API; `None` serves only the relay.
    pub clusters: Option<Arc<Registry>>,
    pub tls: Arc<ServerConfig>,
    pub max_connections: usize,
    pub stats: Arc<RelayStats>,
    /// See [`RelayFile::public_port`]; `None` is the listen port.
    pub public_port: Option<u16>,
    pub limits: Limits,
    /// `Some`: every connection starts with a PROXY header (see [`RelayFile::proxy_protocol`]).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `Some`: this relay is one replica of several (`[cluster]`).
    pub cluster: Option<ClusterLink>,
}

/// A replica's connection to NATS and its names, as the CLI made them.
#[derive(Clone)]
pub struct ClusterLink {
    pub client: async_nats::Client,
    /// Prefix of subjects and buckets.
    pub prefix: String,
    /// This replica's `host[:port]`.
    pub me: String,
}

impl RelayFile {
    /// `max_connections`, or its default.
    pub fn max_connections(&self) -> Result<usize, ConfigError> {
        match self.max_connections {
            None => Ok(DEFAULT_MAX_CONNECTIONS),
            Some(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(ConfigError::MaxConnections(n)),
        }
    }

    /// The file's limits over the defaults.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let default = Limits::default();
        let splice_buffer = match self.splice_buffer_kib {
            None => default.splice_buffer,
            Some(kib) => {
                let bytes = kib.saturating_mul(1024);
                if !(MIN_SPLICE_BUFFER..=MAX_SPLICE_BUFFER).contains(&bytes) {
                    return Err(ConfigError::SpliceBuffer(kib));
                }
                bytes
            }
        };
        let ipv6_prefix_len = match self.ipv6_prefix_len {
            None => default.ipv6_prefix_len,
            Some(len) if (MIN_IPV6_PREFIX_LEN..=128).contains(&len) => len,
            Some(len) => return Err(ConfigError::Ipv6PrefixLen(len)),
        };
        Ok(Limits {
            ipv6_prefix_len,
            max_listeners_per_connection: self
                .max_listeners_per_connection
                .unwrap_or(default.max_listeners_per_connection)
                .max(1),
            max_listener_token_lifetime: self
                .max_listener_token_lifetime_secs
                .map(std::time::Duration::from_secs)
                .unwrap_or(default.max_listener_token_lifetime),
            max_unauthenticated_per_ip: self
                .max_unauthenticated_per_ip
                .unwrap_or(default.max_unauthenticated_per_ip),
            splice_buffer,
            max_rendezvous_per_token: self
                .max_rendezvous_per_token
                .unwrap_or(default.max_rendezvous_per_token)
                .max(1),
            max_rendezvous_per_listener: self
                .max_rendezvous_per_listener
                .unwrap_or(default.max_rendezvous_per_listener)
                .max(1),
            drain: self
                .drain_secs
                .map(std::time::Duration::from_secs)
                .unwrap_or(default.drain),
            http_idle: self
                .http_idle_secs
                .map(|s| std::time::Duration::from_secs(s.max(1)))
                .unwrap_or(default.http_idle),
            ..default
        })
    }
}

impl RelayFile {
    /// The PROXY protocol setting, its trusted peers parsed.
    pub fn proxy_protocol(&self) -> Result<Option<ProxyProtocol>, ConfigError> {
        if !self.proxy_protocol {
            if !self.proxy_protocol_from.is_empty() {
                return Err(ConfigError::ProxyProtocolOff);
            }
            return Ok(None);
        }
        let trusted = self
            .proxy_protocol_from
            .iter()
            .map(|c| c.parse::<Cidr>())
            .collect::<Result<_, _>>()
            .map_err(ConfigError::ProxyProtocolFrom)?;
        Ok(Some(ProxyProtocol { trusted }))
    }
}

/// Connections beyond this wait for a slot rather than exhausting file descriptors; each costs
/// a TLS session and two small WebSocket buffers (about 150 KiB), so 10k is ~1.5 GiB at worst.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The most `max_connections` may be: far beyond what one process holds open (each
/// connection is a file descriptor and buffers), and below tokio's semaphore limit.
pub const MAX_CONNECTIONS_LIMIT: usize = 10_000_000;

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
        let mut rules: Vec<Rule> = Vec::new();
        for r in &self.rules {
            if r.name.trim().is_empty() {
                return Err(ConfigError::EmptyRuleName);
            }
            if rules.iter().any(|x| x.name == r.name) {
                return Err(ConfigError::DuplicateRule(r.name.clone()));
            }
            rules.push(r.rule(base)?);
        }
        if rules.is_empty() {
            return Err(ConfigError::NoRules);
        }
        Ok(rules)
    }
}

impl RuleFile {
    /// The rule this entry declares, its key read and its rights and entity checked.
    fn rule(&self, base: &Path) -> Result<Rule, ConfigError> {
        let key = self.key(base)?;
        if key.len() < 16 {
            return Err(ConfigError::ShortKey(self.name.clone()));
        }
        // Placeholders in generated manifests read like "<a key: ...>": a relay started with
        // one would accept tokens anyone can mint.
        if key
            .chars()
            .any(|c| c.is_whitespace() || c == '<' || c == '>')
        {
            return Err(ConfigError::PlaceholderKey(self.name.clone()));
        }
        let (listen, send, manage) = self.rights()?;
        if let Some(entity) = &self.entity {
            validate_entity(entity).map_err(ConfigError::Entity)?;
        }
        if is_registered_entity(&self.name)
            || self.entity.as_deref().is_some_and(is_registered_entity)
        {
            return Err(ConfigError::Reserved(self.name.clone()));
        }
        Ok(Rule {
            name: self.name.clone(),
            key: Secret::new(key),
            secondary_key: None,
            listen,
            send,
            manage,
            entity: self.entity.clone(),
        })
    }

    fn key(&self, base: &Path) -> Result<String, ConfigError> {
        match (&self.key, &self.key_file) {
            (Some(k), None) => Ok(k.trim().to_string()),
            (None, Some(f)) => self.key_from_file(&base.join(f)),
            _ => Err(ConfigError::KeySource(self.name.clone())),
        }
    }

    /// Either the bare key or the connection-string form agents and proxies read.
    fn key_from_file(&self, path: &Path) -> Result<String, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if !text.contains("SharedAccessKey=") {
            return Ok(text.trim().to_string());
        }
        let key = SasKey::parse(&text).map_err(|source| ConfigError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        if key.name != self.name {
            return Err(ConfigError::KeyFileForOtherRule {
                path: path.to_path_buf(),
                key_rule: key.name,
                rule: self.name.clone(),
            });
        }
        Ok(key.key.expose().to_string())
    }

    /// (listen, send, manage); manage implies the other two.
    fn rights(&self) -> Result<(bool, bool, bool), ConfigError> {
        let (mut listen, mut send, mut manage) = (false, false, false);
        for right in &self.rights {
            match right.to_ascii_lowercase().as_str() {
                "listen" => listen = true,
                "send" => send = true,
                "manage" => (listen, send, manage) = (true, true, true),
                other => {
                    return Err(ConfigError::UnknownRight {
                        rule: self.name.clone(),
                        right: other.to_string(),
                    })
                }
            }
        }
        if !listen && !send {
            return Err(ConfigError::NoRights(self.name.clone()));
        }
        Ok((listen, send, manage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Result<Vec<Rule>, ConfigError> {
        toml::from_str::<RelayFile>(toml)
            .unwrap()
            .rules(Path::new("."))
    }

    #[test]
    fn rules_are_checked_one_step_at_a_time() {
        let ok = rules(
            "[[rules]]\nname = \"admin\"\nkey = \"0123456789abcdef\"\nrights = [\"Manage\"]\n",
        )
        .unwrap();
        assert!(ok[0].listen && ok[0].send && ok[0].manage);
        let err = |toml: &str| rules(toml).unwrap_err();
        assert!(matches!(err(""), ConfigError::NoRules));
        let twice = "[[rules]]\nname = \"a\"\nkey = \"0123456789abcdef\"\nrights = [\"send\"]\n";
        assert!(matches!(err(&twice.repeat(2)), ConfigError::DuplicateRule(n) if n == "a"));
        assert!(matches!(
            err("[[rules]]\nname = \"a\"\nkey = \"short\"\nrights = [\"send\"]\n"),
            ConfigError::ShortKey(_)
        ));
        assert!(matches!(
            err("[[rules]]\nname = \"a\"\nrights = [\"send\"]\n"),
            ConfigError::KeySource(_)
        ));
        assert!(matches!(
            err("[[rules]]\nname = \"a\"\nkey = \"0123456789abcdef\"\nrights = [\"fly\"]\n"),
            ConfigError::UnknownRight { right, .. } if right == "fly"
        ));
        assert!(matches!(
            err("[[rules]]\nname = \"a\"\nkey = \"0123456789abcdef\"\nrights = []\n"),
            ConfigError::NoRights(_)
        ));
        assert!(matches!(
            err("[[rules]]\nname = \"CC-x\"\nkey = \"0123456789abcdef\"\nrights = [\"send\"]\n"),
            ConfigError::Reserved(_)
        ));
    }

    #[test]
    fn metrics_are_off_unless_the_file_names_an_address() {
        let file = |toml: &str| toml::from_str::<RelayFile>(toml).unwrap();
        assert_eq!(file("").metrics_addr, None);
        assert_eq!(
            file("metrics_addr = \"0.0.0.0:9090\"")
                .metrics_addr
                .as_deref(),
            Some("0.0.0.0:9090")
        );
    }

    #[test]
    fn proxy_protocol_is_off_by_default_and_its_peers_are_checked() {
        let pp = |toml: &str| toml::from_str::<RelayFile>(toml).unwrap().proxy_protocol();
        assert_eq!(pp("").unwrap(), None);
        assert_eq!(
            pp("proxy_protocol = true").unwrap().unwrap().trusted,
            vec![]
        );
        let on = pp("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.5\"]")
            .unwrap()
            .unwrap();
        assert!(on.trusts("10.9.9.9".parse().unwrap()));
        assert!(!on.trusts("192.0.2.6".parse().unwrap()));
        assert!(matches!(
            pp("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/40\"]"),
            Err(ConfigError::ProxyProtocolFrom(_))
        ));
        assert!(matches!(
            pp("proxy_protocol_from = [\"10.0.0.0/8\"]"),
            Err(ConfigError::ProxyProtocolOff)
        ));
    }

    #[test]
    fn ipv6_prefix_len_is_bounded() {
        let limits = |toml: &str| toml::from_str::<RelayFile>(toml).unwrap().limits();
        assert_eq!(limits("").unwrap().ipv6_prefix_len, 64);
        assert_eq!(
            limits("ipv6_prefix_len = 128").unwrap().ipv6_prefix_len,
            128
        );
        let err = limits("ipv6_prefix_len = 16").unwrap_err();
        assert!(err.to_string().contains("outside 32..=128"), "{err}");
        assert!(matches!(
            limits("ipv6_prefix_len = 129"),
            Err(ConfigError::Ipv6PrefixLen(129))
        ));
    }

    #[test]
    fn max_connections_is_bounded() {
        let max = |toml: &str| toml::from_str::<RelayFile>(toml).unwrap().max_connections();
        assert_eq!(max("").unwrap(), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(max("max_connections = 5").unwrap(), 5);
        for bad in [
            "max_connections = 0",
            "max_connections = 9223372036854775807",
        ] {
            let err = max(bad).unwrap_err();
            assert!(matches!(err, ConfigError::MaxConnections(_)), "{bad}");
            assert!(err.to_string().contains("outside 1..=10000000"), "{err}");
        }
    }
}

//! The Azure Relay Hybrid Connections WebSocket protocol, without IO: relay addresses, the
//! `$hc` URLs of each action, and the JSON messages of the listener's control channel.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::clip;

pub const QUERY_ACTION: &str = "sb-hc-action";
pub const QUERY_ID: &str = "sb-hc-id";
pub const QUERY_TOKEN: &str = "sb-hc-token";
pub const QUERY_STATUS_CODE: &str = "sb-hc-statusCode";
pub const QUERY_STATUS_DESCRIPTION: &str = "sb-hc-statusDescription";
pub const HEADER_AUTHORIZATION: &str = "ServiceBusAuthorization";
pub const PATH_PREFIX: &str = "/$hc/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Listen,
    Connect,
    Accept,
    /// A listener coming to the rendezvous address of an HTTP `request`.
    Request,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Listen => "listen",
            Action::Connect => "connect",
            Action::Accept => "accept",
            Action::Request => "request",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "listen" => Some(Action::Listen),
            "connect" => Some(Action::Connect),
            "accept" => Some(Action::Accept),
            "request" => Some(Action::Request),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("relay address {0:?} is not a URL; expected e.g. wss://relay.example.com or sb://mynamespace.servicebus.windows.net")]
    NotUrl(String),
    #[error("relay address {0:?} uses scheme '{1}'; use wss:// (or sb:// / https://, which mean the same). Plain ws:// is not offered: tokens would cross the network in clear text")]
    Scheme(String, String),
    #[error("relay address {0:?} has no host")]
    NoHost(String),
    #[error("hybrid connection name {0:?} is invalid: use letters, digits, '-', '_', '.' and '/' (no leading or trailing '/')")]
    BadEntity(String),
}

/// Where a relay (ours or an Azure Relay namespace) is reached: always TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddress {
    pub host: String,
    pub port: u16,
}

impl RelayAddress {
    pub fn parse(text: &str) -> Result<RelayAddress, AddressError> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("wss://{text}")
        };
        let (scheme, rest) = with_scheme.split_once("://").unwrap_or(("", &with_scheme));
        match scheme.to_ascii_lowercase().as_str() {
            "wss" | "sb" | "https" => {}
            other => return Err(AddressError::Scheme(clip(text, 200), clip(other, 32))),
        }
        // `sb://` and `https://` mean the same relay: parsed as `wss://`, a special scheme, so
        // the host is normalised (case, IDNA, percent-decoding) exactly as it is for `wss://`.
        let url = Url::parse(&format!("wss://{rest}"))
            .map_err(|_| AddressError::NotUrl(clip(text, 200)))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| AddressError::NoHost(clip(text, 200)))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(RelayAddress {
            host,
            port: url.port().unwrap_or(443),
        })
    }

    /// `host[:port]` as it appears in URLs (IPv6 bracketed, default port omitted).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The URI a SAS token for `entity` is minted over. Microsoft's node client signs
    /// `http://<host>[:<port>]/<path>`; a compatible relay accepts it with any scheme or port.
    pub fn resource_uri(&self, entity: &str) -> String {
        format!("http://{}/{}", self.authority(), entity)
    }

    /// The WebSocket URL of `action` on `entity`, without a token.
    pub fn url(&self, entity: &str, action: Action, id: &str) -> String {
        format!(
            "wss://{}{PATH_PREFIX}{entity}?{QUERY_ACTION}={}&{QUERY_ID}={id}",
            self.authority(),
            action.as_str()
        )
    }
}

/// DNS suffixes of Azure Relay namespaces in the public and national clouds. A namespace's
/// rendezvous addresses name gateways under the same suffix
/// (`g12-prod-by3-010-sb.servicebus.windows.net`), never the namespace itself.
pub const AZURE_RELAY_SUFFIXES: &[&str] = &[
    ".servicebus.windows.net",
    ".servicebus.chinacloudapi.cn",
    ".servicebus.usgovcloudapi.net",
    ".servicebus.cloudapi.de",
];

/// Why a listener refuses to dial a rendezvous address its relay sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RendezvousRefused {
    #[error("the rendezvous address is not a wss:// URL")]
    NotWss,
    #[error("the rendezvous address names host '{host}', which is neither the relay ({relay}) nor one of its gateways")]
    UntrustedHost { host: String, relay: String },
}

impl RelayAddress {
    /// Whether a rendezvous address sent down this relay's control channel may be dialed.
    /// Only hosts the agent already trusts qualify: the relay's own host and, for an Azure
    /// Relay namespace, the gateways under the namespace's cloud suffix. Anything else would
    /// let whoever controls the address (a forged header, a compromised relay) make the agent
    /// open connections from inside the cluster to hosts of their choosing.
    pub fn check_rendezvous(&self, address: &str) -> Result<(), RendezvousRefused> {
        let url = Url::parse(address).map_err(|_| RendezvousRefused::NotWss)?;
        if url.scheme() != "wss" {
            return Err(RendezvousRefused::NotWss);
        }
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let relay = self.host.to_ascii_lowercase();
        let gateway = AZURE_RELAY_SUFFIXES
            .iter()
            .find(|suffix| relay.ends_with(*suffix))
            .is_some_and(|suffix| host.ends_with(suffix) && host.len() > suffix.len());
        if host == relay || gateway {
            Ok(())
        } else {
            Err(RendezvousRefused::UntrustedHost {
                host: clip(&host, 200),
                relay: self.authority(),
            })
        }
    }
}

/// Hybrid connection names follow Azure's entity naming rules closely enough to keep them
/// safe inside URLs and kubeconfig names.
pub fn validate_entity(entity: &str) -> Result<(), AddressError> {
    let ok = !entity.is_empty()
        && entity.len() <= 260
        && !entity.starts_with('/')
        && !entity.ends_with('/')
        && entity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(AddressError::BadEntity(clip(entity, 200)))
    }
}

/// Messages on the listener's control channel (JSON text frames).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum ControlMessage {
    Accept(Accept),
    /// A sender's HTTP request (Azure Relay's `request` gesture). On the control channel the
    /// relay sends only `address` and `id`, and the listener comes to that rendezvous to get
    /// the whole request there.
    Request(HttpRequest),
    RenewToken(RenewToken),
    /// clusterconnect's own: a relay replica's current list of replicas, sent only to
    /// listeners that asked for it ([`HEADER_HEARS_REPLICAS`]) when the list changes.
    Replicas(ReplicaList),
}

/// The listen request header by which a listener asks for [`ControlMessage::Replicas`];
/// Microsoft's clients never send it, so they never see a message they do not know.
pub const HEADER_HEARS_REPLICAS: &str = "x-clusterconnect-hears-replicas";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaList {
    /// `host[:port]` of every live replica, the sender of the message first.
    pub all: Vec<String>,
}

/// An HTTP request for a listener: its notice on the control channel (`address` and `id`
/// only), or the whole head on the rendezvous, followed there by the body as one binary
/// message when `body` is true.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRequest {
    pub address: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_endpoint: Option<RemoteEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<bool>,
}

impl HttpRequest {
    /// The control channel's notice: come to `address` for request `id`.
    pub fn notice(address: &str, id: &str) -> HttpRequest {
        HttpRequest {
            address: address.to_string(),
            id: id.to_string(),
            request_target: None,
            method: None,
            request_headers: None,
            remote_endpoint: None,
            body: None,
        }
    }
}

/// A listener's answer to an [`HttpRequest`] (`{"response": {...}}`); a body, when `body`
/// is true, follows as one binary message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpResponse {
    pub request_id: String,
    /// A number, or a string holding one (the protocol's own example sends `"200"`).
    pub status_code: serde_json::Value,
    #[serde(default)]
    pub status_description: Option<String>,
    /// Values are strings, numbers (`Content-Length: 12` from node) or lists of either.
    #[serde(default)]
    pub response_headers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub body: bool,
}

/// The text frame that carries an [`HttpResponse`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ResponseMessage {
    pub response: HttpResponse,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Accept {
    /// The rendezvous URL; usable once, for about 30 seconds.
    pub address: String,
    pub id: String,
    #[serde(default)]
    pub connect_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_endpoint: Option<RemoteEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteEndpoint {
    pub address: String,
    pub port: u16,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct RenewToken {
    pub token: String,
}

impl std::fmt::Debug for RenewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RenewToken { token: *** }")
    }
}

/// The entity path and query pairs of a `$hc` request target.
pub struct HcTarget {
    pub entity: String,
    pub query: Vec<(String, String)>,
}

impl HcTarget {
    /// Splits `/$hc/<entity>?<query>`; `None` for any other path.
    pub fn parse(path: &str, query: Option<&str>) -> Option<HcTarget> {
        HcTarget::split(path.strip_prefix(PATH_PREFIX)?, query)
    }

    /// Splits a sender's HTTP request target, `/<entity>[/more]?<query>` (no `$hc`);
    /// `None` when the path is not UTF-8 once decoded.
    pub fn parse_http(path: &str, query: Option<&str>) -> Option<HcTarget> {
        HcTarget::split(path.trim_start_matches('/'), query)
    }

    fn split(entity: &str, query: Option<&str>) -> Option<HcTarget> {
        let entity = percent_encoding::percent_decode_str(entity)
            .decode_utf8()
            .ok()?
            .trim_end_matches('/')
            .to_string();
        let query = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Some(HcTarget { entity, query })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_message_matches_the_documented_shape() {
        let json = r#"{"accept":{"address":"wss://dc.servicebus.windows.net:443/$hc/c?sb-hc-action=accept&sb-hc-id=1","id":"1","connectHeaders":{"Host":"x"},"remoteEndpoint":{"address":"10.0.0.1","port":5000}}}"#;
        let msg: ControlMessage = serde_json::from_str(json).unwrap();
        let ControlMessage::Accept(accept) = &msg else {
            panic!("{msg:?}")
        };
        assert_eq!(accept.id, "1");
        assert_eq!(accept.connect_headers["Host"], "x");
        let back: serde_json::Value = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        let renew = serde_json::to_string(&ControlMessage::RenewToken(RenewToken {
            token: "t".into(),
        }))
        .unwrap();
        assert_eq!(renew, r#"{"renewToken":{"token":"t"}}"#);
    }

    #[test]
    fn relay_addresses_parse_and_print() {
        let a = RelayAddress::parse("wss://relay.example.com").unwrap();
        assert_eq!(
            a.url("c1", Action::Connect, "9"),
            "wss://relay.example.com/$hc/c1?sb-hc-action=connect&sb-hc-id=9"
        );
        assert_eq!(a.resource_uri("c1"), "http://relay.example.com/c1");
        let b = RelayAddress::parse("sb://ns.servicebus.windows.net/").unwrap();
        assert_eq!(
            b.check_rendezvous("wss://g12-prod-by3-010-sb.servicebus.windows.net/$hc/c?sb-hc-action=accept&sb-hc-id=1"),
            Ok(())
        );
        assert_eq!(b.port, 443);
        let c = RelayAddress::parse("127.0.0.1:8443").unwrap();
        assert_eq!(c.authority(), "127.0.0.1:8443");
        assert!(matches!(
            RelayAddress::parse("ws://x"),
            Err(AddressError::Scheme(..))
        ));
        assert!(validate_entity("my-cluster").is_ok());
        assert!(validate_entity("../x?").is_err());
    }

    #[test]
    fn hc_targets_parse() {
        let t = HcTarget::parse(
            "/$hc/my-cluster",
            Some("sb-hc-action=listen&sb-hc-token=a%26b"),
        )
        .unwrap();
        assert_eq!(t.entity, "my-cluster");
        assert_eq!(t.get(QUERY_ACTION), Some("listen"));
        assert_eq!(t.get(QUERY_TOKEN), Some("a&b"));
        assert!(HcTarget::parse("/other", None).is_none());
    }

    #[test]
    fn rendezvous_addresses_must_name_a_trusted_host() {
        let ours = RelayAddress::parse("wss://relay.example.com:8443").unwrap();
        let ok = "wss://Relay.Example.com:8443/$hc/c?sb-hc-action=accept&sb-hc-id=1";
        assert_eq!(ours.check_rendezvous(ok), Ok(()));
        for bad in [
            "wss://attacker.example:443/$hc/c?sb-hc-action=accept",
            "wss://relay.example.com.attacker.example/$hc/c",
            "wss://169.254.169.254/$hc/c",
            "wss://g1.servicebus.windows.net/$hc/c",
        ] {
            assert!(
                matches!(
                    ours.check_rendezvous(bad),
                    Err(RendezvousRefused::UntrustedHost { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            ours.check_rendezvous("ws://relay.example.com:8443/$hc/c"),
            Err(RendezvousRefused::NotWss)
        );
        assert_eq!(
            ours.check_rendezvous("not a url"),
            Err(RendezvousRefused::NotWss)
        );
        let azure = RelayAddress::parse("sb://ns.servicebus.windows.net").unwrap();
        for bad in [
            "wss://servicebus.windows.net/$hc/c",
            "wss://x.servicebus.windows.net.attacker.example/$hc/c",
            "wss://g1.servicebus.chinacloudapi.cn/$hc/c",
        ] {
            assert!(azure.check_rendezvous(bad).is_err(), "{bad}");
        }
        let v6 = RelayAddress::parse("wss://[::1]:9443").unwrap();
        assert_eq!(v6.check_rendezvous("wss://[::1]:9443/$hc/c"), Ok(()));
    }
}

//! Property tests of every parser that reads attacker input (relay-hardening issue, point 12):
//! SAS tokens and key files, `$hc` paths and queries, control messages, relay and rendezvous
//! addresses, the management API's resource ids and bodies, query classification, WebSocket
//! upgrade headers, the kubeconfig merge, and PROXY protocol headers.
//!
//! Three kinds of property: nothing panics on arbitrary or hostile input; what can be
//! written can be read back (round trips); and errors stay small and never hold a key.
//! Case counts are chosen so the whole module runs in seconds on two busy cores; shrinking
//! is capped in time so a failure cannot hang the run, and failures are not persisted (a
//! failing case prints its input; add it to the module as a plain test).

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use proptest::prelude::*;
use serde_norway::{Mapping, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use clusterconnect::arm::{agent_key, signed_message, AgentStatus, ClusterId, ClusterRequest};
use clusterconnect::entra::http::HttpClient;
use clusterconnect::entra::validate::{Validator, ValidatorConfig};
use clusterconnect::entra::{Authority, Cloud};
use clusterconnect::proxy::kubeconfig::{self, Entry, Options};
use clusterconnect::relay::proxy_protocol::{self as pp, Header};
use clusterconnect::secret::Secret;
use clusterconnect::tunnel::http::is_watch;
use clusterconnect::tunnel::protocol::{
    validate_entity, Accept, Action, ControlMessage, HcTarget, RelayAddress, RemoteEndpoint,
    RenewToken,
};
use clusterconnect::tunnel::sas::{SasError, SasKey, SasToken};
use clusterconnect::tunnel::upgrade::{header_has_token, is_websocket, switching_protocols};
use clusterconnect::tunnel::WsStream;

/// Shrinking stops after this long, so a failure reports within seconds instead of hanging.
const SHRINK_MS: u32 = 3_000;
/// The most an error message may take, whatever the input's size: enough for the fixed text
/// and a recognisable excerpt of what was wrong.
const MAX_ERROR: usize = 1024;
/// Attacker-sized input for the bounded-output properties: a long header or query value.
const LONG: usize = 64 * 1024;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_time: SHRINK_MS,
        max_shrink_iters: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Fragments that matter to one parser or another: separators, percent-encoding edge cases
/// (truncated, non-hex, overlong and invalid UTF-8), numbers at the edges of u64, schemes,
/// brackets, userinfo and fragment tricks, YAML and JSON punctuation.
const VOCAB: &[&str] = &[
    "SharedAccessSignature ",
    "sr=",
    "sig=",
    "se=",
    "skn=",
    "SharedAccessKeyName",
    "SharedAccessKey",
    "Endpoint",
    "EntityPath",
    "&",
    "=",
    "==",
    ";",
    "%",
    "%2",
    "%zz",
    "%25",
    "%2F",
    "%2f",
    "%3D",
    "%26",
    "%00",
    "%FF",
    "%C3%28",
    "%E2%82",
    "%F0%9F%92%A9",
    "%C0%AF",
    "+",
    "18446744073709551615",
    "18446744073709551616",
    "4611686018427387904",
    "-1",
    "0",
    "00",
    "1",
    "true",
    "True",
    "watch",
    "follow",
    "?",
    "#",
    "@",
    ":",
    "://",
    "/",
    "\\",
    "[",
    "]",
    "[::1]",
    "::ffff:1.2.3.4",
    "wss",
    "sb",
    "https",
    "ws",
    "relay.example.com",
    ".servicebus.windows.net",
    "xn--",
    "/$hc/",
    "$hc",
    "sb-hc-action",
    "sb-hc-token",
    "listen",
    "accept",
    "subscriptions",
    "resourceGroups",
    "providers",
    "Microsoft.Kubernetes",
    "connectedClusters",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\0",
    "\u{85}",
    "\u{feff}",
    "\u{202e}",
    "é",
    "ß",
    "\u{1F4A9}",
    "{",
    "}",
    "\"",
    "'",
    ",",
    "- ",
    "name: ",
    "clusters:",
    "users:",
    "contexts:",
    "&a ",
    "*a",
    "<<: ",
    "!!binary ",
    "!tag ",
    "---",
    "...",
    "null",
    "~",
    "|",
    ">",
];

fn vocab() -> impl Strategy<Value = String> {
    prop::sample::select(VOCAB).prop_map(String::from)
}

/// Arbitrary strings, printable ASCII, and concatenations of the vocabulary with arbitrary
/// pieces in between.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,48}",
        prop::collection::vec(vocab(), 0..24).prop_map(|v| v.concat()),
        prop::collection::vec(prop_oneof![vocab(), any::<String>(), "[ -~]{0,6}"], 0..12)
            .prop_map(|v| v.concat()),
    ]
}

/// A long run of one short piece, up to [`LONG`] bytes.
fn long() -> impl Strategy<Value = String> {
    ("[a-zA-Z0-9]{1,4}", 1usize..LONG / 4).prop_map(|(piece, n)| piece.repeat(n))
}

fn assert_bounded(what: &str, message: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        message.len() <= MAX_ERROR,
        "{what}: a {}-byte error message; it starts {:?}",
        message.len(),
        message.chars().take(120).collect::<String>()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// SAS tokens

/// `se` values: any u64, the edges (u64::MAX, 2^62, one past u64::MAX), and things that are
/// almost numbers.
fn se_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "1",
            "18446744073709551615",
            "18446744073709551614",
            "18446744073709551616",
            "4611686018427387904",
            "9223372036854775808",
            "99999999999999999999999999999",
            "-1",
            "+5",
            "",
            " 1",
            "1 ",
            "0x10",
            "1e9",
            "\u{663}",
            "0000000000000000000000000000001",
        ])
        .prop_map(String::from),
        "[0-9]{0,40}",
        hostile(),
    ]
}

/// A token of the right shape with hostile field values, fields shuffled, some repeated,
/// some missing, unknown ones added.
fn sas_text() -> impl Strategy<Value = String> {
    let field = |name: &'static str, value: BoxedStrategy<String>| {
        (value, any::<bool>()).prop_map(move |(v, present)| {
            if present {
                vec![format!("{name}={v}")]
            } else {
                vec![]
            }
        })
    };
    (
        field("sr", hostile().boxed()),
        field("sig", hostile().boxed()),
        field("se", se_text().boxed()),
        field("skn", hostile().boxed()),
        prop::collection::vec(hostile(), 0..3),
        prop_oneof![
            Just("SharedAccessSignature "),
            Just(" SharedAccessSignature "),
            Just("")
        ],
    )
        .prop_flat_map(|(sr, sig, se, skn, extra, prefix)| {
            let mut parts: Vec<String> = [sr, sig, se, skn].concat();
            parts.extend(extra);
            (Just(parts).prop_shuffle(), Just(prefix))
        })
        .prop_map(|(parts, prefix)| format!("{prefix}{}", parts.join("&")))
}

fn sas_key() -> SasKey {
    SasKey::parse("SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0a2V5").unwrap()
}

fn dns_name() -> impl Strategy<Value = String> {
    // The last label starts with a letter: an all-numeric last label makes a URL parser read
    // the host as an IPv4 address. No label starts with `xn--`: that marks punycode, which
    // the URL parser decodes and refuses when it is not valid.
    "([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\\.){0,3}[a-z][a-z0-9-]{0,8}[a-z0-9]".prop_filter(
        "punycode labels are not plain DNS names",
        |name: &String| !name.split('.').any(|label| label.starts_with("xn--")),
    )
}

fn entity() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,16}(/[a-zA-Z0-9._-]{1,16}){0,2}"
}

proptest! {
    #![proptest_config(config(800))]

    /// Parsing, then verifying and checking the resource of whatever parsed, never panics.
    #[test]
    fn sas_tokens_never_panic(text in prop_oneof![sas_text(), hostile()], key in hostile(),
                              now in prop_oneof![any::<u64>(), Just(u64::MAX), Just(0u64)],
                              host in hostile(), entity in hostile()) {
        if let Ok(token) = SasToken::parse(&text) {
            let _ = token.resource();
            let _ = token.verify(&Secret::new(key), now);
            let _ = token.verify(&sas_key().key, now);
            let _ = token.covers(&[host], &entity);
            let _ = token.covers(&[], "");
        }
    }

    /// Key files and connection strings: never a panic, errors small, and an `UnknownField`
    /// only ever names a short word.
    #[test]
    fn sas_keys_never_panic(text in prop_oneof![
        hostile(),
        prop::collection::vec(prop_oneof![
            vocab(),
            hostile().prop_map(|v| format!("SharedAccessKey={v}")),
            hostile().prop_map(|v| format!("SharedAccessKeyName={v}")),
        ], 0..6).prop_map(|parts| parts.join(";")),
    ]) {
        match SasKey::parse(&text) {
            Ok(key) => {
                prop_assert!(!key.name.is_empty());
                prop_assert!(!key.key.expose().is_empty());
            }
            Err(e) => assert_bounded("SasKey::parse", &e.to_string())?,
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// `se` at the edges of u64: a minted token parses back to its expiry, and verifies
    /// exactly while `now < expiry`, whatever `now` is.
    #[test]
    fn sas_expiry_edges(expiry in prop_oneof![
                            any::<u64>(), Just(u64::MAX), Just(1u64 << 62), Just(0u64),
                            Just(u64::MAX - 1), Just(1u64 << 63)],
                        now in prop_oneof![any::<u64>(), Just(u64::MAX), Just(0u64)],
                        delta in prop_oneof![Just(None), (-2i64..=2).prop_map(Some)]) {
        let key = sas_key();
        let now = match delta {
            Some(d) => expiry.saturating_add_signed(d),
            None => now,
        };
        let token = key.mint_until("http://relay.example.com/c", expiry);
        let parsed = SasToken::parse(token.expose()).unwrap();
        prop_assert_eq!(parsed.expiry, expiry);
        match parsed.verify(&key.key, now) {
            Ok(()) => prop_assert!(now < expiry),
            Err(SasError::Expired(ago)) => {
                prop_assert!(now >= expiry);
                prop_assert_eq!(ago, now - expiry);
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    /// A token minted with a key parses, verifies with that key, names its resource and rule,
    /// and covers its own host and entity (and paths under it), but no other host.
    #[test]
    fn sas_minted_tokens_round_trip(name in "[^;\\s]([^;]{0,20}[^;\\s])?",
                                    key in "[A-Za-z0-9+/]{4,60}={0,2}",
                                    host in dns_name(), port in prop::option::of(any::<u16>()),
                                    scheme in prop::sample::select(vec!["http", "https", "sb"]),
                                    entity in entity(), other in dns_name(),
                                    ttl in 1u64..1_000_000) {
        let sas = SasKey::parse(&format!("SharedAccessKeyName={name};SharedAccessKey={key}"))
            .unwrap();
        prop_assert_eq!(&sas.name, &name);
        prop_assert_eq!(sas.key.expose(), key.as_str());
        let authority = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let resource = format!("{scheme}://{authority}/{entity}");
        let now = 1_700_000_000;
        let token = sas.mint_until(&resource, now + ttl);
        let parsed = SasToken::parse(token.expose()).unwrap();
        prop_assert_eq!(parsed.verify(&sas.key, now), Ok(()));
        prop_assert_eq!(parsed.resource(), resource);
        prop_assert_eq!(&parsed.key_name, &name);
        prop_assert!(parsed.covers(std::slice::from_ref(&host), &entity));
        prop_assert!(parsed.covers(&[host.to_ascii_uppercase()], &entity.to_ascii_uppercase()));
        let below = format!("{entity}/sub");
        let beside = format!("{entity}x");
        prop_assert!(parsed.covers(std::slice::from_ref(&host), &below));
        prop_assert!(!parsed.covers(std::slice::from_ref(&host), &beside));
        if !other.eq_ignore_ascii_case(&host) {
            prop_assert!(!parsed.covers(&[other], &entity));
        }
    }

    /// Any resource string survives minting and parsing (percent-encoding both ways).
    #[test]
    fn sas_any_resource_round_trips(resource in hostile()) {
        let key = sas_key();
        let parsed = SasToken::parse(key.mint_until(&resource, u64::MAX).expose()).unwrap();
        prop_assert_eq!(parsed.resource(), resource);
        prop_assert_eq!(parsed.verify(&key.key, 0), Ok(()));
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Changing any one character of a minted token never yields a token that verifies for
    /// another resource or expiry; changing `se`, `sr` or the key never verifies at all.
    #[test]
    fn sas_tampered_tokens_never_verify(index in any::<prop::sample::Index>(),
                                        replacement in any::<char>(),
                                        other_expiry in any::<u64>(),
                                        other_resource in hostile(),
                                        other_key in "[ -~]{1,40}") {
        let key = sas_key();
        let resource = "http://relay.example.com/my-cluster";
        let expiry = 2_000_000_000u64;
        let token = key.mint_until(resource, expiry);
        let text = token.expose();

        let mut chars: Vec<char> = text.chars().collect();
        let i = index.index(chars.len());
        chars[i] = replacement;
        let tampered: String = chars.into_iter().collect();
        if let Ok(parsed) = SasToken::parse(&tampered) {
            if parsed.verify(&key.key, 0).is_ok() {
                prop_assert_eq!(parsed.resource(), resource);
                prop_assert_eq!(parsed.expiry, expiry);
            }
        }

        if other_expiry != expiry {
            let moved = text.replace(&format!("se={expiry}"), &format!("se={other_expiry}"));
            let parsed = SasToken::parse(&moved).unwrap();
            let is_bad_signature = matches!(parsed.verify(&key.key, 0), Err(SasError::BadSignature(_)));
            prop_assert!(is_bad_signature);
        }
        if other_resource != resource {
            let sr = utf8_percent_encode(&other_resource, NON_ALPHANUMERIC).to_string();
            let (_, rest) = text.split_once("&sig=").unwrap();
            let moved = format!("SharedAccessSignature sr={sr}&sig={rest}");
            let parsed = SasToken::parse(&moved).unwrap();
            prop_assert!(parsed.verify(&key.key, 0).is_err());
        }
        if other_key != key.key.expose() {
            let parsed = SasToken::parse(text).unwrap();
            prop_assert!(parsed.verify(&Secret::new(other_key), 0).is_err());
        }
    }

    /// Whatever surrounds a key in a key file, an error never shows it.
    #[test]
    fn sas_key_errors_never_echo_the_key(bytes in prop::collection::vec(any::<u8>(), 9..48),
                                         garbage in prop::collection::vec(hostile(), 0..4),
                                         shape in 0..6u8) {
        let key = B64.encode(&bytes);
        let garbage = garbage.join(";");
        prop_assume!(!garbage.contains(key.trim_end_matches('=')));
        let text = match shape {
            0 => key.clone(),
            1 => format!("{key}\n"),
            2 => format!("SharedAccessKey={key};{garbage}"),
            3 => format!("{garbage};SharedAccessKey={key}"),
            4 => format!("{key};SharedAccessKeyName=x"),
            _ => format!("SharedAccessKeyName={garbage};{key}"),
        };
        match SasKey::parse(&text) {
            Err(e) => {
                let shown = format!("{e} {e:?}");
                prop_assert!(!shown.contains(key.trim_end_matches('=')), "{shown}");
            }
            Ok(parsed) => {
                let shown = format!("{parsed:?}");
                prop_assert!(!shown.contains(parsed.key.expose()), "{shown}");
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A token with one huge field is refused with a message of bounded size: the relay
    /// answers it to the client and logs it (a renewToken may be 16 MiB).
    #[test]
    fn sas_errors_are_bounded(huge in long(), which in 0..4usize) {
        let key = sas_key();
        let mut fields = [
            "http%3A%2F%2Frelay.example.com%2Fc".to_string(),
            "AAAA".to_string(),
            "2000000000".to_string(),
            "send".to_string(),
        ];
        fields[which] = huge;
        let [sr, sig, se, skn] = fields;
        let text = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}");
        match SasToken::parse(&text) {
            Err(e) => assert_bounded("SasToken::parse", &e.to_string())?,
            Ok(token) => {
                if let Err(e) = token.verify(&key.key, 0) {
                    assert_bounded("SasToken::verify", &e.to_string())?;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hybrid Connections targets, control messages, relay and rendezvous addresses

proptest! {
    #![proptest_config(config(800))]

    #[test]
    fn hc_targets_never_panic(path in prop_oneof![hostile(), hostile().prop_map(|p| format!("/$hc/{p}"))],
                              query in prop::option::of(hostile())) {
        if let Some(target) = HcTarget::parse(&path, query.as_deref()) {
            prop_assert!(path.starts_with("/$hc/"));
            prop_assert!(!target.entity.ends_with('/'));
            let _ = target.get("sb-hc-action");
        }
    }

    /// Any bytes percent-encoded in the path: a target exactly when they are UTF-8, and the
    /// entity is what was encoded.
    #[test]
    fn hc_target_entities_are_decoded_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let path = format!("/$hc/{}", percent_encoding::percent_encode(&bytes, NON_ALPHANUMERIC));
        let target = HcTarget::parse(&path, None);
        match std::str::from_utf8(&bytes) {
            Ok(text) => prop_assert_eq!(target.map(|t| t.entity), Some(text.trim_end_matches('/').to_string())),
            Err(_) => prop_assert!(target.is_none()),
        }
    }

    #[test]
    fn control_messages_never_panic(text in prop_oneof![
        hostile(),
        (hostile(), hostile(), hostile(), prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            prop::sample::select(vec!["65535", "65536", "18446744073709551615",
                "4611686018427387904", "1e309", "-0", "0.5", "1e2", "null", "\"80\"",
                "99999999999999999999999999"]).prop_map(String::from),
        ]).prop_map(|(address, id, header, port)| format!(
            r#"{{"accept":{{"address":{},"id":{},"connectHeaders":{{{}:{}}},"remoteEndpoint":{{"address":"a","port":{port}}}}}}}"#,
            serde_json::Value::String(address), serde_json::Value::String(id),
            serde_json::Value::String(header.clone()), serde_json::Value::String(header))),
        (1usize..20_000, prop::sample::select(vec!["[", "{\"accept\":", "{\"a\":[", "{\"renewToken\":{\"token\":"]))
            .prop_map(|(depth, open)| open.repeat(depth)),
    ]) {
        if let Ok(msg) = serde_json::from_str::<ControlMessage>(&text) {
            let again = serde_json::to_string(&msg).unwrap();
            prop_assert_eq!(serde_json::from_str::<ControlMessage>(&again).unwrap(), msg);
        }
    }
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (
            hostile(),
            hostile(),
            prop::collection::btree_map(hostile(), hostile(), 0..4),
            prop::option::of((hostile(), any::<u16>())),
        )
            .prop_map(|(address, id, connect_headers, remote)| {
                ControlMessage::Accept(Accept {
                    address,
                    id,
                    connect_headers,
                    remote_endpoint: remote.map(|(address, port)| RemoteEndpoint { address, port }),
                })
            }),
        hostile().prop_map(|token| ControlMessage::RenewToken(RenewToken { token })),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn control_messages_round_trip(msg in control_message()) {
        let text = serde_json::to_string(&msg).unwrap();
        prop_assert_eq!(serde_json::from_str::<ControlMessage>(&text).unwrap(), msg);
    }

    /// A renewToken carries a credential: its Debug never shows it.
    #[test]
    fn renew_token_debug_hides_the_token(token in "[A-Za-z0-9%&=]{8,64}") {
        let shown = format!("{:?}", ControlMessage::RenewToken(RenewToken { token: token.clone() }));
        prop_assert!(!shown.contains(&token), "{}", shown);
    }
}

proptest! {
    #![proptest_config(config(800))]

    /// Whatever parses as a relay address prints as an authority that parses back to it, and
    /// the relay's own URLs are rendezvous addresses it trusts.
    #[test]
    fn relay_addresses_never_panic_and_round_trip(text in prop_oneof![
        hostile(),
        (prop::sample::select(vec!["wss://", "sb://", "https://", "ws://", "", "WSS://", "http://"]),
         hostile()).prop_map(|(s, rest)| format!("{s}{rest}")),
    ], rendezvous in hostile()) {
        if let Ok(address) = RelayAddress::parse(&text) {
            prop_assert!(!address.host.is_empty());
            // sb:// hosts are not normalised; `sb_addresses_read_like_wss` shows it.
            let sb = url::Url::parse(&text).is_ok_and(|u| u.scheme() == "sb");
            let _ = address.resource_uri("c");
            let own = address.url("c", Action::Accept, "1");
            if !sb {
                let again = RelayAddress::parse(&address.authority());
                prop_assert_eq!(again.as_ref().ok(), Some(&address), "{:?}", again);
                prop_assert_eq!(address.check_rendezvous(&own), Ok(()), "{}", own);
            } else {
                let _ = address.check_rendezvous(&own);
            }
            let _ = address.check_rendezvous(&rendezvous);
        }
    }
}

fn host_and_port() -> impl Strategy<Value = (String, IpOrName)> {
    prop_oneof![
        dns_name().prop_map(|n| (n.clone(), IpOrName::Name(n))),
        any::<std::net::Ipv4Addr>().prop_map(|ip| (ip.to_string(), IpOrName::Ip(ip.into()))),
        any::<Ipv6Addr>().prop_map(|ip| (format!("[{ip}]"), IpOrName::Ip(ip.into()))),
    ]
}

#[derive(Debug, Clone)]
enum IpOrName {
    Ip(IpAddr),
    Name(String),
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn relay_addresses_keep_host_and_port((host, expected) in host_and_port(),
                                          port in prop::option::of(any::<u16>()),
                                          scheme in prop::sample::select(vec!["wss://", "sb://", "https://", ""]),
                                          case in any::<bool>(),
                                          entity in entity(), id in "[a-f0-9-]{1,36}") {
        // sb:// hosts keep their case; `sb_addresses_read_like_wss` shows it.
        let host = if case && scheme != "sb://" { host.to_ascii_uppercase() } else { host };
        let text = match port {
            Some(p) => format!("{scheme}{host}:{p}"),
            None => format!("{scheme}{host}"),
        };
        let address = RelayAddress::parse(&text).unwrap();
        match expected {
            IpOrName::Ip(ip) => prop_assert_eq!(address.host.parse::<IpAddr>().ok(), Some(ip)),
            IpOrName::Name(name) => prop_assert_eq!(&address.host, &name),
        }
        // 443 is https/wss's default and disappears; `sb` has no default and keeps it.
        prop_assert_eq!(address.port, port.unwrap_or(443));
        prop_assert!(validate_entity(&entity).is_ok());
        let own = address.url(&entity, Action::Accept, &id);
        prop_assert_eq!(address.check_rendezvous(&own), Ok(()));
    }

    /// URL tricks that put the relay's name somewhere other than the host never make an
    /// attacker's host trusted.
    #[test]
    fn rendezvous_tricks_are_refused(relay in dns_name(), attacker in dns_name(),
                                     port in any::<u16>(), template in 0..9usize) {
        prop_assume!(!attacker.eq_ignore_ascii_case(&relay));
        let ours = RelayAddress::parse(&format!("wss://{relay}")).unwrap();
        let address = match template {
            0 => format!("wss://{relay}@{attacker}/$hc/c"),
            1 => format!("wss://{attacker}#@{relay}/$hc/c"),
            2 => format!("wss://{attacker}\\@{relay}/$hc/c"),
            3 => format!("wss://{attacker}?@{relay}/"),
            4 => format!("wss://{attacker}/@{relay}"),
            5 => format!("wss://{relay}.{attacker}/$hc/c"),
            6 => format!("wss://{relay}:{port}@{attacker}/"),
            7 => format!("wss://{attacker}%40{relay}/"),
            _ => format!("wss://{attacker}:443/{relay}"),
        };
        prop_assert!(ours.check_rendezvous(&address).is_err(), "{}", address);
        let azure = RelayAddress::parse("sb://ns.servicebus.windows.net").unwrap();
        let gateway = format!("wss://{attacker}.servicebus.windows.net.{relay}/$hc/c");
        prop_assert!(azure.check_rendezvous(&gateway).is_err(), "{}", gateway);
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// `sb://` is the scheme Azure's connection strings use and means the same as `wss://`,
    /// so it must name the same host: the URL parser treats `sb` as a non-special scheme and
    /// keeps its host as written (case, percent-encoding), so the relay address differs from
    /// its own `wss://` form (tokens minted over it name a host the relay does not know), and
    /// some (`sb://%`) parse although the relay's own URLs built from them are refused.
    #[test]
    fn sb_addresses_read_like_wss(host in prop_oneof![
        dns_name().prop_map(|h| h.to_ascii_uppercase()),
        hostile(),
    ]) {
        let sb = RelayAddress::parse(&format!("sb://{host}"));
        let wss = RelayAddress::parse(&format!("wss://{host}"));
        if let Ok(sb) = &sb {
            let own = sb.url("c", Action::Accept, "1");
            prop_assert_eq!(sb.check_rendezvous(&own), Ok(()), "{}", own);
        }
        if let (Ok(sb), Ok(wss)) = (sb, wss) {
            prop_assert_eq!(sb, wss);
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// `RelayAddress::parse` reads the management API's Host header: its errors go back to
    /// the client and must stay small.
    #[test]
    fn relay_address_errors_are_bounded(huge in long(), shape in 0..3usize) {
        let text = match shape {
            0 => format!("wss://{huge}:99999"),
            1 => format!("ws://{huge}"),
            _ => format!("wss://a b{huge}"),
        };
        if let Err(e) = RelayAddress::parse(&text) {
            assert_bounded("RelayAddress::parse", &e.to_string())?;
        }
    }

    /// A rendezvous address comes from the relay; a refusal is logged by the agent.
    #[test]
    fn rendezvous_errors_are_bounded(huge in "[a-z]{1,60}", n in 1usize..1000) {
        let ours = RelayAddress::parse("wss://relay.example.com").unwrap();
        let host = vec![huge; n].join(".");
        if let Err(e) = ours.check_rendezvous(&format!("wss://{host}/$hc/c")) {
            assert_bounded("check_rendezvous", &e.to_string())?;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The management API: resource ids and request bodies

fn cluster_parts() -> impl Strategy<Value = (String, String, String)> {
    (
        "[a-zA-Z0-9-]{1,64}",
        "[a-zA-Z0-9._()-]{1,90}",
        "[a-zA-Z0-9._-]{1,63}",
    )
}

fn flip_case(s: &str, flips: &[bool]) -> String {
    s.chars()
        .zip(flips.iter().cycle())
        .map(|(c, &up)| {
            if up {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(512))]

    /// Valid parts make an id whose path parses back to it, with the fixed segments in any
    /// case; the id's hybrid connection is a valid entity and ignores case.
    #[test]
    fn cluster_ids_round_trip((sub, rg, name) in cluster_parts(),
                              flips in prop::collection::vec(any::<bool>(), 1..8),
                              slashes in prop::sample::select(vec!["", "/", "//"])) {
        let id = ClusterId::new(&sub, &rg, &name).unwrap();
        prop_assert_eq!(ClusterId::parse(&id.path()).unwrap(), id.clone());
        let path = format!(
            "{slashes}/{}/{sub}/{}/{rg}/{}/{}/{name}{slashes}",
            flip_case("subscriptions", &flips),
            flip_case("resourceGroups", &flips),
            flip_case("providers", &flips),
            flip_case("Microsoft.Kubernetes/connectedClusters", &flips),
        );
        prop_assert_eq!(ClusterId::parse(&path).unwrap(), id.clone());
        prop_assert_eq!(id.key(), id.path().to_ascii_lowercase());
        let hc = id.hybrid_connection();
        prop_assert!(hc.starts_with("cc-") && validate_entity(&hc).is_ok(), "{}", hc);
        let upper = ClusterId::new(&sub.to_ascii_uppercase(), &rg.to_ascii_uppercase(),
                                   &name.to_ascii_uppercase()).unwrap();
        prop_assert_eq!(upper.hybrid_connection(), hc);
    }
}

proptest! {
    #![proptest_config(config(800))]

    #[test]
    fn cluster_ids_never_panic(text in prop_oneof![
        hostile(),
        (hostile(), hostile(), hostile()).prop_map(|(s, rg, n)| format!(
            "/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Kubernetes/connectedClusters/{n}")),
    ]) {
        if let Ok(id) = ClusterId::parse(&text) {
            prop_assert_eq!(ClusterId::parse(&id.path()).unwrap(), id.clone());
            prop_assert!(validate_entity(&id.hybrid_connection()).is_ok());
        }
    }

    /// The bodies the management API deserializes: hostile JSON is refused, never a panic;
    /// what is accepted serializes and reads back the same.
    #[test]
    fn management_bodies_never_panic(body in prop_oneof![
        hostile(),
        (hostile(), hostile(), prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            prop::sample::select(vec!["4294967295", "4294967296", "18446744073709551615",
                "4611686018427387904", "-1", "1e400", "1.5", "null", "\"3\""]).prop_map(String::from),
        ]).prop_map(|(location, cert, n)| format!(
            r#"{{"location":{},"tags":{{"a":"b"}},"properties":{{"agentPublicKeyCertificate":{},"distribution":null}},"agentVersion":"1","totalNodeCount":{n},"totalCoreCount":{n}}}"#,
            serde_json::Value::String(location), serde_json::Value::String(cert))),
        (1usize..20_000).prop_map(|depth| format!("{{\"location\":\"x\",\"tags\":{}", "[".repeat(depth))),
    ]) {
        if let Ok(request) = serde_json::from_str::<ClusterRequest>(&body) {
            let value = serde_json::to_value(&request).unwrap();
            let again: ClusterRequest = serde_json::from_value(value.clone()).unwrap();
            prop_assert_eq!(serde_json::to_value(&again).unwrap(), value);
            let _ = agent_key(&request.properties.agent_public_key_certificate);
        }
        if let Ok(status) = serde_json::from_str::<AgentStatus>(&body) {
            let text = serde_json::to_string(&status).unwrap();
            prop_assert_eq!(serde_json::from_str::<AgentStatus>(&text).unwrap(), status);
        }
    }

    /// `agentPublicKeyCertificate`: exactly an uncompressed P-256 SubjectPublicKeyInfo is a key.
    #[test]
    fn agent_keys_are_exactly_p256_points(point in prop::collection::vec(any::<u8>(), 64),
                                          junk in prop::collection::vec(any::<u8>(), 0..100),
                                          text in hostile(), cut in 0..91usize) {
        const PREFIX: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let mut der = PREFIX.to_vec();
        der.push(4);
        der.extend_from_slice(&point);
        let expected = [&[4u8][..], &point].concat();
        prop_assert_eq!(agent_key(&B64.encode(&der)), Ok(expected));
        prop_assert!(agent_key(&B64.encode(&der[..cut])).is_err());
        let mut longer = der.clone();
        longer.extend_from_slice(&junk);
        prop_assert_eq!(agent_key(&B64.encode(&longer)).is_ok(), junk.is_empty());
        prop_assert!(agent_key(&B64.encode(&junk)).is_err());
        let _ = agent_key(&text);
        let _ = signed_message(u64::MAX, &text, text.as_bytes());
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Resource-id errors go back to the caller in ARM's error body and must stay small.
    #[test]
    fn cluster_id_errors_are_bounded(huge in long(), which in 0..4usize) {
        let mut parts = ["s".to_string(), "rg".to_string(), "name".to_string()];
        let text = if which == 3 {
            format!("/subscriptions/{huge}")
        } else {
            parts[which] = format!("{huge}!");
            let [s, rg, n] = &parts;
            format!("/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Kubernetes/connectedClusters/{n}")
        };
        let e = ClusterId::parse(&text).unwrap_err();
        assert_bounded("ClusterId::parse", &e.to_string())?;
    }
}

// ---------------------------------------------------------------------------------------
// Query classification and WebSocket upgrade headers

fn query_pair() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![
            prop::sample::select(vec!["watch", "follow", "Watch", "watchx", "label", "w"])
                .prop_map(String::from),
            hostile(),
        ],
        prop_oneof![
            prop::sample::select(vec![
                "1", "t", "T", "true", "TRUE", "True", "tRUE", "yes", "0", "false", " true",
                "true ", "",
            ])
            .prop_map(String::from),
            hostile(),
        ],
    )
}

proptest! {
    #![proptest_config(config(800))]

    /// A watch exactly when some decoded `watch` is one of Go's true spellings.
    #[test]
    fn watch_queries_follow_go(pairs in prop::collection::vec(query_pair(), 0..6),
                                    path in "(/[a-z0-9]{1,8}){0,5}", raw in hostile()) {
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        let expected = pairs.iter().any(|(k, v)| {
            k == "watch"
                && matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True")
        });
        prop_assert_eq!(is_watch(&format!("{path}?{query}")), expected);
        prop_assert!(!is_watch(&path));
        let _ = is_watch(&raw);
        let _ = is_watch(&format!("{path}?{raw}"));
    }

    /// Header values are bytes, not UTF-8: no value makes the upgrade checks panic.
    #[test]
    fn upgrade_headers_never_panic(values in prop::collection::vec(
                                       (0..4usize, prop::collection::vec(any::<u8>(), 0..40)), 0..6)) {
        let names = [
            http::header::UPGRADE,
            http::header::CONNECTION,
            http::header::SEC_WEBSOCKET_KEY,
            http::header::SEC_WEBSOCKET_VERSION,
        ];
        let mut builder = http::Request::builder().uri("/$hc/c");
        for (name, value) in &values {
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                builder = builder.header(names[*name].clone(), v);
            }
        }
        let request = builder.body(()).unwrap();
        let _ = is_websocket(&request);
        let _ = header_has_token(request.headers(), http::header::CONNECTION, "upgrade");
        if let Some(response) = switching_protocols::<_, ()>(&request) {
            prop_assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The kubeconfig merge

const OURS: &str = "e2e-fuzz";
/// The three lists the merge edits, each with the name of our entry in it.
const LISTS: [(&str, &str); 3] = [
    ("clusters", OURS),
    ("users", "clusterconnect-e2e-fuzz"),
    ("contexts", OURS),
];
/// Top-level keys the merge may set.
const SET_KEYS: [&str; 4] = ["apiVersion", "kind", "current-context", "preferences"];

fn merge(existing: &str, name: &str, server: &str, ca: &str, token: &Secret) -> Option<String> {
    let entry = Entry {
        name,
        server,
        ca_pem: ca,
        token,
    };
    let options = Options {
        set_current: true,
        overwrite: false,
        lock_wait: Duration::from_millis(1),
    };
    kubeconfig::merge(existing, &entry, &options, Path::new("/fuzz/kubeconfig")).ok()
}

/// The items of list `field` not named `ours`.
fn foreign_items(doc: &Value, field: &str, ours: &str) -> Vec<Value> {
    doc.get(field)
        .and_then(Value::as_sequence)
        .map(|items| {
            items
                .iter()
                .filter(|i| i.get("name").and_then(Value::as_str) != Some(ours))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Checks what any successful merge must give: YAML that parses, every foreign entry and
/// top-level key kept, our entries present, and a second merge that changes nothing.
fn check_merged(existing: &str, merged: &str, token: &Secret) -> Result<(), TestCaseError> {
    let after: Value = serde_norway::from_str(merged)
        .map_err(|e| TestCaseError::fail(format!("merged YAML does not parse: {e}\n{merged}")))?;
    let before: Value = if existing.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_norway::from_str(existing).unwrap()
    };
    for (field, ours) in LISTS {
        let kept = foreign_items(&after, field, ours);
        for item in foreign_items(&before, field, ours) {
            prop_assert!(kept.contains(&item), "{field}: lost {item:?}\n{merged}");
        }
        let names: Vec<&str> = after[field]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("name").and_then(Value::as_str))
            .collect();
        prop_assert!(names.contains(&ours), "{field} lacks {ours}\n{merged}");
    }
    if let Value::Mapping(map) = &before {
        for (k, v) in map {
            let touched = k
                .as_str()
                .is_some_and(|k| SET_KEYS.contains(&k) || LISTS.iter().any(|(f, _)| *f == k));
            if !touched {
                prop_assert_eq!(after.get(k), Some(v), "key {:?}\n{}", k, merged);
            }
        }
    }
    prop_assert_eq!(
        after.get("current-context").and_then(Value::as_str),
        Some(OURS)
    );
    let again = merge(
        merged,
        OURS,
        "https://127.0.0.1:1/clusters/e2e-fuzz",
        "PEM",
        token,
    );
    prop_assert_eq!(
        again.as_deref(),
        Some(merged),
        "merging twice changed the file"
    );
    Ok(())
}

fn yaml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}",
        prop::sample::select(vec![
            "null",
            "~",
            "",
            "true",
            "no",
            "yes",
            "123",
            "0x1F",
            "1e3",
            ".nan",
            "- x",
            "a: b",
            "#c",
            "'q'",
            "\"",
            "|",
            ">",
            "*a",
            "&a",
            "!t",
            "---",
            "...",
            " lead",
            "trail ",
            "multi\nline",
            "crlf\r\nline",
            "tab\there",
            "\u{85}",
            "\u{feff}bom",
            "\u{2028}",
            "\0",
            "é",
            "clusterconnect",
        ])
        .prop_map(String::from),
        any::<String>(),
    ]
}

fn yaml_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        yaml_scalar().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((yaml_scalar(), inner), 0..4).prop_map(|pairs| {
                Value::Mapping(
                    pairs
                        .into_iter()
                        .map(|(k, v)| (Value::String(k), v))
                        .collect(),
                )
            }),
        ]
    })
}

/// A kubeconfig of foreign entries (any names but ours, any bodies) and foreign keys.
fn foreign_kubeconfig() -> impl Strategy<Value = Value> {
    let named = |kind: &'static str| {
        prop::collection::vec(
            (
                yaml_scalar()
                    .prop_filter("not ours", |n| n != OURS && n != "clusterconnect-e2e-fuzz"),
                yaml_value(),
                yaml_value(),
            ),
            0..4,
        )
        .prop_map(move |items| {
            items
                .into_iter()
                .map(|(name, body, extra)| {
                    let mut m = Mapping::new();
                    m.insert("name".into(), name.into());
                    m.insert(kind.into(), body);
                    m.insert("extra".into(), extra);
                    Value::Mapping(m)
                })
                .collect::<Vec<_>>()
        })
    };
    (
        named("cluster"),
        named("user"),
        named("context"),
        prop::collection::vec((yaml_scalar(), yaml_value()), 0..4),
    )
        .prop_map(|(clusters, users, contexts, extra)| {
            let mut root = Mapping::new();
            for (k, v) in extra {
                root.insert(k.into(), v);
            }
            root.insert("clusters".into(), Value::Sequence(clusters));
            root.insert("users".into(), Value::Sequence(users));
            root.insert("contexts".into(), Value::Sequence(contexts));
            Value::Mapping(root)
        })
}

proptest! {
    #![proptest_config(config(500))]

    /// Arbitrary text as the existing kubeconfig: a refusal or a merge that keeps everything
    /// foreign, never a panic.
    #[test]
    fn kubeconfig_merge_never_panics(existing in prop_oneof![
        hostile(),
        prop::collection::vec(prop_oneof![vocab(), yaml_scalar(), Just("\n".to_string()),
                                          Just("  ".to_string())], 0..30).prop_map(|v| v.concat()),
        (1usize..600, prop::sample::select(vec!["[", "{", "- ", "a:\n  ", "&a [*a, "]))
            .prop_map(|(depth, open)| open.repeat(depth)),
    ]) {
        let token = Secret::new("t0ken");
        if let Some(merged) = merge(&existing, OURS, "https://127.0.0.1:1/clusters/e2e-fuzz", "PEM", &token) {
            check_merged(&existing, &merged, &token)?;
        }
    }
}

proptest! {
    #![proptest_config(config(160))]

    /// A kubeconfig full of other people's entries: the merge succeeds and keeps every one.
    #[test]
    fn kubeconfig_merge_keeps_foreign_entries(doc in foreign_kubeconfig()) {
        let existing = serde_norway::to_string(&doc).unwrap();
        let token = Secret::new("t0ken");
        let merged = merge(&existing, OURS, "https://127.0.0.1:1/clusters/e2e-fuzz", "PEM", &token);
        prop_assert!(merged.is_some(), "refused:\n{}", existing);
        check_merged(&existing, &merged.unwrap(), &token)?;
    }

    /// Whatever the entry's fields hold, the written YAML reads back to them.
    #[test]
    fn kubeconfig_entries_read_back(name in yaml_scalar(), server in yaml_scalar(),
                                    ca in yaml_scalar(), token in yaml_scalar()) {
        let secret = Secret::new(token.clone());
        let merged = merge("", &name, &server, &ca, &secret).unwrap();
        let doc: Value = serde_norway::from_str(&merged).unwrap();
        let find = |field: &str, wanted: &str| doc[field].as_sequence().and_then(|items| {
            items.iter().find(|i| i.get("name").and_then(Value::as_str) == Some(wanted)).cloned()
        });
        let cluster = find("clusters", &name);
        prop_assert!(cluster.is_some(), "no cluster {:?}\n{}", name, merged);
        let cluster = cluster.unwrap();
        prop_assert_eq!(cluster["cluster"]["server"].as_str(), Some(server.as_str()));
        let ca_data = cluster["cluster"]["certificate-authority-data"].as_str().unwrap();
        prop_assert_eq!(B64.decode(ca_data).unwrap(), ca.as_bytes());
        let user = find("users", &format!("clusterconnect-{name}")).unwrap();
        prop_assert_eq!(user["user"]["token"].as_str(), Some(token.as_str()));
        prop_assert_eq!(doc["current-context"].as_str(), Some(name.as_str()));
    }
}

// ---------------------------------------------------------------------------------------
// The WebSocket byte stream: what a peer sends, frame by frame

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Reads `server` to its end, or gives up after a while: a stream that never ends is a
/// failure, not a hang of the test run.
async fn read_all<S>(server: &mut WsStream<S>) -> Result<std::io::Result<Vec<u8>>, &'static str>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut got)).await {
        Ok(Ok(_)) => Ok(Ok(got)),
        Ok(Err(e)) => Ok(Err(e)),
        Err(_) => Err("the stream did not end"),
    }
}

/// One frame as a hostile peer may write it: any opcode and flags, a length field that may
/// claim far more than follows (up to u64::MAX), masked or not.
fn raw_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<bool>(),
        prop_oneof![
            (0u64..126).boxed(),
            prop::sample::select(vec![
                126u64,
                127,
                65_535,
                65_536,
                16 * 1024 * 1024 + 1,
                1 << 62,
                u64::MAX
            ])
            .boxed(),
        ],
        any::<[u8; 4]>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(first, masked, len, mask, payload)| {
            let mut frame = vec![first];
            let mask_bit = if masked { 0x80 } else { 0 };
            match len {
                0..=125 => frame.push(mask_bit | len as u8),
                126..=65_535 => {
                    frame.push(mask_bit | 126);
                    frame.extend_from_slice(&(len as u16).to_be_bytes());
                }
                _ => {
                    frame.push(mask_bit | 127);
                    frame.extend_from_slice(&len.to_be_bytes());
                }
            }
            if masked {
                frame.extend_from_slice(&mask);
            }
            frame.extend_from_slice(&payload);
            frame
        })
}

proptest! {
    #![proptest_config(config(160))]

    /// Binary and text messages read as their bytes in order; pings and pongs carry none;
    /// the peer's close is the end of the stream.
    #[test]
    fn ws_stream_reads_what_the_peer_sent(messages in prop::collection::vec(
        (0..4u8, prop::collection::vec(any::<u8>(), 0..3000)), 0..12)) {
        let (expected, got) = runtime().block_on(async {
            // The relay's side is a tungstenite server; ours the tunnel's client stream.
            let (a, b) = tokio::io::duplex(64 * 1024);
            let mut relay = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
            let mut stream = WsStream::new(a, Vec::new());
            let mut expected = Vec::new();
            let mut frames = Vec::new();
            for (kind, bytes) in &messages {
                frames.push(match kind {
                    0 => {
                        expected.extend_from_slice(bytes);
                        Message::binary(bytes.clone())
                    }
                    1 => {
                        let text = String::from_utf8_lossy(bytes).into_owned();
                        expected.extend_from_slice(text.as_bytes());
                        Message::text(text)
                    }
                    2 => Message::Ping(bytes[..bytes.len().min(125)].to_vec().into()),
                    _ => Message::Pong(bytes[..bytes.len().min(125)].to_vec().into()),
                });
            }
            let send = async move {
                for frame in frames {
                    if relay.send(frame).await.is_err() {
                        return;
                    }
                }
                let _ = relay.close(None).await;
                // Keep reading so the stream's pongs and close reply never fill the pipe.
                while let Some(Ok(_)) = relay.next().await {}
            };
            let read = async move {
                let got = read_all(&mut stream).await;
                // Letting go of the stream ends the relay's wait for its close reply.
                drop(stream);
                got
            };
            let (_, got) = tokio::join!(send, read);
            (expected, got)
        });
        let got = got.map_err(TestCaseError::fail)?;
        prop_assert_eq!(got.map_err(|e| e.to_string()), Ok(expected));
    }

    /// Arbitrary bytes and hostile frames from the peer end the stream (cleanly or with an
    /// error) without a panic, without hanging, and without yielding more bytes than came in.
    #[test]
    fn ws_stream_survives_garbage(frames in prop::collection::vec(
        prop_oneof![raw_frame(), prop::collection::vec(any::<u8>(), 0..200)], 0..6)) {
        let sent: Vec<u8> = frames.concat();
        let got = runtime().block_on(async {
            let (mut a, b) = tokio::io::duplex(64 * 1024);
            let mut stream = WsStream::new(b, Vec::new());
            let bytes = sent.clone();
            let send = async move {
                let _ = a.write_all(&bytes).await;
                let _ = a.shutdown().await;
                // Drain what the stream writes back (pongs, close) until it lets go.
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut sink)).await;
            };
            let (_, got) = tokio::join!(send, async {
                let got = read_all(&mut stream).await;
                drop(stream);
                got
            });
            got
        });
        let got = got.map_err(TestCaseError::fail)?;
        if let Ok(bytes) = got {
            prop_assert!(bytes.len() <= sent.len());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Entra ID bearer tokens, which the management API reads from any caller

/// The tenant the validator allows. No generated token names it, so no case reaches the
/// key fetch (which would dial the authority).
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn validator() -> Validator {
    let tls = rustls::ClientConfig::builder_with_provider(clusterconnect::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Validator::new(
        ValidatorConfig {
            authority: Authority::new(Cloud::AzurePublicCloud, Some("https://127.0.0.1:1"))
                .unwrap(),
            server_app_id: "api://6256c85f-0aad-4d50-b960-e6e9b21efe35".into(),
            tenants: vec![TENANT.into()],
            refetch_interval: Duration::from_secs(3600),
        },
        HttpClient::new(
            std::sync::Arc::new(tls),
            Duration::from_millis(100),
            Duration::from_millis(200),
        ),
    )
}

fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "18446744073709551615",
            "18446744073709551616",
            "4611686018427387904",
            "-1",
            "1e400",
            "0.5",
            "null",
            "\"1\"",
        ])
        .prop_map(String::from),
    ]
}

fn jwt() -> impl Strategy<Value = String> {
    let part = |json: String| URL_SAFE_NO_PAD.encode(json);
    let string = || {
        prop_oneof![
            hostile(),
            any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        ]
        .prop_map(|s| serde_json::Value::String(s).to_string())
    };
    let alg = prop_oneof![
        prop::sample::select(vec![
            "\"RS256\"",
            "\"none\"",
            "\"HS256\"",
            "\"rs256\"",
            "null",
            "1"
        ])
        .prop_map(String::from),
        string(),
    ];
    prop_oneof![
        hostile(),
        (hostile(), hostile(), hostile()).prop_map(|(h, p, s)| format!("{h}.{p}.{s}")),
        (hostile(), hostile()).prop_map(move |(h, p)| format!("{}.{}.c2ln", part(h), part(p))),
        (
            alg,
            string(),
            string(),
            string(),
            string(),
            json_number(),
            json_number()
        )
            .prop_map(move |(alg, kid, iss, tid, aud, exp, nbf)| {
                let header = format!(r#"{{"alg":{alg},"kid":{kid},"typ":"JWT"}}"#);
                let claims = format!(
                    r#"{{"iss":{iss},"tid":{tid},"aud":{aud},"exp":{exp},"nbf":{nbf},"oid":"o"}}"#
                );
                format!("{}.{}.c2ln", part(header), part(claims))
            }),
    ]
}

proptest! {
    #![proptest_config(config(600))]

    /// Any bearer token, well-formed or not, is refused (none is signed) without a panic.
    #[test]
    fn entra_tokens_never_panic(token in jwt()) {
        prop_assume!(!token.contains(TENANT));
        let validator = validator();
        let _ = validator.is_entra_token(&token);
        let result = runtime().block_on(validator.validate(&token));
        prop_assert!(result.is_err());
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// A refused bearer token's reason goes back to the caller (the management API's error
    /// chain): it must stay small however large the token's fields.
    #[test]
    fn entra_rejections_are_bounded(huge in long(), which in 0..3usize) {
        let mut fields = ["RS256".to_string(), "kid".to_string(), "tenant".to_string()];
        fields[which] = huge;
        let [alg, kid, tid] = fields;
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#));
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"tid":"{tid}","iss":"x","exp":1}}"#));
        let e = runtime()
            .block_on(validator().validate(&format!("{header}.{claims}.c2ln")))
            .unwrap_err();
        assert_bounded("Validator::validate", &e.to_string())?;
    }
}

// ---------------------------------------------------------------------------------------
// PROXY protocol headers (the first bytes of every connection behind a balancer)

const PP_V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A header and its encoding: v1 or v2, IPv4 or IPv6, PROXY or LOCAL, with TLVs.
fn pp_header() -> impl Strategy<Value = (Header, Vec<u8>)> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ];
    let tlvs = prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
        0..4,
    );
    (
        ip,
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u16>(),
        tlvs,
        0..4usize,
    )
        .prop_map(|(src, dst6, sport, dport, tlvs, shape)| {
            let dst = match src {
                IpAddr::V4(_) => IpAddr::from([dst6[0], dst6[1], dst6[2], dst6[3]]),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(dst6)),
            };
            let source = std::net::SocketAddr::new(src, sport);
            let destination = std::net::SocketAddr::new(dst, dport);
            let proxied = Header::Proxied {
                source,
                destination,
            };
            match shape {
                0 => {
                    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                    (
                        proxied,
                        format!("PROXY {family} {src} {dst} {sport} {dport}\r\n").into_bytes(),
                    )
                }
                1 => (Header::Local, b"PROXY UNKNOWN\r\n".to_vec()),
                _ => {
                    let mut block = Vec::new();
                    let family = match (src, dst) {
                        (IpAddr::V4(s), IpAddr::V4(d)) => {
                            block.extend_from_slice(&s.octets());
                            block.extend_from_slice(&d.octets());
                            0x11
                        }
                        (IpAddr::V6(s), IpAddr::V6(d)) => {
                            block.extend_from_slice(&s.octets());
                            block.extend_from_slice(&d.octets());
                            0x21
                        }
                        _ => unreachable!("one family"),
                    };
                    block.extend_from_slice(&sport.to_be_bytes());
                    block.extend_from_slice(&dport.to_be_bytes());
                    for (kind, value) in tlvs {
                        block.push(kind);
                        block.extend_from_slice(&(value.len() as u16).to_be_bytes());
                        block.extend_from_slice(&value);
                    }
                    let local = shape == 3;
                    let mut b = PP_V2_SIGNATURE.to_vec();
                    b.push(if local { 0x20 } else { 0x21 });
                    b.push(family);
                    b.extend_from_slice(&(block.len() as u16).to_be_bytes());
                    b.extend_from_slice(&block);
                    (if local { Header::Local } else { proxied }, b)
                }
            }
        })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Arbitrary bytes, and arbitrary bytes after either signature: no panic, a consumed
    /// length within the input and the specification's bounds, small errors.
    #[test]
    fn proxy_headers_never_panic(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..700),
        prop::collection::vec(any::<u8>(), 0..120).prop_map(|b| [b"PROXY ".as_slice(), &b].concat()),
        prop::collection::vec(any::<u8>(), 0..700).prop_map(|b| [PP_V2_SIGNATURE, &b].concat()),
        hostile().prop_map(|t| format!("PROXY {t}\r\n").into_bytes()),
    ]) {
        match pp::parse(&bytes) {
            Ok(Some((_, n))) => {
                prop_assert!(n <= bytes.len());
                prop_assert!(n <= pp::MAX_V2);
            }
            Ok(None) => prop_assert!(bytes.len() < pp::MAX_V2),
            Err(e) => assert_bounded("proxy_protocol::parse", &e.to_string())?,
        }
    }

    /// Every well-formed header reads back as written, whatever follows it, and each of its
    /// proper beginnings is incomplete rather than wrong.
    #[test]
    fn proxy_headers_round_trip((header, bytes) in pp_header(),
                                after in prop::collection::vec(any::<u8>(), 0..64),
                                cut in any::<prop::sample::Index>()) {
        prop_assume!(bytes.len() <= pp::MAX_V2);
        let whole = [bytes.as_slice(), &after].concat();
        prop_assert_eq!(pp::parse(&whole), Ok(Some((header, bytes.len()))));
        let cut = cut.index(bytes.len());
        prop_assert_eq!(pp::parse(&bytes[..cut]), Ok(None));
    }
}

//! Shared Access Signature tokens, exactly as Azure Relay defines them:
//! `SharedAccessSignature sr=<url-encoded URI>&sig=<url-encoded base64 HMAC-SHA256>&se=<unix expiry>&skn=<rule>`,
//! where the HMAC key is the rule's key string as UTF-8 and the signed text is `sr + "\n" + se`
//! with `sr` in its URL-encoded form.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::secret::{clip, Secret};

const PREFIX: &str = "SharedAccessSignature ";

/// JavaScript's `encodeURIComponent` set, which Microsoft's clients use for `sr` and `sig`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// How much of a caller's field an error quotes.
const QUOTED: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SasError {
    #[error("token is not a SharedAccessSignature (it must start with 'SharedAccessSignature ')")]
    NotSas,
    #[error("token is missing its '{0}' field")]
    MissingField(&'static str),
    #[error("token field 'se' is not a unix time: {0:?}")]
    BadExpiry(String),
    #[error("token expired {0} seconds ago; mint a new one")]
    Expired(u64),
    #[error("token signature does not match key '{0}'")]
    BadSignature(String),
    #[error("a listener token may be valid for at most {max_secs} seconds on this relay; mint a shorter one and renew it (renewToken)")]
    LifetimeTooLong { max_secs: u64 },
    #[error("token is for resource '{token}', not for '{requested}'")]
    WrongResource { token: String, requested: String },
    #[error("rule '{rule}' does not grant the {right} right")]
    MissingRight { rule: String, right: &'static str },
}

/// Why a key file or connection string could not be used. Nothing here ever holds text from
/// the input that could be key material: field names are echoed only when they look like one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFormatError {
    #[error("a part is not of the form Name=Value; write 'SharedAccessKeyName=<rule>;SharedAccessKey=<key>'")]
    NotNameValue,
    #[error("unknown field '{0}'; expected SharedAccessKeyName, SharedAccessKey, Endpoint or EntityPath")]
    UnknownField(String),
    #[error("the file holds a bare key (or another unknown field, not shown); write 'SharedAccessKeyName=<rule>;SharedAccessKey=<key>': the rule's name is part of every token")]
    BareKey,
    #[error("expected 'SharedAccessKeyName=<rule>;SharedAccessKey=<key>'")]
    Incomplete,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {}", path.display())]
    Format {
        path: std::path::PathBuf,
        #[source]
        source: KeyFormatError,
    },
}

/// A named key of an authorization rule (`SharedAccessKeyName` / `SharedAccessKey`).
#[derive(Clone, Debug)]
pub struct SasKey {
    pub name: String,
    pub key: Secret,
}

impl SasKey {
    /// Parses the connection-string form the Azure portal shows:
    /// `Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=...`
    /// (`Endpoint` and `EntityPath` are accepted and ignored).
    pub fn parse(text: &str) -> Result<SasKey, KeyFormatError> {
        let mut name = None;
        let mut key = None;
        for part in text.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or(KeyFormatError::NotNameValue)?;
            match k.trim() {
                "SharedAccessKeyName" => name = Some(v.trim().to_string()),
                "SharedAccessKey" => key = Some(v.trim().to_string()),
                "Endpoint" | "EntityPath" => {}
                // Base64 keys end in '=' padding, so a bare key parses as an unknown field
                // whose "name" is the key itself and whose value is padding: never echo
                // anything that could be one.
                other if looks_like_field_name(other) && !v.trim().trim_matches('=').is_empty() => {
                    return Err(KeyFormatError::UnknownField(other.to_string()))
                }
                _ => return Err(KeyFormatError::BareKey),
            }
        }
        match (name, key) {
            (Some(name), Some(key)) if !name.is_empty() && !key.is_empty() => Ok(SasKey {
                name,
                key: Secret::new(key),
            }),
            _ => Err(KeyFormatError::Incomplete),
        }
    }

    pub fn from_file(path: &Path) -> Result<SasKey, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        SasKey::parse(&text).map_err(|source| KeyFileError::Format {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Mints a token for `resource_uri` (e.g. `http://relay.example.com/my-cluster`) valid for `ttl`.
    pub fn mint(&self, resource_uri: &str, ttl: Duration) -> Secret {
        self.mint_until(resource_uri, unix_now().saturating_add(ttl.as_secs()))
    }

    pub fn mint_until(&self, resource_uri: &str, expiry: u64) -> Secret {
        let sr = utf8_percent_encode(resource_uri, URI_COMPONENT).to_string();
        let sig = sign(self.key.expose().as_bytes(), &sr, &expiry.to_string());
        let sig = utf8_percent_encode(&sig, URI_COMPONENT);
        Secret::new(format!(
            "{PREFIX}sr={sr}&sig={sig}&se={expiry}&skn={}",
            utf8_percent_encode(&self.name, URI_COMPONENT)
        ))
    }
}

/// A parsed token. `sr_raw` and `se_raw` are kept exactly as sent: the signature covers them.
#[derive(Debug, Clone)]
pub struct SasToken {
    sr_raw: String,
    se_raw: String,
    sig: String,
    pub expiry: u64,
    pub key_name: String,
}

impl SasToken {
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let fields = token.trim().strip_prefix(PREFIX).ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            match k {
                "sr" => sr = Some(v.to_string()),
                "sig" => sig = Some(v.to_string()),
                "se" => se = Some(v.to_string()),
                "skn" => skn = Some(v.to_string()),
                _ => {}
            }
        }
        let sr_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let se_raw = se.ok_or(SasError::MissingField("se"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let skn = skn.ok_or(SasError::MissingField("skn"))?;
        let expiry = se_raw
            .parse::<u64>()
            .map_err(|_| SasError::BadExpiry(clip(&se_raw, QUOTED)))?;
        Ok(SasToken {
            sig: percent_decode_str(&sig).decode_utf8_lossy().into_owned(),
            key_name: percent_decode_str(&skn).decode_utf8_lossy().into_owned(),
            sr_raw,
            se_raw,
            expiry,
        })
    }

    /// What the token is, whatever else its text carries: the rule and the two signed
    /// fields. Unknown fields, repeats and spacing change the text but not this, so a cap
    /// kept per token cannot be sidestepped by padding one (a new token needs the key).
    pub fn identity(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for part in [&self.key_name, &self.sr_raw, &self.se_raw] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().into()
    }

    /// The resource URI the token was minted for, decoded.
    pub fn resource(&self) -> String {
        percent_decode_str(&self.sr_raw)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// Checks the signature (constant time) and the expiry against `now`.
    pub fn verify(&self, key: &Secret, now: u64) -> Result<(), SasError> {
        let sig = B64
            .decode(self.sig.as_bytes())
            .map_err(|_| SasError::BadSignature(clip(&self.key_name, QUOTED)))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
            .map_err(|_| SasError::BadSignature(clip(&self.key_name, QUOTED)))?;
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.se_raw.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| SasError::BadSignature(clip(&self.key_name, QUOTED)))?;
        if self.expiry <= now {
            return Err(SasError::Expired(now - self.expiry));
        }
        Ok(())
    }

    /// Whether the token's resource names `host` (scheme, port and case ignored) and `entity_path`
    /// or a path prefix of it (a namespace-wide token has an empty path).
    pub fn covers(&self, hosts: &[String], entity_path: &str) -> bool {
        let resource = self.resource();
        let rest = resource
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(&resource);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(authority) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        // IPv6 literals are compared without their brackets, however each side spelled them.
        let bare = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_string();
        let host = bare(authority.host());
        if !hosts.iter().any(|h| bare(h).eq_ignore_ascii_case(&host)) {
            return false;
        }
        let token_path = path.trim_matches('/').to_ascii_lowercase();
        let wanted = entity_path.trim_matches('/').to_ascii_lowercase();
        token_path.is_empty()
            || wanted == token_path
            || wanted.starts_with(&format!("{token_path}/"))
    }
}

fn sign(key: &[u8], sr: &str, se: &str) -> String {
    // HMAC is defined for keys of any length (long ones are hashed first): this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Shows the shape of a key-file fragment without its value.
/// Connection-string field names are short words of letters; keys have digits, '+' or '/'.
fn looks_like_field_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SasKey {
        SasKey::parse("SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0a2V5").unwrap()
    }

    #[test]
    fn matches_the_azure_reference_algorithm() {
        let token = key().mint_until("http://relay.example.com/my-cluster", 1_700_000_000);
        let t = token.expose();
        assert!(t.starts_with(
            "SharedAccessSignature sr=http%3A%2F%2Frelay.example.com%2Fmy-cluster&sig="
        ));
        assert!(t.ends_with("&se=1700000000&skn=send"));
        // Output of Node's crypto.createHmac over the same input, as Microsoft's hyco-ws signs.
        let expected = "G6t2Yzo1qSIcIKwx1VxReCHrk7ZUP+dSUPn4iOsQlVM=";
        assert!(
            t.contains("&sig=G6t2Yzo1qSIcIKwx1VxReCHrk7ZUP%2BdSUPn4iOsQlVM%3D&"),
            "{t}"
        );
        assert_eq!(SasToken::parse(t).unwrap().sig, expected);
    }

    #[test]
    fn verifies_signature_expiry_and_resource() {
        let k = key();
        let token = k.mint_until("http://Relay.Example.com:8443/my-cluster", 2_000);
        let parsed = SasToken::parse(token.expose()).unwrap();
        assert_eq!(parsed.verify(&k.key, 1_000), Ok(()));
        assert_eq!(parsed.verify(&k.key, 2_005), Err(SasError::Expired(5)));
        assert!(matches!(
            parsed.verify(&Secret::new("other"), 1_000),
            Err(SasError::BadSignature(_))
        ));
        let hosts = vec!["relay.example.com".to_string()];
        assert!(parsed.covers(&hosts, "my-cluster"));
        assert!(!parsed.covers(&hosts, "other-cluster"));
        assert!(!parsed.covers(&["evil.example.com".into()], "my-cluster"));
    }

    #[test]
    fn the_resource_host_is_compared_without_port_or_brackets() {
        let k = key();
        for (resource, host) in [
            ("http://relay.example.com:8443/c", "relay.example.com"),
            ("https://RELAY.example.com/c", "relay.example.com"),
            ("sb://[::1]:9443/c", "::1"),
            ("http://[::1]/c", "[::1]"),
        ] {
            let parsed =
                SasToken::parse(k.mint(resource, Duration::from_secs(60)).expose()).unwrap();
            assert!(parsed.covers(&[host.into()], "c"), "{resource} vs {host}");
            assert!(!parsed.covers(&["relay.example.org".into()], "c"));
        }
        let odd =
            SasToken::parse(k.mint("http://a b/c", Duration::from_secs(60)).expose()).unwrap();
        assert!(!odd.covers(&["a b".into()], "c"));
    }

    #[test]
    fn namespace_wide_token_covers_every_entity() {
        let k = key();
        let parsed =
            SasToken::parse(k.mint_until("sb://relay.example.com/", 2_000).expose()).unwrap();
        assert!(parsed.covers(&["relay.example.com".into()], "anything"));
    }

    #[test]
    fn tampered_fields_are_rejected() {
        let k = key();
        let token = k.mint_until("http://relay.example.com/a", 2_000);
        let tampered = token.expose().replace("se=2000", "se=9000");
        let parsed = SasToken::parse(&tampered).unwrap();
        assert!(matches!(
            parsed.verify(&k.key, 1_000),
            Err(SasError::BadSignature(_))
        ));
        assert_eq!(SasToken::parse("Bearer x").unwrap_err(), SasError::NotSas);
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=b&skn=c").unwrap_err(),
            SasError::MissingField("se")
        );
    }

    #[test]
    fn key_file_errors_never_echo_the_key() {
        let err = SasKey::parse("SharedAccessKey=topsecret;Bogus").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        assert!(SasKey::parse("Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=b").is_ok());
        // A bare base64 key, the most common mistake: its padding makes it look like a field.
        for bare in [
            "k3J8aGVsbG8rd29ybGQvMTIzNDU2Nzg5MA==",
            "c2VjcmV0a2V5",
            "AbCdEfGhIjKlMnOp=",
        ] {
            let err = SasKey::parse(bare).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains(bare.trim_end_matches('=')), "{text}");
            assert!(text.contains("SharedAccessKeyName=<rule>"), "{text}");
        }
        assert_eq!(
            SasKey::parse("Bogus=1;SharedAccessKeyName=a;SharedAccessKey=b").err(),
            Some(KeyFormatError::UnknownField("Bogus".into()))
        );
    }
}

//! Checking a SAS token against the relay's rules for one entity and one right.

use crate::tunnel::sas::{SasError, SasToken};

use super::rule::{Grant, KeyDigest, Rule};

#[derive(Debug, Clone, Copy)]
pub enum Right {
    Listen,
    Send,
    Manage,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Listen => "Listen",
            Right::Send => "Send",
            Right::Manage => "Manage",
        }
    }
}

/// A token that grants what was asked: until when, and by which rule and key.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub expiry: u64,
    pub grant: Grant,
}

/// Checks that `token` grants `right` on `entity`. `rule` finds a rule by name: the
/// configured rules, then the registered clusters' own.
/// A random key made once per process, for checking tokens that name no rule.
fn nobodys_key() -> &'static crate::secret::Secret {
    static KEY: std::sync::OnceLock<crate::secret::Secret> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        use base64::Engine as _;
        let bytes: [u8; 32] = rand::random();
        crate::secret::Secret::new(base64::engine::general_purpose::STANDARD.encode(bytes))
    })
}

pub fn authorize(
    rule: impl Fn(&str) -> Option<Rule>,
    hosts: &[String],
    token: &str,
    entity: &str,
    right: Right,
    now: u64,
) -> Result<Authorized, SasError> {
    let token = SasToken::parse(token)?;
    // An unknown rule reads exactly like a wrong key: a stranger must not learn which rule
    // names (and so which registered clusters) exist.
    let bad_signature = || SasError::BadSignature(crate::secret::clip(&token.key_name, 64));
    let Some(rule) = rule(&token.key_name) else {
        // And it takes as long: the signature is checked against a key nobody holds.
        let _ = token.verify(nobodys_key(), now);
        return Err(bad_signature());
    };
    let mut verified = Err(bad_signature());
    for key in rule.keys() {
        verified = token.verify(key, now).map(|()| KeyDigest::of(key));
        // Only a wrong signature sends us to the next key; an expired token is expired.
        if !matches!(verified, Err(SasError::BadSignature(_))) {
            break;
        }
    }
    let key = verified?;
    // A rule for the whole relay does not reach registered clusters' connections: those take
    // their own keys (or an administrator's), so a relay-wide Listen key cannot receive a
    // registered cluster's traffic.
    let in_scope = match rule.entity.as_deref() {
        Some(e) => e.eq_ignore_ascii_case(entity),
        None => rule.manage || !is_registered_entity(entity),
    };
    if !in_scope || !token.covers(hosts, entity) {
        return Err(SasError::WrongResource {
            token: crate::secret::clip(&token.resource(), 200),
            requested: crate::secret::clip(entity, 200),
        });
    }
    let granted = match right {
        Right::Listen => rule.listen,
        Right::Send => rule.send,
        Right::Manage => rule.manage,
    };
    if !granted {
        return Err(SasError::MissingRight {
            rule: rule.name.clone(),
            right: right.name(),
        });
    }
    Ok(Authorized {
        expiry: token.expiry,
        grant: Grant {
            rule: rule.name.clone(),
            key,
        },
    })
}

/// Hybrid connections of registered clusters are named `cc-<hash>` (see `ClusterId`); that
/// prefix is reserved for them.
pub fn is_registered_entity(entity: &str) -> bool {
    entity
        .get(..3)
        .is_some_and(|p| p.eq_ignore_ascii_case("cc-"))
}

/// A listener token may not outlive `max` from `now`: the relay, not the listener, decides
/// how long a control channel may stay open without renewing.
pub fn check_listener_lifetime(
    expiry: u64,
    now: u64,
    max: std::time::Duration,
) -> Result<u64, SasError> {
    if expiry.saturating_sub(now) > max.as_secs() {
        return Err(SasError::LifetimeTooLong {
            max_secs: max.as_secs(),
        });
    }
    Ok(expiry)
}

/// A refusal's reason as a metric label: one of a few fixed names, never the token's content.
pub fn failure_reason(err: &SasError) -> &'static str {
    match err {
        SasError::Expired(_) => "expired",
        SasError::BadSignature(_) => "bad_signature",
        SasError::WrongResource { .. } => "wrong_resource",
        SasError::MissingRight { .. } => "missing_right",
        SasError::LifetimeTooLong { .. } => "lifetime_too_long",
        _ => "malformed",
    }
}

/// 401 when the caller is not who it says, 403 when it is but may not do this.
pub fn status_for(err: &SasError) -> u16 {
    match err {
        SasError::MissingRight { .. } | SasError::WrongResource { .. } => 403,
        _ => 401,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::tunnel::sas::SasKey;

    fn find(name: &str) -> Option<Rule> {
        rules().into_iter().find(|r| r.name == name)
    }

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                name: "listen".into(),
                key: Secret::new("listen-key-0123456789"),
                secondary_key: None,
                listen: true,
                send: false,
                manage: false,
                entity: Some("c1".into()),
            },
            Rule {
                name: "send".into(),
                key: Secret::new("send-key-0123456789"),
                secondary_key: None,
                listen: false,
                send: true,
                manage: false,
                entity: None,
            },
        ]
    }

    fn token(name: &str, key: &str, uri: &str, expiry: u64) -> String {
        SasKey {
            name: name.into(),
            key: Secret::new(key),
        }
        .mint_until(uri, expiry)
        .expose()
        .to_string()
    }

    #[test]
    fn grants_only_the_rights_and_entities_a_rule_has() {
        let hosts = vec!["relay.test".to_string()];
        let listen = token(
            "listen",
            "listen-key-0123456789",
            "http://relay.test/c1",
            100,
        );
        assert_eq!(
            authorize(find, &hosts, &listen, "c1", Right::Listen, 10).map(|a| a.expiry),
            Ok(100)
        );
        assert!(matches!(
            authorize(find, &hosts, &listen, "c1", Right::Send, 10),
            Err(SasError::MissingRight { .. })
        ));
        let other = token(
            "listen",
            "listen-key-0123456789",
            "http://relay.test/c2",
            100,
        );
        assert!(matches!(
            authorize(find, &hosts, &other, "c2", Right::Listen, 10),
            Err(SasError::WrongResource { .. })
        ));
        let send = token(
            "send",
            "send-key-0123456789",
            "https://relay.test:8443/",
            100,
        );
        assert_eq!(
            authorize(find, &hosts, &send, "any", Right::Send, 10).map(|a| a.expiry),
            Ok(100)
        );
        assert!(matches!(
            authorize(find, &hosts, &send, "any", Right::Send, 100),
            Err(SasError::Expired(0))
        ));
        let forged = token("send", "wrong-key-0123456789", "http://relay.test/", 100);
        assert_eq!(
            status_for(&authorize(find, &hosts, &forged, "x", Right::Send, 10).unwrap_err()),
            401
        );
        let unknown = token("nope", "k", "http://relay.test/", 100);
        assert!(matches!(
            authorize(find, &hosts, &unknown, "x", Right::Send, 10),
            Err(SasError::BadSignature(_))
        ));
    }

    #[test]
    fn either_key_of_a_rule_grants_and_the_grant_names_which() {
        let hosts = vec!["relay.test".to_string()];
        let rule = |name: &str| {
            (name == "r").then(|| Rule {
                name: "r".into(),
                key: Secret::new("primary-key-0123456789"),
                secondary_key: Some(Secret::new("secondary-key-0123456789")),
                listen: true,
                send: false,
                manage: false,
                entity: None,
            })
        };
        let uri = "http://relay.test/c1";
        let by_primary = token("r", "primary-key-0123456789", uri, 100);
        let by_secondary = token("r", "secondary-key-0123456789", uri, 100);
        let a = authorize(rule, &hosts, &by_primary, "c1", Right::Listen, 10).unwrap();
        let b = authorize(rule, &hosts, &by_secondary, "c1", Right::Listen, 10).unwrap();
        assert_ne!(a.grant, b.grant);
        let mut renewed = rule("r").unwrap();
        assert!(renewed.still_grants(&a.grant) && renewed.still_grants(&b.grant));
        renewed.secondary_key = Some(Secret::new("renewed-key-0123456789"));
        assert!(renewed.still_grants(&a.grant) && !renewed.still_grants(&b.grant));
        let expired = token("r", "secondary-key-0123456789", uri, 5);
        assert!(matches!(
            authorize(rule, &hosts, &expired, "c1", Right::Listen, 10),
            Err(SasError::Expired(5))
        ));
    }
}

//! Who is calling the management API: an administrator holding a SAS key with the Manage
//! right, or an Entra principal (validated exactly as the agent validates users).

use http::HeaderMap;

use super::registry::Registry;
use crate::relay::auth::{authorize, Right};
use crate::relay::rule::FindRule;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A Manage-right key: may do anything.
    Admin { rule: String },
    /// An Entra user or application, by object id; `name` is for systemData.
    Principal { object_id: String, name: String },
}

impl Caller {
    pub fn id(&self) -> &str {
        match self {
            Caller::Admin { rule } => rule,
            Caller::Principal { object_id, .. } => object_id,
        }
    }

    pub fn display_name(&self) -> &str {
        match self {
            Caller::Admin { rule } => rule,
            Caller::Principal { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Caller::Admin { .. } => "Key",
            Caller::Principal { .. } => "User",
        }
    }
}

/// The caller, or why not (an ARM error code and message).
pub async fn authenticate(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    headers: &HeaderMap,
) -> Result<Caller, (&'static str, String)> {
    let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err((
            "AuthenticationFailed",
            "no Authorization header: send an Entra ID bearer token or a SAS token of a rule with the Manage right".into(),
        ));
    };
    let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        let Some(validator) = &registry.entra else {
            return Err((
                "AuthenticationFailed",
                "this relay accepts no Entra ID tokens (no [entra] in its config); use a Manage key".into(),
            ));
        };
        return match validator.validate(credential.trim()).await {
            Ok(identity) => Ok(Caller::Principal {
                name: identity.username().to_string(),
                object_id: identity.object_id,
            }),
            Err(why) => Err((
                "InvalidAuthenticationToken",
                format!("Entra token rejected: {why}"),
            )),
        };
    }
    // A SAS token for the relay's root with a Manage rule.
    let now = crate::tunnel::sas::unix_now();
    match authorize(rule, hosts, value, "", Right::Manage, now) {
        Ok(_) => {
            let rule = crate::tunnel::sas::SasToken::parse(value)
                .map(|t| t.key_name)
                .unwrap_or_default();
            Ok(Caller::Admin { rule })
        }
        Err(e) => Err(("AuthenticationFailed", format!("SAS token refused: {e}"))),
    }
}

//! Who is calling the management API: an administrator holding a SAS key with the Manage
//! right, or an Entra principal (validated exactly as the agent validates users).

use http::HeaderMap;

use super::registry::Registry;
use crate::entra::validate::Rejected;
use crate::relay::auth::{authorize, Right};
use crate::relay::rule::FindRule;
use crate::tunnel::sas::{unix_now, SasError, SasToken};

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

/// Why a caller is not let in; every one is a 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no Authorization header: send an Entra ID bearer token or a SAS token of a rule with the Manage right")]
    NoAuthorization,
    #[error("this relay accepts no Entra ID tokens (no [entra] in its config); use a Manage key")]
    NoEntra,
    #[error("Entra token rejected")]
    EntraToken(#[source] Rejected),
    #[error("SAS token refused")]
    SasToken(#[source] SasError),
}

impl AuthError {
    /// ARM's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::EntraToken(_) => "InvalidAuthenticationToken",
            _ => "AuthenticationFailed",
        }
    }
}

/// The caller, from the request's headers alone (no body is read before this).
pub async fn authenticate(
    registry: &Registry,
    rule: &FindRule<'_>,
    hosts: &[String],
    headers: &HeaderMap,
) -> Result<Caller, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::NoAuthorization)?;
    let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return entra_caller(registry, credential.trim()).await;
    }
    // A SAS token for the relay's root with a Manage rule.
    authorize(rule, hosts, value, "", Right::Manage, unix_now()).map_err(AuthError::SasToken)?;
    let rule = SasToken::parse(value)
        .map(|t| t.key_name)
        .unwrap_or_default();
    Ok(Caller::Admin { rule })
}

async fn entra_caller(registry: &Registry, token: &str) -> Result<Caller, AuthError> {
    let validator = registry.entra.as_ref().ok_or(AuthError::NoEntra)?;
    let identity = validator
        .validate(token)
        .await
        .map_err(AuthError::EntraToken)?;
    Ok(Caller::Principal {
        name: identity.username().to_string(),
        object_id: identity.object_id,
    })
}

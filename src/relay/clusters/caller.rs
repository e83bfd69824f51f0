//! Who is calling the management API: an administrator holding a SAS key with the Manage
//! right, or an Entra principal (validated exactly as the agent validates users).
//!
//! Entra tokens must be for the management API's own audience (`[entra] audience`). A token
//! for Azure Resource Manager is refused unless the operator opted in (`allow_arm_audience`):
//! a client sending one to a self-hosted relay hands it a credential it could replay against
//! Azure.

use base64::Engine;
use http::HeaderMap;

use crate::entra::validate::{Rejected, Validator};
use crate::entra::CloudDefinition;
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

/// Azure Resource Manager's token audiences in every cloud (with or without the trailing
/// slash), and the Azure Service Management application's id. Tokens for these are Azure
/// credentials, not this relay's.
pub const ARM_AUDIENCES: &[&str] = &[
    "https://management.core.windows.net/",
    "https://management.azure.com/",
    "https://management.core.usgovcloudapi.net/",
    "https://management.usgovcloudapi.net/",
    "https://management.core.chinacloudapi.cn/",
    "https://management.chinacloudapi.cn/",
    "https://management.core.cloudapi.de/",
    "https://management.microsoftazure.de/",
    "797f4846-ba00-4fd7-ba43-dac1f8f63013",
];

/// Whether `audience` is Azure Resource Manager's (in any cloud).
pub fn is_arm_audience(audience: &str) -> bool {
    let audience = audience.trim().trim_end_matches('/');
    ARM_AUDIENCES
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(audience))
}

/// The audiences a token for ARM in `cloud` carries: what `allow_arm_audience` accepts. A
/// custom cloud's come from its definition (`resourceManager`, `activeDirectoryResourceId`).
pub fn arm_audiences_of(cloud: impl Into<CloudDefinition>) -> Vec<String> {
    cloud.into().arm_audiences()
}

/// Who may call the management API with an Entra token.
pub struct EntraCallers {
    /// Validates tokens for the management API's own audience.
    pub own: Validator,
    /// That audience, as configured; names it in refusals, and refuses tokens for another
    /// audience before any signature check.
    pub audience: Option<String>,
    /// Only with `allow_arm_audience`: a validator for each of ARM's audiences in the relay's
    /// cloud, by the audience it accepts.
    pub arm: Vec<(String, Validator)>,
}

impl From<Validator> for EntraCallers {
    /// Tokens for `own`'s audience only.
    fn from(own: Validator) -> EntraCallers {
        EntraCallers {
            own,
            audience: None,
            arm: Vec::new(),
        }
    }
}

impl EntraCallers {
    /// The validator for a token whose (unverified) audiences are `audiences`; a refusal when
    /// it is not for this management API.
    fn validator_for(&self, audiences: &[String]) -> Result<&Validator, AuthError> {
        let want = || {
            self.audience
                .clone()
                .unwrap_or_else(|| "the relay's [entra] audience".into())
        };
        // The relay's own cloud's ARM audiences count too: a custom cloud's are in no list.
        let arm_like = |a: &&String| is_arm_audience(a) || self.arm.iter().any(|(x, _)| x == *a);
        if let Some(arm) = audiences.iter().find(arm_like) {
            return self
                .arm
                .iter()
                .find(|(a, _)| a == arm)
                .map(|(_, v)| v)
                .ok_or_else(|| AuthError::ArmAudience {
                    got: arm.clone(),
                    want: want(),
                });
        }
        if let (Some(own), [got, ..]) = (&self.audience, audiences) {
            let id = own.trim_start_matches("api://");
            let ours = |a: &String| a == id || a.strip_prefix("api://") == Some(id);
            if !audiences.iter().any(ours) {
                return Err(AuthError::Audience {
                    got: got.chars().take(200).collect(),
                    want: want(),
                });
            }
        }
        Ok(&self.own)
    }
}

/// The `aud` claim(s) of a JWT, unverified: only to pick a validator or refuse early; the
/// validator checks the signature and the audience again. Empty when there is none to read.
fn unverified_audiences(token: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        aud: Option<Aud>,
    }
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Claims>(&b).ok());
    match claims.and_then(|c| c.aud) {
        Some(Aud::One(a)) => vec![a],
        Some(Aud::Many(a)) => a,
        None => Vec::new(),
    }
}

/// Why a caller is not let in; every one is a 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no Authorization header: send an Entra ID bearer token or a SAS token of a rule with the Manage right")]
    NoAuthorization,
    #[error("this relay accepts no Entra ID tokens (no [entra] in its config); use a Manage key")]
    NoEntra,
    #[error("the token is for Azure Resource Manager ({got}), not for this relay, which does not take Azure credentials: sign in for the relay's management API with --relay-audience {want} (or CLUSTERCONNECT_RELAY_AUDIENCE); the relay's operator may accept ARM tokens with allow_arm_audience = true in [entra], which is weaker")]
    ArmAudience { got: String, want: String },
    #[error("the token's audience {got} is not this relay's management API; sign in with --relay-audience {want} (CLUSTERCONNECT_RELAY_AUDIENCE)")]
    Audience { got: String, want: String },
    #[error("Entra token rejected")]
    EntraToken(#[source] Rejected),
    #[error("SAS token refused")]
    SasToken(#[source] SasError),
}

impl AuthError {
    /// ARM's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::EntraToken(_)
            | AuthError::ArmAudience { .. }
            | AuthError::Audience { .. } => "InvalidAuthenticationToken",
            _ => "AuthenticationFailed",
        }
    }
}

/// The caller, from the request's headers alone (no body is read before this).
pub async fn authenticate(
    entra: Option<&EntraCallers>,
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
        return entra_caller(entra, credential.trim()).await;
    }
    // A SAS token for the relay's root with a Manage rule.
    authorize(rule, hosts, value, "", Right::Manage, unix_now()).map_err(AuthError::SasToken)?;
    let rule = SasToken::parse(value)
        .map(|t| t.key_name)
        .unwrap_or_default();
    Ok(Caller::Admin { rule })
}

async fn entra_caller(entra: Option<&EntraCallers>, token: &str) -> Result<Caller, AuthError> {
    let entra = entra.ok_or(AuthError::NoEntra)?;
    let validator = entra.validator_for(&unverified_audiences(token))?;
    let identity = validator
        .validate(token)
        .await
        .map_err(AuthError::EntraToken)?;
    Ok(Caller::Principal {
        name: identity.username().to_string(),
        object_id: identity.object_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_audiences_are_known_in_every_cloud_and_spelling() {
        for aud in [
            "https://management.core.windows.net/",
            "https://management.core.windows.net",
            "https://MANAGEMENT.azure.com/",
            "https://management.usgovcloudapi.net",
            "https://management.chinacloudapi.cn/",
            "797f4846-ba00-4fd7-ba43-dac1f8f63013",
        ] {
            assert!(is_arm_audience(aud), "{aud}");
        }
        for aud in [
            "api://clusterconnect-relay",
            "https://management.example.com/",
            "6256c85f-0aad-4d50-b960-e6e9b21efe35",
        ] {
            assert!(!is_arm_audience(aud), "{aud}");
        }
        for cloud in crate::entra::Cloud::ALL {
            let all = arm_audiences_of(cloud);
            assert_eq!(all.len(), 4);
            assert!(all.iter().all(|a| is_arm_audience(a)), "{all:?}");
        }
    }

    #[test]
    fn a_custom_clouds_arm_audience_goes_to_its_validator_when_allowed() {
        use crate::entra::validate::ValidatorConfig;
        let validator = |audience: &str| {
            Validator::new(
                ValidatorConfig {
                    authority: crate::entra::Authority::new(crate::entra::Cloud::default(), None)
                        .unwrap(),
                    server_app_id: audience.into(),
                    tenants: vec!["t".into()],
                    refetch_interval: std::time::Duration::ZERO,
                },
                crate::entra::test_server::client(),
            )
        };
        let custom_arm = "https://arm.contoso.test/".to_string();
        let mut callers = EntraCallers {
            own: validator("api://r"),
            audience: Some("api://r".into()),
            arm: vec![(custom_arm.clone(), validator(&custom_arm))],
        };
        let chosen = callers
            .validator_for(std::slice::from_ref(&custom_arm))
            .unwrap();
        assert!(std::ptr::eq(chosen, &callers.arm[0].1));
        // Not allowed: refused as another audience, never validated as the relay's own.
        callers.arm.clear();
        assert!(matches!(
            callers.validator_for(&[custom_arm]),
            Err(AuthError::Audience { .. })
        ));
    }

    #[test]
    fn a_tokens_audience_is_read_without_verifying_it() {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = |claims: &str| format!("{}.{}.sig", b64("{}"), b64(claims));
        assert_eq!(unverified_audiences(&token(r#"{"aud":"a"}"#)), ["a"]);
        assert_eq!(
            unverified_audiences(&token(r#"{"aud":["a","b"]}"#)),
            ["a", "b"]
        );
        assert!(unverified_audiences(&token("{}")).is_empty());
        assert!(unverified_audiences("not a jwt").is_empty());
    }
}

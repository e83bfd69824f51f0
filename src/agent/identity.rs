//! Who a tunnelled request is from, decided once per request before it is forwarded.
//!
//! Entra tokens are validated here and the request goes on with the agent's own credential
//! plus `Impersonate-User`/`-Group`/`-Extra-*`, so plain Kubernetes RBAC authorizes Entra users,
//! groups and applications (what kube-aad-proxy does for Arc). Any other bearer token, such as
//! a service-account token, goes through unchanged for the apiserver to judge, its
//! `Impersonate-*` headers (kubectl `--as`) included: the apiserver checks that caller's right
//! to impersonate itself. An Entra caller's own `--as` cannot be judged by the apiserver, which
//! sees only the agent; the agent asks it with SubjectAccessReviews first (`review`) and
//! impersonates the requested identity only when every check allows it.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::audit::{bearer, credential_of, Credential};
use super::review::{strip_impersonation, Decision, Requested, Reviewer, Subject};
use super::upstream::Upstream;
use crate::auth::CredentialSource;
use crate::entra::graph::GroupResolver;
use crate::entra::pop::{self, PopPolicy};
use crate::entra::validate::{EntraIdentity, Validator};
use crate::tunnel::http::{error_chain, status, Body};
use crate::tunnel::sas::unix_now;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Only Entra ID tokens, validated and impersonated.
    Entra,
    /// Only tokens the apiserver itself accepts (service accounts); passed through unchanged.
    Token,
    /// Both: Entra tokens are impersonated, every other token passes through.
    Both,
}

/// What the agent needs to impersonate Entra identities.
/// The group the apiserver adds to every impersonated user but `system:anonymous`.
const ALL_AUTHENTICATED: &str = "system:authenticated";

pub struct EntraAuth {
    pub validator: Validator,
    /// Looks up groups for tokens with a groups overage; `None` when the agent has no Entra
    /// identity of its own to call Microsoft Graph with.
    pub groups: Option<GroupResolver>,
    /// The agent's own apiserver credential (its service-account token), which is allowed to
    /// impersonate and nothing else.
    pub own_token: Arc<dyn CredentialSource>,
}

/// Who an authorized request is from, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A validated Entra identity, with the groups it is impersonated with.
    Entra { user: String, groups: Vec<String> },
    /// Whatever the request holds goes on for the apiserver to judge.
    PassThrough,
}

/// Proof-of-possession tokens (kubelogin `--pop-enabled`, `clusterconnect proxy --pop`).
#[derive(Clone, Debug, Default)]
pub struct PopSettings {
    /// What PoP tokens are checked against; `None` when the agent does not know its cluster id,
    /// and then PoP tokens are refused.
    pub policy: Option<PopPolicy>,
    /// Entra tokens must come as PoP tokens; bare Entra bearer tokens are refused.
    pub required: bool,
}

pub struct Authenticator {
    mode: AuthMode,
    entra: Option<EntraAuth>,
    pop: PopSettings,
    /// Answers to "may this Entra user impersonate that", briefly remembered.
    reviews: Reviewer,
}

impl Authenticator {
    /// Every token passes through to the apiserver.
    pub fn token_only() -> Authenticator {
        Authenticator {
            mode: AuthMode::Token,
            entra: None,
            pop: PopSettings::default(),
            reviews: Reviewer::default(),
        }
    }

    pub fn new(mode: AuthMode, entra: EntraAuth) -> Authenticator {
        Authenticator {
            mode,
            entra: Some(entra),
            pop: PopSettings::default(),
            reviews: Reviewer::default(),
        }
    }

    /// How proof-of-possession tokens are treated.
    pub fn with_pop(mut self, pop: PopSettings) -> Authenticator {
        self.pop = pop;
        self
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The credential `headers` present, for the audit log: an Entra token when this agent
    /// takes Entra tokens and the token is one (by its issuer, unverified), else a bearer
    /// token or none.
    pub fn credential(&self, headers: &HeaderMap) -> Credential {
        let entra = match (&self.entra, self.mode) {
            (Some(entra), AuthMode::Entra | AuthMode::Both) => Some(entra),
            _ => None,
        };
        match (bearer(headers), entra) {
            (Some(token), Some(entra))
                if pop::is_pop(token) || entra.validator.is_entra_token(token) =>
            {
                Credential::Entra
            }
            _ => credential_of(headers),
        }
    }

    /// Rewrites `headers` for the apiserver, or answers the request itself saying why not
    /// (401 for a bad token, 400/403 for an impersonation it may not ask for). `upstream` is
    /// where impersonation requests of Entra callers are reviewed.
    pub async fn authorize(
        &self,
        headers: &mut HeaderMap,
        upstream: &Upstream,
    ) -> Result<Caller, Response<Body>> {
        if headers.get_all(AUTHORIZATION).iter().count() > 1 {
            return Err(status(
                400,
                "BadRequest",
                "the request has more than one Authorization header",
            ));
        }
        // The scheme is case-insensitive: a "bearer" Entra token must not slip past
        // validation to the apiserver.
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let entra = match (&self.entra, self.mode) {
            (Some(entra), AuthMode::Entra | AuthMode::Both) => entra,
            _ => return Ok(Caller::PassThrough),
        };
        // PoP tokens arrive as bearer tokens too (kubectl sends kubelogin's exec credential
        // that way); their header's typ tells them apart, as in the Arc guard.
        let identity = match bearer {
            Some(token) if pop::is_pop(token) => self.pop_identity(entra, token).await?,
            Some(token) if entra.validator.is_entra_token(token) => {
                if self.pop.required {
                    return Err(unauthorized(
                        "this cluster's clusterconnect agent accepts Entra ID tokens only as proof-of-possession tokens (--require-pop): connect with `clusterconnect proxy --pop`, or kubelogin --pop-enabled --pop-claims u=<cluster resource id>",
                    ));
                }
                match entra.validator.validate(token).await {
                    Ok(identity) => identity,
                    Err(why) => {
                        let why = error_chain(&why);
                        tracing::info!(reason = ?why, "Entra token rejected");
                        return Err(unauthorized(&format!("Entra token rejected: {why}")));
                    }
                }
            }
            _ => {
                return match self.mode {
                    AuthMode::Entra => Err(unauthorized(
                        "this cluster's clusterconnect agent accepts only Microsoft Entra ID tokens (--auth-mode entra); sign in with Entra instead of passing a token",
                    )),
                    _ => Ok(Caller::PassThrough),
                };
            }
        };
        let requested = Requested::from_headers(headers)
            .map_err(|e| status(400, "BadRequest", &e.to_string()))?;
        let groups = self.groups(entra, &identity).await?;
        let own = entra.own_token.token().await.map_err(|e| {
            tracing::warn!(error = %error_chain(&e), "the agent's own apiserver credential is unavailable");
            status(
                503,
                "ServiceUnavailable",
                "the clusterconnect agent cannot impersonate: its own service-account credential is unavailable (see the agent's log)",
            )
        })?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", own.expose())).map_err(|_| {
            status(
                500,
                "InternalError",
                "the agent's own token is not a valid header value",
            )
        })?;
        if let Some(requested) = requested {
            self.review(upstream, &bearer, &identity, &groups, &requested)
                .await?;
            requested.apply(headers).map_err(|_| {
                status(
                    400,
                    "BadRequest",
                    "an Impersonate-* header holds characters the agent cannot forward",
                )
            })?;
            headers.insert(AUTHORIZATION, bearer);
            tracing::debug!(user = identity.username(), as_user = %requested.user, groups = requested.groups.len(), "Entra identity impersonates another, as allowed by SubjectAccessReview");
            return Ok(Caller::Entra {
                user: identity.username().to_string(),
                groups,
            });
        }
        strip_impersonation(headers);
        impersonate(headers, bearer, &identity, &groups).map_err(|r| *r)?;
        tracing::debug!(user = identity.username(), tenant = %identity.tenant, groups = groups.len(), "impersonating Entra identity");
        Ok(Caller::Entra {
            user: identity.username().to_string(),
            groups,
        })
    }

    /// The identity of a PoP token: its own checks ([`pop::verify`]), then its access token
    /// as any Entra token, then the access token's key binding against the key that signed.
    async fn pop_identity(
        &self,
        entra: &EntraAuth,
        token: &str,
    ) -> Result<EntraIdentity, Response<Body>> {
        let Some(policy) = &self.pop.policy else {
            return Err(unauthorized(
                "this cluster's clusterconnect agent cannot check proof-of-possession tokens: it runs without --cluster-id (its Azure resource id, the PoP token's u claim)",
            ));
        };
        let refuse = |why: String| {
            tracing::info!(reason = %why, "PoP token rejected");
            unauthorized(&format!("PoP token rejected: {why}"))
        };
        let proof = pop::verify(token, policy, unix_now()).map_err(|e| refuse(e.to_string()))?;
        let (identity, cnf_kid) = entra
            .validator
            .validate_bound(proof.access_token.expose())
            .await
            .map_err(|e| refuse(format!("its access token: {}", error_chain(&e))))?;
        proof
            .check_binding(cnf_kid.as_deref())
            .map_err(|e| refuse(e.to_string()))?;
        Ok(identity)
    }

    /// Every check the apiserver would make for `requested`, asked of the apiserver for the
    /// signed-in identity; the first refusal answers the request (403), as does a review that
    /// cannot be made (503/500): never a silent fallback to the signed-in identity.
    async fn review(
        &self,
        upstream: &Upstream,
        own_bearer: &HeaderValue,
        identity: &EntraIdentity,
        groups: &[String],
        requested: &Requested,
    ) -> Result<(), Response<Body>> {
        let mut subject_groups = groups.to_vec();
        if !subject_groups.iter().any(|g| g == ALL_AUTHENTICATED) {
            subject_groups.push(ALL_AUTHENTICATED.to_string());
        }
        let subject = Subject {
            user: identity.username().to_string(),
            groups: subject_groups,
            extra: [
                ("oid".to_string(), vec![identity.object_id.clone()]),
                ("tid".to_string(), vec![identity.tenant.clone()]),
            ]
            .into(),
        };
        for check in requested.checks() {
            match self
                .reviews
                .review(upstream, own_bearer, &subject, &check)
                .await
            {
                Ok(Decision::Allowed) => {}
                Ok(Decision::Denied(reason)) => {
                    let message = check.forbidden_message(&subject.user, &reason);
                    tracing::info!(user = %subject.user, refused = %message, "impersonation refused by SubjectAccessReview");
                    return Err(status(403, "Forbidden", &message));
                }
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::warn!(error = %why, "cannot review an impersonation request");
                    let (code, reason) = if e.is_unavailable() {
                        (503, "ServiceUnavailable")
                    } else {
                        (500, "InternalError")
                    };
                    return Err(status(
                        code,
                        reason,
                        &format!("the clusterconnect agent cannot check whether {:?} may impersonate {:?}: {why}", subject.user, requested.user),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn groups(
        &self,
        entra: &EntraAuth,
        identity: &EntraIdentity,
    ) -> Result<Vec<String>, Response<Body>> {
        if !identity.groups_overage {
            return Ok(identity.groups.clone());
        }
        let workaround = "Workaround: connect as a service principal (or managed identity) that is in fewer than 200 groups, or give the agent an Entra identity with the Microsoft Graph permission GroupMember.Read.All";
        let Some(resolver) = &entra.groups else {
            return Err(unauthorized(&format!(
                "your token has more than 200 groups (a groups overage) and this agent has no Entra identity to look them up in Microsoft Graph. {workaround}"
            )));
        };
        match resolver
            .member_of(&identity.tenant, &identity.object_id)
            .await
        {
            Ok(groups) => Ok(groups.as_ref().clone()),
            Err(e) => {
                tracing::warn!(error = %crate::tunnel::http::error_chain(&e), object_id = %identity.object_id, "group lookup in Microsoft Graph failed");
                Err(unauthorized(&format!(
                    "your token has more than 200 groups (a groups overage) and the agent could not look them up in Microsoft Graph (the agent's log says why). {workaround}"
                )))
            }
        }
    }
}

/// Sets the agent's own credential and the identity's impersonation headers; fails only
/// for names an HTTP header cannot carry (control characters).
fn impersonate(
    headers: &mut HeaderMap,
    own_bearer: HeaderValue,
    identity: &EntraIdentity,
    groups: &[String],
) -> Result<(), Box<Response<Body>>> {
    let value = |v: &str| {
        HeaderValue::from_bytes(v.as_bytes()).map_err(|_| {
            Box::new(unauthorized(
                "the token names a user or group with characters an HTTP header cannot carry",
            ))
        })
    };
    headers.insert(AUTHORIZATION, own_bearer);
    headers.insert(
        HeaderName::from_static("impersonate-user"),
        value(identity.username())?,
    );
    let group = HeaderName::from_static("impersonate-group");
    for g in groups {
        headers.append(group.clone(), value(g)?);
    }
    headers.insert(
        HeaderName::from_static("impersonate-extra-oid"),
        value(&identity.object_id)?,
    );
    headers.insert(
        HeaderName::from_static("impersonate-extra-tid"),
        value(&identity.tenant)?,
    );
    Ok(())
}

fn unauthorized(message: &str) -> Response<Body> {
    status(401, "Unauthorized", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impersonation_headers_from_outside_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("impersonate-user", "admin".parse().unwrap());
        h.append("impersonate-group", "system:masters".parse().unwrap());
        h.insert("impersonate-extra-scopes", "x".parse().unwrap());
        h.insert("impersonate-uid", "1".parse().unwrap());
        h.insert("authorization", "Bearer t".parse().unwrap());
        strip_impersonation(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn an_identity_becomes_one_user_every_group_and_its_ids() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer entra".parse().unwrap());
        let id = EntraIdentity {
            tenant: "t".into(),
            object_id: "o".into(),
            upn: Some("ada@contoso.com".into()),
            groups: vec![],
            groups_overage: false,
        };
        let groups = vec!["g1".to_string(), "g2".to_string()];
        impersonate(&mut h, "Bearer own".parse().unwrap(), &id, &groups).unwrap();
        assert_eq!(h["authorization"], "Bearer own");
        assert_eq!(h["impersonate-user"], "ada@contoso.com");
        let got: Vec<_> = h.get_all("impersonate-group").iter().collect();
        assert_eq!(got, ["g1", "g2"]);
        assert_eq!(h["impersonate-extra-oid"], "o");
        assert_eq!(h["impersonate-extra-tid"], "t");
    }
}

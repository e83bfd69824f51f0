//! Validating Entra access tokens, as kube-aad-proxy does for Arc cluster connect: RS256
//! signature against the tenant's published keys (OpenID discovery, cached; an unknown `kid`
//! triggers one rate-limited refetch, which covers key rotation), issuer in both v1 and v2
//! forms, audience (GUID or `api://` form), `exp`/`nbf` with five minutes of skew, and the
//! tenant on an allow list. Every rejection names the check that failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::http::{HttpClient, HttpError};
use super::Authority;
use crate::tunnel::http::error_chain;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(5 * 60);
/// Keys are re-read at least this often even when every `kid` is known.
const KEYS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Validated tokens remembered at once (a few per active user).
const MAX_ACCEPTED: usize = 4096;

pub struct ValidatorConfig {
    pub authority: Authority,
    /// The cluster's server application id; tokens for it carry it as `aud`, bare or as
    /// `api://<id>`.
    pub server_app_id: String,
    /// Tenants whose users and applications may connect.
    pub tenants: Vec<String>,
    /// Minimum time between two key fetches for one tenant caused by an unknown `kid`: bounds
    /// how hard a stream of forged tokens can make the agent hit Entra.
    pub refetch_interval: Duration,
}

/// Who a validated token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraIdentity {
    pub tenant: String,
    pub object_id: String,
    /// The user principal name for users; `None` for applications and managed identities.
    pub upn: Option<String>,
    pub groups: Vec<String>,
    /// The token left its groups out because there are too many (more than 200): they must be
    /// looked up in Microsoft Graph.
    pub groups_overage: bool,
}

impl EntraIdentity {
    /// The Kubernetes user name: the UPN for users (what `--user=<UPN>` bindings name), the
    /// object id for applications, managed identities and users without a UPN.
    pub fn username(&self) -> &str {
        self.upn.as_deref().unwrap_or(&self.object_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("signing algorithm {0:?} is not accepted; Entra access tokens are RS256-signed")]
    Algorithm(String),
    #[error("tenant {0:?} is not allowed by this agent (its --tenant list)")]
    Tenant(String),
    #[error("issuer {0:?} is not Entra's for the token's tenant")]
    Issuer(String),
    #[error("no signing key {0:?} is published for the tenant; the token was not issued by Entra")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Signature,
    #[error("audience {0} is not this cluster's server application {1}")]
    Audience(String, String),
    #[error("the token expired at {0} (unix time)")]
    Expired(u64),
    #[error("the token is not valid before {0} (unix time)")]
    NotYetValid(u64),
    #[error("the token has no {0} claim")]
    MissingClaim(&'static str),
    /// A proof-of-possession token's access token presented alone: whoever holds it without
    /// the key must not get in (RFC 7800's point).
    #[error("the token is bound to a proof-of-possession key (cnf); present it inside a PoP token signed with that key")]
    BoundToKey,
    /// Shared: the same failure is kept and answered until the next fetch is due.
    #[error("the tenant's signing keys cannot be fetched")]
    KeysUnavailable(#[source] Arc<KeysError>),
}

/// Why fetching a tenant's signing keys failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{url}: HTTP {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("{discovery} names signing keys at {jwks_uri}, which is not https: keys fetched over plain HTTP could be anyone's")]
    InsecureKeys { discovery: String, jwks_uri: String },
}

/// The claims read before the signature is checked: only to pick the tenant, issuer and key.
/// Nothing from here is trusted until `decode` has verified the signature.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
    tid: Option<String>,
    aud: Option<serde_json::Value>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    tid: String,
    exp: u64,
    oid: Option<String>,
    upn: Option<String>,
    idtyp: Option<String>,
    scp: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    hasgroups: bool,
    #[serde(rename = "_claim_names", default)]
    claim_names: Option<serde_json::Map<String, serde_json::Value>>,
    /// Set on tokens requested with `token_type=pop`: the key they are bound to.
    /// RFC 7800 confirmation: present (whatever its members) means the token is bound to a
    /// key and useless alone.
    cnf: Option<serde_json::Value>,
}

/// A validated token: who it stands for, its `exp`, and the thumbprint of the key it is
/// bound to, if any.
#[derive(Clone)]
struct Accepted {
    identity: EntraIdentity,
    exp: u64,
    cnf_kid: Option<String>,
    /// Bound to a key at all (`cnf` present): `kid` or another binding (`x5t#S256`, `jkt`).
    bound: bool,
}

struct TenantKeys {
    keys: HashMap<String, DecodingKey>,
    /// The last successful fetch.
    fetched_at: Option<Instant>,
    /// The last attempt, successful or not.
    attempted_at: Instant,
    last_error: Option<Arc<KeysError>>,
}

pub struct Validator {
    config: ValidatorConfig,
    http: HttpClient,
    audiences: [String; 2],
    keys: Mutex<HashMap<String, TenantKeys>>,
    /// Tokens already validated, by SHA-256, with their expiry: kubectl sends the same token
    /// on every request, and a hash is far cheaper than an RSA verification.
    accepted: Mutex<HashMap<[u8; 32], Accepted>>,
    /// One key fetch at a time: a burst of requests after a rotation makes one fetch.
    fetching: tokio::sync::Mutex<()>,
}

/// Splits a JWT and decodes its header and payload JSON, without any verification.
fn peek(token: &str) -> Result<(Header, Unverified), Rejected> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejected::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let decode = |part: &str, what: &str| -> Result<Vec<u8>, Rejected> {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| Rejected::Malformed(format!("the {what} is not base64url")))
    };
    let header: Header = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|_| Rejected::Malformed("the header is not a JSON object".into()))?;
    let payload: Unverified = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|_| Rejected::Malformed("the payload is not a JSON object of claims".into()))?;
    Ok((header, payload))
}

impl Validator {
    pub fn new(config: ValidatorConfig, http: HttpClient) -> Validator {
        let id = config
            .server_app_id
            .trim_start_matches("api://")
            .to_string();
        Validator {
            audiences: [id.clone(), format!("api://{id}")],
            config,
            http,
            keys: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `token` claims to come from Entra (its unverified `iss` is an Entra issuer).
    /// Other tokens, such as Kubernetes service-account tokens, are not this validator's to
    /// judge: the apiserver checks them.
    pub fn is_entra_token(&self, token: &str) -> bool {
        let Ok((_, claims)) = peek(token) else {
            return false;
        };
        let Some(iss) = claims.iss else {
            return false;
        };
        let v1 = format!("{}/", self.config.authority.cloud.v1_issuer_host());
        let v2 = format!("{}/", self.config.authority.host);
        iss.starts_with(&v1) || iss.starts_with(&v2)
    }

    /// A bearer token: valid, and not bound to a proof-of-possession key.
    pub async fn validate(&self, token: &str) -> Result<EntraIdentity, Rejected> {
        let (identity, accepted) = self.validate_accepted(token).await?;
        if accepted.bound {
            return Err(Rejected::BoundToKey);
        }
        Ok(identity)
    }

    /// The access token inside a PoP token: valid, with the thumbprint of the key it is bound
    /// to (`cnf.kid`), which the caller compares with the key that signed the PoP token.
    pub async fn validate_bound(
        &self,
        token: &str,
    ) -> Result<(EntraIdentity, Option<String>), Rejected> {
        let (identity, accepted) = self.validate_accepted(token).await?;
        Ok((identity, accepted.cnf_kid))
    }

    async fn validate_accepted(&self, token: &str) -> Result<(EntraIdentity, Accepted), Rejected> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        {
            let accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = accepted.get(&digest) {
                if now <= a.exp.saturating_add(LEEWAY.as_secs()) {
                    return Ok((a.identity.clone(), a.clone()));
                }
            }
        }
        let a = self.verify(token).await?;
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.len() >= MAX_ACCEPTED {
            accepted.retain(|_, a| now <= a.exp.saturating_add(LEEWAY.as_secs()));
            if accepted.len() >= MAX_ACCEPTED {
                accepted.clear();
            }
        }
        accepted.insert(digest, a.clone());
        Ok((a.identity.clone(), a))
    }

    /// The full check.
    async fn verify(&self, token: &str) -> Result<Accepted, Rejected> {
        let (header, unverified) = peek(token)?;
        let alg = header.alg.unwrap_or_default();
        if alg != "RS256" {
            return Err(Rejected::Algorithm(crate::secret::clip(&alg, 32)));
        }
        let claimed = unverified
            .tid
            .clone()
            .ok_or(Rejected::MissingClaim("tid"))?;
        let tenant = self.allowed_tenant(&claimed)?;
        let iss = unverified.iss.clone().unwrap_or_default();
        let issuers = self.config.authority.issuers(&claimed);
        if !issuers.contains(&iss) {
            return Err(Rejected::Issuer(iss.chars().take(200).collect()));
        }
        let kid = header.kid.ok_or(Rejected::MissingClaim("kid (header)"))?;
        let key = self.key(&tenant, &kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.audiences);
        validation.set_issuer(&issuers);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| self.rejection(&e, &unverified, &iss))?;
        identity_of(data.claims)
    }

    /// The tenant is checked before any key fetch, so tokens naming arbitrary tenants cannot
    /// make the agent call Entra; and it is used in one canonical spelling, so case variants of
    /// an allowed tenant cannot each start a fetch of their own.
    fn allowed_tenant(&self, claimed: &str) -> Result<String, Rejected> {
        uuid::Uuid::parse_str(claimed)
            .ok()
            .map(|t| t.hyphenated().to_string())
            .filter(|t| {
                self.config
                    .tenants
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(t))
            })
            .ok_or_else(|| Rejected::Tenant(claimed.chars().take(64).collect()))
    }

    /// Which check jsonwebtoken's verification failed, by its error kind.
    fn rejection(
        &self,
        e: &jsonwebtoken::errors::Error,
        unverified: &Unverified,
        iss: &str,
    ) -> Rejected {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => Rejected::Signature,
            K::ExpiredSignature => Rejected::Expired(unverified.exp.unwrap_or_default()),
            K::ImmatureSignature => Rejected::NotYetValid(unverified.nbf.unwrap_or_default()),
            K::InvalidAudience => Rejected::Audience(
                unverified.aud.as_ref().map_or_else(
                    || "(none)".into(),
                    |a| crate::secret::clip(&a.to_string(), 200),
                ),
                self.audiences[0].clone(),
            ),
            K::InvalidIssuer => Rejected::Issuer(crate::secret::clip(iss, 200)),
            K::MissingRequiredClaim(c) => Rejected::Malformed(format!("no {c} claim")),
            other => Rejected::Malformed(format!("{other:?}")),
        }
    }
}

/// The identity a verified token stands for, its `exp` and key binding.
fn identity_of(c: Claims) -> Result<Accepted, Rejected> {
    let object_id = c.oid.ok_or(Rejected::MissingClaim("oid"))?;
    // Only `upn` names a user: `preferred_username` and `unique_name` are changeable and,
    // for guests, hold their home address. Users without one are bound by object id, as
    // AKS documents for guests. A `system:` name would alias Kubernetes' own identities.
    let app = c.idtyp.as_deref() == Some("app") || c.scp.is_none();
    let upn = c
        .upn
        .filter(|u| !app && !u.is_empty() && !u.starts_with("system:"));
    let groups_overage = c.hasgroups
        || c.claim_names
            .as_ref()
            .is_some_and(|n| n.contains_key("groups"));
    let identity = EntraIdentity {
        tenant: c.tid,
        object_id,
        upn,
        groups: c.groups,
        groups_overage,
    };
    Ok(Accepted {
        identity,
        exp: c.exp,
        cnf_kid: c
            .cnf
            .as_ref()
            .and_then(|cnf| cnf.get("kid"))
            .and_then(|kid| kid.as_str())
            .filter(|k| !k.is_empty())
            .map(String::from),
        bound: c.cnf.as_ref().is_some_and(|cnf| !cnf.is_null()),
    })
}

impl Validator {
    /// The verification key `kid` of `tenant`. The tenant's keys are fetched when they are
    /// missing, older than a day, or lack `kid`, but at most once per `refetch_interval`
    /// (failed attempts included), so neither forged key ids nor an Entra outage turn every
    /// request into a fetch. When a refresh fails, the keys already known keep working.
    async fn key(&self, tenant: &str, kid: &str) -> Result<DecodingKey, Rejected> {
        if let Some(key) = self.fresh_key(tenant, kid) {
            return Ok(key);
        }
        let _one = self.fetching.lock().await;
        if let Some(key) = self.fresh_key(tenant, kid) {
            return Ok(key);
        }
        let (known, attempted, last_error) = match self.lock().get(tenant) {
            Some(e) => (
                e.keys.get(kid).cloned(),
                Some(e.attempted_at),
                e.last_error.clone(),
            ),
            None => (None, None, None),
        };
        let due = attempted.is_none_or(|at| at.elapsed() >= self.config.refetch_interval);
        if !due {
            return match (known, last_error) {
                (Some(key), _) => Ok(key),
                (None, Some(e)) => Err(Rejected::KeysUnavailable(e)),
                (None, None) => Err(Rejected::UnknownKey(kid.chars().take(64).collect())),
            };
        }
        let result = self.fetch_keys(tenant).await;
        let mut cache = self.lock();
        let entry = cache
            .entry(tenant.to_string())
            .or_insert_with(|| TenantKeys {
                keys: HashMap::new(),
                fetched_at: None,
                attempted_at: Instant::now(),
                last_error: None,
            });
        entry.attempted_at = Instant::now();
        match result {
            Ok(keys) => {
                entry.keys = keys;
                entry.fetched_at = Some(Instant::now());
                entry.last_error = None;
                entry
                    .keys
                    .get(kid)
                    .cloned()
                    .ok_or_else(|| Rejected::UnknownKey(kid.chars().take(64).collect()))
            }
            Err(e) => {
                tracing::warn!(tenant, error = %error_chain(&e), "fetching Entra signing keys failed; keeping the keys already known");
                let e = Arc::new(e);
                entry.last_error = Some(e.clone());
                known.ok_or(Rejected::KeysUnavailable(e))
            }
        }
    }

    /// `kid` from keys fetched successfully within the last day.
    fn fresh_key(&self, tenant: &str, kid: &str) -> Option<DecodingKey> {
        let cache = self.lock();
        let entry = cache.get(tenant)?;
        let fresh = entry
            .fetched_at
            .is_some_and(|at| at.elapsed() <= KEYS_MAX_AGE);
        if fresh {
            entry.keys.get(kid).cloned()
        } else {
            None
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantKeys>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_keys(&self, tenant: &str) -> Result<HashMap<String, DecodingKey>, KeysError> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let discovery_url = self.config.authority.openid_configuration(tenant);
        let resp = self.http.get(&discovery_url, &[]).await?;
        if !resp.status.is_success() {
            return Err(KeysError::Status {
                url: discovery_url,
                status: resp.status,
            });
        }
        let discovery: Discovery = resp.json(&discovery_url)?;
        let https = discovery
            .jwks_uri
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        if !https {
            return Err(KeysError::InsecureKeys {
                discovery: discovery_url,
                jwks_uri: crate::secret::clip(&discovery.jwks_uri, 200),
            });
        }
        let resp = self.http.get(&discovery.jwks_uri, &[]).await?;
        if !resp.status.is_success() {
            return Err(KeysError::Status {
                url: discovery.jwks_uri,
                status: resp.status,
            });
        }
        let set: JwkSet = resp.json(&discovery.jwks_uri)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Only RSA keys verify RS256; anything else in the set is not ours to use.
            let (Some(kid), AlgorithmParameters::RSA(rsa)) = (&jwk.common.key_id, &jwk.algorithm)
            else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_rsa_components(&rsa.n, &rsa.e) {
                keys.insert(kid.clone(), key);
            }
        }
        tracing::info!(tenant, keys = keys.len(), "fetched Entra signing keys");
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::Cloud;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    fn validator() -> Validator {
        let tls = crate::tls::client_config_with_roots(
            crate::tls::roots_from_pem(
                crate::tls::CertificateAuthority::generate("unused")
                    .unwrap()
                    .cert_pem()
                    .as_bytes(),
            )
            .unwrap(),
            &[],
        )
        .unwrap();
        Validator::new(
            ValidatorConfig {
                authority: Authority::new(Cloud::AzurePublicCloud, None).unwrap(),
                server_app_id: crate::entra::ARC_SERVER_APP_ID.into(),
                tenants: vec![TENANT.into()],
                refetch_interval: Duration::from_secs(60),
            },
            HttpClient::new(tls, Duration::from_millis(200), Duration::from_millis(500)),
        )
    }

    fn jwt(header: serde_json::Value, claims: serde_json::Value) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[tokio::test]
    async fn checks_that_need_no_key_reject_before_any_fetch() {
        let v = validator();
        let iss = format!("https://sts.windows.net/{TENANT}/");
        let none = jwt(
            serde_json::json!({"alg": "none"}),
            serde_json::json!({"iss": iss, "tid": TENANT}),
        );
        assert!(v.is_entra_token(&none));
        assert!(matches!(
            v.validate(&none).await,
            Err(Rejected::Algorithm(ref a)) if a == "none"
        ));
        let hmac = jwt(
            serde_json::json!({"alg": "HS256", "kid": "k"}),
            serde_json::json!({"iss": iss, "tid": TENANT}),
        );
        assert!(matches!(
            v.validate(&hmac).await,
            Err(Rejected::Algorithm(ref a)) if a == "HS256"
        ));
        let other = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";
        let foreign = jwt(
            serde_json::json!({"alg": "RS256", "kid": "k"}),
            serde_json::json!({"iss": format!("https://sts.windows.net/{other}/"), "tid": other}),
        );
        assert!(matches!(
            v.validate(&foreign).await,
            Err(Rejected::Tenant(ref t)) if t == other
        ));
        let wrong_iss = jwt(
            serde_json::json!({"alg": "RS256", "kid": "k"}),
            serde_json::json!({"iss": "https://sts.windows.net/someone-else/", "tid": TENANT}),
        );
        assert!(matches!(
            v.validate(&wrong_iss).await,
            Err(Rejected::Issuer(_))
        ));
        assert!(matches!(
            v.validate("not-a-jwt").await,
            Err(Rejected::Malformed(_))
        ));
    }

    #[test]
    fn only_entra_issuers_count_as_entra_tokens() {
        let v = validator();
        let sa = jwt(
            serde_json::json!({"alg": "RS256"}),
            serde_json::json!({"iss": "https://kubernetes.default.svc.cluster.local"}),
        );
        assert!(!v.is_entra_token(&sa));
        assert!(!v.is_entra_token("opaque-token"));
        let v2 = jwt(
            serde_json::json!({"alg": "RS256"}),
            serde_json::json!({"iss": format!("https://login.microsoftonline.com/{TENANT}/v2.0")}),
        );
        assert!(v.is_entra_token(&v2));
    }
}

//! Proof-of-possession (PoP) tokens, as kubelogin (`--pop-enabled --pop-claims u=<cluster id>`)
//! makes them and Azure Arc's guard checks them. Both sides live here so they share one
//! definition of the format:
//!
//! - the proxy asks Entra for an access token bound to an RSA key of its own (`token_type=pop`
//!   and `req_cnf`, see [`KeyRing::form`]); Entra puts the key's RFC 7638 thumbprint into the
//!   token as `cnf.kid`. The proxy then presents a compact JWS ([`PopKey::sign`]) with header
//!   `{"typ":"pop","alg":"RS256","kid":<thumbprint>}` and payload `{"at":<access token>,
//!   "ts":<unix seconds>,"u":<cluster id>,"cnf":{"jwk":<public key>},"nonce":<random>}`, sent
//!   as `Authorization: Bearer <jws>` exactly as kubectl sends kubelogin's exec credential.
//! - the agent checks that JWS ([`verify`]) before the access token inside it is validated
//!   like any Entra token, and that the token's `cnf.kid` is the thumbprint of the key that
//!   signed the JWS: a stolen access token or PoP token is useless without the private key,
//!   and a PoP token is useless on another cluster (`u`) or after its validity window (`ts`).
//!
//! The key lives only in memory and is replaced every [`KEY_ROTATION`] (kubelogin's period),
//! at the next access-token renewal; each access token stays signed with the key it is bound
//! to. The JWS is re-signed every [`RESIGN_EVERY`], well inside the agent's window, never per
//! request: the agent checks every request, pooled connections live for hours.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::auth::refresh::{ExpiringToken, FetchFuture, TokenFetcher};
use crate::auth::{CredentialError, CredentialSource, RenewalObserver, TokenFuture};
use crate::secret::Secret;

/// The `typ` of a PoP token's header, and the `token_type` asked of Entra.
pub const POP_TYPE: &str = "pop";
/// How long a PoP token's `ts` stays acceptable by default: the Arc guard's default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How far in the future a `ts` may lie (clock skew between proxy and agent); the same
/// leeway Entra tokens get on `nbf` and `exp`.
pub const FUTURE_SKEW: Duration = Duration::from_secs(5 * 60);
/// The largest PoP key modulus accepted, in bytes (4096 bits).
pub const MAX_MODULUS_BYTES: usize = 512;
/// The proxy replaces its key this often (kubelogin: every 8 hours).
pub const KEY_ROTATION: Duration = Duration::from_secs(8 * 3600);
/// The proxy re-signs its PoP token this often: a third of the default window, so a token
/// in use is never near the end of an agent's window even with some clock skew.
pub const RESIGN_EVERY: Duration = Duration::from_secs(5 * 60);
/// RSA key size, as kubelogin and MSAL use.
const KEY_BITS: usize = 2048;
/// Access tokens whose key the proxy remembers: the current one and the few before it that
/// may still be handed out while their successor is fetched.
const BOUND_TOKENS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PopError {
    #[error("cannot generate the proof-of-possession RSA key")]
    Generate(#[source] rsa::Error),
    #[error("cannot encode the proof-of-possession RSA key")]
    Encode,
    #[error("the proof-of-possession key is not an RSA key ring can sign with: {0}")]
    Key(String),
    #[error("signing the proof-of-possession token failed")]
    Sign,
    #[error("the key generation task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

/// The RFC 7638 thumbprint of an RSA public key: SHA-256 over the canonical JSON of its
/// required members in lexicographic order, base64url. `n` and `e` are base64url already.
pub fn thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The `req_cnf` parameter of a PoP token request: base64url of `{"kid":..,"xms_ksl":"sw"}`
/// (the key is kept in software).
pub fn req_cnf(thumbprint: &str) -> String {
    URL_SAFE_NO_PAD.encode(
        serde_json::json!({"kid": thumbprint, "xms_ksl": "sw"})
            .to_string()
            .as_bytes(),
    )
}

/// An RSA key pair that signs PoP tokens.
pub struct PopKey {
    pair: ring::signature::RsaKeyPair,
    /// base64url of the modulus and exponent, big-endian without leading zeros.
    n: String,
    e: String,
    thumbprint: String,
    created: Instant,
}

impl PopKey {
    /// A new RSA-2048 key. Takes a while (tens of milliseconds to seconds): call it on a
    /// blocking thread ([`PopKey::generate_blocking`]).
    pub fn generate() -> Result<PopKey, PopError> {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, KEY_BITS)
            .map_err(PopError::Generate)?;
        let der = key.to_pkcs8_der().map_err(|_| PopError::Encode)?;
        PopKey::from_pkcs8(der.as_bytes())
    }

    /// [`PopKey::generate`] on tokio's blocking pool.
    pub async fn generate_blocking() -> Result<PopKey, PopError> {
        tokio::task::spawn_blocking(PopKey::generate)
            .await
            .map_err(PopError::Task)?
    }

    /// A key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<PopKey, PopError> {
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der)
            .map_err(|e| PopError::Key(e.to_string()))?;
        let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
        let n = URL_SAFE_NO_PAD.encode(strip_zeros(&public.n));
        let e = URL_SAFE_NO_PAD.encode(strip_zeros(&public.e));
        Ok(PopKey {
            thumbprint: thumbprint(&n, &e),
            pair,
            n,
            e,
            created: Instant::now(),
        })
    }

    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public key as a JWK, as kubelogin puts it into `cnf.jwk`.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "e": self.e,
            "kty": "RSA",
            "n": self.n,
            "alg": "RS256",
            "kid": self.thumbprint,
        })
    }

    /// The PoP token for `access_token` on the cluster `u`, stamped `ts` (unix seconds).
    pub fn sign(&self, access_token: &str, u: &str, ts: u64) -> Result<Secret, PopError> {
        let header = serde_json::json!({"typ": POP_TYPE, "alg": "RS256", "kid": self.thumbprint});
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let payload = serde_json::json!({
            "at": access_token,
            "ts": ts,
            "u": u,
            "cnf": {"jwk": self.jwk()},
            "nonce": nonce,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let mut signature = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| PopError::Sign)?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// The proxy's PoP key, rotated, and which key each recent access token is bound to.
pub struct KeyRing {
    current: Mutex<Arc<PopKey>>,
    bound: Mutex<VecDeque<([u8; 32], Arc<PopKey>)>>,
    rotation: Duration,
}

impl KeyRing {
    /// A ring with a freshly generated key.
    pub async fn generate() -> Result<KeyRing, PopError> {
        Ok(KeyRing::with_key(
            PopKey::generate_blocking().await?,
            KEY_ROTATION,
        ))
    }

    /// A ring starting with `key`, replaced every `rotation`.
    pub fn with_key(key: PopKey, rotation: Duration) -> KeyRing {
        KeyRing {
            current: Mutex::new(Arc::new(key)),
            bound: Mutex::new(VecDeque::new()),
            rotation,
        }
    }

    /// The key new access tokens are bound to.
    pub fn current(&self) -> Arc<PopKey> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The token request parameters that bind the token to the current key; Entra accepts
    /// them with any grant.
    pub fn form(&self) -> [(&'static str, String); 2] {
        [
            ("token_type", POP_TYPE.to_string()),
            ("req_cnf", req_cnf(self.current().thumbprint())),
        ]
    }

    /// Replaces the key when it is due. A failed generation keeps the old key: an old key
    /// is still a good key, and the next renewal tries again.
    async fn rotate_if_due(&self) {
        if self.current().created.elapsed() < self.rotation {
            return;
        }
        match PopKey::generate_blocking().await {
            Ok(key) => {
                tracing::info!(
                    "rotated the proof-of-possession key; new tokens are bound to the new one"
                );
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
            }
            Err(e) => {
                tracing::warn!(error = %crate::tunnel::http::error_chain(&e), "cannot rotate the proof-of-possession key; keeping the current one");
            }
        }
    }

    fn bind(&self, token: &Secret, key: Arc<PopKey>) {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        if bound.len() >= BOUND_TOKENS {
            bound.pop_front();
        }
        bound.push_back((digest(token), key));
    }

    /// The key `token` was requested with.
    fn key_for(&self, token: &Secret) -> Option<Arc<PopKey>> {
        let d = digest(token);
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        bound
            .iter()
            .rev()
            .find(|(t, _)| *t == d)
            .map(|(_, k)| k.clone())
    }
}

fn digest(token: &Secret) -> [u8; 32] {
    Sha256::digest(token.expose().as_bytes()).into()
}

/// Fetches access tokens bound to the ring's key: rotates the key when due, lets `inner`
/// (whose sources read [`KeyRing::form`]) fetch, and remembers which key the token is
/// bound to. Fetches are one at a time (`Refreshing` serialises them), so the key a source
/// reads is the key recorded here.
pub struct BoundFetcher<F> {
    pub inner: F,
    pub ring: Arc<KeyRing>,
}

impl<F: TokenFetcher> TokenFetcher for BoundFetcher<F> {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            self.ring.rotate_if_due().await;
            let key = self.ring.current();
            let token: ExpiringToken = self.inner.fetch().await?;
            self.ring.bind(&token.token, key);
            Ok(token)
        })
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct Signed {
    access_token: Secret,
    pop: Secret,
    at: Instant,
}

/// The credential of one cluster with PoP: bound access tokens from `access` (shared by
/// every cluster of the same server app), wrapped in a PoP token for this cluster.
pub struct PopCredential {
    access: Arc<dyn CredentialSource>,
    ring: Arc<KeyRing>,
    cluster_id: String,
    signed: Mutex<Option<Signed>>,
    resign_every: Duration,
    /// When a refusal last cost a new access token: a refused PoP token is re-signed at once,
    /// but a new access token is asked for at most once per [`REFETCH_AFTER_REFUSAL`], so a
    /// clock far off (every PoP token "from the future") cannot turn each request into an
    /// Entra token request.
    refetched: Mutex<Option<Instant>>,
}

/// See [`PopCredential`]'s `refetched`.
pub const REFETCH_AFTER_REFUSAL: Duration = Duration::from_secs(60);

impl PopCredential {
    pub fn new(access: Arc<dyn CredentialSource>, ring: Arc<KeyRing>, cluster_id: &str) -> Self {
        PopCredential {
            access,
            ring,
            cluster_id: cluster_id.to_string(),
            signed: Mutex::new(None),
            resign_every: RESIGN_EVERY,
            refetched: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Signed>> {
        self.signed.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get(&self) -> Result<Secret, CredentialError> {
        let access_token = self.access.token().await?;
        if let Some(s) = self.lock().as_ref() {
            if s.access_token == access_token && s.at.elapsed() < self.resign_every {
                return Ok(s.pop.clone());
            }
        }
        let Some(key) = self.ring.key_for(&access_token) else {
            // Only reachable if far more renewals than BOUND_TOKENS happened while this token
            // was still served; dropping it makes the next request fetch one bound anew.
            self.access.refused(&access_token);
            return Err(CredentialError::unavailable(
                self.describe(),
                "the access token's proof-of-possession key is no longer known; a new token is fetched on the next request",
            ));
        };
        let pop = key
            .sign(
                access_token.expose(),
                &self.cluster_id,
                crate::tunnel::sas::unix_now(),
            )
            .map_err(|e| CredentialError::unavailable(self.describe(), e))?;
        *self.lock() = Some(Signed {
            access_token,
            pop: pop.clone(),
            at: Instant::now(),
        });
        Ok(pop)
    }
}

impl CredentialSource for PopCredential {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.get())
    }

    fn describe(&self) -> String {
        format!("{} (proof of possession)", self.access.describe())
    }

    fn refused(&self, token: &Secret) {
        let mut signed = self.lock();
        if let Some(s) = signed.take() {
            if s.pop == *token {
                let mut refetched = self.refetched.lock().unwrap_or_else(|p| p.into_inner());
                if refetched.is_none_or(|at| at.elapsed() >= REFETCH_AFTER_REFUSAL) {
                    *refetched = Some(Instant::now());
                    self.access.refused(&s.access_token);
                }
            } else {
                *signed = Some(s);
            }
        }
    }

    fn observe_renewals(&self, observer: RenewalObserver) {
        self.access.observe_renewals(observer);
    }
}

/// What the agent checks a PoP token against.
#[derive(Clone, Debug)]
pub struct PopPolicy {
    /// This cluster's ARM resource id: the `u` claim must name it (case-insensitively).
    pub cluster_id: String,
    /// How long after its `ts` a PoP token is accepted.
    pub window: Duration,
}

/// Why a PoP token was refused; never quotes the access token.
#[derive(Debug, thiserror::Error)]
pub enum PopRejected {
    #[error("the PoP token is not a well-formed JWS: {0}")]
    Malformed(String),
    #[error("the PoP token's typ is {0:?}, not \"pop\"")]
    Type(String),
    #[error(
        "the PoP token's signing algorithm {0:?} is not accepted; PoP tokens are RS256-signed"
    )]
    Algorithm(String),
    #[error("the PoP token has no {0}")]
    Missing(&'static str),
    #[error("the PoP token was made at {ts} (unix time) and is older than the {}s this agent accepts; its client must sign a new one", window.as_secs())]
    Stale { ts: u64, window: Duration },
    #[error("the PoP token's ts {ts} (unix time) lies in the future by more than {}s; check the clocks", FUTURE_SKEW.as_secs())]
    Future { ts: u64 },
    #[error("the PoP token is for cluster {got:?}, not this one ({expected:?})")]
    Host { got: String, expected: String },
    #[error("the PoP token's cnf.jwk is not a usable RSA public key: {0}")]
    Key(String),
    #[error("the PoP token's signature does not verify with its cnf.jwk")]
    Signature,
    #[error("the access token inside the PoP token is not bound to any key (cnf.kid); request it with token_type=pop")]
    Unbound,
    #[error("the access token inside the PoP token is bound to another key than the one that signed the PoP token (cnf.kid mismatch)")]
    KeyMismatch,
}

/// A PoP token whose own checks passed; its access token is still to be validated.
pub struct PopProof {
    pub access_token: Secret,
    /// The RFC 7638 thumbprint of the key that signed the PoP token: the access token's
    /// `cnf.kid` must equal it.
    pub thumbprint: String,
}

impl PopProof {
    /// The access token's own key binding must be this PoP token's key.
    pub fn check_binding(&self, cnf_kid: Option<&str>) -> Result<(), PopRejected> {
        match cnf_kid {
            None => Err(PopRejected::Unbound),
            Some(kid) if kid == self.thumbprint => Ok(()),
            Some(_) => Err(PopRejected::KeyMismatch),
        }
    }
}

#[derive(Deserialize)]
struct PopHeader {
    typ: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct PopPayload {
    at: Option<String>,
    ts: Option<serde_json::Value>,
    u: Option<String>,
    cnf: Option<PopCnf>,
}

#[derive(Deserialize)]
struct PopCnf {
    jwk: Option<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// Whether `token` presents itself as a PoP token (its JOSE header's `typ` is `pop`), which
/// is how the Arc guard tells them from bearer tokens arriving in the same header.
pub fn is_pop(token: &str) -> bool {
    let Some(header) = token.split('.').next() else {
        return false;
    };
    URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice::<PopHeader>(&h).ok())
        .and_then(|h| h.typ)
        .is_some_and(|t| t.eq_ignore_ascii_case(POP_TYPE))
}

/// The checks of the Arc guard, in its order, plus a `ts` in the future refused: three parts,
/// header `typ` pop and `alg` RS256 with a `kid`, `ts` within the window, `u` this cluster,
/// `cnf.jwk` an RSA key, the RS256 signature over header.payload with that key. `now` is
/// unix seconds. The access token inside is returned for the caller to validate, with the
/// thumbprint its `cnf.kid` must match.
pub fn verify(token: &str, policy: &PopPolicy, now: u64) -> Result<PopProof, PopRejected> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts.as_slice() else {
        return Err(PopRejected::Malformed(format!(
            "{} dot-separated parts instead of 3",
            parts.len()
        )));
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(PopRejected::Malformed("an empty part".into()));
    }
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| PopRejected::Malformed(format!("the {what} is not base64url")))
    };
    let header: PopHeader = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|_| PopRejected::Malformed("the header is not a JSON object".into()))?;
    let typ = header.typ.ok_or(PopRejected::Missing("typ (header)"))?;
    if !typ.eq_ignore_ascii_case(POP_TYPE) {
        return Err(PopRejected::Type(crate::secret::clip(&typ, 32)));
    }
    let alg = header.alg.unwrap_or_default();
    if alg != "RS256" {
        return Err(PopRejected::Algorithm(crate::secret::clip(&alg, 32)));
    }
    if header.kid.is_none_or(|k| k.is_empty()) {
        return Err(PopRejected::Missing("kid (header)"));
    }
    let payload: PopPayload = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|_| PopRejected::Malformed("the payload is not a JSON object of claims".into()))?;
    // kubelogin writes an integer; the guard also takes a float or a numeric string.
    let ts = match payload.ts {
        Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or(PopRejected::Missing("ts (a unix time)"))?;
    if ts.saturating_add(policy.window.as_secs()) < now {
        return Err(PopRejected::Stale {
            ts,
            window: policy.window,
        });
    }
    if ts > now.saturating_add(FUTURE_SKEW.as_secs()) {
        return Err(PopRejected::Future { ts });
    }
    let u = payload
        .u
        .ok_or(PopRejected::Missing("u (the cluster id)"))?;
    if !u.eq_ignore_ascii_case(&policy.cluster_id) {
        return Err(PopRejected::Host {
            got: crate::secret::clip(&u, 300),
            expected: policy.cluster_id.clone(),
        });
    }
    let jwk = payload
        .cnf
        .and_then(|c| c.jwk)
        .ok_or(PopRejected::Missing("cnf.jwk"))?;
    if jwk.kty.as_deref().is_some_and(|k| k != "RSA") {
        return Err(PopRejected::Key("kty is not RSA".into()));
    }
    let (Some(n), Some(e)) = (jwk.n, jwk.e) else {
        return Err(PopRejected::Key("n or e is missing".into()));
    };
    let n_bytes = URL_SAFE_NO_PAD
        .decode(&n)
        .map_err(|_| PopRejected::Key("n is not base64url".into()))?;
    let e_bytes = URL_SAFE_NO_PAD
        .decode(&e)
        .map_err(|_| PopRejected::Key("e is not base64url".into()))?;
    // Proxies use 2048-bit keys (kubelogin too); a larger modulus only makes a forged token
    // cost the agent more to refuse.
    if strip_zeros(&n_bytes).len() > MAX_MODULUS_BYTES {
        return Err(PopRejected::Key(format!(
            "the modulus is longer than {} bits",
            MAX_MODULUS_BYTES * 8
        )));
    }
    let signature = decode(s, "signature")?;
    let public = ring::signature::RsaPublicKeyComponents {
        n: &n_bytes,
        e: &e_bytes,
    };
    // ring refuses moduli under 2048 bits here, as the PoP key must be at least that.
    public
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            format!("{h}.{p}").as_bytes(),
            &signature,
        )
        .map_err(|_| PopRejected::Signature)?;
    let at = payload
        .at
        .filter(|a| !a.is_empty())
        .ok_or(PopRejected::Missing("at (the access token)"))?;
    Ok(PopProof {
        access_token: Secret::new(at),
        // Recomputed from the key that verified the signature, never taken from a header.
        thumbprint: thumbprint(
            &URL_SAFE_NO_PAD.encode(strip_zeros(&n_bytes)),
            &URL_SAFE_NO_PAD.encode(strip_zeros(&e_bytes)),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed key, so unit tests need not generate one.
    pub(crate) fn test_key() -> PopKey {
        let pem = pem::parse(include_str!("testdata/test-only-rsa-key.pem")).unwrap();
        PopKey::from_pkcs8(pem.contents()).unwrap()
    }

    const CLUSTER: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/c";

    fn policy() -> PopPolicy {
        PopPolicy {
            cluster_id: CLUSTER.into(),
            window: DEFAULT_WINDOW,
        }
    }

    #[test]
    fn rfc_7638_thumbprint_of_the_rfc_example_key() {
        // RFC 7638 section 3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            thumbprint(n, "AQAB"),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        let cnf = URL_SAFE_NO_PAD.decode(req_cnf("abc")).unwrap();
        assert_eq!(cnf, br#"{"kid":"abc","xms_ksl":"sw"}"#);
    }

    #[test]
    fn a_signed_token_verifies_and_names_its_key() {
        let key = test_key();
        let now = 1_700_000_000;
        let pop = key.sign("the-access-token", CLUSTER, now).unwrap();
        assert!(is_pop(pop.expose()));
        let proof = verify(pop.expose(), &policy(), now + 60).unwrap();
        assert_eq!(proof.access_token.expose(), "the-access-token");
        assert_eq!(proof.thumbprint, key.thumbprint());
        proof.check_binding(Some(key.thumbprint())).unwrap();
        assert!(matches!(
            proof.check_binding(Some("other")),
            Err(PopRejected::KeyMismatch)
        ));
        assert!(matches!(
            proof.check_binding(None),
            Err(PopRejected::Unbound)
        ));
        // u is compared case-insensitively, as ARM ids are.
        let upper = key.sign("t", &CLUSTER.to_uppercase(), now).unwrap();
        verify(upper.expose(), &policy(), now).unwrap();
        // Errors never quote the access token.
        let stale = verify(pop.expose(), &policy(), now + 3600).err().unwrap();
        assert!(!stale.to_string().contains("the-access-token"));
    }

    #[test]
    fn window_and_skew_bound_ts() {
        let key = test_key();
        let now = 1_700_000_000;
        let pop = key.sign("t", CLUSTER, now).unwrap();
        verify(pop.expose(), &policy(), now + DEFAULT_WINDOW.as_secs()).unwrap();
        assert!(matches!(
            verify(pop.expose(), &policy(), now + DEFAULT_WINDOW.as_secs() + 1),
            Err(PopRejected::Stale { .. })
        ));
        verify(pop.expose(), &policy(), now - FUTURE_SKEW.as_secs()).unwrap();
        assert!(matches!(
            verify(pop.expose(), &policy(), now - FUTURE_SKEW.as_secs() - 1),
            Err(PopRejected::Future { .. })
        ));
        assert!(!is_pop("a.b.c"));
        assert!(matches!(
            verify("a.b", &policy(), now),
            Err(PopRejected::Malformed(_))
        ));
    }

    /// Issues "at-N", reading the request parameters a source would send.
    struct Issuing {
        ring: Arc<KeyRing>,
        sent: Mutex<Vec<String>>,
        n: std::sync::atomic::AtomicUsize,
    }

    impl TokenFetcher for Issuing {
        fn fetch(&self) -> FetchFuture<'_> {
            let [_, (_, cnf)] = self.ring.form();
            self.sent.lock().unwrap().push(cnf);
            let n = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                Ok(ExpiringToken::new(
                    Secret::new(format!("at-{n}")),
                    Duration::from_secs(3600),
                ))
            })
        }
        fn describe(&self) -> String {
            "issuing".into()
        }
    }

    #[tokio::test]
    async fn a_due_key_is_rotated_at_the_next_fetch_and_older_tokens_keep_their_key() {
        let first = test_key();
        let first_thumbprint = first.thumbprint().to_string();
        let ring = Arc::new(KeyRing::with_key(first, Duration::ZERO));
        let fetcher = BoundFetcher {
            inner: Issuing {
                ring: ring.clone(),
                sent: Mutex::new(Vec::new()),
                n: Default::default(),
            },
            ring: ring.clone(),
        };
        fetcher.fetch().await.unwrap();
        fetcher.fetch().await.unwrap();
        let a = ring.key_for(&Secret::new("at-0")).unwrap();
        let b = ring.key_for(&Secret::new("at-1")).unwrap();
        assert_ne!(
            a.thumbprint(),
            first_thumbprint,
            "rotated before the first fetch"
        );
        assert_ne!(
            a.thumbprint(),
            b.thumbprint(),
            "and again before the second"
        );
        assert_eq!(b.thumbprint(), ring.current().thumbprint());
        // Each request carried the key its token is recorded with.
        let sent = fetcher.inner.sent.lock().unwrap().clone();
        assert_eq!(sent, [req_cnf(a.thumbprint()), req_cnf(b.thumbprint())]);
        // A generated key signs tokens that verify.
        let pop = b.sign("at-1", CLUSTER, 1_700_000_000).unwrap();
        let proof = verify(pop.expose(), &policy(), 1_700_000_000).unwrap();
        assert_eq!(proof.thumbprint, b.thumbprint());
    }

    struct Counting {
        n: std::sync::atomic::AtomicUsize,
    }

    impl CredentialSource for Counting {
        fn token(&self) -> TokenFuture<'_> {
            let n = self.n.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Ok(Secret::new(format!("at-{n}"))) })
        }
        fn describe(&self) -> String {
            "counting".into()
        }
        fn refused(&self, _token: &Secret) {
            self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pop_token_is_reused_then_resigned_and_follows_the_access_token() {
        let ring = Arc::new(KeyRing::with_key(test_key(), KEY_ROTATION));
        let access = Arc::new(Counting {
            n: Default::default(),
        });
        ring.bind(&Secret::new("at-0"), ring.current());
        ring.bind(&Secret::new("at-1"), ring.current());
        let cred = PopCredential::new(access.clone(), ring.clone(), CLUSTER);
        let first = cred.token().await.unwrap();
        assert_eq!(cred.token().await.unwrap(), first);
        tokio::time::advance(RESIGN_EVERY).await;
        let second = cred.token().await.unwrap();
        assert_ne!(second, first);
        let proof = verify(second.expose(), &policy(), crate::tunnel::sas::unix_now()).unwrap();
        assert_eq!(proof.access_token.expose(), "at-0");
        // A refusal of the current PoP token drops its access token too.
        cred.refused(&first);
        assert_eq!(cred.token().await.unwrap(), second);
        cred.refused(&second);
        let third = cred.token().await.unwrap();
        let proof = verify(third.expose(), &policy(), crate::tunnel::sas::unix_now()).unwrap();
        assert_eq!(proof.access_token.expose(), "at-1");
        // Refused again within the minute: re-signed, but no new access token asked for.
        cred.refused(&third);
        let fourth = cred.token().await.unwrap();
        assert_ne!(fourth, third);
        let proof = verify(fourth.expose(), &policy(), crate::tunnel::sas::unix_now()).unwrap();
        assert_eq!(proof.access_token.expose(), "at-1");
        // A minute on, a refusal drops the access token again; one the ring never bound
        // cannot be presented as PoP.
        tokio::time::advance(REFETCH_AFTER_REFUSAL).await;
        cred.refused(&fourth);
        let err = cred.token().await.err().unwrap();
        assert!(format!("{:#}", anyhow::Error::new(err)).contains("no longer known"));
    }
}

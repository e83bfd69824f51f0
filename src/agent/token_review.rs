//! Who a passed-through bearer token stands for, for the audit log only: the agent forwards
//! such tokens unchecked (the apiserver judges them), so to name the caller it asks the
//! apiserver with a TokenReview, made with the agent's own credential.
//!
//! Answers are cached by the token's SHA-256 (the token itself is never kept) until the
//! token's expiry, read from its JWT `exp` claim without verification (the apiserver did the
//! verifying), so the apiserver sees one review per token rather than one per request.
//! Concurrent first requests with one token share one review (a `OnceCell` per digest).
//! Failed reviews and unauthenticated answers are kept only briefly ([`RETRY_AFTER`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::upstream::Upstream;
use crate::auth::CredentialSource;
use crate::tunnel::http::error_chain;

const REVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// How long one review may take. Requests never wait for it (see `audit`), only their line.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens remembered at once. Each entry is a digest and a name with its groups, a few hundred
/// bytes; past this, expired entries are dropped, then all of them (a flood of distinct tokens
/// costs reviews, not memory).
pub const CACHE_ENTRIES: usize = 4096;
/// How long an answer for a token without a readable `exp` is kept (legacy Secret-based
/// service-account tokens have none).
pub const UNKNOWN_EXPIRY: Duration = Duration::from_secs(10 * 60);
/// The longest an answer is kept even when the token lives longer, so a deleted service
/// account stops being named within the hour.
pub const MAX_CACHED: Duration = Duration::from_secs(60 * 60);
/// How long a failed review or an unauthenticated answer is kept: an apiserver outage costs
/// one review per token per this, not one per request.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Reviews in flight at once: a burst of new tokens waits its turn (within
/// [`REVIEW_TIMEOUT`]) rather than becoming a burst of apiserver calls.
pub const MAX_CONCURRENT_REVIEWS: usize = 8;
/// A TokenReview answer is a small object; anything larger is not one.
const MAX_REVIEW_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewError {
    #[error("the agent has no apiserver credential of its own to make TokenReviews with")]
    NoCredential,
    #[error("the agent's own apiserver credential is unavailable")]
    Credential(#[source] crate::auth::CredentialError),
    #[error("cannot encode the TokenReview")]
    Encode(#[source] http::Error),
    #[error("cannot send a TokenReview to the apiserver")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("the apiserver did not answer a TokenReview within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("cannot read the apiserver's TokenReview answer")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the apiserver refused the agent's TokenReview with HTTP {0}. The agent's service account needs `create` on tokenreviews.authentication.k8s.io (re-apply the agent's manifests)")]
    Refused(u16),
    #[error("the apiserver failed a TokenReview with HTTP {0}")]
    Failed(u16),
    #[error("the apiserver's TokenReview answer is not one")]
    Decode(#[source] serde_json::Error),
}

/// What the apiserver said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reviewed {
    Authenticated {
        user: String,
        groups: Vec<String>,
    },
    /// The apiserver does not accept the token.
    Unauthenticated,
    /// No answer (see the agent's log for why).
    Failed,
}

struct Answer {
    reviewed: Arc<Reviewed>,
    until: Instant,
}

type Slot = Arc<OnceCell<Answer>>;

pub struct TokenReviews {
    own: Option<Arc<dyn CredentialSource>>,
    cache: Mutex<HashMap<[u8; 32], Slot>>,
    permits: tokio::sync::Semaphore,
}

impl TokenReviews {
    pub fn new(own: Option<Arc<dyn CredentialSource>>) -> TokenReviews {
        TokenReviews {
            own,
            cache: Mutex::new(HashMap::new()),
            permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_REVIEWS),
        }
    }

    /// The cached answer for `token`, if there is a current one, without waiting.
    pub fn cached(&self, token: &str) -> Option<Arc<Reviewed>> {
        let slot = self.slot(&digest(token));
        slot.get().map(|a| a.reviewed.clone())
    }

    /// Who `token` stands for: the cached answer, or one review shared by every caller
    /// asking about the same token meanwhile.
    pub async fn review(&self, token: &str, upstream: &Upstream) -> Arc<Reviewed> {
        let slot = self.slot(&digest(token));
        let answer = slot
            .get_or_init(|| async {
                let reviewed = match self.ask(token, upstream).await {
                    Ok(reviewed) => reviewed,
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "TokenReview failed; the audit log names this caller as unknown");
                        Reviewed::Failed
                    }
                };
                let keep = match reviewed {
                    Reviewed::Authenticated { .. } => lifetime(token, SystemTime::now()),
                    Reviewed::Unauthenticated | Reviewed::Failed => RETRY_AFTER,
                };
                Answer {
                    reviewed: Arc::new(reviewed),
                    until: Instant::now() + keep,
                }
            })
            .await;
        answer.reviewed.clone()
    }

    /// The slot for a digest: the current one, or a fresh one in place of an expired one.
    fn slot(&self, digest: &[u8; 32]) -> Slot {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let current = |slot: &Slot| slot.get().is_none_or(|a| a.until > now);
        if let Some(slot) = cache.get(digest).filter(|s| current(s)) {
            return slot.clone();
        }
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, slot| current(slot));
            if cache.len() >= CACHE_ENTRIES {
                // An eighth of the entries, in the map's (random) order: a flood of new
                // tokens costs reviews, not memory, and most current answers stay.
                let evicted: Vec<[u8; 32]> =
                    cache.keys().take(CACHE_ENTRIES / 8).copied().collect();
                for key in evicted {
                    cache.remove(&key);
                }
            }
        }
        let slot = Slot::default();
        cache.insert(*digest, slot.clone());
        slot
    }

    /// One review, all of it (a turn among [`MAX_CONCURRENT_REVIEWS`], the agent's own
    /// credential, the exchange) within [`REVIEW_TIMEOUT`].
    async fn ask(&self, token: &str, upstream: &Upstream) -> Result<Reviewed, TokenReviewError> {
        tokio::time::timeout(REVIEW_TIMEOUT, async {
            let _turn = self
                .permits
                .acquire()
                .await
                .map_err(|_| TokenReviewError::Timeout(REVIEW_TIMEOUT))?;
            self.exchange(token, upstream).await
        })
        .await
        .map_err(|_| TokenReviewError::Timeout(REVIEW_TIMEOUT))?
    }

    async fn exchange(
        &self,
        token: &str,
        upstream: &Upstream,
    ) -> Result<Reviewed, TokenReviewError> {
        let own = self.own.as_ref().ok_or(TokenReviewError::NoCredential)?;
        let own = own.token().await.map_err(TokenReviewError::Credential)?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", own.expose()))
            .map_err(|e| TokenReviewError::Encode(e.into()))?;
        bearer.set_sensitive(true);
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        });
        let uri = upstream
            .uri_for(REVIEWS_PATH)
            .map_err(|e| TokenReviewError::Encode(e.into()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(AUTHORIZATION, bearer)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(review.to_string())))
            .map_err(TokenReviewError::Encode)?;
        let exchange = async {
            let response = upstream
                .reviews
                .request(request)
                .await
                .map_err(TokenReviewError::Send)?;
            let code = response.status();
            let body = Limited::new(response.into_body(), MAX_REVIEW_BODY)
                .collect()
                .await
                .map_err(TokenReviewError::Read)?
                .to_bytes();
            Ok::<_, TokenReviewError>((code, body))
        };
        let (code, body) = exchange.await?;
        if !code.is_success() {
            let code = code.as_u16();
            return Err(if code < 500 {
                TokenReviewError::Refused(code)
            } else {
                TokenReviewError::Failed(code)
            });
        }
        let answer: ReviewAnswer =
            serde_json::from_slice(&body).map_err(TokenReviewError::Decode)?;
        let status = answer.status;
        Ok(match status.user.username {
            Some(user) if status.authenticated && !user.is_empty() => Reviewed::Authenticated {
                user,
                groups: status.user.groups,
            },
            _ => Reviewed::Unauthenticated,
        })
    }
}

#[derive(serde::Deserialize)]
struct ReviewAnswer {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(serde::Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: ReviewUser,
}

#[derive(serde::Deserialize, Default)]
struct ReviewUser {
    username: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// How long an authenticated answer for `token` is kept: until its `exp` when it is a JWT
/// with one, at most [`MAX_CACHED`]; [`UNKNOWN_EXPIRY`] otherwise.
fn lifetime(token: &str, now: SystemTime) -> Duration {
    let Some(exp) = jwt_expiry(token) else {
        return UNKNOWN_EXPIRY;
    };
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Duration::from_secs(exp.saturating_sub(now)).min(MAX_CACHED)
}

/// A JWT's `exp` claim, read without verification.
fn jwt_expiry(token: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Claims>(&bytes).ok()?.exp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.sig", part(json!({"alg": "RS256"})), part(claims))
    }

    #[test]
    fn answers_last_until_the_tokens_expiry_within_bounds() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let in_5m = jwt(json!({"exp": 1_000_300, "sub": "system:serviceaccount:a:b"}));
        assert_eq!(lifetime(&in_5m, now), Duration::from_secs(300));
        let in_a_year = jwt(json!({"exp": 1_000_000 + 365 * 86400}));
        assert_eq!(lifetime(&in_a_year, now), MAX_CACHED);
        let expired = jwt(json!({"exp": 999_000}));
        assert_eq!(lifetime(&expired, now), Duration::ZERO);
        for unknown in [
            jwt(json!({"sub": "x"})),
            "opaque-token".to_string(),
            "a.%%%.c".into(),
        ] {
            assert_eq!(lifetime(&unknown, now), UNKNOWN_EXPIRY, "{unknown}");
        }
    }

    #[test]
    fn the_cache_keeps_digests_and_stays_bounded() {
        let reviews = TokenReviews::new(None);
        for i in 0..CACHE_ENTRIES + 10 {
            let slot = reviews.slot(&digest(&format!("token-{i}")));
            let _ = slot.set(Answer {
                reviewed: Arc::new(Reviewed::Unauthenticated),
                until: Instant::now() + Duration::from_secs(60),
            });
        }
        let cache = reviews.cache.lock().unwrap();
        assert!(cache.len() <= CACHE_ENTRIES);
        assert!(!cache.contains_key(&[0u8; 32]));
    }

    /// An HTTPS stand-in apiserver that answers every TokenReview with `answer` and counts
    /// them; returns it as an upstream, and the count.
    async fn apiserver(answer: (u16, serde_json::Value)) -> (Upstream, Arc<AtomicUsize>) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let ca = crate::tls::CertificateAuthority::generate("test").unwrap();
        let leaf = ca.issue_server(&["127.0.0.1"]).unwrap();
        let tls = crate::tls::server_config(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            &[crate::tls::ALPN_H2, crate::tls::ALPN_HTTP11],
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (count, answer) = (counted.clone(), answer.clone());
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let (count, (code, body)) = (count.clone(), answer.clone());
                    async move {
                        assert_eq!(req.uri().path(), REVIEWS_PATH);
                        assert_eq!(req.headers()[AUTHORIZATION], "Bearer own-token");
                        count.fetch_add(1, Ordering::SeqCst);
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from(body.to_string())));
                        *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .into_owned(),
                );
            }
        });
        let url = format!("https://{addr}").parse().unwrap();
        (
            Upstream::new(&url, Some(ca.cert_pem().as_bytes())).unwrap(),
            count,
        )
    }

    fn own() -> Option<Arc<dyn CredentialSource>> {
        Some(Arc::new(crate::auth::StaticToken::new(
            crate::secret::Secret::new("own-token"),
        )))
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_review_and_later_ones_use_its_answer() {
        let answer = json!({"status": {"authenticated": true, "user": {
            "username": "system:serviceaccount:ci:deployer",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        }}});
        let (upstream, count) = apiserver((201, answer)).await;
        let reviews = TokenReviews::new(own());
        // Polled together: every one of them asks before the first answer can arrive.
        let asked = (0..20).map(|_| reviews.review("sa-token", &upstream));
        let answers = futures_util::future::join_all(asked).await;
        let want = Reviewed::Authenticated {
            user: "system:serviceaccount:ci:deployer".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ],
        };
        assert!(answers.iter().all(|a| **a == want), "{answers:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(reviews.cached("sa-token").as_deref(), Some(&want));
        reviews.review("sa-token", &upstream).await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        reviews.review("another-token", &upstream).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refusals_and_unauthenticated_tokens_name_no_one() {
        let (upstream, _) = apiserver((403, json!({"kind": "Status"}))).await;
        let reviews = TokenReviews::new(own());
        assert_eq!(*reviews.review("t", &upstream).await, Reviewed::Failed);
        let answer = json!({"status": {"authenticated": false, "error": "invalid bearer token"}});
        let (upstream, _) = apiserver((201, answer)).await;
        let reviews = TokenReviews::new(own());
        assert_eq!(
            *reviews.review("t", &upstream).await,
            Reviewed::Unauthenticated
        );
    }

    #[tokio::test]
    async fn an_agent_without_its_own_credential_names_no_one() {
        let upstream = Upstream::new(&"https://127.0.0.1:1".parse().unwrap(), None).unwrap();
        let reviews = TokenReviews::new(None);
        assert_eq!(*reviews.review("t", &upstream).await, Reviewed::Failed);
        assert_eq!(reviews.cached("t").as_deref(), Some(&Reviewed::Failed));
        assert_eq!(reviews.cached("other"), None);
    }
}

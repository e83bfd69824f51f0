//! Renewal ahead of expiry for credentials that expire (Entra tokens, registry-issued send
//! tokens). The rule users of `az connectedk8s proxy` wish it had: a failed renewal never ends
//! the session. The current token keeps being served until its real expiry while renewal
//! retries with backoff; only a token that has truly expired makes requests fail, with the
//! renewal error in the message.

use crate::tunnel::http::error_chain;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{CredentialError, CredentialSource, RenewalObserver, TokenFuture};
use crate::secret::Secret;
use crate::tunnel::backoff::Backoff;

/// A token and when it stops being valid.
/// The longest a token is held before it is fetched again, whatever its issuer claims.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct ExpiringToken {
    pub token: Secret,
    pub issued_at: Instant,
    pub expires_at: Instant,
}

impl ExpiringToken {
    /// A token valid for `lifetime` from now. The lifetime comes from whoever issued the token
    /// (a token endpoint's `expires_in`, a CLI, the registry); one claimed beyond
    /// [`MAX_LIFETIME`] is taken as that long, so no answer can overflow the clock.
    pub fn new(token: Secret, lifetime: Duration) -> Self {
        let now = Instant::now();
        ExpiringToken {
            token,
            issued_at: now,
            expires_at: now + lifetime.min(MAX_LIFETIME),
        }
    }

    /// When to start renewing: `margin` before expiry, or half way for short-lived tokens
    /// (a 10-minute token renewed 5 minutes early would be fetched on every request).
    fn renew_at(&self, margin: Duration) -> Instant {
        let lifetime = self.expires_at.saturating_duration_since(self.issued_at);
        self.expires_at - margin.min(lifetime / 2)
    }
}

pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ExpiringToken, CredentialError>> + Send + 'a>>;

/// Something that can obtain a fresh token (a token endpoint, a CLI, a registry).
pub trait TokenFetcher: Send + Sync {
    fn fetch(&self) -> FetchFuture<'_>;
    fn describe(&self) -> String;
}

/// Renew this long before expiry: long enough for a slow identity endpoint and a few retries.
pub const RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);

struct State {
    current: Option<ExpiringToken>,
    /// No renewal attempt before this instant (backoff after a failure).
    next_attempt: Instant,
    last_error: Option<String>,
    backoff: Backoff,
}

pub struct Refreshing<F> {
    fetcher: F,
    margin: Duration,
    state: Mutex<State>,
    /// One renewal at a time: a burst of requests near expiry triggers a single fetch.
    renewing: tokio::sync::Mutex<()>,
    /// Told how each fetch went (see [`CredentialSource::observe_renewals`]).
    observer: std::sync::OnceLock<RenewalObserver>,
}

impl<F: TokenFetcher> Refreshing<F> {
    pub fn new(fetcher: F, margin: Duration) -> Self {
        Refreshing {
            fetcher,
            margin,
            state: Mutex::new(State {
                current: None,
                next_attempt: Instant::now(),
                last_error: None,
                backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
            }),
            renewing: tokio::sync::Mutex::new(()),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// What fetches the tokens.
    pub fn fetcher(&self) -> &F {
        &self.fetcher
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached token if it is fresh (before its renewal point).
    fn fresh(&self, now: Instant) -> Option<Secret> {
        let state = self.lock();
        let current = state.current.as_ref()?;
        (now < current.renew_at(self.margin)).then(|| current.token.clone())
    }

    /// The cached token if it has not expired yet.
    fn valid(&self, now: Instant) -> Option<Secret> {
        let state = self.lock();
        let current = state.current.as_ref()?;
        (now < current.expires_at).then(|| current.token.clone())
    }

    async fn get(&self) -> Result<Secret, CredentialError> {
        if let Some(token) = self.fresh(Instant::now()) {
            return Ok(token);
        }
        // While one request renews, the others keep using the still valid token rather than
        // wait on a slow identity endpoint.
        let _renewing = match self.renewing.try_lock() {
            Ok(guard) => guard,
            Err(_) => match self.valid(Instant::now()) {
                Some(token) => return Ok(token),
                None => self.renewing.lock().await,
            },
        };
        let now = Instant::now();
        // Someone else may have renewed while we waited.
        if let Some(token) = self.fresh(now) {
            return Ok(token);
        }
        let due = self.lock().next_attempt <= now;
        if due {
            let fetched = self.fetcher.fetch().await;
            if let Some(observe) = self.observer.get() {
                observe(if fetched.is_ok() { "ok" } else { "failed" });
            }
            match fetched {
                Ok(fresh) => {
                    let mut state = self.lock();
                    state.backoff.reset();
                    state.last_error = None;
                    state.current = Some(fresh.clone());
                    return Ok(fresh.token);
                }
                Err(e) => {
                    let mut state = self.lock();
                    let delay = state.backoff.next_delay();
                    state.next_attempt = Instant::now() + delay;
                    state.last_error = Some(error_chain(&e));
                    // No token yet (start-up): the caller gets the fetcher's own error, and
                    // there is no current token to keep using.
                    if state.current.is_none() {
                        return Err(e);
                    }
                    tracing::warn!(source = %self.fetcher.describe(), error = %error_chain(&e), retry_in_s = delay.as_secs(), "credential renewal failed; still using the current token");
                }
            }
        }
        let state = self.lock();
        match &state.current {
            Some(current) if Instant::now() < current.expires_at => Ok(current.token.clone()),
            current => Err(CredentialError::unavailable(
                self.fetcher.describe(),
                match (&state.last_error, current) {
                    (Some(e), Some(_)) => {
                        format!("the token expired and renewal keeps failing: {e}")
                    }
                    (Some(e), None) => format!("could not get a token yet: {e}"),
                    (None, _) => "no token yet; renewal will be retried shortly".into(),
                },
            )),
        }
    }
}

impl<F: TokenFetcher> CredentialSource for Refreshing<F> {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.get())
    }

    fn describe(&self) -> String {
        self.fetcher.describe()
    }

    fn observe_renewals(&self, observer: RenewalObserver) {
        // The first observer stays: a source serves one proxy.
        let _ = self.observer.set(observer);
    }

    fn refused(&self, token: &Secret) {
        let mut state = self.lock();
        if state
            .current
            .as_ref()
            .is_some_and(|c| c.token.expose() == token.expose())
        {
            state.current = None;
            state.next_attempt = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_lifetime_beyond_reason_is_held_to_the_maximum() {
        let token = ExpiringToken::new(Secret::new("t"), Duration::MAX);
        assert_eq!(token.expires_at - token.issued_at, MAX_LIFETIME);
        let renew = token.renew_at(Duration::from_secs(300));
        assert_eq!(token.expires_at - renew, Duration::from_secs(300));
    }

    /// Issues "token-N" valid for `ttl`, or fails while `down` is set.
    struct Fake {
        ttl: Duration,
        calls: Arc<AtomicUsize>,
        down: Arc<AtomicBool>,
    }

    impl TokenFetcher for Fake {
        fn fetch(&self) -> FetchFuture<'_> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    return Err(CredentialError::unavailable("fake", "endpoint down"));
                }
                Ok(ExpiringToken::new(
                    Secret::new(format!("token-{n}")),
                    self.ttl,
                ))
            })
        }

        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn setup(ttl: Duration) -> (Refreshing<Fake>, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let fake = Fake {
            ttl,
            calls: calls.clone(),
            down: down.clone(),
        };
        (Refreshing::new(fake, Duration::from_secs(300)), calls, down)
    }

    #[tokio::test(start_paused = true)]
    async fn renews_ahead_of_expiry_and_caches_in_between() {
        let (source, calls, _) = setup(Duration::from_secs(3600));
        assert_eq!(source.token().await.unwrap().expose(), "token-0");
        tokio::time::advance(Duration::from_secs(3000)).await;
        assert_eq!(source.token().await.unwrap().expose(), "token-0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Inside the five-minute margin: renewed before it expires.
        tokio::time::advance(Duration::from_secs(400)).await;
        assert_eq!(source.token().await.unwrap().expose(), "token-1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_keeps_the_session_until_real_expiry_then_says_why() {
        let (source, calls, down) = setup(Duration::from_secs(3600));
        assert_eq!(source.token().await.unwrap().expose(), "token-0");
        down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(3400)).await;
        // Renewal fails, the current token is still valid: requests keep working.
        for _ in 0..20 {
            assert_eq!(source.token().await.unwrap().expose(), "token-0");
        }
        // Backoff: twenty requests made one attempt, not twenty.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(201)).await;
        let err = error_chain(&source.token().await.unwrap_err());
        assert!(
            err.contains("expired") && err.contains("endpoint down"),
            "{err}"
        );
        // The endpoint recovers: the next attempt after the backoff succeeds.
        down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(source.token().await.unwrap().expose().starts_with("token-"));
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_renew_half_way_not_on_every_request() {
        let (source, calls, _) = setup(Duration::from_secs(120));
        assert_eq!(source.token().await.unwrap().expose(), "token-0");
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(source.token().await.unwrap().expose(), "token-0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(source.token().await.unwrap().expose(), "token-1");
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_at_once_and_only_that_token() {
        let calls = Arc::new(AtomicUsize::new(0));
        let source = Refreshing::new(
            Fake {
                ttl: Duration::from_secs(3600),
                calls: calls.clone(),
                down: Arc::new(AtomicBool::new(false)),
            },
            Duration::from_secs(60),
        );
        let first = source.token().await.unwrap();
        source.refused(&Secret::new("an older token"));
        assert_eq!(source.token().await.unwrap().expose(), first.expose());
        source.refused(&first);
        let second = source.token().await.unwrap();
        assert_ne!(second.expose(), first.expose());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

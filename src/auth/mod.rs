//! Where the proxy's credential for the apiserver comes from. Every source implements
//! [`CredentialSource`]; the proxy asks it for a token per request and never caches beyond
//! what the source itself decides, so a rotated token is picked up without a restart.

pub mod exec;
pub mod refresh;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::secret::Secret;

/// A cause whose type varies by source (an I/O error, a child process, a plain message).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `source` says why; print with `error_chain` or `{:#}` to show it.
    #[error("{source_name}")]
    Unavailable {
        source_name: String,
        #[source]
        source: BoxError,
    },
}

impl CredentialError {
    /// `reason` is an error, or a plain message (`String` and `&str` convert).
    pub fn unavailable(source_name: impl Into<String>, reason: impl Into<BoxError>) -> Self {
        CredentialError::Unavailable {
            source_name: source_name.into(),
            source: reason.into(),
        }
    }
}

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Secret, CredentialError>> + Send + 'a>>;

pub trait CredentialSource: Send + Sync {
    /// A bearer token valid now.
    fn token(&self) -> TokenFuture<'_>;
    /// A short name for messages, e.g. "--token" or "token file /var/run/...".
    fn describe(&self) -> String;
    /// `token` was refused (its key was renewed, say): a source that caches drops it, so the
    /// next call fetches a fresh one instead of waiting for the renewal point.
    fn refused(&self, _token: &Secret) {}
    /// `observer` is told how each renewal of an expiring token went (`"ok"` or
    /// `"failed"`), for metrics; sources that never renew ignore it.
    fn observe_renewals(&self, _observer: RenewalObserver) {}
}

/// Told the outcome of each renewal: `"ok"` or `"failed"`.
pub type RenewalObserver = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;

/// A fixed bearer token (`--token`), typically a Kubernetes service-account token.
pub struct StaticToken(Secret);

impl StaticToken {
    pub fn new(token: Secret) -> Self {
        StaticToken(token)
    }
}

impl CredentialSource for StaticToken {
    fn token(&self) -> TokenFuture<'_> {
        let t = self.0.clone();
        Box::pin(async move { Ok(t) })
    }

    fn describe(&self) -> String {
        "--token".into()
    }
}

/// A token read from a file and re-read periodically, so projected service-account tokens
/// (which the kubelet rotates) keep working.
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Secret, Instant)>>,
}

/// Projected tokens rotate at 80% of their (at least 10 minute) lifetime; a minute is fresh enough.
const REREAD: Duration = Duration::from_secs(60);

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        TokenFile {
            path,
            cached: Mutex::new(None),
        }
    }

    fn read(&self) -> Result<Secret, CredentialError> {
        let fail = |reason: BoxError| CredentialError::unavailable(self.describe(), reason);
        let text = std::fs::read_to_string(&self.path).map_err(|e| fail(e.into()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(fail("file is empty".into()));
        }
        Ok(Secret::new(token))
    }
}

impl CredentialSource for TokenFile {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((token, at)) = cached.as_ref() {
                if at.elapsed() < REREAD {
                    return Ok(token.clone());
                }
            }
            match self.read() {
                Ok(token) => {
                    *cached = Some((token.clone(), Instant::now()));
                    Ok(token)
                }
                // A file briefly missing during rotation must not fail requests that the
                // previous token still serves.
                Err(e) => match cached.as_ref() {
                    Some((token, _)) => {
                        tracing::warn!(error = %e, "re-reading token file failed; keeping the previous token");
                        Ok(token.clone())
                    }
                    None => Err(e),
                },
            }
        })
    }

    fn describe(&self) -> String {
        format!("token file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_file_is_read_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = TokenFile::new(path.clone());
        let err = source.token().await.unwrap_err().to_string();
        assert!(err.contains("token file"), "{err}");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(source.token().await.unwrap().expose(), "abc");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.token().await.unwrap().expose(), "abc");
    }
}

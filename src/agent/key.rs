//! The agent's relay key, kept current with its `--key-file` so the relay's keys can be rotated
//! without restarting the agent.
//!
//! A Kubernetes Secret volume updates by swapping a symlink, which file-change notifications
//! do not reliably report, so the file is compared by content: every [`POLL_INTERVAL`], just
//! before each (re)connect and token renewal, and after every refusal by the relay. A new valid
//! key is used for every token minted from then on; channels already open keep running until
//! the relay closes them. A file that stops parsing leaves the previous key in use and is
//! reported once per bad content, never echoing what it holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::tunnel::http::error_chain;
use crate::tunnel::sas::{KeyFileError, SasKey};

/// How often the file is compared: a rotated key reaches every agent within seconds, and a
/// read of a small file costs nothing.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

pub struct KeySource {
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Bumped whenever the key changes, so a listener backing off after a refusal retries at
    /// once with the new key.
    generation: watch::Sender<u64>,
    refusals: AtomicU64,
}

struct State {
    key: SasKey,
    /// The file's content when last read, usable or not; `None` before the first read.
    content: Option<Vec<u8>>,
    /// The last problem reported, so a file that stays broken is reported once.
    problem: Option<String>,
}

impl KeySource {
    /// A key that never changes (tests, embedding).
    pub fn fixed(key: SasKey) -> KeySource {
        KeySource::new(None, key)
    }

    /// The key in `path`, read now: a file unusable at start is an error.
    pub fn from_file(path: &Path) -> Result<KeySource, KeyFileError> {
        let key = SasKey::from_file(path)?;
        Ok(KeySource::new(Some(path.to_path_buf()), key))
    }

    /// `key`, already read from `path`, kept current with it.
    pub fn watching(path: &Path, key: SasKey) -> KeySource {
        KeySource::new(Some(path.to_path_buf()), key)
    }

    fn new(path: Option<PathBuf>, key: SasKey) -> KeySource {
        KeySource {
            path,
            state: Mutex::new(State {
                key,
                content: None,
                problem: None,
            }),
            generation: watch::channel(0).0,
            refusals: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The key to mint the next token with.
    pub fn current(&self) -> SasKey {
        self.state().key.clone()
    }

    /// Re-reads the file; true when the key changed. Problems are logged, not returned: the
    /// previous key stays in use.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let content = match std::fs::read(path) {
            Ok(content) => content,
            Err(source) => {
                let e = KeyFileError::Read {
                    path: path.clone(),
                    source,
                };
                self.report(error_chain(&e));
                return false;
            }
        };
        let mut state = self.state();
        if state.content.as_deref() == Some(&content[..]) {
            return false;
        }
        state.content = Some(content.clone());
        let parsed = std::str::from_utf8(&content)
            .map_err(|_| crate::tunnel::sas::KeyFormatError::Incomplete)
            .and_then(SasKey::parse)
            .map_err(|source| KeyFileError::Format {
                path: path.clone(),
                source,
            });
        match parsed {
            Ok(key) => {
                state.problem = None;
                if key.name == state.key.name && key.key.expose() == state.key.key.expose() {
                    return false;
                }
                tracing::info!(key_file = %path.display(), key_name = %key.name, previous_key_name = %state.key.name, "the relay key file changed: new listen tokens and reconnects use the new key");
                state.key = key;
                drop(state);
                self.generation.send_modify(|g| *g += 1);
                true
            }
            Err(e) => {
                drop(state);
                self.report(error_chain(&e));
                false
            }
        }
    }

    fn report(&self, problem: String) {
        let mut state = self.state();
        if state.problem.as_deref() == Some(&problem) {
            return;
        }
        tracing::error!(error = %problem, key_name = %state.key.name, "the relay key file cannot be used; the agent keeps using the key it has. Fix the file (SharedAccessKeyName=<rule>;SharedAccessKey=<key>)");
        state.problem = Some(problem);
    }

    /// The relay refused a token minted with the current key: counted, and the file re-read
    /// in case it was rotated.
    pub fn refused(&self) -> bool {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        self.reload()
    }

    /// How many times the relay refused this agent's tokens.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// A receiver that sees every change of the key from now on.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Compares the file every `interval` until `shutdown`.
    pub async fn watch(&self, interval: Duration, shutdown: CancellationToken) {
        if self.path.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.reload(); }
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: &str) -> String {
        format!("SharedAccessKeyName={name};SharedAccessKey={secret}")
    }

    #[test]
    fn a_changed_file_changes_the_key_and_a_broken_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("listen.key");
        std::fs::write(&path, key("listen", "first-key-0123456789")).unwrap();
        let source = KeySource::from_file(&path).unwrap();
        let changes = source.changes();
        assert!(!source.reload(), "the same content is no change");

        std::fs::write(&path, key("listen", "second-key-0123456789")).unwrap();
        assert!(source.reload());
        assert_eq!(source.current().key.expose(), "second-key-0123456789");
        assert!(changes.has_changed().unwrap());

        std::fs::write(&path, "not a key").unwrap();
        assert!(!source.reload());
        assert_eq!(source.current().key.expose(), "second-key-0123456789");

        std::fs::remove_file(&path).unwrap();
        assert!(!source.reload());
        assert_eq!(source.current().key.expose(), "second-key-0123456789");

        std::fs::write(&path, key("listen2", "third-key-0123456789")).unwrap();
        assert!(source.refused());
        assert_eq!(source.current().name, "listen2");
        assert_eq!(source.refusals(), 1);
    }

    #[test]
    fn a_fixed_key_never_changes() {
        let source = KeySource::fixed(SasKey::parse(&key("l", "k-0123456789")).unwrap());
        assert!(!source.reload());
        assert!(source.path().is_none());
    }
}

//! The cluster registry as the relay holds it: the durable store, the workers that do its
//! blocking file I/O off the runtime threads, and who validates Entra callers of the
//! management API.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::caller::EntraCallers;
use super::error::ApiError;
use super::store::{self, StoreError};
use crate::entra::validate::Validator;
use crate::relay::rule::Rule;

/// Management calls doing file I/O at once. Each holds a thread of tokio's blocking pool (which
/// file reads and DNS share) while it waits for redb's single writer and its fsync; more than
/// a few only queue there, so the rest wait here, on the runtime, without a thread.
const STORE_WORKERS: usize = 8;
/// How long a call waits for a worker before it is answered 503: longer than a burst of
/// fsyncs takes, short enough that a client's own timeout has not given up first.
const STORE_WAIT: Duration = Duration::from_secs(30);

pub struct Registry {
    pub(super) store: store::Store,
    workers: Arc<Semaphore>,
    /// Validates Entra callers; `None` when only admin keys may call.
    pub(super) entra: Option<EntraCallers>,
}

impl Registry {
    /// A registry whose Entra callers need tokens for `entra`'s audience (never ARM's).
    pub fn open(path: &Path, entra: Option<Validator>) -> Result<Registry, StoreError> {
        Registry::open_with(path, entra.map(EntraCallers::from))
    }

    pub fn open_with(path: &Path, entra: Option<EntraCallers>) -> Result<Registry, StoreError> {
        Ok(Registry {
            store: store::Store::open(path)?,
            workers: Arc::new(Semaphore::new(STORE_WORKERS)),
            entra,
        })
    }

    /// The registry in a NATS key-value bucket shared by relay replicas (see `kv`); its watch
    /// lives until `shutdown`.
    pub async fn open_nats(
        kv: super::kv::Kv,
        entra: Option<EntraCallers>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Registry, StoreError> {
        Ok(Registry {
            store: store::Store::open_nats(kv, shutdown).await?,
            workers: Arc::new(Semaphore::new(STORE_WORKERS)),
            entra,
        })
    }

    pub fn rule(&self, name: &str) -> Option<Rule> {
        self.store.rule(name)
    }

    /// Changes whenever a registration's rules or keys change (see [`store::Store::changes`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.changes()
    }

    /// Runs `f`, which reads or writes the store, on a blocking worker; the caller's task only
    /// awaits it, so no runtime thread waits for the file and no lock is held across the await.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(store::Store) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(STORE_WAIT, self.workers.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::Busy(STORE_WAIT))?
            // The semaphore is never closed; were it ever, callers would be told "busy".
            .map_err(|_| ApiError::Busy(STORE_WAIT))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(store)
        })
        .await
        .map_err(ApiError::Worker)
    }
}

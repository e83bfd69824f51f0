//! The connected-cluster registry the relay serves: an ARM-shaped management API
//! (`Microsoft.Kubernetes/connectedClusters`), its durable store, who may call it, and the
//! per-cluster keys that make `listClusterUserCredential` hand out Send tokens for one
//! cluster only.

mod api;
mod caller;
mod store;

/// Where it was before it moved to `arm`; `onboard` still names it here.
pub use crate::arm::agent_key;
pub(crate) use api::handle;
pub use caller::Caller;
pub use store::{Record, StoreError};

use std::path::Path;
use std::time::Duration;

use crate::entra::validate::Validator;
use crate::relay::config::Rule;

/// A cluster whose agent has not reported for this long is Offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(5 * 60);
/// ... and after this long its credential has lapsed: Expired, and no more user tokens.
pub const EXPIRED_AFTER: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of the Send tokens `listClusterUserCredential` mints.
pub const USER_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub struct Registry {
    store: store::Store,
    /// Validates Entra callers; `None` when only admin keys may call.
    entra: Option<Validator>,
}

impl Registry {
    pub fn open(path: &Path, entra: Option<Validator>) -> Result<Registry, StoreError> {
        Ok(Registry {
            store: store::Store::open(path)?,
            entra,
        })
    }

    pub fn rule(&self, name: &str) -> Option<Rule> {
        self.store.rule(name)
    }
}

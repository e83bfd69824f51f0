//! The cluster registry as the relay holds it: the durable store and who validates Entra
//! callers of the management API.

use std::path::Path;

use super::store::{self, StoreError};
use crate::entra::validate::Validator;
use crate::relay::rule::Rule;

pub struct Registry {
    pub(super) store: store::Store,
    /// Validates Entra callers; `None` when only admin keys may call.
    pub(super) entra: Option<Validator>,
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

//! The connected-cluster registry the relay serves: an ARM-shaped management API
//! (`Microsoft.Kubernetes/connectedClusters`), its durable store, who may call it, and the
//! per-cluster keys that make `listClusterUserCredential` hand out Send tokens for one
//! cluster only.

mod api;
mod caller;
mod registry;
mod store;

pub(crate) use api::handle;
pub use caller::Caller;
pub use registry::Registry;
pub use store::{Record, StoreError};

/// Where it was before it moved to `arm`; `onboard` still names it here.
pub use crate::arm::agent_key;

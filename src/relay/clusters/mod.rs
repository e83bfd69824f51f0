//! The connected-cluster registry the relay serves: an ARM-shaped management API
//! (`Microsoft.Kubernetes/connectedClusters`), its durable store, who may call it, and the
//! per-cluster keys that make `listClusterUserCredential` hand out Send tokens for one
//! cluster only.
//!
//! `api` routes each method and path to a handler (`handlers`, `report`, `extensions`); `error` is every
//! refusal and the one place that turns it into ARM's error body.

mod api;
mod caller;
mod error;
mod extensions;
mod handlers;
pub mod kv;
mod path;
mod registry;
mod reply;
mod report;
mod store;
mod view;

pub(crate) use api::handle;
pub use caller::{arm_audiences_of, is_arm_audience, Caller, EntraCallers, ARM_AUDIENCES};
pub use handlers::USER_TOKEN_TTL;
pub use registry::Registry;
pub use store::{Record, StoreError};
pub use view::{EXPIRED_AFTER, OFFLINE_AFTER};

/// Where it was before it moved to `arm`; `onboard` still names it here.
pub use crate::arm::agent_key;

//! Azure Key Vault secrets, keys and certificates delivered to a cluster and to files, the way
//! the Key Vault Secrets Provider extension (Secrets Store CSI driver with the Azure provider)
//! does it, without a CSI driver: from wherever clusterconnect runs.
//!
//! - [`keyvault`]: the REST client (API 7.4), with the bearer challenge, throttling retries and
//!   errors that name the missing role;
//! - [`pem`]: turning what Key Vault returns (JWK public keys, PKCS#12 bundles) into PEM;
//! - [`provider_class`]: reading a `SecretProviderClass` (provider `azure`);
//! - [`credential`]: which Entra credential signs in to the vault, built from the proxy's chain
//!   once the vault's challenge has named tenant and resource;
//! - [`sync`]: one pass: fetch every object, write files ([`mount`]) and Kubernetes Secrets;
//! - [`rotation`]: the pass repeated on an interval, keeping the last good values.

pub mod credential;
pub mod keyvault;
pub mod mount;
pub mod pem;
pub mod provider_class;
pub mod rotation;
pub mod sync;

pub use keyvault::{Fetched, KeyVaultClient, KeyVaultError, ObjectRef, ObjectType};
pub use provider_class::{ObjectSpec, ProviderClass};

//! The connected-cluster resource as Azure Resource Manager shapes it
//! (`Microsoft.Kubernetes/connectedClusters`), so `az`-style habits, scripts and `--query`
//! paths carry over. The relay serves it; `connect`, `list`, `show` and `proxy -n -g` call it.
//! The cluster's extension (`Microsoft.KubernetesConfiguration/extensions`) lives under it.

pub mod client;
mod extension;
mod report;
mod resource;

pub use extension::{
    check_extension_name, extension_path, ClusterScope, Extension, ExtensionProperties,
    ExtensionRequest, ExtensionScope, ExtensionStatus, EXTENSION_RESOURCE_TYPE,
    KEY_VAULT_EXTENSION_TYPE,
};
pub use report::{
    agent_key, signed_message, AgentKeyError, AgentStatus, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
pub use resource::{
    AccessKeys, AgentCredential, ClusterId, ClusterRequest, ConnectedCluster, ConnectivityStatus,
    CredentialResults, ErrorDetail, ErrorResponse, HybridConnectionConfig, IdError, Identity,
    Properties, RequestProperties, SystemData, API_VERSION, CLUSTER_USER_ROLE,
    DEFAULT_SUBSCRIPTION, RESOURCE_TYPE,
};

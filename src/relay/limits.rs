//! The relay's limits: how long and how much a caller may take before and after it
//! authenticates. Settings with defaults, documented in the README's security section.

use std::time::Duration;

/// Azure Relay's documented quotas, as settings with Azure's values (or ours, where Azure
/// documents none) as defaults. Each refusal names the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Azure Relay allows 25 listeners per hybrid connection and refuses the 26th.
    pub max_listeners_per_connection: usize,
    /// A listener's token may not ask for more than this; the control channel closes (1008)
    /// when its token lapses, so this bounds how long a listener holds on without renewing.
    pub max_listener_token_lifetime: Duration,
    /// `sb-hc-id` values longer than this are refused (Azure's ids are GUIDs plus a suffix).
    pub max_id_len: usize,
    /// The PROXY header (when configured) and the TLS handshake together, and then each
    /// request's headers (an idle keep-alive connection included), must complete within this.
    pub handshake_timeout: Duration,
    /// A management API request, body included, must be answered within this.
    pub request_timeout: Duration,
    /// Connections not yet authenticated (in TLS, headers, or a management API call).
    pub max_unauthenticated: usize,
    /// Of those, from one source address.
    pub max_unauthenticated_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_listeners_per_connection: 25,
            max_listener_token_lifetime: Duration::from_secs(24 * 3600),
            max_id_len: 128,
            handshake_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(10),
            max_unauthenticated: 4096,
            max_unauthenticated_per_ip: 64,
        }
    }
}

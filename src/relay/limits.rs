//! The relay's limits: how long and how much a caller may take before and after it
//! authenticates. Settings with defaults, documented in the README's security section.

use std::time::Duration;

/// 64 KiB: the tunnel's own messages (`tunnel::ws_stream`) are at most 64 KiB, so one read
/// and one write move a whole one; two per rendezvous keeps 10,000 of them under 1.3 GiB.
pub const DEFAULT_SPLICE_BUFFER: usize = 64 * 1024;

/// The most a request's line and headers may take (more: 431). A SAS token is a few hundred
/// bytes and an Entra token with its groups a few KiB; hyper's own default (about 400 KiB)
/// would let each unauthenticated connection pin that much of the relay's memory.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;

/// Requests one connection may carry before the relay closes it after the answer: a client
/// that sends requests ahead without reading the answers gets at most this many.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 100;

/// The shortest `ipv6_prefix_len` accepted: a /32 is a whole provider's allocation, and any
/// shorter would put unrelated networks in one share.
pub const MIN_IPV6_PREFIX_LEN: u8 = 32;

/// The largest `splice_buffer` accepted from configuration.
pub const MAX_SPLICE_BUFFER: usize = 1024 * 1024;

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
    /// IPv6 sources count as one address per network of this prefix length: one host
    /// usually has a whole /64 to pick addresses from, so counting each address alone would
    /// give it 2^64 shares of `max_unauthenticated_per_ip`.
    pub ipv6_prefix_len: u8,
    /// Bytes of buffer per direction of a rendezvous: frames stream through it, so this (twice
    /// per rendezvous) is all the payload memory a rendezvous holds, whatever its messages'
    /// sizes. Larger moves bulk data in fewer writes; at least `splice::MIN_BUFFER`.
    pub splice_buffer: usize,
    /// Rendezvous open at once (waiting for an accept or spliced) with one sender token: a
    /// leaked or shared token cannot take every slot of the relay.
    pub max_rendezvous_per_token: usize,
    /// Rendezvous open at once through one listener; a busy listener is skipped for the next
    /// of its hybrid connection, as the agent itself caps its streams (`agent --max-streams`).
    pub max_rendezvous_per_listener: usize,
    /// An HTTP request relayed to a listener (`hc_http`): how long the listener may take for
    /// its whole response head once it has the request, and then each pause in its response
    /// body; and each pause in the sender's upload. Azure Relay's 60 s.
    pub http_idle: Duration,
    /// On SIGTERM, after the listening socket closes and listeners are told to go (1012),
    /// how long open rendezvous may take to finish before they are closed.
    pub drain: Duration,
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
            ipv6_prefix_len: 64,
            splice_buffer: DEFAULT_SPLICE_BUFFER,
            max_rendezvous_per_token: 1024,
            // Short: a single relay accepts nothing new while it drains, and its replacement
            // (Recreate) starts only after it exits. Replicas behind one name can afford more.
            drain: Duration::from_secs(10),
            max_rendezvous_per_listener: 4096,
            http_idle: Duration::from_secs(60),
        }
    }
}

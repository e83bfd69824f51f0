//! Keep-alive timing for every long-lived connection of the tunnel, defined once so that the
//! two ends of a control channel and of a pooled HTTP/2 connection agree.
//!
//! Proxies and load balancers on 443 commonly drop connections that are silent for 60 s or
//! more (the official Azure Relay SDK's 3.5-minute keep-alive is too slow for them), so we ping
//! every 30 s. A peer is declared dead after two and a half intervals of silence: one lost
//! ping is tolerated, two are not.

use std::time::Duration;

/// How often an idle control channel or HTTP/2 connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// Silence after which a control channel's peer is considered gone.
pub const DEAD_PEER: Duration = Duration::from_secs(75);

/// How long an HTTP/2 ping may go unanswered before the connection is closed. Shorter than
/// the interval so a dead connection is noticed before the next ping is due.
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

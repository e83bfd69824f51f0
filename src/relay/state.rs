//! What every connection handler shares: the relay's names and rules, the cluster registry,
//! the rendezvous table, the counters, and the shutdown signals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clusters::Registry;
use super::limits::Limits;
use super::rendezvous::Rendezvous;
use super::rule::{Grant, Rule, RuleSet};

/// Counters an operator (and a test) can read: how many rendezvous were made and are open,
/// and how many listeners are connected; and the Prometheus metrics (`metrics`), registered
/// when the relay serves them.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub rendezvous_total: AtomicU64,
    pub rendezvous_open: AtomicU64,
    /// Listener control channels open now.
    pub listeners_open: AtomicU64,
    pub metrics: crate::metrics::RelayMetrics,
}

impl RelayStats {
    /// Stats that also count into `metrics`.
    pub fn with_metrics(metrics: crate::metrics::RelayMetrics) -> RelayStats {
        RelayStats {
            metrics,
            ..RelayStats::default()
        }
    }

    pub fn total(&self) -> u64 {
        self.rendezvous_total.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> u64 {
        self.rendezvous_open.load(Ordering::Relaxed)
    }

    pub fn listeners(&self) -> u64 {
        self.listeners_open.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub(crate) struct Shared {
    pub hostnames: Arc<Vec<String>>,
    pub rules: RuleSet,
    pub clusters: Option<Arc<Registry>>,
    pub stats: Arc<RelayStats>,
    /// The port in rendezvous addresses: where clients reach this relay.
    pub public_port: u16,
    pub limits: Limits,
    /// The other replicas, when this relay is one of several (`[cluster]`).
    pub replicas: Option<Arc<super::replicas::Replicas>>,
}

impl Shared {
    /// The configured name a client used (matched case-insensitively, port ignored), else the
    /// first configured name: never a name the client made up.
    pub fn configured_host(&self, used: Option<&str>) -> &str {
        let used = used.map(|u| match u.parse::<http::uri::Authority>() {
            Ok(a) => a
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            Err(_) => u.to_string(),
        });
        let bare = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_string();
        self.hostnames
            .iter()
            .find(|h| {
                used.as_deref()
                    .is_some_and(|u| bare(h).eq_ignore_ascii_case(u))
            })
            .or_else(|| self.hostnames.first())
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    /// `host[:port]` for rendezvous addresses of a listener that connected with `used`: a
    /// replica always names itself, since the shared name may lead to another replica.
    pub fn rendezvous_authority(&self, used: Option<&str>) -> String {
        if let Some(replicas) = &self.replicas {
            return replicas.me().to_string();
        }
        let host = self.configured_host(used);
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        if self.public_port == 443 {
            host
        } else {
            format!("{host}:{}", self.public_port)
        }
    }

    /// A SAS rule by name: configured rules first, then the registered clusters' own.
    pub fn rule(&self, name: &str) -> Option<Rule> {
        if let Some(rule) = self.rules.find(name) {
            return Some(rule);
        }
        self.clusters.as_ref()?.rule(name)
    }

    /// Whether what `grant` allowed is still allowed: its rule exists and still has its key.
    pub fn still_authorized(&self, grant: &Grant) -> bool {
        self.rule(&grant.rule)
            .is_some_and(|r| r.still_grants(grant))
    }

    /// Changes of the configuration's rules and the registry's, which may revoke grants.
    pub fn rule_changes(&self) -> RuleChanges {
        RuleChanges {
            config: self.rules.changes(),
            registry: self.clusters.as_ref().map(|c| c.changes()),
        }
    }
}

/// Where rules change: the configuration (reloaded) and the registry.
pub struct RuleChanges {
    config: tokio::sync::watch::Receiver<u64>,
    registry: Option<tokio::sync::watch::Receiver<u64>>,
}

/// Waits for the next rule change.
pub async fn rule_changed(changes: &mut RuleChanges) {
    // A closed channel never changes again: its branch waits forever.
    let config = async {
        if changes.config.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    let registry = async {
        let open = match &mut changes.registry {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !open {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = config => {}
        () = registry => {}
    }
}

#[derive(Clone)]
pub(crate) struct Ctx {
    pub shared: Shared,
    pub rendezvous: Rendezvous,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Cancelled when the drain period is over: open rendezvous are then closed.
    pub closing: CancellationToken,
    /// `max_connections` slots, taken only after authentication by each listener and each
    /// side of a rendezvous, and held for as long as that connection lives.
    pub slots: Arc<Semaphore>,
    /// Rendezvous open per sender token (a digest of it), under `max_rendezvous_per_token`.
    pub per_token: super::gauge::Gauges<[u8; 32]>,
    /// The unauthenticated connections' books.
    pub admission: super::admission::Admission,
}

impl Ctx {
    /// A slot for an authenticated long-lived connection, or `None` when the relay is full.
    pub fn slot(&self) -> Option<Arc<OwnedSemaphorePermit>> {
        self.slots.clone().try_acquire_owned().ok().map(Arc::new)
    }
}

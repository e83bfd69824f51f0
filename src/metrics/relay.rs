//! The relay's metrics: who is connected, how rendezvous go, what crosses, what is refused.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::{Label, LATENCY_BUCKETS};

#[derive(Clone, Debug)]
pub struct RelayMetrics {
    /// Listener control channels open.
    pub listeners: Gauge,
    /// Rendezvous spliced now.
    pub tunnels: Gauge,
    accepts: Family<Label, Counter>,
    /// From a sender's request to its listener's accept.
    pub accept_duration: Histogram,
    pub sender_to_listener: Counter,
    pub listener_to_sender: Counter,
    auth_failures: Family<Label, Counter>,
    limit_hits: Family<Label, Counter>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        RelayMetrics {
            listeners: Gauge::default(),
            tunnels: Gauge::default(),
            accepts: Family::default(),
            accept_duration: Histogram::new(LATENCY_BUCKETS),
            sender_to_listener: Counter::default(),
            listener_to_sender: Counter::default(),
            auth_failures: Family::default(),
            limit_hits: Family::default(),
        }
    }
}

impl RelayMetrics {
    /// Fresh metrics, registered under `clusterconnect_relay_`.
    pub fn register(registry: &mut Registry) -> RelayMetrics {
        let m = RelayMetrics::default();
        let r = registry.sub_registry_with_prefix("relay");
        r.register(
            "listeners",
            "Listener control channels connected",
            m.listeners.clone(),
        );
        r.register(
            "tunnels",
            "Rendezvous open (a sender spliced to a listener)",
            m.tunnels.clone(),
        );
        r.register(
            "accepts",
            "Senders by outcome: accepted, rejected (by the listener), no_listener, busy, timeout, dropped",
            m.accepts.clone(),
        );
        r.register_with_unit(
            "accept_duration",
            "Time from a sender's request to its listener's accept",
            Unit::Seconds,
            m.accept_duration.clone(),
        );
        let bytes = Family::<Label, Counter>::default();
        let m = RelayMetrics {
            sender_to_listener: bytes.get_or_create_owned(&[("direction", "sender_to_listener")]),
            listener_to_sender: bytes.get_or_create_owned(&[("direction", "listener_to_sender")]),
            ..m
        };
        // Named with its unit already: "bytes" with `Unit::Bytes` would read bytes_bytes.
        r.register("bytes", "Payload bytes spliced, by direction", bytes);
        r.register(
            "auth_failures",
            "Requests refused for their token, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "limit_hits",
            "Requests or connections refused at a limit, by limit",
            m.limit_hits.clone(),
        );
        m
    }

    /// `accepted`, `rejected`, `no_listener`, `busy`, `timeout` or `dropped`.
    pub fn accept(&self, result: &'static str) {
        self.accepts.get_or_create(&[("result", result)]).inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The limit by its configuration name (`max_connections`, ...).
    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&[("limit", limit)]).inc();
    }
}

//! The agent's metrics: its control channels and tunnel streams, the requests it forwards to
//! the apiserver, sessions, bytes, token renewals and refusals.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Label;

/// Requests by verb and status class.
pub type VerbCode = [(&'static str, &'static str); 2];

#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// Listener control channels connected to the relay.
    pub listeners: Gauge,
    /// Tunnel streams (rendezvous) open.
    pub tunnels: Gauge,
    requests: Family<VerbCode, Counter>,
    sessions_total: Family<Label, Counter>,
    /// Exec, attach and port-forward sessions open.
    pub sessions: Gauge,
    /// Bytes from the relay (the proxy's requests) and to it.
    pub received: Counter,
    pub sent: Counter,
    token_renewals: Family<Label, Counter>,
    auth_failures: Family<Label, Counter>,
}

impl AgentMetrics {
    /// Fresh metrics, registered under `clusterconnect_agent_`.
    pub fn register(registry: &mut Registry) -> AgentMetrics {
        let m = AgentMetrics::default();
        let r = registry.sub_registry_with_prefix("agent");
        r.register(
            "listeners",
            "Listener control channels connected to the relay",
            m.listeners.clone(),
        );
        r.register(
            "tunnels",
            "Tunnel streams (rendezvous) open",
            m.tunnels.clone(),
        );
        r.register(
            "requests",
            "Requests forwarded to the apiserver, by Kubernetes verb and status class",
            m.requests.clone(),
        );
        r.register(
            "sessions",
            "Exec, attach and port-forward sessions started, by kind",
            m.sessions_total.clone(),
        );
        r.register(
            "open_sessions",
            "Exec, attach and port-forward sessions open",
            m.sessions.clone(),
        );
        let bytes = Family::<Label, Counter>::default();
        let m = AgentMetrics {
            received: bytes.get_or_create_owned(&[("direction", "received")]),
            sent: bytes.get_or_create_owned(&[("direction", "sent")]),
            ..m
        };
        // Named with its unit already: "bytes" with `Unit::Bytes` would read bytes_bytes.
        r.register(
            "bytes",
            "Bytes through tunnel streams: received from the relay, sent to it",
            bytes,
        );
        r.register(
            "token_renewals",
            "Listen token renewals sent to the relay, by result",
            m.token_renewals.clone(),
        );
        r.register(
            "auth_failures",
            "Refusals: callers the agent turned away and listen tokens the relay refused, by reason",
            m.auth_failures.clone(),
        );
        m
    }

    pub fn request(&self, verb: &'static str, code: u16) {
        self.requests
            .get_or_create(&[("verb", verb), ("code", super::status_class(code))])
            .inc();
    }

    /// A session started; it stays on the open gauge while the returned value lives.
    pub fn session(&self, kind: &'static str) -> super::Open {
        self.sessions_total.get_or_create(&[("kind", kind)]).inc();
        super::Open::new(&self.sessions)
    }

    /// `ok` or `failed`.
    pub fn token_renewal(&self, result: &'static str) {
        self.token_renewals
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }
}

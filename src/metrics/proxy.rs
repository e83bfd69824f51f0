//! The proxy's metrics, per configured cluster (a handful, chosen by whoever runs the proxy):
//! kubectl's requests, sessions, the tunnels opened for them, and credential renewals.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::LATENCY_BUCKETS;

type Labels<const N: usize> = [(&'static str, String); N];

#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    requests: Family<Labels<3>, Counter>,
    request_duration: Family<Labels<1>, Histogram>,
    sessions_total: Family<Labels<2>, Counter>,
    /// Exec, attach and port-forward sessions open.
    pub sessions: Gauge,
    tunnels_opened: Family<Labels<1>, Counter>,
    tunnel_failures: Family<Labels<2>, Counter>,
    token_renewals: Family<Labels<1>, Counter>,
    auth_failures: Family<Labels<1>, Counter>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            sessions_total: Family::default(),
            sessions: Gauge::default(),
            tunnels_opened: Family::default(),
            tunnel_failures: Family::default(),
            token_renewals: Family::default(),
            auth_failures: Family::default(),
        }
    }
}

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl ProxyMetrics {
    /// Fresh metrics, registered under `clusterconnect_proxy_`.
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics::default();
        let r = registry.sub_registry_with_prefix("proxy");
        r.register(
            "requests",
            "kubectl requests, by cluster, Kubernetes verb and status class",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from kubectl's request to the response headers, by cluster",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register(
            "sessions",
            "Exec, attach and port-forward sessions started, by cluster and kind",
            m.sessions_total.clone(),
        );
        r.register(
            "open_sessions",
            "Exec, attach and port-forward sessions open",
            m.sessions.clone(),
        );
        r.register(
            "tunnels_opened",
            "Tunnels (rendezvous through the relay) opened, by cluster",
            m.tunnels_opened.clone(),
        );
        r.register(
            "tunnel_failures",
            "Tunnels that could not be opened, by cluster and reason",
            m.tunnel_failures.clone(),
        );
        r.register(
            "token_renewals",
            "Credential renewals (Entra tokens, issued send tokens), by result",
            m.token_renewals.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused, by reason: local_credential (not the kubeconfig this proxy wrote), apiserver (401 from the cluster), relay (send token refused)",
            m.auth_failures.clone(),
        );
        m
    }

    pub fn request(&self, cluster: &str, verb: &'static str, code: u16, elapsed: f64) {
        self.requests
            .get_or_create(&[
                ("cluster", cluster.to_string()),
                ("verb", verb.to_string()),
                ("code", super::status_class(code).to_string()),
            ])
            .inc();
        self.request_duration
            .get_or_create(&[("cluster", cluster.to_string())])
            .observe(elapsed);
    }

    /// A session started; it stays on the open gauge while the returned value lives.
    pub fn session(&self, cluster: &str, kind: &'static str) -> super::Open {
        self.sessions_total
            .get_or_create(&[("cluster", cluster.to_string()), ("kind", kind.to_string())])
            .inc();
        super::Open::new(&self.sessions)
    }

    pub fn tunnel_opened(&self, cluster: &str) {
        self.tunnels_opened
            .get_or_create(&[("cluster", cluster.to_string())])
            .inc();
    }

    /// `no_listener`, `refused`, `rejected`, `connect` or `other`.
    pub fn tunnel_failed(&self, cluster: &str, reason: &'static str) {
        self.tunnel_failures
            .get_or_create(&[
                ("cluster", cluster.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// `ok` or `failed`.
    pub fn token_renewal(&self, result: &'static str) {
        self.token_renewals
            .get_or_create(&[("result", result.to_string())])
            .inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason.to_string())])
            .inc();
    }
}

//! Leader election through a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: the holder renews `renewTime` every [`RENEW_EVERY`]; another
//! replica takes the Lease over once it has not seen the record change for
//! `leaseDurationSeconds`. Every write carries the resourceVersion it read, so two replicas
//! never both win.
//!
//! Time is judged on the local monotonic clock only, never by comparing another node's
//! `renewTime` with ours (clock skew would let a candidate take a live Lease): a candidate
//! notes when it first saw the current (holder, renewTime), and the holder counts its term
//! from when it *started* its last successful renew. The holder gives up once
//! [`LEASE_DURATION`] − [`RENEW_MARGIN`] has passed since then, and every request is bounded
//! by that deadline, so a hung renew cannot keep it leading after the others may take over.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

/// How long a Lease holds without renewal (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a candidate retries.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// The holder stops leading this long before a candidate could take the Lease over, to cover
/// the time its reconciles take to stop.
pub const RENEW_MARGIN: Duration = Duration::from_secs(3);
/// A candidate's Lease read or write that takes longer than this is abandoned (it retries).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Until when a holder that started a successful acquire or renew at `start` may lead.
pub fn leading_deadline(start: Instant) -> Instant {
    start + LEASE_DURATION - RENEW_MARGIN
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {namespace}/{name}")]
    Request {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Lease {namespace}/{name}: the apiserver did not answer in time")]
    TimedOut { namespace: String, name: String },
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    observed: Mutex<Option<Observed>>,
}

/// The Lease record as this replica last saw it, and when (on the local clock) it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    holder: String,
    renew_time: String,
    at: Instant,
}

/// Records what was read at `now`; whether the holder (someone else) let it lapse: the record
/// has not changed for `duration` since this replica first saw it.
fn observe(
    seen: &mut Option<Observed>,
    holder: &str,
    renew_time: &str,
    duration: Duration,
    now: Instant,
) -> bool {
    let changed = seen
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
    if changed {
        *seen = Some(Observed {
            holder: holder.to_string(),
            renew_time: renew_time.to_string(),
            at: now,
        });
    }
    seen.as_ref()
        .is_some_and(|o| now.saturating_duration_since(o.at) >= duration)
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::from(SystemTime::now());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Request {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Takes or renews the Lease; `Ok(true)` while this replica holds it. Gives up with
    /// [`LeaseError`] (timed out) at `deadline`.
    pub async fn try_acquire_or_renew_by(&self, deadline: Instant) -> Result<bool, LeaseError> {
        match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
            Ok(result) => result,
            Err(_) => Err(LeaseError::TimedOut {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            }),
        }
    }

    /// Takes or renews the Lease; `Ok(true)` while this replica holds it.
    async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        let now = now_rfc3339();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error(e))?;
        let Some(current) = current else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": LEASE_DURATION.as_secs(),
                    "acquireTime": now, "renewTime": now, "leaseTransitions": 0,
                },
            }))
            .map_err(|e| self.error(kube::Error::SerdeError(e)))?;
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.error(e)),
            };
        };
        let mut value =
            serde_json::to_value(&current).map_err(|e| self.error(kube::Error::SerdeError(e)))?;
        let spec = &value["spec"];
        let holder = spec["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let duration = spec["leaseDurationSeconds"]
            .as_u64()
            .map_or(LEASE_DURATION, Duration::from_secs);
        let renew_time = spec["renewTime"].as_str().unwrap_or_default().to_string();
        let expired = {
            let mut seen = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            observe(&mut seen, &holder, &renew_time, duration, Instant::now())
        };
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0) + 1;
            value["spec"]["leaseTransitions"] = json!(transitions);
            value["spec"]["acquireTime"] = json!(now);
            value["spec"]["holderIdentity"] = json!(self.identity);
            tracing::info!(lease = %self.name, previous = %holder, "taking over the leader Lease");
        }
        value["spec"]["renewTime"] = json!(now);
        value["spec"]["leaseDurationSeconds"] = json!(LEASE_DURATION.as_secs());
        let lease: Lease =
            serde_json::from_value(value).map_err(|e| self.error(kube::Error::SerdeError(e)))?;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote it first: they hold it now.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Gives the Lease up on shutdown, so the other replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Ok(mut value) = serde_json::to_value(&current) else {
            return;
        };
        if value["spec"]["holderIdentity"].as_str() != Some(self.identity.as_str()) {
            return;
        }
        value["spec"]["holderIdentity"] = json!("");
        value["spec"]["renewTime"] = serde_json::Value::Null;
        if let Ok(lease) = serde_json::from_value::<Lease>(value) {
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_by_when_the_record_last_changed_locally() {
        let t0 = Instant::now();
        let d = LEASE_DURATION;
        let mut seen = None;
        // A renewTime far in the past by our clock (skewed node) is not expired on first sight.
        assert!(!observe(&mut seen, "a", "2000-01-01T00:00:00Z", d, t0));
        assert!(!observe(
            &mut seen,
            "a",
            "2000-01-01T00:00:00Z",
            d,
            t0 + d - Duration::from_millis(1)
        ));
        // Renewed (the record changed): the clock starts again.
        assert!(!observe(&mut seen, "a", "2000-01-01T00:00:02Z", d, t0 + d));
        assert!(!observe(
            &mut seen,
            "a",
            "2000-01-01T00:00:02Z",
            d,
            t0 + d + d / 2
        ));
        assert!(observe(
            &mut seen,
            "a",
            "2000-01-01T00:00:02Z",
            d,
            t0 + d + d
        ));
        // A renewTime far in the future (skew the other way) still lapses locally.
        let mut seen = None;
        assert!(!observe(&mut seen, "b", "2999-01-01T00:00:00Z", d, t0));
        assert!(observe(&mut seen, "b", "2999-01-01T00:00:00Z", d, t0 + d));
        // A new holder is a change.
        assert!(!observe(&mut seen, "c", "2999-01-01T00:00:00Z", d, t0 + d));
    }

    #[test]
    fn the_holder_gives_up_before_a_candidate_may_take_over() {
        let start = Instant::now();
        assert!(leading_deadline(start) < start + LEASE_DURATION);
        assert!(leading_deadline(start) > start + RENEW_EVERY * 2);
    }
}

//! Leader election through a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: the holder renews `renewTime` every [`RENEW_EVERY`]; another
//! replica takes the Lease over once it has not been renewed for `leaseDurationSeconds`. Every
//! write carries the resourceVersion it read, so two replicas never both win.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

/// How long a Lease holds without renewal (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a candidate retries.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("Lease {namespace}/{name}")]
pub struct LeaseError {
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::from(SystemTime::now());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_time(value: &serde_json::Value) -> Option<SystemTime> {
    let text = value.as_str()?;
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::from(t))
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Takes or renews the Lease; `Ok(true)` while this replica holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
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
        let renewed = parse_time(&spec["renewTime"]).unwrap_or(SystemTime::UNIX_EPOCH);
        let expired = renewed + duration < SystemTime::now();
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

//! Waiting for the agent Deployment to roll out, by the rules `kubectl rollout status` uses:
//! the controller has seen the latest generation, every replica runs the new template, no
//! old replica is left, and the new ones are available. Bounded by the caller's timeout,
//! with each change of progress reported as it happens.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

/// Polling is plenty for a wait measured in seconds to minutes, and needs no watch
/// permission beyond `get`.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("the agent deployment {namespace}/{name} did not become available within {}: {last}. Check `kubectl -n {namespace} describe deploy/{name}` and `kubectl -n {namespace} logs deploy/{name}` (image pull, pod security or SCC admission, the relay's reachability from the cluster); the registration is kept, so running connect again resumes", humantime::format_duration(*timeout))]
    Timeout {
        namespace: String,
        name: String,
        timeout: Duration,
        last: String,
    },
    #[error("the agent deployment {namespace}/{name} failed to roll out: {reason}. Check `kubectl -n {namespace} describe deploy/{name}`")]
    Failed {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("the agent deployment {namespace}/{name} disappeared while waiting for it; was it deleted? Run connect again")]
    Gone { namespace: String, name: String },
    #[error("reading the agent deployment {namespace}/{name}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum State {
    Done,
    /// Still rolling out; the text says how far.
    Waiting(String),
    /// The controller gave up (progress deadline exceeded).
    Failed(String),
}

/// Where a Deployment's rollout stands.
pub fn state(deployment: &Deployment) -> State {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let Some(status) = &deployment.status else {
        return State::Waiting(format!("0/{wanted} available (not started yet)"));
    };
    let failed = status.conditions.iter().flatten().find(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if let Some(condition) = failed {
        return State::Failed(
            condition
                .message
                .clone()
                .unwrap_or_else(|| "progress deadline exceeded".into()),
        );
    }
    let available = status.available_replicas.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return State::Waiting(format!(
            "{available}/{wanted} available (the controller has not seen the new spec yet)"
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    if updated < wanted {
        return State::Waiting(format!(
            "{available}/{wanted} available, {updated}/{wanted} updated"
        ));
    }
    if total > updated {
        return State::Waiting(format!(
            "{available}/{wanted} available, {} old replicas terminating",
            total - updated
        ));
    }
    if available < updated {
        return State::Waiting(format!("{available}/{wanted} available"));
    }
    State::Done
}

/// Waits until `name` has rolled out, calling `report` with each new progress text.
pub async fn wait(
    api: &Api<Deployment>,
    namespace: &str,
    name: &str,
    timeout: Duration,
    mut report: impl FnMut(&str),
) -> Result<(), RolloutError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no status read yet");
    loop {
        let read = tokio::time::timeout_at(deadline, api.get_opt(name)).await;
        let deployment = match read {
            Err(_) => break,
            Ok(Err(source)) => {
                return Err(RolloutError::Kube {
                    namespace: namespace.into(),
                    name: name.into(),
                    source,
                })
            }
            Ok(Ok(None)) => {
                return Err(RolloutError::Gone {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            Ok(Ok(Some(d))) => d,
        };
        match state(&deployment) {
            State::Done => return Ok(()),
            State::Failed(reason) => {
                return Err(RolloutError::Failed {
                    namespace: namespace.into(),
                    name: name.into(),
                    reason,
                })
            }
            State::Waiting(progress) => {
                if progress != last {
                    report(&progress);
                    last = progress;
                }
            }
        }
        if tokio::time::Instant::now() + POLL_INTERVAL >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(RolloutError::Timeout {
        namespace: namespace.into(),
        name: name.into(),
        timeout,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(status: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "generation": 2},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rollout_states_follow_kubectl_rollout_status() {
        let d = deployment(
            serde_json::json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert!(matches!(state(&d), State::Waiting(s) if s.contains("not seen")));
        let d = deployment(
            serde_json::json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
        );
        assert_eq!(state(&d), State::Waiting("1/2 available".into()));
        let d = deployment(
            serde_json::json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert!(matches!(state(&d), State::Waiting(s) if s.contains("old replicas")));
        let d = deployment(
            serde_json::json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert_eq!(state(&d), State::Done);
        let d = deployment(serde_json::json!({"conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"a-1\" has timed out progressing."}
        ]}));
        assert!(matches!(state(&d), State::Failed(s) if s.contains("timed out")));
    }
}

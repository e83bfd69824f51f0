//! What the controller tells the user about each class: Kubernetes Events on the class
//! (`kubectl describe secretproviderclass`, `kubectl get events`) and a `SecretSyncStatus` of
//! the same name and namespace (`kubectl get secretsyncstatuses -o yaml`), since the upstream
//! class has no status of its own a real apiserver would keep. Neither ever holds a value:
//! object names, versions and Secret names only.

use std::time::SystemTime;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use super::manifests::{managed_labels, STATUS_GROUP, STATUS_KIND, STATUS_PLURAL};
use crate::tunnel::http::error_chain;

pub const COMPONENT: &str = "clusterconnect-akv-controller";

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::from(SystemTime::now())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn status_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(STATUS_GROUP, "v1", STATUS_KIND),
        STATUS_PLURAL,
    )
}

/// The class an event or status is about.
#[derive(Clone, Debug)]
pub struct ClassRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub api_version: String,
    pub resource_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Normal,
    Warning,
}

/// The Event's name: one per (class, level, reason), so a repeated report updates the same
/// Event (its count and lastTimestamp) rather than adding another, as client-go's event
/// aggregation does. The class's uid is part of it: a new class of the same name starts afresh.
pub fn event_name(class: &ClassRef, level: Level, reason: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}\n{level:?}\n{reason}", class.uid).as_bytes());
    let suffix: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // Names are at most 253 characters; a class name is too (and ASCII, but cut safely).
    let mut cut = class.name.len().min(253 - 17);
    while !class.name.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = class.name[..cut].trim_end_matches(['.', '-']);
    format!("{prefix}.{suffix}")
}

/// Records an Event on the class, or counts it again on the Event already recorded for the
/// same reason; failures are logged, never fatal.
pub async fn event(
    client: &kube::Client,
    class: &ClassRef,
    level: Level,
    reason: &str,
    message: &str,
) {
    let api: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &class.namespace);
    let now = now_rfc3339();
    let kind = match level {
        Level::Normal => "Normal",
        Level::Warning => "Warning",
    };
    let name = event_name(class, level, reason);
    let message = crate::secret::clip(message, 1000);
    let result = match api.get_opt(&name).await {
        Ok(Some(existing)) => {
            let count = existing.count.unwrap_or(1).saturating_add(1);
            let patch = json!({
                "count": count, "lastTimestamp": now, "message": message,
                "involvedObject": {"resourceVersion": class.resource_version},
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
        Ok(None) => {
            let event = json!({
                "metadata": {"name": name, "namespace": class.namespace},
                "involvedObject": {
                    "apiVersion": class.api_version, "kind": "SecretProviderClass",
                    "name": class.name, "namespace": class.namespace, "uid": class.uid,
                    "resourceVersion": class.resource_version,
                },
                "reason": reason,
                "message": message,
                "type": kind,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": std::env::var("POD_NAME").unwrap_or_default(),
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            });
            match serde_json::from_value(event) {
                // 409: recorded meanwhile by the other replica: once is enough.
                Ok(event) => match api.create(&PostParams::default(), &event).await {
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    other => other.map(|_| ()),
                },
                Err(e) => Err(kube::Error::SerdeError(e)),
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(class = %class.name, namespace = %class.namespace, reason, error = %error_chain(&e), "cannot record an Event");
    }
}

/// Writes the class's status object (creating it on first use); failures are logged.
pub async fn status(client: &kube::Client, class: &ClassRef, status: Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &class.namespace, &status_resource());
    let mut object = json!({
        "apiVersion": format!("{STATUS_GROUP}/v1"), "kind": STATUS_KIND,
        "metadata": {
            "name": class.name, "namespace": class.namespace,
            "labels": managed_labels(),
            "ownerReferences": [{
                "apiVersion": class.api_version, "kind": "SecretProviderClass",
                "name": class.name, "uid": class.uid,
            }],
        },
        "status": status,
    });
    let result = match api.get_opt(&class.name).await {
        Ok(Some(existing)) => {
            // A failed pass does not forget which Secrets the class wrote: the finalizer
            // removes those too (see `recorded_secrets`).
            if object["status"].get("secrets").is_none() {
                if let Some(previous) = existing.data.get("status").and_then(|s| s.get("secrets")) {
                    object["status"]["secrets"] = previous.clone();
                }
            }
            if serde_json::to_value(&existing)
                .ok()
                .map(|v| v["status"].clone())
                == Some(object["status"].clone())
            {
                return;
            }
            object["metadata"]["resourceVersion"] = json!(existing.metadata.resource_version);
            match serde_json::from_value::<DynamicObject>(object) {
                Ok(o) => api
                    .replace(&class.name, &PostParams::default(), &o)
                    .await
                    .map(|_| ()),
                Err(e) => Err(kube::Error::SerdeError(e)),
            }
        }
        Ok(None) => match serde_json::from_value::<DynamicObject>(object) {
            Ok(o) => api.create(&PostParams::default(), &o).await.map(|_| ()),
            Err(e) => Err(kube::Error::SerdeError(e)),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(class = %class.name, namespace = %class.namespace, error = %error_chain(&e), "cannot write the SecretSyncStatus");
    }
}

/// The Secret names the class's status object records (`None`: there is no status object).
pub async fn recorded_secrets(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &status_resource());
    Ok(api
        .get_opt(name)
        .await?
        .map(|o| secret_names(&o.data))
        .unwrap_or_default())
}

fn secret_names(data: &Value) -> Vec<String> {
    data.get("status")
        .and_then(|s| s.get("secrets"))
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the class's status object with the class.
pub async fn remove_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &status_resource());
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, uid: &str) -> ClassRef {
        ClassRef {
            namespace: "apps".into(),
            name: name.into(),
            uid: uid.into(),
            api_version: "secrets-store.csi.x-k8s.io/v1".into(),
            resource_version: "1".into(),
        }
    }

    #[test]
    fn one_event_per_class_and_reason() {
        let a = class("app", "u1");
        let name = event_name(&a, Level::Warning, "SyncFailed");
        // The same report again: the same Event, counted again rather than a new one.
        assert_eq!(name, event_name(&a, Level::Warning, "SyncFailed"));
        assert!(
            name.starts_with("app.") && name.len() == "app.".len() + 16,
            "{name}"
        );
        assert_ne!(name, event_name(&a, Level::Warning, "KeptLastGoodContent"));
        assert_ne!(name, event_name(&a, Level::Normal, "SyncFailed"));
        assert_ne!(
            name,
            event_name(&class("app", "u2"), Level::Warning, "SyncFailed")
        );
        let long = class(&"x".repeat(253), "u1");
        assert!(event_name(&long, Level::Normal, "SecretSynced").len() <= 253);
    }
}

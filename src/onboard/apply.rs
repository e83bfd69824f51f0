//! Create-or-update of one object, the way `kubectl apply --server-side` does it (field
//! manager "clusterconnect", conflicts forced), with two additions the installer needs:
//! an object that already holds everything asked for is not written at all (so a re-run
//! leaves resourceVersions alone), and an object of the same name that clusterconnect did
//! not create is refused instead of taken over.

use std::fmt::Debug;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::manifests::{MANAGED_BY, MANAGED_BY_LABEL};

pub const FIELD_MANAGER: &str = "clusterconnect";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{kind} {name}")]
    Kube {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{kind} {name} exists and was not created by clusterconnect (no {MANAGED_BY_LABEL}={MANAGED_BY} label), perhaps by Azure Arc's own agents; remove it (`az connectedk8s delete`, or kubectl delete) or install into another --namespace")]
    NotManaged { kind: String, name: String },
    #[error("{kind} has no name")]
    Unnamed { kind: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// How an existing object is compared with the desired one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Top-level fields that must match exactly rather than contain what is asked for (a
    /// Secret's `data`, where a key that should be gone must go).
    pub exact: &'static [&'static str],
}

fn kind_of<K: Resource>() -> String
where
    K::DynamicType: Default,
{
    K::kind(&K::DynamicType::default()).into_owned()
}

fn display_name<K: Resource>(object: &K) -> String {
    match object.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", object.name_any()),
        None => object.name_any(),
    }
}

pub fn is_managed<K: Resource>(object: &K) -> bool {
    object
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY)
}

/// Applies `desired` through `api` (scoped to its namespace, if any).
pub async fn apply<K>(api: &Api<K>, desired: &K, policy: Policy) -> Result<Outcome, ApplyError>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let kind = kind_of::<K>();
    let name = desired
        .meta()
        .name
        .clone()
        .ok_or_else(|| ApplyError::Unnamed { kind: kind.clone() })?;
    let failed = |source: kube::Error| ApplyError::Kube {
        kind: kind.clone(),
        name: display_name(desired),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(failed)?;
    if let Some(existing) = &existing {
        if !is_managed(existing) {
            return Err(ApplyError::NotManaged {
                kind,
                name: display_name(desired),
            });
        }
        let (want, have) = (to_value(desired), to_value(existing));
        if contains(&want, &have, policy.exact) {
            return Ok(Outcome::Unchanged);
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(desired))
        .await
        .map_err(failed)?;
    Ok(if existing.is_some() {
        Outcome::Updated
    } else {
        Outcome::Created
    })
}

fn to_value<T: Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Whether `have` already holds everything in `want`: objects key by key (extra keys in
/// `have`, such as defaults the apiserver filled in, are fine), lists element by element
/// with the same length, scalars equal. The top-level fields in `exact` must be equal.
pub fn contains(want: &Value, have: &Value, exact: &[&str]) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, v)| {
            let other = h.get(k).unwrap_or(&Value::Null);
            if exact.contains(&k.as_str()) {
                v == other
            } else {
                v.is_null() || contains(v, other, &[])
            }
        }),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| contains(a, b, &[]))
        }
        (w, h) => w == h,
    }
}

/// Deletes one object; `Ok(false)` when it was already gone.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Result<bool, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(ApplyError::Kube {
            kind: kind_of::<K>(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Reads one object; `None` when it does not exist.
pub async fn get<K>(api: &Api<K>, name: &str) -> Result<Option<K>, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    api.get_opt(name).await.map_err(|source| ApplyError::Kube {
        kind: kind_of::<K>(),
        name: name.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_the_server_adds_do_not_count_as_a_change() {
        let want = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "a", "args": ["x"]}]}}});
        let have = json!({"spec": {"replicas": 2, "strategy": {}, "template": {"containers": [{"name": "a", "args": ["x"], "imagePullPolicy": "IfNotPresent"}]}}, "status": {}});
        assert!(contains(&want, &have, &[]));
        let changed = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "a", "args": ["x", "y"]}]}}});
        assert!(!contains(&changed, &have, &[]));
    }

    #[test]
    fn exact_fields_notice_a_removed_key() {
        let want = json!({"data": {"a": "1"}});
        let have = json!({"data": {"a": "1", "stale": "2"}});
        assert!(contains(&want, &have, &[]));
        assert!(!contains(&want, &have, &["data"]));
    }
}

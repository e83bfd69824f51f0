//! The cluster side of `extension create|update|show|delete`, through the user's kubeconfig as
//! `connect` does it: apply the manifests (CRDs only when absent), wait for the controller,
//! check what is really there (`show` reports a deleted Deployment instead of hiding it), and
//! remove exactly what was installed, keeping the CRDs.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use super::controller::{provider_class_resource, FINALIZER};
use super::manifests::{
    self, installed_by, ExtensionSpec, Manifests, CONTROLLER_NAME, PROVIDER_NAME, SPC_CRD,
};
use crate::arm::ExtensionStatus;
use crate::onboard::apply::{self, ApplyError, Policy};
use crate::onboard::manifests::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::onboard::rollout::{self, State};
use crate::tunnel::http::error_chain;

const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the controller Deployment {namespace}/{CONTROLLER_NAME} did not become available within {}: {last}; check `kubectl -n {namespace} describe deploy/{CONTROLLER_NAME}`", humantime::format_duration(*timeout))]
    Rollout {
        namespace: String,
        timeout: Duration,
        last: String,
    },
    #[error(
        "the controller Deployment {namespace}/{CONTROLLER_NAME} failed to roll out: {reason}"
    )]
    RolloutFailed { namespace: String, reason: String },
}

fn kind_name<K: Resource<DynamicType = ()>>(object: &K) -> String {
    match object.meta().namespace.as_deref() {
        Some(ns) => format!("{} {ns}/{}", K::kind(&()), object.name_any()),
        None => format!("{} {}", K::kind(&()), object.name_any()),
    }
}

async fn put<K>(api: Api<K>, object: &K, log: &mut dyn FnMut(&str)) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let outcome = apply::apply(&api, object, Policy::default()).await?;
    log(&format!("{} {}", kind_name(object), outcome.as_str()));
    Ok(())
}

/// Creates a CRD that is absent; one that exists (the upstream driver's, or ours) is kept.
async fn ensure_crd(
    client: &Client,
    crd: &CustomResourceDefinition,
    log: &mut dyn FnMut(&str),
) -> Result<(), ApplyError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    if apply::get(&api, &name).await?.is_some() {
        log(&format!("CustomResourceDefinition {name} present"));
        return Ok(());
    }
    match api.create(&PostParams::default(), crd).await {
        Ok(_) => {
            log(&format!("CustomResourceDefinition {name} created"));
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(ApplyError::Kube {
            kind: "CustomResourceDefinition".into(),
            name,
            source,
        }),
    }
}

/// Applies everything and waits up to `timeout` for the controller to be available.
pub async fn install(
    client: &Client,
    spec: &ExtensionSpec,
    timeout: Duration,
    log: &mut dyn FnMut(&str),
) -> Result<(), InstallError> {
    let m: Manifests = manifests::build(spec);
    ensure_namespace(client, &spec.namespace, log).await?;
    for crd in &m.crds {
        ensure_crd(client, crd, log).await?;
    }
    let ns = spec.namespace.as_str();
    let c = || client.clone();
    put(Api::namespaced(c(), ns), &m.service_account, log).await?;
    put(Api::all(c()), &m.cluster_role, log).await?;
    put(Api::all(c()), &m.cluster_role_binding, log).await?;
    put(Api::namespaced(c(), ns), &m.role, log).await?;
    put(Api::namespaced(c(), ns), &m.role_binding, log).await?;
    put(Api::namespaced(c(), ns), &m.deployment, log).await?;
    let id = spec.cluster_id.as_str();
    match &m.provider {
        Some((sa, ds)) => {
            put(Api::namespaced(c(), ns), sa, log).await?;
            put(Api::namespaced(c(), ns), ds, log).await?;
        }
        None => {
            // csi.enabled turned off: what an earlier create installed goes.
            remove_one::<DaemonSet>(Api::namespaced(c(), ns), PROVIDER_NAME, id, log).await?;
            remove_one::<ServiceAccount>(Api::namespaced(c(), ns), PROVIDER_NAME, id, log).await?;
        }
    }
    wait_for_controller(client, &spec.namespace, timeout, log).await
}

/// The release namespace is created when missing (as a Helm release's would be) and never
/// deleted: other things may live there by the time the extension goes.
async fn ensure_namespace(
    client: &Client,
    namespace: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(), ApplyError> {
    let api: Api<Namespace> = Api::all(client.clone());
    if apply::get(&api, namespace).await?.is_some() {
        return Ok(());
    }
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
    }))
    .map_err(|e| ApplyError::Kube {
        kind: "Namespace".into(),
        name: namespace.into(),
        source: kube::Error::SerdeError(e),
    })?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {
            log(&format!("Namespace {namespace} created"));
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(ApplyError::Kube {
            kind: "Namespace".into(),
            name: namespace.into(),
            source,
        }),
    }
}

async fn wait_for_controller(
    client: &Client,
    namespace: &str,
    timeout: Duration,
    log: &mut dyn FnMut(&str),
) -> Result<(), InstallError> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("not read yet");
    loop {
        if let Some(d) = apply::get(&api, CONTROLLER_NAME).await? {
            match rollout::state(&d) {
                State::Done => {
                    log(&format!(
                        "Deployment {namespace}/{CONTROLLER_NAME} available"
                    ));
                    return Ok(());
                }
                State::Failed(reason) => {
                    return Err(InstallError::RolloutFailed {
                        namespace: namespace.into(),
                        reason,
                    })
                }
                State::Waiting(progress) => {
                    if progress != last {
                        log(&format!("waiting for the controller: {progress}"));
                        last = progress;
                    }
                }
            }
        }
        if tokio::time::Instant::now() + POLL >= deadline {
            return Err(InstallError::Rollout {
                namespace: namespace.into(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What `show` finds in the cluster.
#[derive(Debug, Default)]
pub struct Health {
    pub statuses: Vec<ExtensionStatus>,
    /// Something the extension needs is missing or broken.
    pub failed: bool,
}

impl Health {
    fn add(&mut self, code: &str, level: &str, message: String) {
        if level == "Error" {
            self.failed = true;
        }
        self.statuses.push(ExtensionStatus {
            code: code.to_string(),
            display_status: match level {
                "Error" => "Failed",
                "Warning" => "Degraded",
                _ => "Healthy",
            }
            .to_string(),
            level: level.to_string(),
            message,
            time: super::report::now_rfc3339(),
        });
    }

    /// One line for `errorInfo`, naming everything that is wrong.
    pub fn error_message(&self) -> Option<String> {
        let errors: Vec<&str> = self
            .statuses
            .iter()
            .filter(|s| s.level == "Error")
            .map(|s| s.message.as_str())
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

async fn present<K>(api: Api<K>, name: &str, cluster_id: &str) -> Result<Option<K>, ApplyError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(apply::get(&api, name)
        .await?
        .filter(|o| installed_by(o, cluster_id)))
}

/// Checks every object the extension installed, the controller's rollout and its leader.
pub async fn check(client: &Client, spec: &ExtensionSpec) -> Result<Health, ApplyError> {
    let mut health = Health::default();
    let ns = spec.namespace.as_str();
    let id = spec.cluster_id.as_str();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    if apply::get(&crds, SPC_CRD).await?.is_none() {
        health.add(
            "CustomResourceDefinitionMissing",
            "Error",
            format!("CustomResourceDefinition {SPC_CRD} is missing"),
        );
    }
    let mut missing = Vec::new();
    if present::<ServiceAccount>(Api::namespaced(client.clone(), ns), CONTROLLER_NAME, id)
        .await?
        .is_none()
    {
        missing.push(format!("ServiceAccount {ns}/{CONTROLLER_NAME}"));
    }
    if present::<ClusterRole>(Api::all(client.clone()), CONTROLLER_NAME, id)
        .await?
        .is_none()
    {
        missing.push(format!("ClusterRole {CONTROLLER_NAME}"));
    }
    if present::<ClusterRoleBinding>(Api::all(client.clone()), CONTROLLER_NAME, id)
        .await?
        .is_none()
    {
        missing.push(format!("ClusterRoleBinding {CONTROLLER_NAME}"));
    }
    if present::<Role>(Api::namespaced(client.clone(), ns), CONTROLLER_NAME, id)
        .await?
        .is_none()
    {
        missing.push(format!("Role {ns}/{CONTROLLER_NAME}"));
    }
    if present::<RoleBinding>(Api::namespaced(client.clone(), ns), CONTROLLER_NAME, id)
        .await?
        .is_none()
    {
        missing.push(format!("RoleBinding {ns}/{CONTROLLER_NAME}"));
    }
    match present::<Deployment>(Api::namespaced(client.clone(), ns), CONTROLLER_NAME, id).await? {
        None => missing.push(format!("Deployment {ns}/{CONTROLLER_NAME}")),
        Some(d) => match rollout::state(&d) {
            State::Done => {
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                health.add(
                    "ControllerAvailable",
                    "Information",
                    format!("Deployment {ns}/{CONTROLLER_NAME}: {ready} replica(s) available"),
                );
            }
            State::Waiting(progress) => health.add(
                "ControllerNotAvailable",
                "Warning",
                format!("Deployment {ns}/{CONTROLLER_NAME}: {progress}"),
            ),
            State::Failed(reason) => health.add(
                "ControllerRolloutFailed",
                "Error",
                format!("Deployment {ns}/{CONTROLLER_NAME}: {reason}"),
            ),
        },
    }
    if spec.csi {
        if present::<ServiceAccount>(Api::namespaced(client.clone(), ns), PROVIDER_NAME, id)
            .await?
            .is_none()
        {
            missing.push(format!("ServiceAccount {ns}/{PROVIDER_NAME}"));
        }
        match present::<DaemonSet>(Api::namespaced(client.clone(), ns), PROVIDER_NAME, id).await? {
            None => missing.push(format!("DaemonSet {ns}/{PROVIDER_NAME}")),
            Some(ds) => {
                let status = ds.status.unwrap_or_default();
                health.add(
                    "ProviderScheduled",
                    "Information",
                    format!(
                        "DaemonSet {ns}/{PROVIDER_NAME}: {}/{} ready",
                        status.number_ready, status.desired_number_scheduled
                    ),
                );
            }
        }
    }
    for object in &missing {
        health.add(
            "ResourceMissing",
            "Error",
            format!("{object} is missing; run `clusterconnect extension update` to restore it"),
        );
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    match apply::get(&leases, CONTROLLER_NAME).await {
        Ok(Some(lease)) => {
            let holder = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default();
            let spec = lease.spec.unwrap_or_default();
            let age = spec
                .renew_time
                .map(|t| std::time::SystemTime::from(t.0))
                .and_then(|t| t.elapsed().ok());
            let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
            match age {
                _ if holder.is_empty() => {
                    health.add("NoLeader", "Warning", "no controller replica leads".into())
                }
                Some(age) if age.as_secs() > duration => health.add(
                    "LeaderStale",
                    "Warning",
                    format!(
                        "controller {holder} has not renewed Lease {ns}/{CONTROLLER_NAME} for {}s; are its pods running?",
                        age.as_secs()
                    ),
                ),
                _ => health.add("Leader", "Information", format!("controller {holder} leads")),
            }
        }
        Ok(None) => health.add(
            "NoLeader",
            "Warning",
            format!("no controller replica has taken Lease {ns}/{CONTROLLER_NAME} yet"),
        ),
        Err(e) => health.add("LeaseUnreadable", "Warning", error_chain(&e)),
    }
    Ok(health)
}

async fn remove_one<K>(
    api: Api<K>,
    name: &str,
    cluster_id: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = apply::get(&api, name).await? else {
        return Ok(());
    };
    if !installed_by(&object, cluster_id) {
        log(&format!(
            "{} kept: not installed by this extension",
            kind_name(&object)
        ));
        return Ok(());
    }
    if apply::delete(&api, name).await? {
        log(&format!("{} deleted", kind_name(&object)));
    }
    Ok(())
}

/// Removes what `install` installed (the CRDs stay, with every class and status object), and
/// takes the controller's finalizer off every class, which no one would remove any more.
pub async fn remove(
    client: &Client,
    spec: &ExtensionSpec,
    log: &mut dyn FnMut(&str),
) -> Result<(), ApplyError> {
    let ns = spec.namespace.as_str();
    let id = spec.cluster_id.as_str();
    remove_one::<DaemonSet>(Api::namespaced(client.clone(), ns), PROVIDER_NAME, id, log).await?;
    remove_one::<ServiceAccount>(Api::namespaced(client.clone(), ns), PROVIDER_NAME, id, log)
        .await?;
    remove_one::<Deployment>(
        Api::namespaced(client.clone(), ns),
        CONTROLLER_NAME,
        id,
        log,
    )
    .await?;
    remove_one::<RoleBinding>(
        Api::namespaced(client.clone(), ns),
        CONTROLLER_NAME,
        id,
        log,
    )
    .await?;
    remove_one::<Role>(
        Api::namespaced(client.clone(), ns),
        CONTROLLER_NAME,
        id,
        log,
    )
    .await?;
    remove_one::<ClusterRoleBinding>(Api::all(client.clone()), CONTROLLER_NAME, id, log).await?;
    remove_one::<ClusterRole>(Api::all(client.clone()), CONTROLLER_NAME, id, log).await?;
    remove_one::<ServiceAccount>(
        Api::namespaced(client.clone(), ns),
        CONTROLLER_NAME,
        id,
        log,
    )
    .await?;
    release_classes(client, log).await
}

async fn release_classes(client: &Client, log: &mut dyn FnMut(&str)) -> Result<(), ApplyError> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &provider_class_resource());
    let failed = |source| ApplyError::Kube {
        kind: "SecretProviderClass".into(),
        name: "(all)".into(),
        source,
    };
    let classes = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        // No CRD, no classes.
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(failed(e)),
    };
    for class in classes {
        let finalizers = class.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == FINALIZER) {
            continue;
        }
        let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
        let (namespace, name) = (
            class.metadata.namespace.clone().unwrap_or_default(),
            class.name_any(),
        );
        let namespaced: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &provider_class_resource());
        let patch = json!({"metadata": {"finalizers": rest}});
        namespaced
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(failed)?;
        log(&format!(
            "SecretProviderClass {namespace}/{name}: finalizer {FINALIZER} removed"
        ));
    }
    Ok(())
}

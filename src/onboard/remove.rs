//! `disconnect`: remove what `connect` installed and the registration, the way
//! `az connectedk8s delete` does. Parts already gone are fine; only objects whose ownership
//! annotations say `connect` created them for this registration are deleted, everything else
//! is left alone: a namespace the user had before connect stays, with all that is in it but
//! the agent's objects. A kubeconfig that points at a different cluster than the registration
//! is refused before anything is deleted.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret as KubeSecret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::{Api, Client};

use super::apply::{self, ApplyError};
use super::install::{local_and_registered, ConnectError};
use super::manifests::{created_for, AGENT_NAME};
use crate::arm::client::ManagementClient;
use crate::arm::ClusterId;

/// How often to look whether the namespace has finished terminating.
const NAMESPACE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct Removal {
    /// What was deleted, as `kind/name`.
    pub removed: Vec<String>,
    /// What was there but left alone, with why.
    pub kept: Vec<String>,
    /// Whether the namespace was still terminating when the wait ended.
    pub still_terminating: bool,
}

/// Removes the agent objects in `namespace` and the cluster-scoped RBAC, then the
/// registration; waits up to `timeout` for the namespace to finish terminating.
pub async fn disconnect(
    kube: &Client,
    registry: &ManagementClient,
    id: &ClusterId,
    namespace: &str,
    timeout: Duration,
) -> Result<Removal, ConnectError> {
    check_owner(kube, registry, id, namespace).await?;
    let mut removal = Removal::default();
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    let own_namespace = remove_namespaced(kube, id, namespace, &mut removal).await?;
    delete_owned(
        &Api::<ClusterRoleBinding>::all(kube.clone()),
        "clusterrolebinding",
        id,
        &mut removal,
    )
    .await?;
    delete_owned(
        &Api::<ClusterRole>::all(kube.clone()),
        "clusterrole",
        id,
        &mut removal,
    )
    .await?;
    if registry
        .delete(id)
        .await
        .map_err(|source| ConnectError::Registry {
            step: "deleting the registration",
            source,
        })?
    {
        removal.removed.push(format!("registration {}", id.path()));
    }
    if own_namespace {
        removal.still_terminating = !namespace_gone(&namespaces, namespace, timeout).await?;
    }
    Ok(removal)
}

/// Refuses, before anything is deleted, a kubeconfig whose cluster holds another
/// registration's key (or an unmanaged Secret), and a caller who does not own the
/// registration.
async fn check_owner(
    kube: &Client,
    registry: &ManagementClient,
    id: &ClusterId,
    namespace: &str,
) -> Result<(), ConnectError> {
    let (local, registered) = local_and_registered(kube, registry, namespace, id).await?;
    if let (Some(key), Some(reg)) = (&local, &registered) {
        if !key.matches(&reg.properties.agent_public_key_certificate) {
            return Err(ConnectError::RegisteredElsewhere {
                name: id.name.clone(),
                group: id.resource_group.clone(),
                location: format!("{namespace}/{AGENT_NAME}"),
            });
        }
    }
    // Only an owner may remove the registration (the Listen key is owner-only): check that
    // before the agent is taken out of the cluster, not after.
    if registered.is_some() {
        registry
            .list_agent_credential(id)
            .await
            .map_err(|source| ConnectError::Registry {
                step: "checking that you own the registration",
                source,
            })?;
    }
    Ok(())
}

/// Deletes the namespace when connect created it for this registration, else only the agent's
/// objects in it. Returns whether the namespace itself was connect's.
async fn remove_namespaced(
    kube: &Client,
    id: &ClusterId,
    namespace: &str,
    removal: &mut Removal,
) -> Result<bool, ApplyError> {
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    let ns_object = apply::get(&namespaces, namespace).await?;
    let own_namespace = ns_object
        .as_ref()
        .is_some_and(|ns| created_for(ns, &id.path()));
    if own_namespace {
        if apply::delete(&namespaces, namespace).await? {
            removal
                .removed
                .push(format!("namespace/{namespace} (and everything in it)"));
        }
    } else if ns_object.is_some() {
        // A namespace someone else made: take out only what connect put there.
        removal.kept.push(format!(
            "namespace/{namespace}: it was not created by clusterconnect connect"
        ));
        delete_owned(
            &Api::<Deployment>::namespaced(kube.clone(), namespace),
            "deployment",
            id,
            removal,
        )
        .await?;
        delete_owned(
            &Api::<KubeSecret>::namespaced(kube.clone(), namespace),
            "secret",
            id,
            removal,
        )
        .await?;
        delete_owned(
            &Api::<ServiceAccount>::namespaced(kube.clone(), namespace),
            "serviceaccount",
            id,
            removal,
        )
        .await?;
    }
    Ok(own_namespace)
}

/// Deletes `AGENT_NAME` of this kind when connect created it for this registration.
async fn delete_owned<K>(
    api: &Api<K>,
    kind: &str,
    id: &ClusterId,
    removal: &mut Removal,
) -> Result<(), ApplyError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let Some(object) = apply::get(api, AGENT_NAME).await? else {
        return Ok(());
    };
    if !created_for(&object, &id.path()) {
        removal.kept.push(format!(
            "{kind}/{AGENT_NAME}: it was not created by clusterconnect connect for this cluster"
        ));
    } else if apply::delete(api, AGENT_NAME).await? {
        removal.removed.push(format!("{kind}/{AGENT_NAME}"));
    }
    Ok(())
}

async fn namespace_gone(
    namespaces: &Api<Namespace>,
    name: &str,
    timeout: Duration,
) -> Result<bool, ApplyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if apply::get(namespaces, name).await?.is_none() {
            return Ok(true);
        }
        if tokio::time::Instant::now() + NAMESPACE_POLL > deadline {
            return Ok(false);
        }
        tokio::time::sleep(NAMESPACE_POLL).await;
    }
}

//! `connect`: register the cluster with the relay's registry and install the agent, the way
//! `az connectedk8s connect` does, re-runnable at any point.
//!
//! The agent key pair ties the two sides together. The private half lives in the cluster's
//! agent Secret; the registry holds the public half. A re-run reads the key back from the
//! Secret, so it registers the same key and rewrites nothing that is already right; a
//! registration holding some other key belongs to another cluster and is never taken over.
//!
//! A namespace is connect's only when connect created it (its ownership annotations say so).
//! One the user already had is refused unless the request allows it
//! ([`ConnectRequest::use_existing_namespace`]), and then it is used as is: never labelled,
//! annotated or, by `disconnect`, deleted.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret as KubeSecret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::{Api, Client, ResourceExt};

use super::apply::{self, is_managed, ApplyError, Outcome, Policy};
use super::keys::{AgentKey, KeyError};
use super::manifests::{
    self, created_for, AgentSpec, SecretContent, AGENT_KEY_FILE, AGENT_NAME, CLUSTER_ID_ANNOTATION,
};
use super::rollout::{self, RolloutError};
use crate::arm::client::{ArmError, ManagementClient};
use crate::arm::{
    ClusterId, ClusterRequest, ConnectedCluster, ConnectivityStatus, RequestProperties,
};
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{step} in the relay's registry")]
    Registry {
        step: &'static str,
        #[source]
        source: ArmError,
    },
    #[error("the connected cluster '{name}' in resource group '{group}' is already registered to another cluster (its agent key is not the one in {location}). Pick another name, or run `clusterconnect disconnect -n {name} -g {group}` against the cluster it belongs to")]
    RegisteredElsewhere {
        name: String,
        group: String,
        location: String,
    },
    #[error("this cluster is already connected as {existing} (Secret {location}); use that name and resource group, or run `clusterconnect disconnect` for it first")]
    ConnectedElsewhere { existing: String, location: String },
    #[error("namespace {namespace} already exists and was not created by `clusterconnect connect` for this cluster; to install the agent into it anyway pass --use-existing-namespace (the namespace and everything else in it are then left alone, by disconnect too), or choose another --namespace")]
    ExistingNamespace { namespace: String },
    #[error("the agent Secret {location} has no {AGENT_KEY_FILE}; delete the Secret (`kubectl -n {namespace} delete secret {AGENT_NAME}`) and run connect again")]
    KeyMissing { location: String, namespace: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
}

/// What `connect` was asked to do.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    pub id: ClusterId,
    pub location: String,
    pub tags: BTreeMap<String, String>,
    pub distribution: String,
    pub infrastructure: String,
    pub namespace: String,
    /// Install into `namespace` even when it exists and connect did not create it; it is then
    /// left as it is (not labelled, not annotated, not deleted by `disconnect`).
    pub use_existing_namespace: bool,
    pub image: String,
    pub tenants: Vec<String>,
    /// PEM of the CA the agent should trust for the relay.
    pub relay_ca: Option<String>,
    /// The tenants' cloud when not the public one (see [`manifests::AgentSpec::cloud`]).
    pub cloud: Option<crate::entra::CloudDefinition>,
    pub timeout: Duration,
}

/// The agent key from this cluster's Secret, if it has one; refuses a Secret that belongs to
/// another registration or was not made by clusterconnect.
pub async fn existing_key(
    secrets: &Api<KubeSecret>,
    namespace: &str,
    id: &ClusterId,
) -> Result<Option<AgentKey>, ConnectError> {
    let location = format!("{namespace}/{AGENT_NAME}");
    let Some(secret) = apply::get(secrets, AGENT_NAME).await? else {
        return Ok(None);
    };
    if !is_managed(&secret) {
        return Err(ApplyError::NotManaged {
            kind: "Secret".into(),
            name: location,
        }
        .into());
    }
    if let Some(existing) = secret.annotations().get(CLUSTER_ID_ANNOTATION) {
        if !existing.eq_ignore_ascii_case(&id.path()) {
            return Err(ConnectError::ConnectedElsewhere {
                existing: existing.clone(),
                location,
            });
        }
    }
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get(AGENT_KEY_FILE))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let Some(pem) = pem else {
        return Err(ConnectError::KeyMissing {
            location,
            namespace: namespace.to_string(),
        });
    };
    Ok(Some(AgentKey::from_pem(&pem, &location)?))
}

/// The manifests for `request` with placeholders instead of keys, for `--dry-run`: computed
/// locally, touching neither the cluster nor the registry.
/// With `use_existing_namespace` the namespace is the user's and not among them.
pub fn dry_run(request: &ConnectRequest, relay: &str) -> manifests::Manifests {
    manifests::build(
        &spec(
            request,
            relay,
            &request.id.hybrid_connection(),
            request.use_existing_namespace,
        ),
        &SecretContent::Placeholders,
    )
}

fn spec(
    request: &ConnectRequest,
    relay: &str,
    hybrid_connection: &str,
    existing_namespace: bool,
) -> AgentSpec {
    AgentSpec {
        namespace: request.namespace.clone(),
        image: request.image.clone(),
        relay: relay.to_string(),
        hybrid_connection: hybrid_connection.to_string(),
        cluster_id: request.id.path(),
        tenants: request.tenants.clone(),
        relay_ca: request.relay_ca.is_some(),
        cloud: request.cloud.clone(),
        existing_namespace,
    }
}

/// Whether the agent goes into a namespace the user already had (`true`: leave it as is) or
/// one connect creates or created for this registration (`false`). Refuses the user's
/// namespace unless the request allows it.
pub async fn existing_namespace(
    kube: &Client,
    request: &ConnectRequest,
) -> Result<bool, ConnectError> {
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    let Some(namespace) = apply::get(&namespaces, &request.namespace).await? else {
        return Ok(false);
    };
    if created_for(&namespace, &request.id.path()) {
        return Ok(false);
    }
    if request.use_existing_namespace {
        return Ok(true);
    }
    Err(ConnectError::ExistingNamespace {
        namespace: request.namespace.clone(),
    })
}

/// This cluster's agent key (from its Secret in `namespace`) and the registration, to compare
/// before anything changes. Refuses a Secret of another registration or an unmanaged one.
pub(crate) async fn local_and_registered(
    kube: &Client,
    registry: &ManagementClient,
    namespace: &str,
    id: &ClusterId,
) -> Result<(Option<AgentKey>, Option<ConnectedCluster>), ConnectError> {
    let secrets: Api<KubeSecret> = Api::namespaced(kube.clone(), namespace);
    let local = existing_key(&secrets, namespace, id).await?;
    let registered = registry
        .get(id)
        .await
        .map_err(|source| ConnectError::Registry {
            step: "looking up the cluster",
            source,
        })?;
    Ok((local, registered))
}

/// Registers the cluster, installs the agent, waits for it to roll out and returns the
/// registration. `progress` receives one line per step.
pub async fn connect(
    kube: &Client,
    registry: &ManagementClient,
    request: &ConnectRequest,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<ConnectedCluster, ConnectError> {
    let ns = request.namespace.as_str();
    let id = &request.id;
    // Before anything is registered or written.
    let existing_namespace = existing_namespace(kube, request).await?;
    let (local, registered) = local_and_registered(kube, registry, ns, id).await?;
    let key = choose_key(local, registered, request, progress)?;
    register(registry, request, &key).await?;
    progress(&format!("Registered {}", id.path()));
    let credential =
        registry
            .list_agent_credential(id)
            .await
            .map_err(|source| ConnectError::Registry {
                step: "fetching the agent's Listen credential",
                source,
            })?;
    let spec = spec(
        request,
        &credential.relay,
        &credential.hybrid_connection_name,
        existing_namespace,
    );
    let content = SecretContent::Keys {
        listen_key: Secret::new(credential.listen_key),
        agent_key: key.private_pem().clone(),
        relay_ca: request.relay_ca.clone(),
    };
    install(kube, &manifests::build(&spec, &content), progress).await?;
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), ns);
    rollout::wait(&deployments, ns, AGENT_NAME, request.timeout, |p| {
        progress(&format!("Waiting for the agent rollout: {p}"))
    })
    .await?;
    progress("The agent is available");
    read_back(registry, id).await
}

/// The agent key to register: this cluster's own, a new one, or none when the registration
/// belongs to another cluster.
fn choose_key(
    local: Option<AgentKey>,
    registered: Option<ConnectedCluster>,
    request: &ConnectRequest,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<AgentKey, ConnectError> {
    let id = &request.id;
    Ok(match (local, registered) {
        (Some(key), Some(reg)) if key.matches(&reg.properties.agent_public_key_certificate) => {
            progress("The cluster is registered with this cluster's agent key; updating");
            key
        }
        // No agent ever reported under this registration and this cluster holds no key: an
        // earlier `connect` stopped between registering and installing, and its key is gone.
        // Replace it (the registry lets only an owner do so) rather than strand the name.
        (None, Some(reg))
            if reg.properties.connectivity_status == ConnectivityStatus::Connecting =>
        {
            progress("The registration never had an agent report (an earlier connect did not finish); replacing its agent key");
            AgentKey::generate()?
        }
        (_, Some(_)) => {
            return Err(ConnectError::RegisteredElsewhere {
                name: id.name.clone(),
                group: id.resource_group.clone(),
                location: format!("{}/{AGENT_NAME}", request.namespace),
            })
        }
        (Some(key), None) => key,
        (None, None) => AgentKey::generate()?,
    })
}

/// Creates or updates the registration with `key`'s public half.
async fn register(
    registry: &ManagementClient,
    request: &ConnectRequest,
    key: &AgentKey,
) -> Result<(), ConnectError> {
    let body = ClusterRequest {
        location: request.location.clone(),
        tags: request.tags.clone(),
        properties: RequestProperties {
            agent_public_key_certificate: key.public_certificate().to_string(),
            distribution: Some(request.distribution.clone()),
            infrastructure: Some(request.infrastructure.clone()),
        },
    };
    registry
        .put(&request.id, &body)
        .await
        .map_err(|source| ConnectError::Registry {
            step: "registering the cluster",
            source,
        })?;
    Ok(())
}

/// The registration as the registry holds it once the agent is up.
async fn read_back(
    registry: &ManagementClient,
    id: &ClusterId,
) -> Result<ConnectedCluster, ConnectError> {
    let cluster = registry
        .get(id)
        .await
        .map_err(|source| ConnectError::Registry {
            step: "reading the registration back",
            source,
        })?;
    cluster.ok_or_else(|| ConnectError::Registry {
        step: "reading the registration back",
        source: ArmError::Refused {
            status: 404,
            code: "ResourceNotFound".into(),
            message: format!(
                "{} was deleted while connect ran; run connect again",
                id.path()
            ),
        },
    })
}

/// Applies the manifests in dependency order, reporting each object like `kubectl apply`.
/// Without a namespace among them, the user's namespace is used as it is.
pub async fn install(
    kube: &Client,
    m: &manifests::Manifests,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), ApplyError> {
    let ns = m.service_account.namespace().unwrap_or_default();
    let own = Policy::default();
    match &m.namespace {
        Some(namespace) => {
            let outcome =
                apply::apply(&Api::<Namespace>::all(kube.clone()), namespace, own).await?;
            progress(&format!("namespace/{ns} {}", outcome.as_str()));
        }
        None => progress(&format!(
            "namespace/{ns} exists and is not clusterconnect's: used as is"
        )),
    }
    let mut report = |kind: &str, name: &str, outcome: Outcome| {
        progress(&format!("{kind}/{name} {}", outcome.as_str()))
    };
    let outcome = apply::apply(
        &Api::<ServiceAccount>::namespaced(kube.clone(), &ns),
        &m.service_account,
        own,
    )
    .await?;
    report("serviceaccount", AGENT_NAME, outcome);
    let outcome =
        apply::apply(&Api::<ClusterRole>::all(kube.clone()), &m.cluster_role, own).await?;
    report("clusterrole", AGENT_NAME, outcome);
    let outcome = apply::apply(
        &Api::<ClusterRoleBinding>::all(kube.clone()),
        &m.cluster_role_binding,
        own,
    )
    .await?;
    report("clusterrolebinding", AGENT_NAME, outcome);
    let secret_policy = Policy { exact: &["data"] };
    let outcome = apply::apply(
        &Api::<KubeSecret>::namespaced(kube.clone(), &ns),
        &m.secret,
        secret_policy,
    )
    .await?;
    report("secret", AGENT_NAME, outcome);
    let outcome = apply::apply(
        &Api::<Deployment>::namespaced(kube.clone(), &ns),
        &m.deployment,
        own,
    )
    .await?;
    report("deployment", AGENT_NAME, outcome);
    Ok(())
}

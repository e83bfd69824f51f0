//! The controller the extension installs: SecretProviderClasses in every namespace into the
//! Kubernetes Secrets of their `secretObjects`, kept current, removed with their class.
//!
//! One replica leads (see [`super::leader`]); only the leader runs kube-rs's runtime
//! `Controller` over the classes (its watcher lists, watches, and lists again after a 410).
//! Each reconcile decides from the class's fingerprint (uid, generation, interval annotation)
//! and the class's next due time whether a pass is needed: a new or changed class, one being
//! deleted, or a rotation that is due; otherwise it only requeues for the due time.
//!
//! Per class: a finalizer is added first, so deleting the class waits until its Secrets are
//! gone (owner references would need kube-controller-manager's garbage collector). The
//! service principal of the namespace's `secrets-store-creds` Secret (labelled
//! `secrets-store.csi.k8s.io/used=true`) signs in when there is one, else the identity the class
//! opts in to (never the pod's own unasked). A pass fetches every object before it writes any Secret, so a Secret is
//! never partial; an object Key Vault fails to return keeps its last good content. Each pass
//! ends in an Event and the class's `SecretSyncStatus`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::Api;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::leader::{leading_deadline, Elector, RENEW_EVERY, REQUEST_TIMEOUT};
use super::manifests::SPC_GROUP;
use super::report::{self, ClassRef, Level};
use super::settings::{parse_interval, MAX_INTERVAL};
use super::vault::{ServicePrincipal, VaultAccess, CREDENTIALS_SECRET, USED_LABEL};
use crate::secrets::credential::read_credentials_secret;
use crate::secrets::sync::{class_owner, owned_by, Outcome, SecretTarget, Syncer, Targets};
use crate::secrets::ProviderClass;
use crate::tunnel::http::error_chain;

/// The finalizer that holds a class until its Secrets are removed.
pub const FINALIZER: &str = "clusterconnect.io/secret-sync";
/// Per class: its own poll interval (which also turns rotation on for it), since the upstream
/// driver has only the global one (secrets-store-csi-driver #322).
pub const INTERVAL_ANNOTATION: &str = "clusterconnect.io/rotation-poll-interval";
/// A failed pass is retried after this, doubling up to [`MAX_RETRY`], with rotation or not.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct Config {
    pub sync: bool,
    pub rotation: bool,
    pub interval: Duration,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub vault: VaultAccess,
}

pub fn provider_class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(SPC_GROUP, "v1", "SecretProviderClass"),
        "secretproviderclasses",
    )
}

/// Runs until `shutdown`: waits to lead, reconciles while leading, hands the Lease back at the end.
/// `lease_client` is used for the Lease only; give it a read timeout (the watch in `client`
/// cannot have one).
pub async fn run(
    client: kube::Client,
    lease_client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
) {
    let elector = Elector::new(
        lease_client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &config.identity,
    );
    tracing::info!(identity = %config.identity, lease = %config.lease_name, sync = config.sync, rotation = config.rotation, interval_s = config.interval.as_secs(), "controller started; waiting to lead");
    // Kept across terms as leader: the last good content survives a lost and regained Lease.
    let reconciler = Arc::new(Reconciler::new(client.clone(), config.clone()));
    loop {
        let term_start = loop {
            // Stamped before the request: the term counts from before the Lease was written.
            let start = Instant::now();
            match elector
                .try_acquire_or_renew_by(start + REQUEST_TIMEOUT)
                .await
            {
                Ok(true) => break start,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %error_chain(&e), "cannot read the leader Lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
        };
        tracing::info!(identity = %config.identity, "leading");
        let leading = shutdown.child_token();
        let renewing = tokio::spawn(keep_leading(
            Elector::new(
                lease_client.clone(),
                &config.lease_namespace,
                &config.lease_name,
                &config.identity,
            ),
            term_start,
            leading.clone(),
        ));
        reconciler.clone().run(leading.clone()).await;
        if !leading.is_cancelled() {
            // The controller's stream ended by itself: not in a tight loop.
            tokio::time::sleep(RENEW_EVERY).await;
        }
        leading.cancel();
        let _ = renewing.await;
        if shutdown.is_cancelled() {
            // Bounded: a hung apiserver must not hold up shutdown; the Lease then lapses.
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, elector.release()).await;
            tracing::info!("controller stopped; Lease released");
            return;
        }
        tracing::warn!("lost the leader Lease; stopped reconciling");
    }
}

/// Renews the Lease; cancels `leading` once it is lost, or once the term that began at the
/// start of the last successful renew (`renewed`) is about to run out: every renew is cut
/// off at that deadline, so a hung request cannot keep this replica leading.
async fn keep_leading(elector: Elector, mut renewed: Instant, leading: CancellationToken) {
    loop {
        let deadline = leading_deadline(renewed);
        tokio::select! {
            _ = leading.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
        let start = Instant::now();
        match elector.try_acquire_or_renew_by(deadline).await {
            Ok(true) => renewed = start,
            Ok(false) => break,
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot renew the leader Lease"),
        }
        if Instant::now() >= leading_deadline(renewed) {
            break;
        }
    }
    leading.cancel();
}

/// What changes of a class call for a pass.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    uid: String,
    generation: i64,
    interval: Option<String>,
}

struct ClassState {
    fingerprint: Fingerprint,
    syncer: Option<Syncer>,
    /// The credentials Secret's resourceVersion the syncer signs in with (`None`: no Secret).
    credentials: Option<String>,
    due: Option<Instant>,
    failures: u32,
}

type Key = (String, String);

struct Reconciler {
    client: kube::Client,
    config: Config,
    /// Per class; an entry is taken out while its class is reconciled (the runtime never
    /// reconciles one object twice at once) and put back after.
    state: Mutex<HashMap<Key, ClassState>>,
}

/// Never returned: every failure is reported on the class and retried by requeueing.
#[derive(Debug, thiserror::Error)]
#[error("unreachable")]
pub enum Never {}

fn key_of(o: &DynamicObject) -> Key {
    (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

fn fingerprint(o: &DynamicObject) -> Fingerprint {
    Fingerprint {
        uid: o.metadata.uid.clone().unwrap_or_default(),
        generation: o.metadata.generation.unwrap_or(0),
        interval: o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INTERVAL_ANNOTATION))
            .cloned(),
    }
}

fn class_ref(o: &DynamicObject) -> ClassRef {
    let (namespace, name) = key_of(o);
    ClassRef {
        namespace,
        name,
        uid: o.metadata.uid.clone().unwrap_or_default(),
        api_version: o
            .types
            .as_ref()
            .map(|t| t.api_version.clone())
            .unwrap_or_else(|| format!("{SPC_GROUP}/v1")),
        resource_version: o.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn has_finalizer(o: &DynamicObject) -> bool {
    o.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

impl Reconciler {
    fn new(client: kube::Client, config: Config) -> Reconciler {
        Reconciler {
            client,
            config,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<Key, ClassState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runtime's Controller over every class, until `leading` ends.
    async fn run(self: Arc<Self>, leading: CancellationToken) {
        let classes: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &provider_class_resource());
        let controller = Controller::new_with(
            classes,
            watcher::Config::default(),
            provider_class_resource(),
        )
        .run(
            |class, ctx: Arc<Reconciler>| async move { Ok::<_, Never>(ctx.handle(class).await) },
            |_, _: &Never, _| Action::requeue(FIRST_RETRY),
            self,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %error_chain(&e), "controller");
            }
        });
        tokio::select! {
            _ = leading.cancelled() => {}
            _ = controller => {}
        }
    }

    async fn handle(&self, class: Arc<DynamicObject>) -> Action {
        let key = key_of(&class);
        if class.metadata.deletion_timestamp.is_some() {
            if has_finalizer(&class) {
                if let Err(message) = self.finalize(&class).await {
                    // The class will not change again while it waits for us: retry on a timer.
                    let wait = {
                        let mut state = self.state();
                        let entry = state.entry(key).or_insert_with(|| ClassState {
                            fingerprint: fingerprint(&class),
                            syncer: None,
                            credentials: None,
                            due: None,
                            failures: 0,
                        });
                        entry.failures = entry.failures.saturating_add(1);
                        backoff(entry.failures)
                    };
                    tracing::warn!(class = %class.metadata.name.as_deref().unwrap_or_default(), namespace = %class.metadata.namespace.as_deref().unwrap_or_default(), error = %message, retry_in_s = wait.as_secs(), "cannot finalize the class; retrying");
                    report::event(
                        &self.client,
                        &class_ref(&class),
                        Level::Warning,
                        "FinalizeFailed",
                        &format!("{message}; the class stays until its Secrets are removed"),
                    )
                    .await;
                    return Action::requeue(wait);
                }
            }
            self.state().remove(&key);
            return Action::await_change();
        }
        let print = fingerprint(&class);
        let now = Instant::now();
        let entry = self.state().remove(&key);
        let mut entry = match entry {
            Some(e) if e.fingerprint == print && e.due.is_none_or(|d| d > now) => {
                let action = match e.due {
                    Some(d) => Action::requeue(d - now),
                    None => Action::await_change(),
                };
                self.state().insert(key, e);
                return action;
            }
            Some(mut e) => {
                if e.fingerprint != print {
                    e.syncer = None;
                    e.fingerprint = print;
                }
                e
            }
            None => ClassState {
                fingerprint: print,
                syncer: None,
                credentials: None,
                due: None,
                failures: 0,
            },
        };
        entry.due = None;
        self.reconcile(&class, &mut entry).await;
        let action = match entry.due {
            Some(d) => Action::requeue(d.saturating_duration_since(Instant::now())),
            None => Action::await_change(),
        };
        self.state().insert(key, entry);
        action
    }

    /// The interval of this class: its annotation's, else the global one when rotation is on.
    fn interval_of(
        &self,
        class: &DynamicObject,
        reference: &ClassRef,
    ) -> (Option<Duration>, Option<String>) {
        let annotation = class
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INTERVAL_ANNOTATION));
        match annotation.map(|v| parse_interval(v)) {
            Some(Ok(interval)) => (Some(interval), None),
            Some(Err(e)) => (
                self.config.rotation.then_some(self.config.interval),
                Some(format!(
                    "annotation {INTERVAL_ANNOTATION} of {}: {e}",
                    reference.name
                )),
            ),
            None => (self.config.rotation.then_some(self.config.interval), None),
        }
    }

    async fn reconcile(&self, class: &DynamicObject, entry: &mut ClassState) {
        let reference = class_ref(class);
        let parsed = serde_json::to_string(class)
            .map_err(|e| e.to_string())
            .and_then(|text| ProviderClass::parse(&text).map_err(|e| error_chain(&e)));
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(message) => {
                // A class for another provider is not ours to touch.
                if class_provider(class) != Some("azure") {
                    return;
                }
                report::event(
                    &self.client,
                    &reference,
                    Level::Warning,
                    "InvalidSecretProviderClass",
                    &message,
                )
                .await;
                report::status(&self.client, &reference, json!({"phase": "Failed", "message": message, "observedGeneration": class.metadata.generation})).await;
                return;
            }
        };
        if !self.config.sync {
            report::status(&self.client, &reference, json!({"phase": "SyncDisabled", "message": "the extension runs with secrets-store-csi-driver.syncSecret.enabled=false: secretObjects are not synced", "observedGeneration": class.metadata.generation})).await;
            return;
        }
        if parsed.secret_objects.is_empty() {
            report::status(&self.client, &reference, json!({"phase": "NothingToSync", "message": "the class has no secretObjects", "observedGeneration": class.metadata.generation})).await;
            return;
        }
        if !has_finalizer(class) && !self.add_finalizer(class, &reference).await {
            entry.due = Some(due_after(FIRST_RETRY));
            return;
        }
        let (interval, interval_problem) = self.interval_of(class, &reference);
        if let Some(problem) = interval_problem {
            report::event(
                &self.client,
                &reference,
                Level::Warning,
                "InvalidRotationInterval",
                &problem,
            )
            .await;
        }
        let outcome = self
            .pass(&reference, parsed, class.metadata.generation, entry)
            .await;
        entry.due = match (outcome, interval) {
            (true, interval) => {
                entry.failures = 0;
                // parse_interval caps intervals; checked anyway, since a panic here would
                // crash-loop every replica on the same class.
                interval.map(due_after)
            }
            (false, interval) => {
                entry.failures = entry.failures.saturating_add(1);
                let backoff = backoff(entry.failures);
                let wait = interval.map_or(backoff, |i| i.min(backoff));
                Some(due_after(wait))
            }
        };
    }

    /// Reads the namespace's credentials Secret: the service principal, and its version.
    async fn credentials(
        &self,
        reference: &ClassRef,
    ) -> Result<Option<(ServicePrincipal, String)>, String> {
        let api: Api<KubeSecret> = Api::namespaced(self.client.clone(), &reference.namespace);
        let secret = match api.get_opt(CREDENTIALS_SECRET).await {
            Ok(Some(secret)) => secret,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot read Secret {}/{CREDENTIALS_SECRET}: {}",
                    reference.namespace,
                    error_chain(&e)
                ))
            }
        };
        let used = secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(USED_LABEL))
            .is_some_and(|v| v == "true");
        if !used {
            report::event(&self.client, reference, Level::Warning, "CredentialsSecretNotLabelled", &format!("Secret {CREDENTIALS_SECRET} is ignored: label it {USED_LABEL}=true (kubectl label secret {CREDENTIALS_SECRET} {USED_LABEL}=true -n {})", reference.namespace)).await;
            return Ok(None);
        }
        let (client_id, client_secret) =
            read_credentials_secret(&api, &reference.namespace, CREDENTIALS_SECRET)
                .await
                .map_err(|e| error_chain(&e))?;
        let version = secret.metadata.resource_version.unwrap_or_default();
        Ok(Some((
            ServicePrincipal {
                client_id,
                client_secret,
            },
            version,
        )))
    }

    /// One pass over the class; reports what it did. `true` when it succeeded.
    async fn pass(
        &self,
        reference: &ClassRef,
        class: ProviderClass,
        generation: Option<i64>,
        entry: &mut ClassState,
    ) -> bool {
        let credentials = match self.credentials(reference).await {
            Ok(c) => c,
            Err(message) => return self.fail(reference, generation, message).await,
        };
        let version = credentials.as_ref().map(|(_, v)| v.clone());
        let rebuild = entry.syncer.is_none() || entry.credentials != version;
        if rebuild {
            let client = match self
                .config
                .vault
                .client(&class, credentials.as_ref().map(|(p, _)| p))
            {
                Ok(client) => client,
                Err(e) => return self.fail(reference, generation, error_chain(&e)).await,
            };
            let secrets: Api<KubeSecret> =
                Api::namespaced(self.client.clone(), &reference.namespace);
            entry.syncer = Some(Syncer::new(
                client,
                class,
                Targets {
                    mount_dir: None,
                    secrets: Some(SecretTarget {
                        api: secrets,
                        namespace: reference.namespace.clone(),
                        owner: class_owner(&reference.namespace, &reference.name, &reference.uid),
                    }),
                },
            ));
            entry.credentials = version;
        }
        let Some(syncer) = entry.syncer.as_mut() else {
            return false;
        };
        let result = syncer.pass().await;
        let versions = syncer.versions();
        match result {
            Ok(report) => {
                let changed: Vec<String> = report
                    .secrets
                    .iter()
                    .filter(|(_, o)| *o != Outcome::Unchanged)
                    .map(|(name, o)| {
                        format!(
                            "{name} {}",
                            match o {
                                Outcome::Created => "created",
                                _ => "updated",
                            }
                        )
                    })
                    .collect();
                if !changed.is_empty() {
                    let reason = if report.rotated.is_empty() {
                        "SecretSynced"
                    } else {
                        "SecretRotated"
                    };
                    let rotated: Vec<String> = report
                        .rotated
                        .iter()
                        .map(|(n, v)| format!("{n} to version {v}"))
                        .collect();
                    let mut message = format!("Secret {}", changed.join(", "));
                    if !rotated.is_empty() {
                        message.push_str(&format!(" (rotated {})", rotated.join(", ")));
                    }
                    report::event(&self.client, reference, Level::Normal, reason, &message).await;
                }
                let mut phase = "Synced";
                let mut message =
                    format!("{} Secret(s) in sync with Key Vault", report.secrets.len());
                if !report.kept.is_empty() {
                    phase = "Degraded";
                    message = format!(
                        "Key Vault did not return {}; their last good content is kept",
                        report.kept.join(", ")
                    );
                    report::event(
                        &self.client,
                        reference,
                        Level::Warning,
                        "KeptLastGoodContent",
                        &message,
                    )
                    .await;
                }
                let objects: Vec<_> = versions
                    .iter()
                    .map(|(n, v)| json!({"name": n, "version": v}))
                    .collect();
                let secrets: Vec<_> = report.secrets.iter().map(|(n, _)| json!(n)).collect();
                report::status(
                    &self.client,
                    reference,
                    json!({
                        "phase": phase,
                        "message": message,
                        "observedGeneration": generation,
                        "lastSyncTime": report::now_rfc3339(),
                        "objects": objects,
                        "secrets": secrets,
                    }),
                )
                .await;
                phase == "Synced"
            }
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(class = %reference.name, namespace = %reference.namespace, error = %message, "sync failed");
                self.fail(reference, generation, message).await
            }
        }
    }

    async fn fail(&self, reference: &ClassRef, generation: Option<i64>, message: String) -> bool {
        report::event(
            &self.client,
            reference,
            Level::Warning,
            "SyncFailed",
            &message,
        )
        .await;
        report::status(
            &self.client,
            reference,
            json!({"phase": "Failed", "message": message, "observedGeneration": generation}),
        )
        .await;
        false
    }

    async fn add_finalizer(&self, class: &DynamicObject, reference: &ClassRef) -> bool {
        let mut finalizers = class.metadata.finalizers.clone().unwrap_or_default();
        finalizers.push(FINALIZER.to_string());
        self.set_finalizers(reference, finalizers).await
    }

    async fn set_finalizers(&self, reference: &ClassRef, finalizers: Vec<String>) -> bool {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &reference.namespace,
            &provider_class_resource(),
        );
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": reference.resource_version}});
        match api
            .patch(
                &reference.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(class = %reference.name, namespace = %reference.namespace, error = %error_chain(&e), "cannot update the class's finalizers");
                false
            }
        }
    }

    /// The class is being deleted: remove its Secrets (only those this controller wrote for
    /// it: the names of its spec and those its status recorded, each owner-checked) and its
    /// status, then let it go. An error leaves the finalizer for a retry.
    async fn finalize(&self, class: &DynamicObject) -> Result<(), String> {
        let reference = class_ref(class);
        let secrets: Api<KubeSecret> = Api::namespaced(self.client.clone(), &reference.namespace);
        let owner = class_owner(&reference.namespace, &reference.name, &reference.uid);
        let mut names: BTreeSet<String> = serde_json::to_string(class)
            .ok()
            .and_then(|text| ProviderClass::parse(&text).ok())
            .map(|c| {
                c.secret_objects
                    .into_iter()
                    .map(|o| o.secret_name)
                    .collect()
            })
            .unwrap_or_default();
        let recorded =
            report::recorded_secrets(&self.client, &reference.namespace, &reference.name)
                .await
                .map_err(|e| format!("cannot read the SecretSyncStatus: {}", error_chain(&e)))?;
        names.extend(recorded);
        let mut removed = Vec::new();
        for name in names {
            let ours = match secrets.get_opt(&name).await {
                Ok(Some(secret)) => owned_by(&secret, &owner, &reference.name),
                Ok(None) => false,
                Err(e) => return Err(format!("cannot read Secret {name}: {}", error_chain(&e))),
            };
            if !ours {
                continue;
            }
            match secrets.delete(&name, &Default::default()).await {
                Ok(_) => removed.push(name),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(format!("cannot remove Secret {name}: {}", error_chain(&e))),
            }
        }
        report::remove_status(&self.client, &reference.namespace, &reference.name)
            .await
            .map_err(|e| format!("cannot remove the SecretSyncStatus: {}", error_chain(&e)))?;
        let rest: Vec<String> = class
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != FINALIZER)
            .collect();
        if !self.set_finalizers(&reference, rest).await {
            return Err(format!("cannot remove the finalizer {FINALIZER}"));
        }
        tracing::info!(class = %reference.name, namespace = %reference.namespace, removed = removed.len(), "class deleted; its Secrets removed");
        if !removed.is_empty() {
            report::event(
                &self.client,
                &reference,
                Level::Normal,
                "SecretsRemoved",
                &format!("Secret {} removed with the class", removed.join(", ")),
            )
            .await;
        }
        Ok(())
    }
}

/// The wait before retry number `failures` (1 = the first): [`FIRST_RETRY`] doubling up to
/// [`MAX_RETRY`].
fn backoff(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << (failures.clamp(1, 7) - 1))
        .min(MAX_RETRY)
}

/// `now + wait`, or [`MAX_INTERVAL`] from now if that would overflow.
fn due_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(MAX_INTERVAL))
        .unwrap_or(now)
}

fn class_provider(class: &DynamicObject) -> Option<&str> {
    class.data.get("spec")?.get("provider")?.as_str()
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use super::*;

    /// An apiserver that accepts requests and never answers.
    #[derive(Clone)]
    struct Hung;

    impl tower_service::Service<http::Request<kube::client::Body>> for Hung {
        type Response = http::Response<kube::client::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            std::future::pending()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_renew_gives_up_leading_before_the_lease_could_lapse() {
        let client = kube::Client::new(Hung, "default");
        let elector = Elector::new(client, "kube-system", "lease", "me");
        let leading = CancellationToken::new();
        let renewed = Instant::now();
        keep_leading(elector, renewed, leading.clone()).await;
        assert!(leading.is_cancelled());
        // Stopped by the deadline, which is before another replica may take the Lease.
        assert!(Instant::now() <= leading_deadline(renewed));
        assert!(leading_deadline(renewed) < renewed + super::super::leader::LEASE_DURATION);
    }

    /// An apiserver that fails every request with 500.
    #[derive(Clone)]
    struct Failing;

    impl tower_service::Service<http::Request<kube::client::Body>> for Failing {
        type Response = http::Response<kube::client::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd unavailable", "reason": "InternalError", "code": 500});
            std::future::ready(Ok(http::Response::builder()
                .status(500)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(status.to_string().into_bytes()))
                .unwrap()))
        }
    }

    #[tokio::test]
    async fn a_finalizer_that_fails_is_retried_with_backoff() {
        let client = kube::Client::new(Failing, "default");
        let config = Config {
            sync: true,
            rotation: false,
            interval: Duration::from_secs(120),
            lease_namespace: "kube-system".into(),
            lease_name: "lease".into(),
            identity: "me".into(),
            vault: VaultAccess::for_tests(),
        };
        let reconciler = Reconciler::new(client, config);
        let class: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
            "metadata": {
                "name": "app", "namespace": "apps", "uid": "u1", "resourceVersion": "7",
                "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [FINALIZER],
            },
            "spec": {"provider": "azure", "parameters": {"keyvaultName": "kv", "tenantId": "t", "objects": "array: []"}},
        }))
        .unwrap();
        let class = Arc::new(class);
        // Not await_change: the class is Terminating and will not change again by itself.
        assert_eq!(
            reconciler.handle(class.clone()).await,
            Action::requeue(FIRST_RETRY)
        );
        assert_eq!(
            reconciler.handle(class).await,
            Action::requeue(FIRST_RETRY * 2)
        );
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(backoff(0), FIRST_RETRY);
        assert_eq!(backoff(1), FIRST_RETRY);
        assert_eq!(backoff(2), FIRST_RETRY * 2);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn due_times_never_overflow() {
        let far = due_after(Duration::MAX);
        assert!(far > Instant::now());
    }
}

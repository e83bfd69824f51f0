//! The stand-in's object store: any resource of the `resources` table kept as JSON, with the
//! apiserver's bookkeeping (uid, a global resourceVersion, generation), its errors, label and
//! field selectors, watches fanned out to every open watcher, and pod logs. Objects are
//! rendered the ways kubectl asks for them: full JSON, lists and server-side `Table`s.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::CountGuard;
use super::patch;
use super::resources::{
    Resource, ALL, CLUSTER_ROLES, DEPLOYMENTS, NAMESPACES, NODES, PODS, SECRETS,
};

/// Where an object lives: group, plural, namespace (empty when cluster-scoped), name.
type Key = (&'static str, &'static str, String, String);

fn key(resource: &Resource, namespace: &str, name: &str) -> Key {
    let namespace = if resource.namespaced { namespace } else { "" };
    (
        resource.group,
        resource.plural,
        namespace.to_string(),
        name.to_string(),
    )
}

/// Why a write was refused; the apiserver turns each into its `Status`.
#[derive(Debug)]
pub enum StoreError {
    NotFound(&'static Resource, String),
    AlreadyExists(&'static Resource, String),
    Conflict(&'static Resource, String),
    /// A required field is missing: (resource, name, field, detail).
    Invalid(&'static Resource, String, &'static str, &'static str),
    BadRequest(String),
    /// A create in a namespace being deleted: (resource, name, namespace).
    NamespaceTerminating(&'static Resource, String, String),
}

/// One label-selector term.
#[derive(Clone, Debug)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
        }
    }
}

/// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
pub fn parse_label_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let set = |values: &str| -> Result<Vec<String>, String> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("invalid set {values:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let mut requirements = Vec::new();
    for term in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let requirement = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once(" notin ") {
            Requirement::NotIn(k.trim().into(), set(v)?)
        } else if let Some((k, v)) = term.split_once(" in ") {
            Requirement::In(k.trim().into(), set(v)?)
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else {
            Requirement::Exists(term.into())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// Which objects a list or watch covers: a resource, optionally narrowed by namespace (from
/// the path or `fieldSelector=metadata.namespace=`), name (`metadata.name=`) and labels.
#[derive(Clone, Debug)]
pub struct Selector {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub labels: Vec<Requirement>,
}

impl Selector {
    pub fn all(resource: &'static Resource) -> Selector {
        Selector {
            resource,
            namespace: None,
            name: None,
            labels: Vec::new(),
        }
    }

    fn covers(&self, key: &Key) -> bool {
        key.0 == self.resource.group && key.1 == self.resource.plural
    }

    /// Whether `o`, an object of `resource`, is selected.
    fn matches(&self, resource: &Resource, o: &Value) -> bool {
        let meta = &o["metadata"];
        resource == self.resource
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| meta["namespace"].as_str().unwrap_or_default() == ns)
            && self.name.as_ref().is_none_or(|n| meta["name"] == **n)
            && self.labels.iter().all(|r| r.matches(&meta["labels"]))
    }
}

/// What a `Table` row carries besides its cells (the `includeObject` query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// The representation a request negotiated through its `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Render {
    Json,
    Table(IncludeObject),
}

/// The patch formats, by content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    /// Server-side apply: creates the object when it is absent.
    Apply,
}

/// A live subscription: chunks to stream and the guard that counts it as open.
pub struct Subscription {
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    pub guard: CountGuard,
}

struct Watcher {
    selector: Selector,
    render: Render,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct Follower {
    namespace: String,
    pod: String,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// Whose service-account token this is, and until when it is good.
#[derive(Clone, Debug)]
pub struct TokenOwner {
    pub namespace: String,
    pub service_account: String,
    /// The account's uid when the token was minted: a recreated account does not inherit it.
    pub uid: Option<String>,
    /// The legacy token Secret holding it, which must still exist.
    pub secret: Option<String>,
    pub expires: Option<SystemTime>,
}

struct Inner {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change ever made, so a watch from resourceVersion N misses nothing after N even
    /// when the change landed between the client's list and its watch.
    history: Vec<(&'static str, &'static Resource, Value)>,
    watchers: Vec<Watcher>,
    logs: HashMap<(String, String), Vec<String>>,
    followers: Vec<Follower>,
    tokens: HashMap<String, TokenOwner>,
}

pub struct Store {
    inner: Mutex<Inner>,
    open_watches: Arc<AtomicUsize>,
    open_log_follows: Arc<AtomicUsize>,
    rollouts_stall: AtomicBool,
}

impl Store {
    /// Namespaces `default` and `kube-system`; pods `default/web-0` and `kube-system/coredns-0`
    /// created five minutes ago, each with a couple of log lines; nodes `node-1..3`; and the
    /// ClusterRoles `cluster-admin`, `admin`, `edit` and `view` (simplified).
    pub fn seeded() -> Store {
        let store = Store {
            inner: Mutex::new(Inner {
                resource_version: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                logs: HashMap::new(),
                followers: Vec::new(),
                tokens: HashMap::new(),
            }),
            open_watches: Arc::new(AtomicUsize::new(0)),
            open_log_follows: Arc::new(AtomicUsize::new(0)),
            rollouts_stall: AtomicBool::new(false),
        };
        let earlier = SystemTime::now() - Duration::from_secs(300);
        let seed = |r: &'static Resource, ns: &str, object: Value| {
            let mut inner = store.lock();
            inner
                .insert_new(r, ns, object, earlier)
                .expect("seed objects are valid");
        };
        for ns in ["default", "kube-system"] {
            seed(&NAMESPACES, "", json!({"metadata": {"name": ns}}));
        }
        seed(&PODS, "default", pod_json("web-0", earlier));
        seed(&PODS, "kube-system", pod_json("coredns-0", earlier));
        for i in 1..=3 {
            seed(&NODES, "", node_json(&format!("node-{i}")));
        }
        for (name, rules) in seeded_cluster_roles() {
            let role = json!({"metadata": {"name": name}, "rules": rules});
            seed(&CLUSTER_ROLES, "", role);
        }
        for line in ["listening on :8080", "ready"] {
            store.append_log("default", "web-0", line);
        }
        store.append_log("kube-system", "coredns-0", "CoreDNS-1.11.3");
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not turn every later request into a poison panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    pub fn set_rollouts_stall(&self, stall: bool) {
        self.rollouts_stall.store(stall, Ordering::SeqCst);
    }

    pub fn rollouts_stall(&self) -> bool {
        self.rollouts_stall.load(Ordering::SeqCst)
    }

    pub fn add_pod(&self, namespace: &str, name: &str) {
        let now = SystemTime::now();
        let _ = self
            .lock()
            .insert_new(&PODS, namespace, pod_json(name, now), now);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let _ = self.delete(&PODS, namespace, name);
    }

    pub fn exists(&self, resource: &Resource, namespace: &str, name: &str) -> bool {
        self.lock()
            .objects
            .contains_key(&key(resource, namespace, name))
    }

    pub fn get(&self, resource: &Resource, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&key(resource, namespace, name))
            .cloned()
    }

    /// The matching objects and the store's resourceVersion at the time.
    pub fn list(&self, selector: &Selector) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|(k, o)| selector.covers(k) && selector.matches(selector.resource, o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.resource_version)
    }

    /// POST: `namespace` comes from the path and wins over the body's.
    pub fn create(
        &self,
        resource: &'static Resource,
        namespace: &str,
        object: Value,
    ) -> Result<Value, StoreError> {
        self.lock()
            .insert_new(resource, namespace, object, SystemTime::now())
    }

    /// PUT: replaces the object, refusing a stale `metadata.resourceVersion`.
    pub fn update(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Result<Value, StoreError> {
        let given = object["metadata"]["name"].as_str().unwrap_or(name);
        if given != name {
            return Err(StoreError::BadRequest(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        self.lock().replace(resource, namespace, name, object)
    }

    /// PATCH in any of the formats; `Apply` creates an absent object. Returns the result and
    /// whether it was created.
    pub fn patch(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
    ) -> Result<(Value, bool), StoreError> {
        let mut inner = self.lock();
        let Some(current) = inner.objects.get(&key(resource, namespace, name)).cloned() else {
            if kind != PatchKind::Apply {
                return Err(StoreError::NotFound(resource, name.to_string()));
            }
            let mut object = body.clone();
            object["metadata"]["name"] = json!(name);
            let created = inner.insert_new(resource, namespace, object, SystemTime::now())?;
            return Ok((created, true));
        };
        let mut patched = current.clone();
        match kind {
            PatchKind::Merge => patch::merge(&mut patched, body),
            PatchKind::Strategic | PatchKind::Apply => patch::strategic(&mut patched, body),
            PatchKind::Json => {
                patch::json_patch(&mut patched, body).map_err(StoreError::BadRequest)?
            }
        }
        // A patch carrying a resourceVersion is a precondition; one without is not.
        let rv = match body["metadata"]["resourceVersion"].as_str() {
            Some(rv) if kind != PatchKind::Json => rv.to_string(),
            _ => current["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        patched["metadata"]["resourceVersion"] = json!(rv);
        let updated = inner.replace(resource, namespace, name, patched)?;
        Ok((updated, false))
    }

    /// DELETE: the object as it was; a namespace takes everything in it along. An object
    /// with finalizers is only marked (`deletionTimestamp`) and stays until an update empties
    /// them, as the apiserver does it.
    pub fn delete(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let k = key(resource, namespace, name);
        let finalized = inner.objects.get(&k).is_some_and(|o| {
            *resource != NAMESPACES
                && o["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
        });
        if finalized {
            let mut object = inner.objects.get(&k).cloned().unwrap_or_default();
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
                inner.resource_version += 1;
                object["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
                inner.objects.insert(k, object.clone());
                inner.publish("MODIFIED", resource, object.clone());
            }
            return Ok(object);
        }
        let removed = inner
            .remove(&key(resource, namespace, name))
            .ok_or_else(|| StoreError::NotFound(resource, name.to_string()))?;
        if *resource == NAMESPACES {
            let contained: Vec<Key> = inner
                .objects
                .keys()
                .filter(|(_, _, ns, _)| ns == name)
                .cloned()
                .collect();
            for key in contained {
                inner.remove(&key);
            }
            inner.logs.retain(|(ns, _), _| ns != name);
        }
        Ok(removed)
    }

    /// A controller's write: changes the object in place (status, token data) without the
    /// checks a client's write gets. `None` when the object is gone.
    pub fn modify(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let mut inner = self.lock();
        let key = key(resource, namespace, name);
        let mut object = inner.objects.get(&key)?.clone();
        change(&mut object);
        inner.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
        inner.objects.insert(key, object.clone());
        inner.publish("MODIFIED", resource, object.clone());
        Some(object)
    }

    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.lock().tokens.insert(token.to_string(), owner);
    }

    /// The service account a token stands for, while the account (and the token's Secret,
    /// for legacy tokens) still exist and the token has not expired.
    pub fn token_owner(&self, token: &str) -> Option<TokenOwner> {
        let inner = self.lock();
        let owner = inner.tokens.get(token)?;
        let account = inner.objects.get(&key(
            &super::resources::SERVICE_ACCOUNTS,
            &owner.namespace,
            &owner.service_account,
        ))?;
        let same_account = owner
            .uid
            .as_ref()
            .is_none_or(|uid| account["metadata"]["uid"] == **uid);
        let secret_kept = owner.secret.as_ref().is_none_or(|secret| {
            inner
                .objects
                .contains_key(&key(&SECRETS, &owner.namespace, secret))
        });
        let fresh = owner.expires.is_none_or(|t| t > SystemTime::now());
        (same_account && secret_kept && fresh).then(|| owner.clone())
    }

    /// Opens a watch. Without a resource version (or "0") the current objects arrive first as
    /// ADDED, as the apiserver does; with one, every later change is replayed.
    pub fn watch(&self, selector: Selector, render: Render, since: Option<u64>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let r = selector.resource;
        let backlog: Vec<(&str, &Value)> = match since {
            None | Some(0) => inner
                .objects
                .iter()
                .filter(|(k, o)| selector.covers(k) && selector.matches(r, o))
                .map(|(_, o)| ("ADDED", o))
                .collect(),
            Some(rv) => inner
                .history
                .iter()
                .filter(|(_, hr, o)| resource_version_of(o) > rv && selector.matches(hr, o))
                .map(|(event, _, o)| (*event, o))
                .collect(),
        };
        for (event, object) in backlog {
            let _ = tx.send(watch_event(event, r, object, render));
        }
        inner.watchers.push(Watcher {
            selector,
            render,
            tx,
        });
        Subscription {
            rx,
            guard: CountGuard::new(&self.open_watches),
        }
    }

    /// The pod's log so far (the last `tail` lines when given).
    pub fn logs(&self, namespace: &str, pod: &str, tail: Option<usize>) -> String {
        log_text(&self.lock(), namespace, pod, tail)
    }

    /// A `logs -f` stream: the log so far, then every appended line as it arrives.
    pub fn follow_logs(&self, namespace: &str, pod: &str, tail: Option<usize>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let backlog = log_text(&inner, namespace, pod, tail);
        if !backlog.is_empty() {
            let _ = tx.send(backlog.into());
        }
        inner.followers.push(Follower {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            tx,
        });
        Subscription {
            rx,
            guard: CountGuard::new(&self.open_log_follows),
        }
    }

    pub fn append_log(&self, namespace: &str, pod: &str, line: &str) {
        let mut inner = self.lock();
        inner
            .logs
            .entry((namespace.to_string(), pod.to_string()))
            .or_default()
            .push(line.to_string());
        let chunk = Bytes::from(format!("{line}\n"));
        inner.followers.retain(|f| {
            if f.namespace != namespace || f.pod != pod {
                return !f.tx.is_closed();
            }
            f.tx.send(chunk.clone()).is_ok()
        });
    }

    /// The container exits: its `logs -f` streams end, as the kubelet ends them.
    pub fn end_log_follows(&self, namespace: &str, pod: &str) {
        self.lock()
            .followers
            .retain(|f| f.namespace != namespace || f.pod != pod);
    }

    pub fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::SeqCst)
    }

    pub fn open_log_follows(&self) -> usize {
        self.open_log_follows.load(Ordering::SeqCst)
    }
}

fn resource_version_of(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn desired(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(map) = o.as_object_mut() {
        for field in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(field);
        }
    }
    o
}

impl Inner {
    fn insert_new(
        &mut self,
        resource: &'static Resource,
        namespace: &str,
        mut object: Value,
        created: SystemTime,
    ) -> Result<Value, StoreError> {
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
            (Some(name), _) if !name.is_empty() => name.to_string(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                let suffix = rand::distr::SampleString::sample_string(
                    &rand::distr::Alphanumeric,
                    &mut rand::rng(),
                    5,
                );
                format!("{prefix}{}", suffix.to_ascii_lowercase())
            }
            _ => {
                return Err(StoreError::Invalid(
                    resource,
                    String::new(),
                    "metadata.name",
                    "name or generateName is required",
                ))
            }
        };
        if resource.namespaced {
            let namespace_key = key(&NAMESPACES, "", namespace);
            match self.objects.get(&namespace_key) {
                None => return Err(StoreError::NotFound(&NAMESPACES, namespace.to_string())),
                Some(ns) if !ns["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(StoreError::NamespaceTerminating(
                        resource,
                        name,
                        namespace.to_string(),
                    ))
                }
                Some(_) => {}
            }
        }
        let key = key(resource, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists(resource, name));
        }
        self.resource_version += 1;
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        let meta = &mut object["metadata"];
        meta["name"] = json!(name);
        if resource.namespaced {
            meta["namespace"] = json!(namespace);
        } else if let Some(map) = meta.as_object_mut() {
            map.remove("namespace");
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["resourceVersion"] = json!(self.resource_version.to_string());
        meta["creationTimestamp"] = json!(rfc3339(created));
        meta["generation"] = json!(1);
        default(resource, &mut object);
        self.objects.insert(key, object.clone());
        self.publish("ADDED", resource, object.clone());
        Ok(object)
    }

    /// Replaces an existing object, keeping what clients cannot change through the main
    /// resource: identity, creation time, and the status of kinds with a status subresource.
    fn replace(
        &mut self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Value, StoreError> {
        let key = key(resource, namespace, name);
        let current = self
            .objects
            .get(&key)
            .ok_or_else(|| StoreError::NotFound(resource, name.to_string()))?;
        let current_rv = &current["metadata"]["resourceVersion"];
        match object["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() && current_rv != rv => {
                return Err(StoreError::Conflict(resource, name.to_string()))
            }
            _ => {}
        }
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let mut generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        if desired(current) != desired(&object) {
            generation += 1;
        }
        if has_status_subresource(resource) {
            object["status"] = current["status"].clone();
        }
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            object["metadata"][field] = current["metadata"][field].clone();
        }
        if let Some(map) = object["metadata"].as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        if let Some(map) = object.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        // Being deleted, and the last finalizer is gone: now it goes. A client cannot clear
        // the deletion mark itself.
        let deleting = current["metadata"]["deletionTimestamp"].clone();
        if !deleting.is_null() {
            object["metadata"]["deletionTimestamp"] = deleting;
            let finalizers = object["metadata"]["finalizers"].as_array().map(Vec::len);
            if finalizers.unwrap_or(0) == 0 {
                self.objects.insert(key.clone(), object);
                return self
                    .remove(&key)
                    .ok_or_else(|| StoreError::NotFound(resource, name.to_string()));
            }
        }
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        object["metadata"]["generation"] = json!(generation);
        default(resource, &mut object);
        self.objects.insert(key, object.clone());
        self.publish("MODIFIED", resource, object.clone());
        Ok(object)
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        let resource = ALL
            .iter()
            .copied()
            .find(|r| r.group == key.0 && r.plural == key.1)
            .expect("stored objects are of served resources");
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.publish("DELETED", resource, object.clone());
        Some(object)
    }

    fn publish(&mut self, event: &'static str, resource: &'static Resource, object: Value) {
        self.watchers.retain(|w| {
            if !w.selector.matches(resource, &object) {
                return !w.tx.is_closed();
            }
            w.tx.send(watch_event(event, resource, &object, w.render))
                .is_ok()
        });
        self.history.push((event, resource, object));
    }
}

/// Kinds whose status only their controllers write: a client's PUT or PATCH keeps it.
fn has_status_subresource(resource: &Resource) -> bool {
    [&PODS, &DEPLOYMENTS, &NAMESPACES, &NODES].contains(&resource)
}

/// The defaults the apiserver fills in that the installer's waits read.
fn default(resource: &Resource, object: &mut Value) {
    if *resource == DEPLOYMENTS && object["spec"]["replicas"].is_null() {
        object["spec"]["replicas"] = json!(1);
    }
    if *resource == NAMESPACES {
        if object["spec"].is_null() {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        if object["status"].is_null() {
            object["status"] = json!({"phase": "Active"});
        }
    }
    if *resource == SECRETS {
        if object["type"].is_null() {
            object["type"] = json!("Opaque");
        }
        // Like the apiserver: stringData is write-only, folded into data.
        if let Some(strings) = object
            .as_object_mut()
            .and_then(|o| o.remove("stringData"))
            .and_then(|s| s.as_object().cloned())
        {
            for (k, v) in strings {
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or_default());
                object["data"][k] = json!(encoded);
            }
        }
    }
}

fn log_text(inner: &Inner, namespace: &str, pod: &str, tail: Option<usize>) -> String {
    let lines = inner
        .logs
        .get(&(namespace.to_string(), pod.to_string()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let skip = tail.map_or(0, |t| lines.len().saturating_sub(t));
    lines[skip..].iter().map(|l| format!("{l}\n")).collect()
}

/// One line of a watch stream: `{"type":..., "object":...}` and a newline.
fn watch_event(event: &str, resource: &Resource, object: &Value, render: Render) -> Bytes {
    let rv = resource_version_of(object);
    let object = render_list(resource, std::slice::from_ref(object), rv, render, true);
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object}))
        .expect("a JSON value serializes");
    line.push(b'\n');
    line.into()
}

/// One object as asked for: itself, or a one-row `Table`.
pub fn render_one(resource: &Resource, object: &Value, render: Render) -> Value {
    let rv = resource_version_of(object);
    render_list(resource, std::slice::from_ref(object), rv, render, true)
}

/// A list as asked for: `<Kind>List` or a `Table`. With `single` (a get or a watch event) the
/// JSON form is the object itself.
pub fn render_list(
    resource: &Resource,
    items: &[Value],
    rv: u64,
    render: Render,
    single: bool,
) -> Value {
    match render {
        Render::Json if single => items.first().cloned().unwrap_or(Value::Null),
        Render::Json => json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
        Render::Table(include) => table_json(resource, items, rv, include),
    }
}

fn pod_json(name: &str, created: SystemTime) -> Value {
    let (container, image) = if name.starts_with("coredns") {
        ("coredns", "registry.k8s.io/coredns/coredns:v1.11.3")
    } else {
        ("main", "nginx:1.27")
    };
    let app = name.rsplit_once('-').map_or(name, |(a, _)| a);
    let started = rfc3339(created);
    json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "containers": [{
                "name": container,
                "image": image,
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            }],
            "nodeName": "standin-node",
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "podIP": "10.244.0.10",
            "startTime": started,
            "containerStatuses": [{
                "name": container,
                "image": image,
                "imageID": "",
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }],
        },
    })
}

fn node_json(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {
                "kubeletVersion": "v1.32.0",
                "kubeProxyVersion": "v1.32.0",
                "osImage": "Ubuntu 24.04 LTS",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "containerd://1.7.22",
            },
        },
    })
}

/// Simplified versions of the apiserver's default roles: enough that a binding to one of them
/// grants what its name promises.
fn seeded_cluster_roles() -> Vec<(&'static str, Value)> {
    let workloads = json!([
        "pods",
        "pods/log",
        "pods/exec",
        "pods/attach",
        "pods/portforward",
        "services",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "deployments"
    ]);
    let readable = json!([
        "pods",
        "pods/log",
        "services",
        "configmaps",
        "serviceaccounts",
        "deployments",
        "namespaces"
    ]);
    let groups = json!(["", "apps"]);
    let read = json!(["get", "list", "watch"]);
    let all = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    vec![
        (
            "cluster-admin",
            json!([
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ]),
        ),
        (
            "admin",
            json!([
                {"apiGroups": groups, "resources": workloads, "verbs": all},
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": all},
            ]),
        ),
        (
            "edit",
            json!([{"apiGroups": groups, "resources": workloads, "verbs": all}]),
        ),
        (
            "view",
            json!([{"apiGroups": groups, "resources": readable, "verbs": read}]),
        ),
    ]
}

fn column(name: &str, kind: &str, format: &str, description: &str) -> Value {
    json!({"name": name, "type": kind, "format": format, "description": description, "priority": 0})
}

const AGE: &str = "Time since the object was created.";

/// A `meta.k8s.io/v1` Table: what `kubectl get` prints without `-o`, with the real apiserver's
/// columns for pods, namespaces, deployments and nodes and name and age for the rest.
fn table_json(resource: &Resource, objects: &[Value], rv: u64, include: IncludeObject) -> Value {
    let name_column = column("Name", "string", "name", "Name of the object.");
    let columns = match resource.kind {
        "Pod" => vec![
            name_column,
            column(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod.",
            ),
            column(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod.",
            ),
            column(
                "Restarts",
                "string",
                "",
                "The number of times the containers were restarted.",
            ),
            column("Age", "string", "", AGE),
        ],
        "Namespace" => vec![
            name_column,
            column("Status", "string", "", "The status of the namespace."),
            column("Age", "string", "", AGE),
        ],
        "Deployment" => vec![
            name_column,
            column("Ready", "string", "", "Number of the pod with ready state."),
            column(
                "Up-to-date",
                "string",
                "",
                "Total number of non-terminated pods updated.",
            ),
            column(
                "Available",
                "string",
                "",
                "Number of the pod available to users.",
            ),
            column("Age", "string", "", AGE),
        ],
        "Node" => vec![
            name_column,
            column("Status", "string", "", "The status of the node."),
            column("Roles", "string", "", "The roles of the node."),
            column("Age", "string", "", AGE),
            column("Version", "string", "", "Kubelet version."),
        ],
        _ => vec![name_column, column("Age", "string", "", AGE)],
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let age = age(&o["metadata"]["creationTimestamp"]);
            let status = &o["status"];
            let count = |v: &Value| v.as_i64().unwrap_or(0);
            let cells = match resource.kind {
                "Pod" => {
                    let statuses = status["containerStatuses"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
                    let restarts: i64 = statuses.iter().map(|s| count(&s["restartCount"])).sum();
                    let phase = status["phase"].as_str().unwrap_or("Pending");
                    json!([
                        name,
                        format!("{ready}/{total}"),
                        phase,
                        restarts.to_string(),
                        age
                    ])
                }
                "Namespace" => json!([name, status["phase"].as_str().unwrap_or("Active"), age]),
                "Deployment" => {
                    let wanted = count(&o["spec"]["replicas"]);
                    json!([
                        name,
                        format!("{}/{wanted}", count(&status["readyReplicas"])),
                        count(&status["updatedReplicas"]),
                        count(&status["availableReplicas"]),
                        age
                    ])
                }
                "Node" => {
                    let version = &status["nodeInfo"]["kubeletVersion"];
                    json!([name, "Ready", "<none>", age, version])
                }
                _ => json!([name, age]),
            };
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    })
                }
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// kubectl's short age format ("45s", "5m", "3h", "2d") from an RFC 3339 timestamp.
fn age(timestamp: &Value) -> String {
    let since = timestamp
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map_or(UNIX_EPOCH, |t| {
            UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
        });
    let secs = SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// UTC seconds-precision RFC 3339, as Kubernetes writes timestamps.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

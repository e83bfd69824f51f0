//! The stand-in's objects (namespaces and pods) and pod logs, rendered the ways kubectl asks for
//! them: full JSON, lists, server-side `Table`s, and watch events fanned out to every open watch.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::CountGuard;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
        }
    }

    /// The plural resource, as it appears in paths and `NotFound` details.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
        }
    }
}

#[derive(Clone, Debug)]
struct Object {
    kind: Kind,
    /// Empty for cluster-scoped kinds.
    namespace: String,
    name: String,
    uid: String,
    created: SystemTime,
    resource_version: u64,
}

/// Which objects a list or watch covers: a kind, optionally narrowed by namespace (from the
/// path) and name (from `fieldSelector=metadata.name=...`).
#[derive(Clone, Debug)]
pub struct Selector {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Selector {
    fn matches(&self, o: &Object) -> bool {
        o.kind == self.kind
            && self.namespace.as_ref().is_none_or(|ns| *ns == o.namespace)
            && self.name.as_ref().is_none_or(|n| *n == o.name)
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

struct Inner {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Object>,
    /// Every change ever made, so a watch from resourceVersion N misses nothing after N even
    /// when the change landed between the client's list and its watch.
    history: Vec<(&'static str, Object)>,
    watchers: Vec<Watcher>,
    logs: HashMap<(String, String), Vec<String>>,
    followers: Vec<Follower>,
}

pub struct Store {
    inner: Mutex<Inner>,
    open_watches: Arc<AtomicUsize>,
    open_log_follows: Arc<AtomicUsize>,
}

impl Store {
    /// Namespaces `default` and `kube-system`; pods `default/web-0` and `kube-system/coredns-0`
    /// created five minutes ago, each with a couple of log lines.
    pub fn seeded() -> Store {
        let store = Store {
            inner: Mutex::new(Inner {
                resource_version: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                logs: HashMap::new(),
                followers: Vec::new(),
            }),
            open_watches: Arc::new(AtomicUsize::new(0)),
            open_log_follows: Arc::new(AtomicUsize::new(0)),
        };
        let earlier = SystemTime::now() - Duration::from_secs(300);
        for ns in ["default", "kube-system"] {
            store.put(Kind::Namespace, "", ns, earlier);
        }
        store.put(Kind::Pod, "default", "web-0", earlier);
        store.put(Kind::Pod, "kube-system", "coredns-0", earlier);
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

    fn put(&self, kind: Kind, namespace: &str, name: &str, created: SystemTime) {
        let mut inner = self.lock();
        inner.resource_version += 1;
        let key = (kind, namespace.to_string(), name.to_string());
        let event = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = Object {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uuid::Uuid::new_v4().to_string(),
            created,
            resource_version: inner.resource_version,
        };
        inner.objects.insert(key, object.clone());
        inner.publish(event, object);
    }

    pub fn add_pod(&self, namespace: &str, name: &str) {
        self.put(Kind::Pod, namespace, name, SystemTime::now());
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let key = (Kind::Pod, namespace.to_string(), name.to_string());
        if let Some(mut object) = inner.objects.remove(&key) {
            inner.resource_version += 1;
            object.resource_version = inner.resource_version;
            inner.publish("DELETED", object);
        }
    }

    pub fn exists(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let key = (kind, namespace.to_string(), name.to_string());
        self.lock().objects.contains_key(&key)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str, render: Render) -> Option<Value> {
        let inner = self.lock();
        let key = (kind, namespace.to_string(), name.to_string());
        let object = inner.objects.get(&key)?;
        Some(match render {
            Render::Json => object_json(object),
            Render::Table(include) => table_json(kind, &[object], object.resource_version, include),
        })
    }

    pub fn list(&self, selector: &Selector, render: Render) -> Value {
        let inner = self.lock();
        let items: Vec<&Object> = inner
            .objects
            .values()
            .filter(|o| selector.matches(o))
            .collect();
        let rv = inner.resource_version;
        match render {
            Render::Json => json!({
                "kind": format!("{}List", selector.kind.name()),
                "apiVersion": "v1",
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items.iter().map(|o| object_json(o)).collect::<Vec<_>>(),
            }),
            Render::Table(include) => table_json(selector.kind, &items, rv, include),
        }
    }

    /// Opens a watch. Without a resource version (or "0") the current objects arrive first as
    /// ADDED, as the apiserver does; with one, every later change is replayed.
    pub fn watch(&self, selector: Selector, render: Render, since: Option<u64>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let backlog: Vec<(&str, &Object)> = match since {
            None | Some(0) => inner
                .objects
                .values()
                .filter(|o| selector.matches(o))
                .map(|o| ("ADDED", o))
                .collect(),
            Some(rv) => inner
                .history
                .iter()
                .filter(|(_, o)| o.resource_version > rv && selector.matches(o))
                .map(|(event, o)| (*event, o))
                .collect(),
        };
        for (event, object) in backlog {
            let _ = tx.send(watch_event(event, object, render));
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

    pub fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::SeqCst)
    }

    pub fn open_log_follows(&self) -> usize {
        self.open_log_follows.load(Ordering::SeqCst)
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

impl Inner {
    fn publish(&mut self, event: &'static str, object: Object) {
        self.watchers.retain(|w| {
            if !w.selector.matches(&object) {
                return !w.tx.is_closed();
            }
            w.tx.send(watch_event(event, &object, w.render)).is_ok()
        });
        self.history.push((event, object));
    }
}

/// One line of a watch stream: `{"type":..., "object":...}` and a newline.
fn watch_event(event: &str, object: &Object, render: Render) -> Bytes {
    let object = match render {
        Render::Json => object_json(object),
        Render::Table(include) => {
            table_json(object.kind, &[object], object.resource_version, include)
        }
    };
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object}))
        .expect("a JSON value serializes");
    line.push(b'\n');
    line.into()
}

fn metadata(o: &Object) -> Value {
    let mut meta = json!({
        "name": o.name,
        "uid": o.uid,
        "resourceVersion": o.resource_version.to_string(),
        "creationTimestamp": rfc3339(o.created),
    });
    if !o.namespace.is_empty() {
        meta["namespace"] = json!(o.namespace);
    }
    if o.kind == Kind::Pod {
        meta["labels"] =
            json!({"app": o.name.rsplit_once('-').map_or(o.name.as_str(), |(a, _)| a)});
    }
    meta
}

fn object_json(o: &Object) -> Value {
    match o.kind {
        Kind::Namespace => json!({
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": metadata(o),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }),
        Kind::Pod => {
            let (container, image) = container_of(o);
            let started = rfc3339(o.created);
            json!({
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": metadata(o),
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
    }
}

/// The single container of a pod, named after what the pod runs.
fn container_of(o: &Object) -> (&'static str, &'static str) {
    if o.name.starts_with("coredns") {
        ("coredns", "registry.k8s.io/coredns/coredns:v1.11.3")
    } else {
        ("main", "nginx:1.27")
    }
}

fn column(name: &str, kind: &str, format: &str, description: &str) -> Value {
    json!({"name": name, "type": kind, "format": format, "description": description, "priority": 0})
}

/// A `meta.k8s.io/v1` Table: what `kubectl get` prints without `-o`, using the same columns
/// as the real apiserver.
fn table_json(kind: Kind, objects: &[&Object], rv: u64, include: IncludeObject) -> Value {
    let columns = match kind {
        Kind::Pod => vec![
            column("Name", "string", "name", "Name of the pod."),
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
            column("Age", "string", "", "Time since the object was created."),
        ],
        Kind::Namespace => vec![
            column("Name", "string", "name", "Name of the namespace."),
            column("Status", "string", "", "The status of the namespace."),
            column("Age", "string", "", "Time since the object was created."),
        ],
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let age = age(o.created);
            let cells = match kind {
                Kind::Pod => json!([o.name, "1/1", "Running", "0", age]),
                Kind::Namespace => json!([o.name, "Active", age]),
            };
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": metadata(o),
                    })
                }
                IncludeObject::Object => row["object"] = object_json(o),
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

/// kubectl's short age format ("45s", "5m", "3h", "2d").
fn age(since: SystemTime) -> String {
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

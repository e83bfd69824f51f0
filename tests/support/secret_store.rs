//! A tiny stand-in for the Secrets slice of a Kubernetes API server: get, create and replace
//! (with resourceVersion conflicts) of core/v1 Secrets, bearer-token authentication, and a
//! count of writes. Plain HTTP on 127.0.0.1: kube-rs talks to it through a kubeconfig like any
//! cluster. It exists because the stand-in apiserver ([`super::apiserver`]) serves Pods for
//! kubectl and not yet Secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::body::Body;
use super::serve::{self, TaskGuard};

#[derive(Default)]
struct State {
    /// (namespace, name) -> the stored object.
    secrets: BTreeMap<(String, String), Value>,
    next_version: u64,
    writes: usize,
}

struct Shared {
    token: String,
    state: Mutex<State>,
}

pub struct SecretStore {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    _tasks: Arc<TaskGuard>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    serve::json(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

impl SecretStore {
    pub async fn start() -> SecretStore {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            token: uuid::Uuid::new_v4().simple().to_string(),
            state: Mutex::new(State {
                next_version: 100,
                ..State::default()
            }),
        });
        let handler = shared.clone();
        let tasks = serve::serve(listener, None, move |req| {
            let shared = handler.clone();
            async move { shared.handle(req) }
        });
        SecretStore {
            addr,
            shared,
            _tasks: tasks,
        }
    }

    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: store\n  cluster:\n    server: http://{}\nusers:\n- name: store\n  user:\n    token: {}\ncontexts:\n- name: store\n  context:\n    cluster: store\n    user: store\n    namespace: default\ncurrent-context: store\n",
            self.addr, self.shared.token
        )
    }

    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml()).expect("write kubeconfig");
        path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// The stored Secret, as the API returns it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Puts a Secret in place directly (`data` values are plain text here).
    pub fn put(&self, namespace: &str, name: &str, labels: Value, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                use base64::Engine;
                (
                    k.to_string(),
                    base64::engine::general_purpose::STANDARD.encode(v).into(),
                )
            })
            .collect();
        let mut state = self.state();
        state.next_version += 1;
        let rv = state.next_version.to_string();
        state.secrets.insert(
            (namespace.to_string(), name.to_string()),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels, "resourceVersion": rv},
                   "data": data}),
        );
    }

    /// Creates and replaces so far.
    pub fn writes(&self) -> usize {
        self.state().writes
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: Request<Bytes>) -> Response<Body> {
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(self.token.as_str());
        if !authorized {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
                match self
                    .state()
                    .secrets
                    .get(&(ns.to_string(), name.to_string()))
                {
                    Some(obj) => serve::json(StatusCode::OK, obj),
                    None => status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("secrets \"{name}\" not found"),
                    ),
                }
            }
            (Method::POST, ["api", "v1", "namespaces", ns, "secrets"]) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(req.body()) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let mut state = self.state();
                let key = (ns.to_string(), name.clone());
                if state.secrets.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("secrets \"{name}\" already exists"),
                    );
                }
                state.next_version += 1;
                state.writes += 1;
                obj["metadata"]["namespace"] = (*ns).into();
                obj["metadata"]["resourceVersion"] = state.next_version.to_string().into();
                obj["metadata"]["uid"] = uuid::Uuid::new_v4().to_string().into();
                state.secrets.insert(key, obj.clone());
                serve::json(StatusCode::CREATED, &obj)
            }
            (Method::PUT, ["api", "v1", "namespaces", ns, "secrets", name]) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(req.body()) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                let mut state = self.state();
                let key = (ns.to_string(), name.to_string());
                let Some(existing) = state.secrets.get(&key) else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("secrets \"{name}\" not found"),
                    );
                };
                if obj["metadata"]["resourceVersion"] != existing["metadata"]["resourceVersion"] {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                state.next_version += 1;
                state.writes += 1;
                obj["metadata"]["namespace"] = (*ns).into();
                obj["metadata"]["resourceVersion"] = state.next_version.to_string().into();
                state.secrets.insert(key, obj.clone());
                serve::json(StatusCode::OK, &obj)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }
}

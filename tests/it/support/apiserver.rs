//! A stand-in Kubernetes API server for integration tests: real TLS with its own CA, HTTP/2
//! and HTTP/1.1, bearer-token authentication, a record of every request, and routing to the
//! handful of endpoints kubectl needs for get/watch/logs/exec/attach/port-forward, over a
//! small object store: create/get/list/watch/update/patch/delete of the resources in the
//! `resources` table, simulated deployment and token controllers, and RBAC for every caller
//! but the tester's and the agent's own accounts.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::ws_bytes::MessageBytes;
use base64::Engine;
use clusterconnect::tls::{server_config, CertificateAuthority};
use clusterconnect::tunnel::upgrade::{
    header_has_token, is_websocket, server_stream, switching_protocols,
};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::body::{full, Body, Streaming};
use super::discovery;
use super::objects::{
    parse_label_selector, render_list, render_one, rfc3339, IncludeObject, PatchKind, Render,
    Selector, Store, StoreError, TokenOwner,
};
use super::portforward;
use super::rbac::{self, Attributes};
use super::remotecommand::{self, Session};
use super::resources::{
    self, Resource, CLUSTER_ROLES, CLUSTER_ROLE_BINDINGS, DEPLOYMENTS, NAMESPACES, PODS, SECRETS,
    SERVICE_ACCOUNTS,
};

/// The identity a valid token stands for.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:default:tester";
const SERVICE_ACCOUNT_GROUPS: [&str; 3] = [
    "system:serviceaccounts",
    "system:serviceaccounts:default",
    "system:authenticated",
];
/// The identity of the agent's token: the one account allowed to impersonate.
pub const AGENT_SERVICE_ACCOUNT: &str = "system:serviceaccount:azure-arc:clusterconnect-agent";
const AGENT_SERVICE_ACCOUNT_GROUPS: [&str; 3] = [
    "system:serviceaccounts",
    "system:serviceaccounts:azure-arc",
    "system:authenticated",
];

const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const TABLE_CONTENT_TYPE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// One request as it reached the server, before authentication decided anything.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub version: Version,
    /// The authenticated (or, with `Impersonate-User`, impersonated) user; `None` when the
    /// request was rejected as unauthenticated. A forbidden impersonation records the
    /// authenticated user.
    pub user: Option<String>,
    /// The groups of `user` (impersonated ones included); empty when unauthenticated.
    pub groups: Vec<String>,
}

/// Every task of the server (accept loop, connections, h2 streams, upgraded sessions) lives
/// here so dropping the server ends all of them, including streams kept open by clients.
#[derive(Clone, Default)]
struct Tasks(Arc<Mutex<JoinSet<()>>>);

impl Tasks {
    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, task: F) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished tasks so a long test does not accumulate their results.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    fn abort_all(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Tasks {
    fn execute(&self, task: F) {
        self.spawn(task);
    }
}

struct Shared {
    addr: SocketAddr,
    /// Handed out as `ca.crt` in service-account token Secrets.
    ca_pem: String,
    token: String,
    agent_token: String,
    requests: Mutex<Vec<SeenRequest>>,
    store: Arc<Store>,
    tasks: Tasks,
    /// SubjectAccessReviews fail with 500 (an authorizer webhook down).
    reviews_failing: AtomicBool,
    /// The tokens TokenReviews asked about, one entry per review.
    token_reviews: Mutex<Vec<String>>,
    /// TLS connections accepted, by the protocol ALPN chose.
    connections_h2: AtomicUsize,
    connections_http1: AtomicUsize,
    /// HTTP/2 streams one connection carries at once.
    h2_max_streams: u32,
}

/// How a stand-in apiserver serves, beyond its defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Offer `h2` in ALPN (kube-apiserver does); else HTTP/1.1 only.
    pub http2: bool,
    /// HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); hyper's default 200.
    pub h2_max_streams: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            http2: true,
            h2_max_streams: 200,
        }
    }
}

pub struct ApiServer {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 with a fresh CA and token; serves until dropped.
    pub async fn start() -> ApiServer {
        ApiServer::start_with(Options::default()).await
    }

    /// [`start`](Self::start), serving as `options` say.
    pub async fn start_with(options: Options) -> ApiServer {
        let ca = CertificateAuthority::generate("standin-apiserver-ca").expect("generate CA");
        let cert = ca
            .issue_server(&["127.0.0.1", "localhost"])
            .expect("issue server certificate");
        let alpn: &[&[u8]] = if options.http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let tls = server_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), alpn)
            .expect("server TLS config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            addr,
            ca_pem: ca.cert_pem().to_string(),
            token: Alphanumeric.sample_string(&mut rand::rng(), 40),
            agent_token: Alphanumeric.sample_string(&mut rand::rng(), 40),
            requests: Mutex::new(Vec::new()),
            store: Arc::new(Store::seeded()),
            tasks: Tasks::default(),
            reviews_failing: AtomicBool::new(false),
            token_reviews: Mutex::new(Vec::new()),
            connections_h2: AtomicUsize::new(0),
            connections_http1: AtomicUsize::new(0),
            h2_max_streams: options.h2_max_streams,
        });
        shared.tasks.spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            shared.clone(),
        ));
        ApiServer {
            addr,
            ca_pem: ca.cert_pem().to_string(),
            shared,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn token(&self) -> String {
        self.shared.token.clone()
    }

    /// The agent's token: authenticates as `AGENT_SERVICE_ACCOUNT`, which may impersonate.
    pub fn agent_token(&self) -> String {
        self.shared.agent_token.clone()
    }

    /// A kubeconfig whose cluster, user and context are all named `standin`, pointing straight
    /// at this server and trusting its CA.
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        kubeconfig_yaml(&self.url(), &self.ca_pem, token)
    }

    /// Writes `kubeconfig_yaml(token)` to `dir/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml(token)).expect("write kubeconfig");
        path
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn add_pod(&self, namespace: &str, name: &str) {
        self.shared.store.add_pod(namespace, name);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.shared.store.delete_pod(namespace, name);
    }

    pub fn append_log(&self, namespace: &str, pod: &str, line: &str) {
        self.shared.store.append_log(namespace, pod, line);
    }

    /// Ends the pod's `logs -f` streams (its container exited).
    pub fn end_log_follows(&self, namespace: &str, pod: &str) {
        self.shared.store.end_log_follows(namespace, pod);
    }

    pub fn open_watches(&self) -> usize {
        self.shared.store.open_watches()
    }

    /// TLS connections accepted so far that speak HTTP/2, and those that speak HTTP/1.1.
    pub fn connections(&self) -> (usize, usize) {
        (
            self.shared.connections_h2.load(Ordering::Relaxed),
            self.shared.connections_http1.load(Ordering::Relaxed),
        )
    }

    pub fn open_log_follows(&self) -> usize {
        self.shared.store.open_log_follows()
    }

    /// The object at an API path, e.g.
    /// `/apis/apps/v1/namespaces/azure-arc/deployments/clusterconnect-agent`.
    pub fn object(&self, api_path: &str) -> Option<Value> {
        let (resource, namespace, name) = resources::parse_path(api_path)?;
        self.shared.store.get(resource, &namespace, &name?)
    }

    /// The objects under a collection path (`/api/v1/namespaces/default/secrets`,
    /// `/apis/rbac.authorization.k8s.io/v1/clusterrolebindings`, `/api/v1/pods` for all
    /// namespaces); empty for a path that is not a collection.
    pub fn objects(&self, resource_path: &str) -> Vec<Value> {
        let Some((resource, namespace, None)) = resources::parse_path(resource_path) else {
            return Vec::new();
        };
        let mut selector = Selector::all(resource);
        if !namespace.is_empty() {
            selector.namespace = Some(namespace);
        }
        self.shared.store.list(&selector).0
    }

    /// Creates an object under a collection path, as a POST would (without its controllers).
    pub fn create_object(&self, resource_path: &str, object: Value) -> Value {
        let (resource, namespace, _) =
            resources::parse_path(resource_path).expect("a collection path");
        self.shared
            .store
            .create(resource, &namespace, object)
            .unwrap_or_else(|e| panic!("create under {resource_path}: {e:?}"))
    }

    /// The store's current resourceVersion (it counts every change).
    pub fn resource_version(&self) -> u64 {
        self.shared.store.resource_version()
    }

    /// Whether new rollouts stall: deployments written from now on report their replicas
    /// updated but never available, so `kubectl rollout status` waits until its timeout.
    pub fn set_rollouts_stall(&self, stall: bool) {
        self.shared.store.set_rollouts_stall(stall);
    }

    /// Binds `cluster-admin` to a subject: `("User", "ada@contoso.com")`, `("Group", "sre")`
    /// or `("ServiceAccount", "namespace/name")`.
    pub fn grant_cluster_admin(&self, subject_kind: &str, name: &str) {
        self.bind("cluster-admin", subject_kind, name);
    }

    /// Creates ClusterRole `role` with `rules` and binds it to a subject (as
    /// [`grant_cluster_admin`](Self::grant_cluster_admin) names them).
    pub fn grant_rules(&self, role: &str, rules: Value, subject_kind: &str, name: &str) {
        let cluster_role = json!({"metadata": {"name": role}, "rules": rules});
        self.shared
            .store
            .create(&CLUSTER_ROLES, "", cluster_role)
            .expect("create ClusterRole");
        self.bind(role, subject_kind, name);
    }

    /// How many TokenReviews asked about `token`.
    pub fn token_reviews(&self, token: &str) -> usize {
        self.shared
            .token_reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| *t == token)
            .count()
    }

    /// From now on SubjectAccessReviews fail (500) while `failing`.
    pub fn set_reviews_failing(&self, failing: bool) {
        self.shared
            .reviews_failing
            .store(failing, Ordering::Relaxed);
    }

    fn bind(&self, role: &str, subject_kind: &str, name: &str) {
        let subject = match (subject_kind, name.split_once('/')) {
            ("ServiceAccount", Some((namespace, name))) => {
                json!({"kind": "ServiceAccount", "name": name, "namespace": namespace})
            }
            ("User" | "Group", _) => {
                json!({"kind": subject_kind, "name": name, "apiGroup": "rbac.authorization.k8s.io"})
            }
            _ => panic!("grant: unknown subject {subject_kind} {name}"),
        };
        let prefix = if role == "cluster-admin" {
            "standin-cluster-admin".to_string()
        } else {
            format!("standin-{role}")
        };
        let binding_name: String = format!("{prefix}-{subject_kind}-{name}")
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let binding = json!({
            "metadata": {"name": binding_name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject],
        });
        self.shared
            .store
            .create(&CLUSTER_ROLE_BINDINGS, "", binding)
            .expect("create ClusterRoleBinding");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.tasks.abort_all();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, conn_shared) = (acceptor.clone(), shared.clone());
        shared.tasks.spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(tls)) = handshake.await else {
                return;
            };
            let counter = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => &conn_shared.connections_h2,
                _ => &conn_shared.connections_http1,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let service_shared = conn_shared.clone();
            let service = service_fn(move |req| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let mut builder = auto::Builder::new(conn_shared.tasks.clone());
            builder
                .http2()
                .max_concurrent_streams(conn_shared.h2_max_streams);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Who the request is from: the service account its bearer token stands for, or the user it
/// impersonates when that account may impersonate.
struct Identity {
    user: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
    /// The tester's and the agent's own accounts may do anything, as before RBAC existed
    /// here; everyone else (minted service-account tokens, impersonated users) is authorized
    /// by the bindings in the store.
    unrestricted: bool,
}

enum Authentication {
    Unauthenticated,
    /// Authenticated, but the impersonation was refused: the caller and the refusal.
    Refused(Identity, Box<Response<Body>>),
    Authenticated(Identity),
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Authentication {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = match presented {
        Some(t) if t == shared.token => Identity {
            user: SERVICE_ACCOUNT.to_string(),
            uid: None,
            groups: SERVICE_ACCOUNT_GROUPS.map(String::from).to_vec(),
            extra: BTreeMap::new(),
            unrestricted: true,
        },
        Some(t) if t == shared.agent_token => Identity {
            user: AGENT_SERVICE_ACCOUNT.to_string(),
            uid: None,
            groups: AGENT_SERVICE_ACCOUNT_GROUPS.map(String::from).to_vec(),
            extra: BTreeMap::new(),
            unrestricted: true,
        },
        Some(t) => match shared.store.token_owner(t) {
            Some(owner) => Identity {
                user: format!(
                    "system:serviceaccount:{}:{}",
                    owner.namespace, owner.service_account
                ),
                uid: None,
                groups: vec![
                    "system:serviceaccounts".to_string(),
                    format!("system:serviceaccounts:{}", owner.namespace),
                    "system:authenticated".to_string(),
                ],
                extra: BTreeMap::new(),
                unrestricted: false,
            },
            None => return Authentication::Unauthenticated,
        },
        None => return Authentication::Unauthenticated,
    };
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(String::from)
            .collect()
    };
    // As the apiserver: the first Impersonate-User and Impersonate-Uid count, an empty one
    // is none; every group and every extra value counts.
    let user = values("impersonate-user")
        .into_iter()
        .next()
        .filter(|u| !u.is_empty());
    let uid = values("impersonate-uid")
        .into_iter()
        .next()
        .filter(|u| !u.is_empty());
    let groups = values("impersonate-group");
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix("impersonate-extra-") {
            // Extra keys may hold characters header names cannot, so they travel escaped.
            let key = percent_encoding::percent_decode_str(key)
                .decode_utf8_lossy()
                .into_owned();
            let value = value.to_str().unwrap_or_default().to_string();
            extra.entry(key).or_default().push(value);
        }
    }
    if user.is_none() && uid.is_none() && groups.is_empty() && extra.is_empty() {
        return Authentication::Authenticated(caller);
    }
    let Some(user) = user else {
        let refusal = status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: requested impersonation of groups or extras without impersonating a user",
        );
        return Authentication::Refused(caller, Box::new(refusal));
    };
    // Like the apiserver's impersonation filter: the user is checked first, then each group,
    // then each extra value, then the uid. The agent's account may impersonate anyone; every
    // other caller only what RBAC bindings grant it.
    if caller.user != AGENT_SERVICE_ACCOUNT {
        for check in impersonation_checks(&user, &groups, &extra, uid.as_deref()) {
            if rbac::allows(&shared.store, &caller.user, &caller.groups, &check) {
                continue;
            }
            let (plural, _) = check
                .resource
                .split_once('/')
                .unwrap_or((&check.resource, ""));
            let message = rbac::forbidden_message(&caller.user, &check);
            let refusal = status_with_details(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &message,
                Some(json!({"name": check.name, "kind": plural})),
            );
            return Authentication::Refused(caller, Box::new(refusal));
        }
    }
    let mut groups = groups;
    let service_account = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'));
    if let (Some((namespace, _)), true) = (service_account, groups.is_empty()) {
        groups = vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
        ];
    }
    if user != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".to_string());
    }
    Authentication::Authenticated(Identity {
        user,
        uid,
        groups,
        extra,
        unrestricted: false,
    })
}

/// The apiserver's `impersonate` checks for a request, in its order.
fn impersonation_checks(
    user: &str,
    groups: &[String],
    extra: &BTreeMap<String, Vec<String>>,
    uid: Option<&str>,
) -> Vec<Attributes> {
    let check = |group: &str, resource: String, namespace: &str, name: &str| Attributes {
        verb: "impersonate".to_string(),
        group: group.to_string(),
        resource,
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let mut checks = Vec::new();
    let service_account = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'));
    checks.push(match service_account {
        Some((namespace, name)) => check("", "serviceaccounts".into(), namespace, name),
        None => check("", "users".into(), "", user),
    });
    checks.extend(groups.iter().map(|g| check("", "groups".into(), "", g)));
    for (key, values) in extra {
        for value in values {
            checks.push(check(
                "authentication.k8s.io",
                format!("userextras/{key}"),
                "",
                value,
            ));
        }
    }
    if let Some(uid) = uid {
        checks.push(check("authentication.k8s.io", "uids".into(), "", uid));
    }
    checks
}

impl Shared {
    fn record(&self, req: &Request<Incoming>, identity: Option<&Identity>) {
        let seen = SeenRequest {
            method: req.method().to_string(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.to_string()),
            headers: req.headers().clone(),
            version: req.version(),
            user: identity.map(|i| i.user.clone()),
            groups: identity.map(|i| i.groups.clone()).unwrap_or_default(),
        };
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen);
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let identity = match authenticate(&shared, req.headers()) {
        Authentication::Unauthenticated => {
            shared.record(&req, None);
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        Authentication::Refused(caller, refusal) => {
            shared.record(&req, Some(&caller));
            return *refusal;
        }
        Authentication::Authenticated(identity) => identity,
    };
    shared.record(&req, Some(&identity));
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = req.method() == Method::GET;
    let served_group = |g: &str| resources::GROUPS.contains(&g);
    // Discovery, version and health are open to every authenticated caller, as the
    // apiserver's system:discovery and system:basic-user bindings make them.
    match segments.as_slice() {
        ["version"] if get => json_response(StatusCode::OK, &discovery::version()),
        ["healthz" | "livez" | "readyz"] if get => text_response("ok"),
        ["api"] if get => json_response(StatusCode::OK, &discovery::core_versions(shared.addr)),
        ["api", "v1"] if get => json_response(StatusCode::OK, &discovery::core_v1()),
        ["apis"] if get => json_response(StatusCode::OK, &discovery::groups()),
        ["apis", group]
            if get && (served_group(group) || *group == discovery::AUTHENTICATION_GROUP) =>
        {
            json_response(StatusCode::OK, &discovery::group(group))
        }
        ["apis", discovery::AUTHENTICATION_GROUP, "v1"] if get => {
            json_response(StatusCode::OK, &discovery::authentication_v1())
        }
        ["apis", discovery::AUTHENTICATION_GROUP, "v1", "selfsubjectreviews"]
            if req.method() == Method::POST =>
        {
            self_subject_review(&identity)
        }
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]
            if req.method() == Method::POST =>
        {
            subject_access_review(&shared, req, &identity).await
        }
        ["apis", discovery::AUTHENTICATION_GROUP, "v1", "tokenreviews"]
            if req.method() == Method::POST =>
        {
            token_review(&shared, req, &identity).await
        }
        ["apis", group, version] if get && served_group(group) => {
            json_response(StatusCode::OK, &discovery::resource_list(group, version))
        }
        ["openapi", "v3"] if get => json_response(StatusCode::OK, &discovery::openapi_v3_index()),
        ["openapi", "v3", rest @ ..] if get => {
            let document = match rest {
                ["api", version] => discovery::openapi_v3("", version),
                ["apis", group, version] => discovery::openapi_v3(group, version),
                _ => None,
            };
            match document {
                Some(document) => json_response(StatusCode::OK, &document),
                None => no_such_path(),
            }
        }
        _ => match target(&segments) {
            Some(target) => resource_request(&shared, req, &identity, target).await,
            None => no_such_path(),
        },
    }
}

fn no_such_path() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn method_not_allowed() -> Response<Body> {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

/// A request for a resource: which one, where, and which object and subresource if any.
#[derive(Debug)]
struct Target {
    resource: &'static Resource,
    /// Empty for cluster-scoped resources and for namespaced ones listed across namespaces.
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn target(segments: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segments {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let namespaced =
        |plural: &str| resources::lookup(group, version, plural).filter(|r| r.namespaced);
    let (resource, namespace, more) = match rest {
        ["namespaces", ns, plural, more @ ..] if namespaced(plural).is_some() => {
            (namespaced(plural)?, ns.to_string(), more)
        }
        [plural, more @ ..] => (
            resources::lookup(group, version, plural)?,
            String::new(),
            more,
        ),
        _ => return None,
    };
    if more.len() > 2 || (resource.namespaced && namespace.is_empty() && !more.is_empty()) {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name: more.first().map(|s| s.to_string()),
        subresource: more.get(1).map(|s| s.to_string()),
    })
}

/// The RBAC verb of a request, or `None` when the method makes no sense there.
fn verb_of(method: &Method, target: &Target, query: &Query) -> Option<&'static str> {
    let sub = target.subresource.as_deref();
    Some(match (method.as_str(), &target.name, sub) {
        ("GET", None, _) if query.flag("watch") => "watch",
        ("GET", None, _) => "list",
        // Streams opened with a GET (WebSocket) are authorized as the create they are.
        ("GET", Some(_), Some("exec" | "attach" | "portforward")) => "create",
        ("GET", Some(_), _) => "get",
        ("POST", None, None) | ("POST", Some(_), Some(_)) => "create",
        ("PUT", Some(_), None) => "update",
        ("PATCH", Some(_), None) => "patch",
        ("DELETE", None, None) => "deletecollection",
        ("DELETE", Some(_), None) => "delete",
        _ => return None,
    })
}

async fn resource_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    identity: &Identity,
    target: Target,
) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let Some(verb) = verb_of(req.method(), &target, &query) else {
        return method_not_allowed();
    };
    let r = target.resource;
    let attributes = Attributes {
        verb: verb.to_string(),
        group: r.group.to_string(),
        resource: match &target.subresource {
            Some(sub) => format!("{}/{sub}", r.plural),
            None => r.plural.to_string(),
        },
        namespace: target.namespace.clone(),
        name: target.name.clone().unwrap_or_default(),
    };
    if !identity.unrestricted
        && !rbac::allows(&shared.store, &identity.user, &identity.groups, &attributes)
    {
        let mut details = json!({"kind": r.plural});
        if let Some(name) = &target.name {
            details["name"] = json!(name);
        }
        if !r.group.is_empty() {
            details["group"] = json!(r.group);
        }
        let message = rbac::forbidden_message(&identity.user, &attributes);
        return status_with_details(StatusCode::FORBIDDEN, "Forbidden", &message, Some(details));
    }
    let ns = target.namespace.as_str();
    if let (Some(name), Some(sub)) = (&target.name, &target.subresource) {
        return subresource(shared, req, &query, r, ns, name, sub).await;
    }
    let name = target.name.as_deref().unwrap_or_default();
    let store = &shared.store;
    let written = match verb {
        "list" | "watch" => return collection(shared, &req, &query, r, ns),
        "get" => return single(shared, &req, &query, r, ns, name),
        "deletecollection" => return delete_collection(shared, &query, r, ns),
        "delete" if *r == NAMESPACES => return delete_namespace(shared, name),
        "delete" => {
            return match store.delete(r, ns, name) {
                Ok(object) => deleted(r, object),
                Err(e) => store_error(e),
            }
        }
        "create" if r.namespaced && ns.is_empty() => return method_not_allowed(),
        _ => {
            let patch_kind = patch_kind(req.headers());
            let body = match read_object(req, patch_kind == Some(PatchKind::Apply)).await {
                Ok(body) => body,
                Err(refusal) => return *refusal,
            };
            let body_ns = body["metadata"]["namespace"].as_str().unwrap_or(ns);
            if r.namespaced && verb != "patch" && body_ns != ns {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                );
            }
            match verb {
                "create" => store.create(r, ns, body).map(|o| (o, true)),
                "update" => store.update(r, ns, name, body).map(|o| (o, false)),
                _ => {
                    let Some(kind) = patch_kind else {
                        return status(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "UnsupportedMediaType",
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                        );
                    };
                    if kind == PatchKind::Apply
                        && query.get("fieldManager").is_none_or(str::is_empty)
                    {
                        return invalid_field_manager();
                    }
                    store.patch(r, ns, name, kind, &body)
                }
            }
        }
    };
    match written {
        Ok((object, created)) => {
            controllers(shared, r, &object);
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_response(code, &object)
        }
        Err(e) => store_error(e),
    }
}

fn invalid_field_manager() -> Response<Body> {
    status_with_details(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        Some(json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [
            {"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"},
        ]})),
    )
}

fn patch_kind(headers: &HeaderMap) -> Option<PatchKind> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/merge-patch+json" => Some(PatchKind::Merge),
        "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
        "application/json-patch+json" => Some(PatchKind::Json),
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(PatchKind::Apply),
        _ => None,
    }
}

/// Request bodies are single objects; anything near this is a mistake.
const MAX_OBJECT_BODY: usize = 8 * 1024 * 1024;

/// The request body as JSON (YAML for server-side apply, JSON being YAML too).
async fn read_object(req: Request<Incoming>, yaml: bool) -> Result<Value, Refusal> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return Err(Box::new(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type})"),
        )));
    }
    let bad = |message: String| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", &message));
    let bytes = match Limited::new(req.into_body(), MAX_OBJECT_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Err(bad(format!("unable to read the request body: {e}"))),
    };
    let parsed = if yaml {
        serde_norway::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| bad(format!("the request body is not valid: {e}")))
}

/// The apiserver's `Status` for each refused write.
fn store_error(error: StoreError) -> Response<Body> {
    let details = |r: &Resource, name: &str| {
        let mut details = json!({"name": name, "kind": r.plural});
        if !r.group.is_empty() {
            details["group"] = json!(r.group);
        }
        details
    };
    match error {
        StoreError::NotFound(r, name) => not_found(r, &name),
        StoreError::AlreadyExists(r, name) => status_with_details(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", r.qualified()),
            Some(details(r, &name)),
        ),
        StoreError::Conflict(r, name) => status_with_details(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                r.qualified()
            ),
            Some(details(r, &name)),
        ),
        StoreError::Invalid(r, name, field, detail) => {
            let mut details = details(r, &name);
            details["kind"] = json!(r.kind);
            details["causes"] = json!([{"reason": "FieldValueRequired", "message": format!("Required value: {detail}"), "field": field}]);
            status_with_details(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!("{} \"{name}\" is invalid: {field}: Required value: {detail}", r.qualified_kind()),
                Some(details),
            )
        }
        StoreError::BadRequest(message) => status(StatusCode::BAD_REQUEST, "BadRequest", &message),
        StoreError::NamespaceTerminating(r, name, ns) => status_with_details(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated", r.qualified()),
            Some(details(r, &name)),
        ),
    }
}

/// What DELETE answers: pods come back as the object, everything else as a success `Status`,
/// as from the apiserver.
fn deleted(r: &Resource, object: Value) -> Response<Body> {
    if *r == PODS {
        return json_response(StatusCode::OK, &object);
    }
    let mut details = json!({
        "name": object["metadata"]["name"],
        "kind": r.plural,
        "uid": object["metadata"]["uid"],
    });
    if !r.group.is_empty() {
        details["group"] = json!(r.group);
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
    )
}

/// Like the namespace controller: the namespace turns Terminating at once, and a moment later
/// it and everything in it are gone, so deletes that follow it (`kubectl delete -f` of a file
/// that starts with the namespace) usually still find their objects. Only usually: a slow
/// client loses that race, as against a real cluster, so such a delete needs
/// `--ignore-not-found`.
fn delete_namespace(shared: &Arc<Shared>, name: &str) -> Response<Body> {
    let now = rfc3339(SystemTime::now());
    let terminating = shared.store.modify(&NAMESPACES, "", name, |ns| {
        if ns["metadata"]["deletionTimestamp"].is_null() {
            ns["metadata"]["deletionTimestamp"] = json!(now);
        }
        ns["status"]["phase"] = json!("Terminating");
    });
    let Some(terminating) = terminating else {
        return not_found(&NAMESPACES, name);
    };
    let (store, name) = (shared.store.clone(), name.to_string());
    shared.tasks.spawn(async move {
        tokio::time::sleep(CONTROLLER_DELAY).await;
        let _ = store.delete(&NAMESPACES, "", &name);
    });
    json_response(StatusCode::OK, &terminating)
}

fn delete_collection(
    shared: &Shared,
    query: &Query,
    r: &'static Resource,
    ns: &str,
) -> Response<Body> {
    let selector = match selector(query, r, ns) {
        Ok(selector) => selector,
        Err(refusal) => return *refusal,
    };
    let (items, _) = shared.store.list(&selector);
    let mut removed = Vec::new();
    for item in items {
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = item["metadata"]["namespace"].as_str().unwrap_or_default();
        if let Ok(object) = shared.store.delete(r, namespace, name) {
            removed.push(object);
        }
    }
    let rv = shared.store.resource_version();
    json_response(
        StatusCode::OK,
        &render_list(r, &removed, rv, Render::Json, false),
    )
}

/// The pod streams (log, exec, attach, port-forward) and the TokenRequest.
async fn subresource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    query: &Query,
    r: &'static Resource,
    ns: &str,
    name: &str,
    sub: &str,
) -> Response<Body> {
    if !shared.store.exists(r, ns, name) {
        return not_found(r, name);
    }
    let get = req.method() == Method::GET;
    match (r.plural, sub) {
        ("pods", "log") if get => logs(shared, query, ns, name),
        ("pods", "log") => method_not_allowed(),
        ("pods", "exec") => {
            let session = Session {
                command: query.all("command"),
                stdin: query.flag("stdin"),
                stdout: query.flag("stdout"),
                stderr: query.flag("stderr"),
                tty: query.flag("tty"),
            };
            remote_command(shared, req, session)
        }
        ("pods", "attach") => {
            let session = Session::attach(
                query.flag("stdin"),
                query.flag("stdout"),
                query.flag("stderr"),
                query.flag("tty"),
            );
            remote_command(shared, req, session)
        }
        ("pods", "portforward") => port_forward(shared, req),
        ("serviceaccounts", "token") if req.method() == Method::POST => {
            let request = match read_object(req, false).await {
                Ok(body) => body,
                Err(refusal) => return *refusal,
            };
            token_request(shared, ns, name, request)
        }
        _ => no_such_path(),
    }
}

/// How long a TokenRequest's token lives when the request does not say.
const DEFAULT_TOKEN_SECONDS: u64 = 3600;

/// `POST .../serviceaccounts/{name}/token`: a fresh token for the account, good until it
/// expires or the account is deleted.
fn token_request(shared: &Shared, ns: &str, name: &str, mut request: Value) -> Response<Body> {
    let seconds = request["spec"]["expirationSeconds"]
        .as_u64()
        .unwrap_or(DEFAULT_TOKEN_SECONDS);
    let expires = SystemTime::now() + Duration::from_secs(seconds);
    let uid = shared
        .store
        .get(&SERVICE_ACCOUNTS, ns, name)
        .and_then(|sa| sa["metadata"]["uid"].as_str().map(String::from));
    let token = mint_token();
    shared.store.add_token(
        &token,
        TokenOwner {
            namespace: ns.to_string(),
            service_account: name.to_string(),
            uid,
            secret: None,
            expires: Some(expires),
        },
    );
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!("TokenRequest");
    request["metadata"] =
        json!({"name": name, "namespace": ns, "creationTimestamp": rfc3339(SystemTime::now())});
    request["spec"]["expirationSeconds"] = json!(seconds);
    if request["spec"]["audiences"].is_null() {
        request["spec"]["audiences"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    }
    request["status"] = json!({"token": token, "expirationTimestamp": rfc3339(expires)});
    json_response(StatusCode::CREATED, &request)
}

fn mint_token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 48)
}

/// How long the simulated controllers take to react, like the real ones' short delay.
const CONTROLLER_DELAY: Duration = Duration::from_millis(200);

/// Starts what the cluster's controllers would do after a write: a Deployment rolls out, a
/// service-account token Secret gets its token.
fn controllers(shared: &Arc<Shared>, r: &'static Resource, object: &Value) {
    let ns = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let store = shared.store.clone();
    if *r == DEPLOYMENTS {
        shared.tasks.spawn(async move {
            tokio::time::sleep(CONTROLLER_DELAY).await;
            let stall = store.rollouts_stall();
            store.modify(&DEPLOYMENTS, &ns, &name, |d| {
                d["status"] = rollout_status(d, stall)
            });
        });
        return;
    }
    let annotations = &object["metadata"]["annotations"];
    let account = annotations["kubernetes.io/service-account.name"].as_str();
    let wants_token = *r == SECRETS
        && object["type"] == "kubernetes.io/service-account-token"
        && object["data"]["token"].is_null();
    let (Some(account), true) = (account, wants_token) else {
        return;
    };
    let account = account.to_string();
    let ca = shared.ca_pem.clone();
    shared.tasks.spawn(async move {
        tokio::time::sleep(CONTROLLER_DELAY).await;
        let uid = store
            .get(&SERVICE_ACCOUNTS, &ns, &account)
            .and_then(|sa| sa["metadata"]["uid"].as_str().map(String::from));
        let token = mint_token();
        let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
        let filled = store.modify(&SECRETS, &ns, &name, |secret| {
            secret["data"]["token"] = json!(b64(&token));
            secret["data"]["ca.crt"] = json!(b64(&ca));
            secret["data"]["namespace"] = json!(b64(&ns));
            if let Some(uid) = &uid {
                secret["metadata"]["annotations"]["kubernetes.io/service-account.uid"] = json!(uid);
            }
        });
        if filled.is_some() {
            let owner = TokenOwner {
                namespace: ns.clone(),
                service_account: account,
                uid,
                secret: Some(name),
                expires: None,
            };
            store.add_token(&token, owner);
        }
    });
}

/// The status the deployment controller reports: every replica updated and available, or
/// (stalled) updated but never available, which keeps `rollout status` waiting.
fn rollout_status(deployment: &Value, stall: bool) -> Value {
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
    let generation = deployment["metadata"]["generation"].as_i64().unwrap_or(1);
    let now = rfc3339(SystemTime::now());
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": now, "lastTransitionTime": now})
    };
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    if stall {
        return json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": 0,
            "availableReplicas": 0,
            "unavailableReplicas": replicas,
            "conditions": [
                condition("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability."),
                condition("Progressing", "True", "ReplicaSetUpdated", &format!("ReplicaSet \"{name}\" is progressing.")),
            ],
        });
    }
    json!({
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability."),
            condition("Progressing", "True", "NewReplicaSetAvailable", &format!("ReplicaSet \"{name}\" has successfully progressed.")),
        ],
    })
}

/// The representation asked for: a `Table` when the Accept header offers one (as `kubectl get`
/// does without `-o`), otherwise plain JSON.
fn negotiate(req: &Request<Incoming>, query: &Query) -> Render {
    let accept = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"));
    if !accept {
        return Render::Json;
    }
    Render::Table(match query.get("includeObject") {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    })
}

/// The list or watch selector from the path's namespace and the field and label selectors.
fn selector(query: &Query, r: &'static Resource, ns: &str) -> Result<Selector, Refusal> {
    let mut selector = Selector::all(r);
    if !ns.is_empty() {
        selector.namespace = Some(ns.to_string());
    }
    for term in query.get("fieldSelector").unwrap_or_default().split(',') {
        let term = term.replace("==", "=");
        match term.split_once('=') {
            Some(("metadata.name", name)) => selector.name = Some(name.to_string()),
            Some(("metadata.namespace", ns)) => selector.namespace = Some(ns.to_string()),
            _ => {}
        }
    }
    let labels = query.get("labelSelector").unwrap_or_default();
    selector.labels = parse_label_selector(labels).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("unable to parse requirement: {e}"),
        ))
    })?;
    Ok(selector)
}

fn collection(
    shared: &Shared,
    req: &Request<Incoming>,
    query: &Query,
    r: &'static Resource,
    ns: &str,
) -> Response<Body> {
    let selector = match selector(query, r, ns) {
        Ok(selector) => selector,
        Err(refusal) => return *refusal,
    };
    let render = negotiate(req, query);
    if query.flag("watch") {
        let since = query.get("resourceVersion").and_then(|v| v.parse().ok());
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let sub = shared.store.watch(selector, render, since);
        let mut response = Response::new(Streaming::body(sub.rx, sub.guard, timeout));
        set_content_type(&mut response, "application/json");
        return response;
    }
    let (items, rv) = shared.store.list(&selector);
    rendered(render_list(r, &items, rv, render, false), render)
}

fn single(
    shared: &Shared,
    req: &Request<Incoming>,
    query: &Query,
    r: &'static Resource,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    let render = negotiate(req, query);
    match shared.store.get(r, namespace, name) {
        Some(object) => rendered(render_one(r, &object, render), render),
        None => not_found(r, name),
    }
}

fn rendered(value: Value, render: Render) -> Response<Body> {
    let mut response = json_response(StatusCode::OK, &value);
    if matches!(render, Render::Table(_)) {
        set_content_type(&mut response, TABLE_CONTENT_TYPE);
    }
    response
}

fn logs(shared: &Shared, query: &Query, namespace: &str, pod: &str) -> Response<Body> {
    let tail = query.get("tailLines").and_then(|v| v.parse().ok());
    if !query.flag("follow") {
        return text_response(shared.store.logs(namespace, pod, tail));
    }
    let sub = shared.store.follow_logs(namespace, pod, tail);
    let mut response = Response::new(Streaming::body(sub.rx, sub.guard, None));
    set_content_type(&mut response, "text/plain");
    response
}

/// exec/attach: a WebSocket channel session, or an SPDY session when the client asks for it.
fn remote_command(shared: &Shared, mut req: Request<Incoming>, session: Session) -> Response<Body> {
    if is_websocket(&req) {
        let (response, upgrade, protocol) =
            match accept_websocket(&mut req, &remotecommand::WEBSOCKET_PROTOCOLS) {
                Ok(accepted) => accepted,
                Err(refusal) => return *refusal,
            };
        shared.tasks.spawn(async move {
            if let Ok(ws) = server_stream(upgrade).await {
                remotecommand::serve_websocket(ws, protocol, session).await;
            }
        });
        return response;
    }
    let (response, upgrade) = match accept_spdy(&mut req, &remotecommand::SPDY_PROTOCOLS) {
        Ok(accepted) => accepted,
        Err(refusal) => return *refusal,
    };
    shared.tasks.spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            remotecommand::serve_spdy(TokioIo::new(upgraded), session).await;
        }
    });
    response
}

/// port-forward: SPDY inside WebSocket messages (kubectl's default), or plain SPDY.
fn port_forward(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    if is_websocket(&req) {
        let (response, upgrade, _) =
            match accept_websocket(&mut req, &[portforward::WEBSOCKET_PROTOCOL]) {
                Ok(accepted) => accepted,
                Err(refusal) => return *refusal,
            };
        shared.tasks.spawn(async move {
            if let Ok(ws) = server_stream(upgrade).await {
                portforward::serve(MessageBytes::new(ws)).await;
            }
        });
        return response;
    }
    let (response, upgrade) = match accept_spdy(&mut req, &portforward::SPDY_PROTOCOLS) {
        Ok(accepted) => accepted,
        Err(refusal) => return *refusal,
    };
    shared.tasks.spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            portforward::serve(TokioIo::new(upgraded)).await;
        }
    });
    response
}

/// Comma-separated values of every instance of a header, in order.
fn offered(headers: &HeaderMap, name: impl header::AsHeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The first of our protocols (in our preference order) that the client offered.
fn negotiate_protocol(offered: &[String], supported: &[&'static str]) -> Option<&'static str> {
    supported
        .iter()
        .find(|s| offered.iter().any(|o| o == *s))
        .copied()
}

fn protocol_refusal(offered: &[String], supported: &[&str]) -> Response<Body> {
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
        ),
    )
}

type Accepted = (Response<Body>, OnUpgrade, &'static str);
/// The error response when an upgrade cannot be accepted (boxed: responses are large).
type Refusal = Box<Response<Body>>;

fn accept_websocket(
    req: &mut Request<Incoming>,
    supported: &[&'static str],
) -> Result<Accepted, Refusal> {
    let offers = offered(req.headers(), header::SEC_WEBSOCKET_PROTOCOL);
    let protocol = negotiate_protocol(&offers, supported)
        .ok_or_else(|| Box::new(protocol_refusal(&offers, supported)))?;
    let mut response: Response<Body> = switching_protocols(req).ok_or_else(|| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "invalid WebSocket handshake",
        ))
    })?;
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    Ok((response, hyper::upgrade::on(req), protocol))
}

fn accept_spdy(
    req: &mut Request<Incoming>,
    supported: &[&'static str],
) -> Result<(Response<Body>, OnUpgrade), Refusal> {
    if !header_has_token(req.headers(), header::UPGRADE, "SPDY/3.1") {
        return Err(Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Upgrade request required",
        )));
    }
    let offers = offered(req.headers(), STREAM_PROTOCOL_HEADER);
    let protocol = negotiate_protocol(&offers, supported)
        .ok_or_else(|| Box::new(protocol_refusal(&offers, supported)))?;
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    headers.insert(
        HeaderName::from_static(STREAM_PROTOCOL_HEADER),
        HeaderValue::from_static(protocol),
    );
    Ok((response, hyper::upgrade::on(req)))
}

/// A SubjectAccessReview answered by the store's RBAC, as the apiserver's RBAC authorizer
/// would: `allowed` with the granting binding named, or not allowed with no reason.
async fn subject_access_review(
    shared: &Shared,
    req: Request<Incoming>,
    caller: &Identity,
) -> Response<Body> {
    let create = Attributes {
        verb: "create".into(),
        group: "authorization.k8s.io".into(),
        resource: "subjectaccessreviews".into(),
        namespace: String::new(),
        name: String::new(),
    };
    if !caller.unrestricted && !rbac::allows(&shared.store, &caller.user, &caller.groups, &create) {
        let message = rbac::forbidden_message(&caller.user, &create);
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    if shared.reviews_failing.load(Ordering::Relaxed) {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: the authorizer is unavailable",
        );
    }
    let mut review = match read_object(req, false).await {
        Ok(review) => review,
        Err(refusal) => return *refusal,
    };
    let spec = &review["spec"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let attributes = &spec["resourceAttributes"];
    let subresource = text(&attributes["subresource"]);
    let resource = if subresource.is_empty() {
        text(&attributes["resource"])
    } else {
        format!("{}/{subresource}", text(&attributes["resource"]))
    };
    let wanted = Attributes {
        verb: text(&attributes["verb"]),
        group: text(&attributes["group"]),
        resource,
        namespace: text(&attributes["namespace"]),
        name: text(&attributes["name"]),
    };
    let groups: Vec<String> = spec["groups"]
        .as_array()
        .map(|gs| gs.iter().map(text).collect())
        .unwrap_or_default();
    let user = text(&spec["user"]);
    let allowed = groups.iter().any(|g| g == "system:masters")
        || rbac::allows(&shared.store, &user, &groups, &wanted);
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by a ClusterRoleBinding"})
    } else {
        json!({"allowed": false})
    };
    review["metadata"] = json!({"creationTimestamp": null});
    json_response(StatusCode::CREATED, &review)
}

/// A TokenReview: who the token in `spec.token` stands for, as this server authenticates it.
async fn token_review(
    shared: &Shared,
    req: Request<Incoming>,
    caller: &Identity,
) -> Response<Body> {
    let create = Attributes {
        verb: "create".into(),
        group: discovery::AUTHENTICATION_GROUP.into(),
        resource: "tokenreviews".into(),
        namespace: String::new(),
        name: String::new(),
    };
    if !caller.unrestricted && !rbac::allows(&shared.store, &caller.user, &caller.groups, &create) {
        let message = rbac::forbidden_message(&caller.user, &create);
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let mut review = match read_object(req, false).await {
        Ok(review) => review,
        Err(refusal) => return *refusal,
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    shared
        .token_reviews
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(token.clone());
    let mut headers = HeaderMap::new();
    let identity = HeaderValue::from_str(&format!("Bearer {token}"))
        .ok()
        .and_then(|bearer| {
            headers.insert(header::AUTHORIZATION, bearer);
            match authenticate(shared, &headers) {
                Authentication::Authenticated(identity) => Some(identity),
                _ => None,
            }
        });
    review["status"] = match identity {
        Some(identity) => json!({
            "authenticated": true,
            "user": {"username": identity.user, "groups": identity.groups},
            "audiences": ["https://kubernetes.default.svc"],
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review["metadata"] = json!({"creationTimestamp": null});
    json_response(StatusCode::CREATED, &review)
}

/// `kubectl auth whoami`: reports who the server thinks the caller is, impersonation included.
fn self_subject_review(identity: &Identity) -> Response<Body> {
    let review = json!({
        "kind": "SelfSubjectReview",
        "apiVersion": format!("{}/v1", discovery::AUTHENTICATION_GROUP),
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {
            "username": identity.user,
            "uid": identity.uid,
            "groups": identity.groups,
            "extra": identity.extra,
        }},
    });
    json_response(StatusCode::CREATED, &review)
}

/// Decoded query parameters, repeated names kept in order (exec's `command`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        Query(
            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

fn set_content_type(response: &mut Response<Body>, value: &'static str) {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(
        serde_json::to_vec(value).expect("a JSON value serializes"),
    ));
    *response.status_mut() = code;
    set_content_type(&mut response, "application/json");
    response
}

fn text_response(text: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(full(text));
    set_content_type(&mut response, "text/plain");
    response
}

/// A `metav1.Status` failure, which kubectl turns into its familiar error messages.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    status_with_details(code, reason, message, None)
}

fn status_with_details(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    json_response(code, &body)
}

fn not_found(r: &Resource, name: &str) -> Response<Body> {
    let mut details = json!({"name": name, "kind": r.plural});
    if !r.group.is_empty() {
        details["group"] = json!(r.group);
    }
    status_with_details(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", r.qualified()),
        Some(details),
    )
}

/// A kubeconfig for the HTTPS server at `url`, its certificate issued by `ca_pem`, presenting
/// `token`.
pub fn kubeconfig_yaml(url: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: standin\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: standin\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\n\
         current-context: standin\n",
    )
}

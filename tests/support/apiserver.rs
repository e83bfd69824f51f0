//! A stand-in Kubernetes API server for integration tests: real TLS with its own CA, HTTP/2
//! and HTTP/1.1, bearer-token authentication, a record of every request, and routing to the
//! handful of endpoints kubectl needs for get/watch/logs/exec/attach/port-forward.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use clusterconnect::tls::{server_config, CertificateAuthority};
use clusterconnect::tunnel::upgrade::{
    header_has_token, is_websocket, server_stream, switching_protocols,
};
use clusterconnect::tunnel::WsStream;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
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
use super::objects::{IncludeObject, Kind, Render, Selector, Store};
use super::portforward;
use super::remotecommand::{self, Session};

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
    /// The extras of `user` (from `Impersonate-Extra-*`, keys unescaped).
    pub extra: BTreeMap<String, Vec<String>>,
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
    token: String,
    agent_token: String,
    requests: Mutex<Vec<SeenRequest>>,
    store: Store,
    tasks: Tasks,
}

pub struct ApiServer {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 with a fresh CA and token; serves until dropped.
    pub async fn start() -> ApiServer {
        let ca = CertificateAuthority::generate("standin-apiserver-ca").expect("generate CA");
        let cert = ca
            .issue_server(&["127.0.0.1", "localhost"])
            .expect("issue server certificate");
        let tls = server_config(
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
            &[b"h2", b"http/1.1"],
        )
        .expect("server TLS config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            addr,
            token: Alphanumeric.sample_string(&mut rand::rng(), 40),
            agent_token: Alphanumeric.sample_string(&mut rand::rng(), 40),
            requests: Mutex::new(Vec::new()),
            store: Store::seeded(),
            tasks: Tasks::default(),
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

    pub fn addr(&self) -> SocketAddr {
        self.addr
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
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
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
            url = self.url(),
        )
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

    pub fn open_watches(&self) -> usize {
        self.shared.store.open_watches()
    }

    pub fn open_log_follows(&self) -> usize {
        self.shared.store.open_log_follows()
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
            let service_shared = conn_shared.clone();
            let service = service_fn(move |req| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let builder = auto::Builder::new(conn_shared.tasks.clone());
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
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
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
            groups: SERVICE_ACCOUNT_GROUPS.map(String::from).to_vec(),
            extra: BTreeMap::new(),
        },
        Some(t) if t == shared.agent_token => Identity {
            user: AGENT_SERVICE_ACCOUNT.to_string(),
            groups: AGENT_SERVICE_ACCOUNT_GROUPS.map(String::from).to_vec(),
            extra: BTreeMap::new(),
        },
        _ => return Authentication::Unauthenticated,
    };
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(String::from)
            .collect()
    };
    let user = values("impersonate-user").into_iter().next();
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
    if user.is_none() && groups.is_empty() && extra.is_empty() {
        return Authentication::Authenticated(caller);
    }
    // Like the apiserver's impersonation filter: the user is checked first, then each group,
    // then each extra; only the agent's account holds the impersonate verbs.
    if caller.user != AGENT_SERVICE_ACCOUNT {
        let (resource, group, name) = match (&user, groups.first(), extra.iter().next()) {
            (Some(user), _, _) => ("users".to_string(), "", user.clone()),
            (None, Some(group), _) => ("groups".to_string(), "", group.clone()),
            (None, None, Some((key, values))) => (
                format!("userextras/{key}"),
                "authentication.k8s.io",
                values.first().cloned().unwrap_or_default(),
            ),
            (None, None, None) => unreachable!("some impersonation was asked for"),
        };
        let message = format!(
            "{resource} \"{name}\" is forbidden: User \"{}\" cannot impersonate resource \"{resource}\" in API group \"{group}\" at the cluster scope",
            caller.user
        );
        let refusal = status_with_details(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &message,
            Some(json!({"name": name, "kind": resource})),
        );
        return Authentication::Refused(caller, Box::new(refusal));
    }
    let Some(user) = user else {
        let refusal = status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: requested impersonation of groups or extras without impersonating a user",
        );
        return Authentication::Refused(caller, Box::new(refusal));
    };
    let mut groups = groups;
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".to_string());
    }
    Authentication::Authenticated(Identity {
        user,
        groups,
        extra,
    })
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
            extra: identity.map(|i| i.extra.clone()).unwrap_or_default(),
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
    match segments.as_slice() {
        ["version"] if get => json_response(StatusCode::OK, &discovery::version()),
        ["healthz" | "livez" | "readyz"] if get => text_response("ok"),
        ["api"] if get => json_response(StatusCode::OK, &discovery::core_versions(shared.addr)),
        ["api", "v1"] if get => json_response(StatusCode::OK, &discovery::core_v1()),
        ["apis"] if get => json_response(StatusCode::OK, &discovery::groups()),
        ["apis", discovery::AUTHENTICATION_GROUP, "v1"] if get => {
            json_response(StatusCode::OK, &discovery::authentication_v1())
        }
        ["apis", discovery::AUTHENTICATION_GROUP, "v1", "selfsubjectreviews"]
            if req.method() == Method::POST =>
        {
            self_subject_review(&identity)
        }
        ["api", "v1", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            core_v1(&shared, req, &rest).await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// The `/api/v1/...` resources: namespaces, pods and the pod subresources.
async fn core_v1(shared: &Arc<Shared>, req: Request<Incoming>, rest: &[String]) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let get = req.method() == Method::GET;
    let store = &shared.store;
    match rest.as_slice() {
        ["namespaces"] if get => collection(shared, &req, &query, Kind::Namespace, None),
        ["pods"] if get => collection(shared, &req, &query, Kind::Pod, None),
        ["namespaces", ns, "pods"] if get => collection(shared, &req, &query, Kind::Pod, Some(ns)),
        ["namespaces", name] if get => single(shared, &req, &query, Kind::Namespace, "", name),
        ["namespaces", ns, "pods", name] if get => {
            single(shared, &req, &query, Kind::Pod, ns, name)
        }
        ["namespaces", ns, "pods", name, _] if !store.exists(Kind::Pod, ns, name) => {
            not_found(Kind::Pod, name)
        }
        ["namespaces", ns, "pods", name, "log"] if get => logs(shared, &query, ns, name),
        ["namespaces", _, "pods", _, "exec"] => {
            let session = Session {
                command: query.all("command"),
                stdin: query.flag("stdin"),
                stdout: query.flag("stdout"),
                stderr: query.flag("stderr"),
                tty: query.flag("tty"),
            };
            remote_command(shared, req, session)
        }
        ["namespaces", _, "pods", _, "attach"] => {
            let session = Session::attach(
                query.flag("stdin"),
                query.flag("stdout"),
                query.flag("stderr"),
                query.flag("tty"),
            );
            remote_command(shared, req, session)
        }
        ["namespaces", _, "pods", _, "portforward"] => port_forward(shared, req),
        ["namespaces" | "pods"]
        | ["namespaces", _]
        | ["namespaces", _, "pods"]
        | ["namespaces", _, "pods", _]
        | ["namespaces", _, "pods", _, "log"] => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
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

fn collection(
    shared: &Shared,
    req: &Request<Incoming>,
    query: &Query,
    kind: Kind,
    namespace: Option<&str>,
) -> Response<Body> {
    let mut selector = Selector {
        kind,
        namespace: namespace.map(String::from),
        name: None,
    };
    for term in query.get("fieldSelector").unwrap_or_default().split(',') {
        match term.split_once('=') {
            Some(("metadata.name", name)) => selector.name = Some(name.to_string()),
            Some(("metadata.namespace", ns)) => selector.namespace = Some(ns.to_string()),
            _ => {}
        }
    }
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
    let list = shared.store.list(&selector, render);
    rendered(list, render)
}

fn single(
    shared: &Shared,
    req: &Request<Incoming>,
    query: &Query,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    let render = negotiate(req, query);
    match shared.store.get(kind, namespace, name, render) {
        Some(object) => rendered(object, render),
        None => not_found(kind, name),
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
                portforward::serve(WsStream::new(ws)).await;
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

/// `kubectl auth whoami`: reports who the server thinks the caller is, impersonation included.
fn self_subject_review(identity: &Identity) -> Response<Body> {
    let review = json!({
        "kind": "SelfSubjectReview",
        "apiVersion": format!("{}/v1", discovery::AUTHENTICATION_GROUP),
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {
            "username": identity.user,
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

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    status_with_details(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.resource()),
        Some(json!({"name": name, "kind": kind.resource()})),
    )
}

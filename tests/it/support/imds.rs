//! Stand-ins for the managed identity endpoints: Azure IMDS (VMs, AKS nodes) and the Arc
//! agent's HIMDS (Arc-enabled servers, with its file-based challenge). Plain HTTP on 127.0.0.1
//! like the real ones on link-local and loopback addresses; tokens are minted by the Entra
//! stand-in so they validate against its keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tokio::net::TcpListener;

use super::body::Body;
use super::entra::Entra;
use super::serve::{self, Form, Refusal, TaskGuard};

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

fn invalid_request(description: &str) -> Response<Body> {
    serve::json(
        StatusCode::BAD_REQUEST,
        &json!({"error": "invalid_request", "error_description": description}),
    )
}

/// What both endpoints check before anything else: the path, `Metadata: true` and a resource.
fn token_request(req: &Request<Bytes>) -> Result<(String, Option<String>), Refusal> {
    if req.method() != Method::GET || req.uri().path() != TOKEN_PATH {
        return Err(Box::new(serve::text(StatusCode::NOT_FOUND, "Not Found")));
    }
    let metadata = req.headers().get("metadata").and_then(|v| v.to_str().ok());
    if !metadata.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(Box::new(invalid_request(
            "Required metadata header not specified",
        )));
    }
    let query = Form::parse(req.uri().query().unwrap_or_default().as_bytes());
    if query.get("api-version").is_none() {
        return Err(Box::new(invalid_request(
            "Required query variable 'api-version' is missing",
        )));
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return Err(Box::new(invalid_request(
            "Required query variable 'resource' is missing",
        )));
    };
    Ok((
        resource.to_string(),
        query.get("client_id").map(String::from),
    ))
}

/// The IMDS answer: every number a string.
fn token_answer(
    entra: &Entra,
    identity_oid: &str,
    client_id: &str,
    resource: &str,
) -> Response<Body> {
    let (token, lifetime) = entra
        .shared
        .issue_for_identity(identity_oid, client_id, resource);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let secs = lifetime.as_secs();
    serve::json(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "client_id": client_id,
            "expires_in": secs.to_string(),
            "expires_on": (now + secs).to_string(),
            "ext_expires_in": secs.to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

struct ImdsShared {
    entra: Entra,
    identity_oid: String,
    client_id: String,
    requests: AtomicUsize,
}

/// Azure IMDS with one user-assigned (or system-assigned) identity.
pub struct Imds {
    addr: std::net::SocketAddr,
    shared: Arc<ImdsShared>,
    _tasks: Arc<TaskGuard>,
}

impl Imds {
    pub async fn start(entra: &Entra, identity_oid: &str, client_id: &str) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(ImdsShared {
            entra: entra.clone(),
            identity_oid: identity_oid.to_string(),
            client_id: client_id.to_string(),
            requests: AtomicUsize::new(0),
        });
        let handler_shared = shared.clone();
        let tasks = serve::serve(listener, None, move |req| {
            let shared = handler_shared.clone();
            async move { shared.handle(&req) }
        });
        Imds {
            addr,
            shared,
            _tasks: tasks,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl ImdsShared {
    fn handle(&self, req: &Request<Bytes>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let (resource, client_id) = match token_request(req) {
            Ok(request) => request,
            Err(response) => return *response,
        };
        if client_id.is_some_and(|c| c != self.client_id) {
            return invalid_request("Identity not found");
        }
        token_answer(&self.entra, &self.identity_oid, &self.client_id, &resource)
    }
}

struct HimdsShared {
    entra: Entra,
    identity_oid: String,
    /// The Arc machine's system-assigned identity has an app id like any service principal.
    client_id: String,
    challenge_dir: PathBuf,
    /// Challenge file -> the secret written into it, until redeemed.
    outstanding: Mutex<HashMap<PathBuf, String>>,
    issued: AtomicUsize,
    redeemed: AtomicUsize,
}

/// The Arc agent's HIMDS: a token only for a caller that can read a root-only file.
pub struct Himds {
    addr: std::net::SocketAddr,
    shared: Arc<HimdsShared>,
    _tasks: Arc<TaskGuard>,
}

impl Himds {
    pub async fn start(entra: &Entra, identity_oid: &str, challenge_dir: &Path) -> Himds {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(HimdsShared {
            entra: entra.clone(),
            identity_oid: identity_oid.to_string(),
            client_id: uuid::Uuid::new_v4().to_string(),
            challenge_dir: challenge_dir.to_path_buf(),
            outstanding: Mutex::new(HashMap::new()),
            issued: AtomicUsize::new(0),
            redeemed: AtomicUsize::new(0),
        });
        let handler_shared = shared.clone();
        let tasks = serve::serve(listener, None, move |req| {
            let shared = handler_shared.clone();
            async move { shared.handle(&req) }
        });
        Himds {
            addr,
            shared,
            _tasks: tasks,
        }
    }

    /// `IDENTITY_ENDPOINT`.
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// `IMDS_ENDPOINT`.
    pub fn imds_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn challenges_issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    pub fn challenges_redeemed(&self) -> usize {
        self.shared.redeemed.load(Ordering::SeqCst)
    }
}

impl HimdsShared {
    fn handle(&self, req: &Request<Bytes>) -> Response<Body> {
        let (resource, _) = match token_request(req) {
            Ok(request) => request,
            Err(response) => return *response,
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .map(str::trim);
        if let Some(secret) = presented {
            let mut outstanding = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
            let file = outstanding
                .iter()
                .find(|(_, s)| s.as_str() == secret)
                .map(|(path, _)| path.clone());
            if let Some(file) = file {
                outstanding.remove(&file);
                drop(outstanding);
                let _ = std::fs::remove_file(&file);
                self.redeemed.fetch_add(1, Ordering::SeqCst);
                return token_answer(&self.entra, &self.identity_oid, &self.client_id, &resource);
            }
        }
        self.challenge()
    }

    /// A fresh secret in a new 0600 file, named in `WWW-Authenticate`.
    fn challenge(&self) -> Response<Body> {
        let secret = Alphanumeric.sample_string(&mut rand::rng(), 64);
        let path = self
            .challenge_dir
            .join(format!("{}.key", uuid::Uuid::new_v4()));
        write_private(&path, &secret);
        self.outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone(), secret);
        self.issued.fetch_add(1, Ordering::SeqCst);
        let mut response = serve::json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized_client", "error_description": "Authorization required: read the challenge file"}),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&format!("Basic realm={}", path.display()))
                .expect("challenge path is a valid header value"),
        );
        response
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).expect("create challenge file");
    file.write_all(contents.as_bytes())
        .expect("write challenge file");
}

const APP_SERVICE_PATH: &str = "/msi/token";

struct AppServiceShared {
    entra: Entra,
    identity_oid: String,
    client_id: String,
    /// `IDENTITY_HEADER`: what `X-IDENTITY-HEADER` must carry.
    header: String,
    requests: AtomicUsize,
}

/// App Service's managed identity endpoint (also Functions and Container Apps): a GET with
/// `api-version=2019-08-01` and `X-IDENTITY-HEADER`, answered with `expires_on` only. Plain HTTP
/// like the real one, or https with its own CA.
pub struct AppService {
    base: String,
    ca_pem: Option<String>,
    shared: Arc<AppServiceShared>,
    _tasks: Arc<TaskGuard>,
}

impl AppService {
    pub async fn start(
        entra: &Entra,
        identity_oid: &str,
        client_id: &str,
        https: bool,
    ) -> AppService {
        let (listener, tls, ca_pem) = if https {
            let (listener, tls, ca_pem) = serve::tls_listener("standin-appservice-ca").await;
            (listener, Some(tls), Some(ca_pem))
        } else {
            (
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                None,
                None,
            )
        };
        let addr = listener.local_addr().expect("local addr");
        let scheme = if https { "https" } else { "http" };
        let shared = Arc::new(AppServiceShared {
            entra: entra.clone(),
            identity_oid: identity_oid.to_string(),
            client_id: client_id.to_string(),
            header: Alphanumeric.sample_string(&mut rand::rng(), 32),
            requests: AtomicUsize::new(0),
        });
        let handler_shared = shared.clone();
        let tasks = serve::serve(listener, tls, move |req| {
            let shared = handler_shared.clone();
            async move { shared.handle(&req) }
        });
        AppService {
            base: format!("{scheme}://{addr}"),
            ca_pem,
            shared,
            _tasks: tasks,
        }
    }

    /// `IDENTITY_ENDPOINT`.
    pub fn identity_endpoint(&self) -> String {
        format!("{}{APP_SERVICE_PATH}", self.base)
    }

    /// `IDENTITY_HEADER`.
    pub fn identity_header(&self) -> String {
        self.shared.header.clone()
    }

    /// The CA of an https endpoint.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl AppServiceShared {
    fn handle(&self, req: &Request<Bytes>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let refuse = |status: StatusCode, message: &str| {
            serve::json(
                status,
                &json!({"statusCode": status.as_u16(), "message": message}),
            )
        };
        if req.method() != Method::GET || req.uri().path() != APP_SERVICE_PATH {
            return refuse(StatusCode::NOT_FOUND, "Not Found");
        }
        let header = req
            .headers()
            .get("x-identity-header")
            .and_then(|v| v.to_str().ok());
        if header != Some(self.header.as_str()) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "The X-IDENTITY-HEADER is missing or wrong",
            );
        }
        let query = Form::parse(req.uri().query().unwrap_or_default().as_bytes());
        if query.get("api-version") != Some("2019-08-01") {
            return refuse(StatusCode::BAD_REQUEST, "Unsupported api-version");
        }
        let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
            return refuse(StatusCode::BAD_REQUEST, "resource is missing");
        };
        if query.get("client_id").is_some_and(|c| c != self.client_id) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "No managed identity with this client id",
            );
        }
        let (token, lifetime) =
            self.entra
                .shared
                .issue_for_identity(&self.identity_oid, &self.client_id, resource);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        serve::json(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "expires_on": (now + lifetime.as_secs()).to_string(),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": self.client_id,
            }),
        )
    }
}

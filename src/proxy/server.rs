//! The proxy's local HTTPS endpoint for kubectl: checks the per-session local credential,
//! picks the cluster from the path prefix (`/clusters/<name>`), swaps in that cluster's real
//! credential, and sends the request through its tunnel.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use super::pool::StreamSlot;
use super::pool::{Pool, SendBody, TunnelError};
use super::watch_end::EndCleanly;
use crate::auth::{CredentialError, CredentialSource};
use crate::metrics::{kube_verb, session_kind, Open, ProxyMetrics};
use crate::secret::Secret;
use crate::tunnel::dial::DialError;
use crate::tunnel::http::{
    error_chain, full, gateway_error, is_upgrade, is_watch, splice_upgraded, status,
    strip_hop_by_hop, Body, BoxError,
};
use crate::tunnel::request_id;
use tracing::Instrument;

/// Where kubeconfig server URLs put the cluster name, the way Rancher addresses downstream
/// clusters: `https://127.0.0.1:47011/clusters/<name>`.
pub const CLUSTER_PREFIX: &str = "/clusters/";

/// One cluster: its tunnel and the credential injected on its requests.
pub struct Route {
    pub name: String,
    pub pool: Pool,
    pub credential: Arc<dyn CredentialSource>,
    /// The last refusal reason logged, and when (see `report_refusal`).
    pub last_refusal: Mutex<Option<(String, Instant)>>,
}

/// Refusals are short Status objects; more is not read.
const REFUSAL_BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no credential")]
    Credential(#[from] CredentialError),
    #[error("credential contains characters not allowed in an HTTP header")]
    BadCredential,
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl Route {
    /// Sends `req` (path relative to the apiserver) with this cluster's credential.
    pub async fn send(&self, mut req: Request<SendBody>) -> Result<Response<Incoming>, RouteError> {
        let token = self.credential.token().await?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| RouteError::BadCredential)?;
        bearer.set_sensitive(true);
        let upgrade = is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        req.headers_mut().insert(header::AUTHORIZATION, bearer);
        if upgrade {
            *req.version_mut() = Version::HTTP_11;
            req.headers_mut()
                .insert(header::HOST, HeaderValue::from_static("clusterconnect"));
            // Boxed: a dial of its own makes this path large, and inline every request's
            // future would be its size.
            return Ok(Box::pin(self.pool.send_upgrade(req)).await?);
        }
        // HTTP/2 needs an absolute URI for :scheme and :authority; the agent replaces both.
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(uri) = format!("http://clusterconnect{pq}").parse::<Uri>() {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
        Ok(self.pool.send(req).await?)
    }

    /// Asks the apiserver for `/version` through the tunnel: the proof that relay, agent,
    /// apiserver and credential all work.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let mut req = Request::new(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *req.uri_mut() = Uri::from_static("/version");
        match self.send(req).await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => {
                let status = resp.status();
                let limited = http_body_util::Limited::new(resp.into_body(), REFUSAL_BODY_LIMIT);
                let body = limited
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body = String::from_utf8_lossy(&body);
                Err(ProbeError::Answered {
                    status,
                    body: body
                        .chars()
                        .take(300)
                        .collect::<String>()
                        .trim()
                        .to_string(),
                })
            }
            Err(source) => Err(ProbeError::Tunnel {
                cluster: self.name.clone(),
                source,
            }),
        }
    }
}

/// Why a cluster did not answer `/version` through the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no cluster named '{0}'")]
    UnknownCluster(String),
    #[error("{} (HTTP {status}): {body}", answer_meaning(*status))]
    Answered { status: StatusCode, body: String },
    #[error("{}", headline(cluster, source))]
    Tunnel {
        cluster: String,
        #[source]
        source: RouteError,
    },
}

impl ProbeError {
    /// Whether waiting can help: the agent has not connected to the relay yet, the relay is not
    /// reachable yet (restarting), or the agent could not serve the request this time.
    pub fn is_transient(&self) -> bool {
        match self {
            ProbeError::Answered { status, .. } => matches!(status.as_u16(), 502..=504),
            ProbeError::Tunnel { source, .. } => unavailable(source),
            ProbeError::UnknownCluster(_) => false,
        }
    }
}

fn answer_meaning(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "the apiserver rejected the credential",
        403 => "the credential may not read /version",
        502..=504 => "the cluster agent could not serve the request",
        _ => "unexpected answer",
    }
}

impl Route {
    /// Logs why the agent or apiserver refused the credential. kubectl shows only "You must be
    /// logged in to the server" for most commands, so the reason (an Entra check that failed,
    /// an expired service-account token) would otherwise be invisible. Logged once a minute per
    /// distinct reason; the answer itself passes on unchanged.
    async fn report_refusal(&self, resp: Response<Incoming>) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let limited = http_body_util::Limited::new(body, REFUSAL_BODY_LIMIT);
        let bytes = match limited.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        let mut last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
        let repeat = last
            .as_ref()
            .is_some_and(|(r, at)| *r == reason && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            tracing::warn!(cluster = %self.name, credential = %self.credential.describe(), %reason, "the cluster refused the credential (HTTP 401)");
            *last = Some((reason, Instant::now()));
        }
        Response::from_parts(parts, full(bytes))
    }
}

/// The tunnel failed because the other end is not there (yet): no agent listening, the relay
/// unreachable, or the agent draining. Waiting may help.
fn unavailable(e: &RouteError) -> bool {
    match e {
        RouteError::Tunnel(TunnelError::Dial(d)) => d.is_no_listener() || d.is_unreachable(),
        RouteError::Tunnel(TunnelError::Draining) => true,
        _ => false,
    }
}

/// A message a user can act on for a failed tunnel request, with the whole cause.
pub fn describe_failure(name: &str, e: &RouteError) -> String {
    format!("{} ({})", headline(name, e), error_chain(e))
}

/// What failed, in the user's terms; the cause is appended by whoever prints it.
fn headline(name: &str, e: &RouteError) -> String {
    match e {
        RouteError::Tunnel(TunnelError::Dial(d)) if d.is_no_listener() => {
            format!("clusterconnect: the cluster agent for '{name}' is not connected to the relay")
        }
        RouteError::Tunnel(TunnelError::Dial(d)) if d.is_auth() => format!(
            "clusterconnect: the relay refused the proxy's send token for '{name}'; check --key-file and that its rule has the Send right"
        ),
        RouteError::Tunnel(TunnelError::Dial(DialError::Rejected { .. })) => {
            format!("clusterconnect: the relay could not connect to the cluster agent for '{name}'")
        }
        RouteError::Credential(_) | RouteError::BadCredential => {
            format!("clusterconnect: no usable credential for '{name}'")
        }
        _ => format!("clusterconnect: tunnel to '{name}' failed"),
    }
}

/// The tunnel's answer, for kubectl: an upgrade spliced, a refusal reported, a watch that
/// ends cleanly when the tunnel breaks under it.
async fn answer(
    route: &Route,
    mut resp: Response<Incoming>,
    (downstream, session): (Option<OnUpgrade>, Option<Open>),
    watch: bool,
) -> Response<Body> {
    if let Some(downstream) = downstream {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            tokio::spawn(splice_upgraded(
                downstream,
                hyper::upgrade::on(&mut resp),
                session,
            ));
        }
    }
    if resp.status() == StatusCode::UNAUTHORIZED {
        let mut refused = Box::pin(route.report_refusal(resp)).await;
        *refused.version_mut() = Version::HTTP_11;
        return refused;
    }
    let (mut parts, body) = resp.into_parts();
    // Our client may speak HTTP/1.1 even though the tunnel spoke HTTP/2.
    parts.version = Version::HTTP_11;
    // The request's place on its pooled connection lasts as long as its body (a watch's for
    // hours), so the pool sees which connections are full.
    let slot = parts.extensions.remove::<StreamSlot>();
    let body = if watch {
        holding(EndCleanly::new(body), slot)
            .map_err(BoxError::from)
            .boxed_unsync()
    } else {
        holding(body, slot).map_err(BoxError::from).boxed_unsync()
    };
    Response::from_parts(parts, body)
}

/// `body`, keeping `slot` until it is dropped.
fn holding<B>(
    body: B,
    slot: Option<StreamSlot>,
) -> impl hyper::body::Body<Data = B::Data, Error = B::Error> + Send + 'static
where
    B: hyper::body::Body + Send + 'static,
{
    body.map_frame(move |frame| {
        let _held = &slot;
        frame
    })
}

pub struct Handler {
    pub routes: Vec<Route>,
    /// What the kubeconfig holds instead of the real credentials.
    pub local_secret: Secret,
    pub metrics: ProxyMetrics,
}

impl Handler {
    /// The route a request path names, and the path with the prefix removed. A lone cluster
    /// also answers unprefixed paths, so `curl https://127.0.0.1:47011/version` works.
    /// Without a prefix, the cluster the credential names serves the request: `kubectl get
    /// --raw` and other absolute paths drop the server URL's path.
    fn route_for<'a>(&'a self, path: &str, named: Option<&'a Route>) -> Option<(&'a Route, usize)> {
        if let Some(rest) = path.strip_prefix(CLUSTER_PREFIX) {
            let name = rest.split('/').next().unwrap_or_default();
            if let Some(route) = self.routes.iter().find(|r| r.name == name) {
                return Some((route, CLUSTER_PREFIX.len() + name.len()));
            }
        }
        if let Some(route) = named {
            return Some((route, 0));
        }
        match self.routes.as_slice() {
            [only] => Some((only, 0)),
            _ => None,
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let Some(named) = self.local_credential(&req) else {
            self.metrics.auth_failure("local_credential");
            tracing::info!(path = %req.uri().path(), "request without the session's local credential refused");
            return Ok(status(
                401,
                "Unauthorized",
                "this clusterconnect proxy only serves the kubeconfig it wrote (missing or wrong local credential)",
            ));
        };
        let Some((route, strip)) = self.route_for(req.uri().path(), named) else {
            let names: Vec<_> = self.routes.iter().map(|r| r.name.as_str()).collect();
            return Ok(status(
                404,
                "NotFound",
                &format!(
                    "no cluster at this path; this proxy serves {CLUSTER_PREFIX}{{{}}}",
                    names.join(",")
                ),
            ));
        };
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let rest = &pq[strip..];
        let rest = if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        };
        let watch = is_watch(&rest);
        parts.uri = match rest.parse::<Uri>() {
            Ok(u) => u,
            Err(_) => return Ok(status(400, "BadRequest", "request path is not a valid URI")),
        };
        let request_id = request_id::ensure(&mut parts.headers);
        // One span per request, joined to the agent's by the request id and to the relay's by
        // the rendezvous (`sb_hc_id`, recorded once the pool picked one). No query: it is not
        // needed to follow a call and would put whatever it holds into the log.
        let span = tracing::info_span!(
            "request",
            %request_id,
            cluster = %route.name,
            method = %parts.method,
            path = %parts.uri.path(),
            sb_hc_id = tracing::field::Empty,
        );
        let mut req = Request::from_parts(parts, body.boxed());
        let downstream = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let verb = kube_verb(&method, &rest);
        let started = Instant::now();

        // Boxed: alive only until the answer's headers are in, not while its body streams.
        let sent = Box::pin(route.send(req).instrument(span.clone())).await;
        let resp = match sent {
            Ok(resp) => {
                span.in_scope(|| tracing::debug!(status = resp.status().as_u16(), "request"));
                if resp.status() == StatusCode::UNAUTHORIZED {
                    self.metrics.auth_failure("apiserver");
                }
                let session = (downstream.is_some()
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| session_kind(&rest))
                    .flatten()
                    .map(|kind| self.metrics.session(&route.name, kind));
                answer(route, resp, (downstream, session), watch)
                    .instrument(span)
                    .await
            }
            Err(e) => {
                let message = describe_failure(&route.name, &e);
                span.in_scope(|| tracing::warn!(error = %message, "tunnel request failed"));
                // Plain text, not a Status: kubectl's discovery shows a 5xx's text body
                // but swaps a Status's message for a generic one.
                let mut resp = gateway_error(&message);
                // The id to quote, as the apiserver would have returned it.
                if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                    resp.headers_mut().insert(request_id::HEADER, v);
                }
                resp
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics
            .request(&route.name, verb, resp.status().as_u16(), elapsed);
        Ok(resp)
    }

    /// `None` when the request lacks the session's credential; else the cluster the
    /// kubeconfig token names, if it names one (see [`super::local_token`]).
    fn local_credential(&self, req: &Request<Incoming>) -> Option<Option<&Route>> {
        let value = req.headers().get(header::AUTHORIZATION)?;
        let presented = value.as_bytes().strip_prefix(b"Bearer ")?;
        let (secret, name) = match presented.iter().position(|b| *b == b'.') {
            Some(dot) => (&presented[..dot], Some(&presented[dot + 1..])),
            None => (presented, None),
        };
        if !self.local_secret.ct_eq(secret) {
            return None;
        }
        match name {
            None => Some(None),
            Some(name) => self
                .routes
                .iter()
                .find(|r| r.name.as_bytes() == name)
                .map(Some),
        }
    }
}

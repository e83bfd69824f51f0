//! The agent's audit log (`agent --audit-log PATH`, `-` for stdout): one JSON line per
//! request, and for an upgraded session (exec, attach, port-forward) one when it starts and one
//! when it ends, saying who did what to which path, the outcome, and the bytes each way.
//!
//! Never a token: an Entra caller is named from its validated token, a passed-through bearer
//! token by a TokenReview (`token_review`), started when the request arrives and never
//! waited for by it; the line waits for it instead, in the writer.
//!
//! Lines go through a bounded queue ([`QUEUE`]) to one writer task. A full queue drops the
//! line and counts it rather than holding up kubectl; the writer then writes a `lines_dropped`
//! line with the count and warns in the agent's log, so a gap in the log is itself on record.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, Uri};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::token_review::{Reviewed, TokenReviews};
use super::upstream::Upstream;
use crate::auth::CredentialSource;
use crate::tunnel::http::{go_parse_bool, Body, BoxError, Counted};

/// Lines waiting for the writer. At a few hundred bytes each, 8192 is a few MiB at most, and
/// seconds of a busy cluster's requests: enough to ride out a slow disk.
pub const QUEUE: usize = 8192;
/// Lines written with one write call.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {} (it is created with mode 0600 if missing, and never through a symlink)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is stdout, anything else a file path.
    pub fn parse(text: &str) -> Target {
        match text {
            "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

/// The credential a request came with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    /// A Microsoft Entra ID token (validated, or refused, by the agent).
    Entra,
    /// A bearer token the apiserver authenticates as a service account.
    ServiceAccount,
    /// Any other bearer token (including ones the apiserver does not accept).
    Bearer,
    /// No bearer token.
    None,
}

/// Who a request is from, as far as the agent knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    /// `None` when unknown: no token, a refused one, or a failed TokenReview.
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub credential: Credential,
}

impl Who {
    pub fn unknown(credential: Credential) -> Who {
        Who {
            user: None,
            groups: Vec::new(),
            credential,
        }
    }

    fn reviewed(reviewed: &Reviewed) -> Who {
        match reviewed {
            Reviewed::Authenticated { user, groups } => Who {
                credential: if user.starts_with("system:serviceaccount:") {
                    Credential::ServiceAccount
                } else {
                    Credential::Bearer
                },
                user: Some(user.clone()),
                groups: groups.clone(),
            },
            Reviewed::Unauthenticated | Reviewed::Failed => Who::unknown(Credential::Bearer),
        }
    }
}

/// Who, now or once its TokenReview answers.
#[derive(Clone)]
pub enum Identity {
    Known(Arc<Who>),
    /// A bearer token not reviewed yet: the review starts once the answer's status is known
    /// (see [`Identity::settle`]).
    Unreviewed(Arc<Unreviewed>),
    Pending(Shared<BoxFuture<'static, Arc<Who>>>),
}

/// What a TokenReview needs, kept until the request's status says whether one is worth it.
pub struct Unreviewed {
    log: Arc<AuditLog>,
    upstream: Arc<Upstream>,
    token: crate::secret::Secret,
}

impl Identity {
    /// Starts the TokenReview of a passed-through token, unless the apiserver already
    /// refused the token (401): a flood of garbage tokens then costs no reviews.
    fn settle(self, status: u16) -> Identity {
        let Identity::Unreviewed(unreviewed) = self else {
            return self;
        };
        // A drop outside the runtime (its shutdown) has nowhere to run a review.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Identity::Known(Arc::new(Who::unknown(Credential::Bearer)));
        };
        if status == 401 {
            return Identity::Known(Arc::new(Who::unknown(Credential::Bearer)));
        }
        let review = runtime.spawn(async move {
            let reviewed = unreviewed
                .log
                .reviews
                .review(unreviewed.token.expose(), &unreviewed.upstream)
                .await;
            Arc::new(Who::reviewed(&reviewed))
        });
        let pending = async move {
            review
                .await
                .unwrap_or_else(|_| Arc::new(Who::unknown(Credential::Bearer)))
        };
        Identity::Pending(pending.boxed().shared())
    }

    async fn resolve(self) -> Arc<Who> {
        match self {
            Identity::Known(who) => who,
            Identity::Unreviewed(_) => Arc::new(Who::unknown(Credential::Bearer)),
            Identity::Pending(pending) => pending.await,
        }
    }
}

pub struct AuditLog {
    cluster: Arc<str>,
    queue: mpsc::Sender<Pending>,
    dropped: Arc<AtomicU64>,
    /// Entries whose line is still to come (requests and sessions in flight): closing waits
    /// for them, so what the agent's shutdown cuts is still written.
    live: AtomicU64,
    reviews: TokenReviews,
    /// Tells the writer to take no more lines and write out those queued (see [`close`]).
    ///
    /// [`close`]: AuditLog::close
    closing: CancellationToken,
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl AuditLog {
    /// Opens `target` and starts its writer task (so it must be called within the runtime).
    /// `own_token` is the agent's credential for TokenReviews; without one, bearer callers are
    /// audited as unknown.
    pub fn open(
        target: &Target,
        cluster: &str,
        own_token: Option<Arc<dyn CredentialSource>>,
    ) -> Result<AuditLog, AuditError> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match target {
            Target::Stdout => Box::new(tokio::io::stdout()),
            Target::File(path) => Box::new(tokio::fs::File::from_std(open_append(path)?)),
        };
        if own_token.is_none() {
            tracing::warn!("the agent has no apiserver credential of its own: the audit log cannot name callers whose tokens it passes through (no TokenReviews)");
        }
        let (queue, lines) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let closing = CancellationToken::new();
        let writer = tokio::spawn(write_lines(lines, out, dropped.clone(), closing.clone()));
        Ok(AuditLog {
            cluster: cluster.into(),
            queue,
            dropped,
            live: AtomicU64::new(0),
            reviews: TokenReviews::new(own_token),
            closing,
            writer: std::sync::Mutex::new(Some(writer)),
        })
    }

    /// Writes out the lines queued so far, within `within`; later lines are dropped. For the
    /// agent's shutdown, so the last requests before a restart stay on record.
    pub async fn close(&self, within: std::time::Duration) {
        // Requests cut by the agent's shutdown write their lines as their tasks wind down:
        // half the time is for them, the rest for writing.
        let deadline = tokio::time::Instant::now() + within / 2;
        while self.live.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.closing.cancel();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            if tokio::time::timeout(within, writer).await.is_err() {
                tracing::warn!("the audit log's last lines were not written in time");
            }
        }
    }

    /// Who a passed-through bearer token stands for: known at once when its review is cached,
    /// else reviewed once the answer's status is known (in its own task, so the request never
    /// waits).
    pub fn identify(self: &Arc<Self>, token: &str, upstream: &Arc<Upstream>) -> Identity {
        if let Some(reviewed) = self.reviews.cached(token) {
            return Identity::Known(Arc::new(Who::reviewed(&reviewed)));
        }
        Identity::Unreviewed(Arc::new(Unreviewed {
            log: self.clone(),
            upstream: upstream.clone(),
            token: crate::secret::Secret::new(token),
        }))
    }

    fn send(&self, line: Pending) {
        if self.queue.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens `path` for appending: created with mode 0600 when missing, never through a symlink
/// (`O_NOFOLLOW`: a link planted at the name fails the open instead of redirecting the log).
fn open_append(path: &Path) -> Result<std::fs::File, AuditError> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// One request's line in the making: started when the request arrives, sent when its answer
/// is complete (or, for a session, when it starts and when it ends). An entry dropped before
/// any answer (the caller went away) is still written, with status 0.
pub struct Entry {
    log: Arc<AuditLog>,
    request_id: String,
    verb: &'static str,
    path: String,
    impersonate_user: Option<String>,
    started: Instant,
    identity: Identity,
    /// Request body bytes, counted by [`Counted`].
    bytes_in: Arc<AtomicU64>,
    /// A session started, so the line owed is its end.
    in_session: bool,
    written: bool,
}

impl Entry {
    /// `headers` as the caller sent them: their `Impersonate-User` is the caller's `--as`.
    pub fn new(
        log: Arc<AuditLog>,
        request_id: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Entry {
        log.live.fetch_add(1, Ordering::AcqRel);
        Entry {
            log,
            request_id: request_id.to_string(),
            verb: verb(method, uri.path(), uri.query()),
            path: bounded(uri.path()),
            impersonate_user: headers
                .get("impersonate-user")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(bounded),
            started: Instant::now(),
            identity: Identity::Known(Arc::new(Who::unknown(credential_of(headers)))),
            bytes_in: Arc::new(AtomicU64::new(0)),
            in_session: false,
            written: false,
        }
    }

    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    pub fn set_identity(&mut self, identity: Identity) {
        self.identity = identity;
    }

    /// The request body, counted into this entry.
    pub fn count_request<B>(&self, body: B) -> Counted<B> {
        Counted::new(body, Some(self.bytes_in.clone()))
    }

    /// The answer's body, counted; the line is written when it ends or is dropped.
    pub fn respond(mut self, resp: http::Response<Body>) -> http::Response<Body> {
        let status = resp.status().as_u16();
        self.settle(status);
        resp.map(|inner| {
            http_body_util::BodyExt::boxed_unsync(Audited {
                inner,
                entry: self,
                status,
                bytes_out: 0,
            })
        })
    }

    pub fn session_start(&mut self) {
        self.settle(101);
        self.send(Event::SessionStart, 101, 0, 0);
        self.in_session = true;
    }

    /// The end of an upgraded session and the bytes each way.
    pub fn session_end(mut self, bytes_in: u64, bytes_out: u64) {
        self.send(Event::SessionEnd, 101, bytes_in, bytes_out);
        self.written = true;
    }

    fn settle(&mut self, status: u16) {
        let identity = std::mem::replace(
            &mut self.identity,
            Identity::Known(Arc::new(Who::unknown(Credential::Bearer))),
        );
        self.identity = identity.settle(status);
    }

    fn send(&self, event: Event, status: u16, bytes_in: u64, bytes_out: u64) {
        self.log.send(Pending {
            time: SystemTime::now(),
            event,
            request_id: self.request_id.clone(),
            cluster: self.log.cluster.clone(),
            identity: self.identity.clone(),
            impersonate_user: self.impersonate_user.clone(),
            verb: self.verb,
            path: self.path.clone(),
            status,
            bytes_in,
            bytes_out,
            duration_ms: self.started.elapsed().as_millis() as u64,
        });
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.written {
            // A session whose splice never reported (the agent stopping under it) still ends
            // on record, its bytes unknown.
            if self.in_session {
                self.send(Event::SessionEnd, 101, 0, 0);
            } else {
                self.settle(0);
                let bytes_in = self.bytes_in.load(Ordering::Relaxed);
                self.send(Event::Request, 0, bytes_in, 0);
            }
        }
        // After its line is queued: `close` waits for this.
        self.log.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The longest a caller-chosen field (path, `--as` user) is written: a line stays small
/// whatever a caller sends, so the queue's bound ([`QUEUE`] lines) bounds its memory too.
pub const MAX_FIELD: usize = 2048;

/// `text` cut to [`MAX_FIELD`] bytes at a character boundary, marked when cut.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_FIELD {
        return text.to_string();
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...(truncated)", &text[..end])
}

/// The credential `headers` present, before the agent looked at it (an Entra token is told
/// apart by the agent's authenticator, which overrides this).
pub fn credential_of(headers: &HeaderMap) -> Credential {
    match bearer(headers) {
        Some(_) => Credential::Bearer,
        None => Credential::None,
    }
}

/// The bearer token of `headers`, if any (scheme case-insensitive, as the apiserver reads it).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
}

/// The Kubernetes verb of a request, as the apiserver's request-info resolver names it, but
/// with the session kinds (`exec`, `attach`, `portforward`, `proxy`) named for what they are
/// rather than the `create`/`get` they are authorized as.
pub fn verb(method: &Method, path: &str, query: Option<&str>) -> &'static str {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match parts.as_slice() {
        ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] if !rest.is_empty() => rest,
        _ => return non_resource_verb(method),
    };
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    // `namespaces/<ns>/<resource>...`, except a namespace's own subresources.
    let rest = match rest {
        ["namespaces", _, sub, ..] if *sub == "status" || *sub == "finalize" => rest,
        ["namespaces", _, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    match rest.get(2).copied() {
        Some("exec") => return "exec",
        Some("attach") => return "attach",
        Some("portforward") => return "portforward",
        Some("proxy") => return "proxy",
        _ => {}
    }
    let named = rest.len() >= 2;
    let watching = watch_path
        || query.is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "watch" && go_parse_bool(&v))
        });
    match *method {
        Method::GET | Method::HEAD if watching => "watch",
        Method::GET | Method::HEAD if named => "get",
        Method::GET | Method::HEAD => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// Paths that are not resources (`/version`, `/healthz`, discovery) take the method's name.
fn non_resource_verb(method: &Method) -> &'static str {
    match *method {
        Method::GET => "get",
        Method::HEAD => "head",
        Method::POST => "post",
        Method::PUT => "put",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "unknown",
    }
}

/// A response body that writes its request's line when it ends or is dropped (a watch, when
/// the caller or the apiserver closes it).
struct Audited {
    inner: Body,
    entry: Entry,
    status: u16,
    bytes_out: u64,
}

impl HttpBody for Audited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        let bytes_in = self.entry.bytes_in.load(Ordering::Relaxed);
        self.entry
            .send(Event::Request, self.status, bytes_in, self.bytes_out);
        self.entry.written = true;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    Request,
    SessionStart,
    SessionEnd,
}

/// A line waiting for the writer (and perhaps for its TokenReview).
struct Pending {
    time: SystemTime,
    event: Event,
    request_id: String,
    cluster: Arc<str>,
    identity: Identity,
    impersonate_user: Option<String>,
    verb: &'static str,
    path: String,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: u64,
}

/// The line as written. Field order is the order in the file.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    event: Event,
    request_id: &'a str,
    cluster: &'a str,
    user: Option<&'a str>,
    groups: &'a [String],
    credential: Credential,
    #[serde(skip_serializing_if = "Option::is_none")]
    impersonate_user: Option<&'a str>,
    verb: &'a str,
    path: &'a str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: u64,
}

impl Pending {
    async fn render(self, out: &mut Vec<u8>) {
        let who = self.identity.clone().resolve().await;
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            event: self.event,
            request_id: &self.request_id,
            cluster: &self.cluster,
            user: who.user.as_deref(),
            groups: &who.groups,
            credential: who.credential,
            impersonate_user: self.impersonate_user.as_deref(),
            verb: self.verb,
            path: &self.path,
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: self.duration_ms,
        };
        // Plain strings and numbers: serializing them cannot fail.
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

/// Writes lines in batches until every sender is gone, flushing after each batch. A failing
/// write is warned about once, and again when writing works anew.
async fn write_lines(
    mut lines: mpsc::Receiver<Pending>,
    mut out: Box<dyn AsyncWrite + Send + Unpin>,
    dropped: Arc<AtomicU64>,
    closing: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut buf = Vec::new();
    let mut failing = false;
    loop {
        let received = tokio::select! {
            received = lines.recv_many(&mut batch, BATCH) => received,
            // A closed channel refuses new lines but still yields the queued ones, then ends.
            _ = closing.cancelled(), if !lines.is_closed() => {
                lines.close();
                continue;
            }
        };
        if received == 0 {
            break;
        }
        buf.clear();
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                lines = lost,
                queue = QUEUE,
                "audit log lines dropped: the writer fell behind"
            );
            let line = serde_json::json!({
                "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "event": "lines_dropped",
                "count": lost,
            });
            buf.extend_from_slice(line.to_string().as_bytes());
            buf.push(b'\n');
        }
        for pending in batch.drain(..) {
            pending.render(&mut buf).await;
        }
        match async {
            out.write_all(&buf).await?;
            out.flush().await
        }
        .await
        {
            Ok(()) if failing => {
                tracing::info!("audit log writable again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot write the audit log; its lines are lost until it is writable again");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn verbs_are_the_apiservers() {
        let cases = [
            ("GET", "/api/v1/namespaces/default/pods", None, "list"),
            ("GET", "/api/v1/namespaces/default/pods/web-0", None, "get"),
            (
                "GET",
                "/api/v1/pods",
                Some("watch=true&resourceVersion=5"),
                "watch",
            ),
            ("GET", "/api/v1/namespaces/d/pods", Some("watch=1"), "watch"),
            ("GET", "/api/v1/watch/namespaces/d/pods", None, "watch"),
            ("GET", "/api/v1/namespaces", None, "list"),
            ("GET", "/api/v1/namespaces/kube-system", None, "get"),
            ("PUT", "/api/v1/namespaces/x/finalize", None, "update"),
            (
                "POST",
                "/apis/apps/v1/namespaces/d/deployments",
                None,
                "create",
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/d/deployments/w",
                None,
                "patch",
            ),
            (
                "PUT",
                "/apis/apps/v1/namespaces/d/deployments/w/scale",
                None,
                "update",
            ),
            ("DELETE", "/api/v1/namespaces/d/pods/p", None, "delete"),
            (
                "DELETE",
                "/api/v1/namespaces/d/pods",
                None,
                "deletecollection",
            ),
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/exec",
                Some("command=ls"),
                "exec",
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/exec",
                Some("command=ls"),
                "exec",
            ),
            ("POST", "/api/v1/namespaces/d/pods/p/attach", None, "attach"),
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/portforward",
                None,
                "portforward",
            ),
            (
                "GET",
                "/api/v1/namespaces/d/services/s/proxy",
                None,
                "proxy",
            ),
            ("GET", "/version", None, "get"),
            ("GET", "/apis", None, "get"),
            ("GET", "/api/v1", None, "get"),
            (
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                None,
                "create",
            ),
        ];
        for (method, path, query, want) in cases {
            let method: Method = method.parse().unwrap();
            assert_eq!(
                verb(&method, path, query),
                want,
                "{method} {path}?{query:?}"
            );
        }
    }

    #[test]
    fn bearer_tokens_are_read_as_the_apiserver_reads_them() {
        let mut h = HeaderMap::new();
        assert_eq!(credential_of(&h), Credential::None);
        h.insert(AUTHORIZATION, "bearer abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        assert_eq!(credential_of(&h), Credential::Bearer);
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[tokio::test]
    async fn a_line_per_request_with_its_bytes_and_never_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&Target::File(path.clone()), "edge", None).unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "Bearer secret-token".parse().unwrap());
        let uri: Uri = "/api/v1/namespaces/d/pods?labelSelector=app%3Dsecret-token"
            .parse()
            .unwrap();
        let mut entry = Entry::new(log.clone(), "rid-1", &Method::GET, &uri, &headers);
        entry.set_identity(Identity::Known(Arc::new(Who {
            user: Some("system:serviceaccount:d:ci".into()),
            groups: vec!["system:authenticated".into()],
            credential: Credential::ServiceAccount,
        })));
        let resp = entry.respond(http::Response::new(crate::tunnel::http::full(
            Bytes::from_static(b"0123456789"),
        )));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 10);
        // Dropped before any answer: still a line.
        drop(Entry::new(
            log.clone(),
            "rid-2",
            &Method::DELETE,
            &uri,
            &HeaderMap::new(),
        ));
        // Closing writes out what is queued; nothing is taken after it.
        log.close(std::time::Duration::from_secs(5)).await;
        drop(Entry::new(
            log.clone(),
            "rid-3",
            &Method::GET,
            &uri,
            &headers,
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!text.contains("secret-token"), "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["event"], "request");
        assert_eq!(first["request_id"], "rid-1");
        assert_eq!(first["cluster"], "edge");
        assert_eq!(first["user"], "system:serviceaccount:d:ci");
        assert_eq!(first["credential"], "service-account");
        assert_eq!(first["verb"], "list");
        assert_eq!(first["path"], "/api/v1/namespaces/d/pods");
        assert_eq!(first["status"], 200);
        assert_eq!(first["bytes_out"], 10);
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["verb"], "deletecollection");
        assert_eq!(second["status"], 0);
        assert_eq!(second["user"], serde_json::Value::Null);
        assert_eq!(second["credential"], "none");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_symlink_at_the_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("audit.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(open_append(&link), Err(AuditError::Open { .. })));
    }
}

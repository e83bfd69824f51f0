//! Prometheus metrics: one [`Registry`] per process, filled by the role that runs there
//! ([`RelayMetrics`], [`AgentMetrics`], [`ProxyMetrics`]), and a small HTTP/1 server that
//! answers `GET /metrics` with the OpenMetrics text format.
//!
//! Every name starts with `clusterconnect_`, uses base units (seconds, bytes), and counters
//! end in `_total` (the encoder appends it). Labels take only a handful of values each (a
//! verb, a status class, a reason): never a user, a path or a token, which would make every
//! caller a new series.
//!
//! The role's handles are plain structs of cloned `Arc`'d counters handed to the code that
//! counts; each update is an atomic add. A handle made with `Default` is registered nowhere:
//! it counts into the void, which is what library users and tests that do not scrape get.

mod agent;
mod proxy;
mod relay;

pub use agent::AgentMetrics;
pub use proxy::ProxyMetrics;
pub use relay::RelayMetrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The one prefix of every metric name.
pub const PREFIX: &str = "clusterconnect";

/// OpenMetrics 1.0, which Prometheus asks for first and parses like its own text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapers come every few seconds, one connection at a time; beyond this many open
/// connections it is not a scraper, and the endpoint may be reachable by others.
pub const MAX_CONNECTIONS: usize = 16;
/// A scraper sends its request at once; a connection that has not within this is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, kept alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// A registry with the common prefix, for one process.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0:?} is not host:port")]
    Address(String),
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` (`host:port`; an unbracketed IPv6 host is accepted, as manifests pass pod
/// IPs) and serves the registry there until `shutdown`; returns the bound address.
pub async fn start(
    addr: &str,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let parsed = parse_addr(addr).ok_or_else(|| MetricsError::Address(addr.to_string()))?;
    let listener = TcpListener::bind(parsed)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: parsed,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: parsed,
        source,
    })?;
    tracing::info!(addr = %bound, "metrics listening");
    tokio::spawn(serve(listener, Arc::new(registry), shutdown));
    Ok(bound)
}

/// `host:port`, also with an unbracketed IPv6 host (the last `:` group is the port).
pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| {
        let (host, port) = s.rsplit_once(':')?;
        let ip = host.parse::<std::net::Ipv6Addr>().ok()?;
        Some(SocketAddr::from((ip, port.parse().ok()?)))
    })
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    serve_with(listener, registry, shutdown, HEADER_TIMEOUT).await
}

async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    header_timeout: Duration,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer)) = crate::net::accept(&listener, &shutdown).await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy; dropping a connection");
            continue;
        };
        let registry = registry.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| respond(req, registry.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(8 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = |code: StatusCode, body: String, content_type: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = code;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(answer(
            StatusCode::NOT_FOUND,
            "try /metrics\n".into(),
            PLAIN,
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
            PLAIN,
        ));
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => Ok(answer(StatusCode::OK, body, CONTENT_TYPE)),
        Err(_) => Ok(answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".into(),
            PLAIN,
        )),
    }
}

/// The Kubernetes verb of a request, as the apiserver's audit log names it: `watch`, `list`
/// and `get` for reads of a watch, a collection and one object; `create`, `update`, `patch`,
/// `delete` and `deletecollection` for writes. Paths outside `/api` and `/apis` (`/version`,
/// `/healthz`) are reads and writes of one thing. Only ever one of a fixed set of names.
pub fn kube_verb(method: &Method, path_and_query: &str) -> &'static str {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resource = match segments.as_slice() {
        ["api", _version, rest @ ..] => Some(rest),
        ["apis", _group, _version, rest @ ..] => Some(rest),
        _ => None,
    };
    let (collection, legacy_watch) = match resource {
        None | Some([]) => (false, false),
        Some(rest) => {
            let (legacy_watch, rest) = match rest {
                ["watch", rest @ ..] => (true, rest),
                rest => (false, rest),
            };
            let rest = match rest {
                ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
                rest => rest,
            };
            (rest.len() == 1, legacy_watch)
        }
    };
    let watch = legacy_watch
        || form_urlencoded::parse(query.as_bytes())
            .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if collection => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if collection => "deletecollection",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "other",
    }
}

/// `2xx` .. `5xx`: the status class, so a label has five values rather than sixty.
pub fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `exec`, `attach` or `portforward` for a pod subresource that upgrades into a session.
pub fn session_kind(path_and_query: &str) -> Option<&'static str> {
    let path = path_and_query.split('?').next().unwrap_or_default();
    match path.trim_end_matches('/').rsplit('/').next()? {
        "exec" => Some("exec"),
        "attach" => Some("attach"),
        "portforward" => Some("portforward"),
        _ => None,
    }
}

/// Adds the bytes that pass through a stream to two counters as they pass: read and written.
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Counter, written: Counter) -> Counted<S> {
        Counted {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.inc_by(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.inc_by(*n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One open thing on a gauge: added when made, taken off when dropped, however its task ends.
pub struct Open(prometheus_client::metrics::gauge::Gauge);

impl Open {
    pub fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Latency buckets in seconds, from a millisecond to half a minute (the relay's accept
/// timeout): a rendezvous takes a few round trips, a slow apiserver call a few seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// A one-label set, the shape of most families here.
pub type Label = [(&'static str, &'static str); 1];

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn verbs_follow_the_apiservers_names() {
        let cases = [
            ("GET", "/api/v1/namespaces/default/pods", "list"),
            ("GET", "/api/v1/pods", "list"),
            ("GET", "/api/v1/namespaces/default/pods/web-0", "get"),
            ("GET", "/api/v1/namespaces/default/pods/web-0/log", "get"),
            ("GET", "/api/v1/namespaces", "list"),
            ("GET", "/api/v1/namespaces/default", "get"),
            ("GET", "/api/v1/namespaces/default/pods?watch=true", "watch"),
            (
                "GET",
                "/api/v1/namespaces/default/pods?watch=1&x=y",
                "watch",
            ),
            ("GET", "/api/v1/watch/namespaces/default/pods", "watch"),
            ("GET", "/apis/apps/v1/namespaces/a/deployments", "list"),
            ("GET", "/apis/apps/v1/namespaces/a/deployments/d", "get"),
            ("POST", "/api/v1/namespaces/a/pods", "create"),
            (
                "POST",
                "/api/v1/namespaces/a/pods/p/exec?command=ls",
                "create",
            ),
            ("PUT", "/api/v1/namespaces/a/pods/p", "update"),
            ("PATCH", "/api/v1/namespaces/a/pods/p", "patch"),
            ("DELETE", "/api/v1/namespaces/a/pods/p", "delete"),
            ("DELETE", "/api/v1/namespaces/a/pods", "deletecollection"),
            ("GET", "/version", "get"),
            ("GET", "/apis", "get"),
            ("GET", "/api/v1", "get"),
            ("BREW", "/version", "other"),
        ];
        for (method, path, want) in cases {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(kube_verb(&method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn status_classes_and_session_kinds() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(502), "5xx");
        assert_eq!(
            session_kind("/api/v1/namespaces/a/pods/p/exec?command=ls"),
            Some("exec")
        );
        assert_eq!(
            session_kind("/api/v1/namespaces/a/pods/p/attach"),
            Some("attach")
        );
        assert_eq!(
            session_kind("/api/v1/namespaces/a/pods/p/portforward"),
            Some("portforward")
        );
        assert_eq!(session_kind("/api/v1/namespaces/a/pods/p/log"), None);
    }

    #[test]
    fn addresses_take_pod_ips_of_both_families() {
        assert_eq!(
            parse_addr("fd00::1:9090").map(|a| a.to_string()).as_deref(),
            Some("[fd00::1]:9090")
        );
        assert_eq!(
            parse_addr("0.0.0.0:9090").map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:9090")
        );
        assert_eq!(parse_addr("9090"), None);
    }

    #[tokio::test]
    async fn counted_streams_count_both_ways() {
        let (a, mut b) = tokio::io::duplex(64);
        let (read, written) = (Counter::default(), Counter::default());
        let mut a = Counted::new(a, read.clone(), written.clone());
        a.write_all(b"hello").await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!((read.get(), written.get()), (2, 5));
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn serves_the_registry_at_metrics_and_nothing_else() {
        let mut registry = registry();
        let relay = RelayMetrics::register(&mut registry);
        relay.limit_hit("max_connections");
        let stop = CancellationToken::new();
        let addr = start("127.0.0.1:0", registry, stop.clone()).await.unwrap();
        let answer = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(CONTENT_TYPE), "{answer}");
        assert!(
            answer.contains("clusterconnect_relay_limit_hits_total{limit=\"max_connections\"} 1"),
            "{answer}"
        );
        assert!(answer.contains("# EOF"), "{answer}");
        let other = get(
            addr,
            "GET /secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_closed_at_the_header_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(
            listener,
            Arc::new(registry()),
            stop.clone(),
            Duration::from_millis(200),
        ));
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"));
        stop.cancel();
    }
}

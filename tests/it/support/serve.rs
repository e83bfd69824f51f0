//! A small HTTP/1.1 server loop for the identity stand-ins (Entra, Graph, IMDS, HIMDS): TLS or
//! plain TCP, whole request bodies handed to a handler, and every task owned by a guard so
//! dropping the stand-in stops it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::body::{full, Body};

/// An HTTPS stand-in's listener on 127.0.0.1:0: a fresh CA named `ca_name`, a certificate
/// for 127.0.0.1 and localhost, and the acceptor. Returns the CA PEM clients trust.
pub async fn tls_listener(ca_name: &str) -> (TcpListener, TlsAcceptor, String) {
    use clusterconnect::tls::{server_config, CertificateAuthority};
    let ca = CertificateAuthority::generate(ca_name).expect("generate CA");
    let cert = ca
        .issue_server(&["127.0.0.1", "localhost"])
        .expect("issue server certificate");
    let tls = server_config(
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &[b"http/1.1"],
    )
    .expect("server TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    (listener, TlsAcceptor::from(tls), ca.cert_pem().to_string())
}

/// Identity requests are small forms and JSON documents.
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// The tasks of one stand-in (accept loop and connections); aborted when the guard drops.
#[derive(Default)]
pub struct TaskGuard(Mutex<JoinSet<()>>);

impl TaskGuard {
    fn spawn<F: Future<Output = ()> + Send + 'static>(self: &Arc<Self>, task: F) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished tasks so a long test does not accumulate their results.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

/// Serves `listener` until the returned guard is dropped. Connection tasks only hold a weak
/// reference to the guard, so the stand-in's handle is what keeps it alive.
pub fn serve<H, Fut>(listener: TcpListener, tls: Option<TlsAcceptor>, handler: H) -> Arc<TaskGuard>
where
    H: Fn(Request<Bytes>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let guard = Arc::new(TaskGuard::default());
    let weak = Arc::downgrade(&guard);
    guard.spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(guard) = weak.upgrade() else {
                return;
            };
            let (tls, handler) = (tls.clone(), handler.clone());
            guard.spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let response = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
                            Ok(collected) => {
                                handler(Request::from_parts(parts, collected.to_bytes())).await
                            }
                            Err(_) => text(StatusCode::BAD_REQUEST, "unreadable request body"),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                        let Ok(Ok(stream)) = handshake.await else {
                            return;
                        };
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                    }
                }
            });
        }
    });
    guard
}

/// An error answer returned early (boxed: responses are large).
pub type Refusal = Box<Response<Body>>;

pub fn json(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(
        serde_json::to_vec(value).expect("a JSON value serializes"),
    ));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

pub fn text(code: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(full(message.to_string()));
    *response.status_mut() = code;
    response
}

/// Decoded `application/x-www-form-urlencoded` pairs (a form body or a query string).
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(data: &[u8]) -> Form {
        Form(url::form_urlencoded::parse(data).into_owned().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

//! A tiny plain-HTTP server on 127.0.0.1 for the credential sources' unit tests: it records
//! every request and answers from a closure. The full Entra/IMDS stand-in lives in `tests/`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::http::{plain_http_client, HttpClient};
use super::source::{ChainOptions, StderrPrompt};
use super::{ARC_CLIENT_APP_ID, ARC_SERVER_APP_ID};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Recorded {
    /// The form fields of a urlencoded body.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .into_owned()
            .collect()
    }

    pub fn field(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

pub fn json(status: u16, body: serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
    }
}

pub struct TestServer {
    pub base: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl TestServer {
    /// Serves until the test's runtime ends; `answer` sees each request and how many came before.
    pub async fn start<F>(answer: F) -> TestServer
    where
        F: Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let answer = Arc::new(answer);
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let recorded = Recorded {
                                method: parts.method.to_string(),
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            let n = {
                                let mut all = seen.lock().unwrap();
                                all.push(recorded.clone());
                                all.len() - 1
                            };
                            let reply = answer(&recorded, n);
                            let mut resp = hyper::Response::builder().status(reply.status);
                            for (k, v) in reply.headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, Infallible>(
                                resp.body(Full::new(Bytes::from(reply.body))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { base, requests }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// A client for plain http:// test servers.
pub fn client() -> HttpClient {
    plain_http_client(Duration::from_secs(1), Duration::from_secs(5)).expect("a TLS-less client")
}

/// An authority whose host is a test server (the real constructor insists on https).
pub fn authority(base: &str) -> super::Authority {
    super::Authority {
        cloud: super::Cloud::AzurePublicCloud.into(),
        host: base.to_string(),
        graph: String::new(),
    }
}

/// Options pointing Entra at a test server, prompting nowhere, caching nowhere useful.
pub fn options(base: &str) -> ChainOptions {
    ChainOptions {
        authority: authority(base),
        tenant: None,
        server_app_id: ARC_SERVER_APP_ID.into(),
        client_app_id: ARC_CLIENT_APP_ID.into(),
        only: None,
        interactive: false,
        http: client(),
        config_dir: std::env::temp_dir().join("clusterconnect-test-unused"),
        prompt: Arc::new(StderrPrompt),
        pop: None,
    }
}

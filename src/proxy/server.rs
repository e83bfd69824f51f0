//! The proxy's local HTTPS endpoint for kubectl: checks the per-session local credential,
//! swaps in the real one, and sends each request through the tunnel.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::pool::{Pool, TunnelError};
use crate::auth::CredentialSource;
use crate::secret::Secret;
use crate::tunnel::dial::DialError;
use crate::tunnel::http::{
    error_chain, gateway_error, is_upgrade, splice_upgraded, status, strip_hop_by_hop, Body,
};

pub struct Route {
    pub pool: Pool,
    pub credential: Arc<dyn CredentialSource>,
}

pub struct Handler {
    pub route: Route,
    /// What the kubeconfig holds instead of the real credential.
    pub local_secret: Secret,
}

impl Handler {
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        if !self.local_credential_ok(&req) {
            tracing::info!(path = %req.uri().path(), "request without the session's local credential refused");
            return Ok(status(
                401,
                "Unauthorized",
                "this clusterconnect proxy only serves the kubeconfig it wrote (missing or wrong local credential)",
            ));
        }
        let token = match self.route.credential.token().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "no credential for the apiserver");
                return Ok(status(
                    503,
                    "ServiceUnavailable",
                    &format!("clusterconnect proxy has no credential: {e}"),
                ));
            }
        };
        let bearer = match HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
            Ok(mut v) => {
                v.set_sensitive(true);
                v
            }
            Err(_) => {
                return Ok(status(
                    500,
                    "InternalError",
                    "credential contains characters not allowed in a header",
                ))
            }
        };
        let upgrade = is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        req.headers_mut().insert(header::AUTHORIZATION, bearer);
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let method = req.method().clone();

        if upgrade {
            let downstream = hyper::upgrade::on(&mut req);
            *req.version_mut() = Version::HTTP_11;
            if let Ok(uri) = pq.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            req.headers_mut()
                .insert(header::HOST, HeaderValue::from_static("clusterconnect"));
            return Ok(match self.route.pool.target().send_upgrade(req).await {
                Ok(mut resp) => {
                    tracing::debug!(%method, path = %pq, status = resp.status().as_u16(), "upgrade");
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        splice_upgraded(downstream, hyper::upgrade::on(&mut resp));
                    }
                    resp.map(|b| b.boxed_unsync())
                }
                Err(e) => self.tunnel_failure(&e),
            });
        }

        // HTTP/2 needs an absolute URI for its :scheme and :authority; the agent replaces both.
        match format!("http://clusterconnect{pq}").parse::<Uri>() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return Ok(status(400, "BadRequest", "request path is not a valid URI")),
        }
        *req.version_mut() = Version::HTTP_2;
        Ok(match self.route.pool.send(req).await {
            Ok(resp) => {
                tracing::debug!(%method, path = %pq, status = resp.status().as_u16(), "request");
                let (mut parts, body) = resp.into_parts();
                // Our client may speak HTTP/1.1 even though the tunnel spoke HTTP/2.
                parts.version = Version::HTTP_11;
                Response::from_parts(parts, body.boxed_unsync())
            }
            Err(e) => self.tunnel_failure(&e),
        })
    }

    fn local_credential_ok(&self, req: &Request<Incoming>) -> bool {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let Some(presented) = value.as_bytes().strip_prefix(b"Bearer ") else {
            return false;
        };
        self.local_secret.ct_eq(presented)
    }

    fn tunnel_failure(&self, e: &TunnelError) -> Response<Body> {
        let entity = &self.route.pool.target().entity;
        let detail = error_chain(e);
        tracing::warn!(connection = %entity, error = %detail, "tunnel request failed");
        let message = match e {
            TunnelError::Dial(d) if d.is_no_listener() => {
                format!("clusterconnect: the cluster agent for connection '{entity}' is not connected to the relay ({detail})")
            }
            TunnelError::Dial(d) if d.is_auth() => format!(
                "clusterconnect: the relay refused the proxy's send token for '{entity}' ({detail}); check --key-file and that its rule has the Send right"
            ),
            TunnelError::Dial(DialError::Rejected { .. }) => {
                format!("clusterconnect: the relay could not connect to the cluster agent for '{entity}' ({detail})")
            }
            _ => format!("clusterconnect: tunnel to '{entity}' failed ({detail})"),
        };
        gateway_error(&message)
    }
}

//! Managed identity: Azure's Instance Metadata Service (VMs, VM scale sets, AKS nodes), on an
//! Arc-enabled server the Hybrid IMDS (HIMDS) of the Connected Machine agent, and the hosted
//! endpoints of App Service (Functions, Container Apps), Cloud Shell and Azure Machine Learning.
//! Which one is read from the environment in azure-identity's order: Service Fabric
//! (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`, `IDENTITY_SERVER_THUMBPRINT`: not supported), App
//! Service (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`), Arc (`IDENTITY_ENDPOINT`, `IMDS_ENDPOINT`),
//! Azure Machine Learning (`MSI_ENDPOINT`, `MSI_SECRET`), Cloud Shell (`MSI_ENDPOINT`), else
//! IMDS (`AZURE_POD_IDENTITY_AUTHORITY_HOST` or 169.254.169.254).
//!
//! These endpoints are plain HTTP on link-local and loopback addresses in Azure. Where one
//! speaks https instead, it is trusted through the system roots plus the environment's CA
//! bundle (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`).
//!
//! IMDS is a plain-HTTP GET with `Metadata: true`. Off Azure nothing answers at its link-local
//! address, so the first request connects with a one-second limit and the chain moves on.
//!
//! HIMDS (`IDENTITY_ENDPOINT` and `IMDS_ENDPOINT` set) proves the caller may use the machine's
//! identity with a challenge: the first GET is answered 401 with
//! `WWW-Authenticate: Basic realm=<file>`; the agent has just written a secret into that file,
//! readable only by root and the `himds` group, and the retry sends it as `Authorization: Basic`.
//! The file path comes from the network answer, so (as azure-identity does) it is only read if
//! it lies directly in the agent's token directory, ends in `.key` and is at most 4096 bytes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;

use crate::tunnel::http::error_chain;

use super::http::{plain_http_client, HttpClient, HttpError, HttpResponse};
use super::source::{ChainOptions, Environment, Source, SourceFuture, SourceKind};
use super::token_endpoint::{decode, EndpointError};
use super::{SourceError, TokenResponse};
use crate::auth::refresh::ExpiringToken;
use crate::secret::Secret;

pub const IMDS_BASE: &str = "http://169.254.169.254";
const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
/// Long enough for IMDS on a busy VM to accept a connection, short enough that a laptop
/// trying the chain does not notice.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// IMDS and HIMDS fetch tokens from Entra on the caller's behalf; give them that long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// azure-identity's limit on the challenge file; the agent writes far less.
const MAX_CHALLENGE_BYTES: u64 = 4096;

/// App Service's token API; the header carries `IDENTITY_HEADER`.
const APP_SERVICE_API: &str = "2019-08-01";
/// Azure Machine Learning's; the `secret` header carries `MSI_SECRET`.
const MACHINE_LEARNING_API: &str = "2017-09-01";
/// Hosted endpoints are local to the host: a connection that takes longer is not coming.
const HOSTED_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub enum ManagedIdentity {
    Imds(Imds),
    Arc(Himds),
    Hosted(Hosted),
}

impl ManagedIdentity {
    /// The endpoint the environment names, in azure-identity's order; IMDS when it names none.
    /// Never "not configured": whether IMDS exists is only known by asking it.
    pub fn from_env(
        env: &Environment,
        opts: &ChainOptions,
    ) -> Result<ManagedIdentity, SourceError> {
        let hosted = |kind: HostedKind, endpoint: &String, secret: Option<&Secret>| {
            Ok::<_, SourceError>(ManagedIdentity::Hosted(Hosted {
                kind,
                http: client_for(endpoint, env, HOSTED_CONNECT_TIMEOUT)?,
                endpoint: endpoint.clone(),
                secret: secret.cloned(),
                resource: opts.server_app_id.clone(),
                client_id: env.client_id.clone(),
            }))
        };
        if let Some(endpoint) = &env.identity_endpoint {
            if let Some(header) = &env.identity_header {
                if env.identity_server_thumbprint.is_some() {
                    return Err(SourceError::Unavailable(
                        "Service Fabric's managed identity (IDENTITY_SERVER_THUMBPRINT is set) is not supported; use a service principal or workload identity".into(),
                    ));
                }
                return hosted(HostedKind::AppService, endpoint, Some(header));
            }
            if env.imds_endpoint.is_some() {
                return Ok(ManagedIdentity::Arc(Himds {
                    http: client_for(endpoint, env, HOSTED_CONNECT_TIMEOUT)?,
                    endpoint: endpoint.clone(),
                    resource: opts.server_app_id.clone(),
                    challenge_dir: env.himds_challenge_dir.clone(),
                }));
            }
        }
        if let Some(endpoint) = &env.msi_endpoint {
            return match &env.msi_secret {
                Some(secret) => hosted(HostedKind::MachineLearning, endpoint, Some(secret)),
                None => hosted(HostedKind::CloudShell, endpoint, None),
            };
        }
        let base = env
            .imds_base
            .clone()
            .unwrap_or_else(|| IMDS_BASE.to_string())
            .trim_end_matches('/')
            .to_string();
        Ok(ManagedIdentity::Imds(Imds {
            http: client_for(&base, env, PROBE_CONNECT_TIMEOUT)?,
            base,
            resource: opts.server_app_id.clone(),
            client_id: env.client_id.clone(),
            answered: AtomicBool::new(false),
        }))
    }
}

/// Whether `endpoint`'s host is loopback, link-local (169.254.169.254) or `localhost`.
fn local_host(endpoint: &str) -> bool {
    let Ok(url) = url::Url::parse(endpoint) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_link_local(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xffc0) == 0xfe80,
        None => false,
    }
}

/// A client for one identity endpoint: plain HTTP as in Azure, or https trusting the system
/// roots and the environment's CA bundle.
fn client_for(
    endpoint: &str,
    env: &Environment,
    connect_timeout: Duration,
) -> Result<HttpClient, SourceError> {
    let is_https = endpoint
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    if !is_https {
        // Plain HTTP carries the endpoint's secret header and the token back: only to an
        // endpoint on this machine or the link-local metadata address, as Azure's are.
        if !local_host(endpoint) {
            return Err(SourceError::Unavailable(super::Reason::from(format!(
                "the identity endpoint {} is plain http on a host that is neither loopback nor link-local; the secret header and the token would cross the network in clear text",
                crate::secret::clip(endpoint, 200)
            ))));
        }
        return plain_http_client(connect_timeout, REQUEST_TIMEOUT).map_err(|e| {
            SourceError::Unavailable(super::Reason::new(
                format!("no HTTP client for {endpoint}"),
                e,
            ))
        });
    }
    let tls = crate::tls::client_config(env.ca_bundle.as_deref(), &[]).map_err(|e| {
        let bundle = match &env.ca_bundle {
            Some(path) => format!(" and the CA bundle {}", path.display()),
            None => String::new(),
        };
        SourceError::Unavailable(super::Reason::new(
            format!("cannot trust {endpoint}: the system roots{bundle}"),
            e,
        ))
    })?;
    Ok(HttpClient::new(tls, connect_timeout, REQUEST_TIMEOUT))
}

impl Source for ManagedIdentity {
    fn kind(&self) -> SourceKind {
        SourceKind::ManagedIdentity
    }

    fn attempt(&self) -> SourceFuture<'_> {
        match self {
            ManagedIdentity::Imds(imds) => Box::pin(imds.get()),
            ManagedIdentity::Arc(himds) => Box::pin(himds.get()),
            ManagedIdentity::Hosted(hosted) => Box::pin(hosted.get()),
        }
    }
}

pub struct Imds {
    http: HttpClient,
    base: String,
    resource: String,
    /// A user-assigned identity's client id; the VM's system identity without it.
    client_id: Option<String>,
    /// Once IMDS has answered, failures are real failures rather than "not on Azure".
    answered: AtomicBool,
}

impl Imds {
    fn url(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("api-version", "2018-02-01");
        query.append_pair("resource", &self.resource);
        if let Some(id) = &self.client_id {
            query.append_pair("client_id", id);
        }
        format!("{}{IMDS_PATH}?{}", self.base, query.finish())
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let url = self.url();
        let known = self.answered.load(Ordering::Relaxed);
        let resp = match self.http.get(&url, &[("Metadata", "true")]).await {
            Ok(resp) => resp,
            Err(e) if !known => return Err(SourceError::Unavailable(self.unreachable(&e).into())),
            Err(e) => return Err(SourceError::Failed(super::Reason::new("IMDS", e))),
        };
        let looks_like_imds = resp.status.is_success() || is_json(&resp);
        if !known && !looks_like_imds {
            // Another cloud's metadata service, or a captive proxy, at the same address.
            return Err(SourceError::Unavailable(
                format!(
                    "{} answered HTTP {} but is not Azure IMDS",
                    self.base, resp.status
                )
                .into(),
            ));
        }
        self.answered.store(true, Ordering::Relaxed);
        match decode::<TokenResponse>(&url, &resp) {
            Ok(token) => Ok(token.into_expiring().0),
            // IMDS says 400 when the VM has no identity, or not the one AZURE_CLIENT_ID names.
            Err(e) if resp.status == StatusCode::BAD_REQUEST => {
                Err(SourceError::Unavailable(super::Reason::new(
                    format!("IMDS at {} has no matching managed identity", self.base),
                    e,
                )))
            }
            Err(e) => Err(e.into_source_error("IMDS")),
        }
    }

    fn unreachable(&self, e: &HttpError) -> String {
        if matches!(
            e,
            HttpError::Timeout { .. }
                | HttpError::Transport {
                    connect_timed_out: true,
                    ..
                }
        ) {
            format!(
                "IMDS at {} did not answer within {}s",
                self.base,
                PROBE_CONNECT_TIMEOUT.as_secs()
            )
        } else {
            let reason = match e {
                HttpError::Transport { source, .. } => error_chain(source.as_ref()),
                other => error_chain(other),
            };
            format!("IMDS at {} is not reachable: {reason}", self.base)
        }
    }
}

fn is_json(resp: &HttpResponse) -> bool {
    resp.header("content-type")
        .is_some_and(|c| c.contains("json"))
}

/// The hosted services' endpoints: one request, answered with a token or an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostedKind {
    AppService,
    CloudShell,
    MachineLearning,
}

impl HostedKind {
    fn name(self) -> &'static str {
        match self {
            HostedKind::AppService => "App Service managed identity",
            HostedKind::CloudShell => "Cloud Shell managed identity",
            HostedKind::MachineLearning => "Azure Machine Learning managed identity",
        }
    }
}

pub struct Hosted {
    kind: HostedKind,
    http: HttpClient,
    endpoint: String,
    /// `IDENTITY_HEADER` or `MSI_SECRET`: proves the caller runs on the host.
    secret: Option<Secret>,
    resource: String,
    /// A user-assigned identity's client id (`AZURE_CLIENT_ID`).
    client_id: Option<String>,
}

impl Hosted {
    pub fn kind(&self) -> HostedKind {
        self.kind
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let name = self.kind.name();
        let secret = self.secret.as_ref().map(|s| s.expose()).unwrap_or_default();
        let (url, resp) = match self.kind {
            HostedKind::CloudShell => {
                if self.client_id.is_some() {
                    // Cloud Shell has only the signed-in user's identity (azure-identity's rule).
                    return Err(SourceError::Unavailable(
                        format!("{name}: Cloud Shell has no user-assigned identities, and AZURE_CLIENT_ID names one").into(),
                    ));
                }
                let url = self.endpoint.clone();
                let resp = self
                    .http
                    .post_form(
                        &url,
                        &[("Metadata", "true")],
                        &[("resource", &self.resource)],
                    )
                    .await;
                (url, resp)
            }
            HostedKind::AppService | HostedKind::MachineLearning => {
                let (api, header, client_param) = match self.kind {
                    HostedKind::AppService => (APP_SERVICE_API, "X-IDENTITY-HEADER", "client_id"),
                    _ => (MACHINE_LEARNING_API, "secret", "clientid"),
                };
                let query = {
                    let mut query = url::form_urlencoded::Serializer::new(String::new());
                    query.append_pair("api-version", api);
                    query.append_pair("resource", &self.resource);
                    if let Some(id) = &self.client_id {
                        query.append_pair(client_param, id);
                    }
                    query.finish()
                };
                let separator = if self.endpoint.contains('?') {
                    '&'
                } else {
                    '?'
                };
                let url = format!("{}{separator}{query}", self.endpoint);
                let resp = self.http.get(&url, &[(header, secret)]).await;
                (url, resp)
            }
        };
        let resp = resp.map_err(|e| {
            SourceError::Unavailable(super::Reason::new(format!("{name} is not reachable"), e))
        })?;
        decode::<TokenResponse>(&url, &resp)
            .map(|t| t.into_expiring().0)
            .map_err(|e: EndpointError| e.into_source_error(name))
    }
}

pub struct Himds {
    http: HttpClient,
    endpoint: String,
    resource: String,
    /// Where challenge files may be; a field so tests can use a temporary directory.
    pub challenge_dir: PathBuf,
}

impl Himds {
    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("api-version", "2020-06-01")
            .append_pair("resource", &self.resource)
            .finish();
        let url = format!("{}?{query}", self.endpoint);
        let fail = |e: HttpError| SourceError::Failed(super::Reason::new("Azure Arc HIMDS", e));
        let challenge = self
            .http
            .get(&url, &[("Metadata", "true")])
            .await
            .map_err(fail)?;
        if challenge.status != StatusCode::UNAUTHORIZED {
            let err = decode::<TokenResponse>(&url, &challenge)
                .err()
                .map(|e| error_chain(&e))
                .unwrap_or_else(|| "a token without the challenge".into());
            return Err(SourceError::Failed(
                format!(
                    "Azure Arc HIMDS answered HTTP {} instead of the expected 401 challenge: {err}",
                    challenge.status
                )
                .into(),
            ));
        }
        let realm = challenge
            .header("www-authenticate")
            .and_then(|h| h.split_once("realm="))
            .map(|(_, path)| path.trim().trim_matches('"').to_string())
            .ok_or_else(|| {
                SourceError::Failed(
                    "Azure Arc HIMDS answered 401 without a `WWW-Authenticate: Basic realm=<file>` challenge".into(),
                )
            })?;
        // Single use: the agent writes a new secret for every challenge.
        let secret = read_challenge(Path::new(&realm), &self.challenge_dir)?;
        let authorization = Secret::new(format!("Basic {}", secret.expose()));
        let resp = self
            .http
            .get(
                &url,
                &[
                    ("Metadata", "true"),
                    ("Authorization", authorization.expose()),
                ],
            )
            .await
            .map_err(fail)?;
        decode::<TokenResponse>(&url, &resp)
            .map(|t| t.into_expiring().0)
            .map_err(|e: EndpointError| e.into_source_error("Azure Arc HIMDS"))
    }
}

/// The secret in a HIMDS challenge file, once the file passed the checks that keep a hostile
/// endpoint from making us send an arbitrary local file.
pub fn read_challenge(path: &Path, allowed_dir: &Path) -> Result<Secret, SourceError> {
    let fail = |reason: String| SourceError::Failed(format!("Azure Arc HIMDS: {reason}").into());
    let shown = path.display();
    let dir = std::fs::canonicalize(allowed_dir).map_err(|e| {
        fail(format!(
            "the agent's token directory {} is not usable ({e}); is the Azure Connected Machine agent installed?",
            allowed_dir.display()
        ))
    })?;
    // Canonical, so neither `..` nor a symlink can lead out of the directory.
    let real = std::fs::canonicalize(path)
        .map_err(|e| fail(format!("the challenge file {shown} cannot be opened: {e}")))?;
    if real.parent() != Some(dir.as_path()) {
        return Err(fail(format!(
            "refusing the challenge file {shown}: it is not in {}",
            allowed_dir.display()
        )));
    }
    if real.extension().and_then(|e| e.to_str()) != Some("key") {
        return Err(fail(format!(
            "refusing the challenge file {shown}: its name does not end in .key"
        )));
    }
    let file = std::fs::File::open(&real).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            fail(format!(
                "cannot read the challenge file {shown}: permission denied. Only root and the \
                 `himds` group may read it: run as root, or add this user to the group \
                 (sudo usermod -a -G himds $USER) and log in again"
            ))
        } else {
            fail(format!("cannot read the challenge file {shown}: {e}"))
        }
    })?;
    let size = file
        .metadata()
        .map_err(|e| fail(format!("cannot read the challenge file {shown}: {e}")))?
        .len();
    if size > MAX_CHALLENGE_BYTES {
        return Err(fail(format!(
            "refusing the challenge file {shown}: {size} bytes, more than {MAX_CHALLENGE_BYTES}"
        )));
    }
    let mut text = String::new();
    file.take(MAX_CHALLENGE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("cannot read the challenge file {shown}: {e}")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(fail(format!("the challenge file {shown} is empty")));
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {

    #[test]
    fn plain_http_only_to_this_machine_or_link_local() {
        for local in [
            "http://169.254.169.254/metadata/identity/oauth2/token",
            "http://127.0.0.1:41741/MSI/token",
            "http://localhost:40342/metadata/identity/oauth2/token",
            "http://[::1]:50342/oauth2/token",
        ] {
            assert!(local_host(local), "{local}");
        }
        for remote in [
            "http://10.0.0.4:8080/msi/token",
            "http://identity.example.com/token",
            "not a url",
        ] {
            assert!(!local_host(remote), "{remote}");
        }
    }

    use super::*;
    use crate::entra::test_server::{json, options, Reply, TestServer};

    #[tokio::test]
    async fn imds_gets_metadata_true_and_string_numbers() {
        let server = TestServer::start(|req, _| {
            assert_eq!(req.header("metadata"), Some("true"));
            json(
                200,
                serde_json::json!({"access_token": "mi-token", "expires_in": "3599", "expires_on": "1700000000", "resource": "r", "token_type": "Bearer"}),
            )
        })
        .await;
        let env = Environment {
            imds_base: Some(format!("{}/", server.base)),
            client_id: Some("uami".into()),
            ..Environment::default()
        };
        let source = ManagedIdentity::from_env(&env, &options(&server.base)).unwrap();
        let token = source.attempt().await.unwrap();
        assert_eq!(token.token.expose(), "mi-token");
        assert_eq!(
            token.expires_at - token.issued_at,
            Duration::from_secs(3599)
        );
        let req = &server.requests()[0];
        assert_eq!(req.method, "GET");
        assert_eq!(
            req.target,
            format!(
                "{IMDS_PATH}?api-version=2018-02-01&resource={}&client_id=uami",
                crate::entra::ARC_SERVER_APP_ID
            )
        );
    }

    #[tokio::test]
    async fn imds_that_is_absent_or_not_imds_is_unavailable() {
        // A closed port: refused at once.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut env = Environment {
            imds_base: Some(format!("http://{closed}")),
            ..Environment::default()
        };
        let source = ManagedIdentity::from_env(&env, &options("http://unused")).unwrap();
        let err = source.attempt().await.unwrap_err();
        assert!(
            matches!(err, SourceError::Unavailable(ref r) if r.text().contains("not reachable")),
            "{err:?}"
        );
        // Something else at the address: HTML 404.
        let server = TestServer::start(|_, _| Reply {
            status: 404,
            headers: vec![("content-type", "text/html".into())],
            body: "<html>not found</html>".into(),
        })
        .await;
        env.imds_base = Some(server.base.clone());
        let source = ManagedIdentity::from_env(&env, &options("http://unused")).unwrap();
        let err = source.attempt().await.unwrap_err();
        assert!(
            matches!(err, SourceError::Unavailable(ref r) if r.text().contains("not Azure IMDS")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn himds_reads_an_allowed_challenge_file_once_and_sends_it() {
        let tokens = tempfile::tempdir().unwrap();
        let challenge = tokens.path().join("abc.key");
        std::fs::write(&challenge, "challenge-secret").unwrap();
        let realm = challenge.display().to_string();
        let server = TestServer::start(move |req, _| {
            assert_eq!(req.header("metadata"), Some("true"));
            match req.header("authorization") {
                None => Reply {
                    status: 401,
                    headers: vec![("www-authenticate", format!("Basic realm={realm}"))],
                    body: String::new(),
                },
                Some("Basic challenge-secret") => json(
                    200,
                    serde_json::json!({"access_token": "arc-token", "expires_in": "3600"}),
                ),
                Some(_) => json(401, serde_json::json!({"error": "bad secret"})),
            }
        })
        .await;
        let env = Environment {
            identity_endpoint: Some(format!("{}/metadata/identity/oauth2/token", server.base)),
            imds_endpoint: Some(server.base.clone()),
            himds_challenge_dir: tokens.path().to_path_buf(),
            ..Environment::default()
        };
        let source = ManagedIdentity::from_env(&env, &options(&server.base)).unwrap();
        assert!(matches!(source, ManagedIdentity::Arc(_)));
        let token = source.attempt().await.unwrap();
        assert_eq!(token.token.expose(), "arc-token");
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2, "one challenge, one answer");
        assert!(reqs[0].target.contains("api-version=2020-06-01"));
    }

    #[tokio::test]
    async fn cloud_shell_posts_the_resource_and_machine_learning_sends_its_secret() {
        let server = TestServer::start(|req, _| {
            let expires_on = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 1200;
            match (req.method.as_str(), req.header("secret")) {
                ("POST", None) => {
                    assert_eq!(req.header("metadata"), Some("true"));
                    json(200, serde_json::json!({"access_token": "shell-token", "expires_on": expires_on.to_string()}))
                }
                ("GET", Some("ml-secret")) => json(
                    200,
                    serde_json::json!({"access_token": "ml-token", "expires_on": expires_on}),
                ),
                _ => json(400, serde_json::json!({"error": "invalid_request"})),
            }
        })
        .await;
        let mut env = Environment {
            msi_endpoint: Some(format!("{}/oauth2/token", server.base)),
            ..Environment::default()
        };
        let source = ManagedIdentity::from_env(&env, &options(&server.base)).unwrap();
        assert!(
            matches!(source, ManagedIdentity::Hosted(ref h) if h.kind() == HostedKind::CloudShell)
        );
        let token = source.attempt().await.unwrap();
        assert_eq!(token.token.expose(), "shell-token");
        assert!(token.expires_at - token.issued_at > Duration::from_secs(1100));
        let req = &server.requests()[0];
        assert_eq!(req.target, "/oauth2/token");
        assert_eq!(
            req.body,
            format!("resource={}", crate::entra::ARC_SERVER_APP_ID)
        );
        // A user-assigned identity is not Cloud Shell's to give.
        env.client_id = Some("uami".into());
        let source = ManagedIdentity::from_env(&env, &options(&server.base)).unwrap();
        assert!(matches!(
            source.attempt().await,
            Err(SourceError::Unavailable(_))
        ));

        env.msi_secret = Some(Secret::new("ml-secret"));
        let source = ManagedIdentity::from_env(&env, &options(&server.base)).unwrap();
        assert_eq!(source.attempt().await.unwrap().token.expose(), "ml-token");
        let req = server.requests().pop().unwrap();
        assert_eq!(
            req.target,
            format!(
                "/oauth2/token?api-version=2017-09-01&resource={}&clientid=uami",
                crate::entra::ARC_SERVER_APP_ID
            )
        );
    }

    #[test]
    fn https_identity_endpoints_need_a_readable_ca_bundle_when_one_is_named() {
        let env = Environment {
            ca_bundle: Some("/nonexistent/bundle.pem".into()),
            ..Environment::default()
        };
        let err = client_for(
            "https://127.0.0.1:1/msi/token",
            &env,
            HOSTED_CONNECT_TIMEOUT,
        )
        .err()
        .unwrap();
        assert!(err.reason().contains("/nonexistent/bundle.pem"), "{err:?}");
        // Plain HTTP never reads it.
        assert!(client_for("http://127.0.0.1:1/msi/token", &env, HOSTED_CONNECT_TIMEOUT).is_ok());
    }

    #[test]
    fn himds_refuses_challenge_files_outside_the_directory_or_of_the_wrong_shape() {
        let tokens = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("x.key");
        std::fs::write(&outside, "s").unwrap();
        let err = read_challenge(&outside, tokens.path()).unwrap_err();
        assert!(err.reason().contains("is not in"), "{err:?}");
        // `..` out of the directory is the same thing.
        let sneaky = tokens.path().join("..").join(
            outside
                .strip_prefix(tokens.path().parent().unwrap())
                .unwrap_or(&outside),
        );
        assert!(read_challenge(&sneaky, tokens.path()).is_err());
        #[cfg(unix)]
        {
            let link = tokens.path().join("link.key");
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            assert!(read_challenge(&link, tokens.path())
                .unwrap_err()
                .reason()
                .contains("is not in"));
        }
        let txt = tokens.path().join("a.txt");
        std::fs::write(&txt, "s").unwrap();
        assert!(read_challenge(&txt, tokens.path())
            .unwrap_err()
            .reason()
            .contains(".key"));
        let big = tokens.path().join("big.key");
        std::fs::write(&big, vec![b'a'; 5000]).unwrap();
        assert!(read_challenge(&big, tokens.path())
            .unwrap_err()
            .reason()
            .contains("more than 4096"));
        let ok = tokens.path().join("ok.key");
        std::fs::write(&ok, "secret\n").unwrap();
        assert_eq!(
            read_challenge(&ok, tokens.path()).unwrap().expose(),
            "secret"
        );
    }
}

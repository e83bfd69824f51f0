//! A stand-in for Microsoft Entra ID and the slice of Microsoft Graph clusterconnect uses:
//! OpenID discovery, a JWKS with key rotation, the v2 token endpoint (client secret, client
//! certificate assertion, workload identity federation, refresh tokens, device code) and
//! `getMemberObjects`. Tokens carry the claims real Entra access tokens carry, v1 or v2, with
//! the groups overage shape past 200 groups. HTTPS on 127.0.0.1 with its own CA; serves until
//! the last handle is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use clusterconnect::entra::ARC_CLIENT_APP_ID;
use clusterconnect::tls::{client_config_with_roots, roots_from_pem};
use http::{header, Method, Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use rcgen::PublicKeyData;
use serde_json::{json, Value};
use sha1::Digest;

use super::body::Body;
use super::serve::{self, Form, Refusal, TaskGuard};

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const OTHER_TENANT: &str = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";
pub const GRAPH: &str = "https://graph.microsoft.com";
/// Microsoft Graph's application id: the `aud` of Graph tokens in some token versions.
pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
/// The issuer of projected service-account tokens (`federated_token`).
pub const CLUSTER_OIDC_ISSUER: &str = "https://oidc.cluster.test";
/// The audience Entra requires of federated credentials.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Past this many groups Entra leaves `groups` out and points at Graph instead.
const GROUPS_OVERAGE_LIMIT: usize = 200;
const SIGNING_1: &str = include_str!("keys/entra-signing-1.pem");
const SIGNING_2: &str = include_str!("keys/entra-signing-2.pem");
const FORGER: &str = include_str!("keys/forger.pem");
const SP_CLIENT: &str = include_str!("keys/sp-client.pem");
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// One request to the token endpoint, without any secret it carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub tenant: String,
    pub grant_type: String,
    pub client_id: String,
    pub scope: String,
}

/// An RSA key with what a JWKS publishes of it.
struct RsaKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    n: String,
    e: String,
}

impl RsaKey {
    fn load(kid: &str, pem: &str) -> RsaKey {
        let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256)
            .expect("fixture key is PKCS#8 RSA");
        // For RSA, ring's public key bytes are the PKCS#1 RSAPublicKey: SEQUENCE { n, e }.
        let (n, e) = rsa_public_components(pair.der_bytes());
        RsaKey {
            kid: kid.to_string(),
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("fixture key"),
            decoding: DecodingKey::from_rsa_raw_components(&n, &e),
            n: URL_SAFE_NO_PAD.encode(n),
            e: URL_SAFE_NO_PAD.encode(e),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

/// `n` and `e` of a DER RSAPublicKey, without the sign byte DER puts before a high bit.
pub(super) fn rsa_public_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn element(input: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = input[0];
        let (len, header) = match input[1] {
            short if short < 0x80 => (short as usize, 2),
            long => {
                let count = (long & 0x7f) as usize;
                let len = input[2..2 + count]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | *b as usize);
                (len, 2 + count)
            }
        };
        (tag, &input[header..header + len], &input[header + len..])
    }
    let (tag, sequence, _) = element(der);
    assert_eq!(tag, 0x30, "RSAPublicKey is a SEQUENCE");
    let (tag, n, rest) = element(sequence);
    assert_eq!(tag, 0x02, "modulus is an INTEGER");
    let (tag, e, _) = element(rest);
    assert_eq!(tag, 0x02, "exponent is an INTEGER");
    let strip = |v: &[u8]| match v {
        [0, rest @ ..] if !rest.is_empty() => rest.to_vec(),
        v => v.to_vec(),
    };
    (strip(n), strip(e))
}

/// Who a token is for.
#[derive(Clone)]
enum Principal {
    User {
        upn: String,
        oid: String,
        groups: Vec<String>,
    },
    App {
        oid: String,
    },
}

struct AppCertificate {
    sha1: String,
    sha256: String,
    key: DecodingKey,
}

#[derive(Default)]
struct App {
    oid: String,
    secret: Option<String>,
    certificate: Option<AppCertificate>,
    federated_subject: Option<String>,
}

struct User {
    oid: String,
    groups: Vec<String>,
}

struct DeviceCode {
    device_code: String,
    user_code: String,
    tenant: String,
    client_id: String,
    scope: String,
    expires_at: Instant,
    approved_by: Option<String>,
    redeemed: bool,
}

struct Session {
    upn: String,
    tenant: String,
    client_id: String,
    scope: String,
}

struct State {
    /// Index of the signing key; keys up to it are published.
    active: usize,
    apps: HashMap<String, App>,
    users: HashMap<String, User>,
    graph_available: bool,
    /// A custom cloud's Graph resource: the one audience Graph then accepts.
    graph_resource: Option<String>,
    token_lifetime: Duration,
    token_version: u8,
    token_requests: Vec<TokenRequest>,
    device_codes: Vec<DeviceCode>,
    device_code_interval: u64,
    device_code_lifetime: Duration,
    slow_down_once: bool,
    refresh_tokens: HashMap<String, Session>,
    /// The `req_cnf` key id of each proof-of-possession token request, in order.
    pop_kids: Vec<String>,
}

pub(super) struct Shared {
    host: String,
    keys: [RsaKey; 2],
    forger: RsaKey,
    state: Mutex<State>,
    jwks_fetches: AtomicUsize,
    graph_calls: AtomicUsize,
}

#[derive(Clone)]
pub struct Entra {
    pub(super) shared: Arc<Shared>,
    ca_pem: Arc<str>,
    _tasks: Arc<TaskGuard>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn random(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// A pairwise-looking but stable `sub` for a principal as seen by a client.
fn subject(oid: &str, client_id: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{oid}|{client_id}").as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..32])[..43].to_string()
}

fn display_name(upn: &str) -> String {
    upn.split('@').next().unwrap_or(upn).replace('.', " ")
}

impl Entra {
    pub async fn start() -> Entra {
        let (listener, tls, ca_pem) = serve::tls_listener("standin-entra-ca").await;
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            host: format!("https://{addr}"),
            keys: [
                RsaKey::load("key-1", SIGNING_1),
                RsaKey::load("key-2", SIGNING_2),
            ],
            // The forger reuses a real key id: only the signature can tell the difference.
            forger: RsaKey::load("key-1", FORGER),
            state: Mutex::new(State {
                active: 0,
                apps: HashMap::new(),
                users: HashMap::new(),
                graph_available: true,
                graph_resource: None,
                token_lifetime: Duration::from_secs(3600),
                token_version: 2,
                token_requests: Vec::new(),
                device_codes: Vec::new(),
                device_code_interval: 1,
                device_code_lifetime: Duration::from_secs(900),
                slow_down_once: false,
                refresh_tokens: HashMap::new(),
                pop_kids: Vec::new(),
            }),
            jwks_fetches: AtomicUsize::new(0),
            graph_calls: AtomicUsize::new(0),
        });
        let handler_shared = shared.clone();
        let tasks = serve::serve(listener, Some(tls), move |req| {
            let shared = handler_shared.clone();
            async move { shared.handle(req) }
        });
        Entra {
            shared,
            ca_pem: ca_pem.into(),
            _tasks: tasks,
        }
    }

    pub fn authority_host(&self) -> String {
        self.shared.host.clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca_pem.to_string()
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let roots = roots_from_pem(self.ca_pem.as_bytes()).expect("CA PEM");
        client_config_with_roots(roots, &[]).expect("client TLS config")
    }

    /// Writes the CA to `dir/ca.pem` (for `SSL_CERT_FILE` in binary tests).
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca_pem.as_bytes()).expect("write CA");
        path
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.shared.sign(claims)
    }

    pub fn sign_with_unpublished_key(&self, claims: &Value) -> String {
        self.shared.forger.sign(claims)
    }

    pub fn unsigned(&self, claims: &Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.")
    }

    /// v2 claims of a user token for TENANT, issued now.
    pub fn user_claims(
        &self,
        upn: &str,
        oid: &str,
        groups: &[&str],
        audience: &str,
        lifetime: Duration,
    ) -> Value {
        let principal = Principal::User {
            upn: upn.to_string(),
            oid: oid.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        self.shared
            .claims(2, TENANT, audience, lifetime, &principal, ARC_CLIENT_APP_ID)
    }

    /// v2 claims of an app-only token for TENANT, issued now.
    pub fn app_claims(&self, oid: &str, appid: &str, audience: &str, lifetime: Duration) -> Value {
        let principal = Principal::App {
            oid: oid.to_string(),
        };
        self.shared
            .claims(2, TENANT, audience, lifetime, &principal, appid)
    }

    /// Signs with key 2 from now on; key 1 stays published.
    pub fn rotate_signing_key(&self) {
        self.shared.state().active = 1;
    }

    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn add_app_secret(&self, client_id: &str, secret: &str, oid: &str) {
        let mut state = self.shared.state();
        let app = state.apps.entry(client_id.to_string()).or_default();
        app.oid = oid.to_string();
        app.secret = Some(secret.to_string());
    }

    /// Registers a certificate for the app and returns what `AZURE_CLIENT_CERTIFICATE_PATH`
    /// holds: the certificate PEM followed by its private key PEM.
    pub fn add_app_certificate(&self, client_id: &str, oid: &str) -> String {
        let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(SP_CLIENT, &rcgen::PKCS_RSA_SHA256)
            .expect("fixture key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("app-{client_id}"));
        let cert = params.self_signed(&pair).expect("self-signed certificate");
        let der = cert.der().as_ref();
        let (n, e) = rsa_public_components(pair.der_bytes());
        let certificate = AppCertificate {
            sha1: URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(der)),
            sha256: URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der)),
            key: DecodingKey::from_rsa_raw_components(&n, &e),
        };
        let mut state = self.shared.state();
        let app = state.apps.entry(client_id.to_string()).or_default();
        app.oid = oid.to_string();
        app.certificate = Some(certificate);
        format!("{}{}", cert.pem(), SP_CLIENT)
    }

    /// Registers a federated credential: tokens from `federated_token(subject)` sign the app in.
    pub fn add_federated_app(&self, client_id: &str, subject: &str, oid: &str) {
        let mut state = self.shared.state();
        let app = state.apps.entry(client_id.to_string()).or_default();
        app.oid = oid.to_string();
        app.federated_subject = Some(subject.to_string());
    }

    /// A projected service-account token from the cluster's OIDC issuer, valid for an hour.
    pub fn federated_token(&self, subject: &str) -> String {
        let now = now();
        let claims = json!({
            "iss": CLUSTER_OIDC_ISSUER,
            "aud": [TOKEN_EXCHANGE_AUDIENCE],
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("cluster-oidc".into());
        jsonwebtoken::encode(&header, &claims, &self.shared.keys[1].encoding).expect("sign")
    }

    pub fn add_user(&self, upn: &str, oid: &str, groups: &[String]) {
        self.shared.state().users.insert(
            upn.to_string(),
            User {
                oid: oid.to_string(),
                groups: groups.to_vec(),
            },
        );
    }

    pub fn set_graph_available(&self, up: bool) {
        self.shared.state().graph_available = up;
    }

    /// Graph of a custom cloud: accepts tokens for `resource` only (not Microsoft Graph's).
    pub fn set_graph_resource(&self, resource: &str) {
        self.shared.state().graph_resource = Some(resource.to_string());
    }

    pub fn graph_calls(&self) -> usize {
        self.shared.graph_calls.load(Ordering::SeqCst)
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.state().token_lifetime = lifetime;
    }

    pub fn set_token_version(&self, v: u8) {
        assert!(v == 1 || v == 2, "token version is 1 or 2");
        self.shared.state().token_version = v;
    }

    /// The key id (`req_cnf`'s `kid`) of each proof-of-possession token request, in order.
    pub fn pop_requests(&self) -> Vec<String> {
        self.shared.state().pop_kids.clone()
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.shared.state().token_requests.clone()
    }

    pub fn device_codes(&self) -> Vec<String> {
        let state = self.shared.state();
        state
            .device_codes
            .iter()
            .map(|c| c.user_code.clone())
            .collect()
    }

    /// The user signs in at the verification page and enters `user_code`.
    pub fn approve_device_code(&self, user_code: &str, upn: &str) {
        let mut state = self.shared.state();
        assert!(state.users.contains_key(upn), "{upn} is not an added user");
        let code = state
            .device_codes
            .iter_mut()
            .find(|c| c.user_code == user_code)
            .unwrap_or_else(|| panic!("no device code {user_code}"));
        code.approved_by = Some(upn.to_string());
    }

    pub fn slow_down_once(&self) {
        self.shared.state().slow_down_once = true;
    }

    /// Checks an access token the way a resource server does: signed by a published key, not
    /// expired, for one of `audiences`. Returns its claims.
    pub fn verify_access_token(&self, token: &str, audiences: &[&str]) -> Result<Value, String> {
        self.shared.verify(token, audiences)
    }
}

/// An OAuth error the way Entra words it.
fn oauth_error(code: StatusCode, error: &str, description: &str) -> Response<Body> {
    serve::json(
        code,
        &json!({
            "error": error,
            "error_description": format!(
                "{description}\r\nTrace ID: {}\r\nCorrelation ID: {}\r\nTimestamp: 2025-01-01 00:00:00Z",
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4()
            ),
            "error_codes": [description
                .strip_prefix("AADSTS")
                .and_then(|d| d.split(':').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)],
            "trace_id": uuid::Uuid::new_v4().to_string(),
            "correlation_id": uuid::Uuid::new_v4().to_string(),
        }),
    )
}

fn refusal(code: StatusCode, error: &str, description: &str) -> Refusal {
    Box::new(oauth_error(code, error, description))
}

fn graph_error(code: StatusCode, graph_code: &str, message: &str) -> Response<Body> {
    serve::json(
        code,
        &json!({"error": {
            "code": graph_code,
            "message": message,
            "innerError": {"request-id": uuid::Uuid::new_v4().to_string()},
        }}),
    )
}

/// The audience a token for `scope` has: the resource before `/.default` (or before the
/// permission name), ignoring the OpenID scopes.
fn audience_of(scope: &str) -> String {
    let resource = scope
        .split_whitespace()
        .find(|s| !matches!(*s, "openid" | "profile" | "offline_access" | "email"))
        .unwrap_or("");
    match resource.strip_suffix("/.default") {
        Some(r) => r.to_string(),
        None => match resource.rsplit_once('/') {
            Some((r, _)) if !r.ends_with(':') && !r.ends_with('/') => r.to_string(),
            _ => resource.to_string(),
        },
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sign(&self, claims: &Value) -> String {
        let active = self.state().active;
        self.keys[active].sign(claims)
    }

    /// Access token claims as Entra issues them, v1 or v2.
    fn claims(
        &self,
        version: u8,
        tenant: &str,
        audience: &str,
        lifetime: Duration,
        principal: &Principal,
        client_id: &str,
    ) -> Value {
        let now = now();
        let oid = match principal {
            Principal::User { oid, .. } | Principal::App { oid } => oid,
        };
        let mut claims = json!({
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
            "tid": tenant,
            "oid": oid,
            "sub": subject(oid, client_id),
            "uti": random(22),
            "rh": format!("0.{}.", random(40)),
        });
        if version == 1 {
            claims["ver"] = "1.0".into();
            claims["iss"] = format!("https://sts.windows.net/{tenant}/").into();
            claims["appid"] = client_id.into();
            claims["appidacr"] = "1".into();
        } else {
            claims["ver"] = "2.0".into();
            claims["iss"] = format!("{}/{tenant}/v2.0", self.host).into();
            claims["azp"] = client_id.into();
            claims["azpacr"] = "1".into();
        }
        match principal {
            Principal::App { .. } => {
                claims["idtyp"] = "app".into();
            }
            Principal::User { upn, oid, groups } => {
                claims["idtyp"] = "user".into();
                claims["upn"] = upn.as_str().into();
                claims["name"] = display_name(upn).into();
                claims["scp"] = "user_impersonation".into();
                if version == 1 {
                    claims["unique_name"] = upn.as_str().into();
                    claims["appidacr"] = "0".into();
                } else {
                    claims["preferred_username"] = upn.as_str().into();
                    claims["azpacr"] = "0".into();
                }
                if groups.len() <= GROUPS_OVERAGE_LIMIT {
                    claims["groups"] = json!(groups);
                } else {
                    claims["_claim_names"] = json!({"groups": "src1"});
                    claims["_claim_sources"] = json!({"src1": {
                        "endpoint": format!(
                            "https://graph.windows.net/{tenant}/users/{oid}/getMemberObjects"
                        ),
                    }});
                }
            }
        }
        claims
    }

    /// A token from the token endpoint (or IMDS): the configured version and lifetime; bound
    /// to the key `cnf_kid` (`cnf: {kid}`, as Entra binds tokens requested with
    /// `token_type=pop`) when given.
    fn issue(
        &self,
        tenant: &str,
        audience: &str,
        principal: &Principal,
        client_id: &str,
        cnf_kid: Option<&str>,
    ) -> (String, Duration) {
        let (version, lifetime) = {
            let state = self.state();
            (state.token_version, state.token_lifetime)
        };
        let mut claims = self.claims(version, tenant, audience, lifetime, principal, client_id);
        if let Some(kid) = cnf_kid {
            claims["cnf"] = json!({"kid": kid});
        }
        (self.sign(&claims), lifetime)
    }

    /// An IMDS-style token for a managed identity.
    pub(super) fn issue_for_identity(
        &self,
        identity_oid: &str,
        client_id: &str,
        resource: &str,
    ) -> (String, Duration) {
        let principal = Principal::App {
            oid: identity_oid.to_string(),
        };
        self.issue(TENANT, resource, &principal, client_id, None)
    }

    fn handle(&self, req: Request<Bytes>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let post = req.method() == Method::POST;
        let get = req.method() == Method::GET;
        if let ["v1.0", "directoryObjects", oid, "getMemberObjects"] = segments.as_slice() {
            if post {
                return self.member_objects(&req, oid);
            }
        }
        let Some((tenant, rest)) = segments.split_first() else {
            return serve::text(StatusCode::NOT_FOUND, "not found");
        };
        if *tenant != TENANT && *tenant != OTHER_TENANT {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
            );
        }
        match rest {
            ["v2.0", ".well-known", "openid-configuration"] if get => self.discovery(tenant),
            ["discovery", "v2.0", "keys"] if get => self.jwks(),
            ["oauth2", "v2.0", "token"] if post => self.token(tenant, &Form::parse(req.body())),
            ["oauth2", "v2.0", "devicecode"] if post => {
                self.device_authorization(tenant, &Form::parse(req.body()))
            }
            _ => serve::text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn discovery(&self, tenant: &str) -> Response<Body> {
        let host = &self.host;
        serve::json(
            StatusCode::OK,
            &json!({
                "issuer": format!("{host}/{tenant}/v2.0"),
                "authorization_endpoint": format!("{host}/{tenant}/oauth2/v2.0/authorize"),
                "token_endpoint": format!("{host}/{tenant}/oauth2/v2.0/token"),
                "device_authorization_endpoint": format!("{host}/{tenant}/oauth2/v2.0/devicecode"),
                "jwks_uri": format!("{host}/{tenant}/discovery/v2.0/keys"),
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "WW",
            }),
        )
    }

    fn jwks(&self) -> Response<Body> {
        self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        let active = self.state().active;
        let keys: Vec<Value> = self.keys[..=active]
            .iter()
            .map(|k| json!({"kty": "RSA", "use": "sig", "kid": k.kid, "n": k.n, "e": k.e}))
            .collect();
        serve::json(StatusCode::OK, &json!({"keys": keys}))
    }

    fn token(&self, tenant: &str, form: &Form) -> Response<Body> {
        let grant_type = form.get("grant_type").unwrap_or_default();
        let client_id = form.get("client_id").unwrap_or_default();
        let scope = form.get("scope").unwrap_or_default();
        self.state().token_requests.push(TokenRequest {
            tenant: tenant.to_string(),
            grant_type: grant_type.to_string(),
            client_id: client_id.to_string(),
            scope: scope.to_string(),
        });
        if let Err(response) = self.pop_binding(form) {
            return *response;
        }
        match grant_type {
            "client_credentials" => self.client_credentials(tenant, client_id, scope, form),
            "refresh_token" => self.refresh(tenant, client_id, scope, form),
            DEVICE_CODE_GRANT => self.redeem_device_code(tenant, client_id, form),
            "" => oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS900144: The request body must contain the following parameter: 'grant_type'.",
            ),
            other => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("AADSTS70003: The app requested an unsupported grant type '{other}'."),
            ),
        }
    }

    /// The key a `token_type=pop` request binds its token to: `req_cnf` is base64url JSON
    /// with the key's thumbprint as `kid`. `None` for a bearer request.
    fn pop_binding(&self, form: &Form) -> Result<Option<String>, Refusal> {
        match form.get("token_type") {
            None => return Ok(None),
            Some(t) if t.eq_ignore_ascii_case("pop") => {}
            Some(other) => {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("AADSTS901002: The 'token_type' value '{other}' is not supported."),
                ))
            }
        }
        let kid = form
            .get("req_cnf")
            .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
            .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
            .and_then(|c| c["kid"].as_str().map(str::to_string))
            .filter(|k| !k.is_empty());
        match kid {
            Some(kid) => Ok(Some(kid)),
            None => Err(refusal(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS50000: The req_cnf parameter is missing or malformed: it must be base64url JSON with a kid.",
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn token_response(
        &self,
        tenant: &str,
        audience: &str,
        principal: &Principal,
        client_id: &str,
        scope: &str,
        refresh_token: Option<String>,
        form: &Form,
    ) -> Response<Body> {
        let cnf_kid = match self.pop_binding(form) {
            Ok(kid) => kid,
            Err(response) => return *response,
        };
        if let Some(kid) = &cnf_kid {
            self.state().pop_kids.push(kid.clone());
        }
        let (access_token, lifetime) =
            self.issue(tenant, audience, principal, client_id, cnf_kid.as_deref());
        let mut body = json!({
            "token_type": if cnf_kid.is_some() { "pop" } else { "Bearer" },
            "scope": scope,
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": access_token,
        });
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = refresh_token.into();
        }
        serve::json(StatusCode::OK, &body)
    }

    fn client_credentials(
        &self,
        tenant: &str,
        client_id: &str,
        scope: &str,
        form: &Form,
    ) -> Response<Body> {
        if !scope.ends_with("/.default") || scope.split_whitespace().count() != 1 {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                &format!("AADSTS1002012: The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            );
        }
        let verdict = {
            let state = self.state();
            match state.apps.get(client_id) {
                None => Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    &format!("AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
                )),
                Some(app) => self.authenticate_app(tenant, client_id, app, form).map(|()| app.oid.clone()),
            }
        };
        match verdict {
            Ok(oid) => self.token_response(
                tenant,
                &audience_of(scope),
                &Principal::App { oid },
                client_id,
                scope,
                None,
                form,
            ),
            Err(response) => *response,
        }
    }

    fn authenticate_app(
        &self,
        tenant: &str,
        client_id: &str,
        app: &App,
        form: &Form,
    ) -> Result<(), Refusal> {
        if let Some(secret) = form.get("client_secret") {
            return match &app.secret {
                Some(expected) if expected == secret => Ok(()),
                _ => Err(refusal(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    &format!("AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
                )),
            };
        }
        let assertion = match (form.get("client_assertion_type"), form.get("client_assertion")) {
            (Some(JWT_BEARER), Some(assertion)) => assertion,
            _ => {
                return Err(refusal(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ))
            }
        };
        let invalid =
            |description: String| refusal(StatusCode::BAD_REQUEST, "invalid_grant", &description);
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| {
            invalid(format!(
                "AADSTS50027: JWT token is invalid or malformed: {e}."
            ))
        })?;
        let mut failures = Vec::new();
        if let Some(certificate) = &app.certificate {
            let thumbprint_matches = header.x5t.as_deref() == Some(&certificate.sha1)
                || header.x5t_s256.as_deref() == Some(&certificate.sha256);
            if !thumbprint_matches {
                failures.push(format!("AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{}']", header.x5t.clone().unwrap_or_default()));
            } else {
                let mut validation = Validation::new(Algorithm::RS256);
                validation.set_audience(&[format!("{}/{tenant}/oauth2/v2.0/token", self.host)]);
                validation.set_issuer(&[client_id]);
                validation.sub = Some(client_id.to_string());
                validation.leeway = 0;
                match jsonwebtoken::decode::<Value>(assertion, &certificate.key, &validation) {
                    Ok(_) => return Ok(()),
                    Err(e) => failures.push(format!(
                        "AADSTS700027: Client assertion failed signature validation or its claims are wrong: {e}."
                    )),
                }
            }
        }
        if let Some(subject) = &app.federated_subject {
            let mut validation = Validation::new(Algorithm::RS256);
            validation.set_audience(&[TOKEN_EXCHANGE_AUDIENCE]);
            validation.set_issuer(&[CLUSTER_OIDC_ISSUER]);
            validation.leeway = 0;
            match jsonwebtoken::decode::<Value>(assertion, &self.keys[1].decoding, &validation) {
                Ok(data) if data.claims["sub"] == subject.as_str() => return Ok(()),
                Ok(data) => failures.push(format!(
                    "AADSTS70021: No matching federated identity record found for presented assertion subject '{}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.",
                    data.claims["sub"].as_str().unwrap_or_default()
                )),
                Err(e) => failures.push(format!(
                    "AADSTS700211: The federated assertion could not be validated: {e}."
                )),
            }
        }
        Err(invalid(failures.into_iter().next().unwrap_or_else(|| {
            format!("AADSTS700027: No certificate or federated credential is registered on application '{client_id}'.")
        })))
    }

    fn refresh(&self, tenant: &str, client_id: &str, scope: &str, form: &Form) -> Response<Body> {
        let presented = form.get("refresh_token").unwrap_or_default();
        let session = {
            let state = self.state();
            state.refresh_tokens.get(presented).and_then(|s| {
                let user = state.users.get(&s.upn)?;
                Some((
                    s.upn.clone(),
                    user.oid.clone(),
                    user.groups.clone(),
                    s.tenant.clone(),
                    s.client_id.clone(),
                    s.scope.clone(),
                ))
            })
        };
        let Some((upn, oid, groups, session_tenant, session_client, session_scope)) = session
        else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "AADSTS70000: Provided grant is invalid or malformed.",
            );
        };
        if session_tenant != tenant || session_client != client_id {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "AADSTS70000: Provided grant is invalid or malformed. The refresh token was issued to a different client or tenant.",
            );
        }
        let scope = if scope.is_empty() {
            session_scope
        } else {
            scope.to_string()
        };
        let refresh_token = self.new_refresh_token(&upn, tenant, client_id, &scope);
        let principal = Principal::User { upn, oid, groups };
        self.token_response(
            tenant,
            &audience_of(&scope),
            &principal,
            client_id,
            &scope,
            Some(refresh_token),
            form,
        )
    }

    fn new_refresh_token(&self, upn: &str, tenant: &str, client_id: &str, scope: &str) -> String {
        let token = format!("1.A{}", random(120));
        self.state().refresh_tokens.insert(
            token.clone(),
            Session {
                upn: upn.to_string(),
                tenant: tenant.to_string(),
                client_id: client_id.to_string(),
                scope: scope.to_string(),
            },
        );
        token
    }

    fn device_authorization(&self, tenant: &str, form: &Form) -> Response<Body> {
        let Some(client_id) = form.get("client_id").filter(|c| !c.is_empty()) else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
            );
        };
        let scope = form.get("scope").unwrap_or_default();
        let letters = |n: usize| -> String {
            let mut rng = rand::rng();
            (0..n)
                .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
                .collect()
        };
        let user_code = format!("{}-{}", letters(4), letters(4));
        let device_code = format!("DAQABIQEAAAB{}", random(100));
        let mut state = self.state();
        let (interval, lifetime) = (state.device_code_interval, state.device_code_lifetime);
        state.device_codes.push(DeviceCode {
            device_code: device_code.clone(),
            user_code: user_code.clone(),
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            scope: scope.to_string(),
            expires_at: Instant::now() + lifetime,
            approved_by: None,
            redeemed: false,
        });
        let verification_uri = format!("{}/devicelogin", self.host);
        serve::json(
            StatusCode::OK,
            &json!({
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": verification_uri,
                "expires_in": lifetime.as_secs(),
                "interval": interval,
                "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
            }),
        )
    }

    fn redeem_device_code(&self, tenant: &str, client_id: &str, form: &Form) -> Response<Body> {
        let presented = form.get("device_code").unwrap_or_default();
        let bad_code = || {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "AADSTS70000: Provided grant is invalid or malformed.",
            )
        };
        let approved = {
            let mut state = self.state();
            if std::mem::take(&mut state.slow_down_once) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "slow_down",
                    "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling, more slowly.",
                );
            }
            let Some(index) = state
                .device_codes
                .iter()
                .position(|c| c.device_code == presented)
            else {
                return bad_code();
            };
            let code = &state.device_codes[index];
            if code.redeemed || code.tenant != tenant || code.client_id != client_id {
                return bad_code();
            }
            if Instant::now() >= code.expires_at {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "expired_token",
                    "AADSTS70020: The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
                );
            }
            let Some(upn) = code.approved_by.clone() else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "authorization_pending",
                    "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                );
            };
            let scope = code.scope.clone();
            state.device_codes[index].redeemed = true;
            let user = &state.users[&upn];
            (upn, user.oid.clone(), user.groups.clone(), scope)
        };
        let (upn, oid, groups, scope) = approved;
        let refresh_token = self.new_refresh_token(&upn, tenant, client_id, &scope);
        let principal = Principal::User { upn, oid, groups };
        self.token_response(
            tenant,
            &audience_of(&scope),
            &principal,
            client_id,
            &scope,
            Some(refresh_token),
            form,
        )
    }

    /// Graph `POST /v1.0/directoryObjects/{oid}/getMemberObjects`.
    fn member_objects(&self, req: &Request<Bytes>, oid: &str) -> Response<Body> {
        self.graph_calls.fetch_add(1, Ordering::SeqCst);
        if !self.state().graph_available {
            return graph_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "serviceNotAvailable",
                "The service is temporarily unavailable. Please retry later.",
            );
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token else {
            return graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "Access token is empty.",
            );
        };
        if let Err(message) = self.verify_graph_token(token) {
            return graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                &message,
            );
        }
        let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
        if !body["securityEnabledOnly"].is_boolean() {
            return graph_error(
                StatusCode::BAD_REQUEST,
                "Request_BadRequest",
                "The request body must contain the parameter 'securityEnabledOnly'.",
            );
        }
        let groups = {
            let state = self.state();
            let user = state.users.values().find(|u| u.oid == oid);
            match user {
                Some(user) => Some(user.groups.clone()),
                None if state.apps.values().any(|a| a.oid == oid) => Some(Vec::new()),
                None => None,
            }
        };
        match groups {
            Some(groups) => serve::json(
                StatusCode::OK,
                &json!({
                    "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)",
                    "value": groups,
                }),
            ),
            None => graph_error(
                StatusCode::NOT_FOUND,
                "Request_ResourceNotFound",
                &format!("Resource '{oid}' does not exist or one of its queried reference-property objects are not present."),
            ),
        }
    }

    fn verify_graph_token(&self, token: &str) -> Result<(), String> {
        let custom = self.state().graph_resource.clone();
        match custom {
            Some(resource) => self.verify(token, &[&resource]).map(|_| ()),
            None => self.verify(token, &[GRAPH, GRAPH_APP_ID]).map(|_| ()),
        }
    }

    fn verify(&self, token: &str, audiences: &[&str]) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("IDX14100: JWT is not well formed: {e}"))?;
        let active = self.state().active;
        let key = self.keys[..=active]
            .iter()
            .find(|k| Some(&k.kid) == header.kid.as_ref())
            .ok_or("Signing key not found.")?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(audiences);
        validation.leeway = 0;
        jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| format!("Access token validation failure: {e}."))
    }
}

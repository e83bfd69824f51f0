//! A stand-in for one Azure Key Vault (data plane, API 7.4): secrets with versions, RSA keys,
//! and certificates backed by a PKCS#12 secret, as the real service shapes them. Requests without
//! a token get the 401 bearer challenge naming the Entra stand-in's tenant and
//! `https://vault.azure.net` (or a custom cloud's resource); tokens must be signed by the Entra
//! stand-in for that audience.
//! Tests can throttle (429 with `Retry-After: 1`), deny an object (403) and count requests.
//! HTTPS on 127.0.0.1 with its own CA; serves until the last handle is dropped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use rcgen::PublicKeyData;
use serde_json::{json, Value};

use super::body::Body;
use super::entra::{rsa_public_components, Entra, TENANT};
use super::serve::{self, Form, TaskGuard};

pub const RESOURCE: &str = "https://vault.azure.net";
const RSA_KEY: &str = include_str!("keys/sp-client.pem");
/// Versions per page of a version listing: small, so tests see `nextLink`.
const PAGE: usize = 2;

/// One request, without its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultRequest {
    pub path: String,
    pub had_token: bool,
    pub status: u16,
}

#[derive(Clone)]
struct SecretVersion {
    version: String,
    value: String,
    content_type: Option<String>,
    enabled: bool,
}

#[derive(Default)]
struct State {
    secrets: HashMap<String, Vec<SecretVersion>>,
    /// Key name -> versions (the key material is the fixture RSA key for all of them).
    keys: HashMap<String, Vec<String>>,
    /// Certificate name -> versions; each is backed by the secret of the same name and version.
    certificates: HashMap<String, Vec<String>>,
    throttle: usize,
    denied: HashSet<String>,
    requests: Vec<VaultRequest>,
}

struct Shared {
    host: String,
    entra: Entra,
    /// The resource its challenge names and its tokens must be for.
    resource: String,
    state: Mutex<State>,
}

#[derive(Clone)]
pub struct KeyVault {
    shared: Arc<Shared>,
    ca_pem: Arc<str>,
    _tasks: Arc<TaskGuard>,
}

fn new_version() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn kv_error(code: StatusCode, kv_code: &str, message: &str) -> Response<Body> {
    serve::json(
        code,
        &json!({"error": {"code": kv_code, "message": message}}),
    )
}

impl KeyVault {
    pub async fn start(entra: &Entra) -> KeyVault {
        KeyVault::start_in_cloud(entra, RESOURCE).await
    }

    /// A vault of a custom cloud, whose Key Vault resource is `resource`.
    pub async fn start_in_cloud(entra: &Entra, resource: &str) -> KeyVault {
        let (listener, tls, ca_pem) = serve::tls_listener("standin-keyvault-ca").await;
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            host: format!("https://{addr}"),
            entra: entra.clone(),
            resource: resource.to_string(),
            state: Mutex::new(State::default()),
        });
        let handler = shared.clone();
        let tasks = serve::serve(listener, Some(tls), move |req| {
            let shared = handler.clone();
            async move { shared.handle(req) }
        });
        KeyVault {
            shared,
            ca_pem: ca_pem.into(),
            _tasks: tasks,
        }
    }

    /// The vault URL (`https://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        self.shared.host.clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca_pem.to_string()
    }

    /// Writes this CA and `entra`'s into one bundle (for `SSL_CERT_FILE`).
    pub fn write_ca_bundle(&self, entra: &Entra, dir: &Path) -> PathBuf {
        let path = dir.join("ca-bundle.pem");
        std::fs::write(&path, format!("{}{}", self.ca_pem, entra.ca_pem())).expect("write CAs");
        path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Adds a new (latest) version of a secret and returns its version id.
    pub fn set_secret(&self, name: &str, value: &str) -> String {
        self.add_secret_version(name, value, None)
    }

    fn add_secret_version(&self, name: &str, value: &str, content_type: Option<&str>) -> String {
        let version = new_version();
        self.state()
            .secrets
            .entry(name.to_string())
            .or_default()
            .push(SecretVersion {
                version: version.clone(),
                value: value.to_string(),
                content_type: content_type.map(str::to_string),
                enabled: true,
            });
        version
    }

    /// Adds a version of an RSA key (the fixture key's public half) and returns its version.
    pub fn create_rsa_key(&self, name: &str) -> String {
        let version = new_version();
        self.state()
            .keys
            .entry(name.to_string())
            .or_default()
            .push(version.clone());
        version
    }

    /// The SubjectPublicKeyInfo DER of the keys `create_rsa_key` makes.
    pub fn rsa_key_spki() -> Vec<u8> {
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(RSA_KEY, &rcgen::PKCS_RSA_SHA256)
            .expect("fixture key")
            .subject_public_key_info()
    }

    /// Creates a certificate version for `common_name`, its PFX stored (empty password) in the
    /// backing secret as Key Vault does. Returns (version, certificate PEM, PKCS#8 key PEM).
    pub fn create_certificate(&self, name: &str, common_name: &str) -> (String, String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec![common_name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let chain = p12_keystore::PrivateKeyChain::new(
            b"kv-local-key-id".as_slice(),
            p12_keystore::PrivateKey::from_der(&key.serialize_der()).expect("PKCS#8 key"),
            [p12_keystore::Certificate::from_der(cert.der()).expect("certificate")],
        );
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry(name, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
        let pfx = store.writer("").write().expect("write PFX");
        let version =
            self.add_secret_version(name, &STANDARD.encode(pfx), Some("application/x-pkcs12"));
        self.state()
            .certificates
            .entry(name.to_string())
            .or_default()
            .push(version.clone());
        (version, cert.pem(), key.serialize_pem())
    }

    /// The next `n` requests are answered 429 with `Retry-After: 1`.
    pub fn throttle_next(&self, n: usize) {
        self.state().throttle = n;
    }

    /// Requests for this object name are answered 403, as without a role assignment.
    pub fn deny(&self, name: &str) {
        self.state().denied.insert(name.to_string());
    }

    pub fn allow(&self, name: &str) {
        self.state().denied.remove(name);
    }

    pub fn requests(&self) -> Vec<VaultRequest> {
        self.state().requests.clone()
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: Request<Bytes>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let had_token = req.headers().contains_key(header::AUTHORIZATION);
        let response = self.route(&req);
        self.state().requests.push(VaultRequest {
            path,
            had_token,
            status: response.status().as_u16(),
        });
        response
    }

    fn route(&self, req: &Request<Bytes>) -> Response<Body> {
        let query = Form::parse(req.uri().query().unwrap_or_default().as_bytes());
        if query.get("api-version").is_none() {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The request URI contains an invalid or missing api-version query parameter.",
            );
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token else {
            return self.challenge("AKV10000: Request is missing a Bearer or PoP token.");
        };
        if let Err(e) = self.shared_verify(token) {
            return self.challenge(&format!("AKV10032: Invalid issuer or token. {e}"));
        }
        {
            let mut state = self.state();
            if state.throttle > 0 {
                state.throttle -= 1;
                let mut response = kv_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Throttled",
                    "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
        }
        if req.method() != Method::GET {
            return kv_error(StatusCode::METHOD_NOT_ALLOWED, "BadParameter", "GET only");
        }
        let segments: Vec<&str> = req
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if let [_, name, ..] = segments.as_slice() {
            if self.state().denied.contains(*name) {
                let action = match segments[0] {
                    "keys" => "Microsoft.KeyVault/vaults/keys/read",
                    "certificates" => "Microsoft.KeyVault/vaults/certificates/read",
                    _ => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
                };
                return serve::json(
                    StatusCode::FORBIDDEN,
                    &json!({"error": {
                        "code": "Forbidden",
                        "message": format!("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid=x;oid=y\r\nAction: '{action}'\r\nResource: '/subscriptions/x/resourcegroups/rg/providers/microsoft.keyvault/vaults/kv/{}/{name}'", segments[0]),
                        "innererror": {"code": "ForbiddenByRbac"},
                    }}),
                );
            }
        }
        match segments.as_slice() {
            ["secrets", name, "versions"] => {
                let skip = query
                    .get("$skiptoken")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                self.versions(name, skip)
            }
            ["secrets", name] => self.secret(name, None),
            ["secrets", name, version] => self.secret(name, Some(version)),
            ["keys", name] => self.key(name, None),
            ["keys", name, version] => self.key(name, Some(version)),
            ["certificates", name] => self.certificate(name, None),
            ["certificates", name, version] => self.certificate(name, Some(version)),
            _ => kv_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "The requested path was not found.",
            ),
        }
    }

    fn shared_verify(&self, token: &str) -> Result<(), String> {
        self.entra
            .verify_access_token(token, &[&self.resource])
            .map(|_| ())
    }

    fn challenge(&self, message: &str) -> Response<Body> {
        let mut response = kv_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
        let value = format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"{}\"",
            self.resource
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).expect("challenge header"),
        );
        response
    }

    fn not_found(kind: &str, name: &str, version: Option<&str>) -> Response<Body> {
        let code = match kind {
            "key" => "KeyNotFound",
            "certificate" => "CertificateNotFound",
            _ => "SecretNotFound",
        };
        let id = match version {
            Some(v) => format!("{name}/{v}"),
            None => name.to_string(),
        };
        kv_error(
            StatusCode::NOT_FOUND,
            code,
            &format!("A {kind} with (name/id) {id} was not found in this key vault. If you recently deleted this {kind} you may be able to recover it using the correct recovery command."),
        )
    }

    fn secret(&self, name: &str, version: Option<&str>) -> Response<Body> {
        let state = self.state();
        let found = state.secrets.get(name).and_then(|versions| match version {
            Some(v) => versions.iter().find(|s| s.version == v),
            None => versions.iter().rev().find(|s| s.enabled),
        });
        let Some(secret) = found else {
            return Self::not_found("secret", name, version);
        };
        let mut body = json!({
            "value": secret.value,
            "id": format!("{}/secrets/{name}/{}", self.host, secret.version),
            "attributes": {"enabled": secret.enabled, "created": 1700000000, "updated": 1700000000, "recoveryLevel": "Recoverable+Purgeable"},
            "tags": {},
        });
        if let Some(ct) = &secret.content_type {
            body["contentType"] = ct.as_str().into();
            if state.certificates.contains_key(name) {
                body["kid"] = format!("{}/keys/{name}/{}", self.host, secret.version).into();
                body["managed"] = true.into();
            }
        }
        serve::json(StatusCode::OK, &body)
    }

    fn versions(&self, name: &str, skip: usize) -> Response<Body> {
        let state = self.state();
        let Some(versions) = state.secrets.get(name) else {
            return Self::not_found("secret", name, None);
        };
        let page: Vec<Value> = versions
            .iter()
            .skip(skip)
            .take(PAGE)
            .map(|s| {
                json!({
                    "id": format!("{}/secrets/{name}/{}", self.host, s.version),
                    "attributes": {"enabled": s.enabled, "created": 1700000000, "updated": 1700000000},
                })
            })
            .collect();
        let next = (skip + PAGE < versions.len()).then(|| {
            format!(
                "{}/secrets/{name}/versions?api-version=7.4&$skiptoken={}&maxresults={PAGE}",
                self.host,
                skip + PAGE
            )
        });
        serve::json(StatusCode::OK, &json!({"value": page, "nextLink": next}))
    }

    fn key(&self, name: &str, version: Option<&str>) -> Response<Body> {
        let state = self.state();
        let found = state.keys.get(name).and_then(|versions| match version {
            Some(v) => versions.iter().find(|k| k.as_str() == v),
            None => versions.last(),
        });
        let Some(version) = found else {
            return Self::not_found("key", name, version);
        };
        let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(RSA_KEY, &rcgen::PKCS_RSA_SHA256)
            .expect("fixture key");
        let (n, e) = rsa_public_components(pair.der_bytes());
        serve::json(
            StatusCode::OK,
            &json!({
                "key": {
                    "kid": format!("{}/keys/{name}/{version}", self.host),
                    "kty": "RSA",
                    "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
                    "n": URL_SAFE_NO_PAD.encode(n),
                    "e": URL_SAFE_NO_PAD.encode(e),
                },
                "attributes": {"enabled": true, "created": 1700000000, "updated": 1700000000},
            }),
        )
    }

    fn certificate(&self, name: &str, version: Option<&str>) -> Response<Body> {
        let state = self.state();
        let found = state
            .certificates
            .get(name)
            .and_then(|versions| match version {
                Some(v) => versions.iter().find(|c| c.as_str() == v),
                None => versions.last(),
            });
        let Some(version) = found else {
            return Self::not_found("certificate", name, version);
        };
        serve::json(
            StatusCode::OK,
            &json!({
                "id": format!("{}/certificates/{name}/{version}", self.host),
                "kid": format!("{}/keys/{name}/{version}", self.host),
                "sid": format!("{}/secrets/{name}/{version}", self.host),
                "x5t": "AAAA",
                "cer": "",
                "attributes": {"enabled": true, "created": 1700000000, "updated": 1700000000},
                "policy": {"secret_props": {"contentType": "application/x-pkcs12"}},
            }),
        )
    }
}

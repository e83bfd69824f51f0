//! A client for the Key Vault data plane (REST API 7.4): secrets by name and version, their
//! version history, keys as PEM public keys and certificates as PEM private key and chain.
//!
//! Authentication follows the Azure SDKs: the first request goes out without a token and Key
//! Vault answers 401 with `WWW-Authenticate: Bearer authorization="<authority>/<tenant>",
//! resource="<resource>"`. The tenant and resource of that challenge choose the credential
//! (see [`VaultCredentials`]); the token is kept and sent on every later request. The resource
//! must belong to the vault's own domain, so a host posing as a vault cannot collect a token for
//! another service. The authority host is never taken from the challenge: tokens are requested
//! from the configured cloud's authority only.
//!
//! Throttling (429) and server errors (5xx) are retried a bounded number of times, waiting as
//! long as `Retry-After` asks (capped) or a jittered backoff. 403 and 404 become errors that name
//! the vault, the object and, for 403, the role the identity lacks.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::StatusCode;
use serde::Deserialize;
use url::Url;

use super::pem::{jwk_to_pem, pkcs12_to_pem, Jwk, PemError};
use crate::auth::{CredentialError, CredentialSource};
use crate::entra::http::{HttpClient, HttpError, HttpResponse};
use crate::entra::CloudDefinition;
use crate::secret::Secret;
use crate::tunnel::backoff::Backoff;

pub const API_VERSION: &str = "7.4";
/// One try and three retries: enough to ride out a throttling burst (Key Vault's limits are per
/// 10 seconds), few enough that a vault that is down fails the command within a minute.
const MAX_ATTEMPTS: u32 = 4;
/// A `Retry-After` longer than this is treated as this: a rotation pass must not stall for an
/// hour because one answer said so.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// A secret with more versions than this many pages (25 each) is not listed to the end.
const MAX_VERSION_PAGES: usize = 200;
/// The DNS suffixes of Key Vault in each built-in cloud; challenges for other resources (than
/// these and the configured cloud's) are refused on loopback vaults (emulators and tests),
/// where the domain rule cannot apply.
const KNOWN_RESOURCES: [&str; 4] = [
    "https://vault.azure.net",
    "https://vault.usgovcloudapi.net",
    "https://vault.azure.cn",
    "https://managedhsm.azure.net",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectType {
    Secret,
    Key,
    Cert,
}

impl ObjectType {
    fn collection(self) -> &'static str {
        match self {
            ObjectType::Secret => "secrets",
            ObjectType::Key => "keys",
            ObjectType::Cert => "certificates",
        }
    }

    /// The built-in role that grants reading this kind of object.
    pub fn reader_role(self) -> &'static str {
        match self {
            ObjectType::Secret => "Key Vault Secrets User",
            ObjectType::Key => "Key Vault Crypto User",
            ObjectType::Cert => "Key Vault Certificate User",
        }
    }
}

impl fmt::Display for ObjectType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectType::Secret => "secret",
            ObjectType::Key => "key",
            ObjectType::Cert => "cert",
        })
    }
}

impl FromStr for ObjectType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "secret" => Ok(ObjectType::Secret),
            "key" => Ok(ObjectType::Key),
            "cert" | "certificate" => Ok(ObjectType::Cert),
            other => Err(format!(
                "unknown object type {other:?}: use secret, key or cert"
            )),
        }
    }
}

/// How a certificate (or a certificate-backed secret) is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// Private key and certificate chain as PEM.
    #[default]
    Pem,
    /// The PKCS#12 bundle as Key Vault stores it (base64 text).
    Pfx,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "pem" => Ok(Format::Pem),
            "pfx" => Ok(Format::Pfx),
            other => Err(format!("unknown objectFormat {other:?}: use pem or pfx")),
        }
    }
}

/// One object in a vault; no version means the latest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: ObjectType,
    pub name: String,
    pub version: Option<String>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.kind, self.name)?;
        if let Some(v) = &self.version {
            write!(f, " version {v}")?;
        }
        Ok(())
    }
}

/// An object's content and the version it came from.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub value: Secret,
    pub version: String,
    pub content_type: Option<String>,
}

/// One entry of a secret's version history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: String,
    pub enabled: bool,
    /// Unix seconds.
    pub created: Option<i64>,
    pub updated: Option<i64>,
}

/// What a vault's 401 challenge asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub tenant: String,
    /// The token audience, e.g. `https://vault.azure.net`.
    pub resource: String,
}

/// Turns a vault's challenge into a credential: the proxy's chain with that tenant and
/// resource, or the service principal of `--credentials-secret`.
pub trait VaultCredentials: Send + Sync {
    fn credential(
        &self,
        challenge: &Challenge,
    ) -> Result<Arc<dyn CredentialSource>, CredentialError>;
}

/// Why a vault's 401 challenge cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("HTTP 401 without WWW-Authenticate: is this URL a Key Vault?")]
    NoHeader,
    #[error("not a Bearer challenge: {0:?}")]
    NotBearer(String),
    #[error("the challenge has no authorization (the Entra tenant)")]
    NoAuthorization,
    #[error("the challenge's authorization {0:?} names no tenant")]
    NoTenant(String),
    #[error("the challenge names no resource")]
    NoResource,
    #[error("resource {resource:?} is not a URL")]
    ResourceNotUrl {
        resource: String,
        #[source]
        source: url::ParseError,
    },
    #[error("it asks for a token for {resource}, which is not {vault}'s domain; refusing to send a token there")]
    ForeignResource { resource: String, vault: String },
}

#[derive(Debug, thiserror::Error)]
pub enum KeyVaultError {
    #[error("{url:?} is not a Key Vault URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url:?} is not a Key Vault URL")]
    NotUrl {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("{vault}: {what}: access denied (HTTP 403: {message}); grant the identity the \"{role}\" role on the vault (or, for a vault using access policies, get permission on {collection})")]
    Forbidden {
        vault: String,
        what: String,
        role: &'static str,
        collection: &'static str,
        message: String,
    },
    #[error("{vault}: {what} not found (HTTP 404: {message}); check the name, the version and the vault")]
    NotFound {
        vault: String,
        what: String,
        message: String,
    },
    #[error("{vault}: {what}: HTTP {status}: {message}")]
    Status {
        vault: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("{vault}: {what}")]
    Http {
        vault: String,
        what: String,
        #[source]
        source: HttpError,
    },
    #[error("{vault}: no token for Key Vault")]
    Credential {
        vault: String,
        #[source]
        source: CredentialError,
    },
    #[error("{vault}: the vault's authentication challenge cannot be used")]
    Challenge {
        vault: String,
        #[source]
        source: ChallengeError,
    },
    #[error("{vault}: {what}")]
    Convert {
        vault: String,
        what: String,
        #[source]
        source: PemError,
    },
    #[error("{vault}: {what}: the certificate's sid is not an object id")]
    Sid {
        vault: String,
        what: String,
        #[source]
        source: Box<KeyVaultError>,
    },
    #[error("{vault}: {what}: nextLink is not a URL")]
    NextLink {
        vault: String,
        what: String,
        #[source]
        source: url::ParseError,
    },
    #[error("{vault}: {what}: {reason}")]
    Content {
        vault: String,
        what: String,
        reason: String,
    },
}

/// Key Vault's error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct SecretBundle {
    value: String,
    id: String,
    #[serde(default, rename = "contentType")]
    content_type: Option<String>,
}

#[derive(Deserialize)]
struct KeyBundle {
    key: KeyWithId,
}

#[derive(Deserialize)]
struct KeyWithId {
    kid: String,
    #[serde(flatten)]
    jwk: Jwk,
}

#[derive(Deserialize)]
struct CertificateBundle {
    id: String,
    sid: String,
}

#[derive(Deserialize)]
struct VersionPage {
    #[serde(default)]
    value: Vec<VersionItem>,
    #[serde(default, rename = "nextLink")]
    next_link: Option<String>,
}

#[derive(Deserialize)]
struct VersionItem {
    id: String,
    #[serde(default)]
    attributes: Attributes,
}

#[derive(Deserialize, Default)]
struct Attributes {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    created: Option<i64>,
    #[serde(default)]
    updated: Option<i64>,
}

type Authenticated = (Challenge, Arc<dyn CredentialSource>);

pub struct KeyVaultClient {
    http: HttpClient,
    /// `https://<name>.vault.azure.net`, no trailing slash.
    base: Url,
    vault: String,
    credentials: Arc<dyn VaultCredentials>,
    auth: Mutex<Option<Authenticated>>,
    retry_base: Duration,
    /// The configured cloud's Key Vault resource, also accepted from a loopback vault.
    cloud_resource: Option<String>,
}

/// The vault URL for a vault name in a cloud (its `keyvaultDns` suffix).
pub fn vault_url(name: &str, cloud: &CloudDefinition) -> Result<String, KeyVaultError> {
    let valid = (3..=24).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid {
        return Err(KeyVaultError::BadUrl {
            url: name.to_string(),
            reason: "a vault name is 3 to 24 letters, digits and hyphens".into(),
        });
    }
    Ok(format!(
        "https://{}.{}",
        name.to_ascii_lowercase(),
        cloud.key_vault_suffix
    ))
}

/// Splits an object identifier (`https://<vault>/secrets/<name>[/<version>]`, as `az keyvault
/// secret show --query id` prints) into the vault URL and the object.
pub fn parse_id(id: &str) -> Result<(String, ObjectRef), KeyVaultError> {
    let bad = |reason: &str| KeyVaultError::BadUrl {
        url: id.to_string(),
        reason: reason.to_string(),
    };
    let url = Url::parse(id.trim()).map_err(|source| KeyVaultError::NotUrl {
        url: id.to_string(),
        source,
    })?;
    if url.scheme() != "https" {
        return Err(bad("Key Vault is only reached over https://"));
    }
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let (kind, name, version) = match segments.as_slice() {
        [collection, name] => (*collection, *name, None),
        [collection, name, version] => (*collection, *name, Some(version.to_string())),
        _ => {
            return Err(bad(
                "expected https://<vault>/secrets|keys|certificates/<name>[/<version>]",
            ))
        }
    };
    let kind = match kind {
        "secrets" => ObjectType::Secret,
        "keys" => ObjectType::Key,
        "certificates" => ObjectType::Cert,
        other => {
            return Err(bad(&format!(
                "{other:?} is not secrets, keys or certificates"
            )))
        }
    };
    let base = match url.port() {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    };
    Ok((
        base,
        ObjectRef {
            kind,
            name: name.to_string(),
            version,
        },
    ))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s.len() <= 127 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The last path segment of an object id: its version.
fn version_of(id: &str) -> String {
    id.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

impl KeyVaultClient {
    pub fn new(
        http: HttpClient,
        vault_url: &str,
        credentials: Arc<dyn VaultCredentials>,
    ) -> Result<Self, KeyVaultError> {
        let bad = |reason: &str| KeyVaultError::BadUrl {
            url: vault_url.to_string(),
            reason: reason.to_string(),
        };
        let base = Url::parse(vault_url.trim().trim_end_matches('/')).map_err(|source| {
            KeyVaultError::NotUrl {
                url: vault_url.to_string(),
                source,
            }
        })?;
        if base.scheme() != "https" {
            return Err(bad("Key Vault is only reached over https://"));
        }
        if base.path() != "/" || base.query().is_some() {
            return Err(bad(
                "a vault URL has no path, e.g. https://myvault.vault.azure.net",
            ));
        }
        let vault = base.host_str().ok_or_else(|| bad("no host"))?.to_string();
        Ok(KeyVaultClient {
            http,
            base,
            vault,
            credentials,
            auth: Mutex::new(None),
            retry_base: Duration::from_secs(1),
            cloud_resource: None,
        })
    }

    /// Accepts `cloud`'s Key Vault resource in challenges from a loopback vault too (a custom
    /// cloud's stand-in or emulator); other vaults are held to the domain rule either way.
    pub fn with_cloud(mut self, cloud: &CloudDefinition) -> Self {
        self.cloud_resource = Some(cloud.key_vault_resource.trim_end_matches('/').to_string());
        self
    }

    /// The first wait between retries when the vault gives no `Retry-After` (tests shorten it).
    pub fn with_retry_base(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// The vault's host, for messages.
    pub fn vault(&self) -> &str {
        &self.vault
    }

    /// An object's content as a file would hold it (`format` matters for certificates and
    /// certificate-backed secrets only).
    pub async fn fetch(
        &self,
        object: &ObjectRef,
        format: Format,
    ) -> Result<Fetched, KeyVaultError> {
        for segment in std::iter::once(&object.name).chain(object.version.iter()) {
            if !valid_segment(segment) {
                return Err(self.content(
                    &object.to_string(),
                    format!("{segment:?} is not a valid Key Vault name or version (letters, digits and hyphens)"),
                ));
            }
        }
        match object.kind {
            ObjectType::Secret => {
                let bundle = self.secret_bundle(object, ObjectType::Secret).await?;
                self.deliver(object, bundle, format)
            }
            ObjectType::Key => self.key(object).await,
            ObjectType::Cert => self.certificate(object, format).await,
        }
    }

    /// Every version of a secret, following `nextLink` page by page.
    pub async fn secret_versions(&self, name: &str) -> Result<Vec<VersionInfo>, KeyVaultError> {
        let what = format!("versions of secret '{name}'");
        if !valid_segment(name) {
            return Err(self.content(&what, format!("{name:?} is not a valid secret name")));
        }
        let mut url = self.url(&format!("/secrets/{name}/versions"), "&maxresults=25");
        let mut out = Vec::new();
        for _ in 0..MAX_VERSION_PAGES {
            let resp = self.get(&url, &what, ObjectType::Secret).await?;
            let page: VersionPage = self.decode(&resp, &url, &what)?;
            out.extend(page.value.into_iter().map(|item| VersionInfo {
                version: version_of(&item.id),
                enabled: item.attributes.enabled.unwrap_or(true),
                created: item.attributes.created,
                updated: item.attributes.updated,
            }));
            match page.next_link.filter(|l| !l.is_empty()) {
                Some(next) => url = self.same_vault(&next, &what)?,
                None => return Ok(out),
            }
        }
        Err(self.content(
            &what,
            format!("more than {MAX_VERSION_PAGES} pages of versions; stopped listing"),
        ))
    }

    async fn secret_bundle(
        &self,
        object: &ObjectRef,
        role_of: ObjectType,
    ) -> Result<SecretBundle, KeyVaultError> {
        let url = self.object_url(object, "secrets");
        let what = object.to_string();
        let resp = self.get(&url, &what, role_of).await?;
        self.decode(&resp, &url, &what)
    }

    fn deliver(
        &self,
        object: &ObjectRef,
        bundle: SecretBundle,
        format: Format,
    ) -> Result<Fetched, KeyVaultError> {
        let is_pfx = bundle
            .content_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("application/x-pkcs12"));
        let value = match (is_pfx, format) {
            (true, Format::Pem) => {
                let der = STANDARD
                    .decode(bundle.value.trim())
                    .map_err(|e| self.convert(object, PemError::Pkcs12Base64(e.into())))?;
                pkcs12_to_pem(&der).map_err(|e| self.convert(object, e))?
            }
            (false, Format::Pfx) if object.kind == ObjectType::Cert => {
                return Err(self.content(
                    &object.to_string(),
                    format!(
                        "objectFormat pfx needs a certificate stored as PKCS#12; this one is {}",
                        bundle.content_type.as_deref().unwrap_or("not typed")
                    ),
                ))
            }
            _ => Secret::new(bundle.value),
        };
        Ok(Fetched {
            value,
            version: version_of(&bundle.id),
            content_type: bundle.content_type,
        })
    }

    async fn key(&self, object: &ObjectRef) -> Result<Fetched, KeyVaultError> {
        let url = self.object_url(object, "keys");
        let what = object.to_string();
        let resp = self.get(&url, &what, ObjectType::Key).await?;
        let bundle: KeyBundle = self.decode(&resp, &url, &what)?;
        let pem = jwk_to_pem(&bundle.key.jwk).map_err(|e| self.convert(object, e))?;
        Ok(Fetched {
            value: Secret::new(pem),
            version: version_of(&bundle.key.kid),
            content_type: Some("application/x-pem-file".into()),
        })
    }

    async fn certificate(
        &self,
        object: &ObjectRef,
        format: Format,
    ) -> Result<Fetched, KeyVaultError> {
        let url = self.object_url(object, "certificates");
        let what = object.to_string();
        let resp = self.get(&url, &what, ObjectType::Cert).await?;
        let bundle: CertificateBundle = self.decode(&resp, &url, &what)?;
        // The private key lives in the certificate's backing secret, named by `sid`; only its
        // name and version are taken, so the token never goes to a host the answer names.
        let (_, backing) = parse_id(&bundle.sid).map_err(|e| KeyVaultError::Sid {
            vault: self.vault.clone(),
            what: what.clone(),
            source: Box::new(e),
        })?;
        if backing.kind != ObjectType::Secret || !valid_segment(&backing.name) {
            return Err(self.content(&what, "the certificate's sid does not name a secret".into()));
        }
        let secret = self.secret_bundle(&backing, ObjectType::Cert).await?;
        let mut fetched = self.deliver(object, secret, format)?;
        fetched.version = version_of(&bundle.id);
        Ok(fetched)
    }

    fn url(&self, path: &str, extra_query: &str) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        format!("{base}{path}?api-version={API_VERSION}{extra_query}")
    }

    fn object_url(&self, object: &ObjectRef, collection: &str) -> String {
        let mut path = format!("/{collection}/{}", object.name);
        if let Some(v) = &object.version {
            path.push('/');
            path.push_str(v);
        }
        self.url(&path, "")
    }

    /// A `nextLink` only if it points back at this vault.
    fn same_vault(&self, link: &str, what: &str) -> Result<String, KeyVaultError> {
        let url = Url::parse(link).map_err(|source| KeyVaultError::NextLink {
            vault: self.vault.clone(),
            what: what.to_string(),
            source,
        })?;
        if url.scheme() != self.base.scheme()
            || url.host_str() != self.base.host_str()
            || url.port_or_known_default() != self.base.port_or_known_default()
        {
            return Err(self.content(
                what,
                format!(
                    "nextLink points at {}, not this vault",
                    url.host_str().unwrap_or("no host")
                ),
            ));
        }
        Ok(url.to_string())
    }

    fn content(&self, what: &str, reason: String) -> KeyVaultError {
        KeyVaultError::Content {
            vault: self.vault.clone(),
            what: what.to_string(),
            reason,
        }
    }

    fn convert(&self, object: &ObjectRef, source: PemError) -> KeyVaultError {
        KeyVaultError::Convert {
            vault: self.vault.clone(),
            what: object.to_string(),
            source,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        resp: &HttpResponse,
        url: &str,
        what: &str,
    ) -> Result<T, KeyVaultError> {
        resp.json(url).map_err(|source| KeyVaultError::Http {
            vault: self.vault.clone(),
            what: what.to_string(),
            source,
        })
    }

    /// The token of the credential chosen by the last challenge; none before the first one.
    async fn token(&self) -> Result<Option<Secret>, KeyVaultError> {
        let credential = {
            let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
            auth.as_ref().map(|(_, c)| c.clone())
        };
        match credential {
            None => Ok(None),
            Some(c) => c
                .token()
                .await
                .map(Some)
                .map_err(|source| KeyVaultError::Credential {
                    vault: self.vault.clone(),
                    source,
                }),
        }
    }

    /// Reads the challenge and picks the credential for it. Returns false when the challenge
    /// is the one already answered (the token itself was refused).
    fn accept_challenge(&self, resp: &HttpResponse) -> Result<bool, KeyVaultError> {
        let fail = |source: ChallengeError| KeyVaultError::Challenge {
            vault: self.vault.clone(),
            source,
        };
        let header = resp
            .header("www-authenticate")
            .ok_or_else(|| fail(ChallengeError::NoHeader))?;
        let challenge = parse_challenge(header).map_err(fail)?;
        self.check_resource(&challenge.resource).map_err(fail)?;
        let mut auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        if auth.as_ref().is_some_and(|(c, _)| *c == challenge) {
            return Ok(false);
        }
        tracing::debug!(vault = %self.vault, tenant = %challenge.tenant, resource = %challenge.resource, "Key Vault authentication challenge");
        let credential = self.credentials.credential(&challenge).map_err(|source| {
            KeyVaultError::Credential {
                vault: self.vault.clone(),
                source,
            }
        })?;
        *auth = Some((challenge, credential));
        Ok(true)
    }

    /// The resource must be the vault's parent domain (`vault.azure.net` for
    /// `x.vault.azure.net`), so a token for one service is never handed to another host.
    fn check_resource(&self, resource: &str) -> Result<(), ChallengeError> {
        let url = Url::parse(resource).map_err(|source| ChallengeError::ResourceNotUrl {
            resource: resource.to_string(),
            source,
        })?;
        let domain = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let host = self.vault.to_ascii_lowercase();
        if !domain.is_empty() && host.ends_with(&format!(".{domain}")) {
            return Ok(());
        }
        let loopback = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]");
        let resource_id = resource.trim_end_matches('/');
        let known = KNOWN_RESOURCES.contains(&resource_id)
            || self
                .cloud_resource
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(resource_id));
        if loopback && known {
            return Ok(());
        }
        Err(ChallengeError::ForeignResource {
            resource: resource.to_string(),
            vault: self.vault.clone(),
        })
    }

    /// GET with the challenge handled and throttling retried.
    async fn get(
        &self,
        url: &str,
        what: &str,
        role_of: ObjectType,
    ) -> Result<HttpResponse, KeyVaultError> {
        let mut backoff = Backoff::new(self.retry_base, MAX_RETRY_AFTER);
        let mut attempt = 0;
        let mut challenges = 0;
        loop {
            attempt += 1;
            let token = self.token().await?;
            let authorization = token.as_ref().map(|t| format!("Bearer {}", t.expose()));
            let mut headers = vec![("accept", "application/json")];
            if let Some(a) = &authorization {
                headers.push(("authorization", a.as_str()));
            }
            let resp = match self.http.get(url, &headers).await {
                Ok(resp) => resp,
                Err(source) if attempt < MAX_ATTEMPTS => {
                    let wait = backoff.next_delay();
                    tracing::warn!(vault = %self.vault, object = %what, error = %source, retry_in_ms = wait.as_millis() as u64, "Key Vault unreachable; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(source) => {
                    return Err(KeyVaultError::Http {
                        vault: self.vault.clone(),
                        what: what.to_string(),
                        source,
                    })
                }
            };
            let status = resp.status;
            if status.is_success() {
                return Ok(resp);
            }
            // A first 401 is the challenge; one more is allowed for a token the vault refuses
            // under a changed challenge (another tenant). Neither counts as an attempt.
            if status == StatusCode::UNAUTHORIZED && challenges < 2 {
                challenges += 1;
                attempt -= 1;
                if self.accept_challenge(&resp)? || token.is_none() {
                    continue;
                }
            }
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            if retryable && attempt < MAX_ATTEMPTS {
                let wait = retry_after(&resp)
                    .unwrap_or_else(|| backoff.next_delay())
                    .min(MAX_RETRY_AFTER);
                tracing::warn!(vault = %self.vault, object = %what, status = status.as_u16(), retry_in_ms = wait.as_millis() as u64, "Key Vault asked to retry");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(self.status_error(&resp, what, role_of, attempt));
        }
    }

    fn status_error(
        &self,
        resp: &HttpResponse,
        what: &str,
        role_of: ObjectType,
        attempts: u32,
    ) -> KeyVaultError {
        let body: ErrorBody = serde_json::from_slice(&resp.body).unwrap_or_default();
        let mut message = match (body.error.code.is_empty(), body.error.message.is_empty()) {
            (_, false) => body.error.message,
            (false, true) => body.error.code,
            (true, true) => resp.text_excerpt(),
        };
        if message.is_empty() {
            message = "no error details".into();
        }
        let vault = self.vault.clone();
        let what = what.to_string();
        match resp.status {
            StatusCode::FORBIDDEN => KeyVaultError::Forbidden {
                vault,
                what,
                role: role_of.reader_role(),
                collection: role_of.collection(),
                message,
            },
            StatusCode::NOT_FOUND => KeyVaultError::NotFound {
                vault,
                what,
                message,
            },
            status => {
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    message = format!("{message} (gave up after {attempts} attempts)");
                }
                KeyVaultError::Status {
                    vault,
                    what,
                    status: status.as_u16(),
                    message,
                }
            }
        }
    }
}

/// `Retry-After` in seconds (Key Vault does not send the date form).
fn retry_after(resp: &HttpResponse) -> Option<Duration> {
    resp.header("retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// `Bearer authorization="https://login.microsoftonline.com/<tenant>", resource="..."` (or the
/// newer `authorization_uri` and `scope="<resource>/.default"`).
pub fn parse_challenge(header: &str) -> Result<Challenge, ChallengeError> {
    let rest = header
        .trim()
        .strip_prefix("Bearer")
        .or_else(|| header.trim().strip_prefix("bearer"))
        .ok_or_else(|| ChallengeError::NotBearer(header.to_string()))?;
    let mut authorization = None;
    let mut resource = None;
    for part in rest.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "authorization" | "authorization_uri" => authorization = Some(value),
            "resource" => resource = Some(value),
            "scope" if resource.is_none() => {
                resource = Some(value.trim_end_matches("/.default").to_string())
            }
            _ => {}
        }
    }
    let authorization = authorization.ok_or(ChallengeError::NoAuthorization)?;
    let tenant = Url::parse(&authorization)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.find(|s| !s.is_empty()).map(str::to_string))
        })
        .ok_or_else(|| ChallengeError::NoTenant(authorization.clone()))?;
    let resource = resource.ok_or(ChallengeError::NoResource)?;
    Ok(Challenge {
        tenant,
        resource: resource.trim_end_matches('/').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::Cloud;

    #[test]
    fn challenges_parse_in_both_forms() {
        let c = parse_challenge(r#"Bearer authorization="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net""#).unwrap();
        assert_eq!(c.tenant, "72f988bf-86f1-41af-91ab-2d7cd011db47");
        assert_eq!(c.resource, "https://vault.azure.net");
        let c = parse_challenge(r#"Bearer authorization_uri="https://login.microsoftonline.us/t1/", scope="https://vault.usgovcloudapi.net/.default""#).unwrap();
        assert_eq!(c.tenant, "t1");
        assert_eq!(c.resource, "https://vault.usgovcloudapi.net");
        assert!(parse_challenge("Basic realm=x").is_err());
        assert!(
            parse_challenge(r#"Bearer resource="https://vault.azure.net""#)
                .unwrap_err()
                .to_string()
                .contains("tenant")
        );
    }

    #[test]
    fn ids_and_names_become_vault_urls() {
        let (base, object) =
            parse_id("https://contoso.vault.azure.net/secrets/example-secret/0123abcd").unwrap();
        assert_eq!(base, "https://contoso.vault.azure.net");
        assert_eq!(object.kind, ObjectType::Secret);
        assert_eq!(object.name, "example-secret");
        assert_eq!(object.version.as_deref(), Some("0123abcd"));
        let (base, object) = parse_id("https://127.0.0.1:8443/certificates/web").unwrap();
        assert_eq!(base, "https://127.0.0.1:8443");
        assert_eq!(object.kind, ObjectType::Cert);
        assert!(object.version.is_none());
        assert!(parse_id("http://contoso.vault.azure.net/secrets/x").is_err());
        assert!(parse_id("https://contoso.vault.azure.net/storage/x").is_err());
        assert_eq!(
            vault_url("Contoso-KV", &Cloud::AzureChinaCloud.into()).unwrap(),
            "https://contoso-kv.vault.azure.cn"
        );
        assert_eq!(
            vault_url("kv1", &Cloud::AzureUSGovernmentCloud.into()).unwrap(),
            "https://kv1.vault.usgovcloudapi.net"
        );
        assert!(vault_url("a/b", &CloudDefinition::default()).is_err());
        let custom = CloudDefinition {
            key_vault_suffix: "vault.local.azurestack.external".into(),
            ..CloudDefinition::default()
        };
        assert_eq!(
            vault_url("kv1", &custom).unwrap(),
            "https://kv1.vault.local.azurestack.external"
        );
    }

    struct NoCredentials;
    impl VaultCredentials for NoCredentials {
        fn credential(&self, _: &Challenge) -> Result<Arc<dyn CredentialSource>, CredentialError> {
            Err(CredentialError::unavailable("test", "none"))
        }
    }

    #[test]
    fn a_challenge_for_another_domain_is_refused() {
        let http = crate::entra::test_server::client();
        let client = KeyVaultClient::new(
            http.clone(),
            "https://contoso.vault.azure.net",
            Arc::new(NoCredentials),
        )
        .unwrap();
        assert!(client.check_resource("https://vault.azure.net").is_ok());
        let err = client
            .check_resource("https://management.azure.com")
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing"), "{err}");
        let local =
            KeyVaultClient::new(http, "https://127.0.0.1:9443", Arc::new(NoCredentials)).unwrap();
        assert!(local.check_resource("https://vault.azure.net").is_ok());
        assert!(local.check_resource("https://graph.microsoft.com").is_err());
        assert!(local.check_resource("https://vault.contoso.test").is_err());
        let custom = CloudDefinition {
            key_vault_resource: "https://vault.contoso.test/".into(),
            ..CloudDefinition::default()
        };
        let local = KeyVaultClient::new(
            crate::entra::test_server::client(),
            "https://127.0.0.1:9443",
            Arc::new(NoCredentials),
        )
        .unwrap()
        .with_cloud(&custom);
        assert!(local.check_resource("https://vault.contoso.test/").is_ok());
        assert!(local.check_resource("https://graph.microsoft.com").is_err());
    }
}

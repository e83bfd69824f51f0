//! What the chain and every credential source share: the [`Source`] trait,
//! the [`SourceKind`]s in the chain's order, the process [`Environment`] read once, the
//! [`ChainOptions`] and the sign-in [`Prompt`]. The sources and the chain import this module;
//! this module imports none of them, so no two of those files import each other.

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use super::http::HttpClient;
use super::pop::KeyRing;
use super::{Authority, SourceError};
use crate::auth::refresh::{ExpiringToken, FetchFuture, TokenFetcher};
use crate::secret::Secret;

/// The credential sources, in the order the chain tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Env,
    WorkloadIdentity,
    ManagedIdentity,
    AzureCli,
    DeviceCode,
}

impl SourceKind {
    pub const ALL: [SourceKind; 5] = [
        SourceKind::Env,
        SourceKind::WorkloadIdentity,
        SourceKind::ManagedIdentity,
        SourceKind::AzureCli,
        SourceKind::DeviceCode,
    ];

    /// The `--auth` value.
    pub fn flag_value(self) -> &'static str {
        match self {
            SourceKind::Env => "env",
            SourceKind::WorkloadIdentity => "workload-identity",
            SourceKind::ManagedIdentity => "managed-identity",
            SourceKind::AzureCli => "azure-cli",
            SourceKind::DeviceCode => "device-code",
        }
    }
}

/// The name in messages.
impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Env => "environment",
            SourceKind::WorkloadIdentity => "workload identity",
            SourceKind::ManagedIdentity => "managed identity",
            SourceKind::AzureCli => "Azure CLI",
            SourceKind::DeviceCode => "device code",
        })
    }
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SourceKind::ALL
            .into_iter()
            .find(|k| k.flag_value().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let all: Vec<&str> = SourceKind::ALL.iter().map(|k| k.flag_value()).collect();
                format!(
                    "unknown credential source {s:?}: use one of {}",
                    all.join(", ")
                )
            })
    }
}

pub type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ExpiringToken, SourceError>> + Send + 'a>>;

/// One way to get an Entra token; the chain needs to know why one did not work.
pub trait Source: Send + Sync {
    fn kind(&self) -> SourceKind;
    fn attempt(&self) -> SourceFuture<'_>;
}

/// Every source is also a plain [`TokenFetcher`], usable on its own behind `Refreshing`.
impl<S: Source> TokenFetcher for S {
    fn fetch(&self) -> FetchFuture<'_> {
        let name = self.kind().to_string();
        let attempt = self.attempt();
        Box::pin(async move { attempt.await.map_err(|e| e.into_credential_error(&name)) })
    }

    fn describe(&self) -> String {
        format!("Entra ID ({})", self.kind())
    }
}

/// Shows the sign-in instructions to the user; a trait so tests can capture them.
pub trait Prompt: Send + Sync {
    fn show(&self, message: &str);
}

/// Writes the instructions to stderr, where the proxy's other messages to the user go.
pub struct StderrPrompt;

impl Prompt for StderrPrompt {
    fn show(&self, message: &str) {
        errln!("{message}");
    }
}

/// The process environment the chain reads, captured once.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_certificate_path: Option<PathBuf>,
    /// Only whether it is set: encrypted keys are refused, the password is never read.
    pub client_certificate_password_set: bool,
    pub federated_token_file: Option<PathBuf>,
    /// `AZURE_POD_IDENTITY_AUTHORITY_HOST`: IMDS somewhere other than 169.254.169.254.
    pub imds_base: Option<String>,
    /// `IDENTITY_ENDPOINT` and `IMDS_ENDPOINT`: both set on an Arc-enabled server;
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` in App Service, Functions and Container Apps.
    pub identity_endpoint: Option<String>,
    pub imds_endpoint: Option<String>,
    /// `IDENTITY_HEADER`: the secret App Service expects back in `X-IDENTITY-HEADER`.
    pub identity_header: Option<Secret>,
    /// `IDENTITY_SERVER_THUMBPRINT`: set (with the two above) in Service Fabric.
    pub identity_server_thumbprint: Option<String>,
    /// `MSI_ENDPOINT`: Cloud Shell's; with `MSI_SECRET`, Azure Machine Learning's.
    pub msi_endpoint: Option<String>,
    pub msi_secret: Option<Secret>,
    /// `SSL_CERT_FILE`, else `REQUESTS_CA_BUNDLE` (which azure-identity for Python honors):
    /// CAs trusted besides the system's wherever a managed identity endpoint speaks https.
    pub ca_bundle: Option<PathBuf>,
    /// Where HIMDS challenge files may be read from.
    pub himds_challenge_dir: PathBuf,
    /// `PATH`, to find `az`.
    pub path: Option<OsString>,
}

impl Environment {
    pub fn from_process() -> Environment {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Environment {
            tenant_id: var("AZURE_TENANT_ID"),
            client_id: var("AZURE_CLIENT_ID"),
            client_secret: var("AZURE_CLIENT_SECRET").map(Secret::new),
            client_certificate_path: var("AZURE_CLIENT_CERTIFICATE_PATH").map(PathBuf::from),
            client_certificate_password_set: var("AZURE_CLIENT_CERTIFICATE_PASSWORD").is_some(),
            federated_token_file: var("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from),
            imds_base: var("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
            identity_endpoint: var("IDENTITY_ENDPOINT"),
            imds_endpoint: var("IMDS_ENDPOINT"),
            identity_header: var("IDENTITY_HEADER").map(Secret::new),
            identity_server_thumbprint: var("IDENTITY_SERVER_THUMBPRINT"),
            msi_endpoint: var("MSI_ENDPOINT"),
            msi_secret: var("MSI_SECRET").map(Secret::new),
            ca_bundle: var("SSL_CERT_FILE")
                .or_else(|| var("REQUESTS_CA_BUNDLE"))
                .map(PathBuf::from),
            himds_challenge_dir: default_challenge_dir(),
            path: std::env::var_os("PATH"),
        }
    }
}

/// The directory the Connected Machine agent writes HIMDS challenge files into.
pub fn default_challenge_dir() -> PathBuf {
    if cfg!(windows) {
        let program_data =
            std::env::var_os("ProgramData").unwrap_or_else(|| "C:\\ProgramData".into());
        PathBuf::from(program_data)
            .join("AzureConnectedMachineAgent")
            .join("Tokens")
    } else {
        PathBuf::from("/var/opt/azcmagent/tokens")
    }
}

pub struct ChainOptions {
    pub authority: Authority,
    /// `--tenant`; else `AZURE_TENANT_ID`; else "organizations" for the device code.
    pub tenant: Option<String>,
    /// The cluster's server application: the token's audience.
    pub server_app_id: String,
    /// The public client users sign in with (device code).
    pub client_app_id: String,
    /// `--auth`: only this source.
    pub only: Option<SourceKind>,
    /// Whether the device code may start a sign-in in the automatic chain (stderr is a
    /// terminal). `--auth device-code` always may.
    pub interactive: bool,
    pub http: HttpClient,
    /// The device code's refresh tokens go under `<config_dir>/entra/`.
    pub config_dir: PathBuf,
    pub prompt: Arc<dyn Prompt>,
    /// `--pop`: tokens are requested bound to this key ring's key (proof of possession);
    /// sources whose grants cannot carry `req_cnf` (managed identity, the Azure CLI) refuse.
    pub pop: Option<Arc<KeyRing>>,
}

/// The extra token request parameters of `--pop`, none without it.
pub fn pop_form(pop: &Option<Arc<KeyRing>>) -> Vec<(&'static str, String)> {
    pop.as_ref().map(|r| r.form().to_vec()).unwrap_or_default()
}

//! Which Azure cloud: the Entra authority, the v1 token issuer host, and the endpoints and
//! resource ids of the services clusterconnect calls (Microsoft Graph for group overage, Key
//! Vault, Azure Resource Manager).
//!
//! The three built-in clouds are [`Cloud`]s. Any other cloud (Azure Stack Hub, sovereign and
//! air-gapped clouds, a test stand-in) is a [`CloudDefinition`] read from a file, as
//! `az cloud register --cloud-config` reads it (`{"endpoints": {...}, "suffixes": {...}}`), or in
//! the Azure SDK for Go's environment shape that kubelogin, the Arc guard and the Key Vault CSI
//! provider read for `AzureStackCloud` (`AZURE_ENVIRONMENT_FILEPATH`). [`resolve`] picks the
//! cloud from `--cloud`, `--cloud-config` (or `CLUSTERCONNECT_CLOUD_CONFIG`), then applies the
//! per-endpoint environment overrides; `AZURE_AUTHORITY_HOST` overrides the authority the way
//! azure-identity does.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use url::Url;

/// The file naming a custom cloud, when `--cloud-config` is not given.
pub const CLOUD_CONFIG_ENV: &str = "CLUSTERCONNECT_CLOUD_CONFIG";
/// The Go SDK's environment file, read for `--cloud AzureStackCloud` as kubelogin does.
pub const ENVIRONMENT_FILE_ENV: &str = "AZURE_ENVIRONMENT_FILEPATH";
/// The name kubelogin and the Key Vault CSI provider give a cloud described by a file.
pub const AZURE_STACK_CLOUD: &str = "AzureStackCloud";
/// The variables that override one endpoint of whichever cloud was chosen, by field.
pub const OVERRIDES: [(&str, Field); 7] = [
    ("AZURE_AUTHORITY_HOST", Field::Authority),
    ("CLUSTERCONNECT_GRAPH_ENDPOINT", Field::GraphEndpoint),
    ("CLUSTERCONNECT_GRAPH_RESOURCE", Field::GraphResource),
    ("CLUSTERCONNECT_KEYVAULT_DNS_SUFFIX", Field::KeyVaultSuffix),
    ("CLUSTERCONNECT_KEYVAULT_RESOURCE", Field::KeyVaultResource),
    ("CLUSTERCONNECT_ARM_ENDPOINT", Field::ArmEndpoint),
    ("CLUSTERCONNECT_ARM_RESOURCE", Field::ArmResource),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Cloud {
    #[default]
    AzurePublicCloud,
    AzureUSGovernmentCloud,
    AzureChinaCloud,
}

impl FromStr for Cloud {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "azurepubliccloud" | "azurecloud" | "public" => Ok(Cloud::AzurePublicCloud),
            "azureusgovernmentcloud" | "azureusgovernment" | "usgov" => {
                Ok(Cloud::AzureUSGovernmentCloud)
            }
            "azurechinacloud" | "china" => Ok(Cloud::AzureChinaCloud),
            _ => Err(format!(
                "unknown cloud {s:?}: use AzurePublicCloud, AzureUSGovernmentCloud or AzureChinaCloud, or describe it in a file (--cloud-config)"
            )),
        }
    }
}

impl Cloud {
    pub const ALL: [Cloud; 3] = [
        Cloud::AzurePublicCloud,
        Cloud::AzureUSGovernmentCloud,
        Cloud::AzureChinaCloud,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cloud::AzurePublicCloud => "AzurePublicCloud",
            Cloud::AzureUSGovernmentCloud => "AzureUSGovernmentCloud",
            Cloud::AzureChinaCloud => "AzureChinaCloud",
        }
    }

    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::AzurePublicCloud => "https://login.microsoftonline.com",
            Cloud::AzureUSGovernmentCloud => "https://login.microsoftonline.us",
            Cloud::AzureChinaCloud => "https://login.chinacloudapi.cn",
        }
    }

    /// The host in v1 access tokens' `iss` (`https://sts.windows.net/{tid}/`).
    pub fn v1_issuer_host(self) -> &'static str {
        match self {
            Cloud::AzurePublicCloud => "https://sts.windows.net",
            Cloud::AzureUSGovernmentCloud => "https://sts.windows.net",
            Cloud::AzureChinaCloud => "https://sts.chinacloudapi.cn",
        }
    }

    pub fn graph_endpoint(self) -> &'static str {
        match self {
            Cloud::AzurePublicCloud => "https://graph.microsoft.com",
            Cloud::AzureUSGovernmentCloud => "https://graph.microsoft.us",
            Cloud::AzureChinaCloud => "https://microsoftgraph.chinacloudapi.cn",
        }
    }

    pub fn key_vault_resource(self) -> &'static str {
        match self {
            Cloud::AzurePublicCloud => "https://vault.azure.net",
            Cloud::AzureUSGovernmentCloud => "https://vault.usgovcloudapi.net",
            Cloud::AzureChinaCloud => "https://vault.azure.cn",
        }
    }

    /// Azure Resource Manager's endpoint and the classic Service Management resource id: the
    /// two audiences of tokens for ARM.
    pub fn arm(self) -> [&'static str; 2] {
        match self {
            Cloud::AzurePublicCloud => [
                "https://management.azure.com",
                "https://management.core.windows.net",
            ],
            Cloud::AzureUSGovernmentCloud => [
                "https://management.usgovcloudapi.net",
                "https://management.core.usgovcloudapi.net",
            ],
            Cloud::AzureChinaCloud => [
                "https://management.chinacloudapi.cn",
                "https://management.core.chinacloudapi.cn",
            ],
        }
    }
}

/// Everything clusterconnect needs to know about one cloud. URLs have no trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudDefinition {
    pub name: String,
    /// Entra's scheme and host, e.g. `https://login.microsoftonline.com`.
    pub authority_host: String,
    /// The host in v1 access tokens' `iss`.
    pub v1_issuer_host: String,
    /// Where Microsoft Graph answers.
    pub graph_endpoint: String,
    /// The resource (audience) of tokens for Graph.
    pub graph_resource: String,
    /// The DNS suffix under which vaults are named, without a leading dot: `vault.azure.net`.
    pub key_vault_suffix: String,
    /// The resource (audience) of tokens for Key Vault.
    pub key_vault_resource: String,
    /// Azure Resource Manager's endpoint.
    pub arm_endpoint: String,
    /// The resource ids of tokens for ARM (its endpoint and the Service Management id).
    pub arm_resources: Vec<String>,
}

impl From<Cloud> for CloudDefinition {
    fn from(cloud: Cloud) -> CloudDefinition {
        let [arm_endpoint, service_management] = cloud.arm();
        CloudDefinition {
            name: cloud.name().to_string(),
            authority_host: cloud.authority_host().to_string(),
            v1_issuer_host: cloud.v1_issuer_host().to_string(),
            graph_endpoint: cloud.graph_endpoint().to_string(),
            graph_resource: cloud.graph_endpoint().to_string(),
            key_vault_suffix: cloud
                .key_vault_resource()
                .trim_start_matches("https://")
                .to_string(),
            key_vault_resource: cloud.key_vault_resource().to_string(),
            arm_endpoint: arm_endpoint.to_string(),
            arm_resources: vec![service_management.to_string(), arm_endpoint.to_string()],
        }
    }
}

impl Default for CloudDefinition {
    fn default() -> Self {
        Cloud::default().into()
    }
}

/// One overridable part of a cloud definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Authority,
    GraphEndpoint,
    GraphResource,
    KeyVaultSuffix,
    KeyVaultResource,
    ArmEndpoint,
    ArmResource,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("unknown cloud {name:?}: use AzurePublicCloud, AzureUSGovernmentCloud or AzureChinaCloud, or describe it in a file with --cloud-config (or {CLOUD_CONFIG_ENV})")]
    Unknown { name: String },
    #[error("--cloud {AZURE_STACK_CLOUD} needs its description: --cloud-config FILE, {CLOUD_CONFIG_ENV} or {ENVIRONMENT_FILE_ENV}")]
    NoFile,
    #[error("--cloud {flag:?}, but the cloud configuration {} describes {file:?}", .path.display())]
    NameMismatch {
        flag: String,
        file: String,
        path: PathBuf,
    },
    #[error("cannot read the cloud configuration {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cloud configuration {} is not JSON", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the cloud configuration {}: {reason}", .path.display())]
    Shape { path: PathBuf, reason: String },
    #[error("{what} {value:?} is not an https:// URL")]
    NotHttps { what: String, value: String },
    #[error("the {what} is empty")]
    Empty { what: String },
}

/// `az cloud show` / `az cloud register --cloud-config`: only the keys clusterconnect uses are
/// read; the rest (storage, SQL, batch...) are ignored, so `az cloud show` output works as is.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AzCloud {
    name: Option<String>,
    #[serde(default)]
    endpoints: AzEndpoints,
    #[serde(default)]
    suffixes: AzSuffixes,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AzEndpoints {
    active_directory: Option<String>,
    active_directory_resource_id: Option<String>,
    resource_manager: Option<String>,
    microsoft_graph_resource_id: Option<String>,
    /// clusterconnect's own key: Graph somewhere other than its resource id (a stand-in).
    microsoft_graph_endpoint: Option<String>,
    /// clusterconnect's own key: the host of v1 tokens' `iss` [default: the built-in cloud
    /// with the same authority's, else `https://sts.windows.net`].
    active_directory_v1_issuer: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AzSuffixes {
    keyvault_dns: Option<String>,
}

/// The Azure SDK for Go's `Environment` (go-autorest), as kubelogin reads it from
/// `AZURE_ENVIRONMENT_FILEPATH` and the Key Vault CSI provider from `cloudEnvFileName`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoEnvironment {
    name: Option<String>,
    active_directory_endpoint: String,
    resource_manager_endpoint: Option<String>,
    service_management_endpoint: Option<String>,
    token_audience: Option<String>,
    #[serde(rename = "keyVaultDNSSuffix")]
    key_vault_dns_suffix: Option<String>,
    key_vault_endpoint: Option<String>,
    microsoft_graph_endpoint: Option<String>,
    #[serde(default)]
    resource_identifiers: GoResources,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GoResources {
    key_vault: Option<String>,
    microsoft_graph: Option<String>,
}

/// A cloud's parts as a file gives them; absent ones come from the built-in cloud with the
/// same authority, if any.
#[derive(Default)]
struct Parts {
    name: Option<String>,
    authority: Option<String>,
    v1_issuer: Option<String>,
    graph_endpoint: Option<String>,
    graph_resource: Option<String>,
    key_vault_suffix: Option<String>,
    key_vault_resource: Option<String>,
    arm_endpoint: Option<String>,
    arm_resources: Vec<String>,
}

fn trim_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `vault.azure.net` from `.vault.azure.net`, `vault.azure.net` or `https://vault.azure.net/`.
fn suffix_of(value: &str) -> String {
    let v = value.trim();
    let v = v.strip_prefix("https://").unwrap_or(v);
    v.trim_start_matches('.').trim_end_matches('/').to_string()
}

impl Parts {
    fn from_az(az: AzCloud) -> Parts {
        let e = az.endpoints;
        let graph_resource = non_empty(e.microsoft_graph_resource_id);
        Parts {
            name: non_empty(az.name),
            authority: non_empty(e.active_directory),
            v1_issuer: non_empty(e.active_directory_v1_issuer),
            graph_endpoint: non_empty(e.microsoft_graph_endpoint).or(graph_resource.clone()),
            graph_resource,
            key_vault_suffix: non_empty(az.suffixes.keyvault_dns).map(|s| suffix_of(&s)),
            key_vault_resource: None,
            arm_endpoint: non_empty(e.resource_manager.clone()),
            arm_resources: [e.active_directory_resource_id, e.resource_manager]
                .into_iter()
                .filter_map(non_empty)
                .collect(),
        }
    }

    fn from_go(go: GoEnvironment) -> Parts {
        let graph_resource = non_empty(go.resource_identifiers.microsoft_graph)
            .or(non_empty(go.microsoft_graph_endpoint.clone()));
        let key_vault_resource =
            non_empty(go.resource_identifiers.key_vault).or(non_empty(go.key_vault_endpoint));
        Parts {
            name: non_empty(go.name),
            authority: non_empty(Some(go.active_directory_endpoint)),
            v1_issuer: None,
            graph_endpoint: non_empty(go.microsoft_graph_endpoint).or(graph_resource.clone()),
            graph_resource,
            key_vault_suffix: non_empty(go.key_vault_dns_suffix).map(|s| suffix_of(&s)),
            key_vault_resource,
            arm_endpoint: non_empty(go.resource_manager_endpoint.clone()),
            arm_resources: [
                go.token_audience,
                go.service_management_endpoint,
                go.resource_manager_endpoint,
            ]
            .into_iter()
            .filter_map(non_empty)
            .collect(),
        }
    }

    /// The definition, each missing part taken from the built-in cloud with the same
    /// authority; a part neither the file nor such a cloud gives is an error.
    fn complete(self, fallback_name: &str, path: &Path) -> Result<CloudDefinition, CloudError> {
        let shape = |reason: String| CloudError::Shape {
            path: path.to_path_buf(),
            reason,
        };
        let authority = self
            .authority
            .map(|a| trim_url(&a))
            .ok_or_else(|| shape("no Entra authority (endpoints.activeDirectory)".into()))?;
        // Azure Stack Hub with Entra ID signs in at login.microsoftonline.com: its Graph is
        // the public cloud's.
        let base: Option<CloudDefinition> = Cloud::ALL
            .into_iter()
            .find(|c| c.authority_host().eq_ignore_ascii_case(&authority))
            .map(CloudDefinition::from);
        let mut missing = Vec::new();
        let mut need = |value: Option<String>, inherited: Option<&String>, key: &str| match value
            .map(|v| trim_url(&v))
            .or_else(|| inherited.cloned())
        {
            Some(v) => v,
            None => {
                missing.push(key.to_string());
                String::new()
            }
        };
        let graph_resource = need(
            self.graph_resource,
            base.as_ref().map(|b| &b.graph_resource),
            "endpoints.microsoftGraphResourceId",
        );
        let graph_endpoint = self
            .graph_endpoint
            .map(|v| trim_url(&v))
            .unwrap_or_else(|| graph_resource.clone());
        let key_vault_suffix = need(
            self.key_vault_suffix,
            base.as_ref().map(|b| &b.key_vault_suffix),
            "suffixes.keyvaultDns",
        );
        let arm_endpoint = need(
            self.arm_endpoint,
            base.as_ref().map(|b| &b.arm_endpoint),
            "endpoints.resourceManager",
        );
        if !missing.is_empty() {
            return Err(shape(format!(
                "missing {} (and {authority} is not a built-in cloud's authority to take them from)",
                missing.join(", ")
            )));
        }
        let key_vault_resource = self
            .key_vault_resource
            .map(|v| trim_url(&v))
            .unwrap_or_else(|| format!("https://{key_vault_suffix}"));
        let mut arm_resources: Vec<String> =
            self.arm_resources.iter().map(|r| trim_url(r)).collect();
        if arm_resources.is_empty() {
            arm_resources = base
                .as_ref()
                .map(|b| b.arm_resources.clone())
                .unwrap_or_else(|| vec![arm_endpoint.clone()]);
        }
        arm_resources.dedup();
        let v1_issuer_host = self
            .v1_issuer
            .map(|v| trim_url(&v))
            .or_else(|| base.as_ref().map(|b| b.v1_issuer_host.clone()))
            .unwrap_or_else(|| Cloud::AzurePublicCloud.v1_issuer_host().to_string());
        let def = CloudDefinition {
            name: self.name.unwrap_or_else(|| fallback_name.to_string()),
            authority_host: authority,
            v1_issuer_host,
            graph_endpoint,
            graph_resource,
            key_vault_suffix,
            key_vault_resource,
            arm_endpoint,
            arm_resources,
        };
        def.check()?;
        Ok(def)
    }
}

fn https(what: &str, value: &str) -> Result<(), CloudError> {
    match Url::parse(value) {
        Ok(url) if url.scheme() == "https" && url.host_str().is_some() => Ok(()),
        _ => Err(CloudError::NotHttps {
            what: what.to_string(),
            value: value.to_string(),
        }),
    }
}

impl CloudDefinition {
    /// Reads a cloud from a file in the `az cloud register --cloud-config` shape or the Go
    /// SDK's environment shape; `fallback_name` names it when the file does not.
    pub fn from_file(path: &Path, fallback_name: &str) -> Result<CloudDefinition, CloudError> {
        let text = std::fs::read_to_string(path).map_err(|source| CloudError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        CloudDefinition::parse(&text, path, fallback_name)
    }

    fn parse(text: &str, path: &Path, fallback_name: &str) -> Result<CloudDefinition, CloudError> {
        let json = |source| CloudError::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json)?;
        let parts = if value.get("activeDirectoryEndpoint").is_some() {
            Parts::from_go(serde_json::from_value(value).map_err(json)?)
        } else if value.get("endpoints").is_some() {
            Parts::from_az(serde_json::from_value(value).map_err(json)?)
        } else {
            return Err(CloudError::Shape {
                path: path.to_path_buf(),
                reason: "neither `endpoints` (az cloud register --cloud-config) nor `activeDirectoryEndpoint` (AZURE_ENVIRONMENT_FILEPATH)".into(),
            });
        };
        parts.complete(fallback_name, path)
    }

    /// Every endpoint is https (tokens go there); resource ids are only non-empty, since an
    /// app id URI is not always a URL.
    fn check(&self) -> Result<(), CloudError> {
        https("Entra authority", &self.authority_host)?;
        https("Microsoft Graph endpoint", &self.graph_endpoint)?;
        https("Azure Resource Manager endpoint", &self.arm_endpoint)?;
        https("Key Vault resource", &self.key_vault_resource)?;
        let empty = [
            ("Microsoft Graph resource", &self.graph_resource),
            ("Key Vault DNS suffix", &self.key_vault_suffix),
        ];
        for (what, value) in empty {
            if value.is_empty() {
                return Err(CloudError::Empty {
                    what: what.to_string(),
                });
            }
        }
        Ok(())
    }

    /// This cloud as a file in the `az cloud register --cloud-config` shape (with
    /// clusterconnect's own keys), which [`CloudDefinition::from_file`] reads back: how
    /// `connect` hands the cloud to the agent it installs.
    pub fn to_az_json(&self) -> serde_json::Value {
        let service_management = self
            .arm_resources
            .iter()
            .find(|r| **r != self.arm_endpoint)
            .unwrap_or(&self.arm_endpoint);
        serde_json::json!({
            "name": self.name,
            "endpoints": {
                "activeDirectory": self.authority_host,
                "activeDirectoryV1Issuer": self.v1_issuer_host,
                "activeDirectoryResourceId": service_management,
                "resourceManager": self.arm_endpoint,
                "microsoftGraphResourceId": self.graph_resource,
                "microsoftGraphEndpoint": self.graph_endpoint,
            },
            "suffixes": {"keyvaultDns": format!(".{}", self.key_vault_suffix)},
        })
    }

    /// The built-in cloud this is, unchanged, if any: then its name says it all.
    pub fn builtin(&self) -> Option<Cloud> {
        Cloud::ALL.into_iter().find(|c| {
            let mut named = CloudDefinition::from(*c);
            named.name = self.name.clone();
            c.name().eq_ignore_ascii_case(&self.name) && named == *self
        })
    }

    /// The host in v1 access tokens' `iss`.
    pub fn v1_issuer_host(&self) -> &str {
        &self.v1_issuer_host
    }

    /// Applies one environment override.
    pub fn set(&mut self, field: Field, value: &str) {
        let url = trim_url(value);
        match field {
            Field::Authority => self.authority_host = url,
            Field::GraphEndpoint => self.graph_endpoint = url,
            Field::GraphResource => self.graph_resource = url,
            Field::KeyVaultSuffix => self.key_vault_suffix = suffix_of(value),
            Field::KeyVaultResource => self.key_vault_resource = url,
            Field::ArmEndpoint => self.arm_endpoint = url,
            Field::ArmResource => self.arm_resources = vec![url],
        }
    }

    /// The audiences a token for ARM in this cloud carries (with and without the trailing
    /// slash, as Entra writes either): what a relay with `allow_arm_audience` accepts.
    pub fn arm_audiences(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for r in &self.arm_resources {
            for a in [format!("{r}/"), r.clone()] {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
        }
        all
    }

    /// Whether `audience` is one of this cloud's ARM resource ids.
    pub fn is_arm_audience(&self, audience: &str) -> bool {
        let audience = audience.trim().trim_end_matches('/');
        self.arm_resources
            .iter()
            .any(|r| r.eq_ignore_ascii_case(audience))
    }
}

/// The cloud for `--cloud NAME` and `--cloud-config FILE`, with the environment (`vars`)
/// supplying the file when the flag does not (`CLUSTERCONNECT_CLOUD_CONFIG`, or
/// `AZURE_ENVIRONMENT_FILEPATH` for `AzureStackCloud`) and the per-endpoint overrides
/// ([`OVERRIDES`]).
///
/// A built-in name picks the built-in cloud even when a file is configured, so an explicit
/// `--cloud AzureChinaCloud` is never replaced by a cloud file left in the environment; the
/// per-endpoint variables ([`OVERRIDES`]) still apply to it, and whoever validates tokens
/// says so loudly (see [`overrides_in_effect`]). Any other name must be the file's (or, for a
/// file without a name, becomes it).
pub fn resolve(
    name: Option<&str>,
    config: Option<&Path>,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<CloudDefinition, CloudError> {
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    let var = |key: &str| non_empty(vars(key));
    let builtin = name.and_then(|n| n.parse::<Cloud>().ok());
    let stack = name.is_some_and(|n| n.eq_ignore_ascii_case(AZURE_STACK_CLOUD));
    let file: Option<PathBuf> = config
        .map(Path::to_path_buf)
        .or_else(|| var(CLOUD_CONFIG_ENV).map(PathBuf::from))
        .or_else(|| {
            stack
                .then(|| var(ENVIRONMENT_FILE_ENV).map(PathBuf::from))
                .flatten()
        });
    let mut def = match (builtin, file) {
        (Some(cloud), _) => CloudDefinition::from(cloud),
        (None, Some(path)) => {
            let def = CloudDefinition::from_file(&path, name.unwrap_or("Custom"))?;
            if let Some(flag) = name {
                if !flag.eq_ignore_ascii_case(&def.name) && !stack {
                    return Err(CloudError::NameMismatch {
                        flag: flag.to_string(),
                        file: def.name,
                        path,
                    });
                }
            }
            def
        }
        (None, None) if stack => return Err(CloudError::NoFile),
        (None, None) => match name {
            Some(n) => {
                return Err(CloudError::Unknown {
                    name: n.to_string(),
                })
            }
            None => CloudDefinition::default(),
        },
    };
    for (key, field) in OVERRIDES {
        if let Some(value) = var(key) {
            def.set(field, &value);
        }
    }
    def.check().map_err(|e| match e {
        CloudError::NotHttps { what, value } => CloudError::NotHttps {
            what: format!("{what} (after the environment's overrides)"),
            value,
        },
        CloudError::Empty { what } => CloudError::Empty {
            what: format!("{what} (after the environment's overrides)"),
        },
        other => other,
    })?;
    Ok(def)
}

/// The override variables set in this process's environment: for the agent and the relay,
/// which trust tokens by the cloud's authority, to warn that the environment moved it.
pub fn overrides_in_effect() -> Vec<&'static str> {
    OVERRIDES
        .iter()
        .map(|(key, _)| *key)
        .chain([CLOUD_CONFIG_ENV])
        .filter(|key| non_empty(std::env::var(key).ok()).is_some())
        .collect()
}

/// [`resolve`] with this process's environment.
pub fn resolve_from_process(
    name: Option<&str>,
    config: Option<&Path>,
) -> Result<CloudDefinition, CloudError> {
    resolve(name, config, &|key| std::env::var(key).ok())
}

/// Where Entra lives for this process: the cloud's authority host unless overridden.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub cloud: CloudDefinition,
    /// Scheme and host, no trailing slash, e.g. `https://login.microsoftonline.com`.
    pub host: String,
    /// Microsoft Graph base URL, no trailing slash.
    pub graph: String,
}

impl Authority {
    pub fn new(
        cloud: impl Into<CloudDefinition>,
        host_override: Option<&str>,
    ) -> Result<Authority, String> {
        let cloud = cloud.into();
        let host = match host_override.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => {
                let url =
                    Url::parse(h).map_err(|e| format!("authority host {h:?} is not a URL: {e}"))?;
                if url.scheme() != "https" {
                    return Err(format!("authority host {h:?} must use https://"));
                }
                h.trim_end_matches('/').to_string()
            }
            None => cloud.authority_host.clone(),
        };
        Ok(Authority {
            graph: cloud.graph_endpoint.clone(),
            cloud,
            host,
        })
    }

    /// The authority of a resolved cloud (whose overrides are already applied).
    pub fn of(cloud: &CloudDefinition) -> Authority {
        Authority {
            cloud: cloud.clone(),
            host: cloud.authority_host.clone(),
            graph: cloud.graph_endpoint.clone(),
        }
    }

    pub fn token_endpoint(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.host)
    }

    pub fn device_code_endpoint(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/devicecode", self.host)
    }

    pub fn openid_configuration(&self, tenant: &str) -> String {
        format!(
            "{}/{tenant}/v2.0/.well-known/openid-configuration",
            self.host
        )
    }

    /// The two `iss` forms Entra puts in access tokens for `tenant`.
    pub fn issuers(&self, tenant: &str) -> [String; 2] {
        [
            format!("{}/{tenant}/", self.cloud.v1_issuer_host()),
            format!("{}/{tenant}/v2.0", self.host),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn clouds_parse_and_the_override_wins() {
        let china: Cloud = "AzureChinaCloud".parse().unwrap();
        assert_eq!(china.authority_host(), "https://login.chinacloudapi.cn");
        assert!("Mars"
            .parse::<Cloud>()
            .unwrap_err()
            .contains("AzurePublicCloud"));
        let a = Authority::new(Cloud::AzurePublicCloud, Some("https://127.0.0.1:9/")).unwrap();
        assert_eq!(
            a.token_endpoint("t"),
            "https://127.0.0.1:9/t/oauth2/v2.0/token"
        );
        assert_eq!(
            a.issuers("t"),
            [
                "https://sts.windows.net/t/".to_string(),
                "https://127.0.0.1:9/t/v2.0".to_string()
            ]
        );
        assert!(Authority::new(Cloud::AzurePublicCloud, Some("http://x")).is_err());
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// `az cloud show -n AzureCloud` as the CLI prints it (trimmed of nothing it prints).
    const AZ_PUBLIC: &str = r#"{
      "endpoints": {
        "activeDirectory": "https://login.microsoftonline.com",
        "activeDirectoryDataLakeResourceId": "https://datalake.azure.net/",
        "activeDirectoryGraphResourceId": "https://graph.windows.net/",
        "activeDirectoryResourceId": "https://management.core.windows.net/",
        "appInsightsResourceId": "https://api.applicationinsights.io",
        "appInsightsTelemetryChannelResourceId": "https://dc.applicationinsights.azure.com/v2/track",
        "attestationResourceId": "https://attest.azure.net",
        "azmirrorStorageAccountResourceId": null,
        "batchResourceId": "https://batch.core.windows.net/",
        "gallery": "https://gallery.azure.com/",
        "logAnalyticsResourceId": "https://api.loganalytics.io",
        "management": "https://management.core.windows.net/",
        "mediaResourceId": "https://rest.media.azure.net",
        "microsoftGraphResourceId": "https://graph.microsoft.com/",
        "ossrdbmsResourceId": "https://ossrdbms-aad.database.windows.net",
        "portal": "https://portal.azure.com",
        "resourceManager": "https://management.azure.com/",
        "sqlManagement": "https://management.core.windows.net:8443/",
        "synapseAnalyticsResourceId": "https://dev.azuresynapse.net",
        "vmImageAliasDoc": "https://raw.githubusercontent.com/Azure/azure-rest-api-specs/main/arm-compute/quickstart-templates/aliases.json"
      },
      "isActive": true,
      "name": "AzureCloud",
      "profile": "latest",
      "suffixes": {
        "acrLoginServerEndpoint": ".azurecr.io",
        "attestationEndpoint": ".attest.azure.net",
        "azureDatalakeAnalyticsCatalogAndJobEndpoint": "azuredatalakeanalytics.net",
        "azureDatalakeStoreFileSystemEndpoint": "azuredatalakestore.net",
        "keyvaultDns": ".vault.azure.net",
        "mariadbServerEndpoint": ".mariadb.database.azure.com",
        "mhsmDns": ".managedhsm.azure.net",
        "mysqlServerEndpoint": ".mysql.database.azure.com",
        "postgresqlServerEndpoint": ".postgres.database.azure.com",
        "sqlServerHostname": ".database.windows.net",
        "storageEndpoint": "core.windows.net",
        "storageSyncEndpoint": "afs.azure.net",
        "synapseAnalyticsEndpoint": ".dev.azuresynapse.net"
      }
    }"#;

    #[test]
    fn az_cloud_show_output_reads_as_the_built_in_public_cloud() {
        let def = CloudDefinition::parse(AZ_PUBLIC, Path::new("az.json"), "x").unwrap();
        let mut public = CloudDefinition::from(Cloud::AzurePublicCloud);
        public.name = "AzureCloud".into();
        assert_eq!(def, public);
    }

    #[test]
    fn a_custom_cloud_from_a_file_is_chosen_by_name_or_alone_and_the_environment_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack.json");
        std::fs::write(
            &path,
            r#"{"name": "Contoso",
                "endpoints": {"activeDirectory": "https://login.contoso.test/",
                  "activeDirectoryResourceId": "https://management.contoso.test/",
                  "resourceManager": "https://arm.contoso.test/",
                  "microsoftGraphResourceId": "https://graph.contoso.test/"},
                "suffixes": {"keyvaultDns": ".vault.contoso.test"}}"#,
        )
        .unwrap();
        let none = vars(&[]);
        let def = resolve(None, Some(&path), &none).unwrap();
        assert_eq!(def.name, "Contoso");
        assert_eq!(def.authority_host, "https://login.contoso.test");
        assert_eq!(def.graph_endpoint, "https://graph.contoso.test");
        assert_eq!(def.key_vault_suffix, "vault.contoso.test");
        assert_eq!(def.key_vault_resource, "https://vault.contoso.test");
        assert_eq!(def.v1_issuer_host(), "https://sts.windows.net");
        assert!(def.is_arm_audience("https://management.contoso.test/"));
        assert!(def.is_arm_audience("https://arm.contoso.test"));
        assert!(!def.is_arm_audience("https://management.azure.com/"));
        assert_eq!(def.arm_audiences().len(), 4);
        // What connect hands the agent reads back as the same cloud.
        let again = dir.path().join("again.json");
        std::fs::write(&again, def.to_az_json().to_string()).unwrap();
        assert_eq!(CloudDefinition::from_file(&again, "x").unwrap(), def);
        assert_eq!(def.builtin(), None);
        assert_eq!(
            CloudDefinition::from(Cloud::AzureChinaCloud).builtin(),
            Some(Cloud::AzureChinaCloud)
        );

        // By name, through the environment's file; a built-in name still wins.
        let env = vars(&[(CLOUD_CONFIG_ENV, path.to_str().unwrap())]);
        assert_eq!(resolve(Some("contoso"), None, &env).unwrap(), def);
        assert_eq!(
            resolve(Some("AzureChinaCloud"), None, &env).unwrap(),
            Cloud::AzureChinaCloud.into()
        );
        assert!(matches!(
            resolve(Some("Fabrikam"), None, &env),
            Err(CloudError::NameMismatch { .. })
        ));
        assert!(matches!(
            resolve(Some("Fabrikam"), None, &none),
            Err(CloudError::Unknown { .. })
        ));
        assert_eq!(
            resolve(None, None, &none).unwrap(),
            CloudDefinition::default()
        );

        // Per-endpoint overrides, on a file's cloud or a built-in one.
        let env = vars(&[
            ("AZURE_AUTHORITY_HOST", "https://127.0.0.1:8443/"),
            ("CLUSTERCONNECT_GRAPH_ENDPOINT", "https://127.0.0.1:9443"),
            ("CLUSTERCONNECT_KEYVAULT_DNS_SUFFIX", ".vault.example"),
            ("CLUSTERCONNECT_ARM_RESOURCE", "https://arm.example/"),
        ]);
        let def = resolve(Some("AzureUSGovernmentCloud"), None, &env).unwrap();
        assert_eq!(def.authority_host, "https://127.0.0.1:8443");
        assert_eq!(def.graph_endpoint, "https://127.0.0.1:9443");
        assert_eq!(def.graph_resource, "https://graph.microsoft.us");
        assert_eq!(def.key_vault_suffix, "vault.example");
        assert_eq!(
            def.arm_audiences(),
            ["https://arm.example/", "https://arm.example"]
        );
        let bad = vars(&[("CLUSTERCONNECT_GRAPH_ENDPOINT", "http://127.0.0.1:9")]);
        assert!(matches!(
            resolve(None, None, &bad),
            Err(CloudError::NotHttps { .. })
        ));
    }

    #[test]
    fn the_go_environment_file_is_read_for_azure_stack_cloud_and_gaps_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env.json");
        std::fs::write(
            &path,
            r#"{"name": "AzureStackCloud",
                "activeDirectoryEndpoint": "https://adfs.local.azurestack.external/",
                "resourceManagerEndpoint": "https://management.local.azurestack.external/",
                "tokenAudience": "https://management.adfs.azurestack.contoso/",
                "keyVaultDNSSuffix": "vault.local.azurestack.external",
                "keyVaultEndpoint": "https://vault.local.azurestack.external/",
                "microsoftGraphEndpoint": "https://graph.local.azurestack.external/",
                "resourceIdentifiers": {"graph": "https://graph.local.azurestack.external/"}}"#,
        )
        .unwrap();
        let env = vars(&[(ENVIRONMENT_FILE_ENV, path.to_str().unwrap())]);
        let def = resolve(Some("AzureStackCloud"), None, &env).unwrap();
        assert_eq!(def.authority_host, "https://adfs.local.azurestack.external");
        assert_eq!(
            def.key_vault_resource,
            "https://vault.local.azurestack.external"
        );
        assert!(def.is_arm_audience("https://management.adfs.azurestack.contoso/"));
        assert!(matches!(
            resolve(Some("AzureStackCloud"), None, &vars(&[])),
            Err(CloudError::NoFile)
        ));

        // A cloud of its own authority must name what it cannot inherit.
        let sparse = dir.path().join("sparse.json");
        std::fs::write(
            &sparse,
            r#"{"endpoints": {"activeDirectory": "https://login.contoso.test"}}"#,
        )
        .unwrap();
        let err = resolve(None, Some(&sparse), &vars(&[])).unwrap_err();
        assert!(
            err.to_string().contains("microsoftGraphResourceId")
                && err.to_string().contains("keyvaultDns"),
            "{err}"
        );
        // Azure Stack Hub with Entra ID: the rest is the public cloud's.
        std::fs::write(
            &sparse,
            r#"{"endpoints": {"activeDirectory": "https://login.microsoftonline.com/",
                "resourceManager": "https://management.local.azurestack.external/"},
                "suffixes": {"keyvaultDns": ".vault.local.azurestack.external"}}"#,
        )
        .unwrap();
        let def = resolve(Some("MyStack"), Some(&sparse), &vars(&[])).unwrap();
        assert_eq!(def.name, "MyStack");
        assert_eq!(def.graph_endpoint, "https://graph.microsoft.com");
        assert_eq!(
            def.arm_resources,
            ["https://management.local.azurestack.external"]
        );
    }
}

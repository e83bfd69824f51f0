//! Which Azure cloud: the Entra authority, the v1 token issuer host and the resource ids of
//! the services clusterconnect calls. `AZURE_AUTHORITY_HOST` overrides the authority the way
//! azure-identity does (sovereign clouds, private stand-ins in tests).

use std::str::FromStr;

use url::Url;

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
                "unknown cloud {s:?}: use AzurePublicCloud, AzureUSGovernmentCloud or AzureChinaCloud"
            )),
        }
    }
}

impl Cloud {
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
}

/// Where Entra lives for this process: the cloud's authority host unless overridden.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub cloud: Cloud,
    /// Scheme and host, no trailing slash, e.g. `https://login.microsoftonline.com`.
    pub host: String,
    /// Microsoft Graph base URL, no trailing slash.
    pub graph: String,
}

impl Authority {
    pub fn new(cloud: Cloud, host_override: Option<&str>) -> Result<Authority, String> {
        let host = match host_override.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => {
                let url =
                    Url::parse(h).map_err(|e| format!("authority host {h:?} is not a URL: {e}"))?;
                if url.scheme() != "https" {
                    return Err(format!("authority host {h:?} must use https://"));
                }
                h.trim_end_matches('/').to_string()
            }
            None => cloud.authority_host().to_string(),
        };
        Ok(Authority {
            cloud,
            host,
            graph: cloud.graph_endpoint().to_string(),
        })
    }

    /// The authority from `--cloud` and `AZURE_AUTHORITY_HOST`.
    pub fn from_env(cloud: Cloud) -> Result<Authority, String> {
        Authority::new(cloud, std::env::var("AZURE_AUTHORITY_HOST").ok().as_deref())
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
}

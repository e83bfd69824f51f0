//! Workload identity (AKS, or any Kubernetes with a federated credential): the kubelet projects
//! a service-account token into `AZURE_FEDERATED_TOKEN_FILE`, and Entra accepts it as the client
//! assertion of the app `AZURE_CLIENT_ID`. The file is re-read on every fetch because the kubelet
//! rotates it (its tokens live about an hour).

use std::path::PathBuf;

use super::client_credential::JWT_BEARER;
use super::http::HttpClient;
use super::source::{pop_form, ChainOptions, Environment, Source, SourceFuture, SourceKind};
use super::token_endpoint::request_token;
use super::{default_scope, SourceError};
use crate::auth::refresh::ExpiringToken;

pub struct WorkloadIdentity {
    http: HttpClient,
    token_url: String,
    client_id: String,
    scope: String,
    token_file: PathBuf,
    pop: Option<std::sync::Arc<super::pop::KeyRing>>,
}

impl WorkloadIdentity {
    pub fn from_env(env: &Environment, opts: &ChainOptions) -> Result<Self, SourceError> {
        let tenant = opts.tenant.clone().or_else(|| env.tenant_id.clone());
        let Some(token_file) = env.federated_token_file.clone() else {
            return Err(SourceError::NotConfigured(
                "AZURE_FEDERATED_TOKEN_FILE not set".into(),
            ));
        };
        let mut missing = Vec::new();
        if env.client_id.is_none() {
            missing.push("AZURE_CLIENT_ID");
        }
        if tenant.is_none() {
            missing.push("AZURE_TENANT_ID (or --tenant)");
        }
        if !missing.is_empty() {
            return Err(SourceError::NotConfigured(
                format!(
                    "AZURE_FEDERATED_TOKEN_FILE is set but {} is not",
                    missing.join(" and ")
                )
                .into(),
            ));
        }
        Ok(WorkloadIdentity {
            http: opts.http.clone(),
            token_url: opts.authority.token_endpoint(&tenant.unwrap_or_default()),
            client_id: env.client_id.clone().unwrap_or_default(),
            scope: default_scope(&opts.server_app_id),
            token_file: token_file.clone(),
            pop: opts.pop.clone(),
        })
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let assertion = std::fs::read_to_string(&self.token_file).map_err(|e| {
            SourceError::Failed(super::Reason::new(
                format!(
                    "cannot read AZURE_FEDERATED_TOKEN_FILE {}",
                    self.token_file.display()
                ),
                e,
            ))
        })?;
        let assertion = crate::secret::Secret::new(assertion.trim());
        if assertion.expose().is_empty() {
            return Err(SourceError::Failed(
                format!(
                    "AZURE_FEDERATED_TOKEN_FILE {} is empty",
                    self.token_file.display()
                )
                .into(),
            ));
        }
        let pop = pop_form(&self.pop);
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("scope", self.scope.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.expose()),
        ];
        form.extend(pop.iter().map(|(k, v)| (*k, v.as_str())));
        let resp = request_token(&self.http, &self.token_url, &form)
            .await
            .map_err(|e| e.into_source_error("workload identity"))?;
        Ok(resp.into_expiring().0)
    }
}

impl Source for WorkloadIdentity {
    fn kind(&self) -> SourceKind {
        SourceKind::WorkloadIdentity
    }

    fn attempt(&self) -> SourceFuture<'_> {
        Box::pin(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::test_server::{json, options, TestServer};

    #[tokio::test]
    async fn the_projected_token_is_the_assertion_and_is_reread_each_time() {
        let server = TestServer::start(|_, n| {
            json(
                200,
                serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 3600}),
            )
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "federated-1\n").unwrap();
        let mut env = Environment {
            federated_token_file: Some(file.clone()),
            client_id: Some("wi-client".into()),
            ..Environment::default()
        };
        let opts = options(&server.base);
        let err = WorkloadIdentity::from_env(&env, &opts).err().unwrap();
        assert!(err.reason().contains("AZURE_TENANT_ID"), "{err:?}");
        env.tenant_id = Some("t".into());
        let source = WorkloadIdentity::from_env(&env, &opts).unwrap();
        assert_eq!(source.get().await.unwrap().token.expose(), "at-0");
        std::fs::write(&file, "federated-2").unwrap();
        source.get().await.unwrap();
        let reqs = server.requests();
        assert_eq!(reqs[0].field("client_assertion").unwrap(), "federated-1");
        assert_eq!(reqs[1].field("client_assertion").unwrap(), "federated-2");
        assert_eq!(reqs[1].field("client_assertion_type").unwrap(), JWT_BEARER);
        assert_eq!(reqs[1].field("client_id").unwrap(), "wi-client");
    }
}

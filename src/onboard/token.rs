//! `token create`: a bearer token for a service account bound to a cluster role, the three
//! `kubectl` steps of the Arc documentation in one (service account, ClusterRoleBinding, a
//! token): a TokenRequest with an expiry, or, asked for explicitly, a
//! `kubernetes.io/service-account-token` Secret the token controller fills, whose token never
//! expires. Every step reuses what is already there.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret as KubeSecret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};

use super::apply::{self, ApplyError};
use super::manifests::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::secret::Secret;

pub const SERVICE_ACCOUNT_ANNOTATION: &str = "kubernetes.io/service-account.name";
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
/// The apiserver refuses TokenRequests shorter than this.
pub const MIN_DURATION: Duration = Duration::from_secs(600);
/// How often to look whether the token controller has filled the Secret.
const TOKEN_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("namespace {0} does not exist; create it (`kubectl create namespace {0}`) or pick another -n")]
    NoNamespace(String),
    #[error("ClusterRoleBinding {name} exists and binds ClusterRole {bound}, not {wanted} (a binding's role cannot change); delete it or pick another --cluster-role")]
    OtherRole {
        name: String,
        bound: String,
        wanted: String,
    },
    #[error("Secret {namespace}/{name} exists and is not a service-account token for {account}; delete it or use another --service-account")]
    OtherSecret {
        namespace: String,
        name: String,
        account: String,
    },
    #[error("the token controller did not fill Secret {namespace}/{name} within {}; check that kube-controller-manager runs (its serviceaccount-token controller fills such Secrets) with `kubectl -n {namespace} describe secret {name}`, or leave out --no-expiry for a TokenRequest instead", humantime::format_duration(*timeout))]
    NotFilled {
        namespace: String,
        name: String,
        timeout: Duration,
    },
    #[error("--duration {} is too short: the apiserver issues tokens for at least 10m", humantime::format_duration(*given))]
    TooShort { given: Duration },
    #[error("the TokenRequest for {namespace}/{account} returned no token")]
    Empty { namespace: String, account: String },
    #[error(transparent)]
    Kube(#[from] ApplyError),
    #[error("{step} {name}")]
    Write {
        step: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    pub cluster_role: String,
    /// `Some`: a TokenRequest for this long; `None`: a long-lived Secret token.
    pub duration: Option<Duration>,
    /// How long to wait for the token controller.
    pub timeout: Duration,
}

impl TokenSpec {
    pub fn binding_name(&self) -> String {
        format!("{}-{}-binding", self.service_account, self.cluster_role)
    }

    pub fn secret_name(&self) -> String {
        format!("{}-token", self.service_account)
    }
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_string(),
            MANAGED_BY.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

fn write_error<'a>(
    step: &'static str,
    name: &'a str,
) -> impl FnOnce(kube::Error) -> TokenError + 'a {
    move |source| TokenError::Write {
        step,
        name: name.to_string(),
        source,
    }
}

/// Makes sure the account, its binding and (without a duration) its token Secret exist, and
/// returns the token.
pub async fn create(kube: &Client, spec: &TokenSpec) -> Result<Secret, TokenError> {
    if spec.duration.is_some_and(|d| d < MIN_DURATION) {
        return Err(TokenError::TooShort {
            given: spec.duration.unwrap_or_default(),
        });
    }
    let ns = spec.namespace.as_str();
    if apply::get(&Api::<Namespace>::all(kube.clone()), ns)
        .await?
        .is_none()
    {
        return Err(TokenError::NoNamespace(ns.to_string()));
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), ns);
    let account = spec.service_account.as_str();
    if apply::get(&accounts, account).await?.is_none() {
        let sa = ServiceAccount {
            metadata: meta(account, Some(ns)),
            ..ServiceAccount::default()
        };
        accounts
            .create(&PostParams::default(), &sa)
            .await
            .map_err(write_error("creating ServiceAccount", account))?;
    }
    bind(kube, spec).await?;
    match spec.duration {
        Some(duration) => request_token(&accounts, ns, account, duration).await,
        None => secret_token(kube, spec).await,
    }
}

/// The ClusterRoleBinding `<sa>-<role>-binding`, with this account among its subjects.
async fn bind(kube: &Client, spec: &TokenSpec) -> Result<(), TokenError> {
    let bindings: Api<ClusterRoleBinding> = Api::all(kube.clone());
    let name = spec.binding_name();
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: spec.service_account.clone(),
        namespace: Some(spec.namespace.clone()),
        ..Subject::default()
    };
    match apply::get(&bindings, &name).await? {
        None => {
            let binding = ClusterRoleBinding {
                metadata: meta(&name, None),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: spec.cluster_role.clone(),
                },
                subjects: Some(vec![subject]),
            };
            bindings
                .create(&PostParams::default(), &binding)
                .await
                .map_err(write_error("creating ClusterRoleBinding", &name))?;
        }
        Some(existing) if existing.role_ref.name != spec.cluster_role => {
            return Err(TokenError::OtherRole {
                name,
                bound: existing.role_ref.name,
                wanted: spec.cluster_role.clone(),
            })
        }
        Some(mut existing) => {
            let subjects = existing.subjects.get_or_insert_with(Vec::new);
            let present = subjects.iter().any(|s| {
                s.kind == subject.kind && s.name == subject.name && s.namespace == subject.namespace
            });
            if !present {
                subjects.push(subject);
                bindings
                    .replace(&name, &PostParams::default(), &existing)
                    .await
                    .map_err(write_error("updating ClusterRoleBinding", &name))?;
            }
        }
    }
    Ok(())
}

async fn request_token(
    accounts: &Api<ServiceAccount>,
    namespace: &str,
    account: &str,
    duration: Duration,
) -> Result<Secret, TokenError> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let issued = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(write_error(
            "requesting a token for ServiceAccount",
            account,
        ))?;
    match issued.status.and_then(|s| s.token) {
        Some(token) if !token.is_empty() => Ok(Secret::new(token)),
        _ => Err(TokenError::Empty {
            namespace: namespace.to_string(),
            account: account.to_string(),
        }),
    }
}

/// The token from the Secret `<sa>-token`, creating it and waiting for the token controller.
async fn secret_token(kube: &Client, spec: &TokenSpec) -> Result<Secret, TokenError> {
    let ns = spec.namespace.as_str();
    let secrets: Api<KubeSecret> = Api::namespaced(kube.clone(), ns);
    let name = spec.secret_name();
    let account = spec.service_account.as_str();
    let is_ours = |s: &KubeSecret| {
        s.type_.as_deref() == Some(TOKEN_SECRET_TYPE)
            && s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
                .is_some_and(|a| a == account)
    };
    match apply::get(&secrets, &name).await? {
        Some(existing) if !is_ours(&existing) => {
            return Err(TokenError::OtherSecret {
                namespace: ns.to_string(),
                name,
                account: account.to_string(),
            })
        }
        Some(_) => {}
        None => {
            let mut metadata = meta(&name, Some(ns));
            metadata.annotations = Some(BTreeMap::from([(
                SERVICE_ACCOUNT_ANNOTATION.to_string(),
                account.to_string(),
            )]));
            let secret = KubeSecret {
                metadata,
                type_: Some(TOKEN_SECRET_TYPE.into()),
                ..KubeSecret::default()
            };
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .map_err(write_error("creating Secret", &name))?;
        }
    }
    let deadline = tokio::time::Instant::now() + spec.timeout;
    loop {
        let token = apply::get(&secrets, &name)
            .await?
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove("token"))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .filter(|t| !t.is_empty());
        if let Some(token) = token {
            return Ok(Secret::new(token));
        }
        if tokio::time::Instant::now() + TOKEN_POLL > deadline {
            return Err(TokenError::NotFilled {
                namespace: ns.to_string(),
                name,
                timeout: spec.timeout,
            });
        }
        tokio::time::sleep(TOKEN_POLL).await;
    }
}

//! A caller's own impersonation (`kubectl --as`, `--as-group`, `--as-uid`, `--as-user-extra`)
//! for Entra callers, whom the agent impersonates with its own service account.
//!
//! The apiserver cannot judge such a request itself: it sees the agent, which may impersonate
//! anyone. So the agent asks it, with one SubjectAccessReview per check, whether the
//! signed-in user may `impersonate` what the request names, building the checks exactly as
//! kube-apiserver's impersonation filter does (`staging/src/k8s.io/apiserver/pkg/endpoints/
//! filters/impersonation.go`): the user (`users`, or `serviceaccounts` in the account's
//! namespace for `system:serviceaccount:<ns>:<name>`), each group (`groups`), each extra value
//! (`userextras/<key>` in `authentication.k8s.io`) and the uid (`uids` in
//! `authentication.k8s.io`). Answers are cached for [`CACHE_TTL`] so kubectl's burst of
//! discovery requests costs one review per check.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::json;

use super::upstream::Upstream;

const IMPERSONATE_USER: &str = "impersonate-user";
const IMPERSONATE_GROUP: &str = "impersonate-group";
const IMPERSONATE_UID: &str = "impersonate-uid";
const IMPERSONATE_EXTRA: &str = "impersonate-extra-";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";
const REVIEWS_PATH: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

/// How long one review may take; kubectl waits on it.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer is reused. Short, so a removed RoleBinding takes effect within seconds
/// (the apiserver's own webhook authorizer caches allowed answers for 5 minutes).
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Answers kept at once; past this, expired ones are dropped, then all of them.
const CACHE_ENTRIES: usize = 4096;
/// A review's answer is a small object; anything larger is not one.
const MAX_REVIEW_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RequestedError {
    #[error("Impersonate-Group, Impersonate-Uid and Impersonate-Extra-* need Impersonate-User (kubectl's --as-group, --as-uid and --as-user-extra need --as)")]
    NoUser,
    #[error("the {0} header is not valid text")]
    NotText(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("cannot encode the SubjectAccessReview")]
    Encode(#[source] http::Error),
    #[error("cannot send a SubjectAccessReview to the apiserver")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("the apiserver did not answer a SubjectAccessReview within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("cannot read the apiserver's SubjectAccessReview answer")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the apiserver refused the agent's SubjectAccessReview with HTTP {code}: {message}. The agent's service account needs `create` on subjectaccessreviews.authorization.k8s.io (re-apply the agent's manifests)")]
    Refused { code: u16, message: String },
    #[error("the apiserver failed a SubjectAccessReview with HTTP {code}: {message}")]
    Failed { code: u16, message: String },
    #[error("the apiserver's SubjectAccessReview answer is not one")]
    Decode(#[source] serde_json::Error),
}

impl ReviewError {
    /// Whether the apiserver could not be asked (503) rather than refused to answer (500).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ReviewError::Send(_) | ReviewError::Timeout(_) | ReviewError::Failed { .. }
        )
    }
}

/// An `Impersonate-Extra-*` header: the name it came in, the key it stands for, one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extra {
    pub header: HeaderName,
    pub key: String,
    pub value: String,
}

/// What a request asks to be seen as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requested {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: Vec<Extra>,
}

impl Requested {
    /// The caller's `Impersonate-*` headers, or `None` when there are none. As the apiserver
    /// does: the first `Impersonate-User` and `Impersonate-Uid` count, an empty one is none,
    /// every `Impersonate-Group` and every extra value counts, extra keys are lowercase and
    /// percent-unescaped.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Requested>, RequestedError> {
        let text = |name: &HeaderName, value: &HeaderValue| {
            value
                .to_str()
                .map(str::to_string)
                .map_err(|_| RequestedError::NotText(name.to_string()))
        };
        let first = |name: &'static str| -> Result<Option<String>, RequestedError> {
            match headers.get(name) {
                Some(v) => Ok(Some(text(&HeaderName::from_static(name), v)?)
                    .filter(|v: &String| !v.is_empty())),
                None => Ok(None),
            }
        };
        let user = first(IMPERSONATE_USER)?;
        let uid = first(IMPERSONATE_UID)?;
        let groups = headers
            .get_all(IMPERSONATE_GROUP)
            .iter()
            .map(|v| text(&HeaderName::from_static(IMPERSONATE_GROUP), v))
            .collect::<Result<Vec<_>, _>>()?;
        let mut extra = Vec::new();
        for name in headers.keys() {
            let Some(encoded) = name.as_str().strip_prefix(IMPERSONATE_EXTRA) else {
                continue;
            };
            let key = percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_or_else(|_| encoded.to_string(), |k| k.into_owned());
            for value in headers.get_all(name) {
                extra.push(Extra {
                    header: name.clone(),
                    key: key.clone(),
                    value: text(name, value)?,
                });
            }
        }
        match user {
            Some(user) => Ok(Some(Requested {
                user,
                groups,
                uid,
                extra,
            })),
            None if groups.is_empty() && uid.is_none() && extra.is_empty() => Ok(None),
            None => Err(RequestedError::NoUser),
        }
    }

    /// The apiserver's checks for this request, in its order: user, groups, extras, uid.
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::with_capacity(2 + self.groups.len() + self.extra.len());
        let account = self
            .user
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
        checks.push(match account {
            Some((namespace, name)) => Check {
                group: "",
                resource: "serviceaccounts",
                subresource: String::new(),
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
            None => Check::cluster("", "users", &self.user),
        });
        checks.extend(self.groups.iter().map(|g| Check::cluster("", "groups", g)));
        checks.extend(self.extra.iter().map(|e| Check {
            subresource: e.key.clone(),
            ..Check::cluster(AUTHENTICATION_GROUP, "userextras", &e.value)
        }));
        if let Some(uid) = &self.uid {
            checks.push(Check::cluster(AUTHENTICATION_GROUP, "uids", uid));
        }
        checks
    }

    /// Sets exactly what was reviewed, replacing any `Impersonate-*` already there.
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<(), http::header::InvalidHeaderValue> {
        strip_impersonation(headers);
        headers.insert(IMPERSONATE_USER, HeaderValue::from_str(&self.user)?);
        for g in &self.groups {
            headers.append(IMPERSONATE_GROUP, HeaderValue::from_str(g)?);
        }
        if let Some(uid) = &self.uid {
            headers.insert(IMPERSONATE_UID, HeaderValue::from_str(uid)?);
        }
        for e in &self.extra {
            headers.append(e.header.clone(), HeaderValue::from_str(&e.value)?);
        }
        Ok(())
    }
}

/// Removes every `Impersonate-*` header.
pub fn strip_impersonation(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// One `impersonate` authorization check, as the apiserver's filter builds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Check {
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Check {
    fn cluster(group: &'static str, resource: &'static str, name: &str) -> Check {
        Check {
            group,
            resource,
            subresource: String::new(),
            namespace: String::new(),
            name: name.to_string(),
        }
    }

    /// The apiserver's refusal, word for word, with the authorizer's reason when it gave one:
    /// `users "bob" is forbidden: User "alice" cannot impersonate resource "users" in API
    /// group "" at the cluster scope`.
    pub fn forbidden_message(&self, user: &str, reason: &str) -> String {
        let qualified = if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let resource = if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        let mut message = format!(
            "{qualified} {:?} is forbidden: User {user:?} cannot impersonate resource {resource:?} in API group {:?} {scope}",
            self.name, self.group
        );
        if !reason.is_empty() {
            message.push_str(": ");
            message.push_str(reason);
        }
        message
    }
}

/// Who is asking: the signed-in user as the apiserver would see them when impersonated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject {
    pub user: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// With the authorizer's reason, often empty.
    Denied(String),
}

#[derive(serde::Deserialize)]
struct ReviewAnswer {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ReviewStatus {
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    evaluation_error: String,
}

/// Asks the apiserver, with the agent's own credential, and remembers answers briefly.
#[derive(Default)]
pub struct Reviewer {
    cache: Mutex<HashMap<(Subject, Check), (Instant, Decision)>>,
}

impl Reviewer {
    pub async fn review(
        &self,
        upstream: &Upstream,
        own_bearer: &HeaderValue,
        subject: &Subject,
        check: &Check,
    ) -> Result<Decision, ReviewError> {
        let key = (subject.clone(), check.clone());
        if let Some((at, decision)) = self.cache().get(&key) {
            if at.elapsed() < CACHE_TTL {
                return Ok(decision.clone());
            }
        }
        let decision = ask(upstream, own_bearer, subject, check).await?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), decision.clone()));
        Ok(decision)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<(Subject, Check), (Instant, Decision)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn ask(
    upstream: &Upstream,
    own_bearer: &HeaderValue,
    subject: &Subject,
    check: &Check,
) -> Result<Decision, ReviewError> {
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": subject.user,
            "groups": subject.groups,
            "extra": subject.extra,
            "resourceAttributes": {
                "verb": "impersonate",
                "group": check.group,
                "resource": check.resource,
                "subresource": check.subresource,
                "namespace": check.namespace,
                "name": check.name,
            },
        },
    });
    let uri = upstream
        .uri_for(REVIEWS_PATH)
        .map_err(|e| ReviewError::Encode(e.into()))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(AUTHORIZATION, own_bearer.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .map_err(ReviewError::Encode)?;
    let exchange = async {
        let response = upstream
            .reviews
            .request(request)
            .await
            .map_err(ReviewError::Send)?;
        let code = response.status();
        let body = Limited::new(response.into_body(), MAX_REVIEW_BODY)
            .collect()
            .await
            .map_err(ReviewError::Read)?
            .to_bytes();
        Ok::<_, ReviewError>((code, body))
    };
    let (code, body) = tokio::time::timeout(REVIEW_TIMEOUT, exchange)
        .await
        .map_err(|_| ReviewError::Timeout(REVIEW_TIMEOUT))??;
    if !code.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
        let code = code.as_u16();
        return Err(if code < 500 {
            ReviewError::Refused { code, message }
        } else {
            ReviewError::Failed { code, message }
        });
    }
    let answer: ReviewAnswer = serde_json::from_slice(&body).map_err(ReviewError::Decode)?;
    let status = answer.status;
    Ok(if status.allowed {
        Decision::Allowed
    } else if status.reason.is_empty() {
        Decision::Denied(status.evaluation_error)
    } else {
        Decision::Denied(status.reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn no_impersonation_headers_is_none() {
        let h = headers(&[("authorization", "Bearer x")]);
        assert_eq!(Requested::from_headers(&h).unwrap(), None);
    }

    #[test]
    fn groups_uid_or_extras_without_a_user_are_refused() {
        for pair in [
            ("impersonate-group", "g"),
            ("impersonate-uid", "1"),
            ("impersonate-extra-scopes", "s"),
        ] {
            let h = headers(&[pair, ("impersonate-user", "")]);
            assert!(matches!(
                Requested::from_headers(&h),
                Err(RequestedError::NoUser)
            ));
        }
    }

    #[test]
    fn checks_follow_the_apiservers_order_and_resources() {
        let h = headers(&[
            ("impersonate-user", "bob"),
            ("impersonate-group", "g1"),
            ("impersonate-group", "g2"),
            ("impersonate-uid", "42"),
            ("impersonate-extra-acme.com%2fproject", "p1"),
            ("impersonate-extra-acme.com%2fproject", "p2"),
        ]);
        let r = Requested::from_headers(&h).unwrap().unwrap();
        let got: Vec<_> = r
            .checks()
            .into_iter()
            .map(|c| {
                (
                    c.group,
                    c.resource,
                    c.subresource,
                    c.namespace,
                    c.name.clone(),
                )
            })
            .collect();
        let s = String::from;
        assert_eq!(
            got,
            vec![
                ("", "users", s(""), s(""), s("bob")),
                ("", "groups", s(""), s(""), s("g1")),
                ("", "groups", s(""), s(""), s("g2")),
                (
                    AUTHENTICATION_GROUP,
                    "userextras",
                    s("acme.com/project"),
                    s(""),
                    s("p1")
                ),
                (
                    AUTHENTICATION_GROUP,
                    "userextras",
                    s("acme.com/project"),
                    s(""),
                    s("p2")
                ),
                (AUTHENTICATION_GROUP, "uids", s(""), s(""), s("42")),
            ]
        );
    }

    #[test]
    fn a_service_account_user_is_checked_in_its_namespace() {
        let h = headers(&[("impersonate-user", "system:serviceaccount:ops:deployer")]);
        let checks = Requested::from_headers(&h).unwrap().unwrap().checks();
        assert_eq!(checks[0].resource, "serviceaccounts");
        assert_eq!(checks[0].namespace, "ops");
        assert_eq!(checks[0].name, "deployer");
        assert_eq!(
            checks[0].forbidden_message("ada", ""),
            "serviceaccounts \"deployer\" is forbidden: User \"ada\" cannot impersonate resource \"serviceaccounts\" in API group \"\" in the namespace \"ops\""
        );
    }

    #[test]
    fn refusals_read_like_the_apiservers() {
        let check = Check {
            subresource: "scopes".into(),
            ..Check::cluster(AUTHENTICATION_GROUP, "userextras", "view")
        };
        assert_eq!(
            check.forbidden_message("ada@contoso.com", "no binding"),
            "userextras.authentication.k8s.io \"view\" is forbidden: User \"ada@contoso.com\" cannot impersonate resource \"userextras/scopes\" in API group \"authentication.k8s.io\" at the cluster scope: no binding"
        );
    }

    #[test]
    fn apply_sets_exactly_what_was_requested() {
        let h = headers(&[
            ("impersonate-user", "bob"),
            ("impersonate-group", "g1"),
            ("impersonate-extra-scopes", "a"),
        ]);
        let r = Requested::from_headers(&h).unwrap().unwrap();
        let mut out = headers(&[
            ("impersonate-user", "ada"),
            ("impersonate-extra-oid", "o"),
            ("authorization", "Bearer own"),
        ]);
        r.apply(&mut out).unwrap();
        assert_eq!(out["impersonate-user"], "bob");
        assert_eq!(out["impersonate-group"], "g1");
        assert_eq!(out["impersonate-extra-scopes"], "a");
        assert!(out.get("impersonate-extra-oid").is_none());
        assert_eq!(out["authorization"], "Bearer own");
    }
}

//! Entra ID end to end: kubectl through proxy -> relay -> agent -> stand-in apiserver, where
//! the agent validates Entra tokens issued by a stand-in Entra and impersonates the identity
//! with its own service-account token.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use clusterconnect::agent::{AuditLog, AuditTarget, AuthMode, Authenticator, EntraAuth, KeySource};
use clusterconnect::auth::CredentialSource;
use clusterconnect::entra::graph::GroupResolver;
use clusterconnect::entra::http::HttpClient;
use clusterconnect::entra::validate::{Validator, ValidatorConfig};
use clusterconnect::entra::{Authority, Cloud, ARC_SERVER_APP_ID};

use clusterconnect::entra::chain::{self, ChainOptions, Environment, SourceKind};
use clusterconnect::entra::device_code::Prompt;
use clusterconnect::entra::ARC_CLIENT_APP_ID;
use support::check::{describe, eventually, text, PROMPT};
use support::entra::{Entra, GRAPH, OTHER_TENANT, TENANT};
use support::imds::{Himds, Imds};
use support::spawn_kubectl;
use support::tunnel::{
    listen_key, send_key, static_token, wait_for_listener, Agent, LocalProxy, ProxiedCluster,
    Relay, CONNECTION,
};
use support::{kubectl, kubectl_available, kubectl_ok, ApiServer};

const HOUR: Duration = Duration::from_secs(3600);
const PODS: &str = "/api/v1/namespaces/default/pods";

fn http_for(entra: &Entra) -> HttpClient {
    HttpClient::new(
        entra.client_tls(),
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
}

fn authority(entra: &Entra) -> Authority {
    let mut authority =
        Authority::new(Cloud::AzurePublicCloud, Some(&entra.authority_host())).expect("authority");
    authority.graph = entra.authority_host();
    authority
}

/// The agent's Entra configuration against the stand-in: tenant TENANT, the Arc server app.
pub(crate) fn entra_auth(
    entra: &Entra,
    api: &ApiServer,
    groups: Option<GroupResolver>,
) -> EntraAuth {
    let validator = Validator::new(
        ValidatorConfig {
            authority: authority(entra),
            server_app_id: ARC_SERVER_APP_ID.into(),
            tenants: vec![TENANT.into()],
            refetch_interval: Duration::ZERO,
        },
        http_for(entra),
    );
    EntraAuth {
        validator,
        groups,
        own_token: static_token(&api.agent_token()),
    }
}

/// Stand-in Entra and apiserver, a relay, and an agent with `mode`.
/// A proxy to `CONNECTION` through `relay` with one context per `(name, credential)`.
pub(crate) async fn proxy_through(
    relay: &Relay,
    dir: &std::path::Path,
    credentials: Vec<(&str, Arc<dyn CredentialSource>)>,
) -> LocalProxy {
    let clusters = credentials
        .into_iter()
        .map(|(name, credential)| ProxiedCluster {
            name,
            relay,
            connection: CONNECTION,
            key: send_key(),
            credential,
        })
        .collect();
    LocalProxy::start_many(clusters, dir).await
}

struct Cluster {
    entra: Entra,
    api: ApiServer,
    relay: Relay,
    _agent: Agent,
}

impl Cluster {
    async fn start(mode: AuthMode) -> Cluster {
        Cluster::start_with(mode, |_, _| None, None).await
    }

    /// With `audit`, the agent writes its audit log there (and makes TokenReviews with its
    /// own token).
    async fn start_with(
        mode: AuthMode,
        groups: impl FnOnce(&Entra, &ApiServer) -> Option<GroupResolver>,
        audit: Option<&std::path::Path>,
    ) -> Cluster {
        let entra = Entra::start().await;
        let api = ApiServer::start().await;
        let relay = Relay::start().await;
        let resolver = groups(&entra, &api);
        let auth = Authenticator::new(mode, entra_auth(&entra, &api, resolver));
        let audit = audit.map(|path| {
            let target = AuditTarget::File(path.to_path_buf());
            let own = static_token(&api.agent_token());
            Arc::new(AuditLog::open(&target, CONNECTION, Some(own)).expect("audit log"))
        });
        let key = Arc::new(KeySource::fixed(listen_key()));
        let agent = Agent::start_audited(&relay, &api, key, CONNECTION, auth, audit).await;
        wait_for_listener(&relay).await;
        Cluster {
            entra,
            api,
            relay,
            _agent: agent,
        }
    }

    /// A proxy with one context per `(name, credential)`.
    async fn proxy(
        &self,
        dir: &std::path::Path,
        credentials: Vec<(&str, Arc<dyn CredentialSource>)>,
    ) -> LocalProxy {
        proxy_through(&self.relay, dir, credentials).await
    }

    fn user_token(&self, upn: &str, oid: &str, groups: &[&str]) -> String {
        self.entra.sign(
            &self
                .entra
                .user_claims(upn, oid, groups, ARC_SERVER_APP_ID, HOUR),
        )
    }
}

/// `kubectl auth whoami -o json` through `context`: (username, groups, extra).
pub(crate) async fn whoami(
    kubeconfig: &std::path::Path,
    context: &str,
) -> (String, Vec<String>, serde_json::Value) {
    let stdout = kubectl_ok(
        kubeconfig,
        &["--context", context, "auth", "whoami", "-o", "json"],
    )
    .await;
    let review: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let info = &review["status"]["userInfo"];
    let groups = info["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g.as_str().map(String::from))
        .collect();
    (
        info["username"].as_str().unwrap_or_default().to_string(),
        groups,
        info["extra"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_users_and_groups_reach_the_apiserver_impersonated_with_the_agents_token() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let ada = "0b7c9a6e-0d55-4f0e-9a3b-6b1f2c3d4e5f";
    let token = c.user_token("ada@contoso.com", ada, &["group-sre", "group-dev"]);
    let proxy = c
        .proxy(dir.path(), vec![("ada", static_token(&token))])
        .await;

    let (user, groups, extra) = whoami(&proxy.kubeconfig, "ada").await;
    assert_eq!(user, "ada@contoso.com");
    assert!(
        groups.contains(&"group-sre".to_string()) && groups.contains(&"group-dev".to_string()),
        "{groups:?}"
    );
    assert_eq!(extra["oid"], serde_json::json!([ada]));
    assert_eq!(extra["tid"], serde_json::json!([TENANT]));

    // The apiserver authorizes the impersonated identity by RBAC: nothing is bound to ada or
    // her groups yet, then a binding to one of her Entra groups lets her list pods.
    let out = kubectl(&proxy.kubeconfig, &["get", "--raw", PODS], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("User \"ada@contoso.com\" cannot list resource \"pods\""),
        "{}",
        describe(&out)
    );
    c.api.grant_cluster_admin("Group", "group-sre");
    kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    let seen = c
        .api
        .requests()
        .into_iter()
        .rfind(|r| {
            r.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")
        })
        .expect("the list reached the apiserver");
    // The apiserver sees the agent's credential, never the Entra token.
    let presented = seen.headers["authorization"].to_str().unwrap().to_string();
    assert_eq!(presented, format!("Bearer {}", c.api.agent_token()));
    assert_eq!(seen.headers["impersonate-user"], "ada@contoso.com");
    assert_eq!(seen.user.as_deref(), Some("ada@contoso.com"));
    let sent_groups: Vec<_> = seen
        .headers
        .get_all("impersonate-group")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(sent_groups, ["group-sre", "group-dev"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_fetched_once_and_accepted() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let oid = "1f2e3d4c-0000-4000-8000-00000000abcd";
    let before = c.user_token("rot@contoso.com", oid, &[]);
    let first = c
        .proxy(dir.path(), vec![("before", static_token(&before))])
        .await;
    assert_eq!(
        whoami(&first.kubeconfig, "before").await.0,
        "rot@contoso.com"
    );
    assert_eq!(c.entra.jwks_fetches(), 1);

    c.entra.rotate_signing_key();
    let after = c.user_token("rot@contoso.com", oid, &[]);
    let dir2 = tempfile::tempdir().unwrap();
    let second = c
        .proxy(dir2.path(), vec![("after", static_token(&after))])
        .await;
    // The new key id is not in the cached set: one refetch, then accepted.
    assert_eq!(
        whoami(&second.kubeconfig, "after").await.0,
        "rot@contoso.com"
    );
    assert_eq!(c.entra.jwks_fetches(), 2);
    // Both keys now come from the cache.
    whoami(&first.kubeconfig, "before").await;
    whoami(&second.kubeconfig, "after").await;
    assert_eq!(c.entra.jwks_fetches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_a_401_naming_the_failed_check_and_never_reach_the_apiserver() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let oid = "5d7e1c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6";
    let good = c
        .entra
        .user_claims("eve@contoso.com", oid, &[], ARC_SERVER_APP_ID, HOUR);
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = good.clone();
        change(&mut claims);
        claims
    };
    let wrong_audience = with(&|c| c["aud"] = "api://some-other-app".into());
    let other_tenant = with(&|c| {
        c["tid"] = OTHER_TENANT.into();
        c["iss"] = format!("https://sts.windows.net/{OTHER_TENANT}/").into();
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Beyond the five minutes of tolerated clock skew.
    let expired = with(&|c| {
        c["iat"] = (now - 7200).into();
        c["nbf"] = (now - 7200).into();
        c["exp"] = (now - 3600).into();
    });
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "forged",
            c.entra.sign_with_unpublished_key(&good),
            "signature does not verify",
        ),
        (
            "audience",
            c.entra.sign(&wrong_audience),
            "audience \"api://some-other-app\" is not this cluster's server application",
        ),
        (
            "tenant",
            c.entra.sign(&other_tenant),
            "is not allowed by this agent",
        ),
        ("expired", c.entra.sign(&expired), "the token expired at"),
        (
            "none",
            c.entra.unsigned(&good),
            "signing algorithm \"none\"",
        ),
    ];
    let credentials = cases
        .iter()
        .map(|(name, token, _)| (*name, static_token(token)))
        .collect();
    let proxy = c.proxy(dir.path(), credentials).await;
    for (name, _, message) in &cases {
        // `auth whoami` shows the server's message; `get pods` would only report its failed
        // discovery, and `get --raw` drops the /clusters/<name> path of multi-cluster contexts.
        let out = kubectl(
            &proxy.kubeconfig,
            &["--context", name, "auth", "whoami"],
            &[],
        )
        .await;
        assert!(!out.status.success(), "{name}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("Entra token rejected") && stderr.contains(message),
            "{name}: {}",
            describe(&out)
        );
    }
    assert!(
        c.api.requests().is_empty(),
        "rejected tokens reached the apiserver: {:?}",
        c.api
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_pass_through_unless_the_agent_accepts_only_entra() {
    if !kubectl_available() {
        return;
    }
    for mode in [AuthMode::Both, AuthMode::Entra] {
        let c = Cluster::start(mode).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = c
            .proxy(dir.path(), vec![("sa", static_token(&c.api.token()))])
            .await;
        // `get --raw`: kubectl shows the server's message for a refused raw request, where
        // `get pods` only reports its failed discovery.
        let out = kubectl(&proxy.kubeconfig, &["get", "--raw", PODS], &[]).await;
        match mode {
            AuthMode::Both => {
                assert!(out.status.success(), "{}", describe(&out));
                let seen = c.api.requests().pop().expect("request");
                assert_eq!(
                    seen.headers["authorization"].to_str().unwrap(),
                    format!("Bearer {}", c.api.token())
                );
                assert!(seen.headers.get("impersonate-user").is_none());
            }
            _ => {
                assert!(!out.status.success(), "{}", describe(&out));
                assert!(
                    text(&out.stderr).contains("accepts only Microsoft Entra ID tokens"),
                    "{}",
                    describe(&out)
                );
                assert!(c.api.requests().is_empty());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_name_entra_users_and_record_the_agents_own_refusals() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit_log = dir.path().join("audit.log");
    let c = Cluster::start_with(AuthMode::Entra, |_, _| None, Some(&audit_log)).await;
    let ada = "0b7c9a6e-0d55-4f0e-9a3b-6b1f2c3d4e5f";
    let token = c.user_token("ada@contoso.com", ada, &["group-sre"]);
    let proxy = c
        .proxy(
            dir.path(),
            vec![
                ("ada", static_token(&token)),
                ("sa", static_token(&c.api.token())),
            ],
        )
        .await;
    c.api.grant_cluster_admin("Group", "group-sre");
    kubectl_ok(&proxy.kubeconfig, &["--context", "ada", "get", "pods"]).await;
    // A service-account token, which this agent (Entra only) refuses itself.
    let out = kubectl(
        &proxy.kubeconfig,
        &["--context", "sa", "get", "--raw", PODS],
        &[],
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));

    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let listed = |l: &serde_json::Value| l["verb"] == "list" && l["path"] == PODS;
    eventually("both requests are audited", || {
        let lines = read();
        lines.iter().any(|l| listed(l) && l["status"] == 200)
            && lines.iter().any(|l| listed(l) && l["status"] == 401)
    })
    .await;
    let lines = read();
    let ok = lines
        .iter()
        .find(|l| listed(l) && l["status"] == 200)
        .expect("just seen");
    assert_eq!(ok["user"], "ada@contoso.com", "{ok}");
    assert_eq!(ok["credential"], "entra", "{ok}");
    assert_eq!(ok["groups"], serde_json::json!(["group-sre"]), "{ok}");
    let refused = lines
        .iter()
        .find(|l| listed(l) && l["status"] == 401)
        .expect("just seen");
    assert_eq!(refused["user"], serde_json::Value::Null, "{refused}");
    assert_eq!(refused["credential"], "bearer", "{refused}");
    // The refused request never reached the apiserver, yet has its line and its id.
    let id = refused["request_id"].as_str().expect("request_id");
    assert!(!id.is_empty());
    let text = std::fs::read_to_string(&audit_log).unwrap();
    for secret in [token, c.api.token(), c.api.agent_token()] {
        assert!(!text.contains(&secret), "a token is in the audit log");
    }
    // Entra callers are named by their validated token; refused tokens are not reviewed.
    assert_eq!(c.api.token_reviews(&c.api.token()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_in_250_groups_is_authorized_through_graph() {
    if !kubectl_available() {
        return;
    }
    let agent_app = "agent-app-id";
    let agent_oid = "9a8b7c6d-1111-2222-3333-444455556666";
    let c = Cluster::start_with(
        AuthMode::Both,
        |entra, _| {
            // The agent's own identity, for Graph: a token with Graph's audience.
            let graph_token = entra.sign(&entra.app_claims(agent_oid, agent_app, GRAPH, HOUR));
            Some(GroupResolver::new(
                http_for(entra),
                entra.authority_host(),
                static_token(&graph_token),
            ))
        },
        None,
    )
    .await;
    let oid = "77777777-aaaa-bbbb-cccc-000000000250";
    let groups: Vec<String> = (0..250).map(|i| format!("group-{i:03}")).collect();
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    c.entra.add_user("many@contoso.com", oid, &groups);
    let claims = c.entra.user_claims(
        "many@contoso.com",
        oid,
        &group_refs,
        ARC_SERVER_APP_ID,
        HOUR,
    );
    assert!(
        claims.get("groups").is_none() && claims.get("_claim_names").is_some(),
        "the stand-in should issue an overage token: {claims}"
    );
    let token = c.entra.sign(&claims);
    let dir = tempfile::tempdir().unwrap();
    let proxy = c
        .proxy(dir.path(), vec![("many", static_token(&token))])
        .await;

    let (user, seen_groups, _) = whoami(&proxy.kubeconfig, "many").await;
    assert_eq!(user, "many@contoso.com");
    for g in &groups {
        assert!(seen_groups.contains(g), "{g} missing");
    }
    // Authorized through a group that only the Graph lookup revealed.
    c.api.grant_cluster_admin("Group", "group-249");
    kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    // Looked up once, then cached.
    assert_eq!(c.entra.graph_calls(), 1);

    // Graph unreachable (and nothing cached): a clear error with the workaround.
    c.entra.set_graph_available(false);
    let other = "88888888-aaaa-bbbb-cccc-000000000250";
    c.entra.add_user("also-many@contoso.com", other, &groups);
    let token = c.user_token("also-many@contoso.com", other, &group_refs);
    let dir = tempfile::tempdir().unwrap();
    let proxy = c
        .proxy(dir.path(), vec![("also", static_token(&token))])
        .await;
    let out = kubectl(&proxy.kubeconfig, &["get", "--raw", PODS], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("more than 200 groups") && stderr.contains("service principal"),
        "{}",
        describe(&out)
    );
}

/// Records what the device-code flow would show the user.
#[derive(Default)]
struct Captured(std::sync::Mutex<Vec<String>>);

impl Prompt for Captured {
    fn show(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

/// Chain options against the stand-in Entra for the Arc server app.
pub(crate) fn chain_options(
    entra: &Entra,
    only: Option<SourceKind>,
    config_dir: &std::path::Path,
) -> ChainOptions {
    ChainOptions {
        authority: authority(entra),
        tenant: Some(TENANT.into()),
        server_app_id: ARC_SERVER_APP_ID.into(),
        client_app_id: ARC_CLIENT_APP_ID.into(),
        only,
        interactive: false,
        http: http_for(entra),
        config_dir: config_dir.to_path_buf(),
        prompt: Arc::new(Captured::default()),
        pop: None,
    }
}

/// An environment with nothing configured; each test sets what its source needs.
pub(crate) fn empty_env(dir: &std::path::Path) -> Environment {
    Environment {
        himds_challenge_dir: dir.join("no-himds"),
        path: Some(dir.join("no-bin").into_os_string()),
        imds_base: Some("http://127.0.0.1:9".into()),
        ..Environment::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_and_managed_identities_sign_in_through_the_chain() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let challenges = dir.path().join("himds-tokens");
    std::fs::create_dir(&challenges).unwrap();

    // A service principal with a secret.
    let secret_app = (
        "11111111-0000-0000-0000-00000000a001",
        "a0000000-0000-0000-0000-00000000a001",
    );
    c.entra
        .add_app_secret(secret_app.0, "s3cret-value", secret_app.1);
    let mut env_secret = empty_env(dir.path());
    env_secret.tenant_id = Some(TENANT.into());
    env_secret.client_id = Some(secret_app.0.into());
    env_secret.client_secret = Some(clusterconnect::secret::Secret::new("s3cret-value"));

    // A service principal with a certificate.
    let cert_app = (
        "22222222-0000-0000-0000-00000000b002",
        "b0000000-0000-0000-0000-00000000b002",
    );
    let pem = c.entra.add_app_certificate(cert_app.0, cert_app.1);
    let cert_path = dir.path().join("sp.pem");
    std::fs::write(&cert_path, pem).unwrap();
    let mut env_cert = empty_env(dir.path());
    env_cert.tenant_id = Some(TENANT.into());
    env_cert.client_id = Some(cert_app.0.into());
    env_cert.client_certificate_path = Some(cert_path);

    // A managed identity through IMDS, and one through an Arc-enabled server's HIMDS.
    let imds_oid = "c0000000-0000-0000-0000-00000000c003";
    let imds = Imds::start(&c.entra, imds_oid, "33333333-0000-0000-0000-00000000c003").await;
    let mut env_imds = empty_env(dir.path());
    env_imds.imds_base = Some(imds.endpoint());
    let himds_oid = "d0000000-0000-0000-0000-00000000d004";
    let himds = Himds::start(&c.entra, himds_oid, &challenges).await;
    let mut env_himds = empty_env(dir.path());
    env_himds.identity_endpoint = Some(himds.identity_endpoint());
    env_himds.imds_endpoint = Some(himds.imds_endpoint());
    env_himds.himds_challenge_dir = challenges.clone();

    let cases = [
        ("sp-secret", env_secret, secret_app.1, "client_credentials"),
        ("sp-cert", env_cert, cert_app.1, "client_credentials"),
        ("imds", env_imds, imds_oid, ""),
        ("himds", env_himds, himds_oid, ""),
    ];
    let mut credentials = Vec::new();
    for (name, env, _, _) in &cases {
        let opts = chain_options(&c.entra, None, dir.path());
        let credential = chain::credential(&opts, env)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        credentials.push((*name, credential));
    }
    let proxy = c.proxy(dir.path(), credentials).await;
    for (name, _, oid, _) in &cases {
        let (user, _, extra) = whoami(&proxy.kubeconfig, name).await;
        assert_eq!(user, *oid, "{name}: applications are named by object id");
        assert_eq!(extra["oid"], serde_json::json!([oid]), "{name}");
        let seen = c.api.requests().pop().expect("request");
        assert_eq!(
            seen.headers["authorization"].to_str().unwrap(),
            format!("Bearer {}", c.api.agent_token()),
            "{name}"
        );
    }
    assert_eq!(imds.requests(), 1);
    assert_eq!(himds.challenges_issued(), 1);
    assert_eq!(himds.challenges_redeemed(), 1);
    assert_eq!(
        std::fs::read_dir(&challenges).unwrap().count(),
        0,
        "challenge file left behind"
    );
    let grants: Vec<_> = c
        .entra
        .token_requests()
        .into_iter()
        .map(|r| (r.client_id, r.grant_type))
        .collect();
    assert!(
        grants.contains(&(secret_app.0.to_string(), "client_credentials".to_string())),
        "{grants:?}"
    );
    assert!(
        grants.contains(&(cert_app.0.to_string(), "client_credentials".to_string())),
        "{grants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_its_first_token_and_new_requests_use_the_renewed_one() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let app = (
        "44444444-0000-0000-0000-00000000e005",
        "e0000000-0000-0000-0000-00000000e005",
    );
    c.entra.add_app_secret(app.0, "another-secret", app.1);
    // Short-lived tokens: renewal starts half way, at three seconds.
    c.entra.set_token_lifetime(Duration::from_secs(6));
    let mut env = empty_env(dir.path());
    env.tenant_id = Some(TENANT.into());
    env.client_id = Some(app.0.into());
    env.client_secret = Some(clusterconnect::secret::Secret::new("another-secret"));
    let credential = chain::credential(&chain_options(&c.entra, None, dir.path()), &env)
        .await
        .expect("credential");
    let proxy = c.proxy(dir.path(), vec![("app", credential)]).await;
    // Applications are impersonated by object id, which RBAC must allow to list pods.
    c.api.grant_cluster_admin("User", app.1);

    let mut watch = spawn_kubectl(&proxy.kubeconfig, &["get", "pods", "-w"], &[], false);
    eventually("the watch reaches the apiserver", || {
        c.api.open_watches() > 0
    })
    .await;
    // Past the first token's expiry.
    tokio::time::sleep(Duration::from_secs(7)).await;
    c.api.add_pod("default", "after-expiry");
    let seen = watch
        .read_stdout_until(PROMPT, |o| o.contains("after-expiry"))
        .await;
    assert!(seen.is_ok(), "{}", describe(&watch.kill().await));
    kubectl_ok(&proxy.kubeconfig, &["get", "pods"]).await;
    let fetched = c
        .entra
        .token_requests()
        .iter()
        .filter(|r| r.client_id == app.0)
        .count();
    assert!(
        fetched >= 2,
        "the token was never renewed ({fetched} fetches)"
    );
    watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_sign_in_completes_and_the_next_start_reuses_the_cached_refresh_token() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let upn = "dev@contoso.com";
    let oid = "f0000000-0000-0000-0000-00000000f006";
    c.entra.add_user(upn, oid, &["group-dev".to_string()]);
    c.entra.slow_down_once();
    let env = empty_env(dir.path());

    let prompt = Arc::new(Captured::default());
    let mut opts = chain_options(&c.entra, Some(SourceKind::DeviceCode), dir.path());
    opts.prompt = prompt.clone();
    let signing_in = tokio::spawn(async move { chain::credential(&opts, &env).await });
    eventually("the sign-in instructions are shown", || {
        !prompt.0.lock().unwrap().is_empty()
    })
    .await;
    let message = prompt.0.lock().unwrap()[0].clone();
    let code = c
        .entra
        .device_codes()
        .pop()
        .expect("a device code was issued");
    assert!(
        message.contains(&code) && message.contains("/devicelogin"),
        "{message}"
    );
    c.entra.approve_device_code(&code, upn);
    let first = signing_in.await.unwrap().expect("device code sign-in");

    // The refresh token is cached privately.
    let cached: Vec<_> = walk(&dir.path().join("entra"));
    assert_eq!(cached.len(), 1, "{cached:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cached[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The next start: no prompt, the cached refresh token is redeemed.
    let again = Arc::new(Captured::default());
    let mut opts = chain_options(&c.entra, None, dir.path());
    opts.prompt = again.clone();
    let second = chain::credential(&opts, &empty_env(dir.path()))
        .await
        .expect("the cached sign-in is reused");
    assert!(again.0.lock().unwrap().is_empty(), "prompted again");
    assert!(c
        .entra
        .token_requests()
        .iter()
        .any(|r| r.grant_type == "refresh_token"));

    let proxy = c
        .proxy(dir.path(), vec![("first", first), ("second", second)])
        .await;
    for context in ["first", "second"] {
        let (user, groups, _) = whoami(&proxy.kubeconfig, context).await;
        assert_eq!(user, upn);
        assert!(groups.contains(&"group-dev".to_string()), "{groups:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The real binaries: `agent --tenant` validating against the stand-in Entra, and `proxy` with
/// no token flag signing in as a service principal from its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_sign_in_with_entra_from_the_environment() {
    use std::ffi::OsStr;
    use support::processes::{agent_args, proxy_port, spawn, start_relay};
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let entra = Entra::start().await;
    let api = ApiServer::start().await;
    let relay = start_relay(dir.path()).await;
    let ca = entra.write_ca(dir.path());
    let host = entra.authority_host();
    let trust = [
        ("SSL_CERT_FILE", ca.as_os_str()),
        ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
    ];

    let agent_kubeconfig = api.write_kubeconfig(dir.path(), &api.agent_token());
    let mut args = agent_args(&relay, &agent_kubeconfig, CONNECTION, &relay.listen_key);
    args.extend(["--tenant".into(), TENANT.into()]);
    let agent = spawn(&args, &trust);
    agent
        .wait_for_log(Duration::from_secs(20), "listening")
        .await
        .expect("agent listening");

    let app = (
        "55555555-0000-0000-0000-0000000000b1",
        "b1000000-0000-0000-0000-0000000000b1",
    );
    entra.add_app_secret(app.0, "binary-secret", app.1);
    let kubeconfig = dir.path().join("kubeconfig");
    let config_dir = dir.path().join("proxy-config");
    let mut envs = trust.to_vec();
    envs.extend([
        ("AZURE_TENANT_ID", OsStr::new(TENANT)),
        ("AZURE_CLIENT_ID", OsStr::new(app.0)),
        ("AZURE_CLIENT_SECRET", OsStr::new("binary-secret")),
        ("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str()),
    ]);
    let relay_ca = relay.ca_path.clone();
    let send_key = relay.send_key.clone();
    let proxy = spawn(
        &[
            OsStr::new("proxy"),
            OsStr::new("--relay"),
            OsStr::new(&relay.url),
            OsStr::new("--connection"),
            OsStr::new(CONNECTION),
            OsStr::new("--key-file"),
            send_key.as_os_str(),
            OsStr::new("--relay-ca"),
            relay_ca.as_os_str(),
            OsStr::new("--port"),
            OsStr::new("0"),
            OsStr::new("--file"),
            kubeconfig.as_os_str(),
        ],
        &envs,
    );
    proxy
        .wait_for(Duration::from_secs(20), |text| proxy_port(text).is_some())
        .await
        .unwrap_or_else(|out| panic!("proxy did not start:\n{out}\nagent:\n{}", agent.output()));

    let (user, _, _) = whoami(&kubeconfig, CONNECTION).await;
    assert_eq!(user, app.1);
    api.grant_cluster_admin("User", app.1);
    kubectl_ok(&kubeconfig, &["get", "pods"]).await;
    let logs = format!("{}{}", proxy.output(), agent.output());
    assert!(
        !logs.contains("binary-secret"),
        "a secret reached a log line"
    );
}

/// Through `context` with kubectl's impersonation flags: the raw pods list's output.
async fn get_pods_as(
    kubeconfig: &std::path::Path,
    context: &str,
    flags: &[&str],
) -> std::process::Output {
    let mut args = vec!["--context", context, "get", "--raw", PODS];
    args.extend_from_slice(flags);
    kubectl(kubeconfig, &args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_users_own_impersonation_is_honoured_only_as_far_as_reviews_allow() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let ada = "5a1d0c3e-0000-4000-8000-00000000ada0";
    let token = c.user_token("ada@contoso.com", ada, &["group-sre"]);
    let proxy = c
        .proxy(dir.path(), vec![("ada", static_token(&token))])
        .await;

    // Nothing lets ada impersonate yet: the agent refuses without asking for the request.
    let out = get_pods_as(&proxy.kubeconfig, "ada", &["--as", "root"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("users \"root\" is forbidden: User \"ada@contoso.com\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"),
        "{}",
        describe(&out)
    );
    let requests = c.api.requests();
    assert!(
        !requests.iter().any(|r| r.path_and_query.starts_with(PODS)),
        "a refused impersonation reached the apiserver"
    );
    // The apiserver was asked, by the agent, about ada.
    let reviews: Vec<_> = requests
        .iter()
        .filter(|r| r.path_and_query.contains("subjectaccessreviews"))
        .collect();
    assert!(!reviews.is_empty());
    for r in &reviews {
        assert_eq!(
            r.user.as_deref(),
            Some(support::apiserver::AGENT_SERVICE_ACCOUNT)
        );
    }

    // Her group may impersonate bob and the group g1: granted, and bob is seen without ada's
    // groups or ids.
    c.api.grant_rules(
        "impersonate-bob",
        serde_json::json!([
            {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"], "resourceNames": ["bob"]},
            {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"], "resourceNames": ["g1"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["userextras/scopes"], "verbs": ["impersonate"], "resourceNames": ["view"]},
        ]),
        "Group",
        "group-sre",
    );
    let stdout = kubectl_ok(
        &proxy.kubeconfig,
        &[
            "--context",
            "ada",
            "auth",
            "whoami",
            "--as",
            "bob",
            "--as-group",
            "g1",
            "-o",
            "json",
        ],
    )
    .await;
    let review: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let info = &review["status"]["userInfo"];
    assert_eq!(info["username"], "bob", "{stdout}");
    let groups: Vec<_> = info["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g.as_str())
        .collect();
    assert_eq!(groups, ["g1", "system:authenticated"], "{stdout}");
    assert!(
        info.get("extra")
            .and_then(|e| e.as_object())
            .is_none_or(|e| e.is_empty()),
        "{stdout}"
    );
    let seen = c
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.path_and_query.contains("selfsubjectreviews"))
        .expect("the review reached the apiserver");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {}", c.api.agent_token()).as_str()
    );
    assert_eq!(seen.headers["impersonate-user"], "bob");

    // Each thing asked for is checked: a group outside the grant is refused.
    let out = get_pods_as(
        &proxy.kubeconfig,
        "ada",
        &["--as", "bob", "--as-group", "system:masters"],
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("groups \"system:masters\" is forbidden: User \"ada@contoso.com\" cannot impersonate resource \"groups\""),
        "{}",
        describe(&out)
    );
    assert!(
        !c.api
            .requests()
            .iter()
            .any(|r| r.path_and_query.starts_with(PODS)),
        "a refused impersonation reached the apiserver"
    );
    // Without --as, ada is herself, as before.
    assert_eq!(whoami(&proxy.kubeconfig, "ada").await.0, "ada@contoso.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_impersonation_that_cannot_be_reviewed_is_refused_not_ignored() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(AuthMode::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let oid = "5a1d0c3e-0000-4000-8000-0000000000c4";
    let token = c.user_token("cy@contoso.com", oid, &["group-sre"]);
    c.api.grant_cluster_admin("Group", "group-sre");
    let proxy = c
        .proxy(dir.path(), vec![("cy", static_token(&token))])
        .await;
    c.api.set_reviews_failing(true);
    let out = get_pods_as(&proxy.kubeconfig, "cy", &["--as", "bob"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the clusterconnect agent cannot check whether \"cy@contoso.com\" may impersonate \"bob\"")
            && stderr.contains("the authorizer is unavailable"),
        "{}",
        describe(&out)
    );
    assert!(
        !c.api
            .requests()
            .iter()
            .any(|r| r.path_and_query.starts_with(PODS)),
        "an unreviewed impersonation reached the apiserver"
    );
    // Once reviews work again, cy (cluster-admin through her group) may impersonate bob.
    c.api.set_reviews_failing(false);
    let out = get_pods_as(&proxy.kubeconfig, "cy", &["--as", "bob"]).await;
    // bob himself may not list pods: the apiserver's refusal, about bob, proves the
    // impersonation went through.
    assert!(
        text(&out.stderr).contains("User \"bob\" cannot list resource \"pods\""),
        "{}",
        describe(&out)
    );

    // Extras (kubectl's --as-user-extra, newer than the kubectl here) are reviewed and
    // forwarded as asked, in place of the caller's own.
    let upstream = clusterconnect::agent::Upstream::new(
        &c.api.url().parse().unwrap(),
        Some(c.api.ca_pem().as_bytes()),
    )
    .unwrap();
    let auth = Authenticator::new(AuthMode::Entra, entra_auth(&c.entra, &c.api, None));
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers.insert("impersonate-user", "bob".parse().unwrap());
    headers.insert("impersonate-extra-scopes", "view".parse().unwrap());
    let reviews_before = c
        .api
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("subjectaccessreviews"))
        .count();
    assert!(auth.authorize(&mut headers, &upstream).await.is_ok());
    assert_eq!(
        headers["authorization"],
        format!("Bearer {}", c.api.agent_token()).as_str()
    );
    assert_eq!(headers["impersonate-user"], "bob");
    assert_eq!(headers["impersonate-extra-scopes"], "view");
    assert!(headers.get("impersonate-extra-oid").is_none());
    assert!(headers.get("impersonate-group").is_none());
    let reviews_after = c
        .api
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("subjectaccessreviews"))
        .count();
    // One review for the user, one for the extra (a fresh authenticator: nothing cached).
    assert_eq!(reviews_after - reviews_before, 2);

    // kubectl never sends groups without a user, but another client may: refused like the
    // apiserver refuses it, before anything is forwarded.
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers.insert("impersonate-group", "system:masters".parse().unwrap());
    let refused = auth
        .authorize(&mut headers, &upstream)
        .await
        .expect_err("groups without a user are refused");
    assert_eq!(refused.status(), 400);
    let body = http_body_util::BodyExt::collect(refused.into_body())
        .await
        .unwrap()
        .to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "BadRequest");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("need Impersonate-User"),
        "{status}"
    );
}

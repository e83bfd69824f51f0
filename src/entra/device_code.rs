//! Interactive user sign-in with the OAuth device-code flow (RFC 8628), as `az login
//! --use-device-code` does: the user opens a URL on any device and enters a code; the proxy
//! polls Entra until the sign-in completes.
//!
//! The refresh token is cached under `<config dir>/entra/` (one private file per authority,
//! tenant and client app), so the next start redeems it instead of prompting; each redemption
//! rewrites the file with the new refresh token Entra returns. A cached token Entra rejects is
//! deleted and the user is asked to sign in again, when a prompt is allowed.

use crate::tunnel::http::error_chain;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::http::HttpClient;
use super::source::{pop_form, ChainOptions, Source, SourceFuture, SourceKind};
/// Where callers have always found these.
pub use super::source::{Prompt, StderrPrompt};
use super::token_endpoint::{request_device_code, request_token, EndpointError};
use super::{default_scope, SourceError, TokenResponse};
use crate::auth::refresh::ExpiringToken;
use crate::secret::Secret;

pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 section 3.5: after `slow_down`, poll this much less often.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The longest a sign-in code is waited for (Entra's last 15 minutes).
const MAX_CODE_LIFETIME: u64 = 3600;
/// The longest wait between two polls for the sign-in, slowed down or not.
const MAX_POLL_INTERVAL: u64 = 60;

pub struct DeviceCode {
    http: HttpClient,
    token_url: String,
    device_code_url: String,
    client_id: String,
    scope: String,
    cache: RefreshCache,
    prompt: Arc<dyn Prompt>,
    may_prompt: bool,
    /// [`SLOW_DOWN_STEP`]; shorter in tests.
    pub slow_down_step: Duration,
    /// The newest refresh token this process holds; the cache file is only its copy on disk.
    refresh_token: Mutex<Option<Secret>>,
    /// `--pop`: every grant (refresh token, device code) asks for a token bound to its key.
    pop: Option<Arc<super::pop::KeyRing>>,
}

/// The cache file's content.
#[derive(Deserialize)]
struct CachedSignIn {
    authority: String,
    tenant: String,
    client_id: String,
    refresh_token: String,
}

/// One user's refresh token for one authority, tenant and client app.
pub struct RefreshCache {
    pub path: PathBuf,
    authority: String,
    tenant: String,
    client_id: String,
}

impl RefreshCache {
    pub fn new(config_dir: &Path, authority: &str, tenant: &str, client_id: &str) -> Self {
        let key = Sha256::digest(format!("{authority}\n{tenant}\n{client_id}"));
        let name: String = key[..12].iter().map(|b| format!("{b:02x}")).collect();
        RefreshCache {
            path: config_dir
                .join("entra")
                .join(format!("refresh-{name}.json")),
            authority: authority.to_string(),
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
        }
    }

    /// The cached refresh token, if there is a readable one for this sign-in.
    pub fn load(&self) -> Option<Secret> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the cached Entra sign-in; signing in again");
                return None;
            }
        };
        match serde_json::from_slice::<CachedSignIn>(&text) {
            Ok(c)
                if c.authority == self.authority
                    && c.tenant == self.tenant
                    && c.client_id == self.client_id
                    && !c.refresh_token.is_empty() =>
            {
                Some(Secret::new(c.refresh_token))
            }
            _ => {
                tracing::warn!(path = %self.path.display(), "the cached Entra sign-in is damaged or for another sign-in; ignoring it");
                None
            }
        }
    }

    pub fn save(&self, refresh_token: &Secret) -> std::io::Result<()> {
        let body = serde_json::json!({
            "authority": self.authority,
            "tenant": self.tenant,
            "client_id": self.client_id,
            "refresh_token": refresh_token.expose(),
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        crate::files::write_private(&self.path, body.to_string().as_bytes())
    }

    pub fn delete(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot delete the rejected Entra sign-in cache; delete it by hand");
            }
        }
    }
}

impl DeviceCode {
    /// `may_prompt`: whether a sign-in may be started (a cached sign-in is used regardless).
    pub fn new(opts: &ChainOptions, tenant: &str, may_prompt: bool) -> DeviceCode {
        let cache = RefreshCache::new(
            &opts.config_dir,
            &opts.authority.host,
            tenant,
            &opts.client_app_id,
        );
        DeviceCode {
            http: opts.http.clone(),
            token_url: opts.authority.token_endpoint(tenant),
            device_code_url: opts.authority.device_code_endpoint(tenant),
            client_id: opts.client_app_id.clone(),
            scope: format!("{} offline_access", default_scope(&opts.server_app_id)),
            refresh_token: Mutex::new(cache.load()),
            cache,
            prompt: opts.prompt.clone(),
            may_prompt,
            slow_down_step: SLOW_DOWN_STEP,
            pop: opts.pop.clone(),
        }
    }

    pub fn cache_path(&self) -> &Path {
        &self.cache.path
    }

    fn current_refresh_token(&self) -> Option<Secret> {
        self.refresh_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the new refresh token in memory and on disk; a failed write costs only a prompt
    /// on the next start, so it is a warning.
    fn remember(&self, resp: TokenResponse) -> ExpiringToken {
        let (token, refresh) = resp.into_expiring();
        if let Some(refresh) = refresh {
            if let Err(e) = self.cache.save(&refresh) {
                tracing::warn!(path = %self.cache.path.display(), error = %e, "cannot cache the Entra sign-in; the next start will ask again");
            }
            *self.refresh_token.lock().unwrap_or_else(|p| p.into_inner()) = Some(refresh);
        }
        token
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let mut rejected = None;
        if let Some(refresh) = self.current_refresh_token() {
            let pop = pop_form(&self.pop);
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("client_id", self.client_id.as_str()),
                ("scope", self.scope.as_str()),
                ("refresh_token", refresh.expose()),
            ];
            form.extend(pop.iter().map(|(k, v)| (*k, v.as_str())));
            match request_token(&self.http, &self.token_url, &form).await {
                Ok(resp) => return Ok(self.remember(resp)),
                // Revoked, expired, or new conditions (MFA) apply: only a new sign-in helps.
                Err(e) if matches!(e.code(), Some("invalid_grant" | "interaction_required")) => {
                    tracing::info!(error = %error_chain(&e), "the cached Entra sign-in was rejected; it is deleted");
                    self.cache.delete();
                    *self.refresh_token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    rejected = Some(error_chain(&e));
                }
                Err(e) => return Err(e.into_source_error("device code (cached sign-in)")),
            }
        }
        if !self.may_prompt {
            return Err(SourceError::Unavailable(match rejected {
                Some(why) => format!("the cached sign-in was rejected ({why}) and stderr is not a terminal to sign in again; pass --auth device-code"),
                None => "skipped (stderr is not a terminal; pass --auth device-code)".into(),
            }.into()));
        }
        self.sign_in().await
    }

    async fn sign_in(&self) -> Result<ExpiringToken, SourceError> {
        let form = [
            ("client_id", self.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        let code = request_device_code(&self.http, &self.device_code_url, &form)
            .await
            .map_err(|e| e.into_source_error("device code"))?;
        let message = code.message.clone().unwrap_or_else(|| {
            format!(
                "To sign in, use a web browser to open the page {} and enter the code {} to authenticate.",
                code.verification_uri, code.user_code
            )
        });
        self.prompt.show(&message);
        // Entra gives 900 s and 5 s; an endpoint's answer beyond these bounds is held to them,
        // so it can neither overflow the clock nor stretch the wait past reason.
        let deadline = Instant::now() + Duration::from_secs(code.expires_in.min(MAX_CODE_LIFETIME));
        let mut interval = Duration::from_secs(code.interval.min(MAX_POLL_INTERVAL));
        let device_code = Secret::new(code.device_code);
        let expired = || {
            SourceError::Failed(
                "the sign-in code expired before the sign-in was completed; start the proxy again and finish the sign-in in time".into(),
            )
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(expired());
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            let pop = pop_form(&self.pop);
            let mut form = vec![
                ("grant_type", DEVICE_CODE_GRANT),
                ("client_id", self.client_id.as_str()),
                ("device_code", device_code.expose()),
            ];
            form.extend(pop.iter().map(|(k, v)| (*k, v.as_str())));
            match request_token(&self.http, &self.token_url, &form).await {
                Ok(resp) => {
                    tracing::info!("Entra sign-in completed");
                    return Ok(self.remember(resp));
                }
                Err(e) => match e.code() {
                    Some("authorization_pending") => {}
                    Some("slow_down") => {
                        interval = (interval + self.slow_down_step)
                            .min(Duration::from_secs(MAX_POLL_INTERVAL))
                    }
                    Some("expired_token" | "code_expired") => return Err(expired()),
                    Some("authorization_declined" | "access_denied") => {
                        return Err(SourceError::Failed(
                            "the sign-in was declined; start the proxy again to retry".into(),
                        ))
                    }
                    _ => return Err(poll_failed(e)),
                },
            }
        }
    }
}

fn poll_failed(e: EndpointError) -> SourceError {
    e.into_source_error("device code sign-in")
}

impl Source for DeviceCode {
    fn kind(&self) -> SourceKind {
        SourceKind::DeviceCode
    }

    fn attempt(&self) -> SourceFuture<'_> {
        Box::pin(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::test_server::{json, options, TestServer};

    #[derive(Default)]
    struct Captured(Mutex<Vec<String>>);

    impl Prompt for Captured {
        fn show(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    fn oauth_error(code: &str) -> crate::entra::test_server::Reply {
        json(
            400,
            serde_json::json!({"error": code, "error_description": format!("AADSTS: {code}")}),
        )
    }

    #[tokio::test]
    async fn polls_through_pending_and_slow_down_caches_the_refresh_token_and_reuses_it() {
        let server = TestServer::start(|req, _| {
            if req.target.ends_with("/devicecode") {
                return json(200, serde_json::json!({
                    "device_code": "dev-code", "user_code": "ABCD-EFGH",
                    "verification_uri": "https://microsoft.com/devicelogin",
                    "message": "To sign in, open https://microsoft.com/devicelogin and enter ABCD-EFGH.",
                    "expires_in": 900, "interval": 0
                }));
            }
            match req.field("grant_type").as_deref() {
                Some(DEVICE_CODE_GRANT) => {
                    assert_eq!(req.field("device_code").as_deref(), Some("dev-code"));
                    // The third poll (after pending, slow_down) succeeds.
                    let polls = POLLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    match polls {
                        0 => oauth_error("authorization_pending"),
                        1 => oauth_error("slow_down"),
                        _ => json(200, serde_json::json!({"access_token": "user-token-1", "refresh_token": "rt-1", "expires_in": 3600})),
                    }
                }
                Some("refresh_token") => {
                    assert_eq!(req.field("refresh_token").as_deref(), Some("rt-1"));
                    json(200, serde_json::json!({"access_token": "user-token-2", "refresh_token": "rt-2", "expires_in": 3600}))
                }
                other => panic!("unexpected grant {other:?}"),
            }
        })
        .await;
        static POLLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let config = tempfile::tempdir().unwrap();
        let captured = Arc::new(Captured::default());
        let mut opts = options(&server.base);
        opts.config_dir = config.path().to_path_buf();
        opts.prompt = captured.clone();
        let mut flow = DeviceCode::new(&opts, "organizations", true);
        flow.slow_down_step = Duration::from_millis(20);
        let token = flow.get().await.unwrap();
        assert_eq!(token.token.expose(), "user-token-1");
        assert_eq!(captured.0.lock().unwrap().len(), 1);
        assert!(captured.0.lock().unwrap()[0].contains("ABCD-EFGH"));
        let reqs = server.requests();
        assert_eq!(reqs[0].target, "/organizations/oauth2/v2.0/devicecode");
        assert_eq!(
            reqs[0].field("scope").unwrap(),
            format!(
                "{}/.default offline_access",
                crate::entra::ARC_SERVER_APP_ID
            )
        );
        assert_eq!(
            reqs[0].field("client_id").unwrap(),
            crate::entra::ARC_CLIENT_APP_ID
        );
        assert_eq!(reqs.len(), 4, "device code, pending, slow_down, success");

        let path = flow.cache_path().to_path_buf();
        assert!(path.starts_with(config.path().join("entra")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let cached: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(cached["refresh_token"], "rt-1");

        // The next start: no terminal, yet the cached sign-in works without a prompt.
        let second = DeviceCode::new(&opts, "organizations", false);
        assert_eq!(second.get().await.unwrap().token.expose(), "user-token-2");
        assert_eq!(captured.0.lock().unwrap().len(), 1, "no second prompt");
        let cached: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(cached["refresh_token"], "rt-2");
    }

    #[tokio::test]
    async fn with_pop_both_grants_ask_for_a_token_bound_to_the_key() {
        let server = TestServer::start(|req, n| {
            if req.target.ends_with("/devicecode") {
                json(200, serde_json::json!({"device_code": "d", "user_code": "U", "verification_uri": "https://x", "interval": 0}))
            } else {
                json(200, serde_json::json!({"access_token": format!("at-{n}"), "refresh_token": "rt", "expires_in": 3600}))
            }
        })
        .await;
        let config = tempfile::tempdir().unwrap();
        let mut opts = options(&server.base);
        opts.config_dir = config.path().to_path_buf();
        opts.prompt = Arc::new(Captured::default());
        let pem = pem::parse(include_str!("testdata/test-only-rsa-key.pem")).unwrap();
        let key = super::super::pop::PopKey::from_pkcs8(pem.contents()).unwrap();
        let cnf = super::super::pop::req_cnf(key.thumbprint());
        opts.pop = Some(Arc::new(super::super::pop::KeyRing::with_key(
            key,
            super::super::pop::KEY_ROTATION,
        )));
        let flow = DeviceCode::new(&opts, "organizations", true);
        flow.get().await.unwrap();
        // The cached refresh token is redeemed for a bound token too.
        flow.get().await.unwrap();
        let reqs = server.requests();
        let grants: Vec<_> = reqs.iter().map(|r| r.field("grant_type")).collect();
        assert_eq!(
            grants,
            [
                None,
                Some(DEVICE_CODE_GRANT.to_string()),
                Some("refresh_token".to_string())
            ]
        );
        for r in &reqs[1..] {
            assert_eq!(r.field("token_type").as_deref(), Some("pop"));
            assert_eq!(r.field("req_cnf").as_deref(), Some(cnf.as_str()));
        }
    }

    #[tokio::test]
    async fn a_rejected_cache_is_deleted_and_without_a_terminal_nothing_prompts() {
        let server = TestServer::start(|_, _| oauth_error("invalid_grant")).await;
        let config = tempfile::tempdir().unwrap();
        let captured = Arc::new(Captured::default());
        let mut opts = options(&server.base);
        opts.config_dir = config.path().to_path_buf();
        opts.prompt = captured.clone();
        let cache = RefreshCache::new(
            config.path(),
            &opts.authority.host,
            "t",
            &opts.client_app_id,
        );
        cache.save(&Secret::new("old-rt")).unwrap();
        let flow = DeviceCode::new(&opts, "t", false);
        let err = flow.get().await.unwrap_err();
        assert!(
            matches!(err, SourceError::Unavailable(ref r) if r.text().contains("rejected") && r.text().contains("--auth device-code")),
            "{err:?}"
        );
        assert!(!err.reason().contains("old-rt"));
        assert!(!cache.path.exists(), "the rejected cache is deleted");
        assert!(captured.0.lock().unwrap().is_empty());
        // No cache, no terminal: skipped without a network call.
        let before = server.requests().len();
        let err = DeviceCode::new(&opts, "t", false).get().await.unwrap_err();
        assert!(err.reason().starts_with("skipped"), "{err:?}");
        assert_eq!(server.requests().len(), before);
    }

    #[tokio::test]
    async fn a_declined_sign_in_fails_with_a_clear_message() {
        let server = TestServer::start(|req, _| {
            if req.target.ends_with("/devicecode") {
                json(200, serde_json::json!({"device_code": "d", "user_code": "U", "verification_uri": "https://x", "interval": 0}))
            } else {
                oauth_error("authorization_declined")
            }
        })
        .await;
        let config = tempfile::tempdir().unwrap();
        let captured = Arc::new(Captured::default());
        let mut opts = options(&server.base);
        opts.config_dir = config.path().to_path_buf();
        opts.prompt = captured.clone();
        let err = DeviceCode::new(&opts, "t", true).get().await.unwrap_err();
        assert!(err.reason().contains("declined"), "{err:?}");
        assert!(captured.0.lock().unwrap()[0].contains("enter the code U"));
    }
}

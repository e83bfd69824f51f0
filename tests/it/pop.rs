//! Proof-of-possession tokens end to end: kubectl through proxy -> relay -> agent with PoP
//! tokens, as kubelogin `--pop-enabled --pop-claims u=<cluster id>` and `proxy --pop` send
//! them. The refusal cases build their PoP tokens here, independently of the proxy's code
//! (header, payload, RFC 7638 thumbprint and RS256 signature written out as kubelogin does),
//! so a mistake shared by both of the crate's sides cannot hide.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use clusterconnect::agent::{AuthMode, Authenticator, KeySource, PopSettings};
use clusterconnect::auth::CredentialSource;
use clusterconnect::entra::chain;
use clusterconnect::entra::pop::{KeyRing, PopCredential, PopPolicy, DEFAULT_WINDOW};
use clusterconnect::entra::ARC_SERVER_APP_ID;

use crate::entra_auth::{chain_options, empty_env, entra_auth, proxy_through, whoami};
use crate::support;
use support::check::{describe, text};
use support::entra::{Entra, TENANT};
use support::tunnel::{
    listen_key, static_token, wait_for_listener, Agent, LocalProxy, Relay, CONNECTION,
};
use support::{kubectl, kubectl_available, ApiServer};

const HOUR: Duration = Duration::from_secs(3600);
const CLUSTER_ID: &str =
    "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/edge";
const OTHER_CLUSTER_ID: &str =
    "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/other";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What kubelogin's software PoP key does, written out: an RSA key, its RFC 7638 thumbprint,
/// and compact JWS signed RS256 over `header.payload`.
struct Kubelogin {
    pair: ring::signature::RsaKeyPair,
    n: String,
    e: String,
}

impl Kubelogin {
    fn load(pem_text: &str) -> Kubelogin {
        let der = pem::parse(pem_text).expect("pem");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der.contents()).expect("rsa key");
        let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
        Kubelogin {
            n: URL_SAFE_NO_PAD.encode(&public.n),
            e: URL_SAFE_NO_PAD.encode(&public.e),
            pair,
        }
    }

    fn thumbprint(&self) -> String {
        let jwk = format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, self.e, self.n);
        URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()))
    }

    fn jwk(&self) -> Value {
        json!({"e": self.e, "kty": "RSA", "n": self.n, "alg": "RS256", "kid": self.thumbprint()})
    }

    fn header(&self) -> Value {
        json!({"typ": "pop", "alg": "RS256", "kid": self.thumbprint()})
    }

    fn payload(&self, at: &str, u: &str, ts: u64) -> Value {
        json!({"at": at, "ts": ts, "u": u, "cnf": {"jwk": self.jwk()}, "nonce": "0123456789abcdef0123456789abcdef"})
    }

    /// `header.payload.signature`, signed with this key.
    fn sign(&self, header: &Value, payload: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn pop(&self, at: &str, u: &str, ts: u64) -> String {
        self.sign(&self.header(), &self.payload(at, u, ts))
    }
}

fn kubelogin() -> Kubelogin {
    Kubelogin::load(include_str!("support/keys/sp-client.pem"))
}

fn another_key() -> Kubelogin {
    Kubelogin::load(include_str!("support/keys/forger.pem"))
}

/// Stand-in Entra and apiserver, a relay, and an agent taking Entra tokens (bearer and PoP)
/// for CLUSTER_ID; `required` refuses bare Entra tokens.
struct Cluster {
    entra: Entra,
    api: ApiServer,
    relay: Relay,
    _agent: Agent,
}

impl Cluster {
    async fn start(required: bool) -> Cluster {
        let entra = Entra::start().await;
        let api = ApiServer::start().await;
        let relay = Relay::start().await;
        let auth = Authenticator::new(AuthMode::Both, entra_auth(&entra, &api, None)).with_pop(
            PopSettings {
                policy: Some(PopPolicy {
                    cluster_id: CLUSTER_ID.into(),
                    window: DEFAULT_WINDOW,
                }),
                required,
            },
        );
        let key = Arc::new(KeySource::fixed(listen_key()));
        let agent = Agent::start_audited(&relay, &api, key, CONNECTION, auth, None).await;
        wait_for_listener(&relay).await;
        Cluster {
            entra,
            api,
            relay,
            _agent: agent,
        }
    }

    async fn proxy(
        &self,
        dir: &std::path::Path,
        credentials: Vec<(&str, Arc<dyn CredentialSource>)>,
    ) -> LocalProxy {
        proxy_through(&self.relay, dir, credentials).await
    }

    /// A user's access token as Entra issues it for a PoP request bound to `kid`.
    fn bound_token(&self, upn: &str, oid: &str, kid: &str) -> String {
        let mut claims = self
            .entra
            .user_claims(upn, oid, &[], ARC_SERVER_APP_ID, HOUR);
        claims["cnf"] = json!({"kid": kid});
        self.entra.sign(&claims)
    }
}

/// `kubectl auth whoami` through `context` fails with a message holding every one of `want`.
async fn refused(proxy: &LocalProxy, context: &str, want: &[&str]) {
    let out = kubectl(
        &proxy.kubeconfig,
        &["--context", context, "auth", "whoami"],
        &[],
    )
    .await;
    assert!(!out.status.success(), "{context}: {}", describe(&out));
    let stderr = text(&out.stderr);
    for w in want {
        assert!(
            stderr.contains(w),
            "{context}: wanted {w:?}: {}",
            describe(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelogin_style_pop_tokens_are_accepted_and_every_broken_one_is_refused() {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let key = kubelogin();
    let oid = "7a1b2c3d-0000-4000-8000-0000000000a1";
    let upn = "pia@contoso.com";
    let at = c.bound_token(upn, oid, &key.thumbprint());
    let now = now();

    let good = key.pop(&at, CLUSTER_ID, now);
    // u is an ARM id, compared case-insensitively as the guard does; ts may come as a string.
    let upper_u = key.pop(&at, &CLUSTER_ID.to_uppercase(), now);
    let mut string_ts = key.payload(&at, CLUSTER_ID, now);
    string_ts["ts"] = now.to_string().into();
    let string_ts = key.sign(&key.header(), &string_ts);

    let wrong_u = key.pop(&at, OTHER_CLUSTER_ID, now);
    let stale = key.pop(&at, CLUSTER_ID, now - 16 * 60);
    let future = key.pop(&at, CLUSTER_ID, now + 10 * 60);
    // Signed and described by another key than the one the access token is bound to.
    let other = another_key();
    let mismatch = other.pop(&at, CLUSTER_ID, now);
    // The signature of another payload: the key is right, the signature is not over this.
    let bad_signature = {
        let genuine = key.pop(&at, CLUSTER_ID, now);
        let other_ts = key.pop(&at, CLUSTER_ID, now - 1);
        let (signed, _) = genuine.rsplit_once('.').unwrap();
        let (_, signature) = other_ts.rsplit_once('.').unwrap();
        format!("{signed}.{signature}")
    };
    let mut hs256 = key.header();
    hs256["alg"] = "HS256".into();
    let hs256 = key.sign(&hs256, &key.payload(&at, CLUSTER_ID, now));
    // The access token itself is not one this cluster accepts: another audience.
    let mut wrong_audience = c
        .entra
        .user_claims(upn, oid, &[], "api://another-app", HOUR);
    wrong_audience["cnf"] = json!({"kid": key.thumbprint()});
    let inner_audience = key.pop(&c.entra.sign(&wrong_audience), CLUSTER_ID, now);
    // Or signed by a key Entra never published.
    let mut claims = c.entra.user_claims(upn, oid, &[], ARC_SERVER_APP_ID, HOUR);
    claims["cnf"] = json!({"kid": key.thumbprint()});
    let inner_forged = key.pop(&c.entra.sign_with_unpublished_key(&claims), CLUSTER_ID, now);
    // A plain bearer token wrapped as PoP: not bound to the key.
    let unbound = key.pop(
        &c.entra
            .sign(&c.entra.user_claims(upn, oid, &[], ARC_SERVER_APP_ID, HOUR)),
        CLUSTER_ID,
        now,
    );
    // A token bound another way (a certificate thumbprint, as mTLS-bound tokens are): bound
    // all the same, so useless alone.
    let mut claims = c.entra.user_claims(upn, oid, &[], ARC_SERVER_APP_ID, HOUR);
    claims["cnf"] = json!({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"});
    let bound_otherwise = c.entra.sign(&claims);

    let cases: Vec<(&str, &String, &[&str])> = vec![
        ("wrong-u", &wrong_u, &["is for cluster", "not this one"]),
        ("stale", &stale, &["older than the 900s this agent accepts"]),
        ("future", &future, &["lies in the future"]),
        ("mismatch", &mismatch, &["cnf.kid mismatch"]),
        (
            "bad-signature",
            &bad_signature,
            &["signature does not verify with its cnf.jwk"],
        ),
        ("hs256", &hs256, &["algorithm \"HS256\" is not accepted"]),
        (
            "inner-audience",
            &inner_audience,
            &["its access token", "audience \"api://another-app\""],
        ),
        (
            "inner-forged",
            &inner_forged,
            &["its access token", "signature does not verify"],
        ),
        ("unbound", &unbound, &["not bound to any key"]),
        // The access token alone, as a thief who saw a PoP token would send it.
        (
            "bare-bound",
            &at,
            &["Entra token rejected", "bound to a proof-of-possession key"],
        ),
        (
            "bound-otherwise",
            &bound_otherwise,
            &["Entra token rejected", "bound to a proof-of-possession key"],
        ),
    ];
    let mut credentials: Vec<(&str, Arc<dyn CredentialSource>)> = vec![
        ("good", static_token(&good)),
        ("upper-u", static_token(&upper_u)),
        ("string-ts", static_token(&string_ts)),
    ];
    credentials.extend(
        cases
            .iter()
            .map(|(name, token, _)| (*name, static_token(token))),
    );
    let proxy = c.proxy(dir.path(), credentials).await;

    for context in ["good", "upper-u", "string-ts"] {
        assert_eq!(whoami(&proxy.kubeconfig, context).await.0, upn, "{context}");
    }
    // kubectl reuses one exec credential for many requests: the same nonce again is fine.
    assert_eq!(whoami(&proxy.kubeconfig, "good").await.0, upn);
    for (name, _, want) in &cases {
        let mut want = want.to_vec();
        if !name.starts_with("bare-bound") && *name != "bound-otherwise" {
            want.push("PoP token rejected");
        }
        refused(&proxy, name, &want).await;
    }
    // Only the accepted requests reached the apiserver, with the agent's own credential.
    let seen = c.api.requests();
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(
            r.headers["authorization"].to_str().unwrap(),
            format!("Bearer {}", c.api.agent_token())
        );
        assert_eq!(r.user.as_deref(), Some(upn));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_gets_bound_tokens_from_entra_and_presents_pop_tokens_an_agent_requiring_them_accepts(
) {
    if !kubectl_available() {
        return;
    }
    let c = Cluster::start(true).await;
    let dir = tempfile::tempdir().unwrap();
    let app = (
        "55555555-0000-0000-0000-00000000f006",
        "f0000000-0000-0000-0000-00000000f006",
    );
    c.entra.add_app_secret(app.0, "pop-secret", app.1);
    let mut env = empty_env(dir.path());
    env.tenant_id = Some(TENANT.into());
    env.client_id = Some(app.0.into());
    env.client_secret = Some(clusterconnect::secret::Secret::new("pop-secret"));

    let ring = Arc::new(KeyRing::generate().await.expect("key"));
    let mut opts = chain_options(&c.entra, None, dir.path());
    opts.pop = Some(ring.clone());
    let access = chain::bound_credential(&opts, &env)
        .await
        .expect("bound credential");
    let pop: Arc<dyn CredentialSource> =
        Arc::new(PopCredential::new(access.clone(), ring.clone(), CLUSTER_ID));
    let elsewhere: Arc<dyn CredentialSource> =
        Arc::new(PopCredential::new(access, ring.clone(), OTHER_CLUSTER_ID));
    // An unbound bearer token of the same app, which this agent refuses.
    let bearer = chain::credential(&chain_options(&c.entra, None, dir.path()), &env)
        .await
        .expect("credential");
    let proxy = c
        .proxy(
            dir.path(),
            vec![("pop", pop), ("elsewhere", elsewhere), ("bearer", bearer)],
        )
        .await;

    assert_eq!(whoami(&proxy.kubeconfig, "pop").await.0, app.1);
    // Entra was asked for a token bound to the proxy's key, and only once.
    assert_eq!(
        c.entra.pop_requests(),
        vec![ring.current().thumbprint().to_string()]
    );
    refused(
        &proxy,
        "elsewhere",
        &["PoP token rejected", "is for cluster"],
    )
    .await;
    refused(&proxy, "bearer", &["--require-pop"]).await;
    // The agent's own credential reached the apiserver, never a PoP token.
    for r in c.api.requests() {
        assert_eq!(
            r.headers["authorization"].to_str().unwrap(),
            format!("Bearer {}", c.api.agent_token())
        );
    }
}

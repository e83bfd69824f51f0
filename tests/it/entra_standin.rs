//! The Entra, Graph, IMDS and HIMDS stand-ins against a plain client: proves they answer the
//! way the real services do, so credential and validation tests can rely on them.

use crate::support;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clusterconnect::entra::http::HttpClient;
use http::Method;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use support::entra::{GRAPH, OTHER_TENANT, TENANT};
use support::{Entra, Himds, Imds, TokenRequest};

const AUDIENCE: &str = "6256c85f-0aad-4d50-b960-e6e9b21efe35";

fn client(entra: &Entra) -> HttpClient {
    HttpClient::new(
        entra.client_tls(),
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// The JWKS key for `token`'s kid, fetched the way a validator would: via discovery.
async fn published_key(client: &HttpClient, entra: &Entra, token: &str) -> Option<DecodingKey> {
    let discovery_url = format!(
        "{}/{TENANT}/v2.0/.well-known/openid-configuration",
        entra.authority_host()
    );
    let discovery: Value = client
        .get(&discovery_url, &[])
        .await
        .unwrap()
        .json(&discovery_url)
        .unwrap();
    assert_eq!(
        discovery["issuer"],
        format!("{}/{TENANT}/v2.0", entra.authority_host())
    );
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    let jwks: Value = client
        .get(jwks_uri, &[])
        .await
        .unwrap()
        .json(jwks_uri)
        .unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())?;
    Some(DecodingKey::from_rsa_components(key["n"].as_str()?, key["e"].as_str()?).unwrap())
}

fn validation(entra: &Entra, audience: &str) -> Validation {
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[audience]);
    v.set_issuer(&[format!("{}/{TENANT}/v2.0", entra.authority_host())]);
    v
}

#[tokio::test]
async fn minted_tokens_verify_against_the_published_keys_and_forgeries_do_not() {
    let entra = Entra::start().await;
    let client = client(&entra);
    let claims = entra.user_claims(
        "alice@contoso.com",
        "oid-alice",
        &["g1"],
        AUDIENCE,
        Duration::from_secs(600),
    );
    assert_eq!(claims["ver"], "2.0");
    assert_eq!(claims["groups"], json!(["g1"]));
    let token = entra.sign(&claims);
    let key = published_key(&client, &entra, &token).await.unwrap();
    let data = jsonwebtoken::decode::<Value>(&token, &key, &validation(&entra, AUDIENCE)).unwrap();
    assert_eq!(data.claims["upn"], "alice@contoso.com");
    assert_eq!(entra.jwks_fetches(), 1);

    let forged = entra.sign_with_unpublished_key(&claims);
    let key = published_key(&client, &entra, &forged).await.unwrap();
    assert!(jsonwebtoken::decode::<Value>(&forged, &key, &validation(&entra, AUDIENCE)).is_err());
    assert!(entra.unsigned(&claims).ends_with('.'));

    // Key 2 is published only once it signs.
    entra.rotate_signing_key();
    let rotated = entra.sign(&claims);
    assert_eq!(
        jsonwebtoken::decode_header(&rotated)
            .unwrap()
            .kid
            .as_deref(),
        Some("key-2")
    );
    let key = published_key(&client, &entra, &rotated).await.unwrap();
    jsonwebtoken::decode::<Value>(&rotated, &key, &validation(&entra, AUDIENCE)).unwrap();
    assert_eq!(entra.jwks_fetches(), 3);
}

#[tokio::test]
async fn client_credentials_with_a_secret() {
    let entra = Entra::start().await;
    let client = client(&entra);
    entra.add_app_secret("app-1", "s3cret", "oid-app-1");
    let url = format!("{}/{TENANT}/oauth2/v2.0/token", entra.authority_host());
    let scope = format!("{AUDIENCE}/.default");
    let form = |secret: &'static str, scope: &str| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", "app-1".to_string()),
            ("client_secret", secret.to_string()),
            ("scope", scope.to_string()),
        ]
    };
    let post = |form: Vec<(&'static str, String)>, url: String| {
        let client = client.clone();
        async move {
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            client.post_form(&url, &[], &pairs).await.unwrap()
        }
    };
    let ok = post(form("s3cret", &scope), url.clone()).await;
    assert_eq!(ok.status, 200, "{}", ok.text_excerpt());
    let body: Value = ok.json(&url).unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let claims = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["oid"], "oid-app-1");
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(claims["azp"], "app-1");

    let wrong = post(form("nope", &scope), url.clone()).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.text_excerpt().contains("AADSTS7000215"));
    let no_default = post(form("s3cret", AUDIENCE), url.clone()).await;
    assert!(no_default.text_excerpt().contains("invalid_scope"));
    let unknown_tenant = post(
        form("s3cret", &scope),
        format!("{}/not-a-tenant/oauth2/v2.0/token", entra.authority_host()),
    )
    .await;
    assert_eq!(unknown_tenant.status, 400);
    assert!(unknown_tenant.text_excerpt().contains("AADSTS90002"));

    // v1 tokens from the other tenant.
    entra.set_token_version(1);
    let url = format!(
        "{}/{OTHER_TENANT}/oauth2/v2.0/token",
        entra.authority_host()
    );
    let v1: Value = post(form("s3cret", &scope), url.clone())
        .await
        .json(&url)
        .unwrap();
    let claims = claims_of(v1["access_token"].as_str().unwrap());
    assert_eq!(
        claims["iss"],
        format!("https://sts.windows.net/{OTHER_TENANT}/")
    );
    assert_eq!(claims["appid"], "app-1");
    let requests = entra.token_requests();
    // The unknown tenant is refused before the request counts.
    assert_eq!(requests.len(), 4);
    assert_eq!(
        requests[0],
        TokenRequest {
            tenant: TENANT.into(),
            grant_type: "client_credentials".into(),
            client_id: "app-1".into(),
            scope,
        }
    );
}

#[tokio::test]
async fn client_assertions_from_a_certificate_or_a_federated_token() {
    use rustls_pki_types::pem::PemObject;
    use sha1::Digest;
    let entra = Entra::start().await;
    let client = client(&entra);
    let pem = entra.add_app_certificate("app-cert", "oid-cert");
    entra.add_federated_app("app-wi", "system:serviceaccount:azure-arc:agent", "oid-wi");
    let cert = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let url = format!("{}/{TENANT}/oauth2/v2.0/token", entra.authority_host());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.x5t = Some(URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(cert.as_ref())));
    let claims = json!({"aud": url, "iss": "app-cert", "sub": "app-cert", "jti": "1",
        "nbf": now, "exp": now + 600});
    let key_pem = &pem[pem.find("-----BEGIN PRIVATE KEY-----").unwrap()..];
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes()).unwrap();
    let assertion = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let scope = format!("{GRAPH}/.default");
    let redeem = |client_id: &'static str, assertion: String| {
        let (client, url, scope) = (client.clone(), url.clone(), scope.clone());
        async move {
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("scope", scope.as_str()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
            ];
            client.post_form(&url, &[], &form).await.unwrap()
        }
    };
    let ok = redeem("app-cert", assertion.clone()).await;
    assert_eq!(ok.status, 200, "{}", ok.text_excerpt());
    let token: Value = ok.json(&url).unwrap();
    let token_claims = claims_of(token["access_token"].as_str().unwrap());
    assert_eq!(
        (&token_claims["oid"], &token_claims["aud"]),
        (&json!("oid-cert"), &json!(GRAPH))
    );
    // The certificate's assertion does not sign in the federated app, and vice versa.
    assert_eq!(redeem("app-wi", assertion).await.status, 400);
    let federated = entra.federated_token("system:serviceaccount:azure-arc:agent");
    let ok = redeem("app-wi", federated.clone()).await;
    assert_eq!(ok.status, 200, "{}", ok.text_excerpt());
    assert_eq!(redeem("app-cert", federated).await.status, 400);
    let other = entra.federated_token("system:serviceaccount:default:someone");
    assert!(redeem("app-wi", other)
        .await
        .text_excerpt()
        .contains("AADSTS70021"));
}

#[tokio::test]
async fn group_overage_points_at_graph_which_lists_every_group() {
    let entra = Entra::start().await;
    let client = client(&entra);
    let groups: Vec<String> = (0..250).map(|i| format!("group-{i:03}")).collect();
    entra.add_user("bob@contoso.com", "oid-bob", &groups);
    let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    let claims = entra.user_claims(
        "bob@contoso.com",
        "oid-bob",
        &refs,
        AUDIENCE,
        Duration::from_secs(600),
    );
    assert!(claims.get("groups").is_none());
    assert_eq!(claims["_claim_names"]["groups"], "src1");
    assert_eq!(
        claims["_claim_sources"]["src1"]["endpoint"],
        format!("https://graph.windows.net/{TENANT}/users/oid-bob/getMemberObjects")
    );

    let url = format!(
        "{}/v1.0/directoryObjects/oid-bob/getMemberObjects",
        entra.authority_host()
    );
    let body = json!({"securityEnabledOnly": false});
    let graph_token =
        entra.sign(&entra.app_claims("oid-agent", "agent-app", GRAPH, Duration::from_secs(600)));
    let bearer = format!("Bearer {graph_token}");
    let answer = client
        .send_json(Method::POST, &url, &[("authorization", &bearer)], &body)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text_excerpt());
    let listed: Value = answer.json(&url).unwrap();
    assert_eq!(listed["value"].as_array().unwrap().len(), 250);

    // A token for another audience, or a forged one, is refused.
    let wrong_aud = format!(
        "Bearer {}",
        entra.sign(&entra.app_claims("oid-agent", "agent-app", AUDIENCE, Duration::from_secs(600)))
    );
    let refused = client
        .send_json(Method::POST, &url, &[("authorization", &wrong_aud)], &body)
        .await
        .unwrap();
    assert_eq!(refused.status, 401);
    assert!(refused
        .text_excerpt()
        .contains("InvalidAuthenticationToken"));

    entra.set_graph_available(false);
    let down = client
        .send_json(Method::POST, &url, &[("authorization", &bearer)], &body)
        .await
        .unwrap();
    assert_eq!(down.status, 503);
    assert_eq!(entra.graph_calls(), 3);
}

#[tokio::test]
async fn device_code_flow_then_refresh() {
    let entra = Entra::start().await;
    let client = client(&entra);
    entra.add_user("carol@contoso.com", "oid-carol", &["g".to_string()]);
    let host = entra.authority_host();
    let scope = format!("{AUDIENCE}/.default offline_access");
    let url = format!("{host}/{TENANT}/oauth2/v2.0/devicecode");
    let started: Value = client
        .post_form(&url, &[], &[("client_id", "public"), ("scope", &scope)])
        .await
        .unwrap()
        .json(&url)
        .unwrap();
    let user_code = started["user_code"].as_str().unwrap();
    assert_eq!(entra.device_codes(), vec![user_code.to_string()]);
    assert!(started["message"].as_str().unwrap().contains(user_code));
    let token_url = format!("{host}/{TENANT}/oauth2/v2.0/token");
    let poll_form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("client_id", "public"),
        ("device_code", started["device_code"].as_str().unwrap()),
    ];
    let poll = || client.post_form(&token_url, &[], &poll_form);
    assert!(poll()
        .await
        .unwrap()
        .text_excerpt()
        .contains("authorization_pending"));
    entra.slow_down_once();
    assert!(poll().await.unwrap().text_excerpt().contains("slow_down"));
    entra.approve_device_code(user_code, "carol@contoso.com");
    let granted = poll().await.unwrap();
    assert_eq!(granted.status, 200, "{}", granted.text_excerpt());
    let granted: Value = granted.json(&token_url).unwrap();
    let claims = claims_of(granted["access_token"].as_str().unwrap());
    assert_eq!(claims["upn"], "carol@contoso.com");
    assert_eq!(claims["aud"], AUDIENCE);
    assert!(poll()
        .await
        .unwrap()
        .text_excerpt()
        .contains("invalid_grant"));

    let refreshed = client
        .post_form(
            &token_url,
            &[],
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "public"),
                ("refresh_token", granted["refresh_token"].as_str().unwrap()),
                ("scope", &scope),
            ],
        )
        .await
        .unwrap();
    assert_eq!(refreshed.status, 200, "{}", refreshed.text_excerpt());
    let refreshed: Value = refreshed.json(&token_url).unwrap();
    assert_eq!(
        claims_of(refreshed["access_token"].as_str().unwrap())["oid"],
        "oid-carol"
    );
}

#[tokio::test]
async fn imds_requires_the_metadata_header() {
    let entra = Entra::start().await;
    let client = client(&entra);
    let imds = Imds::start(&entra, "oid-mi", "client-mi").await;
    let url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={AUDIENCE}",
        imds.endpoint()
    );
    let refused = client.get(&url, &[]).await.unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused
        .text_excerpt()
        .contains("Required metadata header not specified"));
    let ok = client.get(&url, &[("metadata", "true")]).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text_excerpt());
    let body: Value = ok.json(&url).unwrap();
    assert!(body["expires_in"].is_string() && body["expires_on"].is_string());
    assert_eq!(body["resource"], AUDIENCE);
    let claims = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(
        (&claims["oid"], &claims["aud"]),
        (&json!("oid-mi"), &json!(AUDIENCE))
    );
    assert_eq!(imds.requests(), 2);
}

#[tokio::test]
async fn himds_challenge_files_are_single_use() {
    let entra = Entra::start().await;
    let client = client(&entra);
    let dir = tempfile::tempdir().unwrap();
    let himds = Himds::start(&entra, "oid-arc", dir.path()).await;
    let url = format!(
        "{}?api-version=2020-06-01&resource={AUDIENCE}",
        himds.identity_endpoint()
    );
    let challenge = client.get(&url, &[("metadata", "true")]).await.unwrap();
    assert_eq!(challenge.status, 401);
    let realm = challenge.header("www-authenticate").unwrap();
    let path = realm.strip_prefix("Basic realm=").unwrap().to_string();
    let secret = std::fs::read_to_string(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let basic = format!("Basic {secret}");
    let headers = [("metadata", "true"), ("authorization", basic.as_str())];
    let ok = client.get(&url, &headers).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text_excerpt());
    let body: Value = ok.json(&url).unwrap();
    assert_eq!(
        claims_of(body["access_token"].as_str().unwrap())["oid"],
        "oid-arc"
    );
    assert!(!std::path::Path::new(&path).exists());
    // The same secret again earns only a fresh challenge.
    let again = client.get(&url, &headers).await.unwrap();
    assert_eq!(again.status, 401);
    assert_ne!(again.header("www-authenticate").unwrap(), realm);
    assert_eq!(
        (himds.challenges_issued(), himds.challenges_redeemed()),
        (2, 1)
    );
}

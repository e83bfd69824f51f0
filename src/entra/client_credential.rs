//! A service principal from the environment, as azure-identity's EnvironmentCredential reads
//! it: `AZURE_TENANT_ID` + `AZURE_CLIENT_ID` with `AZURE_CLIENT_SECRET`, or with
//! `AZURE_CLIENT_CERTIFICATE_PATH` (a PEM holding the certificate and its unencrypted RSA key),
//! in which case the proxy proves possession with a signed client-assertion JWT.

use std::path::PathBuf;
use std::time::Duration;

use crate::tunnel::sas::unix_now;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::Serialize;
use sha1::{Digest, Sha1};

use super::http::HttpClient;
use super::source::{pop_form, ChainOptions, Environment, Source, SourceFuture, SourceKind};
use super::token_endpoint::request_token;
use super::{default_scope, SourceError};
use crate::auth::refresh::ExpiringToken;
use crate::secret::Secret;

/// The standard assertion type for a JWT proving the client's identity (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a signed assertion is good for; Entra accepts it once, within this window.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(10 * 60);

enum Proof {
    Secret(Secret),
    /// Read on every fetch, so a renewed certificate is picked up without a restart.
    Certificate(PathBuf),
}

pub struct ClientCredential {
    http: HttpClient,
    token_url: String,
    client_id: String,
    scope: String,
    proof: Proof,
    pop: Option<std::sync::Arc<super::pop::KeyRing>>,
}

impl ClientCredential {
    /// The service principal the environment names, or why there is none.
    pub fn from_env(env: &Environment, opts: &ChainOptions) -> Result<Self, SourceError> {
        let tenant = opts.tenant.clone().or_else(|| env.tenant_id.clone());
        let mut missing = Vec::new();
        if env.client_id.is_none() {
            missing.push("AZURE_CLIENT_ID");
        }
        if tenant.is_none() {
            missing.push("AZURE_TENANT_ID");
        }
        if env.client_secret.is_none() && env.client_certificate_path.is_none() {
            missing.push("AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH");
        }
        if !missing.is_empty() {
            let mut reason = format!("{} not set", missing.join(", "));
            if missing == ["AZURE_TENANT_ID"] {
                reason.push_str(" (a service principal needs its tenant: set it or pass --tenant)");
            }
            return Err(SourceError::NotConfigured(reason.into()));
        }
        let proof = match (&env.client_secret, &env.client_certificate_path) {
            (Some(secret), _) => Proof::Secret(secret.clone()),
            (None, Some(path)) => {
                if env.client_certificate_password_set {
                    return Err(SourceError::Failed(
                        "AZURE_CLIENT_CERTIFICATE_PASSWORD is set, but encrypted private keys are not supported: \
                         decrypt the key (openssl pkey -in key.pem -out plain.pem), put it in the PEM file with the \
                         certificate, keep that file private and unset the variable"
                            .into(),
                    ));
                }
                Proof::Certificate(path.clone())
            }
            (None, None) => {
                return Err(SourceError::NotConfigured(
                    "AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH not set".into(),
                ))
            }
        };
        let tenant = tenant.unwrap_or_default();
        Ok(ClientCredential {
            http: opts.http.clone(),
            token_url: opts.authority.token_endpoint(&tenant),
            client_id: env.client_id.clone().unwrap_or_default(),
            scope: default_scope(&opts.server_app_id),
            proof,
            pop: opts.pop.clone(),
        })
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let assertion;
        let pop = pop_form(&self.pop);
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        form.extend(pop.iter().map(|(k, v)| (*k, v.as_str())));
        match &self.proof {
            Proof::Secret(secret) => form.push(("client_secret", secret.expose())),
            Proof::Certificate(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    SourceError::Failed(super::Reason::new(
                        format!(
                            "cannot read AZURE_CLIENT_CERTIFICATE_PATH {}",
                            path.display()
                        ),
                        e,
                    ))
                })?;
                let cert = CertificateKey::from_pem(&pem).map_err(|e| {
                    SourceError::Failed(
                        format!("AZURE_CLIENT_CERTIFICATE_PATH {}: {e}", path.display()).into(),
                    )
                })?;
                assertion = cert
                    .assertion(&self.client_id, &self.token_url, unix_now())
                    .map_err(|r| SourceError::Failed(r.into()))?;
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", assertion.expose()));
            }
        }
        let resp = request_token(&self.http, &self.token_url, &form)
            .await
            .map_err(|e| e.into_source_error("service principal"))?;
        Ok(resp.into_expiring().0)
    }
}

impl Source for ClientCredential {
    fn kind(&self) -> SourceKind {
        SourceKind::Env
    }

    fn attempt(&self) -> SourceFuture<'_> {
        Box::pin(self.get())
    }
}

/// A certificate's thumbprint and private key, ready to sign client assertions.
pub struct CertificateKey {
    /// base64url(SHA-1(certificate DER)): how Entra finds the registered certificate.
    pub x5t: String,
    key: EncodingKey,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

impl CertificateKey {
    /// The first certificate and the RSA private key in a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(pem);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err("the private key is encrypted, which is not supported: decrypt it (openssl pkey -in key.pem -out plain.pem) and keep the file private".into());
        }
        let mut cert = None;
        let mut key = None;
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
            let (kind, der) = section.map_err(|e| format!("not a valid PEM file ({e})"))?;
            match kind {
                SectionKind::Certificate if cert.is_none() => cert = Some(der),
                SectionKind::RsaPrivateKey | SectionKind::PrivateKey if key.is_none() => {
                    key = Some((kind, der))
                }
                SectionKind::EcPrivateKey => return Err(
                    "the private key is an EC key; Entra client assertions here need an RSA key"
                        .into(),
                ),
                _ => {}
            }
        }
        let cert = cert.ok_or(
            "no CERTIFICATE in the PEM file; it needs the certificate and its private key",
        )?;
        let (kind, der) = key.ok_or("no private key in the PEM file; it needs the certificate and its (unencrypted RSA) private key")?;
        // jsonwebtoken takes PKCS#1 as DER or either form as PEM; re-wrapping handles both.
        let tag = if kind == SectionKind::RsaPrivateKey {
            "RSA PRIVATE KEY"
        } else {
            "PRIVATE KEY"
        };
        let key_pem = Secret::new(pem::encode(&pem::Pem::new(tag, der)));
        let key = EncodingKey::from_rsa_pem(key_pem.expose().as_bytes())
            .map_err(|_| "the private key is not an RSA key jsonwebtoken can use (an RSA key of at least 2048 bits is needed)".to_string())?;
        Ok(CertificateKey {
            x5t: URL_SAFE_NO_PAD.encode(Sha1::digest(&cert)),
            key,
        })
    }

    /// An RS256 client assertion for `client_id` at `token_url`, valid from `now` (Unix seconds).
    pub fn assertion(&self, client_id: &str, token_url: &str, now: u64) -> Result<Secret, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.x5t = Some(self.x5t.clone());
        let claims = AssertionClaims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::new_v4().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|e| format!("cannot sign the client assertion: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entra::test_server::{json, options, TestServer};

    const TEST_KEY: &str = include_str!("testdata/test-only-rsa-key.pem");

    /// The test key and a certificate for it made now, in one PEM, as users provide them.
    pub(crate) fn cert_and_key_pem() -> (String, Vec<u8>) {
        let key =
            rcgen::KeyPair::from_pem_and_sign_algo(TEST_KEY, &rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["sp.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}{}", cert.pem(), TEST_KEY);
        (pem, cert.der().to_vec())
    }

    #[test]
    fn the_client_assertion_has_the_thumbprint_and_the_claims_entra_checks() {
        let (pem, der) = cert_and_key_pem();
        let cert = CertificateKey::from_pem(pem.as_bytes()).unwrap();
        let url = "https://login.example/t/oauth2/v2.0/token";
        let jwt = cert.assertion("client-1", url, unix_now()).unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(
            header.x5t.unwrap(),
            URL_SAFE_NO_PAD.encode(Sha1::digest(&der))
        );
        // Verify with the certificate's public key, as Entra does.
        let public = public_key_pkcs1();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_audience(&[url]);
        validation.set_issuer(&["client-1"]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            jwt.expose(),
            &jsonwebtoken::DecodingKey::from_rsa_der(&public),
            &validation,
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "client-1");
        assert_eq!(c["iat"], c["nbf"]);
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 600);
        assert!(uuid::Uuid::parse_str(c["jti"].as_str().unwrap()).is_ok());
        // A second assertion is a different token (fresh jti).
        assert_ne!(cert.assertion("client-1", url, unix_now()).unwrap(), jwt);

        let err = CertificateKey::from_pem(TEST_KEY.as_bytes()).err().unwrap();
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(CertificateKey::from_pem(encrypted.as_bytes())
            .err()
            .unwrap()
            .contains("encrypted"));
    }

    /// The test key's public half as PKCS#1, the form `DecodingKey::from_rsa_der` takes.
    fn public_key_pkcs1() -> Vec<u8> {
        use rcgen::PublicKeyData;
        let key =
            rcgen::KeyPair::from_pem_and_sign_algo(TEST_KEY, &rcgen::PKCS_RSA_SHA256).unwrap();
        key.der_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_secret_is_sent_as_a_client_credentials_form() {
        let server = TestServer::start(|_, _| {
            json(200, serde_json::json!({"access_token": "at-1", "expires_in": 3599, "token_type": "Bearer"}))
        })
        .await;
        let mut env = Environment {
            tenant_id: Some("tenant-a".into()),
            client_id: Some("client-a".into()),
            client_secret: Some(Secret::new("s3cret")),
            ..Environment::default()
        };
        let opts = options(&server.base);
        let source = ClientCredential::from_env(&env, &opts).unwrap();
        let token = source.get().await.unwrap();
        assert_eq!(token.token.expose(), "at-1");
        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].target, "/tenant-a/oauth2/v2.0/token");
        assert_eq!(reqs[0].field("grant_type").unwrap(), "client_credentials");
        assert_eq!(reqs[0].field("client_id").unwrap(), "client-a");
        assert_eq!(reqs[0].field("client_secret").unwrap(), "s3cret");
        assert_eq!(
            reqs[0].field("scope").unwrap(),
            format!("{}/.default", crate::entra::ARC_SERVER_APP_ID)
        );

        // The certificate path: an assertion instead of a secret.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sp.pem");
        std::fs::write(&path, cert_and_key_pem().0).unwrap();
        env.client_secret = None;
        env.client_certificate_path = Some(path);
        let source = ClientCredential::from_env(&env, &opts).unwrap();
        source.get().await.unwrap();
        let req = &server.requests()[1];
        assert_eq!(req.field("client_assertion_type").unwrap(), JWT_BEARER);
        assert!(req.field("client_secret").is_none());
        let header = jsonwebtoken::decode_header(&req.field("client_assertion").unwrap()).unwrap();
        assert!(header.x5t.is_some());

        env.client_certificate_password_set = true;
        let err = ClientCredential::from_env(&env, &opts).err().unwrap();
        assert!(
            matches!(err, SourceError::Failed(ref r) if r.text().contains("not supported")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_rejected_secret_says_what_entra_said_but_not_the_secret() {
        let server = TestServer::start(|_, _| {
            json(401, serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}))
        })
        .await;
        let env = Environment {
            tenant_id: Some("t".into()),
            client_id: Some("c".into()),
            client_secret: Some(Secret::new("s3cret")),
            ..Environment::default()
        };
        let source = ClientCredential::from_env(&env, &options(&server.base)).unwrap();
        let err = source.get().await.unwrap_err();
        assert!(matches!(err, SourceError::Failed(_)), "{err:?}");
        let reason = err.reason();
        assert!(
            reason.contains("AADSTS7000215") && reason.contains("127.0.0.1"),
            "{reason}"
        );
        assert!(!reason.contains("s3cret"), "{reason}");
        let err = ClientCredential::from_env(&Environment::default(), &options(&server.base))
            .err()
            .unwrap();
        assert!(matches!(err, SourceError::NotConfigured(_)), "{err:?}");
        assert_eq!(
            err.reason(),
            "AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH not set"
        );
    }
}

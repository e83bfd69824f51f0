//! `clusterconnect secrets` against stand-ins: the Key Vault stand-in (challenge, versions,
//! keys, PFX-backed certificates, throttling, denial), the Entra, IMDS and HIMDS stand-ins, and the
//! shared stand-in apiserver reached through a kubeconfig with kube-rs, directly and through the
//! tunnel (relay, agent and the proxy's kubeconfig).

use crate::support;

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusterconnect::entra::chain::{Environment, SourceKind};
use clusterconnect::entra::device_code::StderrPrompt;
use clusterconnect::entra::http::HttpClient;
use clusterconnect::entra::{Authority, Cloud, ARC_CLIENT_APP_ID};
use clusterconnect::secret::Secret;
use clusterconnect::secrets::credential::ChainCredentials;
use clusterconnect::secrets::keyvault::{Format, KeyVaultClient, ObjectRef, ObjectType};
use clusterconnect::secrets::provider_class::ProviderClass;
use clusterconnect::secrets::rotation;
use clusterconnect::secrets::sync::{cli_owner, Outcome, SecretTarget, Syncer, Targets};
use clusterconnect::tls::{client_config_with_roots, roots_from_pem};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use support::entra::{Entra, TENANT};
use support::imds::Himds;
use support::keyvault::KeyVault;
use support::processes::run_to_end;
use support::tunnel::{Stack, CONNECTION};
use support::{ApiServer, SERVICE_ACCOUNT};
use tokio_util::sync::CancellationToken;

const APP: &str = "66666666-0000-0000-0000-0000000000c1";
const APP_OID: &str = "c1000000-0000-0000-0000-0000000000c1";
const APP_SECRET: &str = "sp-secret-never-logged";

/// The seed's class (Key Vault Secrets Provider extension docs) with its placeholders filled
/// in, an alias'd certificate and a key added, and secretObjects to sync.
const CLASS: &str = r#"
# This is a SecretProviderClass example using service principal to access Keyvault
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: akvprovider-demo
spec:
  provider: azure
  secretObjects:
  - secretName: demo
    type: Opaque
    labels:
      app: demo
    data:
    - objectName: DemoSecret
      key: password
  - secretName: web-tls
    type: kubernetes.io/tls
    data:
    - objectName: tls
      key: tls.key
    - objectName: tls
      key: tls.crt
  parameters:
    usePodIdentity: "false"
    keyvaultName: contoso-kv
    cloudName:                           # Defaults to AzurePublicCloud
    objects:  |
      array:
        - |
          objectName: DemoSecret
          objectType: secret             # object types: secret, key or cert
          objectVersion: ""              # [OPTIONAL] object versions, default to latest if empty
        - |
          objectName: web
          objectType: cert
          objectAlias: tls
        - |
          objectName: signing
          objectType: key
    tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47                # The tenant ID of the Azure Key Vault instance
"#;

fn http_trusting(entra: &Entra, vault: &KeyVault) -> HttpClient {
    let roots = roots_from_pem(format!("{}{}", entra.ca_pem(), vault.ca_pem()).as_bytes())
        .expect("CA PEMs");
    let tls = client_config_with_roots(roots, &[]).expect("client TLS");
    HttpClient::new(tls, Duration::from_secs(5), Duration::from_secs(10))
}

fn credentials(entra: &Entra, http: &HttpClient, env: Environment) -> ChainCredentials {
    ChainCredentials {
        authority: Authority::new(Cloud::AzurePublicCloud, Some(&entra.authority_host()))
            .expect("authority"),
        tenant: Some(TENANT.into()),
        client_app_id: ARC_CLIENT_APP_ID.into(),
        only: None,
        interactive: false,
        http: http.clone(),
        config_dir: std::env::temp_dir().join("clusterconnect-test-unused"),
        prompt: Arc::new(StderrPrompt),
        env,
    }
}

fn service_principal_env() -> Environment {
    Environment {
        tenant_id: Some(TENANT.into()),
        client_id: Some(APP.into()),
        client_secret: Some(Secret::new(APP_SECRET)),
        ..Environment::default()
    }
}

async fn start() -> (Entra, KeyVault, KeyVaultClient) {
    let entra = Entra::start().await;
    entra.add_app_secret(APP, APP_SECRET, APP_OID);
    let vault = KeyVault::start(&entra).await;
    let http = http_trusting(&entra, &vault);
    let mut creds = credentials(&entra, &http, service_principal_env());
    creds.only = Some(SourceKind::Env);
    let client = KeyVaultClient::new(http, &vault.url(), Arc::new(creds))
        .expect("client")
        .with_retry_base(Duration::from_millis(50));
    (entra, vault, client)
}

fn object(kind: ObjectType, name: &str, version: Option<&str>) -> ObjectRef {
    ObjectRef {
        kind,
        name: name.into(),
        version: version.map(str::to_string),
    }
}

#[tokio::test]
async fn get_returns_secrets_by_version_keys_as_pem_and_certificates_as_key_and_chain() {
    let (entra, vault, client) = start().await;
    let v1 = vault.set_secret("example-secret", "NinaIsTheMole");
    let v2 = vault.set_secret("example-secret", "NinaIsStillTheMole");
    let v3 = vault.set_secret("example-secret", "third");

    let latest = client
        .fetch(
            &object(ObjectType::Secret, "example-secret", None),
            Format::Pem,
        )
        .await
        .unwrap();
    assert_eq!(latest.value.expose(), "third");
    assert_eq!(latest.version, v3);
    // The SDK's pattern: first without a token, the challenge, then with one.
    let requests = vault.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(!requests[0].had_token && requests[0].status == 401);
    assert!(requests[1].had_token && requests[1].status == 200);
    let token_requests = entra.token_requests();
    assert_eq!(token_requests.len(), 1);
    assert_eq!(token_requests[0].tenant, TENANT);
    assert_eq!(token_requests[0].scope, "https://vault.azure.net/.default");

    let first = client
        .fetch(
            &object(ObjectType::Secret, "example-secret", Some(&v1)),
            Format::Pem,
        )
        .await
        .unwrap();
    assert_eq!(first.value.expose(), "NinaIsTheMole");
    // Later requests carry the token straight away.
    assert_eq!(vault.requests().len(), 3);

    let versions = client.secret_versions("example-secret").await.unwrap();
    let listed: Vec<&str> = versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(listed, [v1.as_str(), v2.as_str(), v3.as_str()]);
    assert!(versions.iter().all(|v| v.enabled));

    let key_version = vault.create_rsa_key("signing");
    let key = client
        .fetch(&object(ObjectType::Key, "signing", None), Format::Pem)
        .await
        .unwrap();
    assert_eq!(key.version, key_version);
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(key.value.expose().as_bytes()).unwrap();
    assert_eq!(spki.as_ref(), KeyVault::rsa_key_spki().as_slice());

    let (cert_version, cert_pem, key_pem) = vault.create_certificate("web", "web.contoso.test");
    let cert = client
        .fetch(&object(ObjectType::Cert, "web", None), Format::Pem)
        .await
        .unwrap();
    assert_eq!(cert.version, cert_version);
    let pem = cert.value.expose();
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{}",
        &pem[..40]
    );
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(
        pem.contains(cert_pem.trim()),
        "the chain is the certificate"
    );
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let out_body: String = pem
        .lines()
        .take_while(|l| !l.starts_with("-----END PRIVATE KEY"))
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert_eq!(out_body, key_body, "the private key is the certificate's");
    let pfx = client
        .fetch(&object(ObjectType::Cert, "web", None), Format::Pfx)
        .await
        .unwrap();
    assert_eq!(pfx.content_type.as_deref(), Some("application/x-pkcs12"));
    assert!(!pfx.value.expose().contains("BEGIN"));
}

#[tokio::test]
async fn forbidden_missing_and_throttled_requests_say_what_to_do() {
    let (_entra, vault, client) = start().await;
    vault.set_secret("app-password", "hunter2-value");
    vault.create_rsa_key("signing");

    vault.deny("app-password");
    let err = client
        .fetch(
            &object(ObjectType::Secret, "app-password", None),
            Format::Pem,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("access denied") && err.contains("\"Key Vault Secrets User\""),
        "{err}"
    );
    assert!(
        err.contains("secret 'app-password'") && err.contains("127.0.0.1"),
        "{err}"
    );
    vault.deny("signing");
    let err = client
        .fetch(&object(ObjectType::Key, "signing", None), Format::Pem)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"Key Vault Crypto User\""), "{err}");
    vault.allow("app-password");

    let err = client
        .fetch(
            &object(ObjectType::Secret, "nope", Some("0123abcd")),
            Format::Pem,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("secret 'nope' version 0123abcd not found"),
        "{err}"
    );
    assert!(err.contains(&client.vault().to_string()), "{err}");

    // Two 429s with Retry-After: 1, then the answer.
    vault.throttle_next(2);
    let started = Instant::now();
    let value = client
        .fetch(
            &object(ObjectType::Secret, "app-password", None),
            Format::Pem,
        )
        .await
        .unwrap();
    assert_eq!(value.value.expose(), "hunter2-value");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After honoured"
    );
    let statuses: Vec<u16> = vault
        .requests()
        .iter()
        .rev()
        .take(3)
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 429, 429]);

    // Throttled past the attempt limit: an error, not an endless loop.
    vault.throttle_next(100);
    let err = client
        .fetch(
            &object(ObjectType::Secret, "app-password", None),
            Format::Pem,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 429") && err.contains("gave up after 4 attempts"),
        "{err}"
    );
    assert!(!err.contains("hunter2-value"));
}

#[tokio::test]
async fn the_arc_himds_flow_reads_one_challenge_file_for_many_requests() {
    let entra = Entra::start().await;
    let vault = KeyVault::start(&entra).await;
    let dir = tempfile::tempdir().unwrap();
    let himds = Himds::start(&entra, "d1000000-0000-0000-0000-0000000000d1", dir.path()).await;
    vault.set_secret("example-secret", "from-arc");
    vault.create_rsa_key("signing");
    vault.create_certificate("web", "web.test");
    let http = http_trusting(&entra, &vault);
    let env = Environment {
        identity_endpoint: Some(himds.identity_endpoint()),
        imds_endpoint: Some(himds.imds_endpoint()),
        himds_challenge_dir: dir.path().to_path_buf(),
        ..Environment::default()
    };
    let mut creds = credentials(&entra, &http, env);
    creds.only = Some(SourceKind::ManagedIdentity);
    let client = KeyVaultClient::new(http, &vault.url(), Arc::new(creds)).unwrap();
    for (kind, name) in [
        (ObjectType::Secret, "example-secret"),
        (ObjectType::Key, "signing"),
        (ObjectType::Cert, "web"),
        (ObjectType::Secret, "example-secret"),
    ] {
        client
            .fetch(&object(kind, name, None), Format::Pem)
            .await
            .unwrap();
    }
    assert_eq!(himds.challenges_issued(), 1);
    assert_eq!(himds.challenges_redeemed(), 1);
}

/// Everything the tracing subscriber writes, for asserting on log lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The namespace every sync here targets; the stand-in, like a real cluster, has only `default`
/// and `kube-system` until it is created.
const NAMESPACE: &str = "apps";

/// The shared stand-in apiserver with the `apps` namespace.
async fn cluster() -> ApiServer {
    let api = ApiServer::start().await;
    api.create_object(
        "/api/v1/namespaces",
        serde_json::json!({"metadata": {"name": NAMESPACE}}),
    );
    api
}

/// A kube-rs client from a kubeconfig file, as `secrets sync --kubeconfig` builds one.
async fn kube_client(kubeconfig: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The Secrets API of `apps`, as the tester's service account, through `api`'s own kubeconfig.
async fn secrets_api(api: &ApiServer, dir: &Path) -> kube::Api<KubeSecret> {
    let kubeconfig = api.write_kubeconfig(dir, &api.token());
    kube::Api::namespaced(kube_client(&kubeconfig).await, NAMESPACE)
}

/// The stored Secret `apps/<name>`, as the apiserver holds it.
fn stored(api: &ApiServer, name: &str) -> serde_json::Value {
    api.object(&format!("/api/v1/namespaces/{NAMESPACE}/secrets/{name}"))
        .unwrap_or_else(|| panic!("no Secret {NAMESPACE}/{name}"))
}

/// Puts a Secret in place as someone else would (`data` values in plain text).
fn put_secret(api: &ApiServer, name: &str, labels: serde_json::Value, data: &[(&str, &str)]) {
    let strings: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    api.create_object(
        &format!("/api/v1/namespaces/{NAMESPACE}/secrets"),
        serde_json::json!({"metadata": {"name": name, "labels": labels}, "stringData": strings}),
    );
}

/// Requests that could change a Secret (create, replace, patch, delete) the apiserver has seen.
fn secret_writes(api: &ApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| matches!(r.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE"))
        .filter(|r| r.path_and_query.contains("/secrets"))
        .count()
}

fn data(secret: &serde_json::Value, key: &str) -> String {
    use base64::Engine;
    let b64 = secret["data"][key].as_str().unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// Current-thread runtime: the capturing subscriber is set for this thread, and every task runs
/// on it.
#[tokio::test]
async fn sync_writes_secrets_and_files_and_rotation_updates_only_what_changed() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (_entra, vault, client) = start().await;
    let v1 = vault.set_secret("DemoSecret", "MyExampleSecret");
    let (cert_version, cert_pem, _) = vault.create_certificate("web", "web.contoso.test");
    vault.create_rsa_key("signing");
    let cluster = cluster().await;
    let kube_dir = tempfile::tempdir().unwrap();
    let api = secrets_api(&cluster, kube_dir.path()).await;
    let mount = tempfile::tempdir().unwrap();
    let class = ProviderClass::parse(CLASS).unwrap();
    let mut syncer = Syncer::new(
        client,
        class,
        Targets {
            mount_dir: Some(mount.path().to_path_buf()),
            secrets: Some(SecretTarget {
                api,
                namespace: "apps".into(),
                owner: cli_owner("apps", "test"),
            }),
        },
    );

    let report = syncer.pass().await.unwrap();
    assert_eq!(
        report.secrets,
        [
            ("demo".into(), Outcome::Created),
            ("web-tls".into(), Outcome::Created)
        ]
    );
    let demo = stored(&cluster, "demo");
    assert_eq!(data(&demo, "password"), "MyExampleSecret");
    assert_eq!(demo["type"], "Opaque");
    assert_eq!(
        demo["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "clusterconnect"
    );
    assert_eq!(demo["metadata"]["labels"]["app"], "demo");
    let versions: serde_json::Value = serde_json::from_str(
        demo["metadata"]["annotations"]["clusterconnect.io/object-versions"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(versions["DemoSecret"], v1.as_str());
    let tls = stored(&cluster, "web-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    assert_eq!(data(&tls, "tls.crt").trim(), cert_pem.trim());
    assert!(data(&tls, "tls.key").starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(!data(&tls, "tls.key").contains("CERTIFICATE"));
    let tls_versions = tls["metadata"]["annotations"]["clusterconnect.io/object-versions"]
        .as_str()
        .unwrap();
    assert!(tls_versions.contains(&cert_version), "{tls_versions}");

    // The mount: one private file per object, by alias or name.
    let file = |name: &str| mount.path().join(name);
    assert_eq!(
        std::fs::read_to_string(file("DemoSecret")).unwrap(),
        "MyExampleSecret"
    );
    assert!(std::fs::read_to_string(file("tls"))
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    assert!(std::fs::read_to_string(file("signing"))
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    #[cfg(unix)]
    for name in ["DemoSecret", "tls", "signing"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file(name)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }

    // A second pass with nothing new writes nothing.
    let writes = secret_writes(&cluster);
    assert_eq!(writes, 2, "one create per Secret");
    let report = syncer.pass().await.unwrap();
    assert!(report.rotated.is_empty() && report.files_written.is_empty());
    assert!(report.secrets.iter().all(|(_, o)| *o == Outcome::Unchanged));
    assert_eq!(secret_writes(&cluster), writes);
    assert_eq!(stored(&cluster, "demo"), demo, "resourceVersion and all");
    assert_eq!(stored(&cluster, "web-tls"), tls, "resourceVersion and all");

    // Rotation: a new version is picked up within one interval; the rest stays untouched.
    let tls_mtime = std::fs::metadata(file("tls")).unwrap().modified().unwrap();
    let signing_mtime = std::fs::metadata(file("signing"))
        .unwrap()
        .modified()
        .unwrap();
    let tls_rv = tls["metadata"]["resourceVersion"].clone();
    let demo_rv = demo["metadata"]["resourceVersion"].clone();
    let interval = Duration::from_millis(700);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let rotating = tokio::spawn(async move {
        rotation::run(&mut syncer, interval, stop).await;
        syncer
    });
    let v2 = vault.set_secret("DemoSecret", "RotatedSecretValue");
    let changed_at = Instant::now();
    loop {
        if std::fs::read_to_string(file("DemoSecret")).unwrap() == "RotatedSecretValue" {
            break;
        }
        assert!(
            changed_at.elapsed() < interval * 2 + Duration::from_secs(1),
            "no rotation within an interval"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The Secret is written in the same pass, right after the files.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let demo = stored(&cluster, "demo");
    assert_eq!(data(&demo, "password"), "RotatedSecretValue");
    assert_eq!(demo["metadata"]["labels"]["app"], "demo");
    assert_eq!(
        demo["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "clusterconnect"
    );
    assert_ne!(demo["metadata"]["resourceVersion"], demo_rv);
    assert!(
        demo["metadata"]["annotations"]["clusterconnect.io/object-versions"]
            .as_str()
            .unwrap()
            .contains(&v2)
    );
    assert_eq!(
        stored(&cluster, "web-tls")["metadata"]["resourceVersion"],
        tls_rv
    );
    assert_eq!(
        std::fs::metadata(file("tls")).unwrap().modified().unwrap(),
        tls_mtime
    );
    assert_eq!(
        std::fs::metadata(file("signing"))
            .unwrap()
            .modified()
            .unwrap(),
        signing_mtime
    );

    // Key Vault refusing for a while: the last good value stays and a warning says so.
    vault.deny("DemoSecret");
    vault.set_secret("DemoSecret", "NeverDeliveredValue");
    tokio::time::sleep(interval * 2).await;
    assert_eq!(
        std::fs::read_to_string(file("DemoSecret")).unwrap(),
        "RotatedSecretValue"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), rotating)
        .await
        .expect("rotation stops on shutdown")
        .unwrap();
    // One replace in all (the rotation); the refused fetch left the Secret as it was.
    assert_eq!(secret_writes(&cluster), writes + 1);
    assert_eq!(
        data(&stored(&cluster, "demo"), "password"),
        "RotatedSecretValue"
    );

    let logs = captured.text();
    assert!(
        logs.contains("object rotated") && logs.contains(&v2),
        "{logs}"
    );
    assert!(logs.contains("keeping the last good version"), "{logs}");
    for value in [
        "MyExampleSecret",
        "RotatedSecretValue",
        "NeverDeliveredValue",
        APP_SECRET,
        "PRIVATE KEY",
    ] {
        assert!(!logs.contains(value), "{value} in the logs:\n{logs}");
    }
}

#[tokio::test]
async fn an_existing_secret_not_managed_here_is_left_alone() {
    let (_entra, vault, client) = start().await;
    vault.set_secret("DemoSecret", "x");
    vault.create_certificate("web", "web.test");
    vault.create_rsa_key("signing");
    let cluster = cluster().await;
    put_secret(
        &cluster,
        "demo",
        serde_json::json!({"owner": "someone-else"}),
        &[("password", "theirs")],
    );
    let theirs = stored(&cluster, "demo");
    let kube_dir = tempfile::tempdir().unwrap();
    let api = secrets_api(&cluster, kube_dir.path()).await;
    let mut syncer = Syncer::new(
        client,
        ProviderClass::parse(CLASS).unwrap(),
        Targets {
            mount_dir: None,
            secrets: Some(SecretTarget {
                api,
                namespace: "apps".into(),
                owner: cli_owner("apps", "test"),
            }),
        },
    );
    let err = syncer.pass().await.unwrap_err().to_string();
    assert!(
        err.contains("apps/demo exists and is not managed by clusterconnect"),
        "{err}"
    );
    assert_eq!(data(&stored(&cluster, "demo"), "password"), "theirs");
    assert_eq!(stored(&cluster, "demo"), theirs, "resourceVersion and all");
    assert_eq!(secret_writes(&cluster), 0);
}

/// The binary: `secrets get --id` prints the value and only the value; `secrets sync` signs in
/// as the service principal of a credentials Secret. No value appears on stderr (JSON logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_gets_and_syncs_without_logging_values() {
    let entra = Entra::start().await;
    entra.add_app_secret(APP, APP_SECRET, APP_OID);
    let vault = KeyVault::start(&entra).await;
    let version = vault.set_secret("example-secret", "NinaIsTheMole");
    vault.create_certificate("web", "web.test");
    vault.create_rsa_key("signing");
    vault.set_secret("DemoSecret", "MyExampleSecret");
    let dir = tempfile::tempdir().unwrap();
    let bundle = vault.write_ca_bundle(&entra, dir.path());
    let host = entra.authority_host();
    let sp_env = [
        ("SSL_CERT_FILE", bundle.as_os_str()),
        ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
        ("AZURE_TENANT_ID", OsStr::new(TENANT)),
        ("AZURE_CLIENT_ID", OsStr::new(APP)),
        ("AZURE_CLIENT_SECRET", OsStr::new(APP_SECRET)),
    ];
    let id = format!("{}/secrets/example-secret/{version}", vault.url());
    let out = run_to_end(
        &[
            "--log-format",
            "json",
            "secrets",
            "get",
            "--id",
            &id,
            "--auth",
            "env",
        ],
        &sp_env,
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "NinaIsTheMole\n");
    assert!(
        !stderr.contains("NinaIsTheMole") && !stderr.contains(APP_SECRET),
        "{stderr}"
    );

    let key_id = format!("{}/keys/signing", vault.url());
    let out = run_to_end(
        &["secrets", "get", "--id", &key_id],
        &sp_env,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-----BEGIN PUBLIC KEY-----"));

    // A 404 is an error naming the object, exit status 1.
    let missing = format!("{}/secrets/nope", vault.url());
    let out = run_to_end(
        &["secrets", "get", "--id", &missing],
        &sp_env,
        Duration::from_secs(60),
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secret 'nope' not found"), "{stderr}");

    // sync with the credentials Secret, no Azure identity in the environment at all.
    let cluster = cluster().await;
    put_secret(
        &cluster,
        "secrets-store-creds",
        serde_json::json!({"secrets-store.csi.k8s.io/used": "true"}),
        &[("clientid", APP), ("clientsecret", APP_SECRET)],
    );
    let kubeconfig = cluster.write_kubeconfig(dir.path(), &cluster.token());
    let class = dir.path().join("spc.yaml");
    std::fs::write(&class, CLASS).unwrap();
    let mount = dir.path().join("secrets-store");
    let trust_only = [
        ("SSL_CERT_FILE", bundle.as_os_str()),
        ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
    ];
    let vault_url = vault.url();
    let out = run_to_end(
        &[
            OsStr::new("--log-format"),
            OsStr::new("json"),
            OsStr::new("secrets"),
            OsStr::new("sync"),
            OsStr::new("-f"),
            class.as_os_str(),
            OsStr::new("--vault-url"),
            OsStr::new(&vault_url),
            OsStr::new("--kubeconfig"),
            kubeconfig.as_os_str(),
            OsStr::new("--namespace"),
            OsStr::new("apps"),
            OsStr::new("--credentials-secret"),
            OsStr::new("secrets-store-creds"),
            OsStr::new("--mount-dir"),
            mount.as_os_str(),
        ],
        &trust_only,
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        data(&stored(&cluster, "demo"), "password"),
        "MyExampleSecret"
    );
    assert_eq!(
        std::fs::read_to_string(mount.join("DemoSecret")).unwrap(),
        "MyExampleSecret"
    );
    for line in stderr.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(parsed.is_object());
    }
    assert!(stderr.contains("\"synced\""), "{stderr}");
    for value in ["MyExampleSecret", APP_SECRET, "PRIVATE KEY"] {
        assert!(!stderr.contains(value), "{value} on stderr:\n{stderr}");
    }
}

/// `secrets sync` into a cluster through the tunnel: the binary gets nothing but the kubeconfig
/// the proxy wrote and its context, so reading the credentials Secret and writing the synced
/// ones all cross proxy -> relay -> agent -> apiserver. A second run with nothing rotated
/// writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_through_the_tunnel_with_the_proxys_kubeconfig_context() {
    let entra = Entra::start().await;
    entra.add_app_secret(APP, APP_SECRET, APP_OID);
    let vault = KeyVault::start(&entra).await;
    let version = vault.set_secret("DemoSecret", "ThroughTheTunnel");
    let (cert_version, cert_pem, _) = vault.create_certificate("web", "web.test");
    vault.create_rsa_key("signing");

    let stack = Stack::start().await;
    let cluster = &stack.api;
    cluster.create_object(
        "/api/v1/namespaces",
        serde_json::json!({"metadata": {"name": NAMESPACE}}),
    );
    put_secret(
        cluster,
        "secrets-store-creds",
        serde_json::json!({"secrets-store.csi.k8s.io/used": "true"}),
        &[("clientid", APP), ("clientsecret", APP_SECRET)],
    );
    // The proxy's kubeconfig names the proxy, never the apiserver.
    let kubeconfig = &stack.proxy.kubeconfig;
    let parsed = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let servers: Vec<String> = parsed
        .clusters
        .iter()
        .filter_map(|c| c.cluster.as_ref()?.server.clone())
        .collect();
    let proxy = format!("https://127.0.0.1:{}/", stack.proxy.addr.port());
    assert!(
        !servers.is_empty() && servers.iter().all(|s| s.starts_with(&proxy)),
        "{servers:?}"
    );
    assert_eq!(parsed.current_context.as_deref(), Some(CONNECTION));

    let dir = tempfile::tempdir().unwrap();
    let bundle = vault.write_ca_bundle(&entra, dir.path());
    let host = entra.authority_host();
    let class = dir.path().join("spc.yaml");
    std::fs::write(&class, CLASS).unwrap();
    let vault_url = vault.url();
    let args = [
        OsStr::new("--log-format"),
        OsStr::new("json"),
        OsStr::new("secrets"),
        OsStr::new("sync"),
        OsStr::new("-f"),
        class.as_os_str(),
        OsStr::new("--vault-url"),
        OsStr::new(&vault_url),
        OsStr::new("--kubeconfig"),
        kubeconfig.as_os_str(),
        OsStr::new("--context"),
        OsStr::new(CONNECTION),
        OsStr::new("--namespace"),
        OsStr::new(NAMESPACE),
        OsStr::new("--credentials-secret"),
        OsStr::new("secrets-store-creds"),
    ];
    let trust_only = [
        ("SSL_CERT_FILE", bundle.as_os_str()),
        ("AZURE_AUTHORITY_HOST", OsStr::new(&host)),
    ];
    let rendezvous = stack.relay.stats.total();
    let seen = cluster.requests().len();
    let out = run_to_end(&args, &trust_only, Duration::from_secs(60)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for value in ["ThroughTheTunnel", APP_SECRET, "PRIVATE KEY"] {
        assert!(!stderr.contains(value), "{value} on stderr:\n{stderr}");
    }

    let demo = stored(cluster, "demo");
    assert_eq!(data(&demo, "password"), "ThroughTheTunnel");
    assert_eq!(demo["type"], "Opaque");
    assert_eq!(demo["metadata"]["labels"]["app"], "demo");
    assert_eq!(
        demo["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "clusterconnect"
    );
    let versions: serde_json::Value = serde_json::from_str(
        demo["metadata"]["annotations"]["clusterconnect.io/object-versions"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(versions["DemoSecret"], version.as_str());
    let tls = stored(cluster, "web-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    assert_eq!(data(&tls, "tls.crt").trim(), cert_pem.trim());
    assert!(data(&tls, "tls.key").starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(
        tls["metadata"]["annotations"]["clusterconnect.io/object-versions"]
            .as_str()
            .unwrap()
            .contains(&cert_version)
    );

    // Every request came over the relay, as the proxy's credential (the tester's token).
    assert!(stack.relay.stats.total() > rendezvous, "no rendezvous");
    let requests: Vec<_> = cluster.requests().into_iter().skip(seen).collect();
    let calls: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    let secrets = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
    for wanted in [
        format!("GET {secrets}/secrets-store-creds"),
        format!("GET {secrets}/demo"),
        format!("POST {secrets}?"),
        format!("GET {secrets}/web-tls"),
    ] {
        assert!(
            calls.iter().any(|c| c.starts_with(&wanted)),
            "{wanted} in {calls:?}"
        );
    }
    assert!(
        requests
            .iter()
            .all(|r| r.user.as_deref() == Some(SERVICE_ACCOUNT)),
        "{calls:?}"
    );

    // Nothing rotated: the second run reads through the tunnel and writes nothing.
    let writes = secret_writes(cluster);
    let out = run_to_end(&args, &trust_only, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(secret_writes(cluster), writes);
    assert_eq!(stored(cluster, "demo"), demo, "resourceVersion and all");
    assert_eq!(stored(cluster, "web-tls"), tls, "resourceVersion and all");
}

/// A vault in a custom cloud: the cloud file (through CLUSTERCONNECT_CLOUD_CONFIG) names the
/// authority and Key Vault's DNS suffix, whose resource the vault's challenge asks for. Without
/// it, the same challenge from a loopback vault is refused: that resource is no known cloud's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_clouds_key_vault_resource_comes_from_its_cloud_file() {
    let entra = Entra::start().await;
    entra.add_app_secret(APP, APP_SECRET, APP_OID);
    let vault = KeyVault::start_in_cloud(&entra, "https://vault.contoso.test").await;
    vault.set_secret("example-secret", "FromContoso");
    let dir = tempfile::tempdir().unwrap();
    let bundle = vault.write_ca_bundle(&entra, dir.path());
    let host = entra.authority_host();
    let cloud = dir.path().join("contoso.json");
    std::fs::write(
        &cloud,
        serde_json::json!({
            "name": "Contoso",
            "endpoints": {
                "activeDirectory": host,
                "resourceManager": "https://management.contoso.test/",
                "microsoftGraphResourceId": "https://graph.contoso.test/",
            },
            "suffixes": {"keyvaultDns": ".vault.contoso.test"},
        })
        .to_string(),
    )
    .unwrap();
    let sp = [
        ("SSL_CERT_FILE", bundle.as_os_str()),
        ("AZURE_TENANT_ID", OsStr::new(TENANT)),
        ("AZURE_CLIENT_ID", OsStr::new(APP)),
        ("AZURE_CLIENT_SECRET", OsStr::new(APP_SECRET)),
    ];
    let id = format!("{}/secrets/example-secret", vault.url());
    let args = ["secrets", "get", "--id", &id, "--auth", "env"];
    let mut in_cloud = sp.to_vec();
    in_cloud.push(("CLUSTERCONNECT_CLOUD_CONFIG", cloud.as_os_str()));
    let out = run_to_end(&args, &in_cloud, Duration::from_secs(60)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "FromContoso\n");
    let scopes: Vec<String> = entra
        .token_requests()
        .into_iter()
        .map(|r| r.scope)
        .collect();
    assert_eq!(scopes, ["https://vault.contoso.test/.default"]);

    let mut public = sp.to_vec();
    public.push(("AZURE_AUTHORITY_HOST", OsStr::new(&host)));
    let out = run_to_end(&args, &public, Duration::from_secs(60)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refusing to send a token there"),
        "{stderr}"
    );
    assert_eq!(
        entra.token_requests().len(),
        1,
        "no token for a foreign resource"
    );
}

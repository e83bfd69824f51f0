//! Clouds and managed identity endpoints beyond the public cloud's defaults: a custom cloud file
//! that sends the agent's group-overage lookups to a Graph stand-in, and App Service's managed
//! identity over plain HTTP and over https trusted through the environment's CA bundle.

use crate::support;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use clusterconnect::entra::chain::{self, ChainOptions, Environment, SourceKind};
use clusterconnect::entra::device_code::StderrPrompt;
use clusterconnect::entra::http::HttpClient;
use clusterconnect::entra::{Authority, Cloud, ARC_CLIENT_APP_ID, ARC_SERVER_APP_ID};
use clusterconnect::secret::Secret;
use clusterconnect::tunnel::http::error_chain;
use support::entra::{Entra, TENANT};
use support::imds::AppService;
use support::processes::{start_agent_with, start_proxy, start_relay};
use support::tunnel::CONNECTION;
use support::{kubectl_available, kubectl_ok, ApiServer};

const HOUR: Duration = Duration::from_secs(3600);

/// Managed identity only, against the Entra stand-in, with nothing else configured.
fn managed_identity_only(entra: &Entra, dir: &std::path::Path) -> (ChainOptions, Environment) {
    let http = HttpClient::new(
        entra.client_tls(),
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    let opts = ChainOptions {
        authority: Authority::new(Cloud::AzurePublicCloud, Some(&entra.authority_host()))
            .expect("authority"),
        tenant: Some(TENANT.into()),
        server_app_id: ARC_SERVER_APP_ID.into(),
        client_app_id: ARC_CLIENT_APP_ID.into(),
        only: Some(SourceKind::ManagedIdentity),
        interactive: false,
        http,
        config_dir: dir.to_path_buf(),
        prompt: Arc::new(StderrPrompt),
        pop: None,
    };
    let env = Environment {
        himds_challenge_dir: dir.join("no-himds"),
        path: Some(dir.join("no-bin").into_os_string()),
        imds_base: Some("http://127.0.0.1:9".into()),
        ..Environment::default()
    };
    (opts, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_service_managed_identity_over_http_and_over_https_trusting_the_environments_bundle() {
    let entra = Entra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let oid = "e0000000-0000-0000-0000-00000000e005";
    let client_id = "55555555-0000-0000-0000-00000000e005";
    let (opts, mut env) = managed_identity_only(&entra, dir.path());

    let plain = AppService::start(&entra, oid, client_id, false).await;
    env.identity_endpoint = Some(plain.identity_endpoint());
    env.identity_header = Some(Secret::new(plain.identity_header()));
    // Arc's variable as well: App Service's pair comes first, as in azure-identity.
    env.imds_endpoint = Some("http://127.0.0.1:9".into());
    env.client_id = Some(client_id.into());
    let credential = chain::credential(&opts, &env)
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let token = credential.token().await.unwrap();
    let claims = entra
        .verify_access_token(token.expose(), &[ARC_SERVER_APP_ID])
        .expect("a token for the server app");
    assert_eq!(claims["oid"], oid);
    assert_eq!(plain.requests(), 1);

    // The wrong IDENTITY_HEADER: App Service's refusal, named.
    env.identity_header = Some(Secret::new("not-the-header"));
    let err = error_chain(&chain::credential(&opts, &env).await.err().unwrap());
    assert!(
        err.contains("App Service managed identity") && err.contains("X-IDENTITY-HEADER"),
        "{err}"
    );
    assert!(!err.contains("not-the-header"), "{err}");

    // Over https with its own CA: trusted only once the environment's bundle names it.
    let tls = AppService::start(&entra, oid, client_id, true).await;
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, tls.ca_pem().unwrap()).unwrap();
    env.identity_endpoint = Some(tls.identity_endpoint());
    env.identity_header = Some(Secret::new(tls.identity_header()));
    let err = error_chain(&chain::credential(&opts, &env).await.err().unwrap());
    assert!(err.contains("not reachable"), "{err}");
    env.ca_bundle = Some(bundle);
    let credential = chain::credential(&opts, &env)
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let token = credential.token().await.unwrap();
    assert!(entra
        .verify_access_token(token.expose(), &[ARC_SERVER_APP_ID])
        .is_ok());
    assert_eq!(tls.requests(), 1);

    // Service Fabric's three variables: not supported, and said so.
    env.identity_server_thumbprint = Some("ABCDEF".into());
    let err = error_chain(&chain::credential(&opts, &env).await.err().unwrap());
    assert!(err.contains("Service Fabric"), "{err}");
}

/// The agent binary in a cloud of its own (a file in `az cloud register --cloud-config`'s
/// shape, no AZURE_AUTHORITY_HOST): Entra and Microsoft Graph are stand-ins on 127.0.0.1, and a
/// user in 250 groups is authorized through the Graph the file names, with a token for that
/// Graph's resource id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_cloud_file_sends_the_agents_group_overage_lookups_to_its_graph() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let entra = Entra::start().await;
    let api = ApiServer::start().await;
    let relay = start_relay(dir.path()).await;
    let ca = entra.write_ca(dir.path());
    let host = entra.authority_host();
    // Graph at the stand-in's address, accepting tokens for that address only.
    entra.set_graph_resource(&host);
    let cloud = dir.path().join("contoso-cloud.json");
    std::fs::write(
        &cloud,
        serde_json::json!({
            "name": "ContosoStack",
            "endpoints": {
                "activeDirectory": host,
                "activeDirectoryResourceId": "https://management.contoso.test/",
                "resourceManager": "https://management.contoso.test/",
                "microsoftGraphResourceId": format!("{host}/"),
            },
            "suffixes": {"keyvaultDns": ".vault.contoso.test"},
        })
        .to_string(),
    )
    .unwrap();
    let agent_app = (
        "77777777-0000-0000-0000-0000000000f7",
        "f7000000-0000-0000-0000-0000000000f7",
    );
    entra.add_app_secret(agent_app.0, "agent-graph-secret", agent_app.1);

    let agent_kubeconfig = api.write_kubeconfig(dir.path(), &api.agent_token());
    let agent = start_agent_with(
        &relay,
        &agent_kubeconfig,
        CONNECTION,
        &[
            OsStr::new("--tenant"),
            OsStr::new(TENANT),
            OsStr::new("--cloud"),
            OsStr::new("ContosoStack"),
            OsStr::new("--cloud-config"),
            cloud.as_os_str(),
        ],
        &[
            ("SSL_CERT_FILE", ca.as_os_str()),
            ("AZURE_TENANT_ID", OsStr::new(TENANT)),
            ("AZURE_CLIENT_ID", OsStr::new(agent_app.0)),
            ("AZURE_CLIENT_SECRET", OsStr::new("agent-graph-secret")),
        ],
    )
    .await;

    let oid = "77777777-aaaa-bbbb-cccc-0000000000f7";
    let groups: Vec<String> = (0..250).map(|i| format!("contoso-{i:03}")).collect();
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    entra.add_user("many@contoso.test", oid, &groups);
    let claims = entra.user_claims(
        "many@contoso.test",
        oid,
        &group_refs,
        ARC_SERVER_APP_ID,
        HOUR,
    );
    assert!(claims.get("groups").is_none(), "an overage token: {claims}");
    let kubeconfig = dir.path().join("kubeconfig");
    let (proxy, _) = start_proxy(
        &relay,
        CONNECTION,
        &entra.sign(&claims),
        &kubeconfig,
        &dir.path().join("proxy-config"),
    )
    .await;

    let (user, seen, _) = crate::entra_auth::whoami(&kubeconfig, CONNECTION).await;
    assert_eq!(user, "many@contoso.test");
    assert!(
        seen.iter().any(|g| g == "contoso-249"),
        "{seen:?}\nagent:\n{}",
        agent.output()
    );
    api.grant_cluster_admin("Group", "contoso-249");
    kubectl_ok(&kubeconfig, &["get", "pods"]).await;
    assert_eq!(entra.graph_calls(), 1);
    let scopes: Vec<String> = entra
        .token_requests()
        .into_iter()
        .filter(|r| r.client_id == agent_app.0)
        .map(|r| r.scope)
        .collect();
    assert!(
        !scopes.is_empty() && scopes.iter().all(|s| *s == format!("{host}/.default")),
        "{scopes:?}"
    );
    let logs = format!("{}{}", agent.output(), proxy.output());
    assert!(!logs.contains("agent-graph-secret"), "a secret in a log");
}

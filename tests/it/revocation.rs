//! Revocation that revokes: a withdrawn role, a removed registration and a renewed key close,
//! within seconds, the listeners and tunnels they authorized, and nothing else.

use crate::registry::{agent_keys, client, id, request, validator, HOUR, RELAY_AUDIENCE};
use crate::support;

use std::time::{Duration, Instant};

use clusterconnect::arm::client::{ManagementAuth, ManagementClient};
use clusterconnect::arm::ClusterId;
use clusterconnect::secret::Secret;
use clusterconnect::tunnel::dial::{dial, DialError, RelayStream};
use clusterconnect::tunnel::protocol::Action;
use clusterconnect::tunnel::sas::SasKey;
use futures_util::StreamExt;

use support::check::eventually;
use support::entra::Entra;
use support::tunnel::{admin_key, static_token, Agent, Relay};
use support::ApiServer;

/// What "within seconds" means here: revocation is pushed, not polled, so it is much faster.
const WITHIN: Duration = Duration::from_secs(5);

/// Opens a tunnel to `connection` with `token`, retrying while no listener is there yet.
async fn open(relay: &Relay, connection: &str, token: &str) -> RelayStream {
    let mut last = None;
    for _ in 0..200 {
        match try_open(relay, connection, token).await {
            Ok(stream) => return stream,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no tunnel to {connection}: {last:?}");
}

async fn try_open(relay: &Relay, connection: &str, token: &str) -> Result<RelayStream, DialError> {
    let url = relay.address().url(connection, Action::Connect, "t");
    dial(&url, Some(&Secret::new(token)), &relay.client_tls).await
}

/// Whether the relay ends `stream` within `within` (a close, an error or the end).
async fn ends_within(stream: &mut RelayStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_))) => return true,
            Ok(Some(Ok(msg))) if msg.is_close() => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn registered(
    relay: &Relay,
    by: &ManagementClient,
    name: &str,
    api: &ApiServer,
) -> (ClusterId, String, Agent) {
    let (_, public) = agent_keys();
    by.put(&id(name), &request(&public))
        .await
        .expect("register");
    let credential = by.list_agent_credential(&id(name)).await.unwrap();
    let key = SasKey::parse(&credential.listen_key).unwrap();
    let agent = Agent::start_for(relay, api, key, &credential.hybrid_connection_name).await;
    (id(name), credential.hybrid_connection_name, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_a_role_closes_that_users_tunnels_at_once_and_no_one_elses() {
    let entra = Entra::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_registry(
        &dir.path().join("registry.redb"),
        Some(validator(&entra, RELAY_AUDIENCE)),
    )
    .await;
    let user = |upn: &str, oid: &str| {
        let token = entra.sign(&entra.user_claims(upn, oid, &[], RELAY_AUDIENCE, HOUR));
        client(&relay, ManagementAuth::Entra(static_token(&token)))
    };
    let (owner_oid, u_oid, v_oid) = (
        "aaaaaaaa-0000-4000-8000-00000000000a",
        "aaaaaaaa-0000-4000-8000-00000000000b",
        "aaaaaaaa-0000-4000-8000-00000000000c",
    );
    let owner = user("owner@contoso.com", owner_oid);
    let (u, v) = (user("u@contoso.com", u_oid), user("v@contoso.com", v_oid));
    let api = ApiServer::start().await;
    let (prod, connection, _agent) = registered(&relay, &owner, "prod", &api).await;
    let u_role = owner.grant_user(&prod, u_oid).await.unwrap();
    owner.grant_user(&prod, v_oid).await.unwrap();
    let u_token = u.list_user_credential(&prod).await.unwrap().token;
    let v_token = v.list_user_credential(&prod).await.unwrap().token;

    let mut u_tunnel = open(&relay, &connection, &u_token).await;
    let mut v_tunnel = open(&relay, &connection, &v_token).await;
    eventually("both tunnels are open", || relay.stats.open() == 2).await;

    owner.revoke(&prod, &u_role).await.unwrap();
    assert!(
        ends_within(&mut u_tunnel, WITHIN).await,
        "the tunnel of a user whose role was withdrawn stayed open"
    );
    // The other user's tunnel is untouched, and their token still opens new ones.
    assert!(!ends_within(&mut v_tunnel, Duration::from_millis(500)).await);
    assert_eq!(relay.stats.open(), 1);
    let refused = try_open(&relay, &connection, &u_token).await.unwrap_err();
    assert!(
        refused.is_auth(),
        "a withdrawn user's token still opens tunnels: {refused}"
    );
    let _again = try_open(&relay, &connection, &v_token)
        .await
        .expect("v still connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_registration_closes_its_listeners_and_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_registry(&dir.path().join("registry.redb"), None).await;
    let admin = client(&relay, ManagementAuth::Key(admin_key()));
    let api = ApiServer::start().await;
    let (prod, connection, _agent) = registered(&relay, &admin, "prod", &api).await;
    let (staging, other_connection, _other_agent) =
        registered(&relay, &admin, "staging", &api).await;
    let token = admin.list_user_credential(&prod).await.unwrap().token;
    let other_token = admin.list_user_credential(&staging).await.unwrap().token;
    let mut tunnel = open(&relay, &connection, &token).await;
    let mut other_tunnel = open(&relay, &other_connection, &other_token).await;
    eventually("both agents listen", || relay.stats.listeners() == 4).await;

    assert!(admin.delete(&prod).await.unwrap());
    assert!(
        ends_within(&mut tunnel, WITHIN).await,
        "a removed cluster's tunnel stayed open"
    );
    eventually("the removed cluster's listeners are closed", || {
        relay.stats.listeners() == 2
    })
    .await;
    // Its agent cannot come back with the old key; the other cluster is untouched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.stats.listeners(), 2);
    assert!(!ends_within(&mut other_tunnel, Duration::from_millis(100)).await);
    let refused = try_open(&relay, &connection, &token).await.unwrap_err();
    assert!(refused.is_auth(), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_a_key_closes_only_what_that_key_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_registry(&dir.path().join("registry.redb"), None).await;
    let admin = client(&relay, ManagementAuth::Key(admin_key()));
    let api = ApiServer::start().await;
    // The agent the installer set up holds the primary key.
    let (prod, connection, _primary_agent) = registered(&relay, &admin, "prod", &api).await;
    let keys = admin.list_keys(&prod).await.unwrap();
    assert_ne!(keys.primary_key, keys.secondary_key);
    let token = admin.list_user_credential(&prod).await.unwrap().token;
    let mut via_primary = open(&relay, &connection, &token).await;
    eventually("the agent listens", || relay.stats.listeners() == 2).await;

    // Renewing the key nobody uses closes nothing.
    let renewed = admin.regenerate_keys(&prod, "SecondaryKey").await.unwrap();
    assert_eq!(renewed.primary_key, keys.primary_key);
    assert_ne!(renewed.secondary_key, keys.secondary_key);
    assert!(!ends_within(&mut via_primary, Duration::from_millis(500)).await);
    assert_eq!(relay.stats.listeners(), 2);

    // A second agent moves to the new secondary key; then the primary is renewed: the first
    // agent's listeners and the tunnel it accepted close, the second agent carries on.
    let secondary = SasKey::parse(&renewed.secondary_connection_string).unwrap();
    let _secondary_agent = Agent::start_for(&relay, &api, secondary, &connection).await;
    eventually("both agents listen", || relay.stats.listeners() == 4).await;
    let renewed = admin.regenerate_keys(&prod, "PrimaryKey").await.unwrap();
    assert_ne!(renewed.primary_key, keys.primary_key);
    assert!(
        ends_within(&mut via_primary, WITHIN).await,
        "a tunnel accepted under a renewed key stayed open"
    );
    eventually("only the secondary key's listeners remain", || {
        relay.stats.listeners() == 2
    })
    .await;
    let mut via_secondary = open(&relay, &connection, &token).await;

    // Renewing the Send key ends every tunnel its tokens opened; a fresh token works.
    admin.regenerate_keys(&prod, "SendKey").await.unwrap();
    assert!(
        ends_within(&mut via_secondary, WITHIN).await,
        "a tunnel opened with a token of a renewed Send key stayed open"
    );
    let refused = try_open(&relay, &connection, &token).await.unwrap_err();
    assert!(refused.is_auth(), "{refused}");
    let fresh = admin.list_user_credential(&prod).await.unwrap().token;
    let _works = open(&relay, &connection, &fresh).await;
    let bad = admin
        .regenerate_keys(&prod, "TertiaryKey")
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(400), "{bad}");
}

/// A listener's control channel on the relay process at `relay`, with a token from `key`.
async fn listen_with(
    relay: &support::processes::RelayProcess,
    key: &SasKey,
) -> Result<RelayStream, DialError> {
    let address = clusterconnect::tunnel::protocol::RelayAddress::parse(&relay.url).unwrap();
    let token = key.mint(&address.resource_uri("c1"), Duration::from_secs(600));
    let url = address.url("c1", Action::Listen, "l");
    let tls = clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).unwrap();
    dial(&url, Some(&token), &tls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_rekeyed_in_the_config_file_revokes_on_sighup_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::processes::start_relay(dir.path()).await;
    let old = SasKey::from_file(&relay.listen_key).unwrap();
    let mut listener = listen_with(&relay, &old).await.expect("listen");

    // A file that does not load: the rules in force stay, and so does the listener.
    std::fs::write(dir.path().join("relay.toml"), "[[rules]\nname =").unwrap();
    relay.process.hang_up();
    relay
        .process
        .wait_for_log(WITHIN, "rules not reloaded; the current ones stay")
        .await
        .expect("the broken file is reported");
    assert!(!ends_within(&mut listener, Duration::from_millis(300)).await);

    // The listen rule gets a new key file: the listener the old key authorized is closed, the
    // old key is refused and the new one listens.
    let new_key =
        "SharedAccessKeyName=listen;SharedAccessKey=bmV3LWtleS1mb3ItdGhlLWxpc3Rlbi1ydWxlLTAx";
    std::fs::write(dir.path().join("listen-new.key"), new_key).unwrap();
    let toml = support::processes::RELAY_TOML.replace("listen.key", "listen-new.key");
    std::fs::write(dir.path().join("relay.toml"), toml).unwrap();
    relay.process.hang_up();
    assert!(
        ends_within(&mut listener, WITHIN).await,
        "a listener authorized by a key removed from the config stayed open"
    );
    let refused = listen_with(&relay, &old).await.unwrap_err();
    assert!(refused.is_auth(), "{refused}");
    let _listening = listen_with(&relay, &SasKey::parse(new_key).unwrap())
        .await
        .expect("the new key listens");
}

//! `clusterconnect up`: the real binary against the stand-in apiserver's kubeconfig, and the
//! real kubectl through the context it writes, with the context's own token and as a session
//! service account that is removed when `up` stops.

use crate::support;

use std::ffi::OsStr;
use std::time::Duration;

use support::check::PROMPT;
use support::processes::{run_to_end, spawn, Process};
use support::{kubectl_available, kubectl_ok, ApiServer};

const ACCOUNT: &str = "/api/v1/namespaces/default/serviceaccounts/clusterconnect-up";
const BINDING: &str =
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/clusterconnect-up-view-binding";

/// `clusterconnect up --kubeconfig K --port 0 EXTRA...`, once it printed its ready line.
async fn start_up(kubeconfig: &std::path::Path, extra: &[&str]) -> (Process, String) {
    let mut args = vec![
        OsStr::new("up"),
        OsStr::new("--kubeconfig"),
        kubeconfig.as_os_str(),
        OsStr::new("--port"),
        OsStr::new("0"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let up = spawn(&args, &[]);
    let out = up
        .wait_for_output(PROMPT, "ready: kubectl")
        .await
        .unwrap_or_else(|out| panic!("up did not get ready:\n{out}"));
    (up, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_tunnels_kubectl_with_the_contexts_own_token() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.token());
    let (mut up, out) = start_up(&kubeconfig, &[]).await;
    assert!(
        out.contains("--context clusterconnect-standin get pods -A"),
        "{out}"
    );
    let before = api.requests().len();
    let pods = kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    assert!(pods.contains("web-0"), "{pods}");
    // Through the tunnel, as the context's own user; the user's current context is unchanged.
    let seen = api.requests();
    let through: Vec<_> = seen[before..]
        .iter()
        .filter(|r| r.path_and_query.contains("/pods"))
        .collect();
    assert!(!through.is_empty());
    let bearer = format!("Bearer {}", api.token());
    assert!(
        through.iter().all(|r| r
            .headers
            .get("authorization")
            .is_some_and(|v| v == bearer.as_str())),
        "not the context's own token: {through:?}"
    );
    let current = kubectl_ok(&kubeconfig, &["config", "current-context"]).await;
    assert_eq!(current.trim(), "standin");
    up.terminate();
    assert!(
        up.wait(PROMPT).await.is_some(),
        "up did not stop on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_as_a_session_service_account_removes_it_on_exit() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.token());
    let (mut up, out) = start_up(&kubeconfig, &["--service-account"]).await;
    assert!(out.contains("--context clusterconnect-standin"), "{out}");
    up.wait_for_output(
        PROMPT,
        "as service account default/clusterconnect-up with cluster role view",
    )
    .await
    .unwrap_or_else(|out| panic!("up did not say who kubectl is:\n{out}"));
    assert!(api.object(ACCOUNT).is_some() && api.object(BINDING).is_some());
    let before = api.requests().len();
    let pods = kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    assert!(pods.contains("web-0"), "{pods}");
    let users: Vec<_> = api.requests()[before..]
        .iter()
        .filter(|r| r.path_and_query.contains("/pods"))
        .map(|r| r.user.clone())
        .collect();
    assert!(
        users
            .iter()
            .all(|u| u.as_deref() == Some("system:serviceaccount:default:clusterconnect-up")),
        "{users:?}"
    );
    up.terminate();
    assert!(
        up.wait(PROMPT).await.is_some(),
        "up did not stop on SIGTERM"
    );
    assert!(api.object(ACCOUNT).is_none(), "the session account stayed");
    assert!(api.object(BINDING).is_none(), "the session binding stayed");
}

/// A kubeconfig whose user signs in with an exec plugin (a script printing an ExecCredential
/// with `token`, and refusing to run without kubectl's `KUBERNETES_EXEC_INFO`).
pub(crate) fn exec_plugin_kubeconfig(
    api: &ApiServer,
    dir: &std::path::Path,
    token: &str,
) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let plugin = dir.join("credential-plugin");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\n[ -n \"$KUBERNETES_EXEC_INFO\" ] || {{ echo 'no KUBERNETES_EXEC_INFO' >&2; exit 1; }}\n[ \"$PLUGIN_MODE\" = test ] || exit 2\nprintf '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exec = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      env:\n      - name: PLUGIN_MODE\n        value: test\n      interactiveMode: Never\n",
        plugin.display()
    );
    let yaml = api
        .kubeconfig_yaml(token)
        .replace(&format!("    token: {token}\n"), &exec);
    let path = dir.join("kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_presents_the_token_of_the_contexts_exec_plugin() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = exec_plugin_kubeconfig(&api, dir.path(), &api.token());
    let (mut up, _) = start_up(&kubeconfig, &[]).await;
    let before = api.requests().len();
    let pods = kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    assert!(pods.contains("web-0"), "{pods}");
    let bearer = format!("Bearer {}", api.token());
    let through: Vec<_> = api.requests()[before..]
        .iter()
        .filter(|r| r.path_and_query.contains("/pods"))
        .map(|r| r.headers.get("authorization") == Some(&bearer.parse().unwrap()))
        .collect();
    assert!(!through.is_empty() && through.iter().all(|ok| *ok));
    assert!(
        api.object(ACCOUNT).is_none(),
        "an exec plugin's token is presented as it is, no service account needed"
    );
    up.terminate();
    assert!(
        up.wait(PROMPT).await.is_some(),
        "up did not stop on SIGTERM"
    );
}

#[tokio::test]
async fn up_without_a_kubeconfig_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kubeconfig");
    let out = run_to_end(
        &[
            OsStr::new("up"),
            OsStr::new("--kubeconfig"),
            missing.as_os_str(),
        ],
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs a kubeconfig context that reaches a cluster"),
        "{stderr}"
    );
}

/// The registry `up` runs lives in its state directory: the cluster is registered there
/// (reporting Connected while `up` runs, with `list` working against it as printed), and a
/// second run reuses the directory's CA, admin key and registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_keeps_its_registry_in_the_state_directory() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.token());
    let state = dir.path().join("state");
    let state_arg = state.display().to_string();
    let list_command = |out: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.starts_with("registry: clusterconnect list"))
            .unwrap_or_else(|| panic!("up printed no registry command:\n{out}"));
        line["registry: clusterconnect ".len()..]
            .split_whitespace()
            .map(|w| w.replace("table", "json"))
            .collect()
    };

    let (mut up, _) = start_up(&kubeconfig, &["--state-dir", &state_arg]).await;
    let pods = kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    assert!(pods.contains("web-0"), "{pods}");
    let command = list_command(&up.output());
    let mut listed = serde_json::Value::Null;
    for _ in 0..100 {
        let out = run_to_end(&command, &[], PROMPT).await;
        assert!(out.status.success(), "{}", support::check::describe(&out));
        listed = serde_json::from_slice(&out.stdout).expect("list prints JSON");
        if listed[0]["connectivityStatus"] == "Connected" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed[0]["name"], "clusterconnect-standin", "{listed}");
    assert_eq!(listed[0]["resourceGroup"], "clusterconnect-up", "{listed}");
    assert_eq!(listed[0]["connectivityStatus"], "Connected", "{listed}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        for file in ["admin.key", "relay-ca.key", "registry.redb"] {
            assert_eq!(
                mode(&state.join(file)) & 0o077,
                0,
                "{file} is readable by others"
            );
        }
    }
    let admin_key = std::fs::read(state.join("admin.key")).unwrap();
    up.terminate();
    assert!(up.wait(PROMPT).await.is_some(), "up did not stop");

    // Again: the same state, the same registration, kubectl through it once more.
    let (mut up, _) = start_up(&kubeconfig, &["--state-dir", &state_arg]).await;
    let pods = kubectl_ok(
        &kubeconfig,
        &["--context", "clusterconnect-standin", "get", "pods", "-A"],
    )
    .await;
    assert!(pods.contains("web-0"), "{pods}");
    assert_eq!(std::fs::read(state.join("admin.key")).unwrap(), admin_key);
    let out = run_to_end(&list_command(&up.output()), &[], PROMPT).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    up.terminate();
    assert!(up.wait(PROMPT).await.is_some(), "up did not stop");
}

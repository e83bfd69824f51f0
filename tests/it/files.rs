//! Files written safely: the kubeconfig and the local CA, on a real filesystem in temp dirs,
//! read back by the real kubectl. A symlinked kubeconfig, a held `<file>.lock`, a same-name
//! context clusterconnect did not write, a symlink planted where the temporary file used to
//! go, file modes.

use crate::support;

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use clusterconnect::files::{self, LockFile};
use clusterconnect::proxy::kubeconfig::{self, Entry, KubeconfigError, Options};
use clusterconnect::secret::Secret;

use support::check::describe;
use support::processes::{proxy_args, run_to_end, spawn, start_relay, START_TIMEOUT};
use support::{kubectl, kubectl_available, kubectl_ok};

const CONNECTION: &str = "edge";
/// A proxy that refuses its kubeconfig must have exited by then.
const EXIT: Duration = Duration::from_secs(30);

/// A kubeconfig of someone else's cluster; `context` names its context.
fn unrelated(context: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: prod-cluster
  cluster:
    server: https://prod.example.com:6443
users:
- name: prod-admin
  user:
    token: prod-admin-token
contexts:
- name: {context}
  context:
    cluster: prod-cluster
    user: prod-admin
    namespace: payments
current-context: {context}
"
    )
}

fn entry(token: &Secret) -> Entry<'_> {
    Entry {
        name: CONNECTION,
        server: "https://127.0.0.1:47011/clusters/edge",
        ca_pem: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
        token,
    }
}

fn yaml(path: &Path) -> serde_json::Value {
    serde_norway::from_str(&std::fs::read_to_string(path).expect("read kubeconfig"))
        .expect("kubeconfig is YAML")
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// The names in `dir`, sorted: no temporary file or lock may be left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn context_names(config: &serde_json::Value) -> Vec<&str> {
    config["contexts"]
        .as_array()
        .map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_symlinked_kubeconfig_is_updated_at_its_target_and_kubectl_reads_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dotfiles = dir.path().join("dotfiles");
    let kube = dir.path().join("home").join(".kube");
    std::fs::create_dir_all(&dotfiles).expect("mkdir");
    std::fs::create_dir_all(&kube).expect("mkdir");
    let real = dotfiles.join("kubeconfig");
    std::fs::write(&real, unrelated("prod")).expect("write");
    let link = kube.join("config");
    std::os::unix::fs::symlink("../../dotfiles/kubeconfig", &link).expect("symlink");

    let token = Secret::new("local-secret");
    kubeconfig::write(&link, &entry(&token), true).expect("write through the link");

    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink(),
        "the link was replaced by a regular file"
    );
    let after = yaml(&real);
    assert_eq!(context_names(&after), ["prod", CONNECTION]);
    assert_eq!(after["current-context"], CONNECTION);
    assert_eq!(mode(&real), 0o600);
    assert_eq!(names(&dotfiles), ["kubeconfig"]);
    assert_eq!(names(&kube), ["config"]);

    if !kubectl_available() {
        return;
    }
    // kubectl parses it, extensions included, through the link...
    let view = kubectl_ok(&link, &["config", "view", "-o", "json"]).await;
    let view: serde_json::Value = serde_json::from_str(&view).expect("kubectl config view JSON");
    let ours = view["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .find(|c| c["name"] == CONNECTION)
        .expect("our context");
    assert_eq!(
        ours["context"]["extensions"][0]["name"],
        kubeconfig::MARKER,
        "{ours}"
    );
    assert_eq!(
        kubectl_ok(&link, &["config", "current-context"])
            .await
            .trim(),
        CONNECTION
    );
    // ...rewrites it (through the link, as it does) keeping the marker...
    kubectl_ok(&link, &["config", "use-context", "prod"]).await;
    assert!(std::fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    let rewritten = yaml(&real);
    assert_eq!(rewritten["current-context"], "prod");
    // ...so the next start still recognises the entries as its own and updates them.
    let fresh = Secret::new("next-start");
    kubeconfig::write(&link, &entry(&fresh), false).expect("our entries after kubectl rewrote");
    let again = yaml(&real);
    assert_eq!(again["current-context"], "prod");
    let user = again["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["name"] == "clusterconnect-edge")
        .expect("our user");
    assert_eq!(user["user"]["token"], "next-start");
    kubectl_ok(&link, &["config", "use-context", CONNECTION]).await;
}

#[test]
fn a_held_lock_makes_the_write_wait_then_fail_and_a_released_one_lets_it_succeed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config");
    std::fs::write(&path, unrelated("prod")).expect("write");
    // What kubectl does while it writes: client-go creates config.lock with O_CREAT|O_EXCL.
    let lock = dir.path().join("config.lock");
    std::fs::write(&lock, "").expect("hold the lock");

    let token = Secret::new("t");
    let wait = Duration::from_millis(600);
    let options = Options {
        lock_wait: wait,
        ..Options::default()
    };
    let started = Instant::now();
    let err = kubeconfig::write_many(&path, &[entry(&token)], &options).unwrap_err();
    assert!(
        started.elapsed() >= wait,
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(matches!(err, KubeconfigError::Locked { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        format!("{} exists", lock.display()),
        "another kubectl or clusterconnect is writing it".to_string(),
        format!("if none is, remove {}", lock.display()),
    ] {
        assert!(message.contains(&part), "{message}");
    }
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        unrelated("prod")
    );
    assert!(lock.exists(), "someone else's lock was removed");

    // Released while we wait: the write goes through and leaves no lock behind.
    let releaser = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(lock).expect("release");
        })
    };
    kubeconfig::write_many(&path, &[entry(&token)], &Options::default())
        .expect("write once the lock is released");
    releaser.join().expect("releaser");
    assert_eq!(context_names(&yaml(&path)), ["prod", CONNECTION]);
    assert_eq!(names(dir.path()), ["config"]);
}

#[test]
fn a_symlinked_kubeconfig_is_locked_under_both_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let real = dir.path().join("real-config");
    let link = dir.path().join("config");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let token = Secret::new("t");
    let options = Options {
        lock_wait: Duration::from_millis(100),
        ..Options::default()
    };
    for held in [&link, &real] {
        let lock = LockFile::acquire(held, Duration::ZERO).expect("hold");
        let err = kubeconfig::write_many(&link, &[entry(&token)], &options).unwrap_err();
        assert!(
            err.to_string().contains(&lock.path().display().to_string()),
            "{err}"
        );
    }
    // A dangling link: the file it names is created, the link kept.
    kubeconfig::write_many(&link, &[entry(&token)], &options).expect("write");
    assert!(std::fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(context_names(&yaml(&real)), [CONNECTION]);
}

#[tokio::test]
async fn kubectl_refuses_to_write_while_we_hold_its_lock() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config");
    std::fs::write(&path, unrelated("prod")).expect("write");
    let lock = LockFile::acquire(&path, Duration::ZERO).expect("lock");
    let out = kubectl(
        &path,
        &["config", "set-context", "prod", "--namespace", "x"],
        &[],
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.lock"),
        "{}",
        describe(&out)
    );
    drop(lock);
    kubectl_ok(
        &path,
        &["config", "set-context", "prod", "--namespace", "x"],
    )
    .await;
}

#[tokio::test]
async fn a_foreign_same_name_context_is_refused_and_replaced_only_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config");
    std::fs::write(&path, unrelated(CONNECTION)).expect("write");
    let token = Secret::new("t");

    let err = kubeconfig::write(&path, &entry(&token), true).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "already has a context named '{CONNECTION}' that clusterconnect did not write, so \
             context '{CONNECTION}' cannot be added; pass --overwrite-context to replace it"
        )),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        unrelated(CONNECTION)
    );

    let options = Options {
        overwrite: true,
        ..Options::default()
    };
    kubeconfig::write_many(&path, &[entry(&token)], &options).expect("overwrite");
    let after = yaml(&path);
    assert_eq!(context_names(&after), [CONNECTION]);
    assert_eq!(
        after["contexts"][0]["context"]["user"],
        "clusterconnect-edge"
    );
    assert_eq!(mode(&path), 0o600);
    if kubectl_available() {
        kubectl_ok(&path, &["config", "view"]).await;
        kubectl_ok(&path, &["config", "use-context", CONNECTION]).await;
    }
}

#[test]
fn a_symlink_planted_at_a_predictable_temporary_name_is_not_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched").expect("write");
    let victim_mode = mode(&victim);
    let path = dir.path().join("config");
    // The name the writer used to pick (".<file>.<pid>.tmp"), and a few guesses around it.
    let pid = std::process::id();
    let mut planted = Vec::new();
    for guess in [pid, pid + 1, 0] {
        let p = dir.path().join(format!(".config.{guess}.tmp"));
        std::os::unix::fs::symlink(&victim, &p).expect("plant");
        planted.push(p);
    }
    files::write_private(&path, b"secret").expect("write");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "untouched");
    assert_eq!(mode(&victim), victim_mode, "the victim's mode changed");
    for p in &planted {
        assert!(std::fs::symlink_metadata(p)
            .expect("lstat")
            .file_type()
            .is_symlink());
    }
    assert_eq!(std::fs::read(&path).expect("read"), b"secret");
    assert_eq!(mode(&path), 0o600);
}

/// The binary: a foreign context stops `proxy` before it connects, naming the context and the
/// flag; with `--overwrite-context` it replaces it, and the local CA files are private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_a_foreign_context_unless_overwrite_context() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_dir = dir.path().join("relay");
    let config_dir = dir.path().join("proxy-config");
    std::fs::create_dir_all(&relay_dir).expect("mkdir");
    std::fs::create_dir_all(&config_dir).expect("mkdir");
    let relay = start_relay(&relay_dir).await;
    let token_file = config_dir.join("sa.token");
    std::fs::write(&token_file, "unused").expect("token file");
    let kubeconfig = dir.path().join("config");
    std::fs::write(&kubeconfig, unrelated(CONNECTION)).expect("write");

    let args = proxy_args(
        &relay,
        CONNECTION,
        &relay.send_key,
        &token_file,
        0,
        &kubeconfig,
    );
    let envs: [(&str, &OsStr); 1] = [("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str())];
    let out = run_to_end(&args, &envs, EXIT).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("a context named '{CONNECTION}'"))
            && stderr.contains("--overwrite-context"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&kubeconfig).expect("read"),
        unrelated(CONNECTION)
    );

    let mut overwrite: Vec<std::ffi::OsString> = args.clone();
    overwrite.push("--overwrite-context".into());
    let proxy = spawn(&overwrite, &envs);
    if let Err(output) = proxy.wait_for_output(START_TIMEOUT, "written to").await {
        panic!("proxy did not write the kubeconfig:\n{output}");
    }
    let after = yaml(&kubeconfig);
    assert_eq!(context_names(&after), [CONNECTION]);
    assert_eq!(
        after["contexts"][0]["context"]["user"],
        "clusterconnect-edge"
    );
    assert_eq!(mode(&kubeconfig), 0o600);
    for name in ["local-ca.crt", "local-ca.key"] {
        assert_eq!(mode(&config_dir.join(name)), 0o600, "{name}");
    }
    assert_eq!(
        names(dir.path()),
        ["config", "proxy-config", "relay"],
        "a temporary file or lock was left behind"
    );
    if kubectl_available() {
        kubectl_ok(&kubeconfig, &["config", "view"]).await;
        kubectl_ok(&kubeconfig, &["config", "use-context", CONNECTION]).await;
    }
    proxy.terminate();
}

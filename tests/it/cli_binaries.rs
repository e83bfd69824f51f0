//! The real `clusterconnect` binary as an operator runs it: relay, agent and proxy as separate
//! processes on loopback, the real kubectl through them, signals, and the messages a
//! misconfiguration produces.

use crate::support;

use support::check::{describe, text};

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use clusterconnect::secret::Secret;
use clusterconnect::tunnel::dial::{dial, DialError};
use clusterconnect::tunnel::protocol::{Action, ControlMessage, RelayAddress};
use clusterconnect::tunnel::sas::SasKey;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::processes::{
    agent_args, proxy_args, run_to_end, spawn, start_agent, start_proxy, start_relay, RelayProcess,
    START_TIMEOUT, TOKEN_FILE_NAME,
};
use support::{kubectl, kubectl_available, ApiServer};

const CONNECTION: &str = "edge-cluster";
/// A one-shot command (help, check, sas) must be done by then.
const ONE_SHOT: Duration = Duration::from_secs(30);
/// A process told to stop, or one that fails at start-up, must have exited by then.
const EXIT: Duration = Duration::from_secs(15);
/// "Exits within a few seconds" after SIGTERM when idle.
const PROMPT_EXIT: Duration = Duration::from_secs(5);

fn write(path: &Path, content: &str) -> PathBuf {
    std::fs::write(path, content).expect("write test file");
    path.to_path_buf()
}

fn relay_tls(relay: &RelayProcess) -> std::sync::Arc<rustls::ClientConfig> {
    clusterconnect::tls::client_config(Some(&relay.ca_path), &[]).expect("relay client TLS")
}

// ---------------------------------------------------------------------------------------------
// One-shot commands
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn help_and_version() {
    let out = run_to_end(&["--help"], &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    let help = text(&out.stdout);
    for sub in ["relay", "agent", "proxy", "sas"] {
        assert!(help.contains(sub), "--help does not list '{sub}':\n{help}");
    }
    assert!(help.contains("kubectl"), "{help}");

    let out = run_to_end(&["--version"], &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("clusterconnect {}", env!("CARGO_PKG_VERSION"))
    );

    // Each role documents its own flags.
    let out = run_to_end(&["proxy", "--help"], &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("--key-file"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn worker_threads_out_of_range_are_refused_by_flag_and_environment() {
    // (flag, environment, what the refusal says)
    let refused = [
        (Some("0"), None, "0 is not in 1..=1024"),
        (
            None,
            Some("many"),
            "invalid value 'many' for '--worker-threads",
        ),
    ];
    for (flag, env, says) in refused {
        let mut args = Vec::new();
        if let Some(n) = flag {
            args.extend(["--worker-threads", n]);
        }
        args.push("man");
        let env: Vec<_> = env
            .map(|v| ("CLUSTERCONNECT_WORKER_THREADS", OsStr::new(v)))
            .into_iter()
            .collect();
        let out = run_to_end(&args, &env, ONE_SHOT).await;
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        assert!(text(&out.stderr).contains(says), "{}", describe(&out));
    }
    // In range, by either, the command runs.
    let env = [("CLUSTERCONNECT_WORKER_THREADS", OsStr::new("3"))];
    let out = run_to_end(&["--worker-threads", "2", "man"], &env, ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
}

#[tokio::test]
async fn completions_for_every_shell_and_manual_pages_come_from_the_flags() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_to_end(&["completion", shell], &[], ONE_SHOT).await;
        assert!(out.status.success(), "{shell}: {}", describe(&out));
        let script = text(&out.stdout);
        for word in ["connect", "kubeconfig", "update-agent"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = run_to_end(&["completion", "tcsh"], &[], ONE_SHOT).await;
    assert!(!out.status.success());
    let out = run_to_end(&["man"], &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    let page = text(&out.stdout);
    assert!(
        page.contains(".TH clusterconnect 1") && page.contains("keys"),
        "{page}"
    );
    let out = run_to_end(&["man", "keys"], &[], ONE_SHOT).await;
    assert!(
        text(&out.stdout).contains(".TH clusterconnect-keys 1"),
        "{}",
        describe(&out)
    );
    let out = run_to_end(&["man", "nope"], &[], ONE_SHOT).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pages exist for: up, relay"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn relay_check_accepts_a_valid_config_and_names_a_broken_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let valid = r#"listen = "127.0.0.1:0"
hostnames = []

[[rules]]
name = "listen"
key = "listen-key-for-the-check-test-0123"
rights = ["listen"]

[[rules]]
name = "send"
key = "send-key-for-the-check-test-0123"
rights = ["send"]
"#;
    let config = write(&dir.path().join("relay.toml"), valid);
    let check = [
        OsStr::new("relay"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--dev-self-signed"),
        OsStr::new("--check"),
    ];
    let out = run_to_end(&check, &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(text(&out.stdout).contains("valid"), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains(&config.display().to_string()),
        "{}",
        describe(&out)
    );
    // --check only checks: no dev CA is written.
    assert!(!dir.path().join("relay-dev-ca.crt").exists());

    let broken = write(
        &dir.path().join("broken.toml"),
        &format!("{valid}\n[extra]\ncolour = \"blue\"\n"),
    );
    let out = run_to_end(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            broken.as_os_str(),
            OsStr::new("--dev-self-signed"),
            OsStr::new("--check"),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&broken.display().to_string()) && stderr.contains("extra"),
        "the error must name the file and the unknown field:\n{}",
        describe(&out)
    );
    assert!(!text(&out.stdout).contains("valid"), "{}", describe(&out));
}

/// The bundled NATS's configuration, run by the real nats-server with the token in its
/// environment as the StatefulSet gives it: JetStream on, a client without the token refused,
/// one with it admitted.
async fn nats_config_demands_the_token(conf: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = crate::replicas::free_port();
    let conf = conf
        .replace("port: 4222", &format!("listen: \"127.0.0.1:{port}\""))
        .replace(
            "\"/data\"",
            &format!("{:?}", dir.path().join("js").display().to_string()),
        );
    let path = write(&dir.path().join("nats.conf"), &conf);
    let mut server = std::process::Command::new(crate::replicas::nats_server())
        .arg("-c")
        .arg(&path)
        .env("NATS_TOKEN", "token-from-the-secret-0123")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "nats-server did not start with {conf}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect = |options: async_nats::ConnectOptions| {
        let url = url.clone();
        async move { tokio::time::timeout(Duration::from_secs(10), options.connect(url)).await }
    };
    let anonymous = connect(async_nats::ConnectOptions::new()).await;
    assert!(
        matches!(anonymous, Ok(Err(_))),
        "a client without the token got in"
    );
    let wrong = connect(async_nats::ConnectOptions::with_token("guess".into())).await;
    assert!(
        matches!(wrong, Ok(Err(_))),
        "a client with a wrong token got in"
    );
    let client = connect(async_nats::ConnectOptions::with_token(
        "token-from-the-secret-0123".into(),
    ))
    .await
    .expect("NATS answered in time")
    .expect("the token is admitted");
    assert!(client.server_info().jetstream, "JetStream is off in {conf}");
    let _ = server.kill();
    let _ = server.wait();
}

/// `relay --dry-run` for replicas on NATS: a StatefulSet whose pods name themselves under the
/// first hostname, a Service per replica, NATS with JetStream on a volume, no registry claim;
/// the pod's configuration and arguments pass the relay's own --check.
#[tokio::test]
async fn relay_dry_run_with_a_cluster_section_prints_replicas_and_nats() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        &dir.path().join("relay.toml"),
        r#"hostnames = ["relay.example.com"]

[[rules]]
name = "admin"
key_file = "admin.key"
rights = ["manage"]

[cluster]
nats_url = "nats://clusterconnect-nats.edge-relay:4222"
public_host = "set-per-pod-by-the-statefulset"
"#,
    );
    let dry_run = |replicas: &'static str| {
        let config = config.clone();
        async move {
            run_to_end(
                &[
                    OsStr::new("relay"),
                    OsStr::new("--config"),
                    config.as_os_str(),
                    OsStr::new("--dry-run"),
                    OsStr::new("--namespace"),
                    OsStr::new("edge-relay"),
                    OsStr::new("--replicas"),
                    OsStr::new(replicas),
                ],
                &[],
                ONE_SHOT,
            )
            .await
        }
    };
    let out = dry_run("3").await;
    assert!(out.status.success(), "{}", describe(&out));
    let yaml = text(&out.stdout);
    let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect();
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace/edge-relay",
            "ServiceAccount/clusterconnect-relay",
            "ConfigMap/clusterconnect-relay",
            "ConfigMap/clusterconnect-nats",
            "StatefulSet/clusterconnect-nats",
            "Service/clusterconnect-nats",
            "NetworkPolicy/clusterconnect-nats",
            "StatefulSet/clusterconnect-relay",
            "Service/clusterconnect-relay-0",
            "Service/clusterconnect-relay-1",
            "Service/clusterconnect-relay-2",
            "Service/clusterconnect-relay",
            "PodDisruptionBudget/clusterconnect-relay",
        ]
    );
    let relay = &docs[7]["spec"];
    assert_eq!(relay["replicas"], 3);
    let container = &relay["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[args.len() - 2..],
        ["--public-host", "$(POD_NAME).relay.example.com"]
    );
    assert_eq!(
        container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        docs[9]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
        "clusterconnect-relay-1"
    );
    // The bundled NATS demands a token from the NATS Secret, which the relay pods mount, and
    // only the relay's pods may reach it.
    let nats = &docs[4]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        nats["args"],
        serde_json::json!(["-c", "/etc/nats/nats.conf"])
    );
    assert_eq!(
        nats["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "clusterconnect-relay-nats"
    );
    assert!(!nats.to_string().contains("$(NATS_TOKEN)"), "{nats}");
    assert_eq!(
        docs[6]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        docs[7]["spec"]["selector"]["matchLabels"]
    );
    nats_config_demands_the_token(docs[3]["data"]["nats.conf"].as_str().unwrap()).await;
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/etc/clusterconnect/nats"),
        "{container}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("create secret generic clusterconnect-relay-nats"),
        "{stderr}"
    );
    let pod_config = docs[2]["data"]["relay.toml"].as_str().unwrap();
    assert!(!pod_config.contains("registry_file"), "{pod_config}");
    assert!(
        pod_config.contains("nats_token_file = \"/etc/clusterconnect/nats/token\""),
        "{pod_config}"
    );

    // The pod's config and arguments, mounts moved into a temporary directory, pass --check.
    let root = dir.path().join("pod");
    let moved = pod_config.replace(
        "/etc/clusterconnect",
        &root.join("etc").display().to_string(),
    );
    for sub in ["etc/keys", "etc/tls", "etc/nats"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    write(&root.join("etc/nats/token"), "a-nats-token-for-the-check");
    let ca = clusterconnect::tls::CertificateAuthority::generate("dry-run test CA").unwrap();
    let cert = ca
        .issue_server(&["relay.example.com", "*.relay.example.com"])
        .unwrap();
    write(&root.join("etc/tls/tls.crt"), &cert.cert_pem);
    write(&root.join("etc/tls/tls.key"), &cert.key_pem);
    write(
        &root.join("etc/keys/admin.key"),
        "admin-key-for-the-dry-run-check-0123",
    );
    let moved = write(&root.join("relay.toml"), &moved);
    let out = run_to_end(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            moved.as_os_str(),
            OsStr::new("--check"),
            OsStr::new("--public-host"),
            OsStr::new("clusterconnect-relay-1.relay.example.com"),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));

    // Replicas without [cluster] are refused with the reason.
    let single = write(
        &dir.path().join("single.toml"),
        "hostnames = [\"relay.example.com\"]\n[[rules]]\nname = \"a\"\nkey_file = \"a.key\"\nrights = [\"send\"]\n",
    );
    let out = run_to_end(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            single.as_os_str(),
            OsStr::new("--dry-run"),
            OsStr::new("--replicas"),
            OsStr::new("3"),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("[cluster]"),
        "{}",
        describe(&out)
    );
}

/// `relay --dry-run -o yaml`: the objects that run the relay, no key material, and a
/// configuration that the relay itself accepts once the Secrets it names are mounted.
#[tokio::test]
async fn relay_dry_run_prints_manifests_whose_config_the_relay_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        &dir.path().join("relay.toml"),
        r#"listen = "127.0.0.1:0"
hostnames = ["relay.example.com"]
max_rendezvous_per_token = 2048

[[rules]]
name = "listen"
key = "inline-listen-key-for-the-dry-run-0123"
rights = ["listen"]

[[rules]]
name = "send"
key_file = "send.key"
rights = ["send"]
"#,
    );
    let out = run_to_end(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--dry-run"),
            OsStr::new("-o"),
            OsStr::new("yaml"),
            OsStr::new("--namespace"),
            OsStr::new("edge-relay"),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let yaml = text(&out.stdout);
    assert!(!yaml.contains("inline-listen-key"), "{yaml}");
    let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    for doc in &docs[1..] {
        assert_eq!(doc["metadata"]["namespace"], "edge-relay", "{doc}");
    }
    let pod = &docs[4]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["containers"][0]["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert!(pod["containers"][0]["readinessProbe"].is_object());
    assert!(docs[6]["spec"]["maxUnavailable"].is_number());
    // The rule keys' Secret is the operator's: named with the command that creates it, never
    // printed (a placeholder applied over the real one would replace the keys).
    assert!(
        yaml.contains("create secret generic clusterconnect-relay-keys --from-file=listen.key="),
        "{yaml}"
    );

    // The pod's configuration, with its mounts moved into a temporary directory and the
    // Secrets' files put there, passes the relay's own --check; a placeholder in place of a
    // key does not.
    let pod_config = docs[2]["data"]["relay.toml"].as_str().unwrap();
    let root = dir.path().join("pod");
    let moved = pod_config
        .replace(
            "/etc/clusterconnect",
            &root.join("etc").display().to_string(),
        )
        .replace(
            "/var/lib/clusterconnect",
            &root.join("var").display().to_string(),
        );
    for sub in ["etc/keys", "etc/tls", "var"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let ca = clusterconnect::tls::CertificateAuthority::generate("dry-run test CA").unwrap();
    let cert = ca.issue_server(&["relay.example.com"]).unwrap();
    write(&root.join("etc/tls/tls.crt"), &cert.cert_pem);
    write(&root.join("etc/tls/tls.key"), &cert.key_pem);
    for rule in ["listen", "send"] {
        write(
            &root.join(format!("etc/keys/{rule}.key")),
            &format!("{rule}-key-for-the-dry-run-check-0123"),
        );
    }
    let moved = write(&root.join("relay.toml"), &moved);
    let check = [
        OsStr::new("relay"),
        OsStr::new("--config"),
        moved.as_os_str(),
        OsStr::new("--check"),
    ];
    let out = run_to_end(&check, &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    write(
        &root.join("etc/keys/send.key"),
        "<a key: clusterconnect sas new-key --name send>",
    );
    let out = run_to_end(&check, &[], ONE_SHOT).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("placeholder"),
        "{}",
        describe(&out)
    );

    // A config without hostnames says what to set.
    let nameless = write(
        &dir.path().join("nameless.toml"),
        "listen = \"0.0.0.0:1\"\n",
    );
    let out = run_to_end(
        &[
            OsStr::new("relay"),
            OsStr::new("--config"),
            nameless.as_os_str(),
            OsStr::new("--dry-run"),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("hostnames"),
        "{}",
        describe(&out)
    );
}

async fn sas_new_key(name: &str) -> String {
    let out = run_to_end(&["sas", "new-key", "--name", name], &[], ONE_SHOT).await;
    assert!(out.status.success(), "{}", describe(&out));
    text(&out.stdout).trim().to_string()
}

async fn sas_token(key_file: &Path, relay: &str, connection: &str, ttl: &str) -> Secret {
    let out = run_to_end(
        &[
            OsStr::new("sas"),
            OsStr::new("token"),
            OsStr::new("--key-file"),
            key_file.as_os_str(),
            OsStr::new("--relay"),
            OsStr::new(relay),
            OsStr::new("--connection"),
            OsStr::new(connection),
            OsStr::new("--ttl"),
            OsStr::new(ttl),
        ],
        &[],
        ONE_SHOT,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    Secret::new(text(&out.stdout).trim())
}

/// An agent pointed at a kubeconfig it cannot use says which file, and which contexts it has,
/// once: kube-rs's own message repeated the cause and named no context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_names_a_missing_kubeconfig_or_context_plainly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(&dir.path().join("listen.key"), &sas_new_key("listen").await);
    let kubeconfig = write(
        &dir.path().join("kc"),
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts:\n- name: prod\n  context: {cluster: x, user: y}\nusers: []\n",
    );
    let missing = dir.path().join("nope");
    for (extra, says) in [
        (
            vec![OsStr::new("--kubeconfig"), missing.as_os_str()],
            "cannot read kubeconfig",
        ),
        (
            vec![
                OsStr::new("--kubeconfig"),
                kubeconfig.as_os_str(),
                OsStr::new("--context"),
                OsStr::new("nosuch"),
            ],
            "has no context 'nosuch' (it has: prod)",
        ),
    ] {
        let mut args = vec![
            OsStr::new("agent"),
            OsStr::new("--relay"),
            OsStr::new("wss://127.0.0.1:1"),
            OsStr::new("--connection"),
            OsStr::new("c"),
            OsStr::new("--key-file"),
            key.as_os_str(),
        ];
        args.extend(extra);
        let out = run_to_end(&args, &[], ONE_SHOT).await;
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{}",
            describe(&out)
        );
        assert_eq!(
            stderr.matches("No such file").count(),
            usize::from(says.starts_with("cannot")),
            "{stderr}"
        );
    }
}

/// A token that would be expired as it is made is refused with the reason, not printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_token_refuses_a_lifetime_under_a_second() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(&dir.path().join("send.key"), &sas_new_key("send").await);
    for ttl in ["0s", "500ms"] {
        let out = run_to_end(
            &[
                OsStr::new("sas"),
                OsStr::new("token"),
                OsStr::new("--key-file"),
                key.as_os_str(),
                OsStr::new("--relay"),
                OsStr::new("wss://relay.example.com"),
                OsStr::new("--connection"),
                OsStr::new("c"),
                OsStr::new("--ttl"),
                OsStr::new(ttl),
            ],
            &[],
            ONE_SHOT,
        )
        .await;
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(out.stdout.is_empty(), "{}", describe(&out));
        assert!(
            text(&out.stderr).contains("--ttl must be at least 1s"),
            "{}",
            describe(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_keys_and_tokens_from_the_cli_are_accepted_by_the_relay() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listen_line = sas_new_key("listen").await;
    let send_line = sas_new_key("send").await;
    for (line, name) in [(&listen_line, "listen"), (&send_line, "send")] {
        let key = SasKey::parse(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(key.name, name);
        assert!(
            line.starts_with(&format!("SharedAccessKeyName={name};SharedAccessKey=")),
            "{line}"
        );
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.key.expose())
            .expect("the key is base64");
        assert_eq!(raw.len(), 32, "{line}");
    }
    assert_ne!(
        SasKey::parse(&listen_line).unwrap().key.expose(),
        SasKey::parse(&send_line).unwrap().key.expose(),
        "two new keys must differ"
    );

    // The relay uses existing key files as they are (dev mode creates only missing ones).
    let listen_file = write(&dir.path().join("listen.key"), &listen_line);
    let send_file = write(&dir.path().join("send.key"), &send_line);
    let relay = start_relay(dir.path()).await;
    let tls = relay_tls(&relay);
    let address = RelayAddress::parse(&relay.url).expect("relay address");

    let listen_token = sas_token(&listen_file, &relay.url, CONNECTION, "10m").await;
    assert!(
        listen_token
            .expose()
            .starts_with("SharedAccessSignature sr=")
            && listen_token.expose().contains("skn=listen"),
        "unexpected token shape"
    );
    let se: u64 = listen_token
        .expose()
        .split('&')
        .find_map(|p| p.strip_prefix("se="))
        .and_then(|s| s.parse().ok())
        .expect("se field");
    let now = clusterconnect::tunnel::sas::unix_now();
    assert!(
        (now + 590..=now + 610).contains(&se),
        "--ttl 10m: se={se}, now={now}"
    );

    let mut listener = dial(
        &address.url(CONNECTION, Action::Listen, "cli-listener"),
        Some(&listen_token),
        &tls,
    )
    .await
    .expect("the relay accepts a listen token minted by `sas token`");

    // The listen rule has no Send right: its token cannot connect.
    let refused = dial(
        &address.url(CONNECTION, Action::Connect, "x"),
        Some(&listen_token),
        &tls,
    )
    .await
    .expect_err("a listen token must not connect");
    assert!(
        matches!(refused, DialError::Rejected { status: 403, .. }),
        "{refused}"
    );

    let send_token = sas_token(&send_file, &relay.url, CONNECTION, "1h").await;
    let sender = tokio::spawn({
        let (url, tls) = (address.url(CONNECTION, Action::Connect, "cli"), tls.clone());
        async move { dial(&url, Some(&send_token), &tls).await }
    });
    let accept = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match listener.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                    Ok(ControlMessage::Accept(a)) => return a,
                    other => panic!("unexpected control message {other:?}"),
                },
                Some(Ok(_)) => {}
                other => panic!("control channel ended: {other:?}"),
            }
        }
    })
    .await
    .expect("an accept within 10 s");
    let mut rendezvous = dial(&accept.address, None, &tls)
        .await
        .expect("accept address");
    let mut sender = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("sender within 10 s")
        .expect("join")
        .expect("the relay accepts a send token minted by `sas token`");
    sender
        .send(Message::binary(&b"ping"[..]))
        .await
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(10), rendezvous.next())
        .await
        .expect("message within 10 s");
    assert!(
        matches!(got, Some(Ok(Message::Binary(ref b))) if b.as_ref() == b"ping"),
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The whole path with binaries
// ---------------------------------------------------------------------------------------------

/// A kubeconfig with a context that has nothing to do with clusterconnect; the proxy must
/// leave it exactly as it is.
fn unrelated_kubeconfig() -> String {
    let ca = clusterconnect::tls::CertificateAuthority::generate("prod CA").expect("CA");
    let client = ca.issue_server(&["prod-admin"]).expect("client cert");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: prod-cluster\n  cluster:\n    server: https://prod.example.com:6443\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: prod-admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n    token: prod-admin-token-value\n\
         contexts:\n\
         - name: prod\n  context:\n    cluster: prod-cluster\n    user: prod-admin\n    namespace: payments\n\
         current-context: prod\n\
         preferences: {{}}\n",
        ca = b64(ca.cert_pem()),
        cert = b64(&client.cert_pem),
        key = b64(&client.key_pem),
    )
}

fn parse_yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read kubeconfig");
    serde_norway::from_str(&text).expect("kubeconfig is YAML")
}

/// The entry called `name` in the kubeconfig list `list` (clusters, users, contexts).
fn named<'a>(config: &'a serde_json::Value, list: &str, name: &str) -> &'a serde_json::Value {
    config[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {config}"))
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {list} entry '{name}' in {config}"))
}

/// Every regular file under `dir`, recursively (bounded depth).
fn files_under(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth > 0 {
            files_under(&path, depth - 1, found);
        } else if kind.is_file() {
            found.push(path);
        }
    }
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_through_relay_agent_and_proxy_binaries() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_dir = dir.path().join("relay");
    let agent_dir = dir.path().join("agent");
    let user_dir = dir.path().join("user");
    let config_dir = dir.path().join("proxy-config");
    for d in [&relay_dir, &agent_dir, &user_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }

    let mut relay = start_relay(&relay_dir).await;
    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "agent-has-no-say");
    let mut agent = start_agent(&relay, &agent_kubeconfig, CONNECTION).await;

    let kubeconfig = write(&user_dir.join("config"), &unrelated_kubeconfig());
    let before = parse_yaml(&kubeconfig);
    let (mut proxy, port) =
        start_proxy(&relay, CONNECTION, &api.token(), &kubeconfig, &config_dir).await;

    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(
        out.status.success(),
        "{}\nproxy:\n{}",
        describe(&out),
        proxy.output()
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("web-0") && stdout.contains("coredns-0"),
        "{}",
        describe(&out)
    );

    // What reached the apiserver carried the real token, not the kubeconfig's local secret.
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        let auth = r
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(
            auth,
            format!("Bearer {}", api.token()),
            "{}",
            r.path_and_query
        );
    }

    // The kubeconfig: our context added and current, the unrelated one untouched.
    let after = parse_yaml(&kubeconfig);
    assert_eq!(after["current-context"].as_str(), Some(CONNECTION));
    let ours = named(&after, "contexts", CONNECTION);
    let our_cluster = named(
        &after,
        "clusters",
        ours["context"]["cluster"].as_str().unwrap(),
    );
    assert!(
        our_cluster["cluster"]["server"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("https://127.0.0.1:{port}"))),
        "{our_cluster}"
    );
    for (list, name) in [
        ("contexts", "prod"),
        ("clusters", "prod-cluster"),
        ("users", "prod-admin"),
    ] {
        assert_eq!(
            named(&after, list, name),
            named(&before, list, name),
            "{list} entry '{name}' changed"
        );
    }
    assert_eq!(
        named(&after, "users", "prod-admin")["user"]["token"].as_str(),
        Some("prod-admin-token-value")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kubeconfig)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "kubeconfig mode {mode:o}");
    }

    // The real token is in no file the proxy wrote: the kubeconfig, its config dir (local CA),
    // its HOME.
    let mut written = vec![kubeconfig.clone()];
    files_under(&config_dir, 4, &mut written);
    files_under(proxy.home(), 6, &mut written);
    written.retain(|p| p != &config_dir.join(TOKEN_FILE_NAME));
    assert!(
        written.len() >= 2,
        "the proxy wrote its local CA: {written:?}"
    );
    for file in &written {
        let bytes = std::fs::read(file).expect("read");
        assert!(
            !contains_bytes(&bytes, api.token().as_bytes()),
            "{} holds the real token",
            file.display()
        );
    }
    assert!(
        !proxy.output().contains(&api.token()),
        "the proxy logged the token"
    );

    // SIGTERM: the proxy exits 0 promptly, then the agent and the relay exit 0 too.
    let started = Instant::now();
    proxy.terminate();
    let status = proxy.wait(PROMPT_EXIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "proxy after SIGTERM: {status:?} after {:?}\n{}",
        started.elapsed(),
        proxy.output()
    );
    agent.terminate();
    let status = agent.wait(EXIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "agent after SIGTERM: {status:?}\n{}",
        agent.output()
    );
    relay.process.terminate();
    let status = relay.process.wait(EXIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "relay after SIGTERM: {status:?}\n{}",
        relay.process.output()
    );
    for (who, out) in [("agent", agent.output()), ("relay", relay.process.output())] {
        assert!(!out.contains(&api.token()), "{who} logged the token");
    }
}

/// A relay and an agent (with `agent_envs`) in front of `api`, in directories under `dir`, and
/// the directory for a proxy's configuration.
async fn relay_and_agent(
    api: &ApiServer,
    dir: &Path,
    agent_envs: &[(&str, &OsStr)],
) -> (RelayProcess, support::processes::Process, PathBuf) {
    let (relay_dir, agent_dir, config_dir) = (
        dir.join("relay"),
        dir.join("agent"),
        dir.join("proxy-config"),
    );
    for d in [&relay_dir, &agent_dir, &config_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let relay = start_relay(&relay_dir).await;
    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "agent-has-no-say");
    let agent = support::processes::start_agent_with(
        &relay,
        &agent_kubeconfig,
        CONNECTION,
        &[],
        agent_envs,
    )
    .await;
    (relay, agent, config_dir)
}

/// `--dev-self-signed` makes its CA once and reuses it: agents and proxies that trust it keep
/// reconnecting across relay restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_ca_survives_a_relay_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut relay = start_relay(dir.path()).await;
    let first = std::fs::read(&relay.ca_path).expect("the dev CA");
    relay.process.terminate();
    assert!(relay.process.wait(EXIT).await.is_some(), "the relay exits");
    let again = start_relay(dir.path()).await;
    assert_eq!(
        std::fs::read(&again.ca_path).expect("the dev CA"),
        first,
        "the restarted relay made a new CA"
    );
    // And it serves with it: a client trusting the first CA completes TLS.
    let tls = relay_tls(&again);
    let addr = again.url.trim_start_matches("wss://").to_string();
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name"),
            tcp,
        )
        .await
        .expect("TLS with the kept CA");
    again.process.terminate();
}

/// A draining relay refuses new connections at once (its agents and proxies retry elsewhere
/// or later) instead of leaving them in its accept queue until the drain ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_refuses_new_connections_at_once() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut relay, _agent, config_dir) = relay_and_agent(&api, dir.path(), &[]).await;
    let kubeconfig = dir.path().join("config");
    let (_proxy, _) = start_proxy(&relay, CONNECTION, &api.token(), &kubeconfig, &config_dir).await;
    // The proxy's pooled rendezvous stay open: the relay drains them for its drain period.
    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let addr = relay.url.trim_start_matches("wss://").to_string();

    relay.process.terminate();
    relay
        .process
        .wait_for_output(EXIT, "draining")
        .await
        .expect("the relay drains");
    assert!(
        relay
            .process
            .wait(Duration::from_millis(200))
            .await
            .is_none(),
        "the relay is still draining"
    );
    let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await;
    assert!(
        matches!(&connect, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connection to the draining relay: {connect:?}"
    );
}

/// Strangers' broken TLS openings (an alert, a stray ChangeCipherSpec, then gone) cost no
/// log line: rustls logs each at warn, up to four per connection, a flood anyone could cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_tls_openings_do_not_flood_the_relay_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let addr = relay.url.trim_start_matches("wss://").to_string();
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00];
    let change_cipher_spec = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
    for record in [&alert[..], &change_cipher_spec[..]].repeat(10) {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(record).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(EXIT, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the relay closed the connection");
    }
    // The relay still answers, so every one of those was handled before this.
    let tls = relay_tls(&relay);
    let ws = dial(
        &format!("{}/$hc/none?sb-hc-action=connect", relay.url),
        None,
        &tls,
    )
    .await;
    assert!(
        matches!(ws, Err(DialError::Rejected { status: 401, .. })),
        "{ws:?}"
    );
    let log = relay.process.output();
    assert!(!log.contains("rustls"), "{log}");
}

/// No SAS token reaches a log, at trace level too: tungstenite's client handshake logged the
/// whole upgrade request at trace, its Authorization header (a Send or Listen token valid for
/// an hour) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sas_token_reaches_the_logs_even_at_trace_level() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = [("RUST_LOG", OsStr::new("trace"))];
    let (relay, agent, config_dir) = relay_and_agent(&api, dir.path(), &trace).await;
    let kubeconfig = dir.path().join("config");
    let (proxy, _) = support::processes::start_proxy_with(
        &relay,
        CONNECTION,
        &api.token(),
        (&kubeconfig, &config_dir),
        &trace,
    )
    .await;
    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    for (who, log) in [("agent", agent.output()), ("proxy", proxy.output())] {
        assert!(log.contains("TRACE"), "{who} did not log at trace level");
        for secret in ["SharedAccessSignature", "sig=", api.token().as_str()] {
            assert!(
                !log.contains(secret),
                "the {who}'s trace log holds {secret:?}"
            );
        }
    }
}

/// A proxy whose output nobody reads any more (its supervisor gone, `| head -1` done) keeps
/// serving, and SIGTERM still stops it: a failed write to stdout or stderr is no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_output_nobody_reads_serves_and_stops_on_sigterm() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay, _agent, config_dir) = relay_and_agent(&api, dir.path(), &[]).await;
    let token_file = write(&config_dir.join(TOKEN_FILE_NAME), &api.token());
    let kubeconfig = dir.path().join("config");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let args = proxy_args(
        &relay,
        CONNECTION,
        &relay.send_key,
        &token_file,
        port,
        &kubeconfig,
    );
    let mut proxy = support::processes::spawn_unread(
        &args,
        &[("CLUSTERCONNECT_CONFIG_DIR", config_dir.as_os_str())],
        dir.path(),
    );
    let started = Instant::now();
    let served = loop {
        if kubeconfig.exists() {
            let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
            if out.status.success() {
                break true;
            }
        }
        if started.elapsed() > START_TIMEOUT {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(served, "kubectl never got an answer through the proxy");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(proxy.id().expect("pid")).expect("i32"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(PROMPT_EXIT, proxy.wait()).await;
    assert!(
        matches!(&status, Ok(Ok(s)) if s.success()),
        "the proxy did not exit 0 within {PROMPT_EXIT:?} of SIGTERM: {status:?}"
    );
}

/// `proxy --file -` leaves standard output to the kubeconfig alone (its readiness line goes
/// to standard error), so `proxy -f - > kc` makes a file kubectl can use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_printing_its_kubeconfig_keeps_stdout_a_kubeconfig() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay, _agent, config_dir) = relay_and_agent(&api, dir.path(), &[]).await;
    let token_file = config_dir.join(TOKEN_FILE_NAME);
    std::fs::write(&token_file, api.token()).expect("token file");
    let printed = dir.path().join("printed-kubeconfig");
    let args = proxy_args(
        &relay,
        CONNECTION,
        &relay.send_key,
        &token_file,
        0,
        Path::new("-"),
    );
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_clusterconnect"))
        .args(&args)
        .env("HOME", dir.path())
        .env("CLUSTERCONNECT_CONFIG_DIR", &config_dir)
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&printed).expect("stdout file"))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the proxy");
    let mut stderr = BufReader::new(proxy.stderr.take().expect("stderr")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(45), async {
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.starts_with("ready port=") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(ready, Ok(true)), "no readiness line on stderr");
    let text_out = std::fs::read_to_string(&printed).expect("printed kubeconfig");
    assert!(!text_out.contains("ready"), "{text_out}");
    let out = kubectl(&printed, &["get", "pods", "-A"], &[]).await;
    assert!(
        out.status.success() && text(&out.stdout).contains("web-0"),
        "{}",
        describe(&out)
    );
    let _ = proxy.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_started_before_the_agent_works_once_the_agent_connects() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let kubeconfig = dir.path().join("user-kubeconfig");
    let (proxy, port) = start_proxy(
        &relay,
        CONNECTION,
        &api.token(),
        &kubeconfig,
        &dir.path().join("proxy-config"),
    )
    .await;
    proxy
        .wait_for_output(
            Duration::from_secs(10),
            "the cluster agent is not connected to the relay yet",
        )
        .await
        .expect("the proxy warns that no agent is connected");
    assert!(kubeconfig.exists(), "the context is written anyway");

    // Before any agent: kubectl fails and says why.
    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("not connected to the relay"),
        "{}",
        describe(&out)
    );

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "unused");
    let agent = start_agent(&relay, &agent_kubeconfig, CONNECTION).await;
    proxy
        .wait_for_output(Duration::from_secs(45), &format!("ready port={port}"))
        .await
        .unwrap_or_else(|out| {
            panic!(
                "the proxy never became ready:\n{out}\nagent:\n{}",
                agent.output()
            )
        });

    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(
        out.status.success() && text(&out.stdout).contains("web-0"),
        "{}\nproxy:\n{}",
        describe(&out),
        proxy.output()
    );
}

// ---------------------------------------------------------------------------------------------
// Misconfiguration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_wrong_key_says_so_and_keeps_retrying() {
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    // Same rule name as the relay's, different key.
    let wrong_key = sas_new_key("listen").await;
    let wrong = write(&dir.path().join("wrong-listen.key"), &wrong_key);
    let agent_kubeconfig = api.write_kubeconfig(dir.path(), "unused");
    let mut agent = spawn(
        &agent_args(&relay, &agent_kubeconfig, CONNECTION, &wrong),
        &[],
    );
    // A refused key is a warning, not an exit: the agent retries (a rotated key file can fix
    // a running agent) and says so each time.
    let out = agent
        .wait_for(EXIT, |out| {
            out.matches("relay refused the listen token").count() >= 2
        })
        .await
        .unwrap_or_else(|out| panic!("no second refusal logged:\n{out}"));
    assert!(out.contains("--key-file") && out.contains("401"), "{out}");
    let secret = wrong_key
        .split_once("SharedAccessKey=")
        .map(|(_, k)| k.trim())
        .expect("a key");
    assert!(!out.contains(secret), "the key reached the log:\n{out}");
    agent.terminate();
    agent.wait(EXIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_a_wrong_send_key_exits_and_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let wrong = write(
        &dir.path().join("wrong-send.key"),
        &sas_new_key("send").await,
    );
    let token = write(&dir.path().join("token"), "some-token");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut proxy = spawn(
        &proxy_args(&relay, CONNECTION, &wrong, &token, 0, &kubeconfig),
        &[(
            "CLUSTERCONNECT_CONFIG_DIR",
            dir.path().join("proxy-config").as_os_str(),
        )],
    );
    let status = proxy.wait(EXIT).await;
    let out = proxy.output();
    assert!(
        status.is_some_and(|s| !s.success()),
        "proxy with a wrong key: {status:?}\n{out}"
    );
    assert!(
        out.contains("send token") && out.contains("--key-file"),
        "{out}"
    );
    assert!(
        !kubeconfig.exists(),
        "a proxy that cannot start must not write a context"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_on_a_taken_port_says_already_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(dir.path()).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let token = write(&dir.path().join("token"), "some-token");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut proxy = spawn(
        &proxy_args(
            &relay,
            CONNECTION,
            &relay.send_key,
            &token,
            port,
            &kubeconfig,
        ),
        &[(
            "CLUSTERCONNECT_CONFIG_DIR",
            dir.path().join("proxy-config").as_os_str(),
        )],
    );
    let status = proxy.wait(EXIT).await;
    let out = proxy.output();
    assert!(
        status.is_some_and(|s| !s.success()),
        "proxy on a taken port: {status:?}\n{out}"
    );
    assert!(
        out.contains("already in use") && out.contains(&port.to_string()),
        "{out}"
    );
    assert!(!kubeconfig.exists());
    drop(taken);
}

/// Watches hold a stream of a pooled tunnel connection each: once every connection carries
/// `--streams-per-connection`, the proxy opens another rather than queueing new requests
/// behind the agent's own per-connection limit (here the same 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_opens_more_tunnel_connections_as_watches_fill_them() {
    if !kubectl_available() {
        return;
    }
    const WATCHES: usize = 6;
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay_dir, agent_dir) = (dir.path().join("relay"), dir.path().join("agent"));
    for d in [&relay_dir, &agent_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let relay = start_relay(&relay_dir).await;
    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "agent-has-no-say");
    // The agent takes 2 streams per tunnel stream: past that, requests would wait there.
    let _agent = support::processes::start_agent_with(
        &relay,
        &agent_kubeconfig,
        CONNECTION,
        &[OsStr::new("--streams-per-connection"), OsStr::new("2")],
        &[],
    )
    .await;
    let token_file = write(&dir.path().join("token"), &api.token());
    let kubeconfig = dir.path().join("kubeconfig");
    let mut args = proxy_args(
        &relay,
        CONNECTION,
        &relay.send_key,
        &token_file,
        0,
        &kubeconfig,
    );
    args.extend(["--streams-per-connection".into(), "2".into()]);
    let proxy = spawn(
        &args,
        &[
            (
                "CLUSTERCONNECT_CONFIG_DIR",
                dir.path().join("proxy").as_os_str(),
            ),
            ("RUST_LOG", OsStr::new("info,clusterconnect::proxy=debug")),
        ],
    );
    proxy
        .wait_for(START_TIMEOUT, |t| {
            support::processes::proxy_port(t).is_some()
        })
        .await
        .unwrap_or_else(|out| panic!("proxy did not start:\n{out}"));

    let watches: Vec<_> = (0..WATCHES)
        .map(|_| support::spawn_kubectl(&kubeconfig, &["get", "pods", "-w"], &[], false))
        .collect();
    support::check::eventually("every watch reaches the apiserver", || {
        api.open_watches() == WATCHES
    })
    .await;
    // A plain request still goes through at once.
    let out = kubectl(&kubeconfig, &["get", "pods"], &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let opened = support::processes::logs(&proxy.output(), "opened pooled tunnel connection").len();
    assert!(
        opened >= WATCHES / 2,
        "{WATCHES} watches at 2 per connection opened only {opened} connections:\n{}",
        proxy.output()
    );
    for w in watches {
        let _ = w.kill().await;
    }
}

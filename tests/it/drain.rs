//! A rolling update of the agent, as Kubernetes does it: a new agent first, then SIGTERM to the
//! old one while a slow response (`logs -f`) and an exec session are in flight on it and
//! kubectl runs requests in loops. The real binaries and the real kubectl.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::check::{describe, eventually, text};
use support::kubectl::spawn_kubectl;
use support::processes::{start_agent, start_proxy, start_relay};
use support::{kubectl, kubectl_available, ApiServer};

const CONNECTION: &str = "rolling";
/// kubectl processes looping at once.
const LOOPS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_agent_update_fails_no_request_and_finishes_the_slow_one() {
    if !kubectl_available() {
        return;
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay_dir, agent_dir, user_dir) = (
        dir.path().join("relay"),
        dir.path().join("agent"),
        dir.path().join("user"),
    );
    for d in [&relay_dir, &agent_dir, &user_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut relay = start_relay(&relay_dir).await;
    let agent_kubeconfig = api.write_kubeconfig(&agent_dir, "agent-has-no-say");
    let mut old = start_agent(&relay, &agent_kubeconfig, CONNECTION).await;
    let kubeconfig = user_dir.join("config");
    let (mut proxy, _) = start_proxy(
        &relay,
        CONNECTION,
        &api.token(),
        &kubeconfig,
        &dir.path().join("proxy-config"),
    )
    .await;
    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
    assert!(out.status.success(), "{}", describe(&out));

    // The slow response, on the old agent (the only one yet).
    let mut follow = spawn_kubectl(&kubeconfig, &["logs", "-f", "web-0"], &[], false);
    eventually("the log follow reaches the apiserver", || {
        api.open_log_follows() == 1
    })
    .await;

    // And an interactive session, also on the old agent.
    let mut cat = spawn_kubectl(
        &kubeconfig,
        &["exec", "-i", "web-0", "--", "cat"],
        &[],
        true,
    );
    cat.write_stdin(b"before the update\n")
        .await
        .expect("stdin");
    cat.read_stdout_until(Duration::from_secs(20), |t| t.contains("before the update"))
        .await
        .unwrap_or_else(|seen| panic!("exec did not echo; it printed:\n{seen}"));

    // The new agent first, as a Deployment's rolling update starts it.
    let mut new = start_agent(&relay, &agent_kubeconfig, CONNECTION).await;

    // kubectl in loops, through both changes: several at once, so requests are in flight
    // at every moment of the drain.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            let (stop, done, kubeconfig) = (stop.clone(), done.clone(), kubeconfig.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let out = kubectl(&kubeconfig, &["get", "pods", "-A"], &[]).await;
                    if !out.status.success() || !text(&out.stdout).contains("web-0") {
                        failures.push(describe(&out));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failures
            })
        })
        .collect();
    eventually("the loop runs", || done.load(Ordering::SeqCst) >= 3).await;

    old.terminate();
    if let Err(out) = old
        .wait_for(Duration::from_secs(15), |t| t.contains("draining requests"))
        .await
    {
        panic!("the old agent did not start draining:\n{out}");
    }
    let at_drain = done.load(Ordering::SeqCst);
    eventually("requests go on while the old agent drains", || {
        done.load(Ordering::SeqCst) >= at_drain + 2 * LOOPS
    })
    .await;
    // The old agent is still up: the slow response holds it.
    assert!(
        old.wait(Duration::from_millis(0)).await.is_none(),
        "the old agent exited with a response in flight:\n{}",
        old.output()
    );

    // The slow body completes through the draining agent.
    api.append_log("default", "web-0", "written-while-draining");
    follow
        .read_stdout_until(Duration::from_secs(20), |t| {
            t.contains("written-while-draining")
        })
        .await
        .unwrap_or_else(|seen| panic!("the follow stopped early; it printed:\n{seen}"));
    api.end_log_follows("default", "web-0");
    let followed = follow.finish(Duration::from_secs(20)).await;
    assert!(followed.status.success(), "{}", describe(&followed));

    // The session, the last thing open on the old agent, goes on and ends when its user ends
    // it.
    cat.write_stdin(b"while draining\n").await.expect("stdin");
    let session = cat.finish(Duration::from_secs(20)).await;
    assert!(session.status.success(), "{}", describe(&session));
    assert_eq!(text(&session.stdout), "before the update\nwhile draining\n");

    // With nothing in flight the old agent exits 0 well before its drain period ends.
    let status = old.wait(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "old agent: {status:?}\n{}",
        old.output()
    );
    let at_exit = done.load(Ordering::SeqCst);
    eventually("requests go on after the old agent exited", || {
        done.load(Ordering::SeqCst) >= at_exit + LOOPS
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.expect("loop task"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rolling update; first:\n{}\nproxy:\n{}",
        failures.len(),
        done.load(Ordering::SeqCst),
        failures[0],
        proxy.output()
    );

    for p in [&mut proxy, &mut new, &mut relay.process] {
        p.terminate();
        assert!(p.wait(Duration::from_secs(30)).await.is_some());
    }
}

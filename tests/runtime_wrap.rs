//! The wrapper's process supervision with real child processes: exit status passthrough, signal
//! forwarding, death by signal, orphan reaping; and discovery giving up in bounded time.
//!
//! `run_child` is called as a library function in this test process; SIGTERM is sent to this
//! process, exactly as the kubelet sends it to the wrapper. The supervisor reaps with
//! `waitpid(-1)`, so the tests in this file run one at a time.

use dkron_ha::runtime::peers::ClusterSettings;
use dkron_ha::runtime::wrap::{
    LaunchPlan, PeerAnswer, SupervisorSignals, ask_peers_for_leader, run_child, wait_for_names,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn sh(script: &str) -> LaunchPlan {
    LaunchPlan {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..LaunchPlan::default()
    }
}

async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "child never wrote {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the supervisor and sends this process SIGTERM, as the kubelet does, once the child has
/// written `ready`.
async fn sigterm_once<F: std::future::Future>(ready: &Path, supervisor: F) -> F::Output {
    let terminator = async {
        wait_for_file(ready).await;
        kill(Pid::this(), Signal::SIGTERM).unwrap();
    };
    tokio::join!(supervisor, terminator).0
}

#[tokio::test]
async fn exit_status_is_passed_through() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut signals = SupervisorSignals::install().unwrap();
    for code in [0, 1, 42] {
        let exit = run_child(&sh(&format!("exit {code}")), &mut signals)
            .await
            .unwrap();
        assert_eq!(exit.code, code);
    }
}

#[tokio::test]
async fn sigterm_reaches_the_child_and_its_status_is_returned() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut signals = SupervisorSignals::install().unwrap();
    let plan = sh(&format!(
        "trap 'exit 7' TERM; touch {}; sleep 100 & wait",
        ready.display()
    ));
    let started = Instant::now();
    let exit = sigterm_once(&ready, run_child(&plan, &mut signals)).await;
    let exit = exit.unwrap();
    assert_eq!(exit.code, 7);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_asks_dkron_to_leave_before_the_child_gets_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (ready, term) = (dir.path().join("ready"), dir.path().join("term"));
    // Dkron's HTTP API as far as the leave goes: it records whether the child had its SIGTERM
    // yet when the leave came, and answers once it has "left".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaves = std::sync::Arc::new(std::sync::Mutex::new(Vec::<bool>::new()));
    let app = axum::Router::new().route(
        "/v1/leave",
        axum::routing::post({
            let (leaves, term) = (leaves.clone(), term.clone());
            move || async move {
                leaves.lock().unwrap().push(term.exists());
                tokio::time::sleep(Duration::from_millis(200)).await;
                "[]"
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut signals = SupervisorSignals::install().unwrap();
    let plan = LaunchPlan {
        leave_first: Some(("127.0.0.1".into(), port)),
        ..sh(&format!(
            "trap 'touch {}; exit 0' TERM; touch {}; sleep 100 & wait",
            term.display(),
            ready.display()
        ))
    };
    let exit = sigterm_once(&ready, run_child(&plan, &mut signals)).await;
    server.abort();
    assert_eq!(exit.unwrap().code, 0);
    assert!(term.exists(), "the child got its SIGTERM");
    assert_eq!(
        *leaves.lock().unwrap(),
        [false],
        "one leave, before the child's SIGTERM"
    );
}

#[tokio::test]
async fn a_dkron_that_cannot_leave_still_gets_its_sigterm() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // Nothing listens there: the leave fails at once and the signal is forwarded anyway.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut signals = SupervisorSignals::install().unwrap();
    let plan = LaunchPlan {
        leave_first: Some(("127.0.0.1".into(), port)),
        ..sh(&format!(
            "trap 'exit 7' TERM; touch {}; sleep 100 & wait",
            ready.display()
        ))
    };
    let exit = sigterm_once(&ready, run_child(&plan, &mut signals)).await;
    assert_eq!(exit.unwrap().code, 7);
}

#[tokio::test]
async fn child_killed_by_a_signal_gives_128_plus_the_signal() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut signals = SupervisorSignals::install().unwrap();
    let exit = run_child(&sh("kill -KILL $$"), &mut signals).await.unwrap();
    assert_eq!(exit.code, 128 + 9);
    // SIGTERM without a trap: the child dies of the forwarded signal.
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let plan = sh(&format!("touch {}; exec sleep 100", ready.display()));
    let supervisor = run_child(&plan, &mut signals);
    let terminator = async {
        wait_for_file(&ready).await;
        // `exec sleep` replaces the shell after `touch`; give it a moment to do so.
        tokio::time::sleep(Duration::from_millis(200)).await;
        kill(Pid::this(), Signal::SIGTERM).unwrap();
    };
    let (exit, ()) = tokio::join!(supervisor, terminator);
    assert_eq!(exit.unwrap().code, 128 + 15);
}

#[tokio::test]
async fn environment_changes_reach_the_child() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut signals = SupervisorSignals::install().unwrap();
    let mut plan = sh(r#"[ "$DKRON_NODE_NAME" = dkron-1 ] && [ -z "${HOME+set}" ]"#);
    plan.set_env = vec![("DKRON_NODE_NAME".into(), "dkron-1".into())];
    plan.remove_env = vec!["HOME".into()];
    assert_eq!(run_child(&plan, &mut signals).await.unwrap().code, 0);
}

#[tokio::test]
async fn orphans_of_the_child_are_reaped() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut signals = SupervisorSignals::install().unwrap();
    // The subshell exits at once, orphaning `sleep`, which is reparented to the wrapper (child
    // subreaper) and exits while the main child still runs.
    let exit = run_child(&sh("(sleep 0.2 &); sleep 1.5; exit 3"), &mut signals)
        .await
        .unwrap();
    assert_eq!(exit.code, 3);
    assert!(exit.orphans_reaped >= 1, "{exit:?}");
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut signals = SupervisorSignals::install().unwrap();
    let plan = LaunchPlan {
        program: "/nonexistent/dkron".into(),
        ..LaunchPlan::default()
    };
    let error = run_child(&plan, &mut signals)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("/nonexistent/dkron"), "{error}");
}

#[tokio::test]
async fn unresolvable_names_are_waited_for_in_bounded_time_and_nobody_answers() {
    // `.invalid` never resolves (RFC 6761): the wait must give up after the configured bound.
    let env = [
        ("DKRON_HA_STATEFULSET", "dkron"),
        ("DKRON_HA_SERVICE", "dkron-headless"),
        ("DKRON_HA_INITIAL_CLUSTER_SIZE", "3"),
        ("DKRON_HA_CLUSTER_DOMAIN", "invalid"),
        ("DKRON_HA_DNS_TIMEOUT_SECONDS", "1"),
        ("POD_NAME", "dkron-0"),
        ("POD_NAMESPACE", "jobs"),
        ("POD_IP", "10.244.1.7"),
    ];
    let settings = ClusterSettings::from_lookup(|name| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let started = Instant::now();
    assert!(!wait_for_names(&settings).await);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let answers = ask_peers_for_leader(&settings.other_peers()).await;
    assert_eq!(answers, vec![PeerAnswer::NoAnswer, PeerAnswer::NoAnswer]);
}

#[tokio::test]
async fn a_sighup_waits_until_dkron_answers_http() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // Dkron's HTTP API, answering only once `up` is set: before that, nothing listens.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut signals = SupervisorSignals::install().unwrap();
    // A shell without a HUP trap dies of SIGHUP, as Dkron does before its handlers exist.
    let plan = LaunchPlan {
        leave_first: Some(("127.0.0.1".into(), port)),
        ..sh(&format!("touch {}; sleep 100 & wait", ready.display()))
    };
    let opened = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let driver = {
        let opened = opened.clone();
        let ready = ready.clone();
        async move {
            wait_for_file(&ready).await;
            kill(Pid::this(), Signal::SIGHUP).unwrap();
            // Held: the child lives on while Dkron does not answer.
            tokio::time::sleep(Duration::from_millis(800)).await;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            *opened.lock().unwrap() = Some(Instant::now());
            let app = axum::Router::new().route("/health", axum::routing::get(|| async { "" }));
            axum::serve(listener, app).await.unwrap();
        }
    };
    let exit = tokio::select! {
        exit = run_child(&plan, &mut signals) => exit.unwrap(),
        () = driver => unreachable!("the server runs until the child is done"),
    };
    let ended = Instant::now();
    assert_eq!(
        exit.code,
        128 + Signal::SIGHUP as i32,
        "the SIGHUP reached the child"
    );
    let opened = opened
        .lock()
        .unwrap()
        .expect("the child lived until Dkron answered");
    assert!(ended >= opened, "the child died before Dkron answered");
}

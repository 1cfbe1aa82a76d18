//! The wrapper's decisions without processes or network: pod identity from the environment,
//! peer names, the bootstrap decision and the rewriting of Dkron's command line or environment.

use dkron_ha::runtime::peers::{AgentSettings, ClusterSettings, SettingsError};
use dkron_ha::runtime::wrap::{
    ClusterFlags, PeerAnswer, WrapError, bootstrap_expect, is_dkron_agent, plan_dkron_args,
    plan_launch, starts_last,
};
use std::collections::HashMap;
use std::time::Duration;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

fn pod_env() -> HashMap<&'static str, String> {
    HashMap::from([
        ("DKRON_HA_STATEFULSET", "dkron".to_owned()),
        ("DKRON_HA_SERVICE", "dkron-headless".to_owned()),
        ("DKRON_HA_INITIAL_CLUSTER_SIZE", "3".to_owned()),
        ("DKRON_HA_CLUSTER_DOMAIN", "cluster.local".to_owned()),
        ("POD_NAME", "dkron-1".to_owned()),
        ("POD_NAMESPACE", "jobs".to_owned()),
        ("POD_IP", "10.244.1.7".to_owned()),
    ])
}

fn settings_from(env: &HashMap<&'static str, String>) -> Result<ClusterSettings, SettingsError> {
    ClusterSettings::from_lookup(|name| env.get(name).cloned())
}

const PEER0: &str = "dkron-0.dkron-headless.jobs.svc.cluster.local";
const PEER2: &str = "dkron-2.dkron-headless.jobs.svc.cluster.local";

fn cold_start() -> ClusterFlags {
    ClusterFlags {
        bootstrap_expect: Some(3),
        retry_join: s(&[PEER0, PEER2]),
        node_name: "dkron-1".into(),
    }
}

fn leader_exists() -> ClusterFlags {
    ClusterFlags {
        bootstrap_expect: None,
        ..cold_start()
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn peers_are_the_headless_service_records_of_every_ordinal() {
    let settings = settings_from(&pod_env()).unwrap();
    assert_eq!(
        settings.peer_fqdns(),
        s(&[
            PEER0,
            "dkron-1.dkron-headless.jobs.svc.cluster.local",
            PEER2
        ])
    );
    assert_eq!(
        settings.own_fqdn(),
        "dkron-1.dkron-headless.jobs.svc.cluster.local"
    );
    assert_eq!(settings.other_peers(), s(&[PEER0, PEER2]));
    assert_eq!(settings.dns_timeout, Duration::from_secs(120));
}

#[test]
fn missing_variable_is_named_in_the_error() {
    for name in [
        "DKRON_HA_STATEFULSET",
        "DKRON_HA_SERVICE",
        "DKRON_HA_INITIAL_CLUSTER_SIZE",
        "POD_NAME",
        "POD_NAMESPACE",
        "POD_IP",
    ] {
        let mut env = pod_env();
        env.remove(name);
        let error = settings_from(&env).unwrap_err();
        assert_eq!(error, SettingsError::Missing(name));
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn the_leader_service_is_asked_for_a_leader_beside_the_other_initial_peers() {
    let mut env = pod_env();
    let settings = settings_from(&env).unwrap();
    assert_eq!(settings.leader_sources(), settings.other_peers());
    env.insert("DKRON_HA_LEADER_SERVICE", "dkron-leader".to_owned());
    let settings = settings_from(&env).unwrap();
    let mut want = settings.other_peers();
    want.push("dkron-leader.jobs.svc.cluster.local".to_owned());
    assert_eq!(settings.leader_sources(), want);
}

#[test]
fn invalid_values_are_refused_with_the_value() {
    for (name, value) in [
        ("DKRON_HA_INITIAL_CLUSTER_SIZE", "three"),
        ("DKRON_HA_INITIAL_CLUSTER_SIZE", "0"),
        ("POD_IP", "dkron-1"),
        ("DKRON_HA_DNS_TIMEOUT_SECONDS", "2m"),
        ("DKRON_HA_COLD_START_TIMEOUT_SECONDS", "0"),
        ("DKRON_HA_COLD_START_TIMEOUT_SECONDS", "-5"),
        ("DKRON_HA_NAME_WAIT_SECONDS", "1m"),
    ] {
        let mut env = pod_env();
        env.insert(name, value.to_owned());
        let error = settings_from(&env).unwrap_err().to_string();
        assert!(error.contains(name) && error.contains(value), "{error}");
    }
}

#[test]
fn cluster_domain_defaults_and_dns_timeout_is_configurable() {
    let mut env = pod_env();
    env.remove("DKRON_HA_CLUSTER_DOMAIN");
    env.insert("DKRON_HA_DNS_TIMEOUT_SECONDS", "1".to_owned());
    let settings = settings_from(&env).unwrap();
    assert_eq!(settings.peer_fqdn(0), PEER0);
    assert_eq!(settings.dns_timeout, Duration::from_secs(1));
    assert_eq!(settings.cold_start_timeout, Duration::from_secs(30));
    env.insert("DKRON_HA_COLD_START_TIMEOUT_SECONDS", "7".to_owned());
    let settings = settings_from(&env).unwrap();
    assert_eq!(settings.cold_start_timeout, Duration::from_secs(7));
    assert_eq!(settings.name_wait, Duration::from_secs(60));
    env.insert("DKRON_HA_NAME_WAIT_SECONDS", "5".to_owned());
    assert_eq!(
        settings_from(&env).unwrap().name_wait,
        Duration::from_secs(5)
    );
}

#[test]
fn any_peer_knowing_a_leader_means_no_bootstrap() {
    use PeerAnswer::*;
    assert_eq!(bootstrap_expect(3, &[NoAnswer, Leader]), None);
    assert_eq!(bootstrap_expect(3, &[NoLeader, NoLeader]), Some(3));
    assert_eq!(bootstrap_expect(3, &[NoAnswer, NoAnswer]), Some(3));
    assert_eq!(bootstrap_expect(1, &[]), Some(1));
    // A peer of a formed cluster that is electing: no bootstrap either.
    assert_eq!(bootstrap_expect(3, &[NoLeader, Formed]), None);
}

#[test]
fn community_chart_bootstrap_expect_is_replaced_by_the_cluster_size_on_cold_start() {
    let chart = s(&[
        "dkron",
        "agent",
        "--server",
        "--bootstrap-expect=1",
        "--log-level=info",
    ]);
    assert_eq!(
        plan_dkron_args(&chart, &cold_start()),
        s(&[
            "dkron",
            "agent",
            "--server",
            "--log-level=info",
            "--bootstrap-expect=3",
            &format!("--retry-join={PEER0}"),
            &format!("--retry-join={PEER2}"),
            "--node-name=dkron-1",
            "--retry-interval=1s",
        ])
    );
}

#[test]
fn on_a_cold_start_the_first_server_starts_after_the_others_to_bootstrap_them() {
    let mut env = pod_env();
    env.insert("POD_NAME", "dkron-0".to_owned());
    let first = settings_from(&env).unwrap();
    let second = settings_from(&pod_env()).unwrap();
    assert!(starts_last(&first, &cold_start()));
    assert!(!starts_last(&second, &cold_start()), "only ordinal 0 waits");
    assert!(
        !starts_last(&first, &leader_exists()),
        "a restart joins the leader at once"
    );
    let alone = ClusterFlags {
        retry_join: vec![],
        ..cold_start()
    };
    assert!(
        !starts_last(&first, &alone),
        "a single server has nobody to wait for"
    );
}

#[test]
fn joins_are_retried_every_second_unless_the_user_chose_an_interval() {
    let plain = s(&["dkron", "agent", "--server"]);
    let planned = plan_dkron_args(&plain, &leader_exists());
    assert_eq!(
        planned
            .iter()
            .filter(|a| a.starts_with("--retry-interval"))
            .collect::<Vec<_>>(),
        ["--retry-interval=1s"]
    );
    for user in [
        s(&["dkron", "agent", "--server", "--retry-interval=10s"]),
        s(&["dkron", "agent", "--server", "--retry-interval", "10s"]),
    ] {
        let planned = plan_dkron_args(&user, &leader_exists());
        assert!(planned.starts_with(&user), "{planned:?}");
        assert_eq!(
            planned
                .iter()
                .filter(|a| a.starts_with("--retry-interval"))
                .count(),
            1,
            "{planned:?}"
        );
    }
    // Set in the environment (flag > env: a flag of ours would win over the user's variable).
    let inherited = |name: &str| (name == "DKRON_RETRY_INTERVAL").then(|| "5s".to_string());
    let plan = plan_launch(&plain, &leader_exists(), inherited).unwrap();
    assert!(
        !plan.args.iter().any(|a| a.starts_with("--retry-interval")),
        "{:?}",
        plan.args
    );
    let script = s(&["/bin/sh", "-c", "exec dkron agent --server"]);
    let plan = plan_launch(&script, &leader_exists(), inherited).unwrap();
    assert!(
        !plan
            .set_env
            .iter()
            .any(|(k, _)| k == "DKRON_RETRY_INTERVAL")
    );
}

#[test]
fn restarting_server_does_not_bootstrap_again() {
    let split = s(&[
        "/usr/local/bin/dkron",
        "agent",
        "--server",
        "--bootstrap-expect",
        "3",
    ]);
    let planned = plan_dkron_args(&split, &leader_exists());
    assert!(
        !planned.iter().any(|a| a.contains("bootstrap-expect")),
        "{planned:?}"
    );
    assert!(!planned.contains(&"3".to_owned()), "{planned:?}");
    assert_eq!(
        &planned[..3],
        &s(&["/usr/local/bin/dkron", "agent", "--server"])[..]
    );
}

#[test]
fn every_bootstrap_expect_is_replaced_once() {
    let twice = s(&[
        "dkron",
        "agent",
        "--bootstrap-expect=5",
        "--bootstrap-expect",
        "7",
    ]);
    let planned = plan_dkron_args(&twice, &cold_start());
    let found: Vec<&String> = planned
        .iter()
        .filter(|a| a.contains("bootstrap-expect"))
        .collect();
    assert_eq!(found, vec!["--bootstrap-expect=3"]);
    assert!(!planned.contains(&"7".to_owned()));
}

#[test]
fn users_retry_join_and_node_name_are_kept() {
    let user = s(&[
        "dkron",
        "agent",
        "--server",
        "--retry-join",
        &format!("{PEER0}:8946"),
        "--retry-join=10.0.0.9",
        "--node-name=custom",
    ]);
    let planned = plan_dkron_args(&user, &leader_exists());
    assert_eq!(
        planned,
        s(&[
            "dkron",
            "agent",
            "--server",
            "--retry-join",
            &format!("{PEER0}:8946"),
            "--retry-join=10.0.0.9",
            "--node-name=custom",
            &format!("--retry-join={PEER2}"),
            "--retry-interval=1s",
        ])
    );
}

#[test]
fn node_name_from_the_environment_is_kept() {
    let plan = plan_launch(&s(&["dkron", "agent", "--server"]), &cold_start(), |name| {
        (name == "DKRON_NODE_NAME").then(|| "mine".to_owned())
    })
    .unwrap();
    assert!(!plan.args.iter().any(|a| a.starts_with("--node-name")));
    assert!(plan.set_env.is_empty());
}

#[test]
fn dkron_agent_gets_flags_and_no_environment() {
    let plan = plan_launch(&s(&["dkron", "agent", "--server"]), &cold_start(), no_env).unwrap();
    assert_eq!(plan.program, "dkron");
    assert_eq!(plan.args[..2], s(&["agent", "--server"])[..]);
    assert!(plan.args.contains(&"--bootstrap-expect=3".to_owned()));
    assert!(plan.set_env.is_empty() && plan.remove_env.is_empty() && plan.warnings.is_empty());
}

#[test]
fn inherited_bootstrap_expect_variable_is_removed_when_a_leader_exists() {
    let inherited = |name: &str| (name == "DKRON_BOOTSTRAP_EXPECT").then(|| "3".to_owned());
    for command in [
        s(&["dkron", "agent", "--server"]),
        s(&["sh", "-c", "exec dkron agent --server"]),
    ] {
        let plan = plan_launch(&command, &leader_exists(), inherited).unwrap();
        assert_eq!(
            plan.remove_env,
            s(&["DKRON_BOOTSTRAP_EXPECT"]),
            "{command:?}"
        );
        assert!(
            !plan
                .set_env
                .iter()
                .any(|(k, _)| k == "DKRON_BOOTSTRAP_EXPECT")
        );
    }
    // On a cold start the wrapper's own value wins; nothing to remove.
    let plan = plan_launch(
        &s(&["sh", "-c", "exec dkron agent"]),
        &cold_start(),
        inherited,
    )
    .unwrap();
    assert!(plan.remove_env.is_empty());
    assert!(
        plan.set_env
            .contains(&("DKRON_BOOTSTRAP_EXPECT".into(), "3".into()))
    );
}

#[test]
fn shell_command_gets_dkron_environment_variables() {
    let script = s(&[
        "/bin/sh",
        "-c",
        "exec dkron agent --server --log-level=debug",
    ]);
    let plan = plan_launch(&script, &cold_start(), no_env).unwrap();
    assert_eq!(plan.program, "/bin/sh");
    assert_eq!(plan.args, script[1..]);
    assert_eq!(
        plan.set_env,
        vec![
            ("DKRON_BOOTSTRAP_EXPECT".to_owned(), "3".to_owned()),
            ("DKRON_RETRY_JOIN".to_owned(), format!("{PEER0},{PEER2}")),
            ("DKRON_NODE_NAME".to_owned(), "dkron-1".to_owned()),
            ("DKRON_RETRY_INTERVAL".to_owned(), "1s".to_owned()),
        ]
    );
    assert!(plan.warnings.is_empty());
}

#[test]
fn shell_command_keeps_inherited_retry_join_values() {
    let inherited =
        |name: &str| (name == "DKRON_RETRY_JOIN").then(|| format!("10.0.0.9, {PEER2}:8946"));
    let plan = plan_launch(
        &s(&["sh", "-c", "exec dkron agent"]),
        &leader_exists(),
        inherited,
    )
    .unwrap();
    assert!(
        plan.set_env.contains(&(
            "DKRON_RETRY_JOIN".into(),
            format!("10.0.0.9,{PEER2}:8946,{PEER0}")
        )),
        "{:?}",
        plan.set_env
    );
    assert!(
        !plan
            .set_env
            .iter()
            .any(|(k, _)| k == "DKRON_BOOTSTRAP_EXPECT")
    );
}

#[test]
fn bootstrap_expect_inside_a_script_is_reported() {
    let script = s(&["sh", "-c", "exec dkron agent --server --bootstrap-expect=3"]);
    let plan = plan_launch(&script, &leader_exists(), no_env).unwrap();
    assert_eq!(plan.warnings.len(), 1);
    assert!(plan.warnings[0].contains("--bootstrap-expect"));
}

#[test]
fn only_dkron_agent_is_rewritten() {
    assert!(is_dkron_agent(&s(&["dkron", "agent"])));
    assert!(is_dkron_agent(&s(&["/opt/bin/dkron", "agent", "--server"])));
    assert!(!is_dkron_agent(&s(&["dkron", "version"])));
    assert!(!is_dkron_agent(&s(&["dkron-executor-shell", "agent"])));
    assert!(!is_dkron_agent(&s(&["sh", "-c", "dkron agent"])));
    // Renamed or Pro builds are Dkron by their `agent` subcommand; a shell named so is not.
    assert!(is_dkron_agent(&s(&["/usr/local/bin/dkron-pro", "agent"])));
    assert!(is_dkron_agent(&s(&["my-dkron", "agent", "--server"])));
    assert!(!is_dkron_agent(&s(&["/bin/sh", "agent"])));
    let plan = plan_launch(&s(&["dkron", "version"]), &cold_start(), no_env).unwrap();
    assert_eq!(plan.args, s(&["version"]));
}

#[test]
fn empty_command_is_an_error() {
    assert!(matches!(
        plan_launch(&[], &cold_start(), no_env),
        Err(WrapError::EmptyCommand)
    ));
}

#[test]
fn a_worker_joins_the_servers_headless_service_by_name_and_never_bootstraps() {
    let mut env = HashMap::from([
        ("DKRON_HA_AGENT_OF", "dkron".to_owned()),
        ("DKRON_HA_SERVICE", "dkron-headless".to_owned()),
        ("POD_NAME", "workers-7d9c-x2x4q".to_owned()),
        ("POD_NAMESPACE", "jobs".to_owned()),
    ]);
    let agent = AgentSettings::from_lookup(|name| env.get(name).cloned())
        .unwrap()
        .expect("a worker");
    assert_eq!(
        agent.servers_fqdn(),
        "dkron-headless.jobs.svc.cluster.local"
    );
    let flags = ClusterFlags {
        bootstrap_expect: None,
        retry_join: vec![agent.servers_fqdn()],
        node_name: agent.pod_name.clone(),
    };
    let args = plan_dkron_args(
        &s(&[
            "dkron",
            "agent",
            "--tag",
            "role=worker",
            "--bootstrap-expect=3",
        ]),
        &flags,
    );
    assert_eq!(
        args,
        s(&[
            "dkron",
            "agent",
            "--tag",
            "role=worker",
            "--retry-join=dkron-headless.jobs.svc.cluster.local",
            "--node-name=workers-7d9c-x2x4q",
            "--retry-interval=1s",
        ])
    );
    // A server's pod (no DKRON_HA_AGENT_OF) is not a worker; a worker lacking its Service is
    // an error that names it.
    env.remove("DKRON_HA_AGENT_OF");
    assert_eq!(
        AgentSettings::from_lookup(|name| env.get(name).cloned()).unwrap(),
        None
    );
    env.insert("DKRON_HA_AGENT_OF", "dkron".to_owned());
    env.remove("DKRON_HA_SERVICE");
    let error = AgentSettings::from_lookup(|name| env.get(name).cloned()).unwrap_err();
    assert!(error.to_string().contains("DKRON_HA_SERVICE"), "{error}");
}

//! Real nodes (tests/support/cluster.rs): kubelet + containerd + kube-proxy in a network
//! namespace per node, CoreDNS, local volumes, images built from the project's own static
//! executables. Needs root (CI runs as root).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::cluster::{Cluster, LOCAL_STORAGE_CLASS};
use support::images::{TESTBED_IMAGE, dkron_ha_image};

const NODES: u8 = 3;

fn cluster() -> &'static Cluster {
    Cluster::shared(NODES)
}

/// A node reboot takes that node's pods away for a while, a replica of the chart's webhook
/// among them (the API server then fails writes that dial it: "no route to host"). The tests
/// that need the webhook's pods hold it shared; the reboot holds it alone.
static NODE_REBOOT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test]
async fn every_node_reports_its_own_machine_id() {
    let host_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let cluster = cluster();
    let nodes: Api<Node> = Api::all(cluster.client().await);
    let listed = nodes.list(&ListParams::default()).await.unwrap();
    let mut ids: Vec<String> = listed
        .items
        .iter()
        .map(|node| {
            node.status
                .as_ref()
                .unwrap()
                .node_info
                .as_ref()
                .unwrap()
                .machine_id
                .clone()
        })
        .collect();
    assert_eq!(ids.len(), usize::from(NODES), "nodes: {ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), usize::from(NODES), "machine ids repeat: {ids:?}");
    let host_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    assert!(
        !ids.contains(&host_id.trim().to_owned()),
        "a node reports the host's machine id"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forwarding,
        "the host's forwarding changed"
    );
}

/// A pod of the test workload answering on :8080 (see examples/testbed.rs).
async fn get(http: &reqwest::Client, pod_ip: &str, path: &str) -> (u16, String) {
    match http.get(format!("http://{pod_ip}:8080{path}")).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, format!("{error:#}")),
    }
}

fn workload(name: &str) -> (Service, StatefulSet) {
    let service = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 8080 }],
        },
    }))
    .unwrap();
    let statefulset = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": NODES,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "affinity": { "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": { "matchLabels": { "app": name } },
                        "topologyKey": "kubernetes.io/hostname",
                    }] } },
                    "containers": [{
                        "name": "workload",
                        "image": TESTBED_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/testbed", "serve", "--data", "/data"],
                        "env": [{ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }],
                        "ports": [{ "containerPort": 8080 }],
                        "readinessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 1 },
                        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": LOCAL_STORAGE_CLASS,
                    "resources": { "requests": { "storage": "100Mi" } },
                },
            }],
        },
    }))
    .unwrap();
    (service, statefulset)
}

/// When the pod's containers started (RFC 3339 strings, by container).
fn started_at(pod: &Pod) -> Vec<Option<String>> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone());
    statuses
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let running = c.state.as_ref().and_then(|s| s.running.as_ref());
            running
                .and_then(|r| r.started_at.as_ref())
                .map(|t| serde_json::to_string(t).unwrap())
        })
        .collect()
}

/// Waits until the StatefulSet's `replicas` pods are all Running and ready, and none of them
/// still shows the container starts `stale` lists for its name (from before a reboot);
/// returns them by name. Fails with the nodes' log tails.
async fn running_pods(
    cluster: &Cluster,
    pods: &Api<Pod>,
    app: &str,
    replicas: usize,
    stale: &[(Option<String>, Vec<Option<String>>)],
) -> Vec<Pod> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let listed = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .unwrap();
        let ready: Vec<Pod> = listed
            .items
            .iter()
            .filter(|pod| {
                let status = pod.status.as_ref();
                let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let seen = (pod.metadata.name.clone(), started_at(pod));
                running && ready && !stale.contains(&seen)
            })
            .cloned()
            .collect();
        if ready.len() == replicas {
            let mut ready = ready;
            ready.sort_by_key(|pod| pod.metadata.name.clone());
            return ready;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = listed
                .items
                .iter()
                .map(|pod| {
                    format!(
                        "{} on {:?}: {:?}",
                        pod.metadata.name.as_deref().unwrap_or_default(),
                        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
                        pod.status
                    )
                })
                .collect();
            let logs: Vec<String> = cluster
                .node_names()
                .iter()
                .map(|node| cluster.node_logs(node))
                .collect();
            panic!(
                "pods of {app} not all Running after 180s:\n{}\n{}",
                states.join("\n"),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().unwrap().pod_ip.clone().unwrap()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().node_name.clone().unwrap()
}

#[tokio::test]
async fn a_statefulset_with_volumes_runs_on_every_node_resolves_its_peers_and_survives_a_reboot() {
    let cluster = cluster();
    let ns = cluster.control_plane.namespace("nodes").await;
    let client = cluster.client().await;
    let (service, statefulset) = workload("web");
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let created = Instant::now();
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &statefulset)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = running_pods(cluster, &pods, "web", NODES.into(), &[]).await;
    eprintln!(
        "StatefulSet of {NODES} with PVCs: all pods Running and ready {:.1}s after create",
        created.elapsed().as_secs_f64()
    );
    let mut nodes: Vec<String> = running.iter().map(node_of).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), usize::from(NODES), "one pod per node");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    // Every pod resolves every peer's headless name (CoreDNS through the kube-dns Service) and
    // reaches the API server as its ServiceAccount through the `kubernetes` Service.
    for pod in &running {
        for peer in &running {
            let peer_name = peer.metadata.name.clone().unwrap();
            let fqdn = format!("{peer_name}.web.{ns}.svc.cluster.local");
            let (status, body) = get(&http, &pod_ip(pod), &format!("/resolve/{fqdn}")).await;
            assert_eq!(
                (status, body.trim()),
                (200, pod_ip(peer).as_str()),
                "{:?} resolving {fqdn}",
                pod.metadata.name
            );
        }
        let (status, body) = get(&http, &pod_ip(pod), "/whoami").await;
        assert_eq!(
            status, 201,
            "SelfSubjectReview from {:?}: {body}",
            pod.metadata.name
        );
        assert!(
            body.contains(&format!("system:serviceaccount:{ns}:default")),
            "{body}"
        );
    }

    // A reboot of web-0's node keeps what web-0 wrote on its volume, and web-0 comes back.
    let first = &running[0];
    let marker = format!("written before {} rebooted", node_of(first));
    let response = http
        .put(format!("http://{}:8080/files/marker", pod_ip(first)))
        .body(marker.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let _alone = NODE_REBOOT.write().await;
    let rebooted = Instant::now();
    cluster
        .reboot_node(&node_of(first))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    eprintln!(
        "{} rebooted: Ready again after {:.1}s",
        node_of(first),
        rebooted.elapsed().as_secs_f64()
    );
    let back = running_pods(
        cluster,
        &pods,
        "web",
        NODES.into(),
        &[(first.metadata.name.clone(), started_at(first))],
    )
    .await;
    let back_first = back
        .iter()
        .find(|pod| pod.metadata.name == first.metadata.name)
        .unwrap();
    let (status, boots) = eventually_ok(&http, &pod_ip(back_first), "/boots").await;
    assert_eq!(status, 200);
    assert_eq!(
        boots.lines().count(),
        2,
        "web-0 started twice on its volume: {boots}"
    );
    eprintln!(
        "web-0 serving again {:.1}s after the reboot began",
        rebooted.elapsed().as_secs_f64()
    );
    let (status, text) = get(&http, &pod_ip(back_first), "/files/marker").await;
    assert_eq!((status, text), (200, marker));
}

/// GETs `path` until it answers 200 (the container may still be starting), at most a minute.
async fn eventually_ok(http: &reqwest::Client, pod_ip: &str, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(http, pod_ip, path).await;
        if status == 200 || Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn opted_in_dkron() -> (Service, StatefulSet) {
    let service = serde_json::from_value(json!({
        "metadata": { "name": "dkron" },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "app": "dkron" },
            "ports": [{ "name": "http", "port": 8080 }, { "name": "serf", "port": 8946 }],
        },
    }))
    .unwrap();
    let statefulset = serde_json::from_value(json!({
        "metadata": { "name": "dkron", "annotations": { "dkron-ha/enabled": "true" } },
        "spec": {
            "replicas": NODES,
            "serviceName": "dkron",
            "selector": { "matchLabels": { "app": "dkron" } },
            "template": {
                "metadata": { "labels": { "app": "dkron" } },
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "dkron",
                        "image": TESTBED_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/usr/local/bin/dkron"],
                        "args": ["agent", "--server", "--bootstrap-expect=3"],
                        "ports": [{ "containerPort": 8080 }],
                    }],
                },
            },
        },
    }))
    .unwrap();
    (service, statefulset)
}

#[tokio::test]
async fn the_charts_webhook_injects_a_statefulset_whose_pods_run_wrap_and_the_label_updater() {
    let _no_reboot = NODE_REBOOT.read().await;
    let cluster = cluster();
    cluster
        .install_chart(&[])
        .unwrap_or_else(|error| panic!("{error}"));
    let ns = cluster.control_plane.namespace("dkron").await;
    let client = cluster.client().await;
    let (service, statefulset) = opted_in_dkron();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let created = Instant::now();
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &statefulset)
        .await
        .unwrap();
    let template = sts.spec.unwrap().template.spec.unwrap();
    let init = template.init_containers.unwrap_or_default();
    assert_eq!(init[0].name, "dkron-ha-install");
    assert_eq!(init[0].image, Some(dkron_ha_image()));

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    let running = loop {
        let listed = pods
            .list(&ListParams::default().labels("app=dkron"))
            .await
            .unwrap();
        let all_running: Vec<Pod> = listed
            .items
            .iter()
            .filter(|pod| {
                let status = pod.status.as_ref();
                let phase = status.and_then(|s| s.phase.as_deref());
                let containers = status.and_then(|s| s.container_statuses.as_ref());
                let each_running = containers.is_some_and(|c| {
                    c.len() == 2
                        && c.iter()
                            .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                });
                phase == Some("Running") && each_running
            })
            .cloned()
            .collect();
        if all_running.len() == usize::from(NODES) {
            break all_running;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = listed
                .items
                .iter()
                .map(|pod| format!("{:?}: {:?}", pod.metadata.name, pod.status))
                .collect();
            let logs: Vec<String> = cluster
                .node_names()
                .iter()
                .map(|node| cluster.node_logs(node))
                .collect();
            panic!(
                "injected pods not all Running after 180s:\n{}\n{}",
                states.join("\n"),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "injected StatefulSet of {NODES}: every pod Running with both containers {:.1}s after create",
        created.elapsed().as_secs_f64()
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    for pod in &running {
        let name = pod.metadata.name.clone().unwrap();
        let status = pod.status.as_ref().unwrap();
        let install = &status.init_container_statuses.as_ref().unwrap()[0];
        let done = install.state.as_ref().and_then(|s| s.terminated.as_ref());
        assert_eq!(done.map(|t| t.exit_code), Some(0), "{name}: {install:?}");
        let (code, pid1) = eventually_ok(&http, &pod_ip(pod), "/testbed/pid1").await;
        assert_eq!(code, 200, "{name}: {pid1}");
        assert!(
            pid1.starts_with("/dkron-ha/bin/dkron-ha wrap -- /usr/local/bin/dkron agent"),
            "{name}: PID 1 is {pid1:?}"
        );
        // What the wrapper did, through the API server's log endpoint (kubelet).
        let logs = pods
            .logs(
                &name,
                &kube::api::LogParams {
                    container: Some("dkron".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(logs.contains("DNS names resolve"), "{name} logs:\n{logs}");
        assert!(logs.contains("--retry-join="), "{name} logs:\n{logs}");
    }
    // The label-updater sidecar labels the stand-in that says it leads, and only that one.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = pods
            .list(&ListParams::default().labels("app=dkron"))
            .await
            .unwrap();
        let labels: Vec<(String, Option<String>)> = listed
            .items
            .iter()
            .map(|pod| {
                let label = pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("dkron-ha/leader").cloned());
                (pod.metadata.name.clone().unwrap(), label)
            })
            .collect();
        let want = |name: &str| Some(if name == "dkron-0" { "true" } else { "false" }.to_owned());
        if labels.iter().all(|(name, label)| *label == want(name)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dkron-ha/leader labels after 60s: {labels:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_node_whose_kubelet_fails_shows_the_kubelet_log_and_deleting_it_leaves_nothing() {
    let cluster = cluster();
    let error = cluster
        .add_node(&["--no-such-flag"])
        .await
        .expect_err("a kubelet with an unknown flag never gets Ready");
    assert!(
        error.contains("kubelet died") && error.contains("unknown flag: --no-such-flag"),
        "the error shows the kubelet's log tail: {error}"
    );
    let name = format!("node-{}", NODES + 1);
    let netns = cluster
        .netns(&name)
        .expect("the failed node is still listed");
    cluster
        .delete_node(&name)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(cluster.netns(&name).is_none());
    assert!(!std::path::Path::new("/run/netns").join(&netns).exists());
    assert!(!std::path::Path::new("/etc/netns").join(&netns).exists());
    let nodes: Api<Node> = Api::all(cluster.client().await);
    assert!(nodes.get_opt(&name).await.unwrap().is_none());
}

/// Set in the child process of the SIGKILL test: the child starts a cluster and waits.
const SIGKILL_CHILD_ENV: &str = "DKRON_HA_SIGKILL_CHILD";

/// Not a test of its own: the child process of the next test, which runs it with `--ignored`
/// and the env var set.
#[test]
#[ignore = "the child process of a_sigkilled_test_binary_leaves_no_node_namespace_cgroup_process_or_dir_behind"]
fn cluster_in_a_child_process() {
    assert!(
        std::env::var_os(SIGKILL_CHILD_ENV).is_some(),
        "run only as the SIGKILL test's child"
    );
    let cluster = Cluster::start(1).unwrap_or_else(|error| panic!("{error}"));
    println!(
        "READY {} {}",
        cluster.netns("node-1").unwrap(),
        cluster.dir.display()
    );
    // The parent SIGKILLs this process; bounded in case it does not.
    std::thread::sleep(Duration::from_secs(300));
}

#[test]
fn a_sigkilled_test_binary_leaves_no_node_namespace_cgroup_process_or_dir_behind() {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cluster_in_a_child_process",
            "--ignored",
            "--nocapture",
        ])
        .env(SIGKILL_CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The child's own output, to show why it stopped if it never gets ready.
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let lines: Vec<String> = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    });
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(ready) = line.strip_prefix("READY ") {
                let _ = sender.send(ready.to_owned());
            }
        }
    });
    let ready = receiver.recv_timeout(Duration::from_secs(240));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    let ready = ready.unwrap_or_else(|error| {
        panic!(
            "the child's cluster did not start within 240s ({error}); its stderr ends:\n{}",
            errors.join().unwrap_or_default()
        )
    });
    let (netns, dir) = ready.split_once(' ').unwrap();
    let cluster_number = netns
        .strip_prefix("dkha")
        .and_then(|rest| rest.split('-').next())
        .unwrap()
        .to_owned();
    let leftovers = || {
        let mut left = Vec::new();
        let netns_path = std::path::Path::new("/run/netns").join(netns);
        let cgroup = format!("/sys/fs/cgroup/pids/dkron-ha-{cluster_number}");
        let bridge = format!("/sys/class/net/dkha{cluster_number}");
        for path in [netns_path.to_str().unwrap(), &cgroup, &bridge, dir] {
            if std::path::Path::new(path).exists() {
                left.push(path.to_owned());
            }
        }
        left
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leftovers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "left after SIGKILL");
}

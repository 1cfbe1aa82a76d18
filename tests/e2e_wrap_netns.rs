//! `dkron-ha wrap` as a pod runs it, in a network namespace of its own whose peer names resolve
//! through the normal resolver (`ip netns exec` mounts `/etc/netns/<ns>/hosts` over
//! `/etc/hosts`). The wrapped command is a shell script, as in the original Dkron manifests, so
//! the wrapper hands its settings over in Dkron's environment variables, which the script
//! prints. Real Dkron servers cannot be built here (see README "Limits"), so these cases cover
//! a cold start, where no peer answers. Needs root (CI runs as root).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dkron-ha");
const FQDN: &str = "dkron.jobs.svc.cluster.local";

/// A network namespace with the given addresses on its loopback and an /etc/hosts of its own.
struct TestHost {
    name: String,
    etc: PathBuf,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed (tests need root)");
}

impl TestHost {
    fn new(tag: &str, addresses: &[&str], hosts: &[(&str, &str)]) -> Self {
        let name = format!("dkronha-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run of the same pid would block this one.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        for address in addresses {
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ]);
        }
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        let mut file = String::from("127.0.0.1 localhost\n");
        for (address, host) in hosts {
            file.push_str(&format!("{address} {host}\n"));
        }
        std::fs::write(etc.join("hosts"), file).unwrap();
        Self { name, etc }
    }

    /// Runs `dkron-ha wrap -- sh -c SCRIPT` as pod `pod` with IP `pod_ip` in this namespace.
    fn wrap(&self, pod: &str, pod_ip: &str, dns_timeout: u64, script: &str) -> (Output, Duration) {
        let started = Instant::now();
        let output = Command::new("ip")
            .args([
                "netns", "exec", &self.name, BIN, "wrap", "--", "/bin/sh", "-c", script,
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DKRON_HA_STATEFULSET", "dkron")
            .env("DKRON_HA_SERVICE", "dkron")
            .env("DKRON_HA_INITIAL_CLUSTER_SIZE", "3")
            .env("DKRON_HA_CLUSTER_DOMAIN", "cluster.local")
            .env("DKRON_HA_DNS_TIMEOUT_SECONDS", dns_timeout.to_string())
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", "jobs")
            .env("POD_IP", pod_ip)
            // A bootstrap-expect from the user's own environment is overridden on a cold start.
            .env("DKRON_BOOTSTRAP_EXPECT", "1")
            .output()
            .expect("run wrap");
        (output, started.elapsed())
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

const PRINT_SETTINGS: &str = "echo BOOT=$DKRON_BOOTSTRAP_EXPECT; echo JOIN=$DKRON_RETRY_JOIN; echo NODE=$DKRON_NODE_NAME; exit 3";

fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {stdout:?}"))
}

#[test]
fn a_cold_start_with_resolvable_peers_bootstraps_with_the_cluster_size() {
    let peers = [
        ("10.77.0.1", format!("dkron-0.{FQDN}")),
        ("10.77.0.2", format!("dkron-1.{FQDN}")),
        ("10.77.0.3", format!("dkron-2.{FQDN}")),
    ];
    let hosts: Vec<(&str, &str)> = peers.iter().map(|(a, h)| (*a, h.as_str())).collect();
    let host = TestHost::new("cold", &["10.77.0.1", "10.77.0.2", "10.77.0.3"], &hosts);
    let (output, _) = host.wrap("dkron-1", "10.77.0.2", 30, PRINT_SETTINGS);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The script's own exit status comes back through the wrapper.
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(line(&stdout, "BOOT="), "3", "{stderr}");
    let join: Vec<&str> = line(&stdout, "JOIN=").split(',').collect();
    assert!(
        join.contains(&format!("dkron-0.{FQDN}").as_str()),
        "{join:?}"
    );
    assert!(
        join.contains(&format!("dkron-2.{FQDN}").as_str()),
        "{join:?}"
    );
    assert!(
        !join.iter().any(|j| j.starts_with("dkron-1.")),
        "joins itself: {join:?}"
    );
    assert_eq!(line(&stdout, "NODE="), "dkron-1");
}

#[test]
fn an_unresolvable_own_name_is_waited_for_within_the_bound_then_the_pod_proceeds() {
    // Nothing resolves: the headless Service is missing or lacks publishNotReadyAddresses.
    let host = TestHost::new("noname", &["10.77.1.2"], &[]);
    let (output, elapsed) = host.wrap("dkron-1", "10.77.1.2", 2, PRINT_SETTINGS);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("waiting for DNS names"), "{stderr}");
    assert!(stderr.contains("still do not resolve"), "{stderr}");
    assert_eq!(line(&stdout, "BOOT="), "3");
    assert!(
        elapsed < Duration::from_secs(60),
        "wrapper did not give up: {elapsed:?}"
    );
}

#[test]
fn a_peer_whose_pod_is_gone_does_not_hold_a_restarting_server_for_the_whole_bound() {
    // dkron-2's pod (and so its DNS record) is gone; the DNS bound is 10 minutes.
    let hosts = [
        ("10.77.2.1", format!("dkron-0.{FQDN}")),
        ("10.77.2.2", format!("dkron-1.{FQDN}")),
    ];
    let hosts: Vec<(&str, &str)> = hosts.iter().map(|(a, h)| (*a, h.as_str())).collect();
    let host = TestHost::new("gone", &["10.77.2.1", "10.77.2.2"], &hosts);
    let (output, elapsed) = host.wrap("dkron-1", "10.77.2.2", 600, PRINT_SETTINGS);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("some peers do not"), "{stderr}");
    assert!(elapsed < Duration::from_secs(120), "waited {elapsed:?}");
}

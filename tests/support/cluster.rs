//! A cluster with real nodes: a control plane of its own (control_plane.rs) plus
//! kube-scheduler, CoreDNS and the controllers nodes need, and N nodes, each a network namespace
//! of its own (the way kind makes a node of a container) with its own containerd, kubelet, CNI
//! bridge and kube-proxy.
//!
//! Layout for cluster number `c` (1..=99, claimed by creating the host bridge `dkha<c>`):
//! - the bridge has 10.233.c.1/24 on the host; kube-apiserver and CoreDNS listen there;
//! - node `k` is namespace `dkha<c>-node-<k>`, `eth0` 10.233.c.(10+k) (veth `dkha<c>n<k>` on the
//!   bridge), pods 10.(100+c).k.0/24 on its own bridge `cni0` (10.(100+c).k.1, made here, so the
//!   CNI plugin runs with `isGateway: false` and never touches the host's forwarding);
//! - routes between pod ranges live in the node namespaces; the host only gets a route per pod
//!   range through the bridge (the API server calls webhooks at pod IPs); Services are
//!   kube-proxy's iptables rules inside each node namespace;
//! - a node's processes run in its network namespace and a mount namespace of its own (a
//!   private `/run`, its own `/etc/machine-id` from `/etc/netns/<ns>/machine-id`) and in cgroup
//!   `/dkron-ha-<c>/node-<k>` of every hierarchy (kubelet's `cgroupRoot`), so killing the
//!   cgroup's processes stops the node, shims and containers included, and its disk
//!   (`<dir>/node-<k>`) stays: that is a reboot.
//!
//! Nothing outlives the test binary: the components run under control_plane.rs's watchdogs,
//! and a janitor (its stdin held by this process) kills everything left in the cluster's
//! cgroups, deletes its namespaces, `/etc/netns` entries, cgroups and bridge, and removes the
//! dir, however the process ends. Needs root.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Node as KubeNode, PersistentVolume, PersistentVolumeSpec, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, PostParams};

use super::control_plane::{ControlPlane, Options, Supervised, build_tools};
use super::images::{Images, PAUSE_IMAGE};

/// Set to keep the cluster's dir (logs, node disks) after the test binary exits.
const KEEP_ENV: &str = "DKRON_HA_KEEP_CLUSTER";
const SERVICE_CIDR: &str = "10.0.0.0/24";
const CLUSTER_DNS: &str = "10.0.0.10";
const CNI_BIN: &str = "/usr/lib/cni";
/// What the nodes need from Debian (tests/tools/build.sh installs them as root).
const NODE_PACKAGES: &[(&str, &str)] = &[
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("iptables", "/usr/sbin/iptables"),
    ("conntrack", "/usr/sbin/conntrack"),
];
/// The StorageClass of the nodes' local PersistentVolumes.
pub const LOCAL_STORAGE_CLASS: &str = "local";
/// Local PersistentVolumes each node starts with.
pub const VOLUMES_PER_NODE: usize = 3;

/// Kills what is left in the cluster's cgroups, then removes its namespaces, cgroups, bridge
/// and dir, once this process is gone. Args: cluster number, dir.
const JANITOR: &str = r#"trap '' HUP INT TERM
cat >/dev/null
c=$1 dir=$2
procs=/sys/fs/cgroup/pids/dkron-ha-$c
i=0
while [ -d "$procs" ] && [ $i -lt 100 ]; do
	pids=$(find "$procs" -name cgroup.procs -exec cat {} + 2>/dev/null)
	[ -z "$pids" ] && break
	kill -KILL $pids 2>/dev/null
	sleep 0.1
	i=$((i+1))
done
for h in /sys/fs/cgroup/*/; do
	[ -d "${h}dkron-ha-$c" ] && find "${h}dkron-ha-$c" -depth -type d -exec rmdir {} + 2>/dev/null
done
for ns in $(ip netns list | sed -n "s/^\(dkha$c-node-[0-9]*\).*/\1/p"); do
	ip netns del "$ns"
	rm -rf "/etc/netns/$ns"
done
ip link del "dkha$c" 2>/dev/null
[ -e "$dir/keep" ] || rm -rf "$dir""#;

/// How each node process starts: joins the node's cgroups (`$1`); with `--boot NODE_DIR
/// MACHINE_ID` it is the first process of a node boot, in a fresh mount namespace: a private
/// /run, the node's machine id, /var/lib/cni and /var/log/containers of the node's disk, and
/// its pid in NODE_DIR/boot.pid for the others to join (nsenter).
const NODE_PROCESS: &str = r#"set -e
cgroup=$1; shift
for h in /sys/fs/cgroup/*/; do
	if [ -d "$h$cgroup" ]; then echo $$ >"$h$cgroup/cgroup.procs"; fi
done
if [ "$1" = --boot ]; then
	node=$2 machine_id=$3; shift 3
	mount -t tmpfs -o mode=755 tmpfs /run
	mount --bind "$node/var-lib-cni" /var/lib/cni
	mount --bind "$node/var-log-containers" /var/log/containers
	mount --bind "$machine_id" /etc/machine-id
	if [ -e /var/lib/dbus/machine-id ]; then mount --bind "$machine_id" /var/lib/dbus/machine-id; fi
	echo $$ >"$node/boot.pid"
fi
exec "$@""#;

pub struct Cluster {
    pub control_plane: ControlPlane,
    /// Node disks and logs (`node-<k>/`), CoreDNS's and the scheduler's logs.
    pub dir: PathBuf,
    /// The host's address on the cluster bridge (API server, CoreDNS).
    pub host_address: Ipv4Addr,
    pub images: &'static Images,
    number: u8,
    nodes: Mutex<BTreeMap<String, Node>>,
    /// Held, never read: the janitor (first), kube-scheduler, CoreDNS.
    processes: Mutex<Vec<Supervised>>,
}

struct Node {
    number: u8,
    /// Its network namespace.
    netns: String,
    dir: PathBuf,
    /// containerd, kubelet, kube-proxy while it runs.
    processes: Vec<Supervised>,
    /// Added to kubelet's flags.
    kubelet_args: Vec<String>,
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes once per test binary (later calls return the same one,
    /// whatever they ask for). Blocking; safe from any thread or tokio runtime.
    pub fn shared(nodes: u8) -> &'static Cluster {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            std::thread::spawn(move || Cluster::start(nodes))
                .join()
                .unwrap_or_else(|_| Err("the cluster's start-up thread panicked".into()))
        });
        match started {
            Ok(cluster) => cluster,
            Err(message) => panic!("{message}"),
        }
    }

    /// Starts a cluster with `nodes` nodes (blocking; never on a tokio runtime's thread).
    pub fn start(nodes: u8) -> Result<Cluster, String> {
        let started = Instant::now();
        // Installs the nodes' packages too (as root on Debian), so it goes first.
        build_tools()?;
        check_node_packages()?;
        for tool in ["kube-scheduler", "kubelet", "kube-proxy", "coredns", "helm"] {
            if !ControlPlane::tool(tool).is_file() {
                return Err(format!(
                    "tests/tools/build.sh did not produce {}",
                    ControlPlane::tool(tool).display()
                ));
            }
        }
        let images = Images::shared()?;
        let (number, janitor, dir) = claim_cluster_number()?;
        let host_address = Ipv4Addr::new(10, 233, number, 1);
        let bridge = format!("dkha{number}");
        ip(&["addr", "add", &format!("{host_address}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;

        let control_plane = ControlPlane::start(&Options {
            address: host_address,
            apiserver_args: vec![
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                // Webhooks and aggregated APIs are dialled at their endpoints (pod IPs, routed
                // through the bridge), not at ClusterIPs, which exist only inside the nodes.
                "--enable-aggregator-routing=true".into(),
            ],
            controllers: vec![
                "node-lifecycle-controller",
                "persistentvolume-binder-controller",
                "endpoints-controller",
                "endpointslice-mirroring-controller",
                "pod-garbage-collector-controller",
                "taint-eviction-controller",
                "daemonset-controller",
            ],
            controller_manager_args: vec![],
        })?;
        let cluster = Cluster {
            control_plane,
            dir,
            host_address,
            images,
            number,
            nodes: Mutex::new(BTreeMap::new()),
            processes: Mutex::new(vec![janitor]),
        };
        if std::env::var_os(KEEP_ENV).is_some() {
            let _ = fs::write(cluster.dir.join("keep"), "");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("start-up runtime: {error}"))?;
        runtime.block_on(async {
            cluster.start_scheduler_and_dns().await?;
            for k in 1..=nodes {
                cluster.create_node(k, &[])?;
            }
            for k in 1..=nodes {
                cluster.wait_node_ready(&node_name(k)).await?;
            }
            cluster.local_volumes(VOLUMES_PER_NODE).await?;
            Ok::<_, String>(())
        })?;
        eprintln!(
            "cluster {number} with {nodes} nodes ready in {:.1}s: {} (dir {})",
            started.elapsed().as_secs_f64(),
            cluster.control_plane.server,
            cluster.dir.display()
        );
        Ok(cluster)
    }

    /// A fresh admin client.
    pub async fn client(&self) -> kube::Client {
        self.control_plane.client().await
    }

    /// The node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.lock().unwrap().keys().cloned().collect()
    }

    /// The pod range of node `name`, e.g. `10.101.1.0/24`.
    pub fn pod_cidr(&self, name: &str) -> Option<String> {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .get(name)
            .map(|node| format!("10.{}.{}.0/24", 100 + u16::from(self.number), node.number))
    }

    /// The node's network namespace (e.g. for `ip netns exec` checks from a test).
    pub fn netns(&self, name: &str) -> Option<String> {
        self.nodes
            .lock()
            .unwrap()
            .get(name)
            .map(|n| n.netns.clone())
    }

    async fn start_scheduler_and_dns(&self) -> Result<(), String> {
        let kubeconfig = self.control_plane.kubeconfig.display().to_string();
        let scheduler = Supervised::start(
            "kube-scheduler",
            &ControlPlane::tool("kube-scheduler"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
            ],
            self.dir.join("kube-scheduler.log"),
        )?;
        self.processes.lock().unwrap().push(scheduler);

        let corefile = self.dir.join("Corefile");
        let corefile_text = format!(
            ".:53 {{\n    bind {host}\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        kubeconfig {kubeconfig} dkron-ha-test\n        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 5\n    }}\n    cache 5\n}}\n",
            host = self.host_address
        );
        fs::write(&corefile, corefile_text).map_err(|e| format!("write Corefile: {e}"))?;
        let coredns = Supervised::start(
            "coredns",
            &ControlPlane::tool("coredns"),
            &["-conf".into(), corefile.display().to_string()],
            self.dir.join("coredns.log"),
        )?;
        self.processes.lock().unwrap().push(coredns);

        // kube-dns: a Service without selector whose endpoint is CoreDNS on the host.
        let client = self.client().await;
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "kube-dns", "namespace": "kube-system",
                          "labels": { "k8s-app": "kube-dns" } },
            "spec": { "clusterIP": CLUSTER_DNS, "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" } ] },
        }))
        .expect("kube-dns Service");
        create(&Api::namespaced(client.clone(), "kube-system"), &service).await?;
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "kube-dns-host", "namespace": "kube-system",
                          "labels": { "kubernetes.io/service-name": "kube-dns",
                                      "endpointslice.kubernetes.io/managed-by": "dkron-ha-tests" } },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": [self.host_address.to_string()],
                            "conditions": { "ready": true } }],
            "ports": [ { "name": "dns", "port": 53, "protocol": "UDP" },
                       { "name": "dns-tcp", "port": 53, "protocol": "TCP" } ],
        }))
        .expect("kube-dns EndpointSlice");
        create(&Api::namespaced(client, "kube-system"), &slice).await?;
        Ok(())
    }

    /// Adds a node (the next number) whose kubelet also gets `kubelet_args`, boots it and
    /// waits until it is Ready; returns its name. An error carries the node's log tails.
    pub async fn add_node(&self, kubelet_args: &[&str]) -> Result<String, String> {
        let k = self
            .nodes
            .lock()
            .unwrap()
            .values()
            .map(|n| n.number)
            .max()
            .unwrap_or(0)
            + 1;
        if k > 200 {
            return Err("at most 200 nodes".into());
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.create_node(k, kubelet_args))
                .join()
                .unwrap_or_else(|_| Err("node creation panicked".into()))
        })?;
        self.wait_node_ready(&node_name(k)).await?;
        Ok(node_name(k))
    }

    /// Creates node `k` (namespace, disk, credentials, images) and boots it.
    fn create_node(&self, k: u8, kubelet_args: &[&str]) -> Result<(), String> {
        let name = node_name(k);
        let node = Node {
            number: k,
            netns: format!("dkha{}-{name}", self.number),
            dir: self.dir.join(&name),
            processes: Vec::new(),
            kubelet_args: kubelet_args.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        for sub in [
            "var-lib-cni",
            "var-log-containers",
            "cni/net.d",
            "containerd",
            "kubelet",
            "pod-logs",
            "volume-plugins",
            "volumes",
        ] {
            mkdir(&node.dir.join(sub))?;
        }
        // Mount points for NODE_PROCESS's binds (empty dirs on the host, as on any node).
        mkdir(Path::new("/var/lib/cni"))?;
        mkdir(Path::new("/var/log/containers"))?;
        let etc = PathBuf::from("/etc/netns").join(&node.netns);
        mkdir(&etc)?;
        let machine_id = random_machine_id()?;
        write(&etc.join("machine-id"), &format!("{machine_id}\n"))?;
        self.write_node_config(&name, &node)?;
        self.nodes.lock().unwrap().insert(name.clone(), node);
        self.boot(&name)
    }

    fn write_node_config(&self, name: &str, node: &Node) -> Result<(), String> {
        let c = self.number;
        let k = node.number;
        let dir = &node.dir;
        let d = |sub: &str| dir.join(sub).display().to_string();
        let (cert, key) = self
            .control_plane
            .client_certificate(&format!("system:node:{name}"), &["system:nodes"])?;
        write(
            &dir.join("kubelet.kubeconfig"),
            &self.control_plane.certificate_kubeconfig(name, &cert, &key),
        )?;
        let (cert, key) = self
            .control_plane
            .client_certificate("system:kube-proxy", &[])?;
        write(
            &dir.join("kube-proxy.kubeconfig"),
            &self
                .control_plane
                .certificate_kubeconfig("kube-proxy", &cert, &key),
        )?;
        write(&dir.join("ca.crt"), self.control_plane.ca_pem())?;
        let containerd = format!(
            r#"version = 2
root = "{root}"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM withholds CAP_SYS_RESOURCE: a negative oom_score_adj fails every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "/run/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{conf}"
"#,
            root = d("containerd"),
            opt = d("containerd-opt"),
            conf = d("cni/net.d"),
        );
        write(&dir.join("containerd.toml"), &containerd)?;
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "dkron-ha-pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                // cni0 and its address are made by this file; a gateway bridge would set the
                // host's ip_forward.
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": format!("10.{}.{k}.0/24", 100 + u16::from(c)),
                        "rangeStart": format!("10.{}.{k}.10", 100 + u16::from(c)),
                        "gateway": format!("10.{}.{k}.1", 100 + u16::from(c)),
                    }]],
                    "routes": [{ "dst": "0.0.0.0/0", "gw": format!("10.{}.{k}.1", 100 + u16::from(c)) }],
                },
            }],
        });
        write(
            &dir.join("cni/net.d/10-dkron-ha.conflist"),
            &serde_json::to_string_pretty(&cni).unwrap(),
        )?;
        let node_ip = self.node_ip(k);
        let kubelet = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": { "enabled": false },
                "webhook": { "enabled": false },
                "x509": { "clientCAFile": d("ca.crt") },
            },
            "authorization": { "mode": "AlwaysAllow" },
            "address": node_ip.to_string(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/dkron-ha-{c}/{name}"),
            "failCgroupV1": false,
            "failSwapOn": false,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            "resolvConf": "",
            "volumePluginDir": d("volume-plugins"),
            "podLogsDir": d("pod-logs"),
            // Else kubelet adds KUBE-FIREWALL rules (inside the node, but nothing needs them).
            "makeIPTablesUtilChains": false,
            // Imported images can never be pulled again: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": false,
            "nodeStatusReportFrequency": "10s",
        });
        write(
            &dir.join("kubelet.yaml"),
            &serde_json::to_string_pretty(&kubelet).unwrap(),
        )?;
        let proxy = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": { "kubeconfig": d("kube-proxy.kubeconfig") },
            "hostnameOverride": name,
            "mode": "iptables",
            "clusterCIDR": format!("10.{}.0.0/16", 100 + u16::from(c)),
            // Replies from a Service backend on the same bridge must come back through the
            // node's NAT, without br_netfilter settings (which may not be per namespace).
            "iptables": { "masqueradeAll": true, "localhostNodePorts": false },
            // 0: leave the kernel's conntrack settings (some are global) alone.
            "conntrack": { "maxPerCore": 0, "min": 0,
                           "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s" },
            "healthzBindAddress": format!("{node_ip}:10256"),
            "metricsBindAddress": "127.0.0.1:10249",
        });
        write(
            &dir.join("kube-proxy.yaml"),
            &serde_json::to_string_pretty(&proxy).unwrap(),
        )?;
        Ok(())
    }

    fn node_ip(&self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, self.number, 10 + k)
    }

    /// Makes the node's network namespace as a fresh boot finds it: eth0 on the cluster
    /// bridge, the pods' bridge, forwarding on (in the namespace only), routes to the other
    /// nodes' pods, and theirs (and the host's) to this node's pods.
    fn create_network(&self, name: &str) -> Result<(), String> {
        let (netns, k) = {
            let nodes = self.nodes.lock().unwrap();
            let node = nodes.get(name).ok_or_else(|| format!("no node {name}"))?;
            (node.netns.clone(), node.number)
        };
        let c = self.number;
        let veth = format!("dkha{c}n{k}");
        let node_ip = self.node_ip(k);
        let pods = |k: u8| format!("10.{}.{k}.0/24", 100 + u16::from(c));
        let gateway = format!("10.{}.{k}.1/24", 100 + u16::from(c));
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &veth, "master", &format!("dkha{c}"), "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "add", "cni0", "type", "bridge"])?;
        ip(&["-n", &netns, "addr", "add", &gateway, "dev", "cni0"])?;
        ip(&["-n", &netns, "link", "set", "cni0", "up"])?;
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["sh", "-c", "echo 1 >/proc/sys/net/ipv4/ip_forward"]))?;
        ip(&[
            "-n",
            &netns,
            "route",
            "replace",
            SERVICE_CIDR,
            "via",
            &self.host_address.to_string(),
        ])?;
        let others: Vec<(String, u8)> = self
            .nodes
            .lock()
            .unwrap()
            .values()
            .filter(|other| other.number != k)
            .map(|other| (other.netns.clone(), other.number))
            .collect();
        for (other_netns, m) in others {
            let other_ip = self.node_ip(m).to_string();
            ip(&["-n", &netns, "route", "replace", &pods(m), "via", &other_ip])?;
            if Path::new("/run/netns").join(&other_netns).exists() {
                let this_ip = node_ip.to_string();
                ip(&[
                    "-n",
                    &other_netns,
                    "route",
                    "replace",
                    &pods(k),
                    "via",
                    &this_ip,
                ])?;
            }
        }
        ip(&[
            "route",
            "replace",
            &pods(k),
            "via",
            &node_ip.to_string(),
            "dev",
            &format!("dkha{c}"),
        ])?;
        Ok(())
    }

    fn cgroup(&self, name: &str) -> String {
        format!("dkron-ha-{}/{name}", self.number)
    }

    /// Boots node `name`: network, cgroups, containerd (images imported on its first boot),
    /// kubelet, kube-proxy. Returns once they run; [`Self::wait_node_ready`] waits for Ready.
    fn boot(&self, name: &str) -> Result<(), String> {
        self.create_network(name)?;
        let cgroup = self.cgroup(name);
        make_cgroup(&format!("{cgroup}/system"))?;
        let (netns, dir) = {
            let nodes = self.nodes.lock().unwrap();
            let node = &nodes[name];
            (node.netns.clone(), node.dir.clone())
        };
        let pid_file = dir.join("boot.pid");
        let _ = fs::remove_file(&pid_file);
        let system = format!("{cgroup}/system");
        let d = |sub: &str| dir.join(sub).display().to_string();
        let machine_id = format!("/etc/netns/{netns}/machine-id");
        let mut args = vec![
            format!("--net=/run/netns/{netns}"),
            "--".into(),
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "slave".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            NODE_PROCESS.into(),
            "sh".into(),
            system.clone(),
            "--boot".into(),
            dir.display().to_string(),
            machine_id,
            "containerd".into(),
            format!("--config={}", d("containerd.toml")),
        ];
        let containerd = Supervised::start(
            &format!("{name}/containerd"),
            Path::new("/usr/bin/nsenter"),
            &args,
            dir.join("containerd.log"),
        )?;
        self.push_process(name, containerd);
        let pid = self.wait_for(
            name,
            "containerd's boot pid",
            Duration::from_secs(20),
            || {
                fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
            },
        )?;
        let in_node = |program: &str| -> Vec<String> {
            vec![
                format!("--target={pid}"),
                "--mount".into(),
                "--net".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                NODE_PROCESS.into(),
                "sh".into(),
                system.clone(),
                program.into(),
            ]
        };
        let ctr = |rest: &[&str]| {
            let mut command = Command::new("nsenter");
            command.args(in_node("ctr")).args([
                "--address",
                "/run/containerd/containerd.sock",
                "--namespace",
                "k8s.io",
            ]);
            command.args(rest);
            command
        };
        self.wait_for(name, "containerd's socket", Duration::from_secs(30), || {
            ctr(&["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|status| status.success())
        })?;
        let listed = output(&mut ctr(&["images", "list", "-q"]))?;
        for (image, archive) in &self.images.archives {
            if !listed.lines().any(|line| line == image) {
                let archive = archive.display().to_string();
                output(&mut ctr(&[
                    "images",
                    "import",
                    "--no-unpack=false",
                    &archive,
                ]))
                .map_err(|error| format!("{name}: import {image}: {error}"))?;
            }
        }

        args = in_node(&ControlPlane::tool("kubelet").display().to_string());
        args.extend([
            format!("--config={}", d("kubelet.yaml")),
            format!("--kubeconfig={}", d("kubelet.kubeconfig")),
            format!("--root-dir={}", d("kubelet")),
            format!("--hostname-override={name}"),
            format!(
                "--node-ip={}",
                self.node_ip(self.nodes.lock().unwrap()[name].number)
            ),
            "--v=1".into(),
        ]);
        args.extend(
            self.nodes.lock().unwrap()[name]
                .kubelet_args
                .iter()
                .cloned(),
        );
        let kubelet = Supervised::start(
            &format!("{name}/kubelet"),
            Path::new("/usr/bin/nsenter"),
            &args,
            dir.join("kubelet.log"),
        )?;
        self.push_process(name, kubelet);
        args = in_node(&ControlPlane::tool("kube-proxy").display().to_string());
        args.extend([format!("--config={}", d("kube-proxy.yaml")), "--v=1".into()]);
        let proxy = Supervised::start(
            &format!("{name}/kube-proxy"),
            Path::new("/usr/bin/nsenter"),
            &args,
            dir.join("kube-proxy.log"),
        )?;
        self.push_process(name, proxy);
        Ok(())
    }

    fn push_process(&self, name: &str, process: Supervised) {
        if let Some(node) = self.nodes.lock().unwrap().get_mut(name) {
            node.processes.push(process);
        }
    }

    /// Polls `check` (blocking) until it yields, failing early with the log tails of the node's
    /// processes if one of them dies, or after `timeout`.
    fn wait_for<T>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return Ok(value);
            }
            if let Some(died) = self.dead_process(name) {
                return Err(format!("{name}: {what}: {died}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name}: {what}: not there after {}s\n{}",
                    timeout.as_secs(),
                    self.node_logs(name)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The failure of the first of the node's processes that exited, if one did.
    fn dead_process(&self, name: &str) -> Option<String> {
        let mut nodes = self.nodes.lock().unwrap();
        let node = nodes.get_mut(name)?;
        node.processes.iter_mut().find_map(|process| {
            process
                .exited()
                .is_some()
                .then(|| process.failure(&format!("{} died", process.name)))
        })
    }

    /// The log tails of every process of the node (for a failure message).
    pub fn node_logs(&self, name: &str) -> String {
        let nodes = self.nodes.lock().unwrap();
        match nodes.get(name) {
            Some(node) => node
                .processes
                .iter()
                .map(Supervised::log_tail)
                .collect::<Vec<_>>()
                .join("\n"),
            None => format!("(no node {name})"),
        }
    }

    /// Waits until Node `name` is Ready with no taints but a cordon's; on failure the error carries the
    /// node's log tails.
    pub async fn wait_node_ready(&self, name: &str) -> Result<(), String> {
        self.wait_node_ready_since(name, None).await
    }

    /// Same, with a Ready condition whose heartbeat is not older than `since` (a status the
    /// node posted after a boot, not the one from before it).
    async fn wait_node_ready_since(
        &self,
        name: &str,
        since: Option<std::time::SystemTime>,
    ) -> Result<(), String> {
        let since_seconds = since.map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64
        });
        let nodes: Api<KubeNode> = Api::all(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(died) = self.dead_process(name) {
                return Err(format!("node {name} did not get Ready: {died}"));
            }
            if let Ok(Some(node)) = nodes.get_opt(name).await {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|conditions| {
                        conditions.iter().any(|c| {
                            let fresh = match (since_seconds, &c.last_heartbeat_time) {
                                (None, _) => true,
                                // Strictly later: the last heartbeat before a stop can fall
                                // in the same second.
                                (Some(since), Some(beat)) => beat.0.as_second() > since,
                                (Some(_), None) => false,
                            };
                            c.type_ == "Ready" && c.status == "True" && fresh
                        })
                    });
                // A cordon's taint stays over a reboot: whoever cordoned the node lifts it.
                let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
                let tainted = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|taints| {
                        taints
                            .iter()
                            .any(|t| !(cordoned && t.key == "node.kubernetes.io/unschedulable"))
                    });
                if ready && !tainted {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {name} not Ready and untainted after 120s\n{}",
                    self.node_logs(name)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops node `name` as a power-off does: every process in it (kubelet, kube-proxy,
    /// containerd, shims, containers) is killed and its network namespace goes away; its disk
    /// (containerd's images, kubelet's dir, local volumes) stays.
    pub fn stop_node(&self, name: &str) -> Result<(), String> {
        let (netns, processes) = {
            let mut nodes = self.nodes.lock().unwrap();
            let node = nodes
                .get_mut(name)
                .ok_or_else(|| format!("no node {name}"))?;
            (node.netns.clone(), std::mem::take(&mut node.processes))
        };
        kill_cgroup(&self.cgroup(name))?;
        // Their components are dead: the watchdogs have exited or exit now.
        drop(processes);
        // The namespace's links go when the kernel frees it, which can be later: the veth
        // pair goes now, so a boot can make it again at once.
        let number = self.nodes.lock().unwrap()[name].number;
        let _ = ip(&["link", "del", &format!("dkha{}n{number}", self.number)]);
        let _ = ip(&["netns", "del", &netns]);
        Ok(())
    }

    /// Reboots node `name` (stop, then boot again) and waits until it is Ready.
    pub async fn reboot_node(&self, name: &str) -> Result<(), String> {
        let began = std::time::SystemTime::now();
        let name_owned = name.to_owned();
        let this: &Cluster = self;
        // The stop and boot block; keep the caller's runtime free.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    this.stop_node(&name_owned)?;
                    this.boot(&name_owned)
                })
                .join()
                .unwrap_or_else(|_| Err("reboot thread panicked".into()))
        })?;
        self.wait_node_ready_since(name, Some(began)).await
    }

    /// Deletes node `name`: stops it, removes its Node object, disk and namespace files.
    pub async fn delete_node(&self, name: &str) -> Result<(), String> {
        self.stop_node(name)?;
        let node = self.nodes.lock().unwrap().remove(name);
        let nodes: Api<KubeNode> = Api::all(self.client().await);
        match nodes.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(format!("delete Node {name}: {error}")),
        }
        if let Some(node) = node {
            let _ = fs::remove_dir_all(&node.dir);
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&node.netns));
            let pods = format!("10.{}.{}.0/24", 100 + u16::from(self.number), node.number);
            let _ = ip(&["route", "del", &pods]);
        }
        Ok(())
    }

    /// Imports an image archive (OCI or `docker save` format) into every running node's
    /// containerd, as `ctr images import` does.
    pub fn import_image(&self, archive: &Path) -> Result<(), String> {
        let nodes: Vec<(String, PathBuf)> = self
            .nodes
            .lock()
            .unwrap()
            .iter()
            .map(|(name, node)| (name.clone(), node.dir.join("boot.pid")))
            .collect();
        for (name, pid_file) in nodes {
            let pid = fs::read_to_string(&pid_file)
                .map_err(|error| format!("{name} is not running ({error})"))?;
            output(
                Command::new("nsenter")
                    .arg(format!("--target={}", pid.trim()))
                    .args(["--mount", "--net", "--", "ctr"])
                    .args(["--address", "/run/containerd/containerd.sock"])
                    .args(["--namespace", "k8s.io", "images", "import"])
                    .arg(archive),
            )
            .map_err(|error| format!("{name}: import {}: {error}", archive.display()))?;
        }
        Ok(())
    }

    /// Installs the chart as users do (`helm install dkron-ha chart -n dkron-ha`) with the
    /// locally built dkron-ha image and `sets` (`key=value`), and waits until it is ready.
    ///
    /// Its namespace enforces the `restricted` Pod Security Standard, so every install proves
    /// that the chart's pods are admitted and run under it.
    pub fn install_chart(&self, sets: &[&str]) -> Result<(), String> {
        let home = tempfile::tempdir().map_err(|error| format!("helm home: {error}"))?;
        let namespace = home.path().join("namespace.yaml");
        std::fs::write(
            &namespace,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: dkron-ha\n  labels:\n    \
             pod-security.kubernetes.io/enforce: restricted\n",
        )
        .map_err(|error| format!("namespace manifest: {error}"))?;
        output(
            Command::new(ControlPlane::tool("kubectl"))
                .arg("--kubeconfig")
                .arg(&self.control_plane.kubeconfig)
                .arg("apply")
                .arg("-f")
                .arg(&namespace),
        )?;
        let mut command = Command::new(ControlPlane::tool("helm"));
        command
            .args(["install", "dkron-ha", "chart", "--namespace", "dkron-ha"])
            .args(["--create-namespace", "--wait", "--timeout=3m"])
            // The chart's own image (imported on every node, never pulled).
            .arg("--set=image.pullPolicy=Never")
            .args(sets.iter().map(|set| format!("--set={set}")))
            .arg("--kubeconfig")
            .arg(&self.control_plane.kubeconfig)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HELM_CACHE_HOME", home.path().join("cache"))
            .env("HELM_CONFIG_HOME", home.path().join("config"))
            .env("HELM_DATA_HOME", home.path().join("data"));
        output(&mut command).map(|_| ()).map_err(|error| {
            let logs: Vec<String> = self
                .node_names()
                .iter()
                .map(|node| self.node_logs(node))
                .collect();
            format!("helm install: {error}\n{}", logs.join("\n"))
        })
    }

    /// Makes `per_node` local PersistentVolumes of 1Gi on every node (directories on the
    /// node's disk, bound only on that node) and the StorageClass [`LOCAL_STORAGE_CLASS`]
    /// (WaitForFirstConsumer, so the scheduler picks the node first).
    pub async fn local_volumes(&self, per_node: usize) -> Result<(), String> {
        let client = self.client().await;
        let class: StorageClass = serde_json::from_value(serde_json::json!({
            // Default, so claims that name no class (examples/dkron.yaml's) bind here too.
            "metadata": { "name": LOCAL_STORAGE_CLASS, "annotations": {
                "storageclass.kubernetes.io/is-default-class": "true" } },
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        }))
        .expect("StorageClass");
        create(&Api::all(client.clone()), &class).await?;
        let volumes: Api<PersistentVolume> = Api::all(client);
        let nodes: Vec<(String, PathBuf)> = self
            .nodes
            .lock()
            .unwrap()
            .iter()
            .map(|(name, node)| (name.clone(), node.dir.join("volumes")))
            .collect();
        for (name, dir) in nodes {
            for i in 0..per_node {
                let path = dir.join(format!("pv-{i}"));
                mkdir(&path)?;
                let volume = PersistentVolume {
                    metadata: kube::api::ObjectMeta {
                        name: Some(format!("{name}-pv-{i}")),
                        ..Default::default()
                    },
                    spec: Some(serde_json::from_value::<PersistentVolumeSpec>(serde_json::json!({
                        "capacity": { "storage": "1Gi" },
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": LOCAL_STORAGE_CLASS,
                        "local": { "path": path.display().to_string() },
                        "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                            { "key": "kubernetes.io/hostname", "operator": "In", "values": [name] }
                        ] }] } },
                    })).expect("PersistentVolumeSpec")),
                    ..Default::default()
                };
                create(&volumes, &volume).await?;
            }
        }
        Ok(())
    }
}

fn node_name(k: u8) -> String {
    format!("node-{k}")
}

/// Claims the first free cluster number by creating its host bridge (atomic: creating a link
/// that exists fails), then starts the janitor that gives everything back.
fn claim_cluster_number() -> Result<(u8, Supervised, PathBuf), String> {
    for number in 1..=99u8 {
        let bridge = format!("dkha{number}");
        let created = Command::new("ip")
            .args(["link", "add", &bridge, "type", "bridge"])
            .stderr(Stdio::null())
            .status()
            .map_err(|error| format!("run ip (the cluster needs iproute2 and root): {error}"))?;
        if !created.success() {
            continue;
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("dkron-ha-cluster-{number}-"))
            .tempdir()
            .map_err(|error| format!("create temp dir: {error}"))?
            .keep();
        let child = Command::new("sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("sh")
            .arg(number.to_string())
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("start the cluster janitor: {error}"))?;
        return Ok((
            number,
            Supervised::adopt("janitor", PathBuf::new(), child),
            dir,
        ));
    }
    Err("no free cluster number: bridges dkha1..dkha99 all exist (run `ip link` to see them; root is needed)".into())
}

fn check_node_packages() -> Result<(), String> {
    let missing: Vec<&str> = NODE_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the test nodes need the Debian packages {}: run `bash tests/tools/build.sh` as root, or `apt-get install -y --no-install-recommends {}`",
        missing.join(", "),
        missing.join(" ")
    ))
}

/// Creates `path` (and its parents) under every cgroup v1 hierarchy and the unified one;
/// cpuset dirs get their parent's cpus and mems (v1 starts them empty).
fn make_cgroup(path: &str) -> Result<(), String> {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = fs::read_dir(root).map_err(|error| format!("read {root:?}: {error}"))?;
    for hierarchy in hierarchies.flatten() {
        let base = hierarchy.path();
        let mut dir = base.clone();
        for part in path.split('/') {
            let parent = dir.clone();
            dir.push(part);
            if dir.is_dir() {
                continue;
            }
            fs::create_dir(&dir).map_err(|error| format!("create cgroup {dir:?}: {error}"))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(parent.join(file)) {
                    fs::write(dir.join(file), value.trim())
                        .map_err(|error| format!("write {:?}: {error}", dir.join(file)))?;
                }
            }
        }
    }
    Ok(())
}

/// SIGKILLs every process in cgroup `path` and below (the pids hierarchy sees them all)
/// until none is left, for at most 20 seconds.
fn kill_cgroup(path: &str) -> Result<(), String> {
    let top = Path::new("/sys/fs/cgroup/pids").join(path);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pids = Vec::new();
        let mut dirs = vec![top.clone()];
        while let Some(dir) = dirs.pop() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if Instant::now() > deadline {
            return Err(format!(
                "processes {pids:?} in cgroup {path} survived SIGKILL for 20s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A random machine id (32 lowercase hex digits), as systemd makes one.
fn random_machine_id() -> Result<String, String> {
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(|error| format!("read a random uuid: {error}"))?;
    Ok(uuid.trim().replace('-', ""))
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> Result<(), String> {
    output(command).map(|_| ())
}

fn output(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|error| format!("run {command:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|error| format!("create {}: {error}", path.display()))
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    fs::write(path, contents).map_err(|error| format!("write {}: {error}", path.display()))
}

async fn create<K>(api: &Api<K>, object: &K) -> Result<(), String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(format!(
            "create {} {:?}: {error}",
            std::any::type_name::<K>(),
            object.meta().name
        )),
    }
}

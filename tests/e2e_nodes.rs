//! Real nodes (tests/support/cluster.rs): kubelet + containerd + kube-proxy in a network
//! namespace per node, CoreDNS, local volumes, images built from the project's own static
//! executables. Needs root (CI runs as root).

mod support;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use support::cluster::Cluster;

const NODES: u8 = 3;

fn cluster() -> &'static Cluster {
    Cluster::shared(NODES)
}

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

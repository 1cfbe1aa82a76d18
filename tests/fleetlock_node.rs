//! Which Node a FleetLock id names: machine id, then system UUID, then the annotation.

use dkron_ha::fleetlock::node::{ID_ANNOTATION, MatchedBy, find_node_for_id, node_is_ready};
use dkron_ha::fleetlock::protocol::normalize_id;
use dkron_ha::fleetlock::{ErrorKind, app_specific_machine_id};
use k8s_openapi::api::core::v1::Node;

fn fcos_node() -> Node {
    serde_yaml_ng::from_str(include_str!("fixtures/fleetlock/node-fcos.yaml")).expect("fixture")
}

fn node(name: &str, machine_id: &str, system_uuid: &str) -> Node {
    let mut node = fcos_node();
    node.metadata.name = Some(name.to_owned());
    let info = node
        .status
        .as_mut()
        .and_then(|s| s.node_info.as_mut())
        .expect("fixture has nodeInfo");
    info.machine_id = machine_id.to_owned();
    info.system_uuid = system_uuid.to_owned();
    node
}

fn annotated(mut node: Node, value: &str) -> Node {
    node.metadata
        .annotations
        .get_or_insert_default()
        .insert(ID_ANNOTATION.to_owned(), value.to_owned());
    node
}

fn cluster() -> Vec<Node> {
    vec![
        node(
            "worker-1",
            "2e074e9b299c41a59923c51ae16f279b",
            "EC2A6B1D-7F3C-4E9B-8C11-0D2F5A3B9E47",
        ),
        node(
            "worker-2",
            "9a1f0c3e5b7d4e2f8a6c1b3d5e7f9a0b",
            "EC2B0000-1111-2222-3333-444455556666",
        ),
    ]
}

#[test]
fn zincatis_id_names_the_node_with_that_machine_id() {
    let nodes = cluster();
    let id = app_specific_machine_id("2e074e9b299c41a59923c51ae16f279b").expect("valid");
    let (found, rule) = find_node_for_id(&nodes, &id).expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("worker-1"));
    assert_eq!(rule, MatchedBy::MachineId);
}

#[test]
fn the_fixture_request_names_the_fixture_node() {
    let body = include_bytes!("fixtures/fleetlock/zincati-request.json");
    let params = dkron_ha::fleetlock::protocol::parse_client_params(body).expect("valid body");
    let nodes = vec![fcos_node()];
    let (found, _) = find_node_for_id(&nodes, &params.id).expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("worker-1"));
}

#[test]
fn a_raw_machine_id_also_names_its_node() {
    let nodes = cluster();
    let (found, rule) =
        find_node_for_id(&nodes, "9a1f0c3e5b7d4e2f8a6c1b3d5e7f9a0b").expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("worker-2"));
    assert_eq!(rule, MatchedBy::MachineId);
}

#[test]
fn system_uuid_matches_without_case_and_dashes() {
    let nodes = cluster();
    let id = normalize_id("ec2b0000-1111-2222-3333-444455556666").expect("valid");
    let (found, rule) = find_node_for_id(&nodes, &id).expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("worker-2"));
    assert_eq!(rule, MatchedBy::SystemUuid);
}

#[test]
fn the_annotation_names_a_node_nothing_else_matches() {
    let mut nodes = cluster();
    nodes.push(annotated(node("edge-1", "", ""), "Edge-Box-7"));
    let id = normalize_id("edge-box-7").expect("valid");
    let (found, rule) = find_node_for_id(&nodes, &id).expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("edge-1"));
    assert_eq!(rule, MatchedBy::Annotation);
}

#[test]
fn machine_id_wins_over_an_annotation_on_another_node() {
    let id = app_specific_machine_id("2e074e9b299c41a59923c51ae16f279b").expect("valid");
    let mut nodes = cluster();
    nodes.push(annotated(node("edge-1", "", ""), &id));
    let (found, _) = find_node_for_id(&nodes, &id).expect("found");
    assert_eq!(found.metadata.name.as_deref(), Some("worker-1"));
}

#[test]
fn two_nodes_with_one_machine_id_are_an_error_not_a_guess() {
    let mut nodes = cluster();
    nodes.push(node(
        "worker-1-clone",
        "2e074e9b299c41a59923c51ae16f279b",
        "OTHER",
    ));
    let id = app_specific_machine_id("2e074e9b299c41a59923c51ae16f279b").expect("valid");
    let error = find_node_for_id(&nodes, &id).expect_err("ambiguous");
    assert_eq!(error.kind(), ErrorKind::AmbiguousMachineId);
    let message = error.to_string();
    assert!(message.contains("worker-1, worker-1-clone"), "{message}");
}

#[test]
fn an_unknown_id_is_its_own_kind() {
    let nodes = cluster();
    let error = find_node_for_id(&nodes, "0123456789abcdef0123456789abcdef").expect_err("unknown");
    assert_eq!(error.kind(), ErrorKind::UnknownMachineId);
    assert!(error.to_string().contains(ID_ANNOTATION));
}

#[test]
fn empty_node_fields_never_match() {
    let nodes = vec![node("blank", "", "")];
    let error = find_node_for_id(&nodes, "x").expect_err("unknown");
    assert_eq!(error.kind(), ErrorKind::UnknownMachineId);
}

#[test]
fn readiness_follows_the_ready_condition() {
    let ready = fcos_node();
    assert!(node_is_ready(&ready));
    let mut not_ready = fcos_node();
    for condition in not_ready
        .status
        .as_mut()
        .and_then(|s| s.conditions.as_mut())
        .expect("conditions")
    {
        if condition.type_ == "Ready" {
            condition.status = "Unknown".to_owned();
        }
    }
    assert!(!node_is_ready(&not_ready));
    let mut no_status = fcos_node();
    no_status.status = None;
    assert!(!node_is_ready(&no_status));
}

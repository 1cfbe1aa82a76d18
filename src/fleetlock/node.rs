//! Which Node a FleetLock id names, and whether a Node is Ready. Pure functions of Node objects.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use super::FleetLockError;
use super::machine_id::app_specific_machine_id;
use super::protocol::normalize_id;

/// Set this annotation on a Node to the id its FleetLock client sends when neither its
/// machine id nor its system UUID gives that id (case and dashes are ignored).
pub const ID_ANNOTATION: &str = "dkron-ha/fleetlock-id";

/// Which rule tied an id to a Node, in the order the rules are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedBy {
    /// `status.nodeInfo.machineID`, as Zincati's app-specific id or as sent raw.
    MachineId,
    /// `status.nodeInfo.systemUUID`.
    SystemUuid,
    /// The [`ID_ANNOTATION`] annotation.
    Annotation,
}

impl MatchedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchedBy::MachineId => "status.nodeInfo.machineID",
            MatchedBy::SystemUuid => "status.nodeInfo.systemUUID",
            MatchedBy::Annotation => ID_ANNOTATION,
        }
    }
}

/// Tells whether a Node answers to an id.
type IdRule = fn(&Node, &str) -> bool;

/// Finds the one Node that `id` (already normalised) names. The rules are tried in order and
/// the first rule that matches any Node decides; two Nodes matching that rule is an error.
pub fn find_node_for_id<'a>(
    nodes: &'a [Node],
    id: &str,
) -> Result<(&'a Node, MatchedBy), FleetLockError> {
    let rules: [(MatchedBy, IdRule); 3] = [
        (MatchedBy::MachineId, machine_id_matches),
        (MatchedBy::SystemUuid, system_uuid_matches),
        (MatchedBy::Annotation, annotation_matches),
    ];
    for (rule, matches) in rules {
        let found: Vec<&Node> = nodes.iter().filter(|node| matches(node, id)).collect();
        match found.as_slice() {
            [] => continue,
            [node] => return Ok((node, rule)),
            several => {
                let mut names: Vec<String> = several.iter().map(|n| n.name_any()).collect();
                names.sort();
                return Err(FleetLockError::AmbiguousMachineId {
                    id: id.to_owned(),
                    matched_by: rule.as_str().to_owned(),
                    nodes: names,
                    annotation: ID_ANNOTATION.to_owned(),
                });
            }
        }
    }
    Err(FleetLockError::UnknownMachineId {
        id: id.to_owned(),
        annotation: ID_ANNOTATION.to_owned(),
    })
}

fn machine_id_matches(node: &Node, id: &str) -> bool {
    let Some(machine_id) = node_info(node).map(|info| info.machine_id.as_str()) else {
        return false;
    };
    normalized_equals(machine_id, id)
        || app_specific_machine_id(machine_id).is_ok_and(|app_id| app_id == id)
}

fn system_uuid_matches(node: &Node, id: &str) -> bool {
    node_info(node).is_some_and(|info| normalized_equals(&info.system_uuid, id))
}

fn annotation_matches(node: &Node, id: &str) -> bool {
    node.annotations()
        .get(ID_ANNOTATION)
        .is_some_and(|value| normalized_equals(value, id))
}

fn node_info(node: &Node) -> Option<&k8s_openapi::api::core::v1::NodeSystemInfo> {
    node.status.as_ref()?.node_info.as_ref()
}

fn normalized_equals(raw: &str, id: &str) -> bool {
    !raw.trim().is_empty() && normalize_id(raw).is_ok_and(|normalized| normalized == id)
}

/// A Node is Ready when its `Ready` condition is `True`.
pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

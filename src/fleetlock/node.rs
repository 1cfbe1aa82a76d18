//! Which Node a FleetLock id names, and whether a Node is Ready. Pure functions of Node objects:
//! [`ids_of`] lists the ids a Node answers to, [`NodeIds`] indexes them so a request finds its
//! Node without looking at every Node (the cache keeps one up to date, see [`super::cache`]).

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use super::FleetLockError;
use super::machine_id::app_specific_machine_id;
use super::protocol::normalize_id;

/// Set this annotation on a Node to the id its FleetLock client sends when neither its
/// machine id nor its system UUID gives that id (case and dashes are ignored).
pub const ID_ANNOTATION: &str = "dkron-ha/fleetlock-id";

/// Which rule tied an id to a Node, in the order the rules are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Finds the one Node that `id` (already normalised) names. The rules are tried in order and
/// the first rule that matches any Node decides; two Nodes matching that rule is an error.
pub fn find_node_for_id<'a>(
    nodes: &'a [Node],
    id: &str,
) -> Result<(&'a Node, MatchedBy), FleetLockError> {
    let (name, rule) = NodeIds::from_nodes(nodes).find(id)?;
    let node = nodes
        .iter()
        .find(|node| node.name_any() == name)
        .expect("the index names only these Nodes");
    Ok((node, rule))
}

/// The ids `node` answers to, normalised, with the rule of each: its machine id raw and as
/// Zincati's app-specific id, its system UUID, and the [`ID_ANNOTATION`] annotation.
pub fn ids_of(node: &Node) -> BTreeSet<(MatchedBy, String)> {
    let mut ids = BTreeSet::new();
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let mut add = |rule, raw: &str| {
        if let Some(id) = normalized(raw) {
            ids.insert((rule, id));
        }
    };
    if let Some(info) = info {
        add(MatchedBy::MachineId, &info.machine_id);
        if let Ok(app_id) = app_specific_machine_id(&info.machine_id) {
            add(MatchedBy::MachineId, &app_id);
        }
        add(MatchedBy::SystemUuid, &info.system_uuid);
    }
    if let Some(value) = node.annotations().get(ID_ANNOTATION) {
        add(MatchedBy::Annotation, value);
    }
    ids
}

fn normalized(raw: &str) -> Option<String> {
    (!raw.trim().is_empty())
        .then(|| normalize_id(raw).ok())
        .flatten()
}

/// Which Nodes answer to which id, by Node name.
#[derive(Clone, Debug, Default)]
pub struct NodeIds {
    by_id: HashMap<String, BTreeSet<(MatchedBy, String)>>,
    by_node: HashMap<String, BTreeSet<(MatchedBy, String)>>,
}

impl NodeIds {
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        let mut index = NodeIds::default();
        for node in nodes {
            index.insert(node);
        }
        index
    }

    /// Adds `node`, or replaces what was known of it.
    pub fn insert(&mut self, node: &Node) {
        let name = node.name_any();
        self.remove(&name);
        let ids = ids_of(node);
        for (rule, id) in &ids {
            let names = self.by_id.entry(id.clone()).or_default();
            names.insert((*rule, name.clone()));
        }
        self.by_node.insert(name, ids);
    }

    pub fn remove(&mut self, name: &str) {
        for (rule, id) in self.by_node.remove(name).unwrap_or_default() {
            if let Some(names) = self.by_id.get_mut(&id) {
                names.remove(&(rule, name.to_owned()));
                if names.is_empty() {
                    self.by_id.remove(&id);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }

    /// The name of the one Node `id` (already normalised) names, and by which rule: the first
    /// rule that matches any Node decides; two Nodes matching that rule is an error.
    pub fn find(&self, id: &str) -> Result<(String, MatchedBy), FleetLockError> {
        let matches = self.by_id.get(id).into_iter().flatten();
        let Some((rule, _)) = matches.clone().next() else {
            return Err(FleetLockError::UnknownMachineId {
                id: id.to_owned(),
                annotation: ID_ANNOTATION.to_owned(),
            });
        };
        let names: Vec<&String> = matches
            .filter(|(r, _)| r == rule)
            .map(|(_, name)| name)
            .collect();
        match names.as_slice() {
            [name] => Ok(((*name).clone(), *rule)),
            several => Err(FleetLockError::AmbiguousMachineId {
                id: id.to_owned(),
                matched_by: rule.as_str().to_owned(),
                nodes: several.iter().map(|name| (*name).clone()).collect(),
                annotation: ID_ANNOTATION.to_owned(),
            }),
        }
    }
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

//! What FleetLock reads on every request, as watches see it, so a request never lists every
//! Node and a refusal costs no API call: the Nodes (kube's reflector keeps them by name, and
//! [`NodeIds`] beside it says which FleetLock ids name which Node; a relist replaces both at
//! its end), the lock Leases and the slots ConfigMap ([`Watched`], used by [`super::lock`]).
//!
//! A cache may lag the API by a watch event. That never lets two Nodes take one slot: every
//! write to a Lease carries the resourceVersion its decision read, and after a conflict the
//! Lease is read from the API; a Node named in the lock state (holder or waiter) that the
//! cache does not have is read by name before it counts as gone; steady-state reads its Node
//! and the Leases from the API. An id the cache does not know answers `unknown_machine_id`;
//! Zincati asks again.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::task::AbortOnDropHandle;

use super::FleetLockError;
use super::node::{MatchedBy, NodeIds};

/// How long a request waits for a cache's first list before answering
/// `kubernetes_api_error`.
pub const READY_WAIT: Duration = Duration::from_secs(10);

/// The objects of one watch, kept by kube's reflector; dropping it stops the watch.
pub struct Watched<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    /// The namespace of `api`, which the store's keys carry.
    namespace: Option<String>,
    what: &'static str,
    _watch: AbortOnDropHandle<()>,
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts watching what `config` selects of `api` (in the background, on the current
    /// Tokio runtime); `what` names it in logs and errors, e.g. "the lock Leases".
    pub fn start(api: Api<K>, config: watcher::Config, what: &'static str) -> Self {
        let namespace = api.namespace().map(str::to_owned);
        let (store, writer) = reflector::store();
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|object: &mut K| object.managed_fields_mut().clear());
        let watch = reflector::reflector(writer, stream).for_each(move |event| {
            if let Err(error) = event {
                tracing::warn!(what, %error, "watch failed; retrying");
            }
            futures::future::ready(())
        });
        Watched {
            store,
            namespace,
            what,
            _watch: AbortOnDropHandle::new(tokio::spawn(watch)),
        }
    }

    /// Waits (at most [`READY_WAIT`]) until the first list is in the cache.
    pub async fn ready(&self) -> Result<(), FleetLockError> {
        match tokio::time::timeout(READY_WAIT, self.store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(FleetLockError::NotListed {
                what: self.what,
                waited: READY_WAIT,
            }),
        }
    }

    /// The object called `name`, once the first list is in.
    pub async fn get(&self, name: &str) -> Result<Option<Arc<K>>, FleetLockError> {
        self.ready().await?;
        let key = match &self.namespace {
            Some(namespace) => ObjectRef::new(name).within(namespace),
            None => ObjectRef::new(name),
        };
        Ok(self.store.get(&key))
    }

    /// Every object, once the first list is in.
    pub async fn all(&self) -> Result<Vec<Arc<K>>, FleetLockError> {
        self.ready().await?;
        Ok(self.store.state())
    }
}

/// The watch-fed Nodes and their ids; dropping it stops the watch.
pub struct NodeCache {
    store: Store<Node>,
    ids: Arc<RwLock<NodeIds>>,
    ready: tokio::sync::watch::Receiver<bool>,
    nodes: Api<Node>,
    _watch: AbortOnDropHandle<()>,
}

impl NodeCache {
    /// Starts watching every Node (in the background, on the current Tokio runtime).
    pub fn start(client: kube::Client) -> Self {
        let nodes: Api<Node> = Api::all(client);
        let (store, writer) = reflector::store();
        let ids = Arc::new(RwLock::new(NodeIds::default()));
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let stream = watcher(nodes.clone(), watcher::Config::default())
            .default_backoff()
            .modify(keep_what_fleetlock_reads);
        let mut index = IndexWriter {
            ids: ids.clone(),
            pending: None,
        };
        let watch = reflector::reflector(writer, stream).for_each(move |event| {
            match event {
                Ok(event) => {
                    if index.apply(&event) {
                        let _ = ready_tx.send(true);
                    }
                }
                Err(error) => tracing::warn!(%error, "watching Nodes failed; retrying"),
            }
            futures::future::ready(())
        });
        NodeCache {
            store,
            ids,
            ready,
            nodes,
            _watch: AbortOnDropHandle::new(tokio::spawn(watch)),
        }
    }

    /// Waits (at most [`READY_WAIT`]) until the first list of Nodes is in the cache.
    pub async fn ready(&self) -> Result<(), FleetLockError> {
        let mut ready = self.ready.clone();
        match tokio::time::timeout(READY_WAIT, ready.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(FleetLockError::NotListed {
                what: "Nodes",
                waited: READY_WAIT,
            }),
        }
    }

    /// The Node `id` (normalised) names, found in the cache.
    pub async fn node_for_id(&self, id: &str) -> Result<(Arc<Node>, MatchedBy), FleetLockError> {
        self.ready().await?;
        let (name, rule) = read(&self.ids).find(id)?;
        match self.get(&name).await? {
            Some(node) => Ok((node, rule)),
            // Deleted since the index saw it.
            None => Err(FleetLockError::UnknownMachineId {
                id: id.to_owned(),
                annotation: super::node::ID_ANNOTATION.to_owned(),
            }),
        }
    }

    /// The Node called `name`: from the cache, else read by name (`None`: it does not exist).
    pub async fn get(&self, name: &str) -> Result<Option<Arc<Node>>, FleetLockError> {
        match self.store.get(&ObjectRef::new(name)) {
            Some(node) => Ok(Some(node)),
            None => self.read(name).await,
        }
    }

    /// The Node called `name` as the API has it now, for decisions that act on its state.
    pub async fn read(&self, name: &str) -> Result<Option<Arc<Node>>, FleetLockError> {
        let node = self
            .nodes
            .get_opt(name)
            .await
            .map_err(FleetLockError::kube(format!("reading Node {name}")))?;
        Ok(node.map(Arc::new))
    }

    /// Which of `names` exist as Nodes (those the cache lacks are read by name).
    pub async fn existing<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeSet<String>, FleetLockError> {
        let mut existing = BTreeSet::new();
        for name in names {
            if self.get(name).await?.is_some() {
                existing.insert(name.to_owned());
            }
        }
        Ok(existing)
    }
}

fn read(ids: &RwLock<NodeIds>) -> std::sync::RwLockReadGuard<'_, NodeIds> {
    ids.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps only what FleetLock reads of a Node (its name, uid and resourceVersion, the
/// `dkron-ha/` annotations, `spec.unschedulable`, the Ready condition and `nodeInfo`): a
/// real Node also carries labels, managed fields, images, capacity and more, which would
/// multiply the cache's memory by the fleet's size.
fn keep_what_fleetlock_reads(node: &mut Node) {
    let metadata = &mut node.metadata;
    metadata.managed_fields = None;
    metadata.labels = None;
    metadata.owner_references = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|key, _| key.starts_with("dkron-ha/"));
    }
    node.spec = node.spec.take().map(|spec| NodeSpec {
        unschedulable: spec.unschedulable,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|status| NodeStatus {
        conditions: status
            .conditions
            .map(|all| all.into_iter().filter(|c| c.type_ == "Ready").collect()),
        node_info: status.node_info,
        ..NodeStatus::default()
    });
}

/// Follows the watch events into [`NodeIds`] as the reflector does into its store.
struct IndexWriter {
    ids: Arc<RwLock<NodeIds>>,
    /// The index being rebuilt by a (re)list.
    pending: Option<NodeIds>,
}

impl IndexWriter {
    /// Applies one event; true when a (re)list has just completed.
    fn apply(&mut self, event: &watcher::Event<Node>) -> bool {
        let write = || self.ids.write().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Apply(node) => write().insert(node),
            watcher::Event::Delete(node) => write().remove(&node.name_any()),
            watcher::Event::Init => self.pending = Some(NodeIds::default()),
            watcher::Event::InitApply(node) => {
                self.pending.get_or_insert_default().insert(node);
            }
            watcher::Event::InitDone => {
                let listed = self.pending.take().unwrap_or_default();
                tracing::info!(nodes = listed.len(), "Node cache (re)listed");
                *write() = listed;
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleetlock::drain::{CORDONED_ANNOTATION, cordoned_by_us, is_unschedulable};
    use crate::fleetlock::node::{ID_ANNOTATION, node_is_ready};
    use serde_json::json;

    #[test]
    fn a_trimmed_node_still_answers_to_its_ids_and_keeps_its_ready_and_cordon_state() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": "worker-1",
                "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"kubernetes.io/hostname": "worker-1"},
                "annotations": {
                    CORDONED_ANNOTATION: "true",
                    ID_ANNOTATION: "abc",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
                "managedFields": [{"manager": "kubelet"}],
            },
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24"},
            "status": {
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "True"},
                ],
                "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 1}],
                "capacity": {"cpu": "4"},
                "nodeInfo": {"machineID": "2e074e9b299c41a59923c51ae16f279b",
                    "systemUUID": "EC2A6B1D-7F3C-4E9B-8C11-0D2F5A3B9E47", "bootID": "",
                    "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                    "kubeletVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux",
                    "architecture": "amd64"},
            },
        }))
        .expect("a Node");
        let ids = super::super::node::ids_of(&node);
        keep_what_fleetlock_reads(&mut node);
        assert_eq!(super::super::node::ids_of(&node), ids);
        assert!(node_is_ready(&node) && cordoned_by_us(&node) && is_unschedulable(&node));
        assert_eq!(node.resource_version().as_deref(), Some("42"));
        assert_eq!(node.uid().as_deref(), Some("u-1"));
        assert_eq!(node.annotations().len(), 2);
        assert!(node.labels().is_empty() && node.managed_fields().is_empty());
        let status = node.status.as_ref().expect("status");
        assert!(status.images.is_none() && status.capacity.is_none());
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn a_relist_replaces_the_index_only_when_it_is_complete() {
        let node = |name: &str, id: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": {ID_ANNOTATION: id}},
            }))
            .expect("a Node")
        };
        let ids = Arc::new(RwLock::new(NodeIds::default()));
        let mut writer = IndexWriter {
            ids: ids.clone(),
            pending: None,
        };
        assert!(!writer.apply(&watcher::Event::Init));
        writer.apply(&watcher::Event::InitApply(node("a", "id-a")));
        assert!(
            read(&ids).find("ida").is_err(),
            "not before the list is complete"
        );
        assert!(writer.apply(&watcher::Event::InitDone));
        assert_eq!(read(&ids).find("ida").expect("found").0, "a");
        writer.apply(&watcher::Event::Apply(node("a", "id-b")));
        assert!(
            read(&ids).find("ida").is_err(),
            "a changed id replaces the old one"
        );
        assert_eq!(read(&ids).find("idb").expect("found").0, "a");
        writer.apply(&watcher::Event::Delete(node("a", "id-b")));
        assert!(read(&ids).is_empty());
        // A relist that no longer has a Node drops it.
        writer.apply(&watcher::Event::Apply(node("b", "id-c")));
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitDone);
        assert!(read(&ids).find("idc").is_err());
    }
}

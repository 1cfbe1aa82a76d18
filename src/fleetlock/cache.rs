//! The Nodes as a watch sees them, so a request never lists every Node: kube's reflector keeps
//! the Node objects by name, and [`NodeIds`] beside it says which FleetLock ids name which
//! Node. Both follow the same watch events (a relist replaces both at its end).
//!
//! The cache may lag the API by a watch event. That never lets two Nodes take one slot: the
//! Lease's resourceVersion still decides who holds a slot, and a Node named in the lock
//! state (holder or waiter) that the cache does not have is read by name before it counts as
//! gone. An id the cache does not know answers `unknown_machine_id`; Zincati asks again.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::task::AbortOnDropHandle;

use super::FleetLockError;
use super::node::{MatchedBy, NodeIds};

/// How long a request waits for the first list of Nodes before answering
/// `kubernetes_api_error`.
pub const READY_WAIT: Duration = Duration::from_secs(10);

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
            _ => Err(FleetLockError::NodesNotListed { waited: READY_WAIT }),
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

/// Drops what FleetLock never reads and a real Node carries plenty of: managed fields, the
/// image list, the volumes.
fn keep_what_fleetlock_reads(node: &mut Node) {
    node.managed_fields_mut().clear();
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
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

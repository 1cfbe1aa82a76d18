//! The companion controller: per opted-in StatefulSet it keeps the supporting objects
//! (ServiceAccount, Role, RoleBinding, leader Service, PodDisruptionBudget) by server-side apply,
//! and removes them when the StatefulSet opts out. Runs inside `serve`, only on the replica
//! holding the Lease; the webhook and FleetLock serve on every replica.

pub mod node_failure;
mod peers;
pub mod raft;
pub mod supporting;

use crate::inject;
use crate::names::{LABEL_MANAGED_BY, MANAGED_BY};
use backon::{ExponentialBuilder, Retryable};
use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use supporting::{SupportingError, supporting_objects};

/// Bound of each call to a Dkron server (HTTP or gRPC).
const DKRON_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "dkron-ha";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Supporting(#[from] SupportingError),
    #[error("leader election: {0}")]
    Election(#[from] kube_lease_manager::LeaseManagerError),
}

crate::metrics::label_enum! {
    /// What kind of failure a reconciliation had: the errors metric's label.
    pub enum ErrorKind {
        Forbidden => "forbidden",
        Conflict => "conflict",
        Api => "api",
        Transport => "transport",
        InvalidStatefulSet => "invalid_statefulset",
        Election => "election",
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => ErrorKind::Forbidden,
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => ErrorKind::Conflict,
            Error::Kube(kube::Error::Api(_)) => ErrorKind::Api,
            Error::Kube(_) => ErrorKind::Transport,
            Error::Supporting(_) => ErrorKind::InvalidStatefulSet,
            Error::Election(_) => ErrorKind::Election,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Flags of the controller part of `serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Run the companion controller (on the replica holding the Lease).
    #[arg(long = "controller", env = "DKRON_HA_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Name of the Lease that elects the replica running the controller.
    #[arg(
        long,
        env = "DKRON_HA_LEASE_NAME",
        default_value = "dkron-ha-controller"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the namespace dkron-ha runs in).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity in the Lease; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "DKRON_HA_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds between full re-syncs of an opted-in StatefulSet.
    #[arg(long, env = "DKRON_HA_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Seconds between two checks of a Dkron cluster's raft peers (removals of servers gone for
    /// good, the pods' `dkron-ha/raft-voter` condition); pod events check sooner.
    #[arg(long, env = "DKRON_HA_RAFT_INTERVAL_SECONDS", default_value_t = 5)]
    pub raft_interval_seconds: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

/// Controller metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    removals: Counter,
    raft_removals: Counter,
    servers_outside_gossip: Gauge,
    leading: Gauge,
}

impl ControllerMetrics {
    /// A failed reconcile, by its bounded kind.
    fn count_error(&self, error: &Error) {
        self.errors
            .get_or_create(&ErrorLabels { kind: error.kind() })
            .inc();
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            removals: Counter::default(),
            raft_removals: Counter::default(),
            servers_outside_gossip: Gauge::default(),
            leading: Gauge::default(),
        };
        registry.register(
            "dkron_ha_controller_reconciles",
            "StatefulSet reconciliations",
            m.reconciles.clone(),
        );
        registry.register(
            "dkron_ha_controller_errors",
            "Failed reconciliations by kind",
            m.errors.clone(),
        );
        registry.register(
            "dkron_ha_controller_supporting_object_removals",
            "Supporting objects removed after a StatefulSet opted out",
            m.removals.clone(),
        );
        registry.register(
            "dkron_ha_controller_raft_peer_removals",
            "Raft servers removed because their pod must not exist any more",
            m.raft_removals.clone(),
        );
        registry.register(
            "dkron_ha_servers_outside_gossip",
            "Running Dkron server pods that have not been a live gossip member at their IP for longer than a join and wrap's recovery take (each also gets a ServerOutsideGossip Warning Event)",
            m.servers_outside_gossip.clone(),
        );
        registry.register(
            "dkron_ha_controller_leading",
            "1 while this replica holds the controller Lease",
            m.leading.clone(),
        );
        m
    }
}

struct Context {
    client: Client,
    recorder: Recorder,
    metrics: ControllerMetrics,
    resync: Duration,
    peers: peers::Peers,
    owned: Owned,
}

/// Applies `object` server-side in `namespace`, owning every field it sets.
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    // k8s-openapi serializes apiVersion and kind, which server-side apply requires.
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Deletes `name` if it exists and is ours: labelled managed-by dkron-ha and owned by `owner_uid`.
async fn delete_if_ours<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    owner_uid: &str,
) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let Some(existing) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let labelled = existing.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY);
    let owned = existing
        .owner_references()
        .iter()
        .any(|o| o.uid == owner_uid);
    if !(labelled && owned) {
        return Ok(false);
    }
    api.delete(name, &DeleteParams::background()).await?;
    Ok(true)
}

async fn publish(ctx: &Context, sts: &StatefulSet, type_: EventType, reason: &str, note: String) {
    publish_about(ctx, sts, type_, reason, note, None).await;
}

/// An Event on `sts`, `related` to another object: kube's recorder folds events with the same
/// reason, object and related object into one series, so what must stay apart (each raft
/// removal) names its own related object.
async fn publish_about(
    ctx: &Context,
    sts: &StatefulSet,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: related,
    };
    if let Err(error) = ctx.recorder.publish(&event, &sts.object_ref(&())).await {
        tracing::warn!(%error, reason, "cannot publish event");
    }
}

/// Warns when the headless Service is missing or does not publish not-ready addresses: peers
/// must resolve before they are ready or a cold start never forms a quorum.
async fn check_headless_service(ctx: &Context, sts: &StatefulSet, namespace: &str) -> Result<()> {
    let Some(service_name) = sts.spec.as_ref().and_then(|s| s.service_name.clone()) else {
        return Ok(());
    };
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let note = match services.get_opt(&service_name).await? {
        None => Some(format!(
            "headless Service {service_name} (spec.serviceName) does not exist: create it with clusterIP: None and publishNotReadyAddresses: true"
        )),
        Some(svc)
            if svc
                .spec
                .as_ref()
                .and_then(|s| s.publish_not_ready_addresses)
                != Some(true) =>
        {
            Some(format!(
                "headless Service {service_name} lacks publishNotReadyAddresses: true, so peers cannot resolve each other before they are ready and a cold start may never elect a leader; set it"
            ))
        }
        Some(_) => None,
    };
    if let Some(note) = note {
        publish(
            ctx,
            sts,
            EventType::Warning,
            "HeadlessServiceNotReadyAddresses",
            note,
        )
        .await;
    }
    Ok(())
}

async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let (Some(namespace), Some(name), Some(uid)) = (
        sts.metadata.namespace.clone(),
        sts.metadata.name.clone(),
        sts.metadata.uid.clone(),
    ) else {
        return Ok(Action::await_change());
    };
    if sts.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the supporting objects.
        return Ok(Action::await_change());
    }

    if !inject::is_opted_in(&sts) {
        // The opt-out takes the injection out of the template too, so the template cannot say
        // whether objects were made for it: the watches of our objects can.
        if !ctx.owned.any_owned_by(&uid) {
            return Ok(Action::await_change());
        }
        let names = supporting::names(&name);
        let client = &ctx.client;
        let mut removed = Vec::new();
        if delete_if_ours::<ServiceAccount>(client, &namespace, &names.service_account, &uid)
            .await?
        {
            removed.push(format!("ServiceAccount {}", names.service_account));
        }
        if delete_if_ours::<Role>(client, &namespace, &names.role, &uid).await? {
            removed.push(format!("Role {}", names.role));
        }
        if delete_if_ours::<RoleBinding>(client, &namespace, &names.role_binding, &uid).await? {
            removed.push(format!("RoleBinding {}", names.role_binding));
        }
        if delete_if_ours::<Service>(client, &namespace, &names.leader_service, &uid).await? {
            removed.push(format!("Service {}", names.leader_service));
        }
        if delete_if_ours::<PodDisruptionBudget>(
            client,
            &namespace,
            &names.pod_disruption_budget,
            &uid,
        )
        .await?
        {
            removed.push(format!(
                "PodDisruptionBudget {}",
                names.pod_disruption_budget
            ));
        }
        if !removed.is_empty() {
            ctx.metrics.removals.inc_by(removed.len() as u64);
            tracing::info!(%namespace, %name, removed = ?removed, "opted out: supporting objects removed");
            publish(
                &ctx,
                &sts,
                EventType::Normal,
                "SupportingObjectsRemoved",
                format!(
                    "{} no longer carries {}: removed {}",
                    name,
                    crate::names::ANNOTATION_ENABLED,
                    removed.join(", ")
                ),
            )
            .await;
        }
        return Ok(Action::await_change());
    }

    let objects = match supporting_objects(&sts) {
        Ok(objects) => objects,
        Err(error) => {
            publish(
                &ctx,
                &sts,
                EventType::Warning,
                "InvalidStatefulSet",
                error.to_string(),
            )
            .await;
            return Err(error.into());
        }
    };
    if let Some(sa) = &objects.service_account {
        apply(&ctx.client, &namespace, sa).await?;
    }
    apply(&ctx.client, &namespace, &objects.role).await?;
    apply(&ctx.client, &namespace, &objects.role_binding).await?;
    apply(&ctx.client, &namespace, &objects.leader_service).await?;
    apply(&ctx.client, &namespace, &objects.pod_disruption_budget).await?;
    check_headless_service(&ctx, &sts, &namespace).await?;
    tracing::debug!(%namespace, %name, "supporting objects applied");
    Ok(Action::requeue(ctx.resync))
}

fn error_policy(sts: Arc<StatefulSet>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.count_error(error);
    tracing::warn!(namespace = sts.namespace().unwrap_or_default(), name = %sts.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the reconcile loops until the future is dropped.
pub async fn run_loops(
    client: Client,
    metrics: ControllerMetrics,
    resync: Duration,
    raft_interval: Duration,
    instance: String,
) {
    let reporter = Reporter {
        controller: "dkron-ha".into(),
        instance: Some(instance),
    };
    // Owned objects all carry the managed-by label: the API server filters the watches, so
    // the cluster's other Roles, Services and PDBs never reach this process.
    let (service_accounts, service_account_events) = ours::<ServiceAccount>(&client);
    let (roles, role_events) = ours::<Role>(&client);
    let (role_bindings, role_binding_events) = ours::<RoleBinding>(&client);
    let (services, service_events) = ours::<Service>(&client);
    let (pod_disruption_budgets, pdb_events) = ours::<PodDisruptionBudget>(&client);
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        resync,
        peers: peers::Peers::new(raft_interval, DKRON_CALL_TIMEOUT),
        owned: Owned {
            service_accounts,
            roles,
            role_bindings,
            services,
            pod_disruption_budgets,
        },
    });
    let supporting = Controller::new(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns_stream(service_account_events)
    .owns_stream(role_events)
    .owns_stream(role_binding_events)
    .owns_stream(service_events)
    .owns_stream(pdb_events)
    .run(reconcile, error_policy, ctx.clone())
    .for_each(log_result);
    // The raft loop: its own StatefulSet watch, woken by the pods' events too (their metadata
    // only; owned objects are not cached).
    let raft = Controller::new(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
    .run(peers::reconcile, error_policy, ctx)
    .for_each(log_result);
    futures::join!(supporting, raft);
}

/// Our objects of one kind (the managed-by label), watched into a store; the stream wakes
/// their owner's reconcile.
fn ours<K>(
    client: &Client,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + use<K>,
)
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let config = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let (store, writer) = reflector::store();
    let events = watcher(Api::<K>::all(client.clone()), config)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (store, events)
}

/// The supporting objects as the watches last saw them.
struct Owned {
    service_accounts: Store<ServiceAccount>,
    roles: Store<Role>,
    role_bindings: Store<RoleBinding>,
    services: Store<Service>,
    pod_disruption_budgets: Store<PodDisruptionBudget>,
}

impl Owned {
    /// Whether any of them is owned by the StatefulSet with this uid.
    fn any_owned_by(&self, uid: &str) -> bool {
        fn in_store<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, uid: &str) -> bool {
            store
                .state()
                .iter()
                .any(|object| object.owner_references().iter().any(|o| o.uid == uid))
        }
        in_store(&self.service_accounts, uid)
            || in_store(&self.roles, uid)
            || in_store(&self.role_bindings, uid)
            || in_store(&self.services, uid)
            || in_store(&self.pod_disruption_budgets, uid)
    }
}

async fn log_result<T: Debug, E: std::fmt::Display>(result: Result<T, E>) {
    if let Err(error) = result {
        tracing::debug!(%error, "controller event");
    }
}

/// Elects one replica with a Lease and runs the loops there until `shutdown` completes; on
/// shutdown the Lease is released so another replica takes over at once.
/// `leading` reports whether this replica currently runs the loops.
pub async fn run(
    client: Client,
    args: ControllerArgs,
    metrics: ControllerMetrics,
    leading_tx: tokio::sync::watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("dkron-ha-{}", std::process::id()));
    let lease_seconds = args.lease_seconds.max(3);
    tokio::pin!(shutdown);
    // The API server may be unreachable at start: keep trying, serving goes on meanwhile.
    let build = || {
        LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(lease_seconds)
            // Renew halfway: a holder slowed down by a busy API server keeps the Lease instead
            // of overlapping with the next holder until it notices.
            .with_grace((lease_seconds / 2).max(1))
            .with_field_manager(FIELD_MANAGER)
            .build()
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let building = build.retry(backoff).notify(|error, delay| {
        metrics
            .errors
            .get_or_create(&ErrorLabels {
                kind: ErrorKind::Election,
            })
            .inc();
        tracing::warn!(%error, lease = %args.lease_name, ?delay, "cannot set up leader election; retrying");
    });
    let manager = tokio::select! {
        built = building => built?,
        () = &mut shutdown => return Ok(()),
    };
    let (mut leading, lease_task) = manager.watch().await;
    loop {
        // Follower: wait for the Lease.
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => if changed.is_err() { return Ok(()) },
                () = &mut shutdown => return release(leading, lease_task).await,
            }
        }
        tracing::info!(%identity, lease = %args.lease_name, "leading: running the controller");
        metrics.leading.set(1);
        let _ = leading_tx.send(true);
        let loops = run_loops(
            client.clone(),
            metrics.clone(),
            Duration::from_secs(args.resync_seconds.max(1)),
            Duration::from_secs(args.raft_interval_seconds.max(1)),
            identity.clone(),
        );
        tokio::pin!(loops);
        let stop = loop {
            tokio::select! {
                () = &mut loops => break false,
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() { break false }
                }
                () = &mut shutdown => break true,
            }
        };
        metrics.leading.set(0);
        let _ = leading_tx.send(false);
        tracing::info!(%identity, "no longer leading: controller stopped");
        if stop {
            return release(leading, lease_task).await;
        }
    }
}

async fn release(
    leading: tokio::sync::watch::Receiver<bool>,
    lease_task: tokio::task::JoinHandle<
        kube_lease_manager::Result<kube_lease_manager::LeaseManager>,
    >,
) -> Result<()> {
    // Dropping the receiver makes the lease task release the Lease and end.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(error))) => Err(error.into()),
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_a_bounded_kind() {
        let mut registry = Registry::default();
        let metrics = ControllerMetrics::register(&mut registry);
        let error = Error::Supporting(SupportingError::NoMatchLabels("dkron".into()));
        assert_eq!(error.kind(), ErrorKind::InvalidStatefulSet);
        metrics.count_error(&error);
        metrics.count_error(&Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded));
        let text = crate::metrics::encode(&registry).unwrap();
        assert!(
            text.contains(r#"dkron_ha_controller_errors_total{kind="invalid_statefulset"} 1"#),
            "{text}"
        );
        assert_eq!(
            text.matches("dkron_ha_controller_errors_total{").count(),
            2,
            "one series per kind: {text}"
        );
    }
}

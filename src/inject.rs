//! The injection engine: an opted-in StatefulSet in, the mutated StatefulSet and admission
//! warnings out. A pure function of its inputs (no clients, no clocks), shared by the admission
//! webhook and `dkron-ha inject`, so both mutate exactly alike.
//!
//! Idempotent by construction: every injected item is keyed by name and upserted, so injecting
//! an injected object (the API server's reinvocation, an UPDATE carrying the live template)
//! yields the same object.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PodReadinessGate, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

use crate::names::{
    ANNOTATION_AGENT_OF, ANNOTATION_AGENT_SERVICE, ANNOTATION_CONTAINER, ANNOTATION_DKRON_COMMAND,
    ANNOTATION_ENABLED, ANNOTATION_INITIAL_CLUSTER_SIZE, ANNOTATION_INJECTED,
    ANNOTATION_PVC_RETENTION, ANNOTATION_RAFT_VOTER_GATE, ANNOTATION_REPLACE_ON_NODE_FAILURE,
    BIN_DIR, BIN_VOLUME, BIN_VOLUME_SIZE_LIMIT_MIB, CONDITION_RAFT_VOTER, ENV_AGENT_OF,
    ENV_CLUSTER_DOMAIN, ENV_INITIAL_CLUSTER_SIZE, ENV_LEADER_SERVICE, ENV_LOG_FORMAT, ENV_POD_IP,
    ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_SERVICE, ENV_STATEFULSET, IMAGE_BINARY, INSTALL_CONTAINER,
    LABEL_UPDATER_CONTAINER, WRAPPER_PATH,
};

pub const DEFAULT_DKRON_COMMAND: &str = "/usr/local/bin/dkron";
pub const DEFAULT_DKRON_CONTAINER: &str = "dkron";

/// Largest initial cluster size accepted; raft beyond this is a typo, not a plan.
const MAX_INITIAL_CLUSTER_SIZE: u32 = 99;

/// Settings of the injector itself (flags of `serve` and `inject`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectorConfig {
    /// Image of the `dkron-ha-install` init container and the label-updater sidecar.
    pub image: String,
    /// Kubernetes cluster DNS domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Run the label-updater as a native sidecar (init container, `restartPolicy: Always`).
    pub native_sidecar: bool,
    /// Value of the `dkron-ha/injected` pod-template annotation.
    pub version: String,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/dkron-ha/dkron-ha:{}", crate::VERSION),
            cluster_domain: "cluster.local".into(),
            native_sidecar: false,
            version: crate::VERSION.into(),
        }
    }
}

/// The admission operation the injection happens in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
}

/// Why an opted-in StatefulSet cannot be injected. Each message names what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error(
        "annotation {ANNOTATION_INITIAL_CLUSTER_SIZE}={value:?} is not valid: set it to a whole number of Dkron servers from 1 to {MAX_INITIAL_CLUSTER_SIZE} (for example \"3\"), or remove it to use spec.replicas"
    )]
    InvalidInitialClusterSize { value: String },
    #[error(
        "annotation {ANNOTATION_CONTAINER}={name:?} names no container of the pod template (containers: {available}): set it to the container that runs Dkron"
    )]
    UnknownContainer { name: String, available: String },
    #[error(
        "cannot tell which container runs Dkron: no container is named \"{DEFAULT_DKRON_CONTAINER}\" and the pod template has {count} containers ({available}); set annotation {ANNOTATION_CONTAINER} to the Dkron container's name"
    )]
    AmbiguousContainer { count: usize, available: String },
    #[error(
        "annotation {ANNOTATION_DKRON_COMMAND} is empty: set it to the Dkron executable (for example \"{DEFAULT_DKRON_COMMAND}\"), or remove it"
    )]
    EmptyDkronCommand,
    #[error(
        "annotation {ANNOTATION_RAFT_VOTER_GATE}={value:?} is not valid: set it to \"true\" (the default: pods are Ready only while their server is a raft voter) or \"false\" (no readiness gate), or remove it"
    )]
    InvalidRaftVoterGate { value: String },
    #[error(
        "annotation {ANNOTATION_PVC_RETENTION}={value:?} is not valid: set it to \"Delete\" (a server's PVC goes with its pod when the StatefulSet is scaled down or deleted, so a server scaled back never returns with a stale raft log) or \"Retain\" (Kubernetes' default: PVCs stay), or remove it to leave spec.persistentVolumeClaimRetentionPolicy as it is"
    )]
    InvalidPvcRetention { value: String },
    #[error(
        "annotation {ANNOTATION_REPLACE_ON_NODE_FAILURE}={value:?} is not valid: set it to how long a Node must be NotReady before its Dkron server pod is replaced elsewhere (a duration such as \"5m\" or \"90s\", at least 1s and longer than your reboots take), or remove it to never replace pods"
    )]
    InvalidReplaceOnNodeFailure { value: String },
    #[error(
        "StatefulSet has no metadata.name: dkron-ha derives peer names from it, so set metadata.name (generateName is not supported)"
    )]
    MissingName,
    #[error(
        "spec.serviceName is empty: dkron-ha needs the headless Service that gives the Dkron pods stable DNS names; set spec.serviceName"
    )]
    MissingServiceName,
    #[error("the StatefulSet has no pod template spec: set spec.template.spec.containers")]
    MissingPodSpec,
    #[error(
        "annotation {annotation}={value:?} is not valid: set it to the name of the Dkron server {what} (a DNS label: lowercase letters, digits and '-', at most 63)"
    )]
    InvalidWorkersOf {
        annotation: &'static str,
        what: &'static str,
        value: String,
    },
    #[error(
        "both {ANNOTATION_ENABLED} and {ANNOTATION_AGENT_OF} are set: a StatefulSet runs Dkron servers ({ANNOTATION_ENABLED}: \"true\") or the workers of other servers ({ANNOTATION_AGENT_OF}: <server StatefulSet>); remove one"
    )]
    ServersAndWorkers,
}

/// The result of injecting one StatefulSet.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    pub statefulset: StatefulSet,
    pub warnings: Vec<String>,
}

/// Whether the StatefulSet opts in (`dkron-ha/enabled: "true"`).
pub fn is_opted_in(sts: &StatefulSet) -> bool {
    annotation(sts, ANNOTATION_ENABLED) == Some("true")
}

fn annotation<'a>(sts: &'a StatefulSet, key: &str) -> Option<&'a str> {
    meta_annotation(&sts.metadata, key)
}

fn meta_annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `dkron-ha/replace-on-node-failure`: how long a Node must be NotReady before the controller
/// replaces a server pod stuck on it; `None` without the annotation.
pub fn replace_on_node_failure(
    sts: &StatefulSet,
) -> Result<Option<std::time::Duration>, InjectError> {
    let Some(value) = annotation(sts, ANNOTATION_REPLACE_ON_NODE_FAILURE) else {
        return Ok(None);
    };
    humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| *d >= std::time::Duration::from_secs(1))
        .map(Some)
        .ok_or_else(|| InjectError::InvalidReplaceOnNodeFailure {
            value: value.to_string(),
        })
}

/// What the engine will do, resolved from annotations and the objects before anything changes,
/// so a bad annotation is a denial and never a half-injection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectionPlan {
    pub name: String,
    pub service: String,
    pub initial_cluster_size: u32,
    /// Index of the Dkron container in `spec.template.spec.containers`.
    pub container_index: usize,
    pub dkron_command: Vec<String>,
    pub service_account: Option<String>,
    /// Whether the pods get the `dkron-ha/raft-voter` readiness gate.
    pub raft_voter_gate: bool,
    /// `Retain` or `Delete` for both cases of the PVC retention policy; `None` leaves it.
    pub pvc_retention: Option<&'static str>,
}

/// Injects `sts` if it opts in; returns `None` when it does not (the object is left alone).
/// `old` is the stored object on UPDATE.
pub fn inject(
    sts: &StatefulSet,
    operation: Operation,
    old: Option<&StatefulSet>,
    config: &InjectorConfig,
) -> Result<Option<Injection>, InjectError> {
    if !is_opted_in(sts) {
        return Ok(None);
    }
    let plan = plan(sts, operation, old)?;
    Ok(Some(apply_plan(sts, &plan, operation, old, config)))
}

/// Resolves and validates everything the injection depends on.
fn plan(
    sts: &StatefulSet,
    operation: Operation,
    old: Option<&StatefulSet>,
) -> Result<InjectionPlan, InjectError> {
    let name = sts
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(InjectError::MissingName)?;
    if is_workers(&sts.metadata) {
        return Err(InjectError::ServersAndWorkers);
    }
    let spec = sts.spec.as_ref().ok_or(InjectError::MissingServiceName)?;
    let service = spec
        .service_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(InjectError::MissingServiceName)?;
    let pod = spec
        .template
        .spec
        .as_ref()
        .ok_or(InjectError::MissingPodSpec)?;
    let container_index = dkron_container_index(&sts.metadata, pod)?;
    let dkron_command = dkron_command(&sts.metadata)?;

    let initial_cluster_size = match annotation(sts, ANNOTATION_INITIAL_CLUSTER_SIZE) {
        Some(value) => parse_cluster_size(value)?,
        None => defaulted_cluster_size(spec.replicas, pod, container_index, operation, old),
    };

    let service_account = pod
        .service_account_name
        .as_deref()
        .or(pod.service_account.as_deref())
        .filter(|s| !s.is_empty())
        .map(str::to_string);

    let raft_voter_gate = match annotation(sts, ANNOTATION_RAFT_VOTER_GATE).map(str::trim) {
        None | Some("true") => true,
        Some("false") => false,
        Some(value) => {
            return Err(InjectError::InvalidRaftVoterGate {
                value: value.to_string(),
            });
        }
    };

    replace_on_node_failure(sts)?;

    let pvc_retention = match annotation(sts, ANNOTATION_PVC_RETENTION).map(str::trim) {
        None => None,
        Some("Retain") => Some("Retain"),
        Some("Delete") => Some("Delete"),
        Some(value) => {
            return Err(InjectError::InvalidPvcRetention {
                value: value.to_string(),
            });
        }
    };

    Ok(InjectionPlan {
        name: name.to_string(),
        service: service.to_string(),
        initial_cluster_size,
        container_index,
        dkron_command,
        service_account,
        raft_voter_gate,
        pvc_retention,
    })
}

fn parse_cluster_size(value: &str) -> Result<u32, InjectError> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_INITIAL_CLUSTER_SIZE).contains(n))
        .ok_or_else(|| InjectError::InvalidInitialClusterSize {
            value: value.to_string(),
        })
}

/// Without the annotation the cold-start size is `spec.replicas` at CREATE. Later it must not
/// follow scaling: reuse what an earlier injection recorded, from this object or the stored one.
fn defaulted_cluster_size(
    replicas: Option<i32>,
    pod: &PodSpec,
    container_index: usize,
    operation: Operation,
    old: Option<&StatefulSet>,
) -> u32 {
    let replicas = replicas
        .unwrap_or(1)
        .clamp(1, MAX_INITIAL_CLUSTER_SIZE as i32) as u32;
    // The value of a container's first DKRON_HA_INITIAL_CLUSTER_SIZE: what an earlier
    // injection recorded.
    let recorded = |c: &Container| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == ENV_INITIAL_CLUSTER_SIZE)
            .and_then(|e| parse_cluster_size(e.value.as_deref()?).ok())
    };
    if let Some(n) = pod.containers.get(container_index).and_then(recorded) {
        return n;
    }
    if operation == Operation::Update
        && let Some(n) = old
            .and_then(|o| o.spec.as_ref()?.template.spec.as_ref())
            .and_then(|pod| pod.containers.iter().find_map(recorded))
    {
        return n;
    }
    replicas
}

fn container_names(pod: &PodSpec) -> String {
    pod.containers
        .iter()
        .filter(|c| c.name != LABEL_UPDATER_CONTAINER)
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `dkron-ha/dkron-command` split into words, or the default Dkron executable.
fn dkron_command(meta: &ObjectMeta) -> Result<Vec<String>, InjectError> {
    match meta_annotation(meta, ANNOTATION_DKRON_COMMAND) {
        Some(value) => {
            let words: Vec<String> = value.split_whitespace().map(str::to_string).collect();
            if words.is_empty() {
                return Err(InjectError::EmptyDkronCommand);
            }
            Ok(words)
        }
        None => Ok(vec![DEFAULT_DKRON_COMMAND.to_string()]),
    }
}

fn dkron_container_index(meta: &ObjectMeta, pod: &PodSpec) -> Result<usize, InjectError> {
    if let Some(name) = meta_annotation(meta, ANNOTATION_CONTAINER) {
        return pod
            .containers
            .iter()
            .position(|c| c.name == name && c.name != LABEL_UPDATER_CONTAINER)
            .ok_or_else(|| InjectError::UnknownContainer {
                name: name.to_string(),
                available: container_names(pod),
            });
    }
    if let Some(i) = pod
        .containers
        .iter()
        .position(|c| c.name == DEFAULT_DKRON_CONTAINER)
    {
        return Ok(i);
    }
    let candidates: Vec<usize> = pod
        .containers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.name != LABEL_UPDATER_CONTAINER)
        .map(|(i, _)| i)
        .collect();
    match candidates.as_slice() {
        [only] => Ok(*only),
        _ => Err(InjectError::AmbiguousContainer {
            count: candidates.len(),
            available: container_names(pod),
        }),
    }
}

/// Applies a validated plan. Infallible: everything that can fail was checked by [`plan`].
fn apply_plan(
    sts: &StatefulSet,
    plan: &InjectionPlan,
    operation: Operation,
    old: Option<&StatefulSet>,
    config: &InjectorConfig,
) -> Injection {
    let mut out = sts.clone();
    let mut warnings = Vec::new();
    let Some(spec) = out.spec.as_mut() else {
        unreachable!("plan() checked spec")
    };

    let stored = old
        .and_then(|o| o.spec.as_ref())
        .map(|s| s.pod_management_policy.as_deref());
    spec.pod_management_policy =
        pod_management_policy(operation, spec.pod_management_policy.as_deref(), stored);
    if let Some(warning) =
        ordered_ready_warning(operation, spec.pod_management_policy.as_deref(), plan)
    {
        warnings.push(warning);
    }

    if let Some(policy) = plan.pvc_retention {
        let wanted = StatefulSetPersistentVolumeClaimRetentionPolicy {
            when_deleted: Some(policy.into()),
            when_scaled: Some(policy.into()),
        };
        if let Some(own) = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .filter(|own| **own != wanted)
        {
            warnings.push(format!(
                "annotation {ANNOTATION_PVC_RETENTION}={policy} replaces spec.persistentVolumeClaimRetentionPolicy (whenDeleted {}, whenScaled {}): set both to {policy} or remove the annotation",
                own.when_deleted.as_deref().unwrap_or("Retain"),
                own.when_scaled.as_deref().unwrap_or("Retain"),
            ));
        }
        spec.persistent_volume_claim_retention_policy = Some(wanted);
    }

    let pod = inject_wrapper(
        &mut spec.template,
        plan.container_index,
        &plan.dkron_command,
        dkron_env(plan, config),
        config,
    );

    if let Some(warning) = automount_warning(pod.automount_service_account_token) {
        warnings.push(warning);
    }
    if let Some(account) = injected_service_account(plan) {
        pod.service_account_name = Some(account);
    }

    // Ready only while the controller sees the server as a raft voter: rolling updates, the
    // PodDisruptionBudget and drains then wait for a restarted server to be back in raft.
    // Turned off, an earlier injection's gate goes (the user's own gates stay).
    if plan.raft_voter_gate {
        upsert_by_name(
            pod.readiness_gates.get_or_insert_with(Vec::new),
            PodReadinessGate {
                condition_type: CONDITION_RAFT_VOTER.into(),
            },
            |g| &g.condition_type,
        );
    } else if let Some(gates) = pod.readiness_gates.as_mut() {
        gates.retain(|g| g.condition_type != CONDITION_RAFT_VOTER);
        if gates.is_empty() {
            pod.readiness_gates = None;
        }
    }

    // The sidecar lives in exactly one of the two lists, depending on the mode.
    let sidecar = label_updater_container(config);
    let init = pod.init_containers.get_or_insert_with(Vec::new);
    if config.native_sidecar {
        pod.containers.retain(|c| c.name != LABEL_UPDATER_CONTAINER);
        upsert_by_name(init, sidecar, |c| &c.name);
    } else {
        init.retain(|c| c.name != LABEL_UPDATER_CONTAINER);
        upsert_by_name(&mut pod.containers, sidecar, |c| &c.name);
    }

    Injection {
        statefulset: out,
        warnings,
    }
}

/// The pod-management policy after injection: `Parallel` at CREATE; at UPDATE it is
/// immutable, so what is stored stays (`stored` is the stored object's, when there is one).
fn pod_management_policy(
    operation: Operation,
    current: Option<&str>,
    stored: Option<Option<&str>>,
) -> Option<String> {
    match operation {
        Operation::Create => Some("Parallel".into()),
        Operation::Update => stored.unwrap_or(current).map(str::to_string),
    }
}

/// The warning for an UPDATE of a StatefulSet that keeps `OrderedReady` (the default).
fn ordered_ready_warning(
    operation: Operation,
    policy: Option<&str>,
    plan: &InjectionPlan,
) -> Option<String> {
    (operation == Operation::Update && policy.unwrap_or("OrderedReady") == "OrderedReady").then(|| {
        format!(
            "StatefulSet {} uses podManagementPolicy OrderedReady, which dkron-ha cannot change on an existing StatefulSet: after a full outage the pods start one at a time and a cold start waits for all {} servers. Recreate it with `kubectl delete statefulset {} --cascade=orphan` and apply it again to get Parallel.",
            plan.name, plan.initial_cluster_size, plan.name
        )
    })
}

fn automount_warning(automount: Option<bool>) -> Option<String> {
    (automount == Some(false)).then(|| {
        format!(
            "the pod template sets automountServiceAccountToken: false, so the {LABEL_UPDATER_CONTAINER} sidecar cannot label the Dkron leader; remove that setting or set it to true"
        )
    })
}

/// The service account the pods get when the template names none.
fn injected_service_account(plan: &InjectionPlan) -> Option<String> {
    plan.service_account
        .is_none()
        .then(|| crate::names::owned_object(&plan.name))
}

/// Takes the injection out of a StatefulSet that no longer opts in (its `dkron-ha/enabled`
/// annotation removed or changed): the pod template loses the wrapper (the Dkron container runs
/// the command `wrap` ran), its volume, install container and `DKRON_HA_*` environment, the
/// label-updater, the raft-voter readiness gate, the `dkron-ha/injected` annotation and the
/// service account dkron-ha defaulted (the controller deletes that account on opt-out). The
/// Dkron container keeps `POD_NAME`, `POD_NAMESPACE` and `POD_IP`: harmless, and a script of the
/// user's may have come to use them. `podManagementPolicy` is immutable and stays.
/// `None` when the template is not injected (or the StatefulSet still opts in).
pub fn uninject(sts: &StatefulSet) -> Option<StatefulSet> {
    let injected = sts
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(ANNOTATION_INJECTED));
    if is_opted_in(sts) || !injected {
        return None;
    }
    let mut out = sts.clone();
    let name = out.metadata.name.clone().unwrap_or_default();
    let template = &mut out.spec.as_mut()?.template;
    if let Some(meta) = template.metadata.as_mut()
        && let Some(annotations) = meta.annotations.as_mut()
    {
        annotations.remove(ANNOTATION_INJECTED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    let pod = template.spec.as_mut()?;
    retain_or_none(&mut pod.volumes, |v| v.name != BIN_VOLUME);
    retain_or_none(&mut pod.init_containers, |c| {
        c.name != INSTALL_CONTAINER && c.name != LABEL_UPDATER_CONTAINER
    });
    pod.containers.retain(|c| c.name != LABEL_UPDATER_CONTAINER);
    retain_or_none(&mut pod.readiness_gates, |g| {
        g.condition_type != CONDITION_RAFT_VOTER
    });
    // The API server copies the name into the deprecated `serviceAccount` too, and would copy
    // it back from there: both go.
    let defaulted = crate::names::owned_object(&name);
    for account in [&mut pod.service_account_name, &mut pod.service_account] {
        if account.as_deref() == Some(defaulted.as_str()) {
            *account = None;
        }
    }
    for container in &mut pod.containers {
        let command = container.command.as_deref().unwrap_or_default();
        if !is_wrapped(command) {
            continue;
        }
        container.command = Some(command[WRAPPER_PREFIX.len()..].to_vec());
        retain_or_none(&mut container.volume_mounts, |m| m.name != BIN_VOLUME);
        retain_or_none(&mut container.env, |e| {
            !INJECTED_ENV.contains(&e.name.as_str())
        });
    }
    Some(out)
}

/// The variables only `wrap` reads: what [`uninject`] takes out again.
const INJECTED_ENV: [&str; 6] = [
    ENV_STATEFULSET,
    ENV_SERVICE,
    ENV_INITIAL_CLUSTER_SIZE,
    ENV_CLUSTER_DOMAIN,
    ENV_LEADER_SERVICE,
    ENV_AGENT_OF,
];

/// Keeps the items `keep` wants; a list left empty goes (as it was before injection).
fn retain_or_none<T>(items: &mut Option<Vec<T>>, keep: impl FnMut(&T) -> bool) {
    if let Some(list) = items.as_mut() {
        list.retain(keep);
        if list.is_empty() {
            *items = None;
        }
    }
}

/// Whether `meta` is a Deployment's or StatefulSet's of Dkron workers (`dkron-ha/agent-of`).
pub fn is_workers(meta: &ObjectMeta) -> bool {
    meta_annotation(meta, ANNOTATION_AGENT_OF).is_some()
}

/// Injects the pod template of a Deployment or StatefulSet of Dkron workers (`meta` carries
/// `dkron-ha/agent-of`): the wrapper's volume, install init container and agent-mode `wrap`
/// (its environment names the servers' StatefulSet and headless Service); no label-updater,
/// readiness gate or service account, since workers are no raft voters and `wrap` joins them by
/// DNS name, which needs no RBAC. `None` when `meta` does not name servers.
pub fn inject_workers(
    meta: &ObjectMeta,
    template: &PodTemplateSpec,
    config: &InjectorConfig,
) -> Result<Option<PodTemplateSpec>, InjectError> {
    let Some(servers) = meta_annotation(meta, ANNOTATION_AGENT_OF).map(str::trim) else {
        return Ok(None);
    };
    if meta_annotation(meta, ANNOTATION_ENABLED) == Some("true") {
        return Err(InjectError::ServersAndWorkers);
    }
    let invalid = |annotation, what, value: &str| InjectError::InvalidWorkersOf {
        annotation,
        what,
        value: value.to_owned(),
    };
    if !crate::names::is_dns_label(servers) {
        return Err(invalid(ANNOTATION_AGENT_OF, "StatefulSet", servers));
    }
    let service = meta_annotation(meta, ANNOTATION_AGENT_SERVICE)
        .map(str::trim)
        .unwrap_or(servers);
    if !crate::names::is_dns_label(service) {
        return Err(invalid(
            ANNOTATION_AGENT_SERVICE,
            "StatefulSet's headless Service",
            service,
        ));
    }
    let pod = template.spec.as_ref().ok_or(InjectError::MissingPodSpec)?;
    let index = dkron_container_index(meta, pod)?;
    let dkron_command = dkron_command(meta)?;

    let mut out = template.clone();
    use EnvSource::{Field, Value};
    let env = [
        (ENV_AGENT_OF, Value(servers.to_owned())),
        (ENV_SERVICE, Value(service.to_owned())),
        (ENV_CLUSTER_DOMAIN, Value(config.cluster_domain.clone())),
        (ENV_POD_NAME, Field("metadata.name")),
        (ENV_POD_NAMESPACE, Field("metadata.namespace")),
    ];
    inject_wrapper(&mut out, index, &dkron_command, env, config);
    Ok(Some(out))
}

/// What servers and workers both get: the `dkron-ha/injected` annotation, the wrapper's volume
/// and install init container, and the Dkron container (at `index`; the caller checked the pod
/// spec) wrapped, with the volume mounted and `env` set. Returns the pod spec.
fn inject_wrapper<'a>(
    template: &'a mut PodTemplateSpec,
    index: usize,
    dkron_command: &[String],
    env: impl IntoIterator<Item = (&'static str, EnvSource)>,
    config: &InjectorConfig,
) -> &'a mut PodSpec {
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_INJECTED.into(), config.version.clone());
    let pod = template
        .spec
        .as_mut()
        .expect("the caller checked the pod spec");
    upsert_by_name(
        pod.volumes.get_or_insert_with(Vec::new),
        bin_volume(),
        |v| &v.name,
    );
    // Any position among init containers works (the Dkron container starts after all of them);
    // upserting in place or appending keeps the JSON patch free of shifted array entries.
    upsert_by_name(
        pod.init_containers.get_or_insert_with(Vec::new),
        install_container(config),
        |c| &c.name,
    );
    let dkron = &mut pod.containers[index];
    let current = dkron.command.as_deref().unwrap_or_default();
    if !is_wrapped(current) {
        dkron.command = Some(wrapped_command(current, dkron_command));
    }
    upsert_by_name(
        dkron.volume_mounts.get_or_insert_with(Vec::new),
        bin_mount(),
        |m| &m.name,
    );
    let vars = dkron.env.get_or_insert_with(Vec::new);
    for (name, source) in env {
        upsert_by_name(vars, source.env_var(name), |e| &e.name);
    }
    pod
}

/// Replaces the item with the same name in place, or appends it.
fn upsert_by_name<T>(items: &mut Vec<T>, item: T, name: impl Fn(&T) -> &String) {
    match items.iter().position(|i| name(i) == name(&item)) {
        Some(pos) => items[pos] = item,
        None => items.push(item),
    }
}

/// What the Dkron container's command starts with once wrapped.
const WRAPPER_PREFIX: [&str; 3] = [WRAPPER_PATH, "wrap", "--"];

/// Whether a Dkron container's command is wrapped already (then it stays as it is).
fn is_wrapped(command: &[String]) -> bool {
    command.len() >= WRAPPER_PREFIX.len() && command.iter().zip(WRAPPER_PREFIX).all(|(a, b)| a == b)
}

/// The wrapped command of a Dkron container whose command is `current` (not wrapped yet): the
/// wrapper, then the original command, or the Dkron executable when the image's entrypoint runs
/// it (no command).
fn wrapped_command(current: &[String], dkron_command: &[String]) -> Vec<String> {
    let original = if current.is_empty() {
        dkron_command
    } else {
        current
    };
    WRAPPER_PREFIX
        .iter()
        .map(|s| s.to_string())
        .chain(original.iter().cloned())
        .collect()
}

fn bin_volume() -> Volume {
    Volume {
        name: BIN_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(format!("{BIN_VOLUME_SIZE_LIMIT_MIB}Mi"))),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bin_mount() -> VolumeMount {
    VolumeMount {
        name: BIN_VOLUME.into(),
        mount_path: BIN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(field_source(path)),
        ..Default::default()
    }
}

/// The source of a variable set from the pod's field `path` (API version v1).
fn field_source(path: &str) -> EnvVarSource {
    EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: Some("v1".into()),
        }),
        ..Default::default()
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// Where an injected environment variable's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EnvSource {
    Value(String),
    /// A downward-API field of the pod (`fieldRef`, API version v1).
    Field(&'static str),
}

impl EnvSource {
    fn env_var(self, name: &str) -> EnvVar {
        match self {
            EnvSource::Value(value) => value_env(name, value),
            EnvSource::Field(path) => field_env(name, path),
        }
    }
}

/// The environment the Dkron container gets, in order.
fn dkron_env(plan: &InjectionPlan, config: &InjectorConfig) -> [(&'static str, EnvSource); 8] {
    use EnvSource::{Field, Value};
    [
        (ENV_STATEFULSET, Value(plan.name.clone())),
        (ENV_SERVICE, Value(plan.service.clone())),
        (
            ENV_INITIAL_CLUSTER_SIZE,
            Value(plan.initial_cluster_size.to_string()),
        ),
        (ENV_CLUSTER_DOMAIN, Value(config.cluster_domain.clone())),
        (
            ENV_LEADER_SERVICE,
            Value(crate::names::leader_service(&plan.name)),
        ),
        (ENV_POD_NAME, Field("metadata.name")),
        (ENV_POD_NAMESPACE, Field("metadata.namespace")),
        (ENV_POD_IP, Field("status.podIP")),
    ]
}

fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        // Pod Security `restricted` wants a seccomp profile on every container unless the pod
        // sets one; the user's pod-level setting stays theirs.
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn small_resources(cpu_limit: &str, memory: &str) -> ResourceRequirements {
    let q = |s: &str| Quantity(s.into());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q("5m")),
            ("memory".into(), q(memory)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), q(cpu_limit)),
            ("memory".into(), q(memory)),
        ])),
        ..Default::default()
    }
}

fn install_container(config: &InjectorConfig) -> Container {
    Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(config.image.clone()),
        command: Some(vec![IMAGE_BINARY.into(), "install".into(), BIN_DIR.into()]),
        volume_mounts: Some(vec![VolumeMount {
            read_only: None,
            ..bin_mount()
        }]),
        resources: Some(small_resources("100m", "32Mi")),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    }
}

fn label_updater_container(config: &InjectorConfig) -> Container {
    let mut env = vec![
        field_env(ENV_POD_NAME, "metadata.name"),
        field_env(ENV_POD_NAMESPACE, "metadata.namespace"),
    ];
    env.push(value_env(ENV_LOG_FORMAT, "json"));
    Container {
        name: LABEL_UPDATER_CONTAINER.into(),
        image: Some(config.image.clone()),
        command: Some(vec![IMAGE_BINARY.into(), "label-updater".into()]),
        env: Some(env),
        resources: Some(small_resources("50m", "32Mi")),
        security_context: Some(restricted_security_context()),
        restart_policy: config.native_sidecar.then(|| "Always".into()),
        ..Default::default()
    }
}

//! The names ARCHITECTURE.md makes contracts: annotations, labels, environment variables, the names
//! of injected parts and of the objects dkron-ha creates. The injector that writes a name and the
//! runtime or controller that reads it both use the constant here.

/// `"true"` on a StatefulSet opts it in.
pub const ANNOTATION_ENABLED: &str = "dkron-ha/enabled";
pub const ANNOTATION_INITIAL_CLUSTER_SIZE: &str = "dkron-ha/initial-cluster-size";
pub const ANNOTATION_CONTAINER: &str = "dkron-ha/container";
pub const ANNOTATION_DKRON_COMMAND: &str = "dkron-ha/dkron-command";
/// On a Deployment or StatefulSet of Dkron workers: the server StatefulSet they join.
pub const ANNOTATION_AGENT_OF: &str = "dkron-ha/agent-of";
/// The servers' headless Service, for workers (default: the `dkron-ha/agent-of` name).
pub const ANNOTATION_AGENT_SERVICE: &str = "dkron-ha/agent-service";
/// `"false"` leaves out the `dkron-ha/raft-voter` readiness gate (default `"true"`).
pub const ANNOTATION_RAFT_VOTER_GATE: &str = "dkron-ha/raft-voter-gate";
/// A duration: a server pod whose Node is NotReady that long (or gone) is replaced.
pub const ANNOTATION_REPLACE_ON_NODE_FAILURE: &str = "dkron-ha/replace-on-node-failure";
/// `Retain` or `Delete`: the StatefulSet's `persistentVolumeClaimRetentionPolicy`, both cases.
pub const ANNOTATION_PVC_RETENTION: &str = "dkron-ha/pvc-retention";
/// Pod-template annotation carrying the dkron-ha version that injected it.
pub const ANNOTATION_INJECTED: &str = "dkron-ha/injected";

/// Pod label kept true to Dkron's leadership by the label-updater; the leader Service selects it.
pub const LABEL_LEADER: &str = "dkron-ha/leader";
/// The pod readiness gate's condition type: True while the pod's server is a raft voter.
pub const CONDITION_RAFT_VOTER: &str = "dkron-ha/raft-voter";
/// The label every object dkron-ha creates carries, with value [`MANAGED_BY`].
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "dkron-ha";

/// Environment of the Dkron container, written by the injector and read by `wrap`.
pub const ENV_STATEFULSET: &str = "DKRON_HA_STATEFULSET";
pub const ENV_SERVICE: &str = "DKRON_HA_SERVICE";
pub const ENV_INITIAL_CLUSTER_SIZE: &str = "DKRON_HA_INITIAL_CLUSTER_SIZE";
pub const ENV_CLUSTER_DOMAIN: &str = "DKRON_HA_CLUSTER_DOMAIN";
pub const ENV_LEADER_SERVICE: &str = "DKRON_HA_LEADER_SERVICE";
/// On a worker agent: the server StatefulSet it joins (agent-mode `wrap`).
pub const ENV_AGENT_OF: &str = "DKRON_HA_AGENT_OF";
/// Downward-API variables of the Dkron container and the label-updater.
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_POD_IP: &str = "POD_IP";
/// `--log-format` of every dkron-ha subcommand.
pub const ENV_LOG_FORMAT: &str = "DKRON_HA_LOG_FORMAT";

/// The injected parts of the pod template.
pub const BIN_VOLUME: &str = "dkron-ha-bin";
/// The emptyDir's `sizeLimit` in MiB: the kubelet evicts a pod whose copy of dkron-ha is larger.
pub const BIN_VOLUME_SIZE_LIMIT_MIB: u64 = 64;
pub const BIN_DIR: &str = "/dkron-ha/bin";
pub const WRAPPER_PATH: &str = "/dkron-ha/bin/dkron-ha";
pub const INSTALL_CONTAINER: &str = "dkron-ha-install";
pub const LABEL_UPDATER_CONTAINER: &str = "dkron-ha-label-updater";
/// Where the dkron-ha image keeps its executable.
pub const IMAGE_BINARY: &str = "/usr/local/bin/dkron-ha";

/// ServiceAccount, Role, RoleBinding and PodDisruptionBudget of StatefulSet `sts`.
pub fn owned_object(sts: &str) -> String {
    format!("{sts}-dkron-ha")
}

/// The Service that selects the leader pod of StatefulSet `sts`.
pub fn leader_service(sts: &str) -> String {
    format!("{sts}-leader")
}

/// Whether `value` is a DNS-1123 label, the form of a namespace's name and of names that
/// become one part of a DNS name: 1 to 63 lowercase letters, digits and '-', starting and ending
/// with a letter or digit.
pub fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// What [`is_dns_label`] accepts, for error messages.
pub const DNS_LABEL_RULE: &str = "a DNS-1123 label: 1 to 63 lowercase letters, digits and '-', \
starting and ending with a letter or digit (e.g. dkron-ha)";

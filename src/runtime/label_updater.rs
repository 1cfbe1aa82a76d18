//! `dkron-ha label-updater`: the sidecar that mirrors "is this Dkron server the leader?" into the
//! pod label `dkron-ha/leader`, which the `<sts>-leader` Service selects.
//!
//! Shell: poll `GET /v1/isleader` on the local Dkron, patch the own Pod. Core: [`decide`] says,
//! from what was published and what was observed, which label value to publish next.

use crate::dkron::{self, DkronClient, DkronError, IsLeaderAnswer};
use crate::names::{self, LABEL_LEADER};
use backon::{ConstantBuilder, Retryable};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// Flags of `dkron-ha label-updater`.
#[derive(Clone, Debug, clap::Args)]
pub struct LabelUpdaterArgs {
    /// Time between two polls of the local Dkron, in milliseconds.
    #[arg(long, env = "DKRON_HA_INTERVAL_MS", default_value_t = 1000)]
    pub interval_ms: u64,
    /// Host of the local Dkron HTTP API.
    #[arg(long, env = "DKRON_HA_DKRON_HOST", default_value = "127.0.0.1")]
    pub dkron_host: String,
    /// Port of the local Dkron HTTP API.
    #[arg(long, env = "DKRON_HA_DKRON_PORT", default_value_t = dkron::HTTP_PORT)]
    pub dkron_port: u16,
    /// Consecutive failed polls after which the pod counts as a follower.
    #[arg(long, env = "DKRON_HA_FAILURES_BEFORE_FOLLOWER", default_value_t = 3)]
    pub failures_before_follower: u32,
    /// Name of the own Pod (downward API).
    #[arg(long, env = names::ENV_POD_NAME)]
    pub pod_name: String,
    /// Namespace of the own Pod (downward API).
    #[arg(long, env = names::ENV_POD_NAMESPACE)]
    pub pod_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelUpdaterError {
    #[error("cannot build a Kubernetes client (in-cluster config or kubeconfig): {0}")]
    Client(#[source] kube::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Dkron(#[from] DkronError),
    #[error("--interval-ms must be at least 1")]
    ZeroInterval,
}

/// One poll of the local Dkron.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Leader,
    Follower,
    /// Unreachable, timed out or an unexpected answer.
    Failed,
}

/// What the updater remembers between polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LabelState {
    /// The value last patched successfully; `None` before the first patch.
    pub published: Option<bool>,
    pub consecutive_failures: u32,
}

/// The label decision (pure): the next state, and `Some(value)` when the label must be patched.
///
/// Leader → `true`, follower → `false`. A failed poll keeps the published value until
/// `failures_before_follower` polls in a row failed, then demotes: a Dkron that stopped answering
/// must not keep receiving the leader Service's traffic, but one slow answer must not flap the
/// label. Before anything is published the first failure publishes `false` (a starting Dkron is
/// not the leader). The shell records `published` only after the patch succeeded, so a failed
/// patch is retried on the next poll.
pub fn decide(
    state: LabelState,
    observation: Observation,
    failures_before_follower: u32,
) -> (LabelState, Option<bool>) {
    let (wanted, consecutive_failures) = match observation {
        Observation::Leader => (Some(true), 0),
        Observation::Follower => (Some(false), 0),
        Observation::Failed => {
            let failures = state.consecutive_failures.saturating_add(1);
            let wanted = if failures >= failures_before_follower || state.published.is_none() {
                Some(false)
            } else {
                state.published
            };
            (wanted, failures)
        }
    };
    let next = LabelState {
        published: state.published,
        consecutive_failures,
    };
    let patch = wanted.filter(|w| state.published != Some(*w));
    (next, patch)
}

async fn observe(dkron: &DkronClient, args: &LabelUpdaterArgs, timeout: Duration) -> Observation {
    match dkron
        .is_leader(&args.dkron_host, args.dkron_port, timeout)
        .await
    {
        Ok(IsLeaderAnswer::Leader) => Observation::Leader,
        Ok(IsLeaderAnswer::Follower) => Observation::Follower,
        Ok(IsLeaderAnswer::Unexpected { status }) => {
            tracing::debug!(status, "unexpected answer to GET /v1/isleader");
            Observation::Failed
        }
        Err(error) => {
            tracing::debug!(%error, "no answer to GET /v1/isleader");
            Observation::Failed
        }
    }
}

/// JSON merge patch setting the leader label.
pub fn label_patch(leader: bool) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { LABEL_LEADER: leader.to_string() } } })
}

async fn patch_label(pods: &Api<Pod>, name: &str, leader: bool) -> Result<(), kube::Error> {
    let patch = label_patch(leader);
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Runs until SIGTERM or SIGINT, then publishes `false` and returns.
pub async fn run(args: LabelUpdaterArgs) -> Result<(), LabelUpdaterError> {
    if args.interval_ms == 0 {
        return Err(LabelUpdaterError::ZeroInterval);
    }
    let mut term = signal(SignalKind::terminate()).map_err(LabelUpdaterError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(LabelUpdaterError::Signals)?;
    let client = kube::Client::try_default()
        .await
        .map_err(LabelUpdaterError::Client)?;
    let pods: Api<Pod> = Api::namespaced(client, &args.pod_namespace);
    let dkron = DkronClient::new()?;
    let interval = Duration::from_millis(args.interval_ms);
    // An answer later than one interval is as good as none.
    let poll_timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = LabelState::default();
    tracing::info!(pod = %args.pod_name, namespace = %args.pod_namespace, interval_ms = args.interval_ms, "label-updater started");
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let observation = observe(&dkron, &args, poll_timeout).await;
        let (next, patch) = decide(state, observation, args.failures_before_follower);
        state = next;
        if let Some(leader) = patch {
            match patch_label(&pods, &args.pod_name, leader).await {
                Ok(()) => {
                    tracing::info!(pod = %args.pod_name, leader, ?observation, "leader label updated");
                    state.published = Some(leader);
                }
                Err(error) => {
                    tracing::warn!(pod = %args.pod_name, leader, %error, "cannot patch the leader label; retrying on the next poll");
                }
            }
        }
    }
    // Leaving: the leader Service must stop selecting this pod now, not after Dkron is gone.
    tracing::info!(pod = %args.pod_name, "stopping: setting the leader label to false");
    let set_false = || async {
        match tokio::time::timeout(
            Duration::from_secs(3),
            patch_label(&pods, &args.pod_name, false),
        )
        .await
        {
            Ok(result) => result.map_err(|error| error.to_string()),
            Err(_) => Err("no answer within 3 s".to_owned()),
        }
    };
    let backoff = ConstantBuilder::default()
        .with_delay(Duration::from_millis(200))
        .with_jitter()
        .with_max_times(2);
    if let Err(error) = set_false
        .retry(backoff)
        .notify(|error, _| tracing::warn!(%error, "cannot set the leader label to false; retrying"))
        .await
    {
        tracing::warn!(pod = %args.pod_name, %error, "the leader label was not set to false");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u32 = 3;

    fn state(published: Option<bool>, consecutive_failures: u32) -> LabelState {
        LabelState {
            published,
            consecutive_failures,
        }
    }

    #[test]
    fn first_observation_is_always_published() {
        assert_eq!(decide(state(None, 0), Observation::Leader, T).1, Some(true));
        assert_eq!(
            decide(state(None, 0), Observation::Follower, T).1,
            Some(false)
        );
        assert_eq!(
            decide(state(None, 0), Observation::Failed, T).1,
            Some(false)
        );
    }

    #[test]
    fn unchanged_leadership_is_not_patched_again() {
        assert_eq!(decide(state(Some(true), 0), Observation::Leader, T).1, None);
        assert_eq!(
            decide(state(Some(false), 0), Observation::Follower, T).1,
            None
        );
    }

    #[test]
    fn leader_that_becomes_follower_is_demoted() {
        assert_eq!(
            decide(state(Some(true), 0), Observation::Follower, T).1,
            Some(false)
        );
        assert_eq!(
            decide(state(Some(false), 0), Observation::Leader, T).1,
            Some(true)
        );
    }

    #[test]
    fn short_outage_keeps_the_label_long_outage_demotes() {
        let mut s = state(Some(true), 0);
        for _ in 1..T {
            let (next, patch) = decide(s, Observation::Failed, T);
            assert_eq!(patch, None);
            s = next;
        }
        let (next, patch) = decide(s, Observation::Failed, T);
        assert_eq!(patch, Some(false));
        assert_eq!(next.consecutive_failures, T);
        // A success resets the count.
        let (next, _) = decide(next, Observation::Leader, T);
        assert_eq!(next.consecutive_failures, 0);
    }

    #[test]
    fn failed_patch_is_retried_because_published_is_unchanged() {
        let (next, patch) = decide(state(Some(false), 0), Observation::Leader, T);
        assert_eq!(patch, Some(true));
        // The shell did not record the value (patch failed): the next poll patches again.
        assert_eq!(decide(next, Observation::Leader, T).1, Some(true));
    }

    #[test]
    fn patch_is_a_merge_patch_of_one_label() {
        assert_eq!(
            label_patch(true),
            serde_json::json!({"metadata": {"labels": {"dkron-ha/leader": "true"}}})
        );
    }
}

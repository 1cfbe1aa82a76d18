//! The order of a FleetLock request's steps, as pure functions of what the shell observed:
//! pre-reboot takes the slot, cordons, then looks at the pods and evicts until the Node is
//! drained or the request's time is up; steady-state checks readiness, then uncordons and
//! releases. The shell ([`super::FleetLock`]) performs each step and reports the next
//! observation; Events, metrics and logs stay in the shell.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::FleetLockError;
use super::drain::{self, CordonDecision, DrainPlan, EvictionOutcome, PodKey};
use super::lock::{AcquireOutcome, LeftQueue, Reclaimed};
use super::quorum::Shortfall;

/// How often a pre-reboot request looks again at the pods of a draining Node. A poll until
/// a deadline, decided here step by step, not a retry of a failed call: no backon.
pub const DRAIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What the shell saw after the previous step of a pre-reboot request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Nothing yet: the request just arrived (its Node found).
    Arrived,
    /// The lock's answer, and the holders and waiters it dropped on the way.
    Slot {
        outcome: AcquireOutcome,
        reclaimed: Vec<Reclaimed>,
        left_queue: Vec<LeftQueue>,
    },
    Cordon(CordonDecision),
    /// The Node's pods, the Dkron clusters whose servers among them must stay for now, and how
    /// much of the request's drain wait is left.
    Pods {
        plan: DrainPlan,
        held: Vec<Shortfall>,
        time_left: Duration,
    },
    /// The Eviction API's answers, and how much of the drain wait is left.
    Evicted {
        outcomes: BTreeMap<PodKey, EvictionOutcome>,
        time_left: Duration,
    },
    Waited,
}

/// What the shell does next.
#[derive(Debug)]
pub enum Step {
    TakeSlot,
    Cordon,
    ListPods,
    Evict(Vec<PodKey>),
    Wait(Duration),
    /// Answer Zincati: `Ok` approves the reboot.
    Answer(Result<(), FleetLockError>),
}

/// One pre-reboot request's progress; [`PreReboot::next`] is the whole order of steps.
#[derive(Clone, Debug)]
pub struct PreReboot {
    node: String,
    group: String,
    slots: u32,
    /// The latest eviction answers, which explain what still blocks the drain.
    last_outcomes: Option<BTreeMap<PodKey, EvictionOutcome>>,
}

impl PreReboot {
    pub fn new(node: &str, group: &str, slots: u32) -> Self {
        PreReboot {
            node: node.to_owned(),
            group: group.to_owned(),
            slots,
            last_outcomes: None,
        }
    }

    pub fn next(&mut self, observed: Observed) -> Step {
        match observed {
            Observed::Arrived => Step::TakeSlot,
            Observed::Slot {
                outcome:
                    AcquireOutcome::Full {
                        holders,
                        position,
                        waiting,
                    },
                ..
            } => Step::Answer(Err(FleetLockError::SemaphoreFull {
                group: self.group.clone(),
                slots: self.slots,
                holders,
                position,
                waiting,
            })),
            Observed::Slot { .. } => Step::Cordon,
            Observed::Cordon(_) | Observed::Waited => Step::ListPods,
            Observed::Pods { plan, .. } if plan.is_drained() => Step::Answer(Ok(())),
            Observed::Pods {
                plan,
                held,
                time_left,
            } => match &self.last_outcomes {
                // Evict at least once per request, however short its wait.
                Some(outcomes) if time_left.is_zero() => {
                    Step::Answer(Err(match held.into_iter().next() {
                        Some(shortfall) => FleetLockError::DkronQuorumAtRisk {
                            node: self.node.clone(),
                            shortfall: Box::new(shortfall),
                        },
                        None => FleetLockError::DrainInProgress {
                            node: self.node.clone(),
                            remaining: drain::describe_remaining(&plan, outcomes),
                        },
                    }))
                }
                _ => Step::Evict(
                    plan.to_evict
                        .into_iter()
                        .filter(|pod| !held.iter().any(|shortfall| shortfall.holds(pod)))
                        .collect(),
                ),
            },
            Observed::Evicted {
                outcomes,
                time_left,
            } => {
                self.last_outcomes = Some(outcomes);
                if time_left.is_zero() {
                    Step::ListPods
                } else {
                    Step::Wait(time_left.min(DRAIN_POLL_INTERVAL))
                }
            }
        }
    }
}

/// What steady-state does for a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SteadyState {
    /// It holds no slot and FleetLock did not cordon it: 200 at once.
    NothingHeld,
    /// Not Ready yet: keep everything, Zincati asks again.
    NotReady,
    /// Uncordon it (if FleetLock cordoned it), then release its slot in these groups.
    Unlock { groups: BTreeSet<String> },
}

/// Steady-state's plan from the groups whose slot the Node holds, whether FleetLock cordoned
/// it, and whether it is Ready.
pub fn plan_steady_state(
    held_in: BTreeSet<String>,
    cordoned_by_us: bool,
    ready: bool,
) -> SteadyState {
    if held_in.is_empty() && !cordoned_by_us {
        SteadyState::NothingHeld
    } else if !ready {
        SteadyState::NotReady
    } else {
        SteadyState::Unlock { groups: held_in }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleetlock::ErrorKind;

    const WAIT: Duration = Duration::from_secs(30);

    fn pod(name: &str) -> PodKey {
        PodKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn plan(to_evict: &[&str], terminating: &[&str]) -> DrainPlan {
        DrainPlan {
            to_evict: to_evict.iter().map(|n| pod(n)).collect(),
            terminating: terminating.iter().map(|n| pod(n)).collect(),
            skipped: Vec::new(),
        }
    }

    fn slot(outcome: AcquireOutcome) -> Observed {
        Observed::Slot {
            outcome,
            reclaimed: Vec::new(),
            left_queue: Vec::new(),
        }
    }

    fn steps() -> PreReboot {
        PreReboot::new("node-a", "default", 1)
    }

    /// A step as the tests compare it: a refusal by its kind.
    #[derive(Debug, PartialEq)]
    enum Seen {
        TakeSlot,
        Cordon,
        ListPods,
        Evict(Vec<PodKey>),
        Wait(Duration),
        Approve,
        Refuse(ErrorKind),
    }

    fn seen(step: &Step) -> Seen {
        match step {
            Step::TakeSlot => Seen::TakeSlot,
            Step::Cordon => Seen::Cordon,
            Step::ListPods => Seen::ListPods,
            Step::Evict(pods) => Seen::Evict(pods.clone()),
            Step::Wait(pause) => Seen::Wait(*pause),
            Step::Answer(Ok(())) => Seen::Approve,
            Step::Answer(Err(error)) => Seen::Refuse(error.kind()),
        }
    }

    /// Feeds `observed` and returns what came next.
    fn after(steps: &mut PreReboot, observed: Observed) -> Seen {
        seen(&steps.next(observed))
    }

    #[test]
    fn pre_reboot_takes_the_slot_then_cordons_then_looks_at_the_pods() {
        let mut steps = steps();
        assert_eq!(after(&mut steps, Observed::Arrived), Seen::TakeSlot);
        assert_eq!(
            after(&mut steps, slot(AcquireOutcome::Acquired)),
            Seen::Cordon
        );
        assert_eq!(
            after(&mut steps, Observed::Cordon(CordonDecision::Cordon)),
            Seen::ListPods
        );
        let drained = Observed::Pods {
            plan: plan(&[], &[]),
            held: Vec::new(),
            time_left: WAIT,
        };
        assert_eq!(after(&mut steps, drained), Seen::Approve);
    }

    #[test]
    fn a_held_slot_is_kept_and_the_drain_goes_on() {
        let mut steps = steps();
        assert_eq!(
            after(&mut steps, slot(AcquireOutcome::AlreadyHeld)),
            Seen::Cordon
        );
        // A Node cordoned by someone else is drained all the same.
        assert_eq!(
            after(
                &mut steps,
                Observed::Cordon(CordonDecision::CordonedByOthers)
            ),
            Seen::ListPods
        );
    }

    #[test]
    fn a_full_group_is_refused_before_anything_is_touched() {
        let mut steps = steps();
        let step = steps.next(slot(AcquireOutcome::Full {
            holders: vec!["node-b".into()],
            position: 2,
            waiting: 3,
        }));
        assert_eq!(
            seen(&step),
            Seen::Refuse(ErrorKind::FailedLockSemaphoreFull)
        );
        let Step::Answer(Err(error)) = step else {
            unreachable!()
        };
        let text = error.to_string();
        assert!(
            text.contains("node-b") && text.contains("number 2 of 3 in line"),
            "{text}"
        );
    }

    #[test]
    fn pods_are_evicted_then_looked_at_again_after_a_pause() {
        let mut steps = steps();
        let pods = Observed::Pods {
            plan: plan(&["web-1", "web-2"], &["old"]),
            held: Vec::new(),
            time_left: WAIT,
        };
        assert_eq!(
            after(&mut steps, pods),
            Seen::Evict(vec![pod("web-1"), pod("web-2")])
        );
        let evicted = Observed::Evicted {
            outcomes: BTreeMap::from([
                (pod("web-1"), EvictionOutcome::Evicted),
                (pod("web-2"), EvictionOutcome::Evicted),
            ]),
            time_left: WAIT,
        };
        assert_eq!(after(&mut steps, evicted), Seen::Wait(DRAIN_POLL_INTERVAL));
        assert_eq!(after(&mut steps, Observed::Waited), Seen::ListPods);
        // The pause never outlasts the request's wait.
        let evicted = Observed::Evicted {
            outcomes: BTreeMap::new(),
            time_left: Duration::from_millis(300),
        };
        assert_eq!(
            after(&mut steps, evicted),
            Seen::Wait(Duration::from_millis(300))
        );
    }

    #[test]
    fn pods_still_terminating_are_waited_for_not_evicted_again() {
        let mut steps = steps();
        let pods = Observed::Pods {
            plan: plan(&[], &["web-1"]),
            held: Vec::new(),
            time_left: WAIT,
        };
        assert_eq!(after(&mut steps, pods), Seen::Evict(Vec::new()));
    }

    #[test]
    fn every_request_evicts_once_even_with_no_time_left() {
        let mut steps = steps();
        let pods = Observed::Pods {
            plan: plan(&["web-1"], &[]),
            held: Vec::new(),
            time_left: Duration::ZERO,
        };
        assert_eq!(after(&mut steps, pods), Seen::Evict(vec![pod("web-1")]));
    }

    #[test]
    fn when_the_wait_is_over_the_answer_says_what_blocks_the_drain() {
        let mut steps = steps();
        steps.next(Observed::Pods {
            plan: plan(&["dkron-1"], &[]),
            held: Vec::new(),
            time_left: Duration::from_millis(10),
        });
        let evicted = Observed::Evicted {
            outcomes: BTreeMap::from([(
                pod("dkron-1"),
                EvictionOutcome::BlockedByDisruptionBudget("dkron-dkron-ha".into()),
            )]),
            time_left: Duration::ZERO,
        };
        assert_eq!(after(&mut steps, evicted), Seen::ListPods);
        let step = steps.next(Observed::Pods {
            plan: plan(&["dkron-1"], &[]),
            held: Vec::new(),
            time_left: Duration::ZERO,
        });
        assert_eq!(seen(&step), Seen::Refuse(ErrorKind::DrainInProgress));
        let Step::Answer(Err(error)) = step else {
            unreachable!()
        };
        let text = error.to_string();
        assert!(
            text.contains("default/dkron-1") && text.contains("PodDisruptionBudget"),
            "{text}"
        );
    }

    #[test]
    fn a_dkron_server_held_for_its_quorum_is_not_evicted_and_the_answer_names_its_cluster() {
        let mut steps = steps();
        let shortfall = Shortfall {
            namespace: "default".into(),
            statefulset: "dkron".into(),
            replicas: 3,
            ready_voters: vec!["dkron-0".into(), "dkron-2".into()],
            would_remain: 1,
            majority: 2,
            on_node: vec![pod("dkron-0")],
        };
        let pods = |time_left| Observed::Pods {
            plan: plan(&["dkron-0", "web-1"], &[]),
            held: vec![shortfall.clone()],
            time_left,
        };
        // The other pods go; the server stays.
        assert_eq!(
            after(&mut steps, pods(WAIT)),
            Seen::Evict(vec![pod("web-1")])
        );
        steps.next(Observed::Evicted {
            outcomes: BTreeMap::from([(pod("web-1"), EvictionOutcome::Evicted)]),
            time_left: Duration::ZERO,
        });
        let step = steps.next(pods(Duration::ZERO));
        assert_eq!(seen(&step), Seen::Refuse(ErrorKind::DkronQuorumAtRisk));
        let Step::Answer(Err(error)) = step else {
            unreachable!()
        };
        let text = error.to_string();
        assert!(
            text.contains("node-a waits")
                && text.contains("default/dkron has 2 of 3 servers Ready as raft voters"),
            "{text}"
        );
    }

    #[test]
    fn a_node_drained_at_the_last_look_is_approved_although_the_wait_is_over() {
        let mut steps = steps();
        steps.next(Observed::Evicted {
            outcomes: BTreeMap::new(),
            time_left: Duration::ZERO,
        });
        let drained = Observed::Pods {
            plan: plan(&[], &[]),
            held: Vec::new(),
            time_left: Duration::ZERO,
        };
        assert_eq!(after(&mut steps, drained), Seen::Approve);
    }

    #[test]
    fn steady_state_answers_at_once_for_a_node_holding_nothing_even_if_not_ready() {
        assert_eq!(
            plan_steady_state(BTreeSet::new(), false, false),
            SteadyState::NothingHeld
        );
    }

    #[test]
    fn steady_state_keeps_slot_and_cordon_until_the_node_is_ready() {
        let groups = BTreeSet::from(["default".to_owned()]);
        assert_eq!(
            plan_steady_state(groups.clone(), false, false),
            SteadyState::NotReady
        );
        assert_eq!(
            plan_steady_state(BTreeSet::new(), true, false),
            SteadyState::NotReady
        );
        assert_eq!(
            plan_steady_state(groups.clone(), true, true),
            SteadyState::Unlock { groups }
        );
        assert_eq!(
            plan_steady_state(BTreeSet::new(), true, true),
            SteadyState::Unlock {
                groups: BTreeSet::new()
            }
        );
    }
}

//! The reboot semaphore's decision and its queue, without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dkron_ha::fleetlock::ErrorKind;
use dkron_ha::fleetlock::lock::{
    AcquireOutcome, DEFAULT_QUEUE_TIMEOUT, HOLDERS_ANNOTATION, Holder, LockPolicy, LockRequest,
    LockState, QUEUE_ANNOTATION, ReleaseReason, Waiter, decide_acquire, decide_release, lease_name,
    lease_with_state, slots_for_group, state_from_lease,
};
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(1_750_000_000 + second).expect("in range")
}

fn holder(node: &str, since: i64) -> Holder {
    Holder {
        node: node.to_owned(),
        id: format!("id-{node}"),
        acquired_at: at(since),
        renewed_at: at(since),
    }
}

fn waiter(node: &str, since: i64) -> Waiter {
    Waiter {
        node: node.to_owned(),
        id: format!("id-{node}"),
        first_asked_at: at(since),
        last_asked_at: at(since),
    }
}

fn state(holders: &[Holder]) -> LockState {
    LockState {
        holders: holders.to_vec(),
        queue: Vec::new(),
    }
}

fn queued(holders: &[Holder], queue: &[Waiter]) -> LockState {
    LockState {
        holders: holders.to_vec(),
        queue: queue.to_vec(),
    }
}

fn queue_of(state: &LockState) -> Vec<&str> {
    state.queue.iter().map(|w| w.node.as_str()).collect()
}

fn full(holders: &[&str], position: usize, waiting: usize) -> AcquireOutcome {
    AcquireOutcome::Full {
        holders: holders.iter().map(|h| (*h).to_owned()).collect(),
        position,
        waiting,
    }
}

fn request(node: &str) -> LockRequest<'_> {
    LockRequest { node, id: "the-id" }
}

fn slots(n: u32) -> LockPolicy {
    LockPolicy {
        slots: n,
        ttl: None,
        queue_timeout: DEFAULT_QUEUE_TIMEOUT,
    }
}

fn all_nodes_exist(_: &str) -> bool {
    true
}

#[test]
fn a_free_slot_is_taken() {
    let decision = decide_acquire(
        &LockState::default(),
        request("a"),
        slots(1),
        at(0),
        &all_nodes_exist,
    );
    assert_eq!(decision.outcome, AcquireOutcome::Acquired);
    assert_eq!(decision.state.node_names(), ["a"]);
    assert_eq!(decision.state.holders[0].acquired_at, at(0));
    assert!(decision.reclaimed.is_empty());
}

#[test]
fn the_holder_asking_again_keeps_its_slot_and_renews_it() {
    let held = state(&[holder("a", 0)]);
    let decision = decide_acquire(&held, request("a"), slots(1), at(60), &all_nodes_exist);
    assert_eq!(decision.outcome, AcquireOutcome::AlreadyHeld);
    assert_eq!(decision.state.holders.len(), 1);
    assert_eq!(decision.state.holders[0].acquired_at, at(0));
    assert_eq!(decision.state.holders[0].renewed_at, at(60));
}

#[test]
fn a_full_semaphore_refuses_names_the_holders_and_queues_the_node() {
    let held = state(&[holder("a", 0), holder("b", 1)]);
    let decision = decide_acquire(&held, request("c"), slots(2), at(5), &all_nodes_exist);
    assert_eq!(decision.outcome, full(&["a", "b"], 1, 1));
    assert_eq!(decision.state.holders, held.holders);
    assert_eq!(queue_of(&decision.state), ["c"]);
    assert_eq!(decision.state.queue[0].first_asked_at, at(5));
    // Asking again soon after changes nothing, so it costs no Lease write.
    let again = decide_acquire(
        &decision.state,
        request("c"),
        slots(2),
        at(6),
        &all_nodes_exist,
    );
    assert_eq!(again.outcome, full(&["a", "b"], 1, 1));
    assert_eq!(again.state, decision.state);
}

#[test]
fn zero_slots_freeze_a_group() {
    let decision = decide_acquire(
        &LockState::default(),
        request("a"),
        slots(0),
        at(0),
        &all_nodes_exist,
    );
    assert_eq!(decision.outcome, full(&[], 1, 1));
}

#[test]
fn lowering_the_slots_keeps_existing_holders_but_admits_nobody_new() {
    let held = state(&[holder("a", 0), holder("b", 1)]);
    let again = decide_acquire(&held, request("b"), slots(1), at(5), &all_nodes_exist);
    assert_eq!(again.outcome, AcquireOutcome::AlreadyHeld);
    let newcomer = decide_acquire(&held, request("c"), slots(1), at(5), &all_nodes_exist);
    assert!(matches!(newcomer.outcome, AcquireOutcome::Full { .. }));
}

#[test]
fn a_holder_whose_node_is_gone_is_released() {
    let held = state(&[holder("gone", 0)]);
    let decision = decide_acquire(&held, request("b"), slots(1), at(5), &|node| node != "gone");
    assert_eq!(decision.outcome, AcquireOutcome::Acquired);
    assert_eq!(decision.state.node_names(), ["b"]);
    assert_eq!(decision.reclaimed.len(), 1);
    assert_eq!(decision.reclaimed[0].reason, ReleaseReason::NodeGone);
    assert_eq!(decision.reclaimed[0].holder.node, "gone");
}

#[test]
fn a_silent_holder_is_released_after_the_ttl() {
    let held = state(&[holder("a", 0)]);
    let policy = LockPolicy {
        slots: 1,
        ttl: Some(Duration::from_secs(3600)),
        queue_timeout: DEFAULT_QUEUE_TIMEOUT,
    };
    let early = decide_acquire(&held, request("b"), policy, at(3600), &all_nodes_exist);
    assert!(matches!(early.outcome, AcquireOutcome::Full { .. }));
    let late = decide_acquire(&held, request("b"), policy, at(3601), &all_nodes_exist);
    assert_eq!(late.outcome, AcquireOutcome::Acquired);
    assert_eq!(late.reclaimed[0].reason, ReleaseReason::Expired);
}

#[test]
fn the_ttl_counts_from_the_last_request_not_the_first() {
    let mut renewed = holder("a", 0);
    renewed.renewed_at = at(3000);
    let policy = LockPolicy {
        slots: 1,
        ttl: Some(Duration::from_secs(3600)),
        queue_timeout: DEFAULT_QUEUE_TIMEOUT,
    };
    let decision = decide_acquire(
        &state(&[renewed]),
        request("b"),
        policy,
        at(4000),
        &all_nodes_exist,
    );
    assert!(matches!(decision.outcome, AcquireOutcome::Full { .. }));
}

#[test]
fn an_expired_holder_asking_again_keeps_its_slot() {
    let policy = LockPolicy {
        slots: 1,
        ttl: Some(Duration::from_secs(60)),
        queue_timeout: DEFAULT_QUEUE_TIMEOUT,
    };
    let decision = decide_acquire(
        &state(&[holder("a", 0)]),
        request("a"),
        policy,
        at(9999),
        &all_nodes_exist,
    );
    assert_eq!(decision.outcome, AcquireOutcome::AlreadyHeld);
    assert!(decision.reclaimed.is_empty());
}

#[test]
fn a_zero_ttl_means_no_ttl() {
    let policy = LockPolicy {
        slots: 1,
        ttl: Some(Duration::ZERO),
        queue_timeout: DEFAULT_QUEUE_TIMEOUT,
    };
    let decision = decide_acquire(
        &state(&[holder("a", 0)]),
        request("b"),
        policy,
        at(999_999),
        &all_nodes_exist,
    );
    assert!(matches!(decision.outcome, AcquireOutcome::Full { .. }));
}

#[test]
fn release_is_unlock_if_held() {
    let held = state(&[holder("a", 0), holder("b", 1)]);
    let released = decide_release(&held, "a");
    assert!(released.was_held);
    assert_eq!(released.state.node_names(), ["b"]);
    let again = decide_release(&released.state, "a");
    assert!(!again.was_held);
    assert_eq!(again.state, released.state);
}

#[test]
fn a_freed_slot_goes_to_the_first_waiter_not_the_first_to_ask_again() {
    let state = queued(&[holder("a", 0)], &[waiter("b", 1), waiter("c", 2)]);
    // c asks first after the slot was freed, but b asked before it.
    let freed = decide_release(&state, "a").state;
    let c = decide_acquire(&freed, request("c"), slots(1), at(10), &all_nodes_exist);
    assert_eq!(c.outcome, full(&[], 2, 2));
    assert_eq!(queue_of(&c.state), ["b", "c"], "c keeps its place");
    let b = decide_acquire(&c.state, request("b"), slots(1), at(11), &all_nodes_exist);
    assert_eq!(b.outcome, AcquireOutcome::Acquired);
    assert_eq!(b.state.node_names(), ["b"]);
    assert_eq!(queue_of(&b.state), ["c"]);
}

#[test]
fn free_slots_go_to_as_many_waiters_as_there_are_slots_in_any_order() {
    let state = queued(&[], &[waiter("b", 1), waiter("c", 2), waiter("d", 3)]);
    // Two free slots: c (second in line) may take one before b; d (third) may not.
    let c = decide_acquire(&state, request("c"), slots(2), at(10), &all_nodes_exist);
    assert_eq!(c.outcome, AcquireOutcome::Acquired);
    let d = decide_acquire(&c.state, request("d"), slots(2), at(11), &all_nodes_exist);
    assert_eq!(d.outcome, full(&["c"], 2, 2));
    let b = decide_acquire(&d.state, request("b"), slots(2), at(12), &all_nodes_exist);
    assert_eq!(b.outcome, AcquireOutcome::Acquired);
    assert_eq!(b.state.node_names(), ["c", "b"]);
    assert_eq!(queue_of(&b.state), ["d"]);
}

#[test]
fn a_newcomer_waits_behind_the_queue_even_when_a_slot_is_free() {
    let state = queued(&[], &[waiter("b", 1)]);
    let decision = decide_acquire(&state, request("n"), slots(1), at(10), &all_nodes_exist);
    assert_eq!(decision.outcome, full(&[], 2, 2));
    assert_eq!(queue_of(&decision.state), ["b", "n"]);
}

#[test]
fn a_waiter_that_stops_asking_leaves_the_queue_after_the_timeout() {
    let policy = LockPolicy {
        slots: 1,
        ttl: None,
        queue_timeout: Duration::from_secs(900),
    };
    let state = queued(&[], &[waiter("b", 0), waiter("c", 1)]);
    let early = decide_acquire(&state, request("c"), policy, at(900), &all_nodes_exist);
    assert_eq!(early.outcome, full(&[], 2, 2));
    assert!(early.left_queue.is_empty());
    let late = decide_acquire(&state, request("c"), policy, at(901), &all_nodes_exist);
    assert_eq!(late.outcome, AcquireOutcome::Acquired);
    assert_eq!(late.left_queue.len(), 1);
    assert_eq!(late.left_queue[0].waiter.node, "b");
    assert_eq!(late.left_queue[0].reason, ReleaseReason::Expired);
}

#[test]
fn asking_again_refreshes_the_last_ask_once_a_tenth_of_the_timeout_has_passed() {
    let policy = LockPolicy {
        slots: 0,
        ttl: None,
        queue_timeout: Duration::from_secs(900),
    };
    let state = queued(&[], &[waiter("b", 0)]);
    let soon = decide_acquire(&state, request("b"), policy, at(90), &all_nodes_exist);
    assert_eq!(soon.state.queue[0].last_asked_at, at(0));
    let later = decide_acquire(&state, request("b"), policy, at(91), &all_nodes_exist);
    assert_eq!(later.state.queue[0].last_asked_at, at(91));
    assert_eq!(
        later.state.queue[0].first_asked_at,
        at(0),
        "it keeps its place"
    );
    // Kept asking: never expires, however long it waits.
    let much_later = decide_acquire(
        &later.state,
        request("b"),
        policy,
        at(950),
        &all_nodes_exist,
    );
    assert!(much_later.left_queue.is_empty());
    assert_eq!(queue_of(&much_later.state), ["b"]);
}

#[test]
fn a_waiter_whose_node_is_gone_leaves_the_queue() {
    let state = queued(&[], &[waiter("gone", 0), waiter("c", 1)]);
    let decision = decide_acquire(&state, request("c"), slots(1), at(5), &|n| n != "gone");
    assert_eq!(decision.outcome, AcquireOutcome::Acquired);
    assert_eq!(decision.left_queue[0].reason, ReleaseReason::NodeGone);
    assert!(decision.state.queue.is_empty());
}

#[test]
fn steady_state_leaves_the_queue() {
    let state = queued(&[holder("a", 0)], &[waiter("b", 1), waiter("c", 2)]);
    let released = decide_release(&state, "b");
    assert!(!released.was_held);
    assert_eq!(queue_of(&released.state), ["c"]);
    assert_eq!(released.state.node_names(), ["a"]);
}

#[test]
fn a_holder_asking_again_is_never_queued() {
    let state = state(&[holder("a", 0)]);
    let decision = decide_acquire(&state, request("a"), slots(0), at(5), &all_nodes_exist);
    assert_eq!(decision.outcome, AcquireOutcome::AlreadyHeld);
    assert!(decision.state.queue.is_empty());
}

#[test]
fn slots_come_from_the_config_map_without_case_else_the_default() {
    let data = BTreeMap::from([
        ("Workers".to_owned(), " 3 ".to_owned()),
        ("frozen".to_owned(), "0".to_owned()),
    ]);
    assert_eq!(
        slots_for_group(Some(&data), "workers", 1, "cm").expect("valid"),
        3
    );
    assert_eq!(
        slots_for_group(Some(&data), "frozen", 1, "cm").expect("valid"),
        0
    );
    assert_eq!(
        slots_for_group(Some(&data), "other", 2, "cm").expect("valid"),
        2
    );
    assert_eq!(slots_for_group(None, "other", 1, "cm").expect("valid"), 1);
}

#[test]
fn a_bad_slot_value_is_a_configuration_error_naming_the_key() {
    let data = BTreeMap::from([("workers".to_owned(), "two".to_owned())]);
    let error = slots_for_group(Some(&data), "workers", 1, "dkron-ha-fleetlock").expect_err("bad");
    assert_eq!(error.kind(), ErrorKind::InvalidConfiguration);
    let message = error.to_string();
    assert!(
        message.contains("dkron-ha-fleetlock") && message.contains("workers"),
        "{message}"
    );
}

#[test]
fn holders_and_queue_round_trip_through_a_lease() {
    let held = queued(&[holder("a", 0), holder("b", 1)], &[waiter("c", 2)]);
    let lease = lease_with_state(None, "kube-system", "workers", &held).expect("encodes");
    assert_eq!(
        lease.metadata.name.as_deref(),
        Some("dkron-ha-fleetlock-workers")
    );
    assert_eq!(lease_name("workers"), "dkron-ha-fleetlock-workers");
    assert_eq!(lease.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("a,b")
    );
    assert_eq!(state_from_lease(&lease).expect("decodes"), held);
    assert!(lease.metadata.annotations.as_ref().unwrap()[QUEUE_ANNOTATION].contains("\"c\""));
    let emptied = lease_with_state(Some(lease), "kube-system", "workers", &LockState::default())
        .expect("encodes");
    assert_eq!(
        emptied
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone()),
        None
    );
    assert_eq!(
        state_from_lease(&emptied).expect("decodes"),
        LockState::default()
    );
}

#[test]
fn an_unreadable_lease_is_reported_with_the_fix() {
    let mut lease =
        lease_with_state(None, "ns", "default", &LockState::default()).expect("encodes");
    lease
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(HOLDERS_ANNOTATION.to_owned(), "{not json".to_owned());
    let error = state_from_lease(&lease).expect_err("corrupt");
    assert_eq!(error.kind(), ErrorKind::CorruptLockState);
    assert!(error.to_string().contains("delete the Lease"));
}

#[derive(Clone, Debug)]
enum Step {
    Lock(usize),
    Unlock(usize),
    Delete(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6usize).prop_map(Step::Lock),
        (0..6usize).prop_map(Step::Unlock),
        (0..6usize).prop_map(Step::Delete),
    ]
}

proptest! {
    /// Whatever the order of requests: never more holders than slots, every holder is
    /// distinct, a holder asking again always succeeds, and a granted node holds a slot.
    #[test]
    fn the_semaphore_never_overflows(slot_count in 0u32..4, steps in proptest::collection::vec(step(), 0..60)) {
        let names = ["n0", "n1", "n2", "n3", "n4", "n5"];
        let mut current = LockState::default();
        let mut deleted: BTreeSet<&str> = BTreeSet::new();
        for (i, step) in steps.iter().enumerate() {
            let now = at(i as i64);
            match *step {
                Step::Lock(n) => {
                    let node = names[n];
                    deleted.remove(node);
                    let was_holder = current.holds(node);
                    let decision = decide_acquire(&current, request(node), slots(slot_count), now, &|name| !deleted.contains(name));
                    if was_holder {
                        prop_assert_eq!(&decision.outcome, &AcquireOutcome::AlreadyHeld);
                    }
                    if decision.outcome == AcquireOutcome::Acquired {
                        // Granted only if every waiter still ahead of it got a slot too.
                        let ahead = current
                            .queue
                            .iter()
                            .take_while(|w| w.node != node)
                            .filter(|w| decision.state.is_queued(&w.node))
                            .count();
                        let free_before = (slot_count as usize).saturating_sub(decision.state.holders.len() - 1);
                        prop_assert!(ahead < free_before, "{node} jumped the queue");
                    }
                    match decision.outcome {
                        AcquireOutcome::Acquired | AcquireOutcome::AlreadyHeld => prop_assert!(decision.state.holds(node)),
                        AcquireOutcome::Full { .. } => prop_assert!(!decision.state.holds(node)),
                    }
                    current = decision.state;
                }
                Step::Unlock(n) => {
                    current = decide_release(&current, names[n]).state;
                    prop_assert!(!current.holds(names[n]));
                }
                Step::Delete(n) => { deleted.insert(names[n]); }
            }
            let distinct: BTreeSet<&str> = current.holders.iter().map(|h| h.node.as_str()).collect();
            prop_assert_eq!(distinct.len(), current.holders.len());
            prop_assert!(current.holders.len() <= slot_count as usize);
            let waiting: BTreeSet<&str> = current.queue.iter().map(|w| w.node.as_str()).collect();
            prop_assert_eq!(waiting.len(), current.queue.len(), "a node waits once");
            prop_assert!(waiting.is_disjoint(&distinct), "a holder never waits");
        }
    }
}

//! The injection engine's rules: UPDATE semantics, denials, idempotency as a property, and
//! "the patch applied to the input equals the engine's output".

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dkron_ha::admission::{mutate_statefulset, review};
use dkron_ha::inject::{self, InjectError, InjectorConfig, Operation};
use k8s_openapi::api::apps::v1::StatefulSet;
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> InjectorConfig {
    InjectorConfig {
        image: "dkron-ha:test".into(),
        cluster_domain: "cluster.local".into(),
        native_sidecar: false,
        version: "test".into(),
    }
}

fn sts(value: Value) -> StatefulSet {
    serde_json::from_value(value).expect("valid StatefulSet")
}

fn dkron_sts(annotations: Value, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "dkron", "namespace": "ns", "annotations": annotations},
        "spec": {
            "serviceName": "dkron",
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "dkron"}},
            "template": {
                "metadata": {"labels": {"app": "dkron"}},
                "spec": {"containers": [{"name": "dkron", "image": "dkron/dkron:4.1.1", "args": ["agent", "--server"]}]}
            }
        }
    })
}

fn create(value: Value) -> inject::Injection {
    inject::inject(&sts(value), Operation::Create, None, &config())
        .expect("injects")
        .expect("opted in")
}

fn env_of(sts: &StatefulSet, container: &str, name: &str) -> Option<String> {
    let pod = sts.spec.as_ref()?.template.spec.as_ref()?;
    pod.containers
        .iter()
        .find(|c| c.name == container)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[test]
fn not_opted_in_objects_are_left_alone() {
    for annotations in [
        json!({}),
        json!({"dkron-ha/enabled": "false"}),
        json!({"dkron-ha/enabled": "True"}),
    ] {
        let out = inject::inject(
            &sts(dkron_sts(annotations, 3)),
            Operation::Create,
            None,
            &config(),
        )
        .unwrap();
        assert!(out.is_none());
    }
}

#[test]
fn create_sets_parallel_pod_management_and_defaults_cluster_size_to_replicas() {
    let out = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 5));
    let spec = out.statefulset.spec.as_ref().unwrap();
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        env_of(&out.statefulset, "dkron", "DKRON_HA_INITIAL_CLUSTER_SIZE").as_deref(),
        Some("5")
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn update_keeps_the_stored_pod_management_policy_and_warns_on_ordered_ready() {
    let mut old = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    old["spec"]["podManagementPolicy"] = json!("OrderedReady");
    let mut new = old.clone();
    new["spec"]["template"]["spec"]["containers"][0]["image"] = json!("dkron/dkron:4.1.2");
    let out = inject::inject(&sts(new), Operation::Update, Some(&sts(old)), &config())
        .unwrap()
        .unwrap();
    let spec = out.statefulset.spec.as_ref().unwrap();
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    assert_eq!(out.warnings.len(), 1);
    assert!(
        out.warnings[0].contains("OrderedReady"),
        "{}",
        out.warnings[0]
    );
}

#[test]
fn update_of_a_parallel_statefulset_warns_nothing() {
    let injected = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let out = inject::inject(&injected, Operation::Update, Some(&injected), &config())
        .unwrap()
        .unwrap();
    assert!(out.warnings.is_empty());
    assert_eq!(out.statefulset, injected);
}

#[test]
fn scaling_up_does_not_change_the_initial_cluster_size() {
    let injected = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let mut scaled = injected.clone();
    scaled.spec.as_mut().unwrap().replicas = Some(5);
    let out = inject::inject(&scaled, Operation::Update, Some(&injected), &config())
        .unwrap()
        .unwrap();
    assert_eq!(
        env_of(&out.statefulset, "dkron", "DKRON_HA_INITIAL_CLUSTER_SIZE").as_deref(),
        Some("3")
    );
}

#[test]
fn update_whose_template_lost_the_env_takes_the_size_from_the_stored_object() {
    // Server-side apply of the user's manifest drops fields the webhook added earlier.
    let stored = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let reapplied = sts(dkron_sts(json!({"dkron-ha/enabled": "true"}), 7));
    let out = inject::inject(&reapplied, Operation::Update, Some(&stored), &config())
        .unwrap()
        .unwrap();
    assert_eq!(
        env_of(&out.statefulset, "dkron", "DKRON_HA_INITIAL_CLUSTER_SIZE").as_deref(),
        Some("3")
    );
}

#[test]
fn update_duplicates_no_container_env_or_volume() {
    let first = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let mut again = first.clone();
    for _ in 0..3 {
        again = inject::inject(&again, Operation::Update, Some(&first), &config())
            .unwrap()
            .unwrap()
            .statefulset;
    }
    let pod = again.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 2);
    assert_eq!(pod.init_containers.as_ref().unwrap().len(), 1);
    assert_eq!(pod.volumes.as_ref().unwrap().len(), 1);
    let env = pod.containers[0].env.as_ref().unwrap();
    let mut names: Vec<_> = env.iter().map(|e| e.name.clone()).collect();
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), total, "duplicate env names: {env:?}");
    assert_eq!(again, first);
}

#[test]
fn switching_to_native_sidecar_moves_the_label_updater() {
    let first = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let native = InjectorConfig {
        native_sidecar: true,
        ..config()
    };
    let out = inject::inject(&first, Operation::Update, Some(&first), &native)
        .unwrap()
        .unwrap()
        .statefulset;
    let pod = out.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert!(
        pod.containers
            .iter()
            .all(|c| c.name != dkron_ha::names::LABEL_UPDATER_CONTAINER)
    );
    let init = pod.init_containers.as_ref().unwrap();
    let sidecar = init
        .iter()
        .find(|c| c.name == dkron_ha::names::LABEL_UPDATER_CONTAINER)
        .expect("native sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
}

#[test]
fn a_user_service_account_is_kept() {
    let mut value = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    value["spec"]["template"]["spec"]["serviceAccountName"] = json!("mine");
    let out = create(value);
    let pod = out.statefulset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("mine"));
}

#[test]
fn an_existing_command_is_wrapped_once() {
    let mut value = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    value["spec"]["template"]["spec"]["containers"][0]["command"] = json!(["dkron"]);
    let out = create(value).statefulset;
    let again = inject::inject(&out, Operation::Create, None, &config())
        .unwrap()
        .unwrap()
        .statefulset;
    let command = again.spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(
        command,
        vec!["/dkron-ha/bin/dkron-ha", "wrap", "--", "dkron"]
    );
}

#[test]
fn invalid_annotations_are_denied_with_a_message_naming_the_fix() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/initial-cluster-size": "three"}),
            "dkron-ha/initial-cluster-size",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/initial-cluster-size": "0"}),
            "whole number",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/initial-cluster-size": "-1"}),
            "dkron-ha/initial-cluster-size",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/container": "nope"}),
            "dkron-ha/container",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/dkron-command": "  "}),
            "dkron-ha/dkron-command",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/raft-voter-gate": "off"}),
            "dkron-ha/raft-voter-gate",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/pvc-retention": "delete"}),
            "dkron-ha/pvc-retention",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/replace-on-node-failure": "soon"}),
            "dkron-ha/replace-on-node-failure",
        ),
        (
            json!({"dkron-ha/enabled": "true", "dkron-ha/replace-on-node-failure": "0s"}),
            "at least 1s",
        ),
    ];
    for (annotations, needle) in cases {
        let err = inject::inject(
            &sts(dkron_sts(annotations.clone(), 3)),
            Operation::Create,
            None,
            &config(),
        )
        .expect_err(&format!("{annotations} must be denied"));
        let message = err.to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert!(
            message.contains("set it") || message.contains("set "),
            "{message:?} says no fix"
        );
    }
}

fn readiness_gates(sts: &StatefulSet) -> Vec<String> {
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.readiness_gates
        .iter()
        .flatten()
        .map(|g| g.condition_type.clone())
        .collect()
}

#[test]
fn the_raft_voter_gate_is_injected_unless_turned_off_and_an_update_turning_it_off_removes_it() {
    let on = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3));
    assert_eq!(readiness_gates(&on.statefulset), ["dkron-ha/raft-voter"]);

    // The user's own gate stays either way.
    let mut with_own = dkron_sts(
        json!({"dkron-ha/enabled": "true", "dkron-ha/raft-voter-gate": "false"}),
        3,
    );
    with_own["spec"]["template"]["spec"]["readinessGates"] =
        json!([{"conditionType": "example.com/mine"}]);
    let off = create(with_own);
    assert_eq!(readiness_gates(&off.statefulset), ["example.com/mine"]);

    // An UPDATE of an injected StatefulSet that turns the gate off loses it.
    let mut turned_off = on.statefulset.clone();
    turned_off
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("dkron-ha/raft-voter-gate".into(), "false".into());
    let updated = inject::inject(
        &turned_off,
        Operation::Update,
        Some(&on.statefulset),
        &config(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(readiness_gates(&updated.statefulset), Vec::<String>::new());
    let pod = updated.statefulset.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.readiness_gates, None,
        "no empty readinessGates list left"
    );
}

#[test]
fn the_pvc_retention_annotation_sets_both_cases_and_says_when_it_replaces_the_users_policy() {
    let policy = |injection: &inject::Injection| {
        serde_json::to_value(&injection.statefulset).unwrap()["spec"]
            ["persistentVolumeClaimRetentionPolicy"]
            .clone()
    };
    let delete = create(dkron_sts(
        json!({"dkron-ha/enabled": "true", "dkron-ha/pvc-retention": "Delete"}),
        3,
    ));
    assert_eq!(
        policy(&delete),
        json!({"whenDeleted": "Delete", "whenScaled": "Delete"})
    );
    assert!(delete.warnings.is_empty(), "{:?}", delete.warnings);

    let mut own = dkron_sts(
        json!({"dkron-ha/enabled": "true", "dkron-ha/pvc-retention": "Retain"}),
        3,
    );
    own["spec"]["persistentVolumeClaimRetentionPolicy"] = json!({"whenScaled": "Delete"});
    let retain = create(own);
    assert_eq!(
        policy(&retain),
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    assert!(
        retain
            .warnings
            .iter()
            .any(|w| w.contains("dkron-ha/pvc-retention=Retain replaces")
                && w.contains("whenScaled Delete")),
        "{:?}",
        retain.warnings
    );

    // Without the annotation the user's policy is theirs.
    let mut untouched = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    untouched["spec"]["persistentVolumeClaimRetentionPolicy"] = json!({"whenScaled": "Delete"});
    assert_eq!(policy(&create(untouched)), json!({"whenScaled": "Delete"}));
}

#[test]
fn two_unnamed_containers_are_ambiguous() {
    let mut value = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    value["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]);
    let err = inject::inject(&sts(value), Operation::Create, None, &config()).unwrap_err();
    assert!(
        matches!(err, InjectError::AmbiguousContainer { count: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("a, b"));
}

#[test]
fn missing_service_name_is_denied() {
    let mut value = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    value["spec"]["serviceName"] = json!("");
    let err = inject::inject(&sts(value), Operation::Create, None, &config()).unwrap_err();
    assert_eq!(err, InjectError::MissingServiceName);
}

#[test]
fn patch_keeps_fields_this_build_does_not_know() {
    let mut value = dkron_sts(json!({"dkron-ha/enabled": "true"}), 3);
    value["spec"]["template"]["spec"]["containers"][0]["futureField"] = json!({"x": 1});
    value["spec"]["futureSpecField"] = json!(true);
    let mutation = mutate_statefulset(&value, Operation::Create, None, &config())
        .unwrap()
        .unwrap();
    let mut patched = value.clone();
    json_patch::patch(&mut patched, &mutation.patch).unwrap();
    assert_eq!(
        patched["spec"]["template"]["spec"]["containers"][0]["futureField"],
        json!({"x": 1})
    );
    assert_eq!(patched["spec"]["futureSpecField"], json!(true));
}

#[test]
fn other_annotations_are_left_as_they_are() {
    // kubectl's client-side apply records the whole object, escaped, in an annotation; the pod
    // template carries annotations of its own, or none, or `null`.
    let mut object = dkron_sts(json!({"dkron-ha/enabled": "true", "team": "jobs"}), 3);
    let applied = serde_json::to_string(&object).unwrap();
    object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        json!(applied);
    for template_annotations in [
        Some(json!({"prometheus.io/scrape": "true"})),
        None,
        Some(Value::Null),
    ] {
        let mut object = object.clone();
        if let Some(value) = template_annotations.clone() {
            object["spec"]["template"]["metadata"]["annotations"] = value;
        }
        let mutation = mutate_statefulset(&object, Operation::Create, None, &config())
            .unwrap()
            .unwrap();
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &mutation.patch).unwrap();
        assert_eq!(patched["metadata"], object["metadata"]);
        let mut expected = match template_annotations {
            Some(Value::Object(a)) => Value::Object(a),
            _ => json!({}),
        };
        expected["dkron-ha/injected"] = json!("test");
        assert_eq!(
            patched["spec"]["template"]["metadata"]["annotations"],
            expected
        );
    }
}

#[test]
fn opting_out_drops_the_defaulted_account_as_the_api_server_stored_it_and_keeps_a_users() {
    let injected = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3)).statefulset;
    let mut stored = serde_json::to_value(&injected).unwrap();
    // The API server's defaulting copies serviceAccountName into the deprecated field.
    stored["spec"]["template"]["spec"]["serviceAccount"] = json!("dkron-dkron-ha");
    stored["metadata"]["annotations"] = json!({});
    let plain = inject::uninject(&sts(stored.clone())).unwrap();
    let pod = plain.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        (pod.service_account_name, pod.service_account),
        (None, None)
    );
    // A user's own account stays.
    stored["spec"]["template"]["spec"]["serviceAccountName"] = json!("mine");
    stored["spec"]["template"]["spec"]["serviceAccount"] = json!("mine");
    let pod = inject::uninject(&sts(stored))
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert_eq!(
        (
            pod.service_account_name.as_deref(),
            pod.service_account.as_deref()
        ),
        (Some("mine"), Some("mine"))
    );
}

// ---- properties over varied StatefulSets ----

fn arb_container(name: &'static str) -> impl Strategy<Value = Value> {
    (
        proptest::option::of(prop::sample::select(vec![
            json!(["dkron"]),
            json!(["/bin/sh", "-c"]),
            json!(["/usr/local/bin/dkron", "agent"]),
        ])),
        prop::sample::select(vec![
            json!(["agent", "--server"]),
            json!(["agent", "--server", "--bootstrap-expect=3", "--retry-join=dkron-0.dkron"]),
            json!([]),
        ]),
        proptest::option::of(prop::sample::select(vec![
            json!([{"name": "POD_NAME", "value": "x"}]),
            json!([{"name": "DKRON_HA_INITIAL_CLUSTER_SIZE", "value": "7"}, {"name": "A", "value": "b"}]),
            json!([{"name": "DKRON_LOG_LEVEL", "value": "debug"}]),
        ])),
    )
        .prop_map(move |(command, args, env)| {
            let mut c = json!({"name": name, "image": "dkron/dkron:4.1.1", "args": args});
            if let Some(command) = command {
                c["command"] = command;
            }
            if let Some(env) = env {
                c["env"] = env;
            }
            c
        })
}

fn arb_statefulset() -> impl Strategy<Value = Value> {
    (
        1i32..8,
        arb_container("dkron"),
        proptest::option::of(arb_container("sidecar")),
        proptest::option::of(prop::sample::select(vec!["mine", ""])),
        proptest::option::of(prop::sample::select(vec!["OrderedReady", "Parallel"])),
        proptest::option::of(1u32..10),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        // Mostly opted in; also absent and values that are not "true" (never ours).
        prop::sample::select(vec![Some("true"), Some("true"), Some("true"), None, Some("false"), Some("TRUE")]),
        proptest::option::of(prop::sample::select(vec!["Retain", "Delete"])),
    )
        .prop_map(
            |(replicas, dkron, sidecar, sa, policy, size, init, volume, stored, enabled, retention)| {
                let mut annotations = json!({"team": "jobs"});
                if let Some(retention) = retention {
                    annotations["dkron-ha/pvc-retention"] = json!(retention);
                }
                if let Some(enabled) = enabled {
                    annotations["dkron-ha/enabled"] = json!(enabled);
                }
                if let Some(size) = size {
                    annotations["dkron-ha/initial-cluster-size"] = json!(size.to_string());
                }
                let mut value = dkron_sts(annotations, replicas);
                let pod = &mut value["spec"]["template"]["spec"];
                pod["containers"] = match sidecar {
                    Some(s) => json!([s, dkron]),
                    None => json!([dkron]),
                };
                if let Some(sa) = sa {
                    pod["serviceAccountName"] = json!(sa);
                }
                if init {
                    pod["initContainers"] = json!([{"name": "init", "image": "busybox"}]);
                }
                if volume {
                    pod["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
                }
                if let Some(policy) = policy {
                    value["spec"]["podManagementPolicy"] = json!(policy);
                }
                if stored {
                    // What the API server sends of a stored object: fields the webhook's
                    // parse skips, which the patch must leave as they are.
                    value["metadata"]["managedFields"] = json!([{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]);
                    value["metadata"]["labels"] = json!({"app": "dkron"});
                    value["metadata"]["uid"] = json!("0d9c5bb4-4a0e-4b0c-a0e7-9d1f0f0f0f0f");
                    value["spec"]["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
                    value["spec"]["volumeClaimTemplates"] = json!([{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]);
                    value["spec"]["template"]["metadata"]["annotations"] = json!({"prometheus.io/scrape": "true"});
                    value["status"] = json!({"replicas": 3, "readyReplicas": 2, "availableReplicas": 2});
                }
                value
            },
        )
}

fn opts_in(value: &Value) -> bool {
    value["metadata"]["annotations"]["dkron-ha/enabled"] == "true"
}

/// Where the engine may write: everything else of the object is the user's.
const ENGINE_PATHS: [&str; 9] = [
    "/spec/podManagementPolicy",
    "/spec/persistentVolumeClaimRetentionPolicy",
    "/spec/template/metadata",
    "/spec/template/spec/serviceAccountName",
    "/spec/template/spec/volumes",
    "/spec/template/spec/initContainers",
    "/spec/template/spec/containers",
    "/spec/template/spec/automountServiceAccountToken",
    "/spec/template/spec/readinessGates",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn injecting_an_injected_object_changes_nothing(value in arb_statefulset(), native in any::<bool>()) {
        let config = InjectorConfig { native_sidecar: native, ..config() };
        if !opts_in(&value) {
            prop_assert!(inject::inject(&sts(value), Operation::Create, None, &config).unwrap().is_none());
            return Ok(());
        }
        let once = inject::inject(&sts(value), Operation::Create, None, &config).unwrap().unwrap();
        let twice = inject::inject(&once.statefulset, Operation::Create, None, &config).unwrap().unwrap();
        prop_assert_eq!(&twice.statefulset, &once.statefulset);
        let update = inject::inject(&once.statefulset, Operation::Update, Some(&once.statefulset), &config).unwrap().unwrap();
        prop_assert_eq!(&update.statefulset, &once.statefulset);
    }

    #[test]
    fn the_patch_applied_to_the_input_equals_the_engine_output(value in arb_statefulset(), native in any::<bool>()) {
        let config = InjectorConfig { native_sidecar: native, ..config() };
        if !opts_in(&value) {
            prop_assert!(mutate_statefulset(&value, Operation::Create, None, &config).unwrap().is_none());
            return Ok(());
        }
        let expected = inject::inject(&sts(value.clone()), Operation::Create, None, &config).unwrap().unwrap();
        let mutation = mutate_statefulset(&value, Operation::Create, None, &config).unwrap().unwrap();
        let mut patched = value.clone();
        json_patch::patch(&mut patched, &mutation.patch).unwrap();
        prop_assert_eq!(sts(patched), expected.statefulset);
    }

    #[test]
    fn the_webhook_patch_applied_to_the_input_equals_the_engine_output(
        value in arb_statefulset(),
        native in any::<bool>(),
        native_before in any::<bool>(),
        update in any::<bool>(),
        reinject in any::<bool>(),
        upgraded in any::<bool>(),
    ) {
        let config = InjectorConfig { native_sidecar: native, ..config() };
        let opted_in = opts_in(&value);
        // An earlier injection, possibly in the other sidecar mode or by an older dkron-ha: the
        // stored object on UPDATE, and the object itself when the API server reinvokes the
        // webhook.
        let injected = {
            let mut before = InjectorConfig { native_sidecar: native_before, ..config.clone() };
            if upgraded {
                before.image = "dkron-ha:old".into();
                before.version = "old".into();
            }
            let mut injected = value.clone();
            if let Some(once) = mutate_statefulset(&value, Operation::Create, None, &before).unwrap() {
                json_patch::patch(&mut injected, &once.patch).unwrap();
            }
            injected
        };
        let object = if reinject { injected.clone() } else { value.clone() };
        let old = update.then(|| injected.clone());
        let operation = if update { Operation::Update } else { Operation::Create };
        let expected = inject::inject(&sts(object.clone()), operation, old.clone().map(sts).as_ref(), &config)
            .unwrap()
            .unwrap_or_else(|| inject::Injection { statefulset: sts(object.clone()), warnings: vec![] });

        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                "resource": {"group": "apps", "version": "v1", "resource": "statefulsets"},
                "operation": if update { "UPDATE" } else { "CREATE" },
                "userInfo": {"username": "admin", "groups": ["system:masters"]},
                "object": object,
                "oldObject": old,
            }
        });
        let answer = review(&serde_json::to_vec(&body).unwrap(), &config).unwrap();
        let response: Value = serde_json::from_slice(&answer.body).unwrap();
        prop_assert_eq!(&response["response"]["uid"], "u-1");
        prop_assert_eq!(&response["response"]["allowed"], true);
        let warnings: Vec<String> = serde_json::from_value(response["response"]["warnings"].clone()).unwrap_or_default();
        prop_assert_eq!(warnings, expected.warnings);
        let mut patched = object.clone();
        if let Some(patch) = response["response"]["patch"].as_str() {
            let patch: json_patch::Patch =
                serde_json::from_slice(&STANDARD.decode(patch).unwrap()).unwrap();
            json_patch::patch(&mut patched, &patch).unwrap();
        }
        prop_assert_eq!(sts(patched.clone()), expected.statefulset);
        // Not opted in, or reinvoked on its own output (same mode, CREATE): no patch at all.
        if !opted_in {
            prop_assert!(response["response"].get("patch").is_none(), "{}", response);
        }
        if reinject && native == native_before && !upgraded && !update {
            prop_assert!(response["response"].get("patch").is_none(), "{}", response);
        }
        // What the engine does not touch is left exactly as sent.
        prop_assert_eq!(&patched["status"], &object["status"]);
        prop_assert_eq!(&patched["metadata"], &object["metadata"]);
        prop_assert_eq!(&patched["spec"]["volumeClaimTemplates"], &object["spec"]["volumeClaimTemplates"]);
    }

    #[test]
    fn the_patch_writes_only_where_the_engine_may(value in arb_statefulset(), native in any::<bool>(), update in any::<bool>()) {
        let config = InjectorConfig { native_sidecar: native, ..config() };
        let operation = if update { Operation::Update } else { Operation::Create };
        let Some(mutation) = mutate_statefulset(&value, operation, update.then_some(&value), &config).unwrap() else {
            prop_assert!(!opts_in(&value));
            return Ok(());
        };
        prop_assert!(!mutation.patch.0.is_empty());
        for op in &mutation.patch.0 {
            let path = serde_json::to_value(op).unwrap()["path"].as_str().unwrap().to_string();
            prop_assert!(
                ENGINE_PATHS.iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))),
                "{} writes outside the engine's fields", path
            );
        }
    }

    #[test]
    fn opting_out_takes_back_everything_the_injection_added(value in arb_statefulset(), native in any::<bool>()) {
        prop_assume!(opts_in(&value));
        let config = InjectorConfig { native_sidecar: native, ..config() };
        let injected = inject::inject(&sts(value.clone()), Operation::Create, None, &config).unwrap().unwrap().statefulset;
        let injected = serde_json::to_value(&injected).unwrap();
        let without = |mut v: Value| {
            v["metadata"]["annotations"].as_object_mut().unwrap().remove("dkron-ha/enabled");
            v
        };
        let opted_out = without(injected.clone());
        let plain = inject::uninject(&sts(opted_out.clone())).expect("an injected template is taken back");
        // The webhook's UPDATE that removes the annotation patches the object to exactly that.
        let mutation = mutate_statefulset(&opted_out, Operation::Update, Some(&injected), &config).unwrap().unwrap();
        let mut patched = opted_out.clone();
        json_patch::patch(&mut patched, &mutation.patch).unwrap();
        prop_assert_eq!(sts(patched), plain.clone());
        prop_assert!(inject::uninject(&plain).is_none(), "taken back twice");
        // What stays on purpose: the immutable pod-management policy and the retention policy
        // the user asked for, the Dkron command made explicit (the image's entrypoint runs it
        // when there was none), and the downward-API variables POD_*. (A DKRON_HA_* variable
        // the template had before is the injector's by its name, and goes.)
        let normalize = |sts: &mut StatefulSet| {
            let spec = sts.spec.as_mut().unwrap();
            spec.pod_management_policy = None;
            spec.persistent_volume_claim_retention_policy = None;
            let pod = spec.template.spec.as_mut().unwrap();
            pod.service_account_name = pod.service_account_name.take().filter(|a| !a.is_empty());
            for c in &mut pod.containers {
                if c.name == "dkron" {
                    c.command = None;
                }
                if let Some(env) = c.env.as_mut() {
                    env.retain(|e| !e.name.starts_with("POD_") && !e.name.starts_with("DKRON_HA_"));
                }
                if c.env.as_ref().is_some_and(|e| e.is_empty()) {
                    c.env = None;
                }
            }
        };
        let (mut plain, mut expected) = (plain, sts(without(value)));
        normalize(&mut plain);
        normalize(&mut expected);
        prop_assert_eq!(plain, expected);
    }

    #[test]
    fn the_wrapped_command_starts_with_the_wrapper_and_keeps_the_original(value in arb_statefulset()) {
        prop_assume!(opts_in(&value));
        let original = value["spec"]["template"]["spec"]["containers"].as_array().unwrap()
            .iter().find(|c| c["name"] == "dkron").unwrap()["command"].clone();
        let out = inject::inject(&sts(value), Operation::Create, None, &config()).unwrap().unwrap();
        let pod = out.statefulset.spec.unwrap().template.spec.unwrap();
        let dkron = pod.containers.iter().find(|c| c.name == "dkron").unwrap();
        let command = dkron.command.clone().unwrap();
        prop_assert_eq!(&command[..3], &["/dkron-ha/bin/dkron-ha".to_string(), "wrap".into(), "--".into()][..]);
        let rest: Vec<String> = match original.as_array() {
            Some(words) => words.iter().map(|w| w.as_str().unwrap().to_string()).collect(),
            None => vec!["/usr/local/bin/dkron".to_string()],
        };
        prop_assert_eq!(&command[3..], &rest[..]);
    }
}

#[test]
fn the_runtime_reads_the_environment_the_injector_writes() {
    let out = create(dkron_sts(json!({"dkron-ha/enabled": "true"}), 3));
    let pod = out.statefulset.spec.unwrap().template.spec.unwrap();
    let dkron = pod.containers.iter().find(|c| c.name == "dkron").unwrap();
    // The kubelet's part: downward-API fields of pod dkron-1.
    let env: std::collections::BTreeMap<String, String> = dkron
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = match e.value_from.as_ref().and_then(|s| s.field_ref.as_ref()) {
                Some(field) => match field.field_path.as_str() {
                    "metadata.name" => "dkron-1".to_string(),
                    "metadata.namespace" => "ns".to_string(),
                    "status.podIP" => "10.1.2.3".to_string(),
                    other => panic!("unexpected field {other}"),
                },
                None => e.value.clone().unwrap_or_default(),
            };
            (e.name.clone(), value)
        })
        .collect();
    let settings =
        dkron_ha::runtime::peers::ClusterSettings::from_lookup(|name| env.get(name).cloned())
            .expect("the runtime finds everything it needs");
    assert_eq!(settings.statefulset, "dkron");
    assert_eq!(settings.service, "dkron");
    assert_eq!(settings.namespace, "ns");
    assert_eq!(settings.pod_name, "dkron-1");
    assert_eq!(settings.initial_cluster_size, 3);
    assert_eq!(settings.cluster_domain, "cluster.local");
    assert_eq!(settings.pod_ip.to_string(), "10.1.2.3");
    assert_eq!(settings.own_fqdn(), "dkron-1.dkron.ns.svc.cluster.local");
}

#[test]
fn workers_get_agent_mode_wrap_and_nothing_a_server_needs() {
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": { "name": "workers", "annotations": { "dkron-ha/agent-of": "dkron" } },
        "spec": {
            "selector": { "matchLabels": { "app": "workers" } },
            "template": {
                "metadata": { "labels": { "app": "workers" } },
                "spec": { "containers": [{ "name": "dkron", "image": "dkron/dkron:4.1.2",
                                            "args": ["agent", "--tag", "role=worker"] }] },
            },
        },
    }))
    .unwrap();
    let template = deployment.spec.as_ref().unwrap().template.clone();
    let injected = inject::inject_workers(&deployment.metadata, &template, &config())
        .unwrap()
        .expect("workers");
    let pod = injected.spec.as_ref().unwrap();
    let dkron = &pod.containers[0];
    assert_eq!(
        dkron.command.as_deref().unwrap(),
        [
            "/dkron-ha/bin/dkron-ha",
            "wrap",
            "--",
            "/usr/local/bin/dkron"
        ]
    );
    let env: Vec<(String, Option<String>)> = dkron
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(env.contains(&("DKRON_HA_AGENT_OF".into(), Some("dkron".into()))));
    assert!(env.contains(&("DKRON_HA_SERVICE".into(), Some("dkron".into()))));
    assert!(
        env.iter()
            .all(|(name, _)| name != "DKRON_HA_INITIAL_CLUSTER_SIZE")
    );
    // One container (no label-updater), no readiness gate, no service account of ours.
    assert_eq!(pod.containers.len(), 1);
    assert_eq!(pod.readiness_gates, None);
    assert_eq!(pod.service_account_name, None);
    let init: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["dkron-ha-install"]);
    // Idempotent.
    let mut again = deployment.clone();
    again.spec.as_mut().unwrap().template = injected.clone();
    let twice = inject::inject_workers(&again.metadata, &injected, &config())
        .unwrap()
        .unwrap();
    assert_eq!(twice, injected);

    // Another Service name; bad names and servers-and-workers are denied with the fix.
    let meta = |annotations: Value| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        serde_json::from_value(json!({ "name": "workers", "annotations": annotations })).unwrap()
    };
    let own = inject::inject_workers(
        &meta(json!({"dkron-ha/agent-of": "dkron", "dkron-ha/agent-service": "dkron-headless"})),
        &template,
        &config(),
    )
    .unwrap()
    .unwrap();
    let env = own.spec.unwrap().containers[0].env.clone().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "DKRON_HA_SERVICE" && e.value.as_deref() == Some("dkron-headless"))
    );
    for (annotations, needle) in [
        (
            json!({"dkron-ha/agent-of": "Dkron_Servers"}),
            "dkron-ha/agent-of",
        ),
        (json!({"dkron-ha/agent-of": ""}), "dkron-ha/agent-of"),
        (
            json!({"dkron-ha/agent-of": "dkron", "dkron-ha/agent-service": "a.b"}),
            "dkron-ha/agent-service",
        ),
        (
            json!({"dkron-ha/agent-of": "dkron", "dkron-ha/enabled": "true"}),
            "remove one",
        ),
    ] {
        let error = inject::inject_workers(&meta(annotations.clone()), &template, &config())
            .expect_err(&format!("{annotations} must be denied"));
        assert!(error.to_string().contains(needle), "{error}");
    }
}

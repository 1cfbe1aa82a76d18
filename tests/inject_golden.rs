//! Golden files for the injection engine, Istio-style: every case is an input manifest in
//! tests/fixtures/inject/<case>.in.yaml and the expected `dkron-ha inject` output in
//! <case>.out.yaml. After an intended change, regenerate with
//! `UPDATE_GOLDEN=1 cargo test --test inject_golden` and review the diff.

use dkron_ha::inject::InjectorConfig;
use dkron_ha::manifests::inject_manifests;
use std::path::{Path, PathBuf};

fn config_for(case: &str) -> InjectorConfig {
    InjectorConfig {
        image: "registry.example.com/dkron-ha:test".into(),
        cluster_domain: "cluster.local".into(),
        native_sidecar: case.starts_with("native-sidecar"),
        version: "test".into(),
    }
}

fn cases() -> Vec<(String, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p
                .file_name()?
                .to_str()?
                .strip_suffix(".in.yaml")?
                .to_string();
            Some((name, p))
        })
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_fixture_injects_to_its_golden_output() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let cases = cases();
    assert!(cases.len() >= 7, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for (case, input_path) in &cases {
        let input = std::fs::read_to_string(input_path).expect("read input");
        let result = inject_manifests(&input, &config_for(case))
            .unwrap_or_else(|e| panic!("{case}: injection failed: {e}"));
        let mut actual = result.yaml.clone();
        if !result.warnings.is_empty() {
            actual.push_str("# warnings:\n");
            for w in &result.warnings {
                actual.push_str(&format!("# - {w}\n"));
            }
        }
        let golden = input_path.with_file_name(format!("{case}.out.yaml"));
        if update {
            std::fs::write(&golden, &actual).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        if expected != actual {
            failures.push(format!(
                "{case}: output differs from {} (UPDATE_GOLDEN=1 regenerates)\n--- actual\n{actual}",
                golden.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn golden_outputs_are_fixed_points() {
    // Injecting an injected manifest changes nothing: what the API server stores after a
    // reinvocation equals the first injection.
    for (case, input_path) in cases() {
        let input = std::fs::read_to_string(&input_path).unwrap();
        let once = inject_manifests(&input, &config_for(&case)).unwrap().yaml;
        let twice = inject_manifests(&once, &config_for(&case)).unwrap().yaml;
        let once_values: Vec<serde_json::Value> = docs(&once);
        let twice_values: Vec<serde_json::Value> = docs(&twice);
        assert_eq!(
            once_values, twice_values,
            "{case}: second injection changed the output"
        );
    }
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect()
}

/// The objects of a manifest, a `List`'s items in its place.
fn objects(yaml: &str) -> Vec<serde_json::Value> {
    docs(yaml)
        .into_iter()
        .flat_map(|doc| match doc["kind"].as_str() {
            Some("List") => doc["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![doc],
        })
        .collect()
}

#[test]
fn the_webhook_patches_every_fixture_to_its_golden_output() {
    use base64::Engine as _;
    use dkron_ha::admission::review;
    use serde_json::{Value, json};

    let mut checked = 0;
    for (case, input_path) in cases() {
        let config = config_for(&case);
        let input = std::fs::read_to_string(&input_path).unwrap();
        // The committed expected output, not anything computed here.
        let golden =
            std::fs::read_to_string(input_path.with_file_name(format!("{case}.out.yaml"))).unwrap();
        let expected: Vec<Value> = objects(&golden)
            .into_iter()
            .filter(|o| o["kind"] == "StatefulSet")
            .collect();
        let golden_warnings: Vec<&str> = golden
            .lines()
            .filter_map(|l| l.strip_prefix("# - "))
            .collect();
        let inputs: Vec<Value> = objects(&input)
            .into_iter()
            .filter(|o| o["kind"] == "StatefulSet")
            .collect();
        assert_eq!(
            inputs.len(),
            expected.len(),
            "{case}: StatefulSets in and out"
        );
        let mut sent_warnings = Vec::new();
        for (object, expected) in inputs.into_iter().zip(expected) {
            let body = json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "golden",
                    "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                    "resource": {"group": "apps", "version": "v1", "resource": "statefulsets"},
                    "operation": "CREATE",
                    "userInfo": {"username": "admin"},
                    "object": object,
                }
            });
            let answer = review(&serde_json::to_vec(&body).unwrap(), &config).unwrap();
            let response: Value = serde_json::from_slice(&answer.body).unwrap();
            let mut patched = object.clone();
            if let Some(patch) = response["response"]["patch"].as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .unwrap();
                let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
                json_patch::patch(&mut patched, &patch).unwrap();
            }
            assert_eq!(
                patched, expected,
                "{case}: the webhook's object differs from the golden file"
            );
            let sent: Vec<String> =
                serde_json::from_value(response["response"]["warnings"].clone())
                    .unwrap_or_default();
            sent_warnings.extend(sent);
            checked += 1;
        }
        for warning in &sent_warnings {
            assert!(
                golden_warnings.contains(&warning.as_str()),
                "{case}: the webhook warns {warning:?}, which the golden file does not"
            );
        }
    }
    assert!(checked >= 7, "only {checked} StatefulSets checked");
}

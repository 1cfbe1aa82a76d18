//! The `label-updater` sidecar binary against the real control plane, authenticated with a real
//! ServiceAccount token under a Role that allows `patch` only on its StatefulSet's pod names.
//! No Dkron server can be built here, so the local Dkron is unreachable: the sidecar must then
//! call its pod a follower. Following a real leader is blocked with the rest of issue 4.

mod support;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use support::{ControlPlane, eventually};

fn start_label_updater(kubeconfig: &std::path::Path, ns: &str, pod: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dkron-ha"))
        .args(["label-updater", "--interval-ms", "200"])
        .args(["--pod-name", pod, "--pod-namespace", ns])
        // Nothing listens there: the local Dkron is down.
        .args([
            "--dkron-port",
            &support::control_plane::free_ports::<1>().unwrap()[0].to_string(),
        ])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start label-updater")
}

fn leader_label(pod: &Pod) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()?
        .get("dkron-ha/leader")
        .cloned()
}

#[tokio::test]
async fn the_sidecar_labels_its_pod_under_least_privilege_and_sets_false_on_sigterm() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("label-updater").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for name in ["dkron-0", "dkron-1", "unrelated"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "dkron"}},
            "spec": {"containers": [{"name": "dkron", "image": "dkron/dkron:4.1.1"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    // The Role the controller keeps: patch only on the StatefulSet's pod names.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "dkron-dkron-ha"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"], "resourceNames": ["dkron-0", "dkron-1"]}
        ]
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "dkron-dkron-ha"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dkron-dkron-ha"},
        "subjects": [{"kind": "ServiceAccount", "name": "dkron-dkron-ha", "namespace": ns}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, "dkron-dkron-ha").await;

    let mut sidecar = start_label_updater(&kubeconfig, &ns, "dkron-0");
    let mut stray = start_label_updater(&kubeconfig, &ns, "unrelated");

    let label = eventually("dkron-0 labelled a follower", async || {
        leader_label(&pods.get("dkron-0").await.ok()?)
    })
    .await;
    assert_eq!(label, "false");

    // A sidecar in a pod the Role does not name cannot label it, and keeps running.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(leader_label(&pods.get("unrelated").await.unwrap()), None);
    assert!(
        stray.try_wait().unwrap().is_none(),
        "a refused patch must not kill the sidecar"
    );
    Command::new("kill")
        .args(["-TERM", &stray.id().to_string()])
        .status()
        .unwrap();
    let stray_out = stray.wait_with_output().unwrap();
    let stray_log = String::from_utf8_lossy(&stray_out.stderr);
    assert!(
        stray_log.contains("forbidden") || stray_log.contains("403"),
        "{stray_log}"
    );

    // SIGTERM: the label is set to false (again, here) and the sidecar exits 0.
    pods.patch(
        "dkron-0",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"dkron-ha/leader": "true"}}})),
    )
    .await
    .unwrap();
    Command::new("kill")
        .args(["-TERM", &sidecar.id().to_string()])
        .status()
        .unwrap();
    let status = sidecar.wait().unwrap();
    assert!(status.success(), "label-updater exited with {status}");
    assert_eq!(
        leader_label(&pods.get("dkron-0").await.unwrap()).as_deref(),
        Some("false")
    );
    assert_eq!(leader_label(&pods.get("dkron-1").await.unwrap()), None);
}

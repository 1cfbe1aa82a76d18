//! The test control plane is a real one: RBAC is enforced, ServiceAccount tokens are issued and
//! accepted, and the controllers the other end-to-end tests lean on (statefulset, disruption,
//! garbage collector) act on what we create.

mod support;

use support::{eventually, named};

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::authentication::v1::{
    SelfSubjectReview, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use support::ControlPlane;

const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";

#[tokio::test]
async fn service_account_is_forbidden_until_a_role_binding_allows_it() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("rbac").await;
    let reader_pods: Api<Pod> =
        Api::namespaced(cluster.service_account_client(&ns, "reader").await, &ns);

    match reader_pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("listing pods without a Role: expected 403, got {other:?}"),
    }

    let admin = cluster.client().await;
    let role = Role {
        metadata: named("pod-reader"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("create Role");
    let binding = RoleBinding {
        metadata: named("reader-reads-pods"),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "pod-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create RoleBinding");

    // The authorizer reads RBAC objects from an informer: allow it a moment to see the binding.
    eventually("the bound ServiceAccount lists pods", async || {
        reader_pods.list(&ListParams::default()).await.ok()
    })
    .await;
}

#[tokio::test]
async fn service_account_client_authenticates_as_its_service_account() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("whoami").await;
    let robot = cluster.service_account_client(&ns, "robot").await;

    let review = Api::<SelfSubjectReview>::all(robot)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview is open to every authenticated user");

    let user = review
        .status
        .and_then(|status| status.user_info)
        .expect("user info");
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:robot").as_str())
    );
    let groups = user.groups.unwrap_or_default();
    assert!(
        groups.contains(&format!("system:serviceaccounts:{ns}")),
        "{groups:?}"
    );
}

#[tokio::test]
async fn token_request_issues_a_signed_token_that_token_review_accepts() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("token").await;
    let admin = cluster.client().await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["dkron-ha-test".into()]),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let token = Api::namespaced(admin.clone(), &ns)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the default ServiceAccount")
        .status
        .and_then(|status| status.token)
        .expect("a token in the TokenRequest status");

    let claims = jwt_claims(&token);
    assert_eq!(
        claims["iss"],
        "https://kubernetes.default.svc.cluster.local"
    );
    assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:default"));
    assert_eq!(claims["aud"], serde_json::json!(["dkron-ha-test"]));

    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: Some(vec!["dkron-ha-test".into()]),
        },
        ..TokenReview::default()
    };
    let status = Api::<TokenReview>::all(admin)
        .create(&PostParams::default(), &review)
        .await
        .expect("TokenReview")
        .status
        .expect("token review status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let username = status.user.and_then(|user| user.username);
    assert_eq!(
        username,
        Some(format!("system:serviceaccount:{ns}:default"))
    );
}

#[tokio::test]
async fn statefulset_controller_creates_pods_that_stay_pending_without_a_kubelet() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("sts").await;
    let client = cluster.client().await;
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let statefulset = StatefulSet {
        metadata: named("web"),
        spec: Some(StatefulSetSpec {
            replicas: Some(2),
            // OrderedReady would wait for web-0 to become Ready, which needs a kubelet.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            service_name: Some("web".into()),
            template: pod_template(&labels),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &statefulset)
        .await
        .expect("create StatefulSet");

    let pods_api = Api::<Pod>::namespaced(client, &ns);
    let pods = eventually("the statefulset controller creates both pods", async || {
        let pods = pods_api
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (pods.items.len() == 2).then_some(pods.items)
    })
    .await;

    let mut names: Vec<_> = pods
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["web-0", "web-1"]);
    for pod in &pods {
        let owner = &pod
            .metadata
            .owner_references
            .as_ref()
            .expect("owner references")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("StatefulSet", "web")
        );
        assert_eq!(owner.controller, Some(true));
        let phase = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref());
        assert_eq!(phase, Some("Pending"));
        // The ServiceAccount admission plugin mounted the default ServiceAccount's token.
        let volumes = pod.spec.as_ref().and_then(|spec| spec.volumes.as_ref());
        let token_volume = volumes
            .into_iter()
            .flatten()
            .any(|volume| volume.name.starts_with("kube-api-access-"));
        assert!(token_volume, "no projected ServiceAccount token in {pod:?}");
    }
}

#[tokio::test]
async fn disruption_controller_fills_in_pod_disruption_budget_status() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("pdb").await;
    let client = cluster.client().await;
    let labels = BTreeMap::from([("app".to_owned(), "guarded".to_owned())]);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for name in ["guarded-a", "guarded-b"] {
        let template = pod_template(&labels);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..template.metadata.expect("template metadata")
            },
            spec: template.spec,
            ..Pod::default()
        };
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create Pod");
    }
    let budget = PodDisruptionBudget {
        metadata: named("guarded"),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    let budgets = Api::<PodDisruptionBudget>::namespaced(client, &ns);
    budgets
        .create(&PostParams::default(), &budget)
        .await
        .expect("create PodDisruptionBudget");

    let status = eventually("the disruption controller counts both pods", async || {
        let budget = budgets.get("guarded").await.ok()?;
        let status = budget.status?;
        let observed = status.observed_generation == budget.metadata.generation;
        (observed && status.expected_pods == Some(2)).then_some(status)
    })
    .await;
    // Pending pods are not healthy, so no disruption is allowed.
    assert_eq!(status.current_healthy, Some(0));
    assert_eq!(status.desired_healthy, Some(1));
    assert_eq!(status.disruptions_allowed, Some(0));
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("gc").await;
    let config_maps = Api::<ConfigMap>::namespaced(cluster.client().await, &ns);
    let owner = config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: named("owner"),
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create owner");
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            name: Some("dependent".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.expect("owner uid"),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    config_maps
        .create(&PostParams::default(), &dependent)
        .await
        .expect("create dependent");

    config_maps
        .delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");

    eventually(
        "the garbage collector deletes the dependent",
        async || match config_maps.get_opt("dependent").await {
            Ok(None) => Some(()),
            _ => None,
        },
    )
    .await;
}

fn pod_template(labels: &BTreeMap<String, String>) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some(PAUSE_IMAGE.into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// The claims of a JWT, read without checking the signature (TokenReview does that).
fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&json).expect("JSON claims")
}

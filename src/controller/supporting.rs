//! The supporting objects of one opted-in StatefulSet, as a pure function of it: what the
//! controller applies (server-side) and, when the StatefulSet opts out, what it removes.

use crate::names::{self, LABEL_LEADER, LABEL_MANAGED_BY, MANAGED_BY};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// Label on everything dkron-ha creates, so clean-up touches nothing else.
/// Label naming the StatefulSet a supporting object belongs to.
pub const LABEL_STATEFULSET: &str = "dkron-ha/statefulset";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SupportingError {
    #[error("StatefulSet has no name or uid yet")]
    Unnamed,
    #[error(
        "StatefulSet {0} selects its pods with matchExpressions only; dkron-ha needs spec.selector.matchLabels to select the leader and guard disruptions"
    )]
    NoMatchLabels(String),
}

/// Everything the controller keeps for one StatefulSet.
#[derive(Clone, Debug, PartialEq)]
pub struct SupportingObjects {
    /// Only when the pods use the account dkron-ha defaulted; a user's account is never touched.
    pub service_account: Option<ServiceAccount>,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub leader_service: Service,
    pub pod_disruption_budget: PodDisruptionBudget,
}

/// Names of the objects dkron-ha may create for StatefulSet `sts`.
pub struct SupportingNames {
    pub service_account: String,
    pub role: String,
    pub role_binding: String,
    pub leader_service: String,
    pub pod_disruption_budget: String,
}

pub fn names(sts: &str) -> SupportingNames {
    SupportingNames {
        service_account: names::owned_object(sts),
        role: names::owned_object(sts),
        role_binding: names::owned_object(sts),
        leader_service: names::leader_service(sts),
        pod_disruption_budget: names::owned_object(sts),
    }
}

/// The ServiceAccount the StatefulSet's pods run as.
pub fn pod_service_account(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| {
            p.service_account_name
                .clone()
                .or_else(|| p.service_account.clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Pod names the StatefulSet has at its current scale: the label-updater may patch only these.
pub fn pod_names(name: &str, replicas: i32) -> Vec<String> {
    (0..replicas.max(0))
        .map(|i| format!("{name}-{i}"))
        .collect()
}

fn owner_reference(sts: &StatefulSet, name: &str) -> Result<OwnerReference, SupportingError> {
    Ok(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: name.to_string(),
        uid: sts.metadata.uid.clone().ok_or(SupportingError::Unnamed)?,
        controller: Some(true),
        // Blocking the owner's deletion would need update on statefulsets/finalizers.
        block_owner_deletion: None,
    })
}

/// Computes the supporting objects of an opted-in StatefulSet.
pub fn supporting_objects(sts: &StatefulSet) -> Result<SupportingObjects, SupportingError> {
    let name = sts.metadata.name.clone().ok_or(SupportingError::Unnamed)?;
    let namespace = sts.metadata.namespace.clone();
    let owner = owner_reference(sts, &name)?;
    let names = names(&name);
    let spec = sts.spec.clone().unwrap_or_default();
    let match_labels = spec
        .selector
        .match_labels
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| SupportingError::NoMatchLabels(name.clone()))?;
    let meta = |object_name: &str| ObjectMeta {
        name: Some(object_name.to_string()),
        namespace: namespace.clone(),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
            (LABEL_STATEFULSET.to_string(), name.clone()),
        ])),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };

    let pod_account = pod_service_account(sts);
    let service_account = (pod_account == names.service_account).then(|| ServiceAccount {
        metadata: meta(&names.service_account),
        ..Default::default()
    });

    let mut rules = vec![PolicyRule {
        api_groups: Some(vec!["".into()]),
        resources: Some(vec!["pods".into()]),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..Default::default()
    }];
    // An empty resourceNames list would grant patch on every pod: at zero replicas, no rule.
    let pods = pod_names(&name, spec.replicas.unwrap_or(1));
    if !pods.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["pods".into()]),
            resource_names: Some(pods),
            verbs: vec!["patch".into()],
            ..Default::default()
        });
    }
    let role = Role {
        metadata: meta(&names.role),
        rules: Some(rules),
    };
    let role_binding = RoleBinding {
        metadata: meta(&names.role_binding),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: names.role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: pod_account,
            namespace: namespace.clone(),
            ..Default::default()
        }]),
    };

    let mut leader_selector = match_labels.clone();
    leader_selector.insert(LABEL_LEADER.into(), "true".into());
    let port = |port_name: &str, port: i32| ServicePort {
        name: Some(port_name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let leader_service = Service {
        metadata: meta(&names.leader_service),
        spec: Some(ServiceSpec {
            selector: Some(leader_selector),
            ports: Some(vec![port("http", 8080), port("grpc", 6868)]),
            ..Default::default()
        }),
        ..Default::default()
    };

    let pod_disruption_budget = PodDisruptionBudget {
        metadata: meta(&names.pod_disruption_budget),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(spec.selector.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };

    Ok(SupportingObjects {
        service_account,
        role,
        role_binding,
        leader_service,
        pod_disruption_budget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sts(replicas: i32, service_account: Option<&str>) -> StatefulSet {
        let mut pod = json!({"containers": [{"name": "dkron", "image": "dkron"}]});
        if let Some(sa) = service_account {
            pod["serviceAccountName"] = json!(sa);
        }
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "dkron", "namespace": "jobs", "uid": "u-1"},
            "spec": {"replicas": replicas, "serviceName": "dkron",
                "selector": {"matchLabels": {"app": "dkron"}},
                "template": {"metadata": {"labels": {"app": "dkron"}}, "spec": pod}}
        }))
        .unwrap()
    }

    #[test]
    fn role_allows_patch_only_on_the_current_pods() {
        let objects = supporting_objects(&sts(3, Some("dkron-dkron-ha"))).unwrap();
        let rules = objects.role.rules.unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].verbs, vec!["patch"]);
        assert_eq!(
            rules[1].resource_names.as_deref().unwrap(),
            ["dkron-0", "dkron-1", "dkron-2"]
        );
        assert!(rules[0].resource_names.is_none());
        assert_eq!(rules[0].verbs, vec!["get", "list", "watch"]);
    }

    #[test]
    fn zero_replicas_grant_no_patch_at_all() {
        let objects = supporting_objects(&sts(0, None)).unwrap();
        let rules = objects.role.rules.unwrap();
        assert!(
            rules
                .iter()
                .all(|r| !r.verbs.contains(&"patch".to_string()))
        );
    }

    #[test]
    fn the_defaulted_service_account_is_created_and_a_users_is_not() {
        let ours = supporting_objects(&sts(3, Some("dkron-dkron-ha"))).unwrap();
        assert_eq!(
            ours.service_account.unwrap().metadata.name.as_deref(),
            Some("dkron-dkron-ha")
        );
        let theirs = supporting_objects(&sts(3, Some("custom"))).unwrap();
        assert!(theirs.service_account.is_none());
        let subject = &theirs.role_binding.subjects.unwrap()[0];
        assert_eq!(subject.name, "custom");
        assert_eq!(subject.namespace.as_deref(), Some("jobs"));
    }

    #[test]
    fn leader_service_selects_the_pods_that_lead() {
        let objects = supporting_objects(&sts(3, None)).unwrap();
        let selector = objects.leader_service.spec.unwrap().selector.unwrap();
        assert_eq!(selector.get("app").map(String::as_str), Some("dkron"));
        assert_eq!(selector.get(LABEL_LEADER).map(String::as_str), Some("true"));
        assert_eq!(
            objects.leader_service.metadata.name.as_deref(),
            Some("dkron-leader")
        );
    }

    #[test]
    fn every_object_is_owned_by_the_statefulset_and_labelled() {
        let objects = supporting_objects(&sts(3, Some("dkron-dkron-ha"))).unwrap();
        let metas = [
            &objects.service_account.as_ref().unwrap().metadata,
            &objects.role.metadata,
            &objects.role_binding.metadata,
            &objects.leader_service.metadata,
            &objects.pod_disruption_budget.metadata,
        ];
        for meta in metas {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("StatefulSet", "u-1")
            );
            assert_eq!(meta.labels.as_ref().unwrap()[LABEL_MANAGED_BY], MANAGED_BY);
        }
        let pdb = objects.pod_disruption_budget.spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn a_selector_without_match_labels_is_an_error() {
        let mut s = sts(3, None);
        s.spec.as_mut().unwrap().selector.match_labels = None;
        assert!(matches!(
            supporting_objects(&s),
            Err(SupportingError::NoMatchLabels(_))
        ));
    }
}

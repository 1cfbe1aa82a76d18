//! The webhook's hot path: a review of a StatefulSet parsed into borrowed parts, and the JSON
//! patch written from the engine's plan without building the whole object.
//!
//! The typed path (parse every field into k8s-openapi structs, clone the object, inject, diff)
//! spends most of a review moving and allocating structs of several KiB. Here the decisions
//! still come from the engine ([`inject::plan`] on a small typed object carrying what it reads)
//! and the Dkron container is still changed by the engine's own code
//! ([`inject::inject_dkron_container`]); only the list edits (upsert by name, move the sidecar)
//! are written as patch operations directly, comparing typed values only for items that carry
//! our names. Items of the pod template stay raw JSON otherwise.
//!
//! `tests/inject_engine.rs` checks as a property that this patch, applied to the whole object,
//! equals the typed engine's output, on CREATE and UPDATE.

use super::MutateError;
use super::view::StatefulSetView;
use crate::inject::{
    self, ANNOTATION_INJECTED, INSTALL_CONTAINER, InjectError, InjectorConfig,
    LABEL_UPDATER_CONTAINER, Operation,
};
use crate::patch::{PatchOp, diff_container, raw, token};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// A StatefulSet as the hot path reads it: the shared view, its pod template in borrowed parts.
pub(super) type LeanStatefulSet<'a> = StatefulSetView<LeanTemplate<'a>>;

#[derive(Deserialize, Default)]
pub(super) struct LeanTemplate<'a> {
    #[serde(default, borrow)]
    metadata: Option<LeanTemplateMetadata<'a>>,
    #[serde(default, borrow)]
    spec: Option<LeanPod<'a>>,
}

#[derive(Deserialize)]
struct LeanTemplateMetadata<'a> {
    #[serde(default, borrow)]
    annotations: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPod<'a> {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    automount_service_account_token: Option<bool>,
    #[serde(default, borrow)]
    volumes: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow)]
    init_containers: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow)]
    containers: Option<Vec<&'a RawValue>>,
}

/// What the engine's plan reads of a container: its name, and the recorded cluster size.
#[derive(Deserialize)]
struct LeanContainer<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    env: Option<Vec<LeanEnvVar<'a>>>,
}

#[derive(Deserialize)]
struct LeanEnvVar<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    value: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
}

fn parse<'a, T: Deserialize<'a>>(item: &'a RawValue) -> Result<T, MutateError> {
    serde_json::from_str(item.get()).map_err(MutateError::NotAStatefulSet)
}

/// The engine's view: the fields [`inject::plan`] reads, typed, with containers reduced to
/// their names and the recorded cluster size.
fn plan_input(sts: &LeanStatefulSet<'_>) -> Result<StatefulSet, MutateError> {
    let spec = match &sts.spec {
        None => None,
        Some(spec) => {
            let pod = match &spec.template.spec {
                None => None,
                Some(pod) => {
                    let mut containers = Vec::new();
                    for item in pod.containers.iter().flatten() {
                        let lean: LeanContainer<'_> = parse(item)?;
                        let recorded = lean
                            .env
                            .iter()
                            .flatten()
                            .find(|e| e.name == inject::ENV_INITIAL_CLUSTER_SIZE);
                        containers.push(Container {
                            name: lean.name.into_owned(),
                            env: recorded.map(|e| {
                                vec![EnvVar {
                                    name: e.name.to_string(),
                                    value: e.value.as_deref().map(str::to_string),
                                    ..Default::default()
                                }]
                            }),
                            ..Default::default()
                        });
                    }
                    Some(PodSpec {
                        service_account_name: pod.service_account_name.clone(),
                        service_account: pod.service_account.clone(),
                        containers,
                        ..Default::default()
                    })
                }
            };
            Some(StatefulSetSpec {
                replicas: spec.replicas,
                service_name: spec.service_name.clone(),
                pod_management_policy: spec.pod_management_policy.clone(),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: pod,
                },
                ..Default::default()
            })
        }
    };
    Ok(StatefulSet {
        metadata: ObjectMeta {
            name: sts.metadata.name.clone(),
            annotations: sts.metadata.annotations.clone(),
            ..Default::default()
        },
        spec,
        status: None,
    })
}

/// The parts the webhook adds, typed (to compare with what an object already has) and
/// serialized (to write into patches), for one configuration.
struct Parts {
    config: InjectorConfig,
    volume: Volume,
    volume_json: Box<RawValue>,
    install: Container,
    install_json: Box<RawValue>,
    sidecar: Container,
    sidecar_json: Box<RawValue>,
}

thread_local! {
    static PARTS: RefCell<Option<Rc<Parts>>> = const { RefCell::new(None) };
}

/// The parts for `config`, built once per thread and configuration.
fn parts(config: &InjectorConfig) -> Rc<Parts> {
    PARTS.with_borrow_mut(|cached| {
        if let Some(parts) = cached.as_ref().filter(|p| p.config == *config) {
            return parts.clone();
        }
        let volume = inject::bin_volume();
        let install = inject::install_container(config);
        let sidecar = inject::label_updater_container(config);
        let parts = Rc::new(Parts {
            config: config.clone(),
            volume_json: raw(&volume),
            volume,
            install_json: raw(&install),
            install,
            sidecar_json: raw(&sidecar),
            sidecar,
        });
        *cached = Some(parts.clone());
        parts
    })
}

/// A list of the pod template (volumes, init containers, containers) as patch operations
/// change it: its items' names in their current order, and the raw items still unchanged.
struct List<'a> {
    path: String,
    /// `None` while the list is absent from the object.
    items: Option<Vec<(Cow<'a, str>, Option<&'a RawValue>)>>,
}

impl<'a> List<'a> {
    fn new(path: String, items: Option<&[&'a RawValue]>) -> Result<Self, MutateError> {
        let items = match items {
            None => None,
            Some(items) => Some(
                items
                    .iter()
                    .map(|item| Ok((parse::<Named<'_>>(item)?.name, Some(*item))))
                    .collect::<Result<Vec<_>, MutateError>>()?,
            ),
        };
        Ok(List { path, items })
    }

    /// Replaces the first item named like `item` when it differs, or appends `item`.
    fn upsert<T: DeserializeOwned + PartialEq>(
        &mut self,
        name: &'static str,
        item: &T,
        json: &RawValue,
        ops: &mut Vec<PatchOp>,
    ) {
        let Some(items) = self.items.as_mut() else {
            ops.push(PatchOp::Add {
                path: self.path.clone(),
                value: raw(&[json]),
            });
            self.items = Some(vec![(Cow::Borrowed(name), None)]);
            return;
        };
        match items.iter().position(|(n, _)| n == name) {
            Some(i) => {
                let existing = items[i]
                    .1
                    .and_then(|r| serde_json::from_str::<T>(r.get()).ok());
                if existing.as_ref() != Some(item) {
                    ops.push(PatchOp::Replace {
                        path: format!("{}/{i}", self.path),
                        value: json.to_owned(),
                    });
                    items[i].1 = None;
                }
            }
            None => {
                ops.push(PatchOp::Add {
                    path: format!("{}/-", self.path),
                    value: json.to_owned(),
                });
                items.push((Cow::Borrowed(name), None));
            }
        }
    }

    /// Removes every item named `name`, from the last, so indices stay valid as it applies.
    fn remove_all(&mut self, name: &str, ops: &mut Vec<PatchOp>) {
        let Some(items) = self.items.as_mut() else {
            return;
        };
        for i in (0..items.len()).rev() {
            if items[i].0 == name {
                ops.push(PatchOp::Remove {
                    path: format!("{}/{i}", self.path),
                });
                items.remove(i);
            }
        }
    }
}

const POD: &str = "/spec/template/spec";

/// The patch and warnings for one lean StatefulSet; `None` when it does not opt in. The same
/// decisions, in the same order, as the typed engine's `apply_plan`.
pub(super) fn mutate(
    sts: &LeanStatefulSet<'_>,
    operation: Operation,
    old: Option<&LeanStatefulSet<'_>>,
    config: &InjectorConfig,
) -> Result<Option<super::Mutation>, MutateError> {
    // Decided before anything else is read: an object that does not opt in is never denied.
    if !inject::opts_in(sts.metadata.annotations.as_ref()) {
        return Ok(None);
    }
    let typed = plan_input(sts)?;
    let old_typed = old.map(plan_input).transpose().ok().flatten();
    let plan = inject::plan(&typed, operation, old_typed.as_ref())?;
    // plan() has refused objects without either.
    let Some(spec) = sts.spec.as_ref() else {
        return Err(InjectError::MissingServiceName.into());
    };
    let Some(pod) = spec.template.spec.as_ref() else {
        return Err(InjectError::MissingPodSpec.into());
    };
    let mut ops = Vec::new();
    let mut warnings = Vec::new();

    let stored = old
        .and_then(|o| o.spec.as_ref())
        .map(|s| s.pod_management_policy.as_deref());
    let current = spec.pod_management_policy.as_deref();
    let policy = inject::pod_management_policy(operation, current, stored);
    set_scalar(
        "/spec/podManagementPolicy",
        current,
        policy.as_deref(),
        &mut ops,
    );
    warnings.extend(inject::ordered_ready_warning(
        operation,
        policy.as_deref(),
        &plan,
    ));

    let annotations = spec
        .template
        .metadata
        .as_ref()
        .map(|m| m.annotations.as_ref());
    let injected = BTreeMap::from([(ANNOTATION_INJECTED, config.version.as_str())]);
    match annotations {
        None => ops.push(PatchOp::Add {
            path: "/spec/template/metadata".into(),
            value: raw(&BTreeMap::from([("annotations", &injected)])),
        }),
        Some(None) => ops.push(PatchOp::Add {
            path: "/spec/template/metadata/annotations".into(),
            value: raw(&injected),
        }),
        Some(Some(present)) => {
            if present.get(ANNOTATION_INJECTED).map(|v| v.as_ref()) != Some(config.version.as_str())
            {
                ops.push(PatchOp::Add {
                    path: format!(
                        "/spec/template/metadata/annotations/{}",
                        token(ANNOTATION_INJECTED)
                    ),
                    value: raw(&config.version),
                });
            }
        }
    }

    warnings.extend(inject::automount_warning(
        pod.automount_service_account_token,
    ));
    if let Some(account) = inject::injected_service_account(&plan) {
        let current = pod.service_account_name.as_deref();
        set_scalar(
            "/spec/template/spec/serviceAccountName",
            current,
            Some(&account),
            &mut ops,
        );
    }

    let parts = parts(config);
    let mut volumes = List::new(format!("{POD}/volumes"), pod.volumes.as_deref())?;
    volumes.upsert(
        inject::BIN_VOLUME,
        &parts.volume,
        &parts.volume_json,
        &mut ops,
    );
    let mut init = List::new(
        format!("{POD}/initContainers"),
        pod.init_containers.as_deref(),
    )?;
    init.upsert(
        INSTALL_CONTAINER,
        &parts.install,
        &parts.install_json,
        &mut ops,
    );

    let items = pod.containers.as_deref().unwrap_or_default();
    let Some(item) = items.get(plan.container_index) else {
        return Err(InjectError::MissingPodSpec.into());
    };
    let before: Container = parse(item)?;
    let mut after = before.clone();
    inject::inject_dkron_container(&mut after, &plan, config);
    diff_container(
        &before,
        &after,
        &format!("{POD}/containers/{}", plan.container_index),
        &mut ops,
    );

    // The names were read for the plan already; pair them with the raw items again.
    let named = typed
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers.as_slice())
        .unwrap_or_default();
    let mut containers = List {
        path: format!("{POD}/containers"),
        items: pod.containers.as_deref().map(|raws| {
            raws.iter()
                .zip(named)
                .map(|(raw, c)| (Cow::Borrowed(c.name.as_str()), Some(*raw)))
                .collect()
        }),
    };
    if config.native_sidecar {
        containers.remove_all(LABEL_UPDATER_CONTAINER, &mut ops);
        init.upsert(
            LABEL_UPDATER_CONTAINER,
            &parts.sidecar,
            &parts.sidecar_json,
            &mut ops,
        );
    } else {
        init.remove_all(LABEL_UPDATER_CONTAINER, &mut ops);
        containers.upsert(
            LABEL_UPDATER_CONTAINER,
            &parts.sidecar,
            &parts.sidecar_json,
            &mut ops,
        );
    }

    Ok(Some(super::Mutation {
        patch: ops,
        warnings,
    }))
}

/// Sets an optional string member at `path` from `current` to `desired`.
fn set_scalar(path: &str, current: Option<&str>, desired: Option<&str>, ops: &mut Vec<PatchOp>) {
    match (current, desired) {
        (c, d) if c == d => {}
        (None, Some(d)) => ops.push(PatchOp::Add {
            path: path.into(),
            value: raw(d),
        }),
        (Some(_), Some(d)) => ops.push(PatchOp::Replace {
            path: path.into(),
            value: raw(d),
        }),
        (Some(_), None) => ops.push(PatchOp::Remove { path: path.into() }),
        (None, None) => {}
    }
}

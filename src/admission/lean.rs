//! The webhook's hot path: a review of a StatefulSet parsed into borrowed parts, and the JSON
//! patch written as text while the injection is decided, without building the object.
//!
//! The typed path (parse every field into k8s-openapi structs, clone the object, inject, diff,
//! serialize) spends most of a review allocating, copying and serializing structs. Here the
//! decisions still come from the engine: [`inject::plan`] runs on the facts it reads, borrowed
//! from the review, and what the Dkron container gets (the wrapped command, the environment, the
//! mount) comes from the engine's own descriptions ([`inject::wrapped_command`],
//! [`inject::dkron_env`], [`inject::bin_mount`]). What is written here is how those land in a
//! patch: "upsert by name" and "move the sidecar" as operations on lists whose items stay raw
//! JSON, compared with ours only when they carry our names.
//!
//! `tests/inject_engine.rs` checks as a property that this patch, applied to the whole object,
//! equals the typed engine's output, on CREATE and UPDATE, and that a reinvocation gets none.

use super::view::{StatefulSetView, Text};
use super::{Changes, MutateError};
use crate::inject::{
    self, ANNOTATION_INJECTED, BIN_VOLUME, EnvSource, INSTALL_CONTAINER, InjectError,
    InjectorConfig, LABEL_UPDATER_CONTAINER, Operation,
};
use crate::patch::{raw, token};
use k8s_openapi::api::core::v1::{Container, EnvVarSource, Volume, VolumeMount};
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
    #[serde(default)]
    metadata: Option<LeanTemplateMetadata>,
    #[serde(default, borrow)]
    spec: Option<LeanPod<'a>>,
}

#[derive(Deserialize)]
struct LeanTemplateMetadata {
    #[serde(default, deserialize_with = "super::view::our_annotations")]
    annotations: Option<BTreeMap<String, String>>,
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

/// What the engine reads and the patch changes of a container.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainer<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    command: Option<Vec<Text<'a>>>,
    #[serde(default, borrow)]
    env: Option<Vec<LeanEnvVar<'a>>>,
    #[serde(default, borrow)]
    volume_mounts: Option<Vec<&'a RawValue>>,
}

/// An environment variable: every field of `EnvVar`, its source left raw.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanEnvVar<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    value: Option<Text<'a>>,
    #[serde(default, borrow)]
    value_from: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
}

fn parse<'a, T: Deserialize<'a>>(item: &'a RawValue) -> Result<T, MutateError> {
    serde_json::from_str(item.get()).map_err(MutateError::NotAStatefulSet)
}

/// The pod template's containers, read as far as the engine and the patch need them.
fn containers<'a>(sts: &LeanStatefulSet<'a>) -> Result<Vec<LeanContainer<'a>>, MutateError> {
    let items = sts.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let items = items
        .and_then(|p| p.containers.as_deref())
        .unwrap_or_default();
    items.iter().map(|item| parse(item)).collect()
}

/// What [`inject::plan`] reads, borrowed from the lean view and its containers.
fn facts<'s>(
    sts: &'s LeanStatefulSet<'_>,
    containers: &'s [LeanContainer<'_>],
) -> inject::Facts<'s> {
    inject::Facts {
        name: sts.metadata.name.as_deref(),
        annotations: sts.metadata.annotations.as_ref(),
        spec: sts.spec.as_ref().map(|spec| inject::SpecFacts {
            replicas: spec.replicas,
            service_name: spec.service_name.as_deref(),
            pod: spec.template.spec.as_ref().map(|pod| inject::PodFacts {
                service_account_name: pod.service_account_name.as_deref(),
                service_account: pod.service_account.as_deref(),
                containers: containers
                    .iter()
                    .map(|c| inject::ContainerFacts {
                        name: &c.name,
                        recorded_size: c
                            .env
                            .iter()
                            .flatten()
                            .find(|e| e.name == inject::ENV_INITIAL_CLUSTER_SIZE)
                            .and_then(|e| e.value.as_ref())
                            .map(AsRef::as_ref),
                    })
                    .collect(),
            }),
        }),
    }
}

/// The parts the webhook adds that depend only on its configuration, typed (to compare with
/// what an object already has) and serialized (to write into patches).
struct Parts {
    config: InjectorConfig,
    volume: Volume,
    volume_json: Box<RawValue>,
    mount: VolumeMount,
    mount_json: Box<RawValue>,
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
        let mount = inject::bin_mount();
        let install = inject::install_container(config);
        let sidecar = inject::label_updater_container(config);
        let parts = Rc::new(Parts {
            config: config.clone(),
            volume_json: raw(&volume),
            volume,
            mount_json: raw(&mount),
            mount,
            install_json: raw(&install),
            install,
            sidecar_json: raw(&sidecar),
            sidecar,
        });
        *cached = Some(parts.clone());
        parts
    })
}

/// Where in a list an operation applies.
#[derive(Clone, Copy)]
enum At {
    /// The list itself.
    Whole,
    Index(usize),
    /// After the last item (`-`).
    End,
}

/// A JSON pointer as the segments it is written from, e.g. `["/spec/template/spec", "/volumes"]`.
type Path<'p> = &'p [&'p str];

/// A JSON patch written as text, one operation at a time. Paths are ours: constants and
/// indices, which never need JSON escaping.
struct PatchText {
    out: Vec<u8>,
    ops: usize,
}

impl PatchText {
    fn new() -> Self {
        let mut out = Vec::with_capacity(4096);
        out.push(b'[');
        PatchText { out, ops: 0 }
    }

    fn begin(&mut self, op: &str, path: Path<'_>, at: At) {
        debug_assert!(!path.iter().any(|p| p.contains(['"', '\\'])), "{path:?}");
        if self.ops > 0 {
            self.out.push(b',');
        }
        self.ops += 1;
        self.out.extend_from_slice(br#"{"op":""#);
        self.out.extend_from_slice(op.as_bytes());
        self.out.extend_from_slice(br#"","path":""#);
        for segment in path {
            self.out.extend_from_slice(segment.as_bytes());
        }
        match at {
            At::Whole => {}
            At::Index(i) => {
                self.out.push(b'/');
                push_decimal(&mut self.out, i);
            }
            At::End => self.out.extend_from_slice(b"/-"),
        }
        self.out.push(b'"');
    }

    fn with_value(&mut self, op: &str, path: Path<'_>, at: At, value: impl FnOnce(&mut Vec<u8>)) {
        self.begin(op, path, at);
        self.out.extend_from_slice(br#","value":"#);
        value(&mut self.out);
        self.out.push(b'}');
    }

    fn add(&mut self, path: Path<'_>, at: At, value: impl FnOnce(&mut Vec<u8>)) {
        self.with_value("add", path, at, value);
    }

    fn replace(&mut self, path: Path<'_>, at: At, value: impl FnOnce(&mut Vec<u8>)) {
        self.with_value("replace", path, at, value);
    }

    fn remove(&mut self, path: Path<'_>, at: At) {
        self.begin("remove", path, at);
        self.out.push(b'}');
    }

    /// The patch, `None` when it has no operation.
    fn finish(mut self) -> Option<(Vec<u8>, usize)> {
        (self.ops > 0).then(|| {
            self.out.push(b']');
            (self.out, self.ops)
        })
    }
}

/// Writes `i` in decimal.
fn push_decimal(out: &mut Vec<u8>, i: usize) {
    if i >= 10 {
        push_decimal(out, i / 10);
    }
    out.push(b'0' + (i % 10) as u8);
}

/// Writes `s` as a JSON string. Most strings here need no escape and are copied as they are.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Without early exit, so the check compiles to vector instructions.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(out, s);
    }
}

/// Writes a JSON array of strings.
fn json_strs<'s>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'s str>) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, item);
    }
    out.push(b']');
}

/// A list of the object (volumes, containers, a container's env, ...) as the patch changes it:
/// its items' names in their current order, with the items still as the review sent them.
struct List<'a, 'p, I> {
    path: Path<'p>,
    /// `None` while the list is absent from the object; an item `None` once the patch wrote it.
    items: Option<Vec<(Cow<'a, str>, Option<I>)>>,
}

impl<'a, 'p> List<'a, 'p, &'a RawValue> {
    /// A list of raw named items.
    fn raw(path: Path<'p>, items: Option<&[&'a RawValue]>) -> Result<Self, MutateError> {
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

    /// [`List::upsert`] of a typed part, compared as a typed value, written as its JSON.
    fn upsert_part<T: DeserializeOwned + PartialEq>(
        &mut self,
        name: &'static str,
        part: &T,
        json: &RawValue,
        patch: &mut PatchText,
    ) {
        self.upsert(
            name,
            |item| serde_json::from_str::<T>(item.get()).ok().as_ref() == Some(part),
            |out| out.extend_from_slice(json.get().as_bytes()),
            patch,
        );
    }
}

impl<'a, I> List<'a, '_, I> {
    /// Replaces the first item named `name` unless it is `same` already, or appends one.
    fn upsert(
        &mut self,
        name: &'static str,
        same: impl Fn(&I) -> bool,
        write: impl FnOnce(&mut Vec<u8>),
        patch: &mut PatchText,
    ) {
        let Some(items) = self.items.as_mut() else {
            patch.add(self.path, At::Whole, |out| {
                out.push(b'[');
                write(out);
                out.push(b']');
            });
            self.items = Some(vec![(Cow::Borrowed(name), None)]);
            return;
        };
        match items.iter().position(|(n, _)| n == name) {
            Some(i) => {
                if !items[i].1.as_ref().is_some_and(same) {
                    patch.replace(self.path, At::Index(i), write);
                    items[i].1 = None;
                }
            }
            None => {
                patch.add(self.path, At::End, write);
                items.push((Cow::Borrowed(name), None));
            }
        }
    }

    /// Removes every item named `name`, from the last, so indices stay valid as it applies.
    fn remove_all(&mut self, name: &str, patch: &mut PatchText) {
        let Some(items) = self.items.as_mut() else {
            return;
        };
        for i in (0..items.len()).rev() {
            if items[i].0 == name {
                patch.remove(self.path, At::Index(i));
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
) -> Result<Option<Changes>, MutateError> {
    // Decided before anything else is read: an object that does not opt in is never denied.
    if !inject::opts_in(sts.metadata.annotations.as_ref()) {
        return Ok(None);
    }
    let containers = containers(sts)?;
    // The stored object only informs defaults: one we cannot read counts as absent.
    let old_containers = old.and_then(|old| self::containers(old).ok());
    let old_facts = old.zip(old_containers.as_deref()).map(|(o, c)| facts(o, c));
    let plan = inject::plan(&facts(sts, &containers), operation, old_facts.as_ref())?;
    // plan() has refused objects without either.
    let Some(spec) = sts.spec.as_ref() else {
        return Err(InjectError::MissingServiceName.into());
    };
    let Some(pod) = spec.template.spec.as_ref() else {
        return Err(InjectError::MissingPodSpec.into());
    };
    let mut patch = PatchText::new();
    let mut warnings = Vec::new();

    let stored = old
        .and_then(|o| o.spec.as_ref())
        .map(|s| s.pod_management_policy.as_deref());
    let current = spec.pod_management_policy.as_deref();
    let policy = inject::pod_management_policy(operation, current, stored);
    set_scalar(
        &["/spec/podManagementPolicy"],
        current,
        policy.as_deref(),
        &mut patch,
    );
    warnings.extend(inject::ordered_ready_warning(
        operation,
        policy.as_deref(),
        &plan,
    ));

    let version = config.version.as_str();
    let injected = |out: &mut Vec<u8>| {
        out.push(b'{');
        json_str(out, ANNOTATION_INJECTED);
        out.push(b':');
        json_str(out, version);
        out.push(b'}');
    };
    match spec.template.metadata.as_ref().map(|m| &m.annotations) {
        None => patch.add(&["/spec/template/metadata"], At::Whole, |out| {
            out.extend_from_slice(br#"{"annotations":"#);
            injected(out);
            out.push(b'}');
        }),
        Some(None) => patch.add(
            &["/spec/template/metadata/annotations"],
            At::Whole,
            injected,
        ),
        Some(Some(present)) => {
            if present.get(ANNOTATION_INJECTED).map(String::as_str) != Some(version) {
                let key = token(ANNOTATION_INJECTED);
                let path = ["/spec/template/metadata/annotations/", &key];
                patch.add(&path, At::Whole, |out| json_str(out, version));
            }
        }
    }

    warnings.extend(inject::automount_warning(
        pod.automount_service_account_token,
    ));
    if let Some(account) = inject::injected_service_account(&plan) {
        let current = pod.service_account_name.as_deref();
        set_scalar(
            &["/spec/template/spec/serviceAccountName"],
            current,
            Some(&account),
            &mut patch,
        );
    }

    let parts = parts(config);
    let mut volumes = List::raw(&[POD, "/volumes"], pod.volumes.as_deref())?;
    volumes.upsert_part(BIN_VOLUME, &parts.volume, &parts.volume_json, &mut patch);
    let mut init = List::raw(&[POD, "/initContainers"], pod.init_containers.as_deref())?;
    init.upsert_part(
        INSTALL_CONTAINER,
        &parts.install,
        &parts.install_json,
        &mut patch,
    );

    // The Dkron container's edits go before any container is removed below, while its index
    // still holds.
    let Some(dkron) = containers.get(plan.container_index) else {
        return Err(InjectError::MissingPodSpec.into());
    };
    let index = plan.container_index.to_string();
    dkron_container(dkron, &index, &plan, config, &parts, &mut patch)?;

    let mut containers = List {
        path: &[POD, "/containers"],
        items: pod.containers.as_deref().map(|raws| {
            raws.iter()
                .zip(&containers)
                .map(|(raw, c)| (Cow::Borrowed(c.name.as_ref()), Some(*raw)))
                .collect()
        }),
    };
    if config.native_sidecar {
        containers.remove_all(LABEL_UPDATER_CONTAINER, &mut patch);
        init.upsert_part(
            LABEL_UPDATER_CONTAINER,
            &parts.sidecar,
            &parts.sidecar_json,
            &mut patch,
        );
    } else {
        init.remove_all(LABEL_UPDATER_CONTAINER, &mut patch);
        containers.upsert_part(
            LABEL_UPDATER_CONTAINER,
            &parts.sidecar,
            &parts.sidecar_json,
            &mut patch,
        );
    }

    Ok(Some(Changes {
        patch: patch.finish(),
        warnings,
    }))
}

/// The edits of the Dkron container, the `index`th, as operations: what the typed engine's
/// `inject_dkron_container` does (wrap the command, upsert the mount and each variable).
fn dkron_container(
    dkron: &LeanContainer<'_>,
    index: &str,
    plan: &inject::InjectionPlan,
    config: &InjectorConfig,
    parts: &Parts,
    patch: &mut PatchText,
) -> Result<(), MutateError> {
    let command = dkron.command.as_deref().unwrap_or_default();
    if !inject::is_wrapped(command) {
        let write = |out: &mut Vec<u8>| {
            json_strs(out, inject::wrapped_command(command, &plan.dkron_command));
        };
        let path = [POD, "/containers/", index, "/command"];
        match dkron.command {
            Some(_) => patch.replace(&path, At::Whole, write),
            None => patch.add(&path, At::Whole, write),
        }
    }

    let path = [POD, "/containers/", index, "/volumeMounts"];
    let mut mounts = List::raw(&path, dkron.volume_mounts.as_deref())?;
    mounts.upsert_part(BIN_VOLUME, &parts.mount, &parts.mount_json, patch);

    let env = inject::dkron_env(plan, config);
    let path = [POD, "/containers/", index, "/env"];
    match &dkron.env {
        // One operation for the whole list rather than one per variable.
        None => patch.add(&path, At::Whole, |out| {
            out.push(b'[');
            for (i, (name, source)) in env.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                env_var(out, name, source);
            }
            out.push(b']');
        }),
        Some(vars) => {
            let mut list = List {
                path: &path,
                items: Some(vars.iter().map(|v| (v.name.clone(), Some(v))).collect()),
            };
            for (name, source) in &env {
                list.upsert(
                    name,
                    |var| same_env(var, source),
                    |out| env_var(out, name, source),
                    patch,
                );
            }
        }
    }
    Ok(())
}

/// Writes the environment variable the engine builds from `name` and `source`.
fn env_var(out: &mut Vec<u8>, name: &str, source: &EnvSource) {
    out.extend_from_slice(br#"{"name":"#);
    json_str(out, name);
    match source {
        EnvSource::Value(value) => {
            out.extend_from_slice(br#","value":"#);
            json_str(out, value);
        }
        EnvSource::Field(field) => {
            out.extend_from_slice(br#","valueFrom":{"fieldRef":{"apiVersion":"v1","fieldPath":"#);
            json_str(out, field);
            out.push(b'}');
            out.push(b'}');
        }
    }
    out.push(b'}');
}

/// Whether `var` equals the variable the engine builds from `source` (the names match already).
fn same_env(var: &LeanEnvVar<'_>, source: &EnvSource) -> bool {
    match source {
        EnvSource::Value(value) => {
            var.value_from.is_none() && var.value.as_ref().map(AsRef::as_ref) == Some(value)
        }
        EnvSource::Field(field) => {
            let Some(from) = var.value_from.filter(|_| var.value.is_none()) else {
                return false;
            };
            // What the API server sends (Go's field order, compact); anything else is compared
            // as a typed value.
            let sent = from
                .get()
                .strip_prefix(r#"{"fieldRef":{"apiVersion":"v1","fieldPath":""#)
                .and_then(|rest| rest.strip_suffix(r#""}}"#));
            sent == Some(field)
                || serde_json::from_str::<EnvVarSource>(from.get()).ok()
                    == Some(inject::field_source(field))
        }
    }
}

/// Sets an optional string member at `path` from `current` to `desired`.
fn set_scalar(path: Path<'_>, current: Option<&str>, desired: Option<&str>, patch: &mut PatchText) {
    match (current, desired) {
        (c, d) if c == d => {}
        (None, Some(d)) => patch.add(path, At::Whole, |out| json_str(out, d)),
        (Some(_), Some(d)) => patch.replace(path, At::Whole, |out| json_str(out, d)),
        (Some(_), None) => patch.remove(path, At::Whole),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(json: &str) -> LeanEnvVar<'_> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn strings_and_indices_are_written_as_serde_json_and_display_write_them() {
        for s in [
            "",
            "plain",
            "quo\"te",
            "back\\slash",
            "tab\t",
            "\u{1}",
            "ünïcödé",
            "\u{7f}",
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        for i in [0, 7, 10, 99, 12345] {
            let mut out = Vec::new();
            push_decimal(&mut out, i);
            assert_eq!(out, i.to_string().as_bytes());
        }
    }

    #[test]
    fn an_injected_variable_is_the_same_however_its_source_is_written() {
        let pod_name = EnvSource::Field("metadata.name");
        let same = |json| same_env(&var(json), &pod_name);
        // As the API server sends it, and with the members in another order or spaced out.
        assert!(same(
            r#"{"name":"POD_NAME","valueFrom":{"fieldRef":{"apiVersion":"v1","fieldPath":"metadata.name"}}}"#
        ));
        assert!(same(
            r#"{"name":"POD_NAME","valueFrom":{ "fieldRef": {"fieldPath":"metadata.name","apiVersion":"v1"}}}"#
        ));
        // Not what the engine writes: another field, no API version, a value besides.
        assert!(!same(
            r#"{"name":"POD_NAME","valueFrom":{"fieldRef":{"apiVersion":"v1","fieldPath":"metadata.uid"}}}"#
        ));
        assert!(!same(
            r#"{"name":"POD_NAME","valueFrom":{"fieldRef":{"fieldPath":"metadata.name"}}}"#
        ));
        assert!(!same(
            r#"{"name":"POD_NAME","value":"x","valueFrom":{"fieldRef":{"apiVersion":"v1","fieldPath":"metadata.name"}}}"#
        ));
        assert!(!same(r#"{"name":"POD_NAME","value":"metadata.name"}"#));

        let service = EnvSource::Value("dkron".into());
        assert!(same_env(&var(r#"{"name":"S","value":"dkron"}"#), &service));
        assert!(same_env(
            &var(r#"{"name":"S","value":"dk\u0072on"}"#),
            &service
        ));
        assert!(!same_env(&var(r#"{"name":"S","value":"other"}"#), &service));
        assert!(!same_env(&var(r#"{"name":"S"}"#), &service));
    }
}

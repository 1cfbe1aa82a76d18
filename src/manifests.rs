//! `dkron-ha inject`: multi-document YAML in, the same documents out, with every opted-in
//! StatefulSet and every Deployment or StatefulSet of workers mutated exactly as the webhook
//! would on CREATE (like `istioctl kube-inject`).
//! Documents that are not injected are copied byte for byte, comments included.

use crate::admission::{self, MutateError, WorkloadKind};
use crate::inject::{InjectorConfig, Operation};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document}: not valid YAML: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {document} ({what}): {source}")]
    Denied {
        document: usize,
        what: String,
        #[source]
        source: MutateError,
    },
    #[error("document {document} ({what}): the injection patch did not apply: {message}")]
    Patch {
        document: usize,
        what: String,
        message: String,
    },
}

/// The result of injecting a manifest stream.
#[derive(Debug, Default)]
pub struct InjectedManifests {
    pub yaml: String,
    /// Admission warnings, each prefixed with the document it belongs to.
    pub warnings: Vec<String>,
    /// How many StatefulSets were injected.
    pub injected: usize,
}

/// Splits a YAML stream at `---` separator lines, as kubectl does. A separator may carry a
/// comment or the start of the next document (`--- # next`).
fn split_documents(input: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            let rest = bare.strip_prefix("---").unwrap_or("").trim_start();
            let mut next = String::new();
            if !rest.is_empty() && !rest.starts_with('#') {
                next.push_str(rest);
                next.push('\n');
            }
            documents.push(next);
        } else if let Some(current) = documents.last_mut() {
            current.push_str(line);
        }
    }
    documents
}

fn is_blank(document: &str) -> bool {
    document
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

fn describe(value: &Value, kind: WorkloadKind) -> String {
    let meta = |k: &str| {
        value
            .pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (ns, name) = (meta("namespace"), meta("name"));
    let kind = kind.as_str();
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

fn workload_kind(value: &Value) -> Option<WorkloadKind> {
    let field = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or_default();
    WorkloadKind::of(field("apiVersion"), field("kind"))
}

/// Injects `value` in place if it is an opted-in StatefulSet, a Deployment or StatefulSet of
/// Dkron workers, or a `List` holding some.
/// Returns how many objects were injected.
fn inject_value(
    value: &mut Value,
    document: usize,
    config: &InjectorConfig,
    warnings: &mut Vec<String>,
) -> Result<usize, ManifestError> {
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        let mut count = 0;
        if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                count += inject_value(item, document, config, warnings)?;
            }
        }
        return Ok(count);
    }
    let Some(kind) = workload_kind(value) else {
        return Ok(0);
    };
    let what = describe(value, kind);
    let mutation =
        admission::mutate(value, kind, Operation::Create, None, config).map_err(|source| {
            ManifestError::Denied {
                document,
                what: what.clone(),
                source,
            }
        })?;
    let Some(mutation) = mutation else {
        return Ok(0);
    };
    json_patch::patch(value, &mutation.patch).map_err(|e| ManifestError::Patch {
        document,
        what: what.clone(),
        message: e.to_string(),
    })?;
    warnings.extend(
        mutation
            .warnings
            .into_iter()
            .map(|w| format!("document {document} ({what}): {w}")),
    );
    Ok(1)
}

/// Injects every opted-in StatefulSet and every workers object of a YAML stream. Nothing is printed on error, so a
/// failed run never emits half-injected manifests.
pub fn inject_manifests(
    input: &str,
    config: &InjectorConfig,
) -> Result<InjectedManifests, ManifestError> {
    let mut out = InjectedManifests::default();
    let mut rendered = Vec::new();
    let mut documents = split_documents(input);
    // A stream that opens with `---` has nothing before it: number documents from after it.
    if documents.len() > 1 && documents.first().is_some_and(String::is_empty) {
        documents.remove(0);
    }
    for (index, document) in documents.into_iter().enumerate() {
        let number = index + 1;
        if is_blank(&document) {
            if !document.is_empty() {
                rendered.push(document);
            }
            continue;
        }
        let mut value: Value =
            serde_yaml_ng::from_str(&document).map_err(|source| ManifestError::Yaml {
                document: number,
                source,
            })?;
        let injected = inject_value(&mut value, number, config, &mut out.warnings)?;
        if injected == 0 {
            rendered.push(document);
            continue;
        }
        out.injected += injected;
        let yaml = serde_yaml_ng::to_string(&value).map_err(|source| ManifestError::Yaml {
            document: number,
            source,
        })?;
        rendered.push(yaml);
    }
    out.yaml = rendered
        .iter()
        .map(|d| {
            if d.ends_with('\n') {
                d.clone()
            } else {
                format!("{d}\n")
            }
        })
        .collect::<Vec<_>>()
        .join("---\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_split_documents_and_keep_inline_starts() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n--- d: 4\n");
        assert_eq!(docs, vec!["a: 1\n", "b: 2\n", "c: 3\n", "d: 4\n"]);
    }

    #[test]
    fn a_leading_separator_gives_an_empty_first_document() {
        let docs = split_documents("---\na: 1\n");
        assert_eq!(docs, vec!["", "a: 1\n"]);
    }
}

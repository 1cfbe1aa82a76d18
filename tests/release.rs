//! What ships: the image `make image` writes (the one every e2e test's nodes run), the
//! Dockerfile that must build the same, one version for crate, image and chart, and release
//! workflows that actionlint accepts and that run only what the Makefile runs.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use xtask::{BINARY_IN_IMAGE, CMD, Platform, REPOSITORY, USER, VERSION, image_name, oci};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn make_image_writes_the_static_release_binary_alone_run_as_non_root_and_named_as_the_chart_says() {
    let built = xtask::image(&[Platform::Amd64], &image_name()).unwrap_or_else(|e| panic!("{e:#}"));
    let (binary, archive) = &built.platforms[&Platform::Amd64];
    let read = oci::read_archive(archive).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(read.name, format!("{REPOSITORY}:{VERSION}"));
    let image = &read.images["linux/amd64"];
    assert_eq!(
        image.files,
        [
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/dkron-ha"
        ],
        "the binary alone"
    );
    let config = image.config.config().as_ref().expect("a runtime config");
    assert_eq!(config.user().as_deref(), Some(USER));
    assert_eq!(
        config.entrypoint().as_deref(),
        Some(&[BINARY_IN_IMAGE.to_owned()][..])
    );
    assert_eq!(config.cmd().as_deref(), Some(&[CMD.to_owned()][..]));
    let labels = config.labels().as_ref().expect("labels");
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let revision = &labels["org.opencontainers.image.revision"];
    assert!(
        revision.len() == 40 || revision == "unknown",
        "revision {revision:?}"
    );

    // A release build: it prints the version, and `inject` works without anything around it.
    let version = Command::new(binary).arg("version").output().unwrap();
    let printed = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.status.success() && printed.starts_with(&format!("dkron-ha {VERSION} ")),
        "{printed}"
    );
    xtask::check_static(binary, Platform::Amd64).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        binary.ends_with("x86_64-unknown-linux-musl/release/dkron-ha"),
        "{}",
        binary.display()
    );
}

/// The Dockerfile's lines as (instruction, rest), continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
            (instruction.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_what_make_image_writes() {
    let lines = dockerfile();
    let one = |instruction: &str| -> String {
        let found: Vec<&String> = lines
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, rest)| rest)
            .collect();
        assert_eq!(found.len(), 1, "one {instruction} in the Dockerfile");
        found[0].clone()
    };
    assert_eq!(one("FROM"), "scratch", "nothing but the binary");
    let copy = one("COPY");
    let copy: Vec<&str> = copy.split_whitespace().collect();
    let (source, destination) = (copy[copy.len() - 2], copy[copy.len() - 1]);
    assert_eq!(destination, BINARY_IN_IMAGE);
    // Where xtask leaves each platform's executable (TARGETARCH is GOARCH, as ours).
    for platform in Platform::ALL {
        let path = source.replace("${TARGETARCH}", platform.arch());
        assert_eq!(
            path,
            format!("target/image/linux-{}/dkron-ha", platform.arch())
        );
    }
    assert_eq!(one("USER"), USER);
    let json = |rest: String| serde_json::from_str::<Vec<String>>(&rest).expect("exec form");
    assert_eq!(json(one("ENTRYPOINT")), [BINARY_IN_IMAGE]);
    assert_eq!(json(one("CMD")), [CMD]);
    let spec = xtask::dkron_ha_image(Platform::Amd64, Path::new("unused"));
    let label = one("LABEL");
    for key in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
    ] {
        let want = format!("{key}=\"{}\"", spec.labels[key]);
        assert!(label.contains(&want), "the Dockerfile lacks {want}");
    }
    // docker's build context holds exactly what COPY needs.
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l == "*")
            && ignore
                .lines()
                .any(|l| l == format!("!{source}").replace("${TARGETARCH}", "*")),
        ".dockerignore:\n{ignore}"
    );
}

#[test]
fn crate_image_and_chart_share_one_version_and_repository() {
    let chart = read("chart/Chart.yaml");
    let chart: serde_json::Value = serde_yaml_ng::from_str(&chart).unwrap();
    assert_eq!(chart["version"], VERSION, "chart/Chart.yaml version");
    assert_eq!(chart["appVersion"], VERSION, "chart/Chart.yaml appVersion");
    let values: serde_json::Value = serde_yaml_ng::from_str(&read("chart/values.yaml")).unwrap();
    assert_eq!(values["image"]["repository"], REPOSITORY);
    assert_eq!(env!("CARGO_PKG_VERSION"), VERSION);
}

#[test]
fn the_workflows_pass_actionlint_and_run_only_make_targets_that_exist() {
    let actionlint = xtask::tools_cache().join("bin/actionlint");
    assert!(
        actionlint.is_file(),
        "{} is missing: tests/tools/build.sh (make tools) builds it",
        actionlint.display()
    );
    let output = Command::new(&actionlint)
        .arg("-no-color")
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let makefile = read("Makefile");
    let targets: BTreeSet<&str> = makefile
        .lines()
        .filter_map(|line| line.split_once(':').map(|(t, _)| t))
        .filter(|t| !t.is_empty() && !t.contains([' ', '\t', '.', '$', '=']))
        .collect();
    let mut used = BTreeSet::new();
    for workflow in ["ci.yml", "release.yml"] {
        let text = read(&format!(".github/workflows/{workflow}"));
        let parsed: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let jobs = parsed["jobs"].as_object().expect("jobs");
        let runs = jobs
            .values()
            .flat_map(|job| job["steps"].as_array().cloned().unwrap_or_default())
            .filter_map(|step| step["run"].as_str().map(str::to_owned));
        for run in runs {
            for word in run.split("make ").skip(1) {
                let target = word.split_whitespace().next().unwrap_or_default();
                assert!(
                    targets.contains(target),
                    "{workflow} runs `make {target}`, which the Makefile lacks ({targets:?})"
                );
                used.insert(target.to_owned());
            }
        }
    }
    for wanted in ["test", "image-check", "release-artifacts"] {
        assert!(used.contains(wanted), "no workflow runs make {wanted}");
    }
}

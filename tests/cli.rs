//! The `dkron-ha` binary as users run it.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dkron-ha");

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dkron-ha");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inject_reads_a_file_and_stdin_alike() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/dkron.yaml");
    let (code, from_file, _) = run(&["inject", "-f", example], None);
    assert_eq!(code, 0);
    assert!(from_file.contains("/dkron-ha/bin/dkron-ha"));
    let (code, from_stdin, _) = run(
        &["inject", "-f", "-"],
        Some(&std::fs::read_to_string(example).unwrap()),
    );
    assert_eq!(code, 0);
    assert_eq!(from_file, from_stdin);
}

#[test]
fn inject_options_come_from_flags_and_env() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/dkron.yaml");
    let (_, out, _) = run(
        &[
            "inject",
            "-f",
            example,
            "--inject-image",
            "my.registry/dkron-ha:1",
        ],
        None,
    );
    assert!(out.contains("image: my.registry/dkron-ha:1"));
    let out = Command::new(BIN)
        .args(["inject", "-f", example])
        .env("DKRON_HA_CLUSTER_DOMAIN", "corp.internal")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("value: corp.internal"));
}

#[test]
fn unparseable_yaml_fails_with_the_document_number_and_prints_nothing() {
    let input = "apiVersion: v1\nkind: ConfigMap\n---\nkey: [unclosed\n";
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(input));
    assert_ne!(code, 0);
    assert!(stderr.contains("document 2"), "{stderr}");
    assert!(stdout.is_empty(), "half output: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_statefulset_that_does_not_opt_in_passes_through_even_when_it_would_not_parse() {
    // Containers that are no containers: not ours to judge without the annotation.
    let other = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: other\nspec:\n  template:\n    spec:\n      containers: [5, x]\n";
    let dkron =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/dkron.yaml"))
            .unwrap();
    let input = format!("{other}---\n{dkron}");
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(&input));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(other), "{stdout}");
    assert!(stdout.contains("dkron-ha-label-updater"), "{stdout}");

    // Opted in, the same document is refused with the reason.
    let opted = other.replace(
        "name: other\n",
        "name: other\n  annotations:\n    dkron-ha/enabled: \"true\"\n",
    );
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(&opted));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("not a valid apps/v1 StatefulSet"),
        "{stderr}"
    );
    assert!(stdout.is_empty());
}

#[test]
fn an_invalid_annotation_fails_with_the_document_and_the_fix() {
    let input =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/dkron.yaml"))
            .unwrap()
            .replace(
                "dkron-ha/enabled: \"true\"",
                "dkron-ha/enabled: \"true\"\n    dkron-ha/container: missing",
            );
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(&input));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("document 2 (StatefulSet dkron)"),
        "{stderr}"
    );
    assert!(stderr.contains("dkron-ha/container"), "{stderr}");
    assert!(stdout.is_empty());
}

#[test]
fn inject_gives_a_deployment_of_workers_agent_mode_and_leaves_other_deployments_alone() {
    let input = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: workers
  annotations:
    dkron-ha/agent-of: dkron
spec:
  selector: { matchLabels: { app: workers } }
  template:
    metadata: { labels: { app: workers } }
    spec:
      containers:
        - name: dkron
          image: dkron/dkron:4.1.2
          args: [agent, --tag, pool=workers]
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec: { containers: [{ name: web, image: nginx }] }
"#;
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(input));
    assert_eq!(code, 0, "{stderr}");
    let documents: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let workers = &documents[0]["spec"]["template"]["spec"];
    assert_eq!(
        workers["containers"][0]["command"],
        serde_json::json!([
            "/dkron-ha/bin/dkron-ha",
            "wrap",
            "--",
            "/usr/local/bin/dkron"
        ])
    );
    assert!(
        workers["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "DKRON_HA_AGENT_OF" && e["value"] == "dkron"),
        "{stdout}"
    );
    assert_eq!(workers["initContainers"][0]["name"], "dkron-ha-install");
    assert_eq!(
        documents[1]["spec"]["template"]["spec"]["containers"][0]["name"],
        "web"
    );
    assert!(
        documents[1]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );

    let bad = input.replace("agent-of: dkron", "agent-of: Bad_Name");
    let (code, stdout, stderr) = run(&["inject", "-f", "-"], Some(&bad));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("document 1 (Deployment workers)"),
        "{stderr}"
    );
    assert!(stderr.contains("dkron-ha/agent-of"), "{stderr}");
    assert!(stdout.is_empty());
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (code, _, stderr) = run(&["inject", "-f", "/nonexistent/x.yaml"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/x.yaml"), "{stderr}");
}

#[test]
fn version_prints_version_and_commit() {
    let (code, out, _) = run(&["version"], None);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("dkron-ha {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn certs_generate_writes_a_ca_and_a_serving_pair_with_private_keys_locked_down() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let (code, stdout, stderr) = run(
        &[
            "certs",
            "generate",
            "--service",
            "dkron-ha",
            "--namespace",
            "dkron-ha",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(stdout.contains(name));
        let meta = std::fs::metadata(out.join(name)).unwrap();
        if name.ends_with(".key") {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
    }
    // The serving pair loads as a TLS identity.
    dkron_ha::tls::ReloadingCert::new(out.join("tls.crt"), out.join("tls.key"))
        .expect("usable pair");
}

/// `certs generate` into `out` with `extra` flags appended.
fn certs_generate(out: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "certs",
        "generate",
        "--service",
        "dkron-ha",
        "--namespace",
        "dkron-ha",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args, None)
}

/// Each of the four files: its bytes and its modification time.
fn certs_snapshot(dir: &std::path::Path) -> Vec<(Vec<u8>, std::time::SystemTime)> {
    ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            (std::fs::read(&path).unwrap(), modified)
        })
        .collect()
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn certs_generate_refuses_existing_files_unless_force_and_force_replaces_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let (code, _, stderr) = certs_generate(&out, &[]);
    assert_eq!(code, 0, "{stderr}");
    // An old modification time: a rewrite within the clock's granularity still shows.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        let file = std::fs::File::options()
            .write(true)
            .open(out.join(name))
            .unwrap();
        file.set_modified(old).unwrap();
    }
    let before = certs_snapshot(&out);

    // Run again: refused, naming every file and the way out; nothing touched.
    let (code, stdout, stderr) = certs_generate(&out, &[]);
    assert_eq!(code, 1, "{stderr}");
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        let path = out.join(name);
        assert!(
            stderr.contains(path.to_str().unwrap()),
            "names {name}: {stderr}"
        );
    }
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(!stdout.contains("wrote"), "{stdout}");
    assert!(
        certs_snapshot(&out) == before,
        "files changed without --force"
    );
    assert_eq!(
        dir_names(&out),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"],
        "nothing else written"
    );

    // --force replaces all four, atomically (no temporary file left), keys 0600 even where an
    // older key was readable by others.
    std::fs::set_permissions(out.join("tls.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, stderr) = certs_generate(&out, &["--force"]);
    assert_eq!(code, 0, "{stderr}");
    let after = certs_snapshot(&out);
    for (i, name) in ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        .iter()
        .enumerate()
    {
        assert!(stdout.contains(name), "{stdout}");
        assert_ne!(after[i].0, before[i].0, "{name} not replaced");
        assert_ne!(after[i].1, old, "{name} not replaced");
    }
    for key in ["ca.key", "tls.key"] {
        let mode = std::fs::metadata(out.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    assert_eq!(dir_names(&out), ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    dkron_ha::tls::ReloadingCert::new(out.join("tls.crt"), out.join("tls.key"))
        .expect("usable pair");
}

#[test]
fn certs_generate_refuses_when_any_one_file_exists_and_writes_none_of_the_others() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.key"), "mine").unwrap();
    let (code, _, stderr) = certs_generate(dir.path(), &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(dir.path().join("tls.key").to_str().unwrap()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ca.crt"),
        "only the existing file: {stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(dir_names(dir.path()), ["tls.key"]);
    assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"mine");
}

#[test]
fn certs_generate_refuses_a_service_or_namespace_that_is_not_a_dns_label() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let too_long = "a".repeat(64);
    for flag in ["--service", "--namespace"] {
        for bad in ["Dkron-HA", "a_b", "-x", "x-", "a.b", "", too_long.as_str()] {
            // `--flag=value`, so that `-x` reaches the check instead of reading as a flag.
            let arg = format!("{flag}={bad}");
            let other = if flag == "--service" {
                "--namespace=dkron-ha"
            } else {
                "--service=dkron-ha"
            };
            let (code, stdout, stderr) = run(
                &[
                    "certs",
                    "generate",
                    &arg,
                    other,
                    "--out",
                    out.to_str().unwrap(),
                ],
                None,
            );
            assert_eq!(code, 2, "{flag} {bad:?}: {stderr}");
            assert!(stderr.contains(flag), "{flag} {bad:?}: {stderr}");
            assert!(
                stderr.contains("DNS-1123 label"),
                "{flag} {bad:?}: {stderr}"
            );
            assert!(stdout.is_empty(), "{stdout}");
            assert!(!out.exists(), "{flag} {bad:?} wrote {}", out.display());
        }
    }
    // From the environment too.
    let out_env = Command::new(BIN)
        .args(["certs", "generate", "--service", "dkron-ha"])
        .arg("--out")
        .arg(&out)
        .env("DKRON_HA_NAMESPACE", "Dkron")
        .output()
        .unwrap();
    assert_eq!(out_env.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out_env.stderr).contains("--namespace"));
    assert!(!out.exists());

    // The longest label and one with digits and inner dashes are fine.
    let longest = "a".repeat(63);
    let (code, _, stderr) = run(
        &[
            "certs",
            "generate",
            "--service",
            &longest,
            "--namespace",
            "0-a-9",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(out.join("tls.crt").exists());
}

#[test]
fn install_copies_the_executable_and_it_runs_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bin");
    let (code, _, stderr) = run(&["install", target.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stderr}");
    let copied = target.join("dkron-ha");
    let out = Command::new(&copied)
        .arg("version")
        .output()
        .expect("run the copy");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("dkron-ha "));
}

#[test]
fn a_missing_kubeconfig_names_each_cause_once() {
    let out = Command::new(BIN)
        .args(["label-updater"])
        .env_remove("RUST_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("POD_NAME", "dkron-0")
        .env("POD_NAMESPACE", "default")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    let line = error_lines[0];
    assert!(
        line.contains("cannot build a Kubernetes client"),
        "the error says what failed: {line}"
    );
    for cause in [
        "/nonexistent/kubeconfig",
        "No such file or directory",
        "environment variable not found",
    ] {
        assert_eq!(
            line.matches(cause).count(),
            1,
            "{cause:?} must appear exactly once in: {line}"
        );
    }
}

#[test]
fn serve_answers_admission_with_no_kubernetes_api_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dkron_ha::certs::generate(&dkron_ha::certs::CertRequest {
        service: "x".into(),
        namespace: "y".into(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap();
    certs.write_to(dir.path()).unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (https, http) = (port(()), port(()));
    let mut child = Command::new(BIN)
        .args(["serve", "--log-format", "json"])
        .env("DKRON_HA_HTTPS_ADDR", format!("127.0.0.1:{https}"))
        .env("DKRON_HA_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("DKRON_HA_TLS_CERT", dir.path().join("tls.crt"))
        .env("DKRON_HA_TLS_KEY", dir.path().join("tls.key"))
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answered = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(certs.ca_cert_pem.as_bytes()).unwrap(),
            )
            .build()
            .unwrap();
        for _ in 0..100 {
            let review = include_str!("fixtures/admission/create-statefulset.json");
            if let Ok(r) = client
                .post(format!("https://127.0.0.1:{https}/mutate"))
                .body(review)
                .send()
                .await
            {
                return r.json::<serde_json::Value>().await.ok();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        None
    });
    // SIGTERM: a clean, prompt shutdown.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let answered = answered.expect("serve never answered");
    assert_eq!(answered["response"]["patchType"], "JSONPatch");
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn fleetlock_node_id_prints_the_id_zincati_sends_and_rejects_bad_input() {
    let (code, out, _) = run(
        &[
            "fleetlock",
            "node-id",
            "--machine-id",
            "2e074e9b299c41a59923c51ae16f279b",
        ],
        None,
    );
    assert_eq!(code, 0);
    let id = out.trim();
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    // Version 4 and RFC 4122 variant bits, as systemd sets them.
    assert_eq!(&id[12..13], "4");
    assert!(matches!(&id[16..17], "8" | "9" | "a" | "b"), "{id}");
    // The value tests/fleetlock_machine_id.rs cross-checked with Python's hmac module.
    assert_eq!(id, "074c268827d74fb59ed758e8940cd667");
    let (code, _, stderr) = run(&["fleetlock", "node-id", "--machine-id", "not-hex"], None);
    assert_ne!(code, 0);
    assert!(
        !stderr.contains("panicked") && !stderr.is_empty(),
        "{stderr}"
    );
}

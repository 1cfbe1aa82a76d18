//! Container images without a registry: the project's own executables, built fully static
//! (`+crt-static`, glibc: no musl target is needed), each put alone into a one-layer OCI image
//! archive that `ctr images import` takes. The images hold no libc, no shell, nothing else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

/// The images every test node has.
pub const DKRON_HA_IMAGE: &str = "localhost/dkron-ha-test/dkron-ha:test";
pub const PAUSE_IMAGE: &str = "localhost/dkron-ha-test/pause:test";
/// `/testbed` (the test workload, see examples/testbed.rs) and `/usr/local/bin/dkron` (the same
/// program as a Dkron stand-in).
pub const TESTBED_IMAGE: &str = "localhost/dkron-ha-test/testbed:test";

/// The static executables and the image archives made of them.
pub struct Images {
    pub dkron_ha: PathBuf,
    pub testbed: PathBuf,
    /// (image name, OCI archive)
    pub archives: Vec<(&'static str, PathBuf)>,
}

impl Images {
    /// Builds the static executables (cargo, cached in `<target>/static`) and the archives,
    /// once per process.
    pub fn shared() -> Result<&'static Images, String> {
        static SHARED: OnceLock<Result<Images, String>> = OnceLock::new();
        SHARED.get_or_init(build).as_ref().map_err(Clone::clone)
    }
}

fn build() -> Result<Images, String> {
    let target = target_dir()?;
    let static_dir = target.join("static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = std::time::Instant::now();
    let output = Command::new(&cargo)
        .args([
            "build",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--bin",
            "dkron-ha",
            "--example",
            "testbed",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &static_dir)
        // glibc linked in statically; the target is explicit so build scripts and proc macros
        // (which must be dynamic) are not.
        // Without symbols: a debug build with them (82 MB) outgrows the injected emptyDir's
        // sizeLimit, and the kubelet evicts every Dkron pod a minute after it starts.
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols",
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|error| format!("run {cargo}: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "static build of dkron-ha and the testbed failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    eprintln!(
        "static executables ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let bin = static_dir.join("x86_64-unknown-linux-gnu/debug");
    let dkron_ha = bin.join("dkron-ha");
    let testbed = bin.join("examples/testbed");
    let size = fs::metadata(&dkron_ha)
        .map_err(|error| format!("{}: {error}", dkron_ha.display()))?
        .len();
    let limit = dkron_ha::names::BIN_VOLUME_SIZE_LIMIT_MIB * 1024 * 1024;
    if size > limit {
        return Err(format!(
            "{} is {size} bytes, more than the {limit} the injected emptyDir may hold",
            dkron_ha.display()
        ));
    }
    for executable in [&dkron_ha, &testbed] {
        if has_interpreter(executable)? {
            return Err(format!(
                "{} is dynamically linked (it has an ELF interpreter)",
                executable.display()
            ));
        }
    }
    let out = static_dir.join("images");
    let archives = vec![
        (
            DKRON_HA_IMAGE,
            oci_archive(
                &out,
                DKRON_HA_IMAGE,
                // Where the Dockerfile puts it (the injected pod mounts /dkron-ha/bin).
                &[(&dkron_ha, "usr/local/bin/dkron-ha")],
                &["/usr/local/bin/dkron-ha"],
                // As the shipped image (distroless nonroot): the chart runs it non-root.
                Some("65532:65532"),
            )?,
        ),
        (
            PAUSE_IMAGE,
            oci_archive(
                &out,
                PAUSE_IMAGE,
                &[(&testbed, "pause")],
                &["/pause", "pause"],
                None,
            )?,
        ),
        (
            TESTBED_IMAGE,
            oci_archive(
                &out,
                TESTBED_IMAGE,
                &[(&testbed, "testbed"), (&testbed, "usr/local/bin/dkron")],
                &["/testbed"],
                None,
            )?,
        ),
    ];
    Ok(Images {
        dkron_ha,
        testbed,
        archives,
    })
}

/// `<target>` of the running test binary (`<target>/debug/deps/<test>`) or example.
fn target_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|error| format!("current exe: {error}"))?;
    exe.ancestors()
        .find(|dir| dir.join("debug").is_dir() && dir.file_name().is_some_and(|n| n == "target"))
        .or_else(|| exe.ancestors().nth(3))
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("no target dir above {}", exe.display()))
}

/// Whether an ELF executable asks for a dynamic loader (PT_INTERP).
pub fn has_interpreter(path: &Path) -> Result<bool, String> {
    let elf = fs::read(path).map_err(|error| format!("read {}: {error}", path.display()))?;
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF file", path.display()));
    }
    let program_headers = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, entries) = (u16_at(0x36), u16_at(0x38));
    Ok((0..entries).any(|i| {
        let at = program_headers + i * entry_size;
        elf.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    }))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `<out>/<file-name of name>.tar`: an OCI image layout archive of one uncompressed
/// layer holding `files` (source, path in the image) as root-owned executables, with
/// `entrypoint` and `user` (default root), named `name` for containerd.
pub fn oci_archive(
    out: &Path,
    name: &str,
    files: &[(&Path, &str)],
    entrypoint: &[&str],
    user: Option<&str>,
) -> Result<PathBuf, String> {
    let io = |what: &str, error: std::io::Error| format!("{what}: {error}");
    let short = name.rsplit('/').next().unwrap_or(name).replace(':', "-");
    // Per process: test binaries (and a test's child process) build the same images at once.
    let work = out.join(format!("{short}.{}.work", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    // A world-writable /tmp, as distroless and Alpine images have: real Dkron starts its
    // built-in executors as go-plugin processes whose sockets live there.
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp).map_err(|e| io("image /tmp", e))?;
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .map_err(|e| io("image /tmp mode", e))?;
    for (source, path) in files {
        let target = rootfs.join(path);
        fs::create_dir_all(target.parent().unwrap()).map_err(|e| io("image dir", e))?;
        fs::copy(source, &target).map_err(|e| io(&format!("copy {}", source.display()), e))?;
    }
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
        ])
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let layer_bytes = fs::read(&layer).map_err(|e| io("read layer", e))?;
    let layer_digest = sha256_hex(&layer_bytes);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Env": ["PATH=/usr/local/bin:/"],
            "User": user.unwrap_or_default(),
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    })
    .to_string();
    let config_digest = sha256_hex(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_bytes.len(),
        }],
    })
    .to_string();
    let manifest_digest = sha256_hex(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    })
    .to_string();
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|e| io("blobs dir", e))?;
    fs::rename(&layer, blobs.join(&layer_digest)).map_err(|e| io("layer blob", e))?;
    for (file, contents) in [
        (blobs.join(&config_digest), config.as_str()),
        (blobs.join(&manifest_digest), manifest.as_str()),
        (layout.join("index.json"), index.as_str()),
        (
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        ),
    ] {
        fs::write(&file, contents).map_err(|e| io(&format!("write {}", file.display()), e))?;
    }
    let archive = out.join(format!("{short}.tar"));
    let written = work.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&written)
        .args(["oci-layout", "index.json", "blobs"]))?;
    // Renamed into place, so a reader never sees a half-written archive.
    fs::rename(&written, &archive).map_err(|e| io("image archive", e))?;
    fs::remove_dir_all(&work).map_err(|e| io("remove image work dir", e))?;
    Ok(archive)
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|error| format!("run {command:?}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

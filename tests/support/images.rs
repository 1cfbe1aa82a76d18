//! Container images without a registry. dkron-ha's is the one `make image` ships (xtask: the
//! release build, static for musl, alone in its image); the test workload's is written by the
//! same image writer. The images hold no libc, no shell, nothing else.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use xtask::{Platform, Toolchain, oci};

/// The pod sandbox every test node's containerd runs.
pub const PAUSE_IMAGE: &str = "localhost/dkron-ha-test/pause:test";
/// `/testbed` (the test workload, see examples/testbed.rs) and `/usr/local/bin/dkron` (the same
/// program as a Dkron stand-in).
pub const TESTBED_IMAGE: &str = "localhost/dkron-ha-test/testbed:test";

/// The image every test node has and the chart names by default:
/// `ghcr.io/dkron-ha/dkron-ha:<version>`.
pub fn dkron_ha_image() -> String {
    xtask::image_name()
}

/// The static executables and the image archives made of them.
pub struct Images {
    /// (image name, OCI archive)
    pub archives: Vec<(String, PathBuf)>,
}

impl Images {
    /// Builds the release image (as `make image --platform amd64`) and the test workload's
    /// images (cargo, cached in the target directory), once per process.
    pub fn shared() -> Result<&'static Images, String> {
        static SHARED: OnceLock<Result<Images, String>> = OnceLock::new();
        SHARED.get_or_init(build).as_ref().map_err(Clone::clone)
    }
}

fn build() -> Result<Images, String> {
    let error = |error: anyhow::Error| format!("{error:#}");
    let built = xtask::image(&[Platform::Amd64], &dkron_ha_image()).map_err(error)?;
    let (dkron_ha, release) = &built.platforms[&Platform::Amd64];
    let size = std::fs::metadata(dkron_ha)
        .map_err(|error| format!("{}: {error}", dkron_ha.display()))?
        .len();
    let limit = dkron_ha::names::BIN_VOLUME_SIZE_LIMIT_MIB * 1024 * 1024;
    if size > limit {
        return Err(format!(
            "{} is {size} bytes, more than the {limit} the injected emptyDir may hold",
            dkron_ha.display()
        ));
    }
    let testbed = Toolchain::find(&[Platform::Amd64])
        .and_then(|toolchain| toolchain.build(Platform::Amd64, Some("testbed")))
        .map_err(error)?;
    let out = xtask::target_dir().join("image/test");
    Ok(Images {
        archives: vec![
            (dkron_ha_image(), release.clone()),
            (
                PAUSE_IMAGE.into(),
                oci_archive(
                    &out,
                    PAUSE_IMAGE,
                    &[(&testbed, "/pause")],
                    &["/pause", "pause"],
                )?,
            ),
            (
                TESTBED_IMAGE.into(),
                oci_archive(
                    &out,
                    TESTBED_IMAGE,
                    &[(&testbed, "/testbed"), (&testbed, "/usr/local/bin/dkron")],
                    &["/testbed"],
                )?,
            ),
        ],
    })
}

/// Writes `<out>/<last part of name>.tar`: an amd64 image of `files` (source, absolute path in
/// the image) run as root with `entrypoint`, named `name` for containerd.
pub fn oci_archive(
    out: &Path,
    name: &str,
    files: &[(&Path, &str)],
    entrypoint: &[&str],
) -> Result<PathBuf, String> {
    let short = name.rsplit('/').next().unwrap_or(name).replace(':', "-");
    let archive = out.join(format!("{short}.tar"));
    let mut layout = oci::Layout::default();
    layout
        .add_image(&oci::ImageSpec {
            architecture: Platform::Amd64.arch(),
            files: files
                .iter()
                .map(|(source, path)| (source.to_path_buf(), path.to_string()))
                .collect(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: vec![],
            // Real Dkron starts its executors as plugin processes whose sockets live there.
            tmp: true,
            user: String::new(),
            labels: Default::default(),
        })
        .and_then(|_| layout.write_archive(&archive, name))
        .map_err(|error| format!("image {name}: {error:#}"))?;
    Ok(archive)
}

/// Whether an ELF executable asks for a dynamic loader (`PT_INTERP`).
pub fn has_interpreter(path: &Path) -> Result<bool, String> {
    let elf = std::fs::read(path).map_err(|error| format!("read {}: {error}", path.display()))?;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF file", path.display()));
    }
    Ok(xtask::has_interpreter(&elf))
}

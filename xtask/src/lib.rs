//! dkron-ha's release tooling: the one build path from source to the image users install.
//!
//! `make image` (`cargo xtask image`) builds the release `dkron-ha` fully static for musl with
//! `cargo zigbuild` (zig compiles ring's and mimalloc's C for either platform) and writes it,
//! alone, into an OCI image archive per platform plus a multi-platform one ([`oci`]). The tests
//! import the amd64 archive into their nodes, so the image they run is the one that ships.
#![forbid(unsafe_code)]

pub mod bench;
pub mod oci;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

/// The version of the crate, the image and the chart (`[workspace.package]`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where releases are pushed; the chart's default `image.repository`.
pub const REPOSITORY: &str = "ghcr.io/dkron-ha/dkron-ha";
/// How the image runs: the Dockerfile says the same (a test holds it to these).
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/dkron-ha";
pub const USER: &str = "65532:65532";
pub const CMD: &str = "serve";
/// The versions the test command installs into the tools cache (tests/tools/build.sh).
pub const ZIGLANG_VERSION: &str = "0.15.2";
pub const CARGO_ZIGBUILD_VERSION: &str = "0.24.1";

/// The image's name for a release: `ghcr.io/dkron-ha/dkron-ha:<version>`.
pub fn image_name() -> String {
    format!("{REPOSITORY}:{VERSION}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Platform {
    Amd64,
    Arm64,
}

impl Platform {
    pub const ALL: [Platform; 2] = [Platform::Amd64, Platform::Arm64];

    /// GOARCH, as OCI platforms and Kubernetes nodes name it.
    pub fn arch(self) -> &'static str {
        match self {
            Platform::Amd64 => "amd64",
            Platform::Arm64 => "arm64",
        }
    }

    pub fn rust_target(self) -> &'static str {
        match self {
            Platform::Amd64 => "x86_64-unknown-linux-musl",
            Platform::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// ELF `e_machine`.
    fn elf_machine(self) -> u16 {
        match self {
            Platform::Amd64 => 62,
            Platform::Arm64 => 183,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim_start_matches("linux/") {
            "amd64" => Ok(Platform::Amd64),
            "arm64" => Ok(Platform::Arm64),
            other => Err(format!("unknown platform {other:?}: amd64 or arm64")),
        }
    }
}

/// The workspace's root (the dkron-ha crate).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| root().join(dir))
        .unwrap_or_else(|| root().join("target"))
}

/// Where tests/tools/build.sh puts what the test command builds or installs (same default and
/// override as the script): outside the checkout, so a fresh clone reuses it.
pub fn tools_cache() -> PathBuf {
    match std::env::var_os("DKRON_HA_TOOLS_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(cache) => PathBuf::from(cache).join("dkron-ha/tools"),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/dkron-ha/tools"),
        },
    }
}

/// A program on `PATH`, else in the tools cache.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([tools_cache().join("bin")])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// What a static musl build for `platforms` needs: `cargo-zigbuild`, `zig` and the Rust
/// targets. Says everything missing at once, with the command that installs it; installs
/// nothing (the test command's tests/tools/build.sh installs them into the tools cache).
pub struct Toolchain {
    cargo_zigbuild: PathBuf,
    /// `None`: cargo-zigbuild finds `python3 -m ziglang` itself.
    zig: Option<PathBuf>,
}

impl Toolchain {
    pub fn find(platforms: &[Platform]) -> Result<Toolchain> {
        let mut missing = Vec::new();
        let zig = std::env::var_os("CARGO_ZIGBUILD_ZIG_PATH")
            .map(PathBuf::from)
            .or_else(|| find_program("zig"));
        let python_ziglang = || {
            Command::new("python3")
                .args(["-m", "ziglang", "version"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if zig.is_none() && !python_ziglang() {
            missing.push(format!(
                "zig (compiles the C parts and links): pip install ziglang=={ZIGLANG_VERSION} \
                 (for the python3 on PATH), or a zig on PATH or in CARGO_ZIGBUILD_ZIG_PATH"
            ));
        }
        let cargo_zigbuild = find_program("cargo-zigbuild");
        if cargo_zigbuild.is_none() {
            missing.push(format!(
                "cargo-zigbuild: cargo install cargo-zigbuild@{CARGO_ZIGBUILD_VERSION} --locked \
                 --no-default-features"
            ));
        }
        let libdir = Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .context("run rustc")?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&libdir.stdout).trim());
        for platform in platforms {
            let target = platform.rust_target();
            if !sysroot.join("lib/rustlib").join(target).is_dir() {
                missing.push(format!(
                    "the Rust target {target}: rustup target add {target}"
                ));
            }
        }
        match cargo_zigbuild {
            Some(cargo_zigbuild) if missing.is_empty() => Ok(Toolchain {
                cargo_zigbuild,
                zig,
            }),
            _ => bail!(
                "the static build needs what is missing here:\n  - {}\n(`make test` installs the amd64 \
                 ones into {} by itself)",
                missing.join("\n  - "),
                tools_cache().display()
            ),
        }
    }

    /// Builds `--bin dkron-ha` (or `--example NAME`) in release for `platform` and returns the
    /// static executable, checked to be one for that platform.
    pub fn build(&self, platform: Platform, example: Option<&str>) -> Result<PathBuf> {
        let target = platform.rust_target();
        let mut command = Command::new(&self.cargo_zigbuild);
        command
            .args(["zigbuild", "--release", "--locked", "--target", target])
            .args(match example {
                Some(name) => ["--example", name],
                None => ["--bin", "dkron-ha"],
            })
            .current_dir(root())
            .env("CARGO_TARGET_DIR", target_dir())
            // The commit build.rs stamps, the same from a shell and from a test run (which
            // inherits build.rs's short commit), so neither rebuilds what the other built.
            .env(
                "DKRON_HA_GIT_COMMIT",
                revision().chars().take(12).collect::<String>(),
            );
        // What an outer cargo (a test run, `cargo xtask`) set for its own crate is not this
        // build's: its flags, and the variables build scripts declare (ring reruns when
        // CARGO_MANIFEST_DIR changes, and everything that depends on ring with it).
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key == "RUSTFLAGS"
                || key == "OUT_DIR"
                || key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || [
                    "CARGO_ENCODED_RUSTFLAGS",
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&key.as_ref())
            {
                command.env_remove(key.as_ref());
            }
        }
        if let Some(zig) = &self.zig {
            command.env("CARGO_ZIGBUILD_ZIG_PATH", zig);
        }
        let started = std::time::Instant::now();
        let status = command
            .status()
            .with_context(|| format!("run {}", self.cargo_zigbuild.display()))?;
        ensure!(
            status.success(),
            "cargo zigbuild for {target} failed ({status})"
        );
        let dir = target_dir().join(target).join("release");
        let executable = match example {
            Some(name) => dir.join("examples").join(name),
            None => dir.join("dkron-ha"),
        };
        check_static(&executable, platform)?;
        eprintln!(
            "built {} in {:.1}s",
            executable.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(executable)
    }
}

/// Fails unless `path` is a static ELF executable for `platform` (no `PT_INTERP`).
pub fn check_static(path: &Path, platform: Platform) -> Result<()> {
    let elf = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let machine = u16_at(0x12);
    ensure!(
        machine == platform.elf_machine(),
        "{} is for ELF machine {machine}, not {}",
        path.display(),
        platform.arch()
    );
    if has_interpreter(&elf) {
        bail!(
            "{} is dynamically linked (it has an ELF interpreter)",
            path.display()
        );
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file asks for a dynamic loader (`PT_INTERP`).
pub fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let Some(table) = elf.get(0x20..0x28) else {
        return false;
    };
    let program_headers = u64::from_le_bytes(table.try_into().expect("8 bytes")) as usize;
    let (entry_size, entries) = (u16_at(0x36), u16_at(0x38));
    (0..entries).any(|i| {
        let at = program_headers + i * entry_size;
        elf.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

/// The image `make image` writes for a `dkron-ha` executable.
pub fn dkron_ha_image(platform: Platform, binary: &Path) -> oci::ImageSpec<'static> {
    oci::ImageSpec {
        architecture: platform.arch(),
        files: vec![(binary.to_owned(), BINARY_IN_IMAGE.to_owned())],
        tmp: false,
        entrypoint: vec![BINARY_IN_IMAGE.to_owned()],
        cmd: vec![CMD.to_owned()],
        user: USER.to_owned(),
        labels: BTreeMap::from(
            [
                ("org.opencontainers.image.title", "dkron-ha".to_owned()),
                (
                    "org.opencontainers.image.source",
                    env!("CARGO_PKG_REPOSITORY").to_owned(),
                ),
                ("org.opencontainers.image.version", VERSION.to_owned()),
                ("org.opencontainers.image.revision", revision()),
                (
                    "org.opencontainers.image.licenses",
                    env!("CARGO_PKG_LICENSE").to_owned(),
                ),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        ),
    }
}

/// The commit built: git's `HEAD`, else `DKRON_HA_GIT_COMMIT` (as build.rs reads it for a
/// source tree without `.git`).
pub fn revision() -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .or_else(|| std::env::var("DKRON_HA_GIT_COMMIT").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// What [`image`] made.
pub struct Built {
    /// Per platform: the static executable and its image archive.
    pub platforms: BTreeMap<Platform, (PathBuf, PathBuf)>,
    /// The multi-platform archive, when more than one platform was built.
    pub index: Option<PathBuf>,
}

/// `make image`: builds `dkron-ha` for each platform and writes
/// `<target>/image/dkron-ha-<version>-linux-<arch>.oci.tar` for each and, for several,
/// `<target>/image/dkron-ha-<version>.oci.tar` holding them all, named `name`; and the
/// executable as `<target>/image/linux-<arch>/dkron-ha`, which the Dockerfile copies.
pub fn image(platforms: &[Platform], name: &str) -> Result<Built> {
    let toolchain = Toolchain::find(platforms)?;
    let out = target_dir().join("image");
    let mut built = Built {
        platforms: BTreeMap::new(),
        index: None,
    };
    let mut all = oci::Layout::default();
    for &platform in platforms {
        let binary = toolchain.build(platform, None)?;
        let copy = out.join(format!("linux-{}/dkron-ha", platform.arch()));
        fs::create_dir_all(copy.parent().expect("a directory"))?;
        fs::copy(&binary, &copy).with_context(|| format!("copy to {}", copy.display()))?;
        let spec = dkron_ha_image(platform, &binary);
        let archive = out.join(format!(
            "dkron-ha-{VERSION}-linux-{}.oci.tar",
            platform.arch()
        ));
        let mut one = oci::Layout::default();
        one.add_image(&spec)?;
        one.write_archive(&archive, name)?;
        // The multi-platform archive only when there are several (the tests build one).
        if platforms.len() > 1 {
            all.add_image(&spec)?;
        }
        eprintln!("wrote {}", archive.display());
        built.platforms.insert(platform, (binary, archive));
    }
    if platforms.len() > 1 {
        let archive = out.join(format!("dkron-ha-{VERSION}.oci.tar"));
        all.write_archive(&archive, name)?;
        eprintln!("wrote {}", archive.display());
        built.index = Some(archive);
    }
    Ok(built)
}

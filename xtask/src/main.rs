//! `cargo xtask image | image-check | release-artifacts`: the Makefile's release targets.
#![forbid(unsafe_code)]

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use sha2::{Digest as _, Sha256};
use xtask::{Platform, VERSION, find_program, image, image_name, oci, root, target_dir};

#[derive(Parser)]
#[command(about = "dkron-ha's release tooling")]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the static release executable and its OCI image archives into target/image/.
    Image {
        /// Platforms to build (repeat or comma-separate): amd64, arm64.
        #[arg(long, value_delimiter = ',', default_values = ["amd64", "arm64"])]
        platform: Vec<Platform>,
        /// The image's name in the archives (what `ctr`/`docker load` tag it as).
        #[arg(long, default_value_t = image_name())]
        name: String,
    },
    /// Build both platforms, check every archive's blobs, and run the arm64 executable under
    /// qemu-user-static: `version` and `inject -f examples/dkron.yaml` must print what amd64 does.
    ImageCheck,
    /// Everything a release uploads, into target/release-artifacts/: the image archives, the
    /// static executables, the chart package and SHA256SUMS.
    ReleaseArtifacts,
}

fn main() -> Result<()> {
    match Args::parse().command {
        Task::Image { platform, name } => {
            image(&platform, &name)?;
        }
        Task::ImageCheck => image_check()?,
        Task::ReleaseArtifacts => release_artifacts()?,
    }
    Ok(())
}

fn image_check() -> Result<()> {
    let qemu = find_program("qemu-aarch64-static").context(
        "qemu-aarch64-static runs the arm64 executable here: apt-get install qemu-user-static",
    )?;
    let built = image(&Platform::ALL, &image_name())?;
    for archive in built
        .platforms
        .values()
        .map(|(_, archive)| archive)
        .chain(&built.index)
    {
        let read = oci::read_archive(archive)?;
        let platforms: Vec<_> = read
            .images
            .iter()
            .map(|(p, i)| format!("{p} {}", i.digest))
            .collect();
        eprintln!("{}: {} {platforms:?}", archive.display(), read.name);
    }
    let example = root().join("examples/dkron.yaml");
    let example = example.to_str().context("a UTF-8 path")?;
    let mut outputs = Vec::new();
    for (platform, (binary, _)) in &built.platforms {
        let mut output = Vec::new();
        for args in [&["version"][..], &["inject", "-f", example][..]] {
            let mut command = match platform {
                Platform::Amd64 => Command::new(binary),
                Platform::Arm64 => {
                    let mut command = Command::new(&qemu);
                    command.arg(binary);
                    command
                }
            };
            let run = command
                .args(args)
                .output()
                .with_context(|| format!("run {} {args:?}", binary.display()))?;
            ensure!(
                run.status.success(),
                "{} {args:?} failed ({}): {}",
                binary.display(),
                run.status,
                String::from_utf8_lossy(&run.stderr)
            );
            output.push(String::from_utf8_lossy(&run.stdout).into_owned());
        }
        eprintln!("{platform:?}: {}", output[0].trim());
        outputs.push(output);
    }
    ensure!(
        outputs.windows(2).all(|pair| pair[0] == pair[1]),
        "amd64 and arm64 print different things:\n{outputs:#?}"
    );
    eprintln!("image-check: both platforms print the same `version` and `inject` output");
    Ok(())
}

fn release_artifacts() -> Result<()> {
    let helm = find_program("helm").context(
        "helm packages the chart: install helm 3, or run `make tools` (it builds one into the tools cache)",
    )?;
    let built = image(&Platform::ALL, &image_name())?;
    let out = target_dir().join("release-artifacts");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("clean {}", out.display()))?;
    }
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let copy = |from: &Path, name: String| -> Result<()> {
        fs::copy(from, out.join(&name)).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    };
    for (platform, (binary, archive)) in &built.platforms {
        copy(
            binary,
            format!("dkron-ha-{VERSION}-linux-{}", platform.arch()),
        )?;
        copy(archive, file_name(archive)?)?;
    }
    let index = built
        .index
        .as_deref()
        .context("both platforms were built")?;
    copy(index, file_name(index)?)?;
    let package = Command::new(&helm)
        .args(["package", "chart", "--destination"])
        .arg(&out)
        .current_dir(root())
        .output()
        .with_context(|| format!("run {}", helm.display()))?;
    if !package.status.success() {
        bail!(
            "helm package failed: {}",
            String::from_utf8_lossy(&package.stderr)
        );
    }
    let mut sums = String::new();
    let mut names: Vec<String> = fs::read_dir(&out)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    for name in names {
        let digest = Sha256::digest(fs::read(out.join(&name))?);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        sums.push_str(&format!("{hex}  {name}\n"));
    }
    fs::write(out.join("SHA256SUMS"), &sums)?;
    eprint!("{}:\n{sums}", out.display());
    Ok(())
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned())
}

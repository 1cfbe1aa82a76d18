//! `cargo xtask image | image-check | release-artifacts | bench`: the Makefile's release and
//! measurement targets.
#![forbid(unsafe_code)]

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use sha2::{Digest as _, Sha256};
use xtask::{Platform, VERSION, bench, find_program, image, image_name, oci, root, target_dir};

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
    /// Run an e2e suite's measurements `--runs` times, one scenario at a time, into
    /// target/bench/<suite>.json, and print min / median / max.
    Bench {
        /// The suite: `dkron` (tests/e2e_dkron.rs) or `system` (tests/e2e_system.rs).
        #[arg(value_parser = ["dkron", "system"])]
        suite: String,
        /// Runs of the whole suite.
        #[arg(long, env = "BENCH_RUNS", default_value_t = 5)]
        runs: u32,
        /// Only the tests whose names contain this (cargo test's filter).
        #[arg(long, env = "BENCH_FILTER", default_value = "")]
        filter: String,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Task::Image { platform, name } => {
            image(&platform, &name)?;
        }
        Task::ImageCheck => image_check()?,
        Task::ReleaseArtifacts => release_artifacts()?,
        Task::Bench {
            suite,
            runs,
            filter,
        } => bench(&suite, runs, &filter)?,
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

fn bench(suite: &str, runs: u32, filter: &str) -> Result<()> {
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let mut records = Vec::new();
    let mut failed = Vec::new();
    for run in 1..=runs {
        let out = dir.join(format!("{suite}.run{run}.jsonl"));
        let _ = fs::remove_file(&out);
        eprintln!("bench {suite}: run {run} of {runs}");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "test",
                "--test",
                &format!("e2e_{suite}"),
                "--",
                "--include-ignored",
            ])
            .args(["--nocapture", filter])
            .env("DKRON_HA_BENCH_OUT", &out)
            .env("DKRON_HA_E2E_SCENARIOS", "1")
            .current_dir(root())
            .status()
            .context("run cargo test")?;
        if !status.success() {
            failed.push(run);
        }
        if out.exists() {
            let text = fs::read_to_string(&out)?;
            records
                .extend(bench::parse_records(&text).with_context(|| format!("{}", out.display()))?);
        }
    }
    let dkron = match std::env::var_os("DKRON_BIN") {
        // `dkron version` prints `Name: Dkron`, then `Version: v4.1.2` (`devel` when built
        // without Dkron's ldflags).
        Some(bin) => {
            let output = Command::new(&bin).arg("version").output().ok();
            let text = output.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let version = text
                .as_deref()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix("Version:")))
                .map_or("(no version)", str::trim)
                .to_owned();
            format!("real {version}")
        }
        None => "stand-in".into(),
    };
    let report = bench::Report {
        suite: suite.into(),
        commit: xtask::revision(),
        dkron,
        machine: machine(),
        results: bench::gather(records),
    };
    let path = dir.join(format!("{suite}.json"));
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", bench::table(&report.results));
    println!(
        "{} ({}, Dkron {}, {})",
        path.display(),
        report.commit,
        report.dkron,
        report.machine
    );
    ensure!(
        failed.is_empty(),
        "runs {failed:?} of {runs} failed; their figures up to the failure are in {}",
        path.display()
    );
    Ok(())
}

/// The CPU model, its count and the memory, from /proc.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|m| m.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    format!(
        "{cpus} x {model}, {:.0} GiB",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

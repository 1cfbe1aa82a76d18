//! `make image` on a machine without the toolchain says what to install, all at once, and
//! builds and installs nothing.

use std::process::Command;

#[test]
fn make_image_without_zig_or_cargo_zigbuild_names_both_with_their_install_commands() {
    let empty = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    // A PATH with rustc's directory alone (for the targets' check; no zig, no python3 to run
    // ziglang, no cargo-zigbuild) and an empty tools cache.
    let rustc = Command::new("rustup").args(["which", "rustc"]).output();
    let rustc_dir = rustc
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .and_then(|p| {
            std::path::Path::new(&p)
                .parent()
                .map(|d| d.display().to_string())
        })
        .expect("rustup names the rustc it runs");
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["image", "--platform", "amd64"])
        .env("PATH", &rustc_dir)
        .env("DKRON_HA_TOOLS_CACHE", empty.path())
        .env("CARGO_TARGET_DIR", target.path())
        .env_remove("CARGO_ZIGBUILD_ZIG_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for wanted in [
        "pip install ziglang==0.15.2",
        "cargo install cargo-zigbuild@0.24.1 --locked --no-default-features",
    ] {
        assert_eq!(
            stderr.matches(wanted).count(),
            1,
            "{wanted:?} once in:\n{stderr}"
        );
    }
    assert!(
        std::fs::read_dir(target.path()).unwrap().next().is_none(),
        "nothing built"
    );
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "nothing installed"
    );
}

//! `dkron-ha install DIR`: the init container copies its own executable into the shared
//! emptyDir, so the Dkron container (any image) can run the wrapper from there.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the running executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the running executable to `DIR/dkron-ha` (mode 0755), atomically: a temp file
/// renamed into place, so a restarted init container never leaves a half-written binary.
pub fn install_self(dir: &Path) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let from = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    let to = dir.join("dkron-ha");
    let tmp = dir.join(".dkron-ha.tmp");
    let copy = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::copy(&from, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &to)
    };
    copy().map_err(|source| InstallError::Copy {
        from: from.clone(),
        to: to.clone(),
        source,
    })?;
    Ok(to)
}

//! `dkron-ha certs generate`: a CA and a serving certificate for the webhook Service, made with
//! rcgen. The API server verifies the webhook against the CA (the caBundle).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Files [`GeneratedCerts::write_to`] would have replaced; it wrote nothing.
    #[error("{}", exists_message(.0))]
    Exists(Vec<PathBuf>),
    #[error("{0}")]
    Invalid(String),
}

fn exists_message(paths: &[PathBuf]) -> String {
    let list = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (verb, them) = if paths.len() == 1 {
        ("exists", "it")
    } else {
        ("exist", "them")
    };
    format!("{list} already {verb}; nothing was written (--force overwrites {them})")
}

/// The files [`GeneratedCerts::write_to`] writes, in order: the names of a `kubernetes.io/tls`
/// Secret plus the CA.
pub const FILE_NAMES: [&str; 4] = ["ca.crt", "ca.key", "tls.crt", "tls.key"];

/// PEM-encoded CA certificate and serving certificate with its key.
pub struct GeneratedCerts {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub service: String,
    pub namespace: String,
    /// Extra DNS names or IP addresses (e.g. `127.0.0.1` for a webhook on loopback).
    pub extra_names: Vec<String>,
    pub valid_days: u32,
}

impl CertRequest {
    /// The names the API server uses to reach a webhook Service.
    pub fn dns_names(&self) -> Vec<String> {
        let mut names = vec![
            self.service.clone(),
            format!("{}.{}", self.service, self.namespace),
            format!("{}.{}.svc", self.service, self.namespace),
            format!("{}.{}.svc.cluster.local", self.service, self.namespace),
        ];
        names.extend(self.extra_names.iter().cloned());
        names
    }
}

/// Generates a fresh CA and a serving certificate signed by it.
pub fn generate(request: &CertRequest) -> Result<GeneratedCerts, CertsError> {
    for (flag, value) in [
        ("--service", &request.service),
        ("--namespace", &request.namespace),
    ] {
        if !crate::names::is_dns_label(value) {
            return Err(CertsError::Invalid(format!(
                "{flag} {value:?} is not {}",
                crate::names::DNS_LABEL_RULE
            )));
        }
    }
    if request.valid_days == 0 {
        return Err(CertsError::Invalid("--days must be at least 1".into()));
    }
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("dkron-ha CA ({})", request.namespace),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - Duration::hours(1);
    // The CA outlives the serving certificates it signs, so rotation can overlap.
    ca_params.not_after = now + Duration::days(i64::from(request.valid_days) * 10);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(request.dns_names())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{}.{}.svc", request.service, request.namespace),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(request.valid_days));
    let cert = params.signed_by(&key, &issuer)?;

    Ok(GeneratedCerts {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl GeneratedCerts {
    /// Writes `ca.crt`, `ca.key`, `tls.crt`, `tls.key` ([`FILE_NAMES`]) into `dir` (keys with
    /// mode 0600). Refuses, writing nothing, when any of them exists already.
    pub fn write_to(&self, dir: &Path) -> Result<Vec<PathBuf>, CertsError> {
        self.write(dir, false)
    }

    /// As [`write_to`](Self::write_to), but replaces files that exist (`--force`).
    pub fn overwrite_in(&self, dir: &Path) -> Result<Vec<PathBuf>, CertsError> {
        self.write(dir, true)
    }

    /// All four files are first written to temporary files next to their targets, then renamed
    /// over them, so a failure leaves either nothing changed or (a failed rename, which is
    /// rare) some files new and the rest as they were, never a truncated file.
    fn write(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, CertsError> {
        let files = [
            (FILE_NAMES[0], &self.ca_cert_pem, false),
            (FILE_NAMES[1], &self.ca_key_pem, true),
            (FILE_NAMES[2], &self.cert_pem, false),
            (FILE_NAMES[3], &self.key_pem, true),
        ];
        if !overwrite {
            let existing =
                existing_files(dir).map_err(|(path, source)| CertsError::Write { path, source })?;
            if !existing.is_empty() {
                return Err(CertsError::Exists(existing));
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
        for (name, content, private) in files {
            let path = dir.join(name);
            let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            if let Err(source) = write_file(&temp, content, private) {
                let _ = std::fs::remove_file(&temp);
                for (temp, _) in &staged {
                    let _ = std::fs::remove_file(temp);
                }
                return Err(CertsError::Write { path, source });
            }
            staged.push((temp, path));
        }
        let mut written = Vec::new();
        for (i, (temp, path)) in staged.iter().enumerate() {
            if let Err(source) = std::fs::rename(temp, path) {
                for (temp, _) in &staged[i..] {
                    let _ = std::fs::remove_file(temp);
                }
                return Err(CertsError::Write {
                    path: path.clone(),
                    source,
                });
            }
            written.push(path.clone());
        }
        // The renames themselves reach the disk with the directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(written)
    }
}

/// Which of [`FILE_NAMES`] exist in `dir` (a symlink counts, even a dangling one).
fn existing_files(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut existing = Vec::new();
    for name in FILE_NAMES {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => existing.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // `dir` is a file: then nothing is inside it, and creating it fails later.
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {}
            Err(e) => return Err((path, e)),
        }
    }
    Ok(existing)
}

/// A new file (an older one of that name is removed first) with `content`, flushed to disk;
/// mode 0600 when `private`.
fn write_file(path: &Path, content: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn request(service: &str, namespace: &str) -> CertRequest {
        CertRequest {
            service: service.into(),
            namespace: namespace.into(),
            extra_names: vec![],
            valid_days: 1,
        }
    }

    #[test]
    fn generate_wants_dns_labels() {
        assert!(generate(&request("dkron-ha", "ns-1")).is_ok());
        for (service, namespace, flag) in [
            ("Dkron", "ns", "--service"),
            ("x", "a_b", "--namespace"),
            ("", "ns", "--service"),
        ] {
            let error = generate(&request(service, namespace)).err().unwrap();
            assert!(error.to_string().contains(flag), "{error}");
            assert!(error.to_string().contains("DNS-1123"), "{error}");
        }
    }

    #[test]
    fn write_to_refuses_existing_files_and_overwrite_in_replaces_them_with_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let certs = generate(&request("x", "y")).unwrap();
        std::fs::write(dir.path().join("tls.crt"), "old").unwrap();
        std::fs::write(dir.path().join("ca.key"), "old").unwrap();
        std::fs::set_permissions(
            dir.path().join("ca.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();

        let error = certs.write_to(dir.path()).err().unwrap();
        assert!(
            matches!(&error, CertsError::Exists(p) if p.len() == 2),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("ca.key") && message.contains("tls.crt"),
            "{message}"
        );
        assert!(
            !message.contains("ca.crt") && message.contains("--force"),
            "{message}"
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.key", "tls.crt"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(),
            "old"
        );

        certs.overwrite_in(dir.path()).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, FILE_NAMES, "no temporary file left behind");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.key")).unwrap(),
            certs.ca_key_pem
        );
        for key in ["ca.key", "tls.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
}

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
    #[error("{0}")]
    Invalid(String),
}

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
    if request.service.is_empty() || request.namespace.is_empty() {
        return Err(CertsError::Invalid(
            "--service and --namespace must not be empty".into(),
        ));
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
    /// Writes `ca.crt`, `ca.key`, `tls.crt`, `tls.key` into `dir` (keys with mode 0600),
    /// the file names of a `kubernetes.io/tls` Secret plus the CA.
    pub fn write_to(&self, dir: &Path) -> Result<Vec<PathBuf>, CertsError> {
        std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let files = [
            ("ca.crt", &self.ca_cert_pem, false),
            ("ca.key", &self.ca_key_pem, true),
            ("tls.crt", &self.cert_pem, false),
            ("tls.key", &self.key_pem, true),
        ];
        let mut written = Vec::new();
        for (name, content, private) in files {
            let path = dir.join(name);
            write_file(&path, content, private).map_err(|source| CertsError::Write {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
        Ok(written)
    }
}

fn write_file(path: &Path, content: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(content.as_bytes())
}

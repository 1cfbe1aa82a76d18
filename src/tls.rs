//! Serving TLS with certificate hot-reload.
//!
//! The certificate and key are re-read when their content changes. Paths are opened anew on
//! every check, so a Kubernetes Secret volume, which swaps its `..data` symlink to a new
//! directory, is followed. A broken pair (half-written, mismatched) is logged and the previous
//! certificate keeps serving.

use rustls::ServerConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("private key {path} is not usable: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate and key do not belong together: {0}")]
    Mismatch(#[source] rustls::Error),
}

/// A certificate/key pair read from disk, with a fingerprint of the files' bytes.
struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: [u8; 32],
}

/// A [`ResolvesServerCert`] that always hands out the newest valid pair from disk.
/// Kept by hand: axum-server's `RustlsConfig::reload_from_pem_file` reloads only when called
/// and replaces the whole config, with no watch and no content fingerprint to skip unchanged files.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    parse_pair(cert_path, &read(cert_path)?, key_path, &read(key_path)?)
}

/// Parses a pair already read from `cert_path` and `key_path` (named in errors).
fn parse_pair(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Loaded, TlsError> {
    let fingerprint = fingerprint(cert_pem, key_pem);
    let bad = |path: &Path, e: std::io::Error| TlsError::BadPem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| bad(key_path, e))?
        .ok_or_else(|| TlsError::NoKey {
            path: key_path.to_path_buf(),
        })?;
    let signing_key = any_supported_type(&key).map_err(|source| TlsError::BadKey {
        path: key_path.to_path_buf(),
        source,
    })?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(TlsError::Mismatch)?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint,
    })
}

fn fingerprint(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

impl ReloadingCert {
    /// Loads the pair once; fails if the initial pair is unusable.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Self, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let loaded = load(&cert_path, &key_path)?;
        Ok(Self {
            cert_path,
            key_path,
            current: RwLock::new((loaded.key, loaded.fingerprint)),
        })
    }

    /// Re-reads the files; swaps the served pair when they changed and are valid.
    /// Returns whether a new pair is now served.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let cert_pem = read(&self.cert_path)?;
        let key_pem = read(&self.key_path)?;
        let seen = fingerprint(&cert_pem, &key_pem);
        if self.current.read().map(|c| c.1 == seen).unwrap_or(false) {
            return Ok(false);
        }
        let loaded = parse_pair(&self.cert_path, &cert_pem, &self.key_path, &key_pem)?;
        if let Ok(mut current) = self.current.write() {
            *current = (loaded.key, loaded.fingerprint);
        }
        Ok(true)
    }

    /// Polls the files every `interval` until the process ends.
    pub fn watch(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.reload()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(cert = %self.cert_path.display(), "serving a new TLS certificate")
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "TLS certificate not reloaded; the previous one keeps serving")
                    }
                    Err(error) => tracing::error!(%error, "TLS reload task failed"),
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// A rustls server config: TLS 1.3 and 1.2 only, HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

//! TLS for the registry listener: rustls, HTTP/2 or HTTP/1.1 by ALPN, and a certificate that is re-read when
//! its files change (cert-manager and Kubernetes Secret volumes replace them in place).

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why the certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or holds no PEM item of the right kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key does not suit rustls or the certificate.
    #[error("TLS key: {0}")]
    Key(String),
}

/// Accepts TLS connections with the current certificate.
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

impl Acceptor {
    /// Loads the certificate chain and key (blocking; at start-up) and starts watching the files, when
    /// called within a Tokio runtime.
    pub fn new(cert: &Path, key: &Path) -> Result<Acceptor, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(Reloading {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider: provider.clone(),
            current: RwLock::new(load(cert, key, &provider)?),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(watch(Arc::downgrade(&resolver)));
        }
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Key(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Acceptor { inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }

    /// Runs the server side of a handshake on `io`.
    pub fn accept<IO>(&self, io: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.inner.accept(io)
    }
}

/// What identifies a version of the files: modification times and lengths.
type Stamp = [(Option<SystemTime>, u64); 2];

struct Loaded {
    stamp: Stamp,
    key: Arc<CertifiedKey>,
}

struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap().key.clone())
    }
}

/// Checks the files every [`RELOAD_CHECK`] on the blocking pool until the acceptor is gone. A half-written
/// or broken pair keeps the previous certificate in service.
async fn watch(resolver: std::sync::Weak<Reloading>) {
    loop {
        tokio::time::sleep(RELOAD_CHECK).await;
        let Some(r) = resolver.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || {
            let now = stamp(&r.cert, &r.key);
            if now == r.current.read().unwrap().stamp {
                return;
            }
            match load(&r.cert, &r.key, &r.provider) {
                Ok(loaded) => {
                    *r.current.write().unwrap() = loaded;
                    tracing::info!(cert = %r.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    // Remember this version so the warning is not repeated every check.
                    r.current.write().unwrap().stamp = now;
                    tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the previous one");
                }
            }
        })
        .await;
        if result.is_err() {
            return;
        }
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0));
    [one(cert), one(key)]
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded, Error> {
    let file_err = |p: &Path, reason: String| Error::File { path: p.display().to_string(), reason };
    let stamp = stamp(cert, key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let signing = provider.key_provider.load_private_key(der).map_err(|e| Error::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| Error::Key(e.to_string()))?;
    Ok(Loaded { stamp, key: Arc::new(certified) })
}

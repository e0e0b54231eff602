//! TLS on the gRPC port: the acceptor built from `tls_cert`, `tls_key` and `tls_client_ca`,
//! and the certificate resolver that re-reads the certificate and key when their files change.
//! The handshakes themselves run in `conn`, each in its own task and within a deadline.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
    },
};

use crate::Config;

/// How often, at most, a new connection makes the resolver look at the files.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The process's provider if one was installed, else *ring*'s (the one tonic's own TLS uses):
/// *ring* builds without a C toolchain, at the price of no post-quantum key exchange.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    #[allow(deprecated)]
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// The acceptor of the configured TLS, or `None` without `tls_cert`. Fails, naming the file, if
/// a file cannot be read or holds no valid PEM.
pub fn acceptor(config: &Config) -> anyhow::Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let provider = provider();
    let resolver = Arc::new(ReloadingCert::new(cert.clone(), key.clone(), provider.clone())?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.tls_client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("invalid CA certificate in tls_client_ca {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("cannot verify clients with tls_client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(resolver);
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// The server's certificate and key, re-read when either file changes (looked at by the
/// handshakes, no more than once per [`RELOAD_CHECK`]). A pair that
/// does not load leaves the previous one in use.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
    check_every: Duration,
}

struct Seen {
    checked: Instant,
    stamp: Stamp,
}

/// The files' contents: comparing them, unlike modification times, misses no change made
/// within the file system's timestamp granularity. They are a few kilobytes.
type Stamp = [Option<Vec<u8>>; 2];

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair now; errors name the file at fault.
    pub fn new(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let stamp = stamp(&cert, &key);
        let current = load_pair(&cert, &key, &provider)?;
        Ok(Self {
            cert,
            key,
            provider,
            current: RwLock::new(Arc::new(current)),
            seen: Mutex::new(Seen {
                checked: Instant::now(),
                stamp,
            }),
            check_every: RELOAD_CHECK,
        })
    }

    /// The pair in use, after re-reading the files if they changed since the last look (and
    /// that look is old enough).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.reload_if_changed();
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn reload_if_changed(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.checked.elapsed() < self.check_every {
            return;
        }
        seen.checked = Instant::now();
        let stamp = stamp(&self.cert, &self.key);
        if stamp == seen.stamp {
            return;
        }
        // Remembered even when the load fails: a bad pair is reported once, not per check.
        seen.stamp = stamp;
        match load_pair(&self.cert, &self.key, &self.provider) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                tracing::info!(cert = %self.cert.display(), key = %self.key.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "TLS certificate files changed but do not load; keeping the previous certificate"
            ),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    [std::fs::read(cert).ok(), std::fs::read(key).ok()]
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate in {}", path.display());
    Ok(certs)
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read a private key from {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        anyhow::anyhow!(
            "the private key {} does not fit the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("aiki-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for localhost, and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn config(dir: &Dir) -> Config {
        Config {
            tls_cert: Some(dir.0.join("server.pem")),
            tls_key: Some(dir.0.join("server.key")),
            ..Config::default()
        }
    }

    fn failure(c: &Config) -> String {
        match acceptor(c) {
            Ok(_) => panic!("the TLS settings were accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn unreadable_or_invalid_files_are_named() {
        let dir = Dir::new("invalid");
        let c = config(&dir);
        let e = failure(&c);
        assert!(e.contains("server.pem"), "{e}");

        let (cert, key) = pair();
        std::fs::write(dir.0.join("server.pem"), &cert).unwrap();
        std::fs::write(dir.0.join("server.key"), "not a key").unwrap();
        let e = failure(&c);
        assert!(e.contains("server.key"), "{e}");

        std::fs::write(dir.0.join("server.key"), &key).unwrap();
        assert!(acceptor(&c).unwrap().is_some());
        let with_ca = Config {
            tls_client_ca: Some(dir.0.join("clients.pem")),
            ..c
        };
        let e = failure(&with_ca);
        assert!(e.contains("clients.pem"), "{e}");
    }

    #[test]
    fn reloads_a_changed_pair_and_keeps_the_old_one_when_the_new_one_is_invalid() {
        let dir = Dir::new("reload");
        let (cert_path, key_path) = (dir.0.join("server.pem"), dir.0.join("server.key"));
        let (cert, key) = pair();
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        let mut resolver = ReloadingCert::new(cert_path.clone(), key_path.clone(), provider()).unwrap();
        resolver.check_every = Duration::ZERO;
        let first = resolver.current();

        // A certificate without its key: not taken.
        let (cert2, key2) = pair();
        std::fs::write(&cert_path, &cert2).unwrap();
        assert_eq!(resolver.current().cert, first.cert);
        std::fs::write(&key_path, "garbage").unwrap();
        assert_eq!(resolver.current().cert, first.cert);

        // The whole new pair: taken.
        std::fs::write(&key_path, &key2).unwrap();
        let second = resolver.current();
        assert_ne!(second.cert, first.cert);
        assert_eq!(second.cert[0].as_ref(), rustls_pem_der(&cert2).as_slice());
    }

    fn rustls_pem_der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }
}

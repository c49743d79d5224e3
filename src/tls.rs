//! TLS: the certificate and key from PEM files, ALPN offering HTTP/2 then HTTP/1.1, and a
//! reload (on SIGHUP) that swaps the certificate for new handshakes without touching the
//! connections already open.
//!
//! rustls (with the *ring* provider) does all the cryptography; this file only reads files
//! and hands rustls the current certificate. A bad file is refused with one line naming it,
//! at start (the server does not start) and at reload (the old certificate stays).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// ALPN protocols offered, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The server's TLS settings: the acceptor for new connections, and what reloads its
/// certificate.
#[derive(Clone)]
pub struct Tls {
    /// Accepts TLS connections with the current certificate.
    pub acceptor: TlsAcceptor,
    current: Arc<Current>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.current.cert)
            .field("key", &self.current.key)
            .finish()
    }
}

/// The certificate handed to every new handshake, replaced on reload.
struct Current {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    certified: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current").field("cert", &self.cert).finish()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.certified
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl Tls {
    /// Reads the certificate chain and key (PEM) and builds the acceptor. `Err` is one line
    /// naming the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let provider = Arc::new(ring::default_provider());
        let certified = read_pair(cert, key, &provider)?;
        let current = Arc::new(Current {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider: provider.clone(),
            certified: RwLock::new(certified),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up failed: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
        })
    }

    /// Reads the files again; new handshakes use the new certificate, open connections keep
    /// theirs. On `Err` (one line naming the file) the old certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let current = &self.current;
        let certified = read_pair(&current.cert, &current.key, &current.provider)?;
        *current.certified.write().unwrap_or_else(|e| e.into_inner()) = certified;
        Ok(())
    }
}

/// The certificate chain in `cert` with the private key in `key`, checked to match.
fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!(
            "--tls-key {}: not a usable key for --tls-cert {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(certified))
}

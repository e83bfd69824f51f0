//! TLS for every hop: rustls client and server configurations, and the small certificate
//! authority the proxy (for kubectl on 127.0.0.1) and `relay --dev-self-signed` generate.

mod certs;
pub mod reload;

pub use certs::{fingerprint_sha256, CertificateAuthority, IssuedCert};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected}; expected a PEM file with '-----BEGIN {expected}'")]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} is not valid PEM")]
    BadPem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate authority file {path} was rejected by the TLS library")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("no trusted root certificates: the system store is empty and no CA file was given")]
    NoRoots,
    #[error("TLS configuration rejected")]
    Config(#[from] rustls::Error),
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
}

/// The one crypto provider of the process, passed explicitly so no global default is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts the system roots plus, when given, the certificates in
/// `extra_ca` (a corporate TLS-inspection CA or a self-hosted relay's CA).
pub fn client_config(
    extra_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    // A broken system bundle is not fatal when the user named their own CA.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in read_certs(path, "CA")? {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    client_config_with_roots(roots, alpn)
}

/// A client configuration trusting exactly `roots` (used where the CA is known, such as the
/// apiserver's cluster CA).
pub fn client_config_with_roots(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A PEM certificate chain and private key, parsed.
pub(crate) fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            what: "certificate",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::BadPem {
        what: "private key",
        source,
    })?;
    Ok((certs, key))
}

/// A server configuration from PEM certificate chain and key.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = parse_pair(cert_pem, key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Reads a PEM file into the bytes `server_config` wants, naming the file on failure.
pub fn read_pem_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Root store holding the certificates of a PEM bundle (e.g. a kubeconfig's CA data).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|source| TlsError::BadPem {
            what: "CA bundle",
            source,
        })?;
        roots.add(cert)?;
    }
    Ok(roots)
}

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

//! A server certificate that follows its files: cert-manager and ACME clients renew the
//! certificate and key in place, and the next handshake presents the new pair while the
//! established connections carry on. A pair that does not load (a half-written renewal, a key
//! that does not match) leaves the current one in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use super::{parse_pair, provider, read_pem_file, TlsError};

/// How often the files are looked at; renewals happen days ahead of expiry.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' bytes as last loaded (or last refused), to notice a change.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let cert = read_pem_file(cert_path, "TLS certificate")?;
        let key = read_pem_file(key_path, "TLS key")?;
        let certified = certified_key(&cert, &key)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new((cert, key)),
        }))
    }

    /// A server configuration presenting the current pair at every handshake.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// Re-reads the files: `Ok(true)` when a new pair is now in use, `Ok(false)` when they
    /// are unchanged, an error (and the current pair kept) when changed files do not load.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let cert = read_pem_file(&self.cert_path, "TLS certificate")?;
        let key = read_pem_file(&self.key_path, "TLS key")?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.0 == cert && seen.1 == key {
                return Ok(false);
            }
            // Refused contents are not retried (nor reported) until they change again.
            *seen = (cert.clone(), key.clone());
        }
        let certified = certified_key(&cert, &key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        Ok(true)
    }

    /// Reloads every [`POLL_INTERVAL`] until `stop`, logging each change and each refusal.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
            self.reload_and_log();
        }
    }

    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(true) => {
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded; new handshakes present it")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(cert = %self.cert_path.display(), error = %chain(&e), "TLS certificate files changed but do not load; still presenting the previous certificate")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The error and its causes on one line (`tunnel::http::error_chain` lives above this layer).
fn chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let (certs, key) = parse_pair(cert_pem, key_pem)?;
    if certs.is_empty() {
        return Err(TlsError::Config(rustls::Error::General(
            "the certificate file holds no certificate".into(),
        )));
    }
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::CertificateAuthority;

    #[test]
    fn a_changed_pair_is_taken_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let ca = CertificateAuthority::generate("test").unwrap();
        let first = ca.issue_server(&["relay.test"]).unwrap();
        std::fs::write(&cert, &first.cert_pem).unwrap();
        std::fs::write(&key, &first.key_pem).unwrap();
        let reloading = ReloadingCert::load(&cert, &key).unwrap();
        let presented = |r: &ReloadingCert| r.current.read().unwrap().cert[0].to_vec();
        let before = presented(&reloading);
        assert!(!reloading.reload().unwrap());
        // A certificate renewed but its key not yet: refused, the old pair stays.
        let second = ca.issue_server(&["relay.test"]).unwrap();
        std::fs::write(&cert, &second.cert_pem).unwrap();
        assert!(reloading.reload().is_err());
        assert_eq!(presented(&reloading), before);
        std::fs::write(&key, &second.key_pem).unwrap();
        assert!(reloading.reload().unwrap());
        assert_ne!(presented(&reloading), before);
    }
}

//! The proxy's local certificate authority, kept under the user's config dir so the CA in the
//! kubeconfig stays valid across restarts; the server certificate is issued fresh each start.

use std::path::{Path, PathBuf};

use crate::tls::{CertificateAuthority, IssuedCert, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("cannot use config dir {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local CA in {path} is damaged; delete that directory's local-ca files to regenerate")]
    Damaged {
        path: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// `$CLUSTERCONNECT_CONFIG_DIR`, else `$XDG_CONFIG_HOME/clusterconnect`, else `~/.config/clusterconnect`.
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLUSTERCONNECT_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("clusterconnect");
    }
    super::kubeconfig::home_dir()
        .join(".config")
        .join("clusterconnect")
}

/// Loads the CA from `dir`, creating it on first use, and issues a certificate for loopback.
pub fn load_or_create(dir: &Path) -> Result<(CertificateAuthority, IssuedCert), LocalCaError> {
    let io = |source| LocalCaError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let cert_path = dir.join("local-ca.crt");
    let key_path = dir.join("local-ca.key");
    let ca = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => {
            CertificateAuthority::from_pem(cert, key).map_err(|source| LocalCaError::Damaged {
                path: dir.to_path_buf(),
                source,
            })?
        }
        _ => {
            std::fs::create_dir_all(dir).map_err(io)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
            }
            let ca = CertificateAuthority::generate("clusterconnect local proxy CA")?;
            super::kubeconfig::write_private(&key_path, ca.key_pem().as_bytes()).map_err(|e| {
                LocalCaError::Io {
                    path: key_path.clone(),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            super::kubeconfig::write_private(&cert_path, ca.cert_pem().as_bytes()).map_err(
                |e| LocalCaError::Io {
                    path: cert_path.clone(),
                    source: std::io::Error::other(e.to_string()),
                },
            )?;
            ca
        }
    };
    let leaf = ca.issue_server(&["127.0.0.1", "localhost", "::1"])?;
    Ok((ca, leaf))
}

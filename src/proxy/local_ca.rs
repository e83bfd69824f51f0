//! The proxy's local certificate authority, kept under the user's config dir so the CA in the
//! kubeconfig stays valid across restarts; the server certificate is issued fresh each start.
//! Both files go through [`crate::files::write_private`] (mode 0600, atomic, no symlink
//! followed at the temporary name), and a proxy creating the CA holds `local-ca.lock`, so two
//! proxies started together cannot each write half of a key pair.

use std::path::{Path, PathBuf};

use crate::files::{self, LockError, LockFile};
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
    #[error(
        "{lock} exists, so another clusterconnect is creating the local CA; if none is, remove {lock}"
    )]
    Locked { lock: PathBuf },
    #[error("cannot lock the local CA in {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: LockError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    let ca = match load(dir)? {
        Some(ca) => ca,
        None => create(dir)?,
    };
    let leaf = ca.issue_server(&["127.0.0.1", "localhost", "::1"])?;
    Ok((ca, leaf))
}

/// The CA in `dir`, or `None` when either file is missing or unreadable.
fn load(dir: &Path) -> Result<Option<CertificateAuthority>, LocalCaError> {
    let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(dir.join(CERT_FILE)),
        std::fs::read_to_string(dir.join(KEY_FILE)),
    ) else {
        return Ok(None);
    };
    CertificateAuthority::from_pem(cert, key)
        .map(Some)
        .map_err(|source| LocalCaError::Damaged {
            path: dir.to_path_buf(),
            source,
        })
}

const CERT_FILE: &str = "local-ca.crt";
const KEY_FILE: &str = "local-ca.key";

/// Creates the CA under `local-ca.lock`, unless a proxy that held the lock first already did.
fn create(dir: &Path) -> Result<CertificateAuthority, LocalCaError> {
    let io = |source| LocalCaError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let _lock = LockFile::acquire(&dir.join("local-ca"), super::kubeconfig::LOCK_WAIT).map_err(
        |e| match e {
            LockError::Busy { lock, .. } => LocalCaError::Locked { lock },
            source => LocalCaError::Lock {
                path: dir.to_path_buf(),
                source,
            },
        },
    )?;
    if let Some(ca) = load(dir)? {
        return Ok(ca);
    }
    let ca = CertificateAuthority::generate("clusterconnect local proxy CA")?;
    for (name, pem) in [(KEY_FILE, ca.key_pem()), (CERT_FILE, ca.cert_pem())] {
        let path = dir.join(name);
        files::write_private(&path, pem.as_bytes())
            .map_err(|source| LocalCaError::Write { path, source })?;
    }
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_files_once_and_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("cc");
        let (first, _) = load_or_create(&ca_dir).unwrap();
        let (second, _) = load_or_create(&ca_dir).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&ca_dir), 0o700);
            assert_eq!(mode(&ca_dir.join(KEY_FILE)), 0o600);
            assert_eq!(mode(&ca_dir.join(CERT_FILE)), 0o600);
        }
        let mut names: Vec<_> = std::fs::read_dir(&ca_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [CERT_FILE, KEY_FILE]);
    }

    #[test]
    fn proxies_starting_together_share_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("cc");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let d = ca_dir.clone();
                std::thread::spawn(move || load_or_create(&d).unwrap().0.cert_pem().to_string())
            })
            .collect();
        let certs: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(certs.windows(2).all(|w| w[0] == w[1]));
    }
}

//! The `--mount-dir` layout: one file per object, named by its alias or name, as the CSI driver
//! lays out `/mnt/secrets-store`. Files are written atomically with mode 0600, and only when
//! their content changed, so watchers (and mtimes) see rotations and nothing else.

use std::path::{Path, PathBuf};

use crate::files::write_private;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount directory {path}; check the path and its permissions")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}; check that the directory is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `content` to `dir/name` unless the file already holds exactly that. Returns whether
/// it wrote.
pub fn write_file(dir: &Path, name: &str, content: &[u8]) -> Result<bool, MountError> {
    std::fs::create_dir_all(dir).map_err(|source| MountError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    restrict_dir(dir);
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|current| current == content) {
        return Ok(false);
    }
    write_private(&path, content).map_err(|source| MountError::Write { path, source })?;
    Ok(true)
}

/// The directory holds secrets: owner only, as far as the owner allows us to set it.
fn restrict_dir(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot restrict the mount directory to its owner");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_rewritten_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("secrets-store");
        assert!(write_file(&mount, "DemoSecret", b"one").unwrap());
        let path = mount.join("DemoSecret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(!write_file(&mount, "DemoSecret", b"one").unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        assert!(write_file(&mount, "DemoSecret", b"two").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}

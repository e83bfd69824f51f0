//! Writing files that hold secrets, and the lock files that keep two writers of one file apart.
//!
//! [`write_private`] replaces a file atomically and readable by the owner only: the bytes go to a
//! fresh temporary file with a random name in the same directory (created exclusively, never
//! through a symlink, mode 0600), which is synced, renamed over the target, and the directory
//! synced, so a crash leaves the old file or the new one, never half of one. It replaces the
//! path itself: when the target is a symlink the link is replaced, so callers that mean to
//! update the link's target resolve it first with [`resolve_symlinks`].
//!
//! [`LockFile`] is kubectl's own convention for a kubeconfig (client-go creates `<file>.lock`
//! with `O_CREAT|O_EXCL` and removes it afterwards), usable for any file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

/// How many random temporary names to try before giving up; a clash means someone else is
/// creating files with our pattern in that directory, so a few tries tell that from bad luck.
const TEMP_NAME_ATTEMPTS: usize = 8;

/// Symlink hops followed by [`resolve_symlinks`] before it reports a loop (the kernel's own
/// limit, ELOOP, is 40).
const MAX_SYMLINK_HOPS: usize = 40;

/// First and largest pause between attempts to take a held lock; the pause doubles, with
/// jitter so two waiters do not retry in step.
const LOCK_RETRY_FIRST: Duration = Duration::from_millis(20);
const LOCK_RETRY_MAX: Duration = Duration::from_millis(250);

/// Writes `bytes` to `path` atomically with mode 0600, creating the directory if needed.
/// A symlink at `path` is replaced, not followed (see the module docs).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let (tmp, mut file) = create_temp(dir, &file_name)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A new private file `.<name>.<random>.tmp` in `dir`, never one that already exists.
fn create_temp(dir: &Path, file_name: &str) -> std::io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let suffix: u64 = rand::rng().random();
        let tmp = dir.join(format!(".{file_name}.{suffix:016x}.tmp"));
        match create_new_private(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name available")))
}

/// Creates `path` for writing, mode 0600, failing if anything (a symlink included) is there:
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so nothing planted at the name is ever written through.
fn create_new_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    }
    options.open(path)
}

/// Makes the rename durable: on Linux a renamed entry survives a crash only once its
/// directory is synced.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The file `path` finally names after following symlinks (relative links resolve against
/// the link's directory); `path` itself when it is not a symlink or does not exist. A dangling
/// link resolves to the missing target, so writing there creates the file the link points to.
pub fn resolve_symlinks(path: &Path) -> std::io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&current)?;
                current = if target.is_absolute() {
                    target
                } else {
                    parent_dir(&current).join(target)
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "{}: more than {MAX_SYMLINK_HOPS} symlinks in a row (a loop?)",
        path.display()
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is held by another writer (waited {}s)", lock.display(), waited.as_secs_f32().round())]
    Busy { lock: PathBuf, waited: Duration },
    #[error("cannot create lock file {}", lock.display())]
    Create {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `<file>.lock`, held while it exists; removed when dropped, so every way out releases it.
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
}

impl LockFile {
    /// The lock file guarding `file`, as kubectl names it.
    pub fn path_for(file: &Path) -> PathBuf {
        let mut name = file.as_os_str().to_os_string();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the lock for `file`, retrying with jittered back-off while another process holds
    /// it, for at most `max_wait`. The directory is created if missing (as kubectl does).
    pub fn acquire(file: &Path, max_wait: Duration) -> Result<LockFile, LockError> {
        let lock = Self::path_for(file);
        let create = |source| LockError::Create {
            lock: lock.clone(),
            source,
        };
        std::fs::create_dir_all(parent_dir(&lock)).map_err(create)?;
        let started = Instant::now();
        let mut pause = LOCK_RETRY_FIRST;
        loop {
            match create_new_private(&lock) {
                Ok(_) => return Ok(LockFile { path: lock }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let waited = started.elapsed();
                    let Some(left) = max_wait.checked_sub(waited).filter(|l| !l.is_zero()) else {
                        return Err(LockError::Busy { lock, waited });
                    };
                    let jittered = pause.mul_f64(rand::rng().random_range(0.5..1.5));
                    std::thread::sleep(jittered.min(left));
                    pause = (pause * 2).min(LOCK_RETRY_MAX);
                }
                Err(e) => return Err(create(e)),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(lock = %self.path.display(), error = %e, "cannot remove lock file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_atomically_with_mode_0600_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        assert_eq!(names(path.parent().unwrap()), ["secret"]);
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_file_with_wider_mode_ends_up_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn never_writes_through_a_symlink_at_the_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let planted = dir.path().join(".secret.planted.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = create_new_private(&planted).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        // A dangling link too: O_EXCL refuses it rather than creating its target.
        let missing = dir.path().join("missing");
        let dangling = dir.path().join(".secret.dangling.tmp");
        std::os::unix::fs::symlink(&missing, &dangling).unwrap();
        assert!(create_new_private(&dangling).is_err());
        assert!(!missing.exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory at the target: the rename fails after the temp file exists.
        let path = dir.path().join("target");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        assert!(write_private(&path, b"bytes").is_err());
        assert_eq!(names(dir.path()), ["target"]);
    }

    #[cfg(unix)]
    #[test]
    fn resolves_chains_of_relative_and_absolute_links() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("dotfiles").join("kubeconfig");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::write(&real, "x").unwrap();
        let hop = dir.path().join("hop");
        std::os::unix::fs::symlink("dotfiles/kubeconfig", &hop).unwrap();
        let link = dir.path().join("config");
        std::os::unix::fs::symlink(&hop, &link).unwrap();
        assert_eq!(
            resolve_symlinks(&link).unwrap(),
            dir.path().join("dotfiles/kubeconfig")
        );
        assert_eq!(resolve_symlinks(&real).unwrap(), real);
        let absent = dir.path().join("absent");
        assert_eq!(resolve_symlinks(&absent).unwrap(), absent);
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        assert!(resolve_symlinks(&looped).is_err());
    }

    #[test]
    fn a_held_lock_waits_then_fails_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        let held = LockFile::acquire(&file, Duration::ZERO).unwrap();
        assert_eq!(held.path(), dir.path().join("config.lock"));
        let started = Instant::now();
        let err = LockFile::acquire(&file, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, LockError::Busy { .. }), "{err}");
        drop(held);
        assert!(!dir.path().join("config.lock").exists());
        let again = LockFile::acquire(&file, Duration::ZERO).unwrap();
        drop(again);
    }

    #[test]
    fn a_lock_released_while_waiting_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        let held = LockFile::acquire(&file, Duration::ZERO).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let taken = LockFile::acquire(&file, Duration::from_secs(5)).unwrap();
        releaser.join().unwrap();
        assert!(taken.path().exists());
    }
}

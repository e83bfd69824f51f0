//! The relay's registry of connected clusters, in one redb file: every change is a committed,
//! fsynced transaction, so a crash never loses a registration. Each cluster also has its own
//! Listen and Send keys; the relay's authorization consults them next to its static rules.
//!
//! Every method but [`Store::rule`] does file I/O and blocks: the management API calls them
//! from a blocking worker (see `api`), never on a runtime thread. [`Store::rule`] is the relay's
//! hot path and only takes a read lock on the in-memory rules, which no file I/O holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::arm::ConnectedCluster;
use crate::relay::rule::Rule;
use crate::secret::Secret;

const CLUSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("connected_clusters");

/// Which step of reading or writing the registry file failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster registry {}: cannot open (is another relay using it?)", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cluster registry {}: cannot create it", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster registry {}: cannot open the file", .path.display())]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster registry {} is a symbolic link; the registry holds every cluster's keys, so it is opened only as a regular file: point registry_file at the link's target instead", .path.display())]
    Symlink { path: PathBuf },
    #[error("cluster registry {} is not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("cluster registry {}: cannot make it private", .path.display())]
    MakePrivate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster registry begin")]
    Begin(#[source] redb::TransactionError),
    #[error("cluster registry open table")]
    OpenTable(#[source] redb::TableError),
    #[error("cluster registry read")]
    Read(#[source] redb::StorageError),
    #[error("cluster registry scan")]
    Scan(#[source] redb::StorageError),
    #[error("cluster registry decode")]
    Decode(#[source] serde_json::Error),
    #[error("cluster registry encode")]
    Encode(#[source] serde_json::Error),
    #[error("cluster registry write")]
    Write(#[source] redb::StorageError),
    #[error("cluster registry delete")]
    Delete(#[source] redb::StorageError),
    #[error("cluster registry commit")]
    Commit(#[source] redb::CommitError),
    /// The NATS registry (relay replicas) did not answer: retryable, answered 503.
    #[error("the cluster registry (NATS) is unavailable: {0}; retry shortly")]
    Unavailable(String),
}

/// One registration as stored: the resource plus what only the relay knows.
#[derive(Clone, Serialize, Deserialize)]
pub struct Record {
    pub resource: ConnectedCluster,
    /// Principals (object ids) that own the registration; "admin" callers bypass this.
    pub owners: Vec<String>,
    /// Role assignments of the cluster user role (assignment id -> principal): those
    /// principals may get a Send token.
    #[serde(default)]
    pub assignments: std::collections::BTreeMap<String, String>,
    pub hybrid_connection: String,
    pub listen_key: String,
    /// The agent's second Listen key: renewed separately, so an agent can move to it while
    /// the other is renewed. Absent in registrations made before it existed.
    #[serde(default)]
    pub listen_key_secondary: Option<String>,
    pub send_key: String,
    /// Unix seconds of the last verified agent heartbeat, and its timestamp (replay guard).
    #[serde(default)]
    pub last_heartbeat: Option<u64>,
    #[serde(default)]
    pub last_report_timestamp: u64,
    /// The cluster's extension (`Microsoft.KubernetesConfiguration/extensions`); one per
    /// cluster, as Arc allows for the Key Vault Secrets Provider.
    #[serde(default)]
    pub extension: Option<crate::arm::Extension>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("id", &self.resource.id)
            .field("hybrid_connection", &self.hybrid_connection)
            .field("keys", &"***")
            .finish_non_exhaustive()
    }
}

impl Record {
    /// The rules this cluster adds to the relay, all scoped to its hybrid connection: Listen
    /// for its agent (primary and secondary key), Send for administrators' tokens, and one Send
    /// rule per principal that holds a role, keyed by a key derived for that principal alone, so
    /// that withdrawing the role removes the rule and with it every token minted for them.
    fn rules(&self) -> Vec<Rule> {
        let rule = |name: String, key: &str, listen: bool| Rule {
            name,
            key: Secret::new(key.to_string()),
            secondary_key: None,
            listen,
            send: !listen,
            manage: false,
            entity: Some(self.hybrid_connection.clone()),
        };
        let mut listen = rule(self.listen_rule(), &self.listen_key, true);
        listen.secondary_key = self
            .listen_key_secondary
            .as_deref()
            .map(|k| Secret::new(k.to_string()));
        let mut rules = vec![listen, rule(self.send_rule(), &self.send_key, false)];
        let principals: std::collections::BTreeSet<&String> = self
            .owners
            .iter()
            .chain(self.assignments.values())
            .collect();
        for principal in principals {
            let key = self.user_send_key(principal);
            rules.push(rule(self.user_send_rule(principal), key.expose(), false));
        }
        rules
    }

    pub fn listen_rule(&self) -> String {
        format!("{}-listen", self.hybrid_connection)
    }

    pub fn send_rule(&self) -> String {
        format!("{}-send", self.hybrid_connection)
    }

    /// The Send rule of one principal (an object id).
    pub fn user_send_rule(&self, principal: &str) -> String {
        format!(
            "{}-send.{}",
            self.hybrid_connection,
            principal.to_ascii_lowercase()
        )
    }

    /// HMAC-SHA256 of the principal under the cluster's Send key: only the relay can make it,
    /// and it exists only while the principal holds a role.
    pub fn user_send_key(&self, principal: &str) -> Secret {
        use base64::Engine;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.send_key.as_bytes());
        let tag = ring::hmac::sign(&key, principal.to_ascii_lowercase().as_bytes());
        Secret::new(base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
    }
}

/// The rules' names and keys, to tell whether a change touched any authorization.
fn fingerprint(rules: &[Rule]) -> Vec<(String, String, Option<String>)> {
    let mut rules: Vec<_> = rules
        .iter()
        .map(|r| {
            let secondary = r.secondary_key.as_ref().map(|k| k.expose().to_string());
            (r.name.clone(), r.key.expose().to_string(), secondary)
        })
        .collect();
    rules.sort();
    rules
}

/// What an [`Store::update`] does with the record it was shown.
pub enum Change {
    Keep,
    Put(Box<Record>),
    Delete,
}

/// Cheap to clone: the handle a blocking worker takes with it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Where the registrations live: one redb file (a single relay), or a NATS JetStream
/// key-value bucket that every relay replica shares (see `kv`).
enum Engine {
    File(Database),
    Nats(Box<super::kv::Kv>),
}

struct Inner {
    engine: Engine,
    /// The clusters' rules, kept in step with the store for the hot path. Written only after
    /// a commit (or, with NATS, a change seen by the watch), for as long as it takes to swap a
    /// few entries.
    rules: RwLock<Rules>,
    /// One writer at a time from transaction to rules update, so two changes cannot apply their
    /// rules out of commit order. redb serializes write transactions anyway, so it only makes
    /// the wait for the previous writer explicit; readers never take it. With NATS, writers on
    /// other replicas are ordered by the bucket's revisions instead.
    writer: Mutex<()>,
    /// The file's writes, numbered: the revision its rules are applied at.
    file_revision: std::sync::atomic::AtomicU64,
    /// Bumped after each change that adds, removes or re-keys a rule: open connections
    /// recheck what authorized them.
    changes: tokio::sync::watch::Sender<u64>,
}

/// The rules by name (the hot path) and, per registration, those it contributed and the
/// revision they come from, so a change seen twice (written here, then seen by the watch) or
/// late is applied once and never over a newer one.
#[derive(Default)]
struct Rules {
    by_name: HashMap<String, Rule>,
    by_key: HashMap<String, (u64, Vec<Rule>)>,
}

/// How often a compare-and-set write re-reads after another replica wrote the same record
/// first; past it, the call is answered 503 (many replicas fighting over one registration).
const MAX_CONFLICTS: u32 = 16;

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let file = open_file(path)?;
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let backend = redb::backends::FileBackend::new(file).map_err(open_error)?;
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(open_error)?;
        let txn = db.begin_write().map_err(StoreError::Begin)?;
        txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
        txn.commit().map_err(StoreError::Commit)?;
        let store = Store::with_engine(Engine::File(db));
        let all = store.all()?;
        for record in &all {
            store.apply(&record.resource.id.to_ascii_lowercase(), 0, Some(record));
        }
        tracing::info!(path = %path.display(), clusters = all.len(), "cluster registry open");
        Ok(store)
    }

    /// The registry in a NATS key-value bucket: loads every registration, then keeps the
    /// rules current with a watch that lives until `shutdown` (re-created with back-off when
    /// NATS goes away and comes back).
    pub async fn open_nats(
        kv: super::kv::Kv,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Store, StoreError> {
        let store = Store::with_engine(Engine::Nats(Box::new(kv.clone())));
        // Everything up to `last` is read now; the watch delivers what comes after.
        let last = kv.last_revision().await?;
        let loaded = {
            let store = store.clone();
            let kv = kv.clone();
            tokio::task::spawn_blocking(move || -> Result<usize, StoreError> {
                let all = kv.all()?;
                for record in &all {
                    let key = super::kv::encode_key(&record.resource.id.to_ascii_lowercase());
                    store.apply(&key, last, Some(record));
                }
                Ok(all.len())
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("load the registry: {e}")))??
        };
        tracing::info!(bucket = %kv.store.name, clusters = loaded, "cluster registry open (NATS)");
        tokio::spawn(watch(store.clone(), kv, last, shutdown));
        Ok(store)
    }

    fn with_engine(engine: Engine) -> Store {
        Store {
            inner: Arc::new(Inner {
                engine,
                rules: RwLock::new(Rules::default()),
                writer: Mutex::new(()),
                file_revision: std::sync::atomic::AtomicU64::new(0),
                changes: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Changes with every registry change that touches a rule or key.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub fn rule(&self, name: &str) -> Option<Rule> {
        self.inner
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_name
            .get(name)
            .cloned()
    }

    /// Makes `after` (at `revision`) the registration under `key` for the rules, unless a
    /// newer revision is already applied; wakes open connections when a rule or key changed.
    fn apply(&self, key: &str, revision: u64, after: Option<&Record>) {
        let new: Vec<Rule> = after.map(Record::rules).unwrap_or_default();
        let changed = {
            let mut rules = self.inner.rules.write().unwrap_or_else(|p| p.into_inner());
            if rules
                .by_key
                .get(key)
                .is_some_and(|(seen, _)| *seen > revision)
            {
                return;
            }
            let old = rules
                .by_key
                .insert(key.to_string(), (revision, new.clone()))
                .map(|(_, old)| old)
                .unwrap_or_default();
            if fingerprint(&old) == fingerprint(&new) {
                false
            } else {
                for rule in &old {
                    rules.by_name.remove(&rule.name);
                }
                for rule in new {
                    rules.by_name.insert(rule.name.clone(), rule);
                }
                true
            }
        };
        if changed {
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        match &self.inner.engine {
            Engine::File(db) => file_get(db, key),
            Engine::Nats(kv) => kv.read(key).map(|(record, _)| record),
        }
    }

    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        match &self.inner.engine {
            Engine::File(db) => file_all(db),
            Engine::Nats(kv) => kv.all(),
        }
    }

    /// Reads, changes and writes one registration atomically, so concurrent changes (a role
    /// grant, a heartbeat, a delete; on any replica) cannot undo each other. `f` sees the
    /// current record and decides; an `Err` from it changes nothing. With NATS, `f` runs again
    /// on a fresher record when another replica wrote first. Blocks on the commit (fsync or
    /// NATS round trip): call it from a blocking worker.
    pub fn update<R, E: From<StoreError>>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<Record>) -> Result<(Change, R), E>,
    ) -> Result<R, E> {
        let _writer = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        match &self.inner.engine {
            Engine::File(db) => {
                let (change, result) = file_update(db, key, &mut f)?;
                let revision = self
                    .inner
                    .file_revision
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                match &change {
                    Change::Keep => {}
                    Change::Put(record) => self.apply(key, revision, Some(record)),
                    Change::Delete => self.apply(key, revision, None),
                }
                Ok(result)
            }
            Engine::Nats(kv) => {
                for attempt in 1..=MAX_CONFLICTS {
                    let (before, revision) = kv.read(key)?;
                    let (change, result) = f(before)?;
                    let Some(written) = kv.write(key, revision, &change)? else {
                        // Another replica wrote it first: read again after a jittered pause
                        // that grows, so contending replicas do not retry in lockstep.
                        use rand::Rng;
                        let ms = rand::rng().random_range(1..=2 * u64::from(attempt));
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                        continue;
                    };
                    let encoded = super::kv::encode_key(key);
                    match &change {
                        Change::Keep => {}
                        Change::Put(record) => self.apply(&encoded, written, Some(record)),
                        Change::Delete => self.apply(&encoded, written, None),
                    }
                    return Ok(result);
                }
                Err(StoreError::Unavailable(format!(
                    "{key}: changed by other relay replicas {MAX_CONFLICTS} times while this change was being made"
                ))
                .into())
            }
        }
    }
}

/// Follows the bucket from just after `from`, applying each change to the rules; re-created
/// with jittered back-off when NATS drops it, from the last revision seen.
async fn watch(
    store: Store,
    kv: super::kv::Kv,
    mut from: u64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt;
    let mut backoff = crate::tunnel::backoff::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        let watched = tokio::select! {
            w = kv.store.watch_all_from_revision(from + 1) => w,
            () = shutdown.cancelled() => return,
        };
        match watched {
            Ok(mut entries) => loop {
                let next = tokio::select! {
                    n = entries.next() => n,
                    () = shutdown.cancelled() => return,
                };
                match next {
                    Some(Ok(entry)) => {
                        backoff.reset();
                        from = from.max(entry.revision);
                        let record = match entry.operation {
                            async_nats::jetstream::kv::Operation::Put => {
                                match super::kv::decode(&entry.value) {
                                    Ok(r) => Some(r),
                                    Err(e) => {
                                        tracing::warn!(key = %entry.key, error = %e, "undecodable registry entry ignored");
                                        continue;
                                    }
                                }
                            }
                            _ => None,
                        };
                        store.apply(&entry.key, entry.revision, record.as_ref());
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "registry watch failed; re-creating it");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot watch the registry bucket; retrying"),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn file_get(db: &Database, key: &str) -> Result<Option<Record>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::Begin)?;
    let table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
    let Some(value) = table.get(key).map_err(StoreError::Read)? else {
        return Ok(None);
    };
    decode(value.value()).map(Some)
}

fn file_all(db: &Database) -> Result<Vec<Record>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::Begin)?;
    let table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(StoreError::Scan)? {
        let (_, value) = entry.map_err(StoreError::Scan)?;
        out.push(decode(value.value())?);
    }
    Ok(out)
}

/// One write transaction: read, decide, write, commit.
fn file_update<R, E: From<StoreError>>(
    db: &Database,
    key: &str,
    f: &mut impl FnMut(Option<Record>) -> Result<(Change, R), E>,
) -> Result<(Change, R), E> {
    let txn = db.begin_write().map_err(StoreError::Begin)?;
    let (change, result) = {
        let mut table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
        let before = match table.get(key).map_err(StoreError::Read)? {
            Some(v) => Some(decode(v.value())?),
            None => None,
        };
        let (change, result) = f(before)?;
        write(&mut table, key, &change)?;
        (change, result)
    };
    txn.commit().map_err(StoreError::Commit)?;
    Ok((change, result))
}

/// The registry file, opened read-write and never through a symlink. A missing file is
/// created 0600 with `O_CREAT|O_EXCL|O_NOFOLLOW`, so it is never readable by others, not even
/// for a moment, and nothing planted at the name is written through; an existing regular file
/// is opened as it is and made private, as every cluster's keys are in it. redb then takes the
/// file (and its lock) from here.
fn open_file(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    }
    match options.clone().create_new(true).open(path) {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(StoreError::Create {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let refuse = |meta: &std::fs::Metadata| {
        if meta.file_type().is_symlink() {
            Err(StoreError::Symlink {
                path: path.to_path_buf(),
            })
        } else if !meta.is_file() {
            Err(StoreError::NotAFile {
                path: path.to_path_buf(),
            })
        } else {
            Ok(())
        }
    };
    let open_error = |source: std::io::Error| StoreError::OpenFile {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        refuse(&meta)?;
    }
    // O_NOFOLLOW makes a symlink swapped in since the check fail here (ELOOP).
    let file = options.open(path).map_err(|source| {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            StoreError::Symlink {
                path: path.to_path_buf(),
            }
        } else {
            open_error(source)
        }
    })?;
    refuse(&file.metadata().map_err(open_error)?)?;
    make_private(&file, path)?;
    Ok(file)
}

/// An existing file keeps its contents but not a looser mode: the handle is chmod'ed, not the
/// path, so no link is followed.
fn make_private(file: &std::fs::File, path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|source| StoreError::MakePrivate {
                path: path.to_path_buf(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(StoreError::Decode)
}

fn write(
    table: &mut redb::Table<'_, &str, &[u8]>,
    key: &str,
    change: &Change,
) -> Result<(), StoreError> {
    match change {
        Change::Keep => {}
        Change::Put(record) => {
            let bytes = serde_json::to_vec(record).map_err(StoreError::Encode)?;
            table
                .insert(key, bytes.as_slice())
                .map_err(StoreError::Write)?;
        }
        Change::Delete => {
            table.remove(key).map_err(StoreError::Delete)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn a_new_registry_file_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
        // Reopened as it is: same file, still private.
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_file_is_opened_and_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        drop(Store::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_at_the_path_is_refused_and_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        // A dangling link: following it would create the target.
        let target = dir.path().join("elsewhere.redb");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = Store::open(&path).err().expect("a symlink is refused");
        assert!(matches!(err, StoreError::Symlink { .. }), "{err:?}");
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert!(!target.exists(), "the link was followed");
        // A link to an existing registry is refused too, and the target left alone.
        drop(Store::open(&target).unwrap());
        assert!(matches!(
            Store::open(&path).err(),
            Some(StoreError::Symlink { .. })
        ));
    }

    #[test]
    fn a_directory_at_the_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("a directory is refused");
        assert!(
            matches!(
                err,
                StoreError::NotAFile { .. } | StoreError::OpenFile { .. }
            ),
            "{err:?}"
        );
    }
}

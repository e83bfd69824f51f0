//! The relay's registry of connected clusters, in one redb file: every change is a committed,
//! fsynced transaction, so a crash never loses a registration. Each cluster also has its own
//! Listen and Send keys; the relay's authorization consults them next to its static rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
    pub send_key: String,
    /// Unix seconds of the last verified agent heartbeat, and its timestamp (replay guard).
    #[serde(default)]
    pub last_heartbeat: Option<u64>,
    #[serde(default)]
    pub last_report_timestamp: u64,
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
    /// The two rules this cluster adds to the relay: Listen for its agent, Send for minting
    /// user tokens; both scoped to its hybrid connection.
    fn rules(&self) -> [Rule; 2] {
        [
            Rule {
                name: format!("{}-listen", self.hybrid_connection),
                key: Secret::new(self.listen_key.clone()),
                listen: true,
                send: false,
                manage: false,
                entity: Some(self.hybrid_connection.clone()),
            },
            Rule {
                name: format!("{}-send", self.hybrid_connection),
                key: Secret::new(self.send_key.clone()),
                listen: false,
                send: true,
                manage: false,
                entity: Some(self.hybrid_connection.clone()),
            },
        ]
    }
}

/// What an [`Store::update`] does with the record it was shown.
pub enum Change {
    Keep,
    Put(Box<Record>),
    Delete,
}

pub struct Store {
    db: Database,
    /// The clusters' rules by name, kept in step with the file for the hot path.
    rules: RwLock<HashMap<String, Rule>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        make_private(path)?;
        let txn = db.begin_write().map_err(StoreError::Begin)?;
        txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
        txn.commit().map_err(StoreError::Commit)?;
        let store = Store {
            db,
            rules: RwLock::new(HashMap::new()),
        };
        let all = store.all()?;
        let mut rules = store.rules.write().unwrap_or_else(|p| p.into_inner());
        for record in &all {
            for rule in record.rules() {
                rules.insert(rule.name.clone(), rule);
            }
        }
        drop(rules);
        tracing::info!(path = %path.display(), clusters = all.len(), "cluster registry open");
        Ok(store)
    }

    pub fn rule(&self, name: &str) -> Option<Rule> {
        self.rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::Begin)?;
        let table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
        let Some(value) = table.get(key).map_err(StoreError::Read)? else {
            return Ok(None);
        };
        decode(value.value()).map(Some)
    }

    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::Begin)?;
        let table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(StoreError::Scan)? {
            let (_, value) = entry.map_err(StoreError::Scan)?;
            out.push(decode(value.value())?);
        }
        Ok(out)
    }

    /// Reads, changes and writes one registration in a single write transaction, so
    /// concurrent changes (a role grant, a heartbeat, a delete) cannot undo each other. `f`
    /// sees the current record and decides; an `Err` from it changes nothing.
    pub fn update<R, E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnOnce(Option<Record>) -> Result<(Change, R), E>,
    ) -> Result<R, E> {
        // Writers are serialized with the rules cache, so the cache never lags the file.
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(StoreError::Begin)?;
        let (before, change, result) = {
            let mut table = txn.open_table(CLUSTERS).map_err(StoreError::OpenTable)?;
            let before = match table.get(key).map_err(StoreError::Read)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            let (change, result) = f(before.clone())?;
            write(&mut table, key, &change)?;
            (before, change, result)
        };
        txn.commit().map_err(StoreError::Commit)?;
        if !matches!(change, Change::Keep) {
            for rule in before.iter().flat_map(Record::rules) {
                rules.remove(&rule.name);
            }
        }
        if let Change::Put(record) = &change {
            for rule in record.rules() {
                rules.insert(rule.name.clone(), rule);
            }
        }
        Ok(result)
    }
}

/// Every cluster's keys are in the file: readable by the relay's user only.
fn make_private(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| StoreError::MakePrivate {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = path;
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

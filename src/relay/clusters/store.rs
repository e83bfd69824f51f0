//! The relay's registry of connected clusters, in one redb file: every change is a committed,
//! fsynced transaction, so a crash never loses a registration. Each cluster also has its own
//! Listen and Send keys; the relay's authorization consults them next to its static rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::arm::ConnectedCluster;
use crate::relay::rule::Rule;
use crate::secret::Secret;

const CLUSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("connected_clusters");

#[derive(Debug, thiserror::Error)]
#[error("cluster registry {0}")]
pub struct StoreError(String);

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> StoreError + '_ {
    move |e| StoreError(format!("{what}: {e}"))
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
        let db = Database::create(path).map_err(|e| {
            StoreError(format!(
                "{}: cannot open: {e} (is another relay using it?)",
                path.display()
            ))
        })?;
        // Every cluster's keys are in here: readable by the relay's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| StoreError(format!("{}: cannot make it private: {e}", path.display())),
            )?;
        }
        let txn = db.begin_write().map_err(|e| err("begin")(&e))?;
        txn.open_table(CLUSTERS)
            .map_err(|e| err("open table")(&e))?;
        txn.commit().map_err(|e| err("commit")(&e))?;
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
        let txn = self.db.begin_read().map_err(|e| err("begin")(&e))?;
        let table = txn
            .open_table(CLUSTERS)
            .map_err(|e| err("open table")(&e))?;
        let Some(value) = table.get(key).map_err(|e| err("read")(&e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| err("decode")(&e))
    }

    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| err("begin")(&e))?;
        let table = txn
            .open_table(CLUSTERS)
            .map_err(|e| err("open table")(&e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err("scan")(&e))? {
            let (_, value) = entry.map_err(|e| err("scan")(&e))?;
            out.push(serde_json::from_slice(value.value()).map_err(|e| err("decode")(&e))?);
        }
        Ok(out)
    }

    /// Reads, changes and writes one registration in a single write transaction, so
    /// concurrent changes (a role grant, a heartbeat, a delete) cannot undo each other. `f`
    /// sees the current record and decides; an `Err` from it changes nothing.
    pub fn update<R, E>(
        &self,
        key: &str,
        f: impl FnOnce(Option<Record>) -> Result<(Change, R), E>,
    ) -> Result<Result<R, E>, StoreError> {
        // Writers are serialized with the rules cache, so the cache never lags the file.
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(|e| err("begin")(&e))?;
        let (change, result) = {
            let mut table = txn
                .open_table(CLUSTERS)
                .map_err(|e| err("open table")(&e))?;
            let current: Option<Record> = match table.get(key).map_err(|e| err("read")(&e))? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(|e| err("decode")(&e))?),
                None => None,
            };
            let before = current.clone();
            let (change, result) = match f(current) {
                Ok(done) => done,
                Err(refused) => return Ok(Err(refused)),
            };
            match &change {
                Change::Keep => {}
                Change::Put(record) => {
                    let bytes = serde_json::to_vec(record).map_err(|e| err("encode")(&e))?;
                    table
                        .insert(key, bytes.as_slice())
                        .map_err(|e| err("write")(&e))?;
                }
                Change::Delete => {
                    table.remove(key).map_err(|e| err("delete")(&e))?;
                }
            }
            ((change, before), result)
        };
        txn.commit().map_err(|e| err("commit")(&e))?;
        let (change, before) = change;
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
        Ok(Ok(result))
    }
}

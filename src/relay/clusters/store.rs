//! The relay's registry of connected clusters, in one redb file: every change is a committed,
//! fsynced transaction, so a crash never loses a registration. Each cluster also has its own
//! Listen and Send keys; the relay's authorization consults them next to its static rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::arm::ConnectedCluster;
use crate::relay::config::Rule;
use crate::secret::Secret;

const CLUSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("connected_clusters");

#[derive(Debug, thiserror::Error)]
#[error("cluster registry {0}")]
pub struct StoreError(String);

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> StoreError + '_ {
    move |e| StoreError(format!("{what}: {e}"))
}

/// One registration as stored: the resource plus what only the relay knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub resource: ConnectedCluster,
    /// Principals (object ids) that own the registration; "admin" callers bypass this.
    pub owners: Vec<String>,
    /// Principals granted the cluster user role: they may get a Send token.
    #[serde(default)]
    pub users: Vec<String>,
    pub hybrid_connection: String,
    pub listen_key: String,
    pub send_key: String,
    /// Unix seconds of the last verified agent heartbeat, and its timestamp (replay guard).
    #[serde(default)]
    pub last_heartbeat: Option<u64>,
    #[serde(default)]
    pub last_report_timestamp: u64,
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

    /// Writes `record` under `key` durably, then updates the rules.
    pub fn put(&self, key: &str, record: &Record) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| err("encode")(&e))?;
        let txn = self.db.begin_write().map_err(|e| err("begin")(&e))?;
        {
            let mut table = txn
                .open_table(CLUSTERS)
                .map_err(|e| err("open table")(&e))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| err("write")(&e))?;
        }
        txn.commit().map_err(|e| err("commit")(&e))?;
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        for rule in record.rules() {
            rules.insert(rule.name.clone(), rule);
        }
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let Some(record) = self.get(key)? else {
            return Ok(None);
        };
        let txn = self.db.begin_write().map_err(|e| err("begin")(&e))?;
        {
            let mut table = txn
                .open_table(CLUSTERS)
                .map_err(|e| err("open table")(&e))?;
            table.remove(key).map_err(|e| err("delete")(&e))?;
        }
        txn.commit().map_err(|e| err("commit")(&e))?;
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        for rule in record.rules() {
            rules.remove(&rule.name);
        }
        Ok(Some(record))
    }
}

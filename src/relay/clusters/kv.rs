//! The registry in a NATS JetStream key-value bucket, for relay replicas: every replica reads
//! and writes the same bucket, and a watch on each keeps its rules (the hot path of every
//! authorization) in step with what any replica wrote, so a registration removed or a key
//! rotated through one replica revokes what it allowed on all of them within the watch's
//! delivery time (milliseconds on a healthy cluster).
//!
//! Writes are compare-and-set on the key's revision: two replicas changing one registration
//! at once cannot undo each other; the loser reads again and re-applies its change.

use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;

use super::store::{Change, Record, StoreError};

/// How long one call to NATS may take before the management call is answered 503.
pub const NATS_WAIT: Duration = Duration::from_secs(5);
/// Largest registration record: a few KiB in practice (keys, owners, role assignments).
pub const MAX_VALUE: i32 = 1024 * 1024;

/// The bucket, and the runtime whose reactor drives its calls (made from blocking workers).
#[derive(Clone)]
pub struct Kv {
    pub(super) store: kv::Store,
    handle: tokio::runtime::Handle,
}

/// KV keys may hold only `[-/_=.a-zA-Z0-9]`: the registry's keys (resource paths) are encoded.
pub fn encode_key(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

fn unavailable(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl Kv {
    /// Opens (creating when absent) the registry bucket `bucket`, file-backed so a NATS
    /// restart keeps every registration.
    pub async fn open(js: &async_nats::jetstream::Context, bucket: &str) -> Result<Kv, StoreError> {
        let store = bucket_store(
            js,
            bucket,
            "clusterconnect relay registry: connected clusters, role assignments, keys",
            Duration::ZERO,
            async_nats::jetstream::stream::StorageType::File,
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("open the registry bucket {bucket}: {e}")))?;
        Ok(Kv {
            store,
            handle: tokio::runtime::Handle::current(),
        })
    }

    /// Runs `f` to completion from a blocking worker, within [`NATS_WAIT`].
    fn block_on<T, E: std::fmt::Display>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        self.handle
            .block_on(async { tokio::time::timeout(NATS_WAIT, f).await })
            .map_err(|_| unavailable(what, "NATS did not answer in time"))?
            .map_err(|e| unavailable(what, e))
    }

    /// The record under `key` and the revision to write against (0: never written).
    pub fn read(&self, key: &str) -> Result<(Option<Record>, u64), StoreError> {
        let entry = self.block_on("read the registry", self.store.entry(encode_key(key)))?;
        match entry {
            None => Ok((None, 0)),
            Some(e) if e.operation == kv::Operation::Put => {
                Ok((Some(decode(&e.value)?), e.revision))
            }
            Some(e) => Ok((None, e.revision)),
        }
    }

    /// Writes `change` if `key` is still at `revision`: `Some(new revision)`, or `None` when
    /// another replica wrote first.
    pub fn write(
        &self,
        key: &str,
        revision: u64,
        change: &Change,
    ) -> Result<Option<u64>, StoreError> {
        let k = encode_key(key);
        let result = match change {
            Change::Keep => return Ok(Some(revision)),
            Change::Put(record) => {
                let bytes = serde_json::to_vec(record).map_err(StoreError::Encode)?;
                let write = self.store.update(&k, Bytes::from(bytes), revision);
                self.handle
                    .block_on(async { tokio::time::timeout(NATS_WAIT, write).await })
            }
            Change::Delete => {
                let delete = async {
                    self.store
                        .delete_expect_revision(&k, Some(revision))
                        .await
                        // Its tombstone's own revision is not returned; it is past the one
                        // read, so this replica's rules drop the key at once (the watch
                        // delivers the same removal again later).
                        .map(|()| revision + 1)
                };
                self.handle
                    .block_on(async { tokio::time::timeout(NATS_WAIT, delete).await })
            }
        };
        match result {
            Err(_) => Err(unavailable(
                "write the registry",
                "NATS did not answer in time",
            )),
            Ok(Ok(rev)) => Ok(Some(rev)),
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Ok(Err(e)) => Err(unavailable("write the registry", e)),
        }
    }

    /// Every registration.
    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        let keys: Vec<String> = self.block_on("list the registry", async {
            let mut keys = self.store.keys().await?;
            let mut out = Vec::new();
            while let Some(k) = keys.next().await {
                out.push(k?);
            }
            Ok::<_, async_nats::Error>(out)
        })?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let value = self.block_on("read the registry", self.store.get(k))?;
            if let Some(v) = value {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    /// The bucket's last revision: a watch from just after it misses nothing written since.
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        let mut stream = self.store.stream.clone();
        let info = tokio::time::timeout(NATS_WAIT, stream.info())
            .await
            .map_err(|_| unavailable("read the registry's state", "timed out"))?
            .map_err(|e| unavailable("read the registry's state", e))?;
        Ok(info.state.last_sequence)
    }
}

/// A key-value bucket, created when absent with the stream settings NATS's own clients use for
/// buckets (one value per key, rollups, direct gets). Made here rather than with
/// `create_key_value`, which first reads account information in a form NATS 2.9 does not send.
pub async fn bucket_store(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    storage: async_nats::jetstream::stream::StorageType,
) -> Result<kv::Store, String> {
    use async_nats::jetstream::stream;
    if let Ok(Ok(store)) = tokio::time::timeout(NATS_WAIT, js.get_key_value(bucket)).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_string()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        max_message_size: MAX_VALUE,
        storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        ..Default::default()
    };
    match tokio::time::timeout(NATS_WAIT, js.get_or_create_stream(config)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("create bucket {bucket}: {e}")),
        Err(_) => {
            return Err(format!(
                "create bucket {bucket}: NATS did not answer in time"
            ))
        }
    }
    tokio::time::timeout(NATS_WAIT, js.get_key_value(bucket))
        .await
        .map_err(|_| format!("open bucket {bucket}: NATS did not answer in time"))?
        .map_err(|e| format!("open bucket {bucket}: {e}"))
}

pub fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(StoreError::Decode)
}

/// The registry key an encoded KV key stands for.
pub fn decode_key(key: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key)
        .ok()?;
    String::from_utf8(bytes).ok()
}

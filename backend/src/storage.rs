//! A partition's durable state in sled: a write-ahead log of command batches plus incremental
//! checkpoints of the state itself.
//!
//! Layout (one sled tree each, per partition `n`):
//! - `p<n>/log`: key = index of the first entry of a batch (u64 big-endian), value = the
//!   postcard-encoded `Vec<Entry>` of that batch. One record per batch keeps group commit cheap.
//! - `p<n>/state`: `s/<client id>` → session, `r/<topic>` → retained message,
//!   `m/applied` → the log index the stored state reflects. Sessions and retained messages are
//!   written only when they changed since the last checkpoint (the state machine tracks them).
//!
//! Why a log *and* checkpoints: a QoS1 PUBACK needs the publish durable now, and appending one
//! record then flushing is the cheapest way to get there (many publishes per fsync). Rewriting
//! the touched sessions on every message would cost far more. The checkpoint, written every few
//! thousand entries, bounds replay time at start-up; the log up to it is then deleted.
//! In the cluster the Raft log plays the write-ahead role and the same checkpoint is the
//! applied state.

use std::sync::Arc;

use tiermq_common::Message;

use crate::partition::command::Entry;
use crate::partition::session::{Session, SessionLimits};
use crate::partition::{Dirty, Partition, PartitionImage};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in {tree}: {source}")]
    Decode {
        tree: String,
        source: postcard::Error,
    },
    #[error("encode: {0}")]
    Encode(#[from] postcard::Error),
}

pub type StorageResult<T> = Result<T, StorageError>;

/// `db.flush_async()` without its deadlock. sled's `flush_async` parks one of sled's own I/O
/// threads (7 of them; more only once 8 tasks are queued) until the writes it waits for are
/// done, and those writes are queued on the same threads: 7 flushes at once in one process
/// (several databases, or partitions flushing together) leave no thread to write, and all of
/// them wait for good (seen as a hung `raft_cluster` + `raft_grpc` test pair). This waits on a
/// tokio blocking thread instead.
pub async fn flush_db(db: &sled::Db) -> sled::Result<usize> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(sled::Error::ReportableBug(format!("flush task: {e}"))),
    }
}

const APPLIED_KEY: &[u8] = b"m/applied";
/// Shared subscription groups, handoffs and return batches, written whole when changed.
const SHARED_KEY: &[u8] = b"m/shared";
// Other prefixes: `s/<client id>` a session, `r/<topic>` a retained message, `q/<client id>` a
// publisher's inbound QoS2 keys (`(client id, keys)`, see `partition::qos2_keys`).

/// The sled trees of one partition.
#[derive(Clone)]
pub struct PartitionStore {
    db: sled::Db,
    log: sled::Tree,
    state: sled::Tree,
}

/// What start-up recovers: the checkpointed partition and the log entries after it.
pub struct Recovered {
    pub partition: Partition,
    pub tail: Vec<(u64, Entry)>,
}

impl PartitionStore {
    pub fn open(db: &sled::Db, partition: u32) -> StorageResult<Self> {
        Ok(PartitionStore {
            db: db.clone(),
            log: db.open_tree(format!("p{partition}/log"))?,
            state: db.open_tree(format!("p{partition}/state"))?,
        })
    }

    /// Removes the trees of `partition` from `db` (its replica moved to another node). The
    /// caller drops every `PartitionStore` of it first.
    pub fn destroy(db: &sled::Db, partition: u32) -> StorageResult<()> {
        db.drop_tree(format!("p{partition}/log"))?;
        db.drop_tree(format!("p{partition}/state"))?;
        Ok(())
    }

    /// Loads the last checkpoint and the log entries written after it.
    pub fn recover(&self, limits: SessionLimits) -> StorageResult<Recovered> {
        let mut image = PartitionImage {
            applied_index: 0,
            sessions: Vec::new(),
            retained: Vec::new(),
            shared: Default::default(),
            qos2_keys: Vec::new(),
        };
        if let Some(v) = self.state.get(APPLIED_KEY)? {
            image.applied_index = index_key("state", &v)?;
        }
        if let Some(v) = self.state.get(SHARED_KEY)? {
            image.shared = decode("state", &v)?;
        }
        for kv in self.state.scan_prefix(b"s/") {
            let (_, v) = kv?;
            image.sessions.push(decode::<Session>("state", &v)?);
        }
        for kv in self.state.scan_prefix(b"q/") {
            let (_, v) = kv?;
            image.qos2_keys.push(decode("state", &v)?);
        }
        for kv in self.state.scan_prefix(b"r/") {
            let (_, v) = kv?;
            image
                .retained
                .push(Arc::new(decode::<Message>("state", &v)?));
        }
        let applied = image.applied_index;
        let partition = Partition::restore(limits, image);
        let mut tail = Vec::new();
        for kv in self.log.iter() {
            let (k, v) = kv?;
            let first = index_key("log", &k)?;
            let entries: Vec<Entry> = decode("log", &v)?;
            for (i, e) in entries.into_iter().enumerate() {
                let index = first + i as u64;
                if index > applied {
                    tail.push((index, e));
                }
            }
        }
        Ok(Recovered { partition, tail })
    }

    /// Appends a batch of entries whose first index is `first_index` (not yet durable).
    pub fn append(&self, first_index: u64, entries: &[Entry]) -> StorageResult<()> {
        let bytes = postcard::to_stdvec(entries)?;
        self.log.insert(first_index.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// Makes everything written so far durable (one fsync for any number of batches).
    pub async fn flush(&self) -> StorageResult<()> {
        flush_db(&self.db).await?;
        Ok(())
    }

    /// Writes what changed since the last checkpoint, flushes, then drops the log it covers.
    /// If writing fails, the changes stay marked so the next checkpoint writes them.
    pub fn checkpoint(&self, partition: &mut Partition) -> StorageResult<()> {
        let dirty = partition.take_dirty();
        if let Err(e) = self.write_checkpoint(partition, &dirty) {
            partition.restore_dirty(dirty);
            return Err(e);
        }
        self.truncate_log(partition.applied_index())
    }

    fn write_checkpoint(&self, partition: &Partition, dirty: &Dirty) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for client_id in &dirty.sessions {
            let key = prefixed(b"s/", client_id.as_bytes());
            match partition.session(client_id) {
                Some(s) => batch.insert(key, postcard::to_stdvec(s)?),
                None => batch.remove(key),
            }
        }
        for topic in &dirty.retained {
            let key = prefixed(b"r/", topic.as_bytes());
            match partition.retained_message(topic) {
                Some(m) => batch.insert(key, postcard::to_stdvec(&**m)?),
                None => batch.remove(key),
            }
        }
        for publisher in &dirty.qos2_keys {
            let key = prefixed(b"q/", publisher.as_bytes());
            match partition.qos2_keys_of(publisher) {
                Some(k) => batch.insert(key, postcard::to_stdvec(&(publisher, k))?),
                None => batch.remove(key),
            }
        }
        if dirty.shared {
            batch.insert(SHARED_KEY, postcard::to_stdvec(partition.shared_state())?);
        }
        batch.insert(APPLIED_KEY, &partition.applied_index().to_be_bytes());
        self.state.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Deletes the log records wholly covered by a checkpoint at `applied`. A record is a
    /// batch: it ends where the next one starts, so a batch that straddles `applied` (not made
    /// by the local runtime, but possible for other writers) is kept for replay.
    fn truncate_log(&self, applied: u64) -> StorageResult<()> {
        let starts: Vec<sled::IVec> = self
            .log
            .range(..=applied.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let Some(last_key) = starts.last() else {
            return Ok(());
        };
        // The last record at or before `applied`: covered if its entries end by `applied`.
        let last_covered = match self.log.get(last_key)? {
            Some(v) => {
                let first = index_key("log", last_key)?;
                let entries: Vec<Entry> = decode("log", &v)?;
                first + entries.len() as u64 <= applied + 1
            }
            None => true,
        };
        let keep = usize::from(!last_covered);
        for k in &starts[..starts.len() - keep] {
            self.log.remove(k)?;
        }
        Ok(())
    }

    /// Replaces the stored state with the whole of `partition` (after installing a Raft
    /// snapshot, when the old keys no longer mean anything).
    pub fn replace_all(&self, partition: &mut Partition) -> StorageResult<()> {
        partition.take_dirty();
        self.state.clear()?;
        let image = partition.image();
        let mut batch = sled::Batch::default();
        for s in &image.sessions {
            batch.insert(
                prefixed(b"s/", s.client_id.as_bytes()),
                postcard::to_stdvec(s)?,
            );
        }
        for m in &image.retained {
            batch.insert(
                prefixed(b"r/", m.topic.as_bytes()),
                postcard::to_stdvec(&**m)?,
            );
        }
        for keys in &image.qos2_keys {
            batch.insert(
                prefixed(b"q/", keys.0.as_bytes()),
                postcard::to_stdvec(keys)?,
            );
        }
        batch.insert(SHARED_KEY, postcard::to_stdvec(&image.shared)?);
        batch.insert(APPLIED_KEY, &image.applied_index.to_be_bytes());
        self.state.apply_batch(batch)?;
        self.log.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// Number of log records (batches) not yet covered by a checkpoint.
    pub fn log_records(&self) -> usize {
        self.log.len()
    }
}

fn prefixed(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + key.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(key);
    v
}

/// A big-endian log index stored as a key or value.
fn index_key(tree: &str, bytes: &[u8]) -> StorageResult<u64> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Decode {
        tree: tree.to_string(),
        source: postcard::Error::DeserializeUnexpectedEnd,
    })?;
    Ok(u64::from_be_bytes(raw))
}

fn decode<T: serde::de::DeserializeOwned>(tree: &str, bytes: &[u8]) -> StorageResult<T> {
    postcard::from_bytes(bytes).map_err(|source| StorageError::Decode {
        tree: tree.to_string(),
        source,
    })
}

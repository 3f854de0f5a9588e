//! [`raft::Storage`] over sled: one Raft group's log, hard state, conf state and snapshot.
//!
//! # Layout
//!
//! Two sled trees per group `p`:
//!
//! - `g<p>/raft_log`: key = entry index as `u64` big-endian (so sled's byte order is log order),
//!   value = the protobuf-encoded [`Entry`] (raft's own codec, `protobuf::Message`).
//! - `g<p>/raft_meta`: `hard_state` ([`HardState`]), `conf_state` ([`ConfState`]),
//!   `truncated` (index and term of the entry just before the first one kept, 16 bytes
//!   big-endian), `snapshot_meta` ([`SnapshotMetadata`]) and `snapshot_data` (the latest
//!   snapshot's partition image).
//!
//! # Semantics
//!
//! Mirrors raft-rs's `MemStorage` (first/last index, `Compacted` below the first index,
//! `Unavailable` beyond the last, `entries` with `max_size` returning at least one entry,
//! `append` truncating a conflicting suffix, `compact`, `apply_snapshot`) with these deliberate
//! differences, all in the direction of the `Storage` trait's documented contract:
//!
//! - The term of the entry just before the first index is *retained* after `compact` (as TiKV's
//!   truncated state does, and as the trait documents: "the term of the entry before
//!   first_index is retained for matching purpose"). `MemStorage` forgets it after `compact`
//!   unless it equals the snapshot index, which makes a leader send a full snapshot to a
//!   follower that merely needs the entries starting at the first index.
//! - After compacting every entry the first index stays at `last + 1` (`MemStorage` falls back
//!   to `snapshot index + 1` when its entry vector empties).
//! - `snapshot()` never fabricates a snapshot: it serves the snapshot the driver stored with
//!   [`SledRaftStorage::store_snapshot`] (or the one installed by `apply_snapshot`) when it is
//!   recent enough, and otherwise records the wish for [`SledRaftStorage::snapshot_wanted`] and
//!   answers `SnapshotTemporarilyUnavailable` (raft retries later).
//! - Misuse that `MemStorage` answers with a panic (appending below the first index or after a
//!   gap, reading or compacting beyond the last index) returns an error instead; so does a
//!   corrupt record. Note that raft itself treats any storage error other than
//!   `Compacted`/`Unavailable` (and `SnapshotTemporarilyUnavailable` from `snapshot`) as fatal.
//!
//! # Durability
//!
//! Nothing here flushes: the driver flushes the shared [`sled::Db`] once per Ready round (group
//! commit across all groups) and only then sends the round's persisted messages. Operations that
//! touch both trees (`apply_snapshot`, `compact`) run as one sled transaction so a crash never
//! leaves a log that disagrees with its truncated state; `append` is one [`sled::Batch`].
//!
//! # Files
//!
//! - `open.rs`: loading a group's state at start and checking it holds together.
//! - `write.rs`: what the driver persists from a Ready (entries, hard state, conf state),
//!   log compaction, and removing a group.
//! - `snapshot.rs`: storing and installing snapshots, and the wish raft left for a newer one
//!   (`reads.rs` serves them).
//! - `reads.rs`: the [`raft::Storage`] trait, what raft reads.
//! - `errors.rs`: the error type and the injected disk failures.

mod errors;
mod open;
mod reads;
mod snapshot;
#[cfg(test)]
mod tests;
mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::StorageError as RaftError;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

pub use errors::{DiskFaults, RaftStorageError};

const HARD_STATE_KEY: &[u8] = b"hard_state";
const CONF_STATE_KEY: &[u8] = b"conf_state";
const TRUNCATED_KEY: &[u8] = b"truncated";
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA_KEY: &[u8] = b"snapshot_data";
/// Log index of the last conf change applied (see [`SledRaftStorage::set_conf_state_at`]).
const CONF_INDEX_KEY: &[u8] = b"conf_index";

/// The in-memory cache of everything small: answered without touching sled.
#[derive(Debug, Clone, Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry just before the first kept one (0, 0 for a fresh log).
    truncated_index: u64,
    truncated_term: u64,
    /// Last log index (== `truncated_index` when the log holds no entry) and its term.
    last_index: u64,
    last_term: u64,
    /// Metadata of the stored snapshot; index 0 = none.
    snapshot_meta: SnapshotMetadata,
}

impl Cached {
    fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }
}

struct Inner {
    partition: u32,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    state: RwLock<Cached>,
    /// Lowest snapshot index raft asked for and we could not serve (0 = none).
    wanted: AtomicU64,
    faults: Arc<DiskFaults>,
}

/// One Raft group's durable state (log, hard state, conf state, snapshot) in sled trees named
/// `g<partition>/raft_log` (key: index u64 big-endian → protobuf-encoded Entry) and
/// `g<partition>/raft_meta` (hard_state, conf_state, truncated state, snapshot metadata, latest
/// snapshot data).
///
/// Writes are not flushed here: the driver flushes the shared `sled::Db` once per Ready round
/// (group commit across all groups), then sends persisted messages.
///
/// Cheap to clone: all clones share the trees and the in-memory cache.
#[derive(Clone)]
pub struct SledRaftStorage {
    inner: Arc<Inner>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl SledRaftStorage {
    /// Opens (or creates) group `partition`'s trees and loads the cache.
    pub fn open(db: &sled::Db, partition: u32) -> Result<Self, RaftStorageError> {
        Self::open_with_faults(db, partition, Arc::default())
    }

    /// The partition (Raft group) this storage belongs to.
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// True when nothing was ever stored (a fresh group that needs `initialize`).
    pub fn is_empty(&self) -> bool {
        self.inner.meta.is_empty() && self.inner.log.is_empty()
    }

    /// The log index whose configuration the stored conf state is: the last conf change
    /// applied, or the snapshot installed or stored after it (0: the bootstrap configuration).
    pub fn conf_index(&self) -> u64 {
        let stored = self
            .inner
            .meta
            .get(CONF_INDEX_KEY)
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        stored.max(self.read().snapshot_meta.index)
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    /// Flushes the whole shared db (convenience for tests; the driver flushes the Db itself).
    pub fn flush(&self) -> Result<(), RaftStorageError> {
        self.inner.db.flush()?;
        Ok(())
    }

    // ---- internals ----

    fn read(&self) -> RwLockReadGuard<'_, Cached> {
        self.inner
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Cached> {
        self.inner
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An error while the disk is failing ([`DiskFaults`]).
    fn writable(&self) -> raft::Result<()> {
        self.inner.faults.check().map_err(self.sled_err())
    }

    fn invalid(&self, detail: String) -> RaftStorageError {
        RaftStorageError::Invalid {
            partition: self.inner.partition,
            detail,
        }
    }

    fn sled_err(&self) -> impl Fn(sled::Error) -> raft::Error {
        |e| RaftStorageError::Sled(e).into()
    }

    fn encode<M: protobuf::Message>(
        &self,
        what: &'static str,
        m: &M,
    ) -> Result<Vec<u8>, RaftStorageError> {
        m.write_to_bytes()
            .map_err(|source| RaftStorageError::Encode {
                partition: self.inner.partition,
                what,
                source,
            })
    }

    fn decode_entry(&self, index: u64, bytes: &[u8]) -> Result<Entry, RaftStorageError> {
        let e = Entry::parse_from_bytes(bytes).map_err(|source| RaftStorageError::Decode {
            partition: self.inner.partition,
            what: format!("log entry {index}"),
            source,
        })?;
        if e.index != index {
            return Err(RaftStorageError::Corrupt {
                partition: self.inner.partition,
                detail: format!("log key {index} holds entry {}", e.index),
            });
        }
        Ok(e)
    }

    fn check_commit(&self, st: &Cached, commit: u64) -> raft::Result<()> {
        if commit > st.last_index {
            return Err(self
                .invalid(format!(
                    "commit {commit} beyond the last index {} (append the entries first)",
                    st.last_index
                ))
                .into());
        }
        Ok(())
    }

    /// `Storage::term` against a locked cache.
    fn term_of(&self, st: &Cached, idx: u64) -> raft::Result<u64> {
        if idx == st.truncated_index {
            return Ok(st.truncated_term);
        }
        if idx < st.first_index() {
            return Err(raft::Error::Store(RaftError::Compacted));
        }
        if idx > st.last_index {
            return Err(raft::Error::Store(RaftError::Unavailable));
        }
        if idx == st.last_index {
            return Ok(st.last_term);
        }
        match self.inner.log.get(key(idx)).map_err(self.sled_err())? {
            Some(v) => Ok(self.decode_entry(idx, &v)?.term),
            None => Err(RaftStorageError::Corrupt {
                partition: self.inner.partition,
                detail: format!(
                    "entry {idx} missing from the log [{}, {}]",
                    st.first_index(),
                    st.last_index
                ),
            }
            .into()),
        }
    }

    /// Applies a batch to each tree atomically.
    fn transact(&self, log_batch: sled::Batch, meta_batch: sled::Batch) -> raft::Result<()> {
        (&self.inner.log, &self.inner.meta)
            .transaction(|(log, meta)| {
                log.apply_batch(&log_batch)?;
                meta.apply_batch(&meta_batch)?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => RaftStorageError::Sled(e).into(),
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })
    }

    fn satisfy_wish(&self, index: u64) {
        let wanted = self.inner.wanted.load(Ordering::Acquire);
        if wanted != 0 && index >= wanted {
            self.inner.wanted.store(0, Ordering::Release);
        }
    }

    fn wish(&self, index: u64) {
        self.inner.wanted.fetch_max(index.max(1), Ordering::AcqRel);
    }
}

fn truncated_bytes(index: u64, term: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&index.to_be_bytes());
    b[8..].copy_from_slice(&term.to_be_bytes());
    b
}

fn decode_key(partition: u32, k: &[u8]) -> Result<u64, RaftStorageError> {
    let raw: [u8; 8] = k.try_into().map_err(|_| RaftStorageError::Corrupt {
        partition,
        detail: format!("log key of {} bytes", k.len()),
    })?;
    Ok(u64::from_be_bytes(raw))
}

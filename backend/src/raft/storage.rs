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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftError};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

const HARD_STATE_KEY: &[u8] = b"hard_state";
const CONF_STATE_KEY: &[u8] = b"conf_state";
const TRUNCATED_KEY: &[u8] = b"truncated";
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA_KEY: &[u8] = b"snapshot_data";
/// Log index of the last conf change applied (see [`SledRaftStorage::set_conf_state_at`]).
const CONF_INDEX_KEY: &[u8] = b"conf_index";

/// Errors of [`SledRaftStorage`]. Inside the [`raft::Storage`] methods they travel as
/// `raft::Error::Store(raft::StorageError::Other(..))`.
#[derive(Debug, thiserror::Error)]
pub enum RaftStorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("raft group {partition}: corrupt {what}: {source}")]
    Decode {
        partition: u32,
        what: String,
        source: protobuf::ProtobufError,
    },
    #[error("raft group {partition}: encode {what}: {source}")]
    Encode {
        partition: u32,
        what: &'static str,
        source: protobuf::ProtobufError,
    },
    #[error("raft group {partition}: corrupt storage: {detail}")]
    Corrupt { partition: u32, detail: String },
    #[error("raft group {0} is already initialized")]
    AlreadyInitialized(u32),
    /// The caller broke the storage's preconditions (e.g. a gap in appended entries).
    #[error("raft group {partition}: {detail}")]
    Invalid { partition: u32, detail: String },
}

impl From<RaftStorageError> for raft::Error {
    fn from(e: RaftStorageError) -> Self {
        raft::Error::Store(RaftError::Other(Box::new(e)))
    }
}

/// A switch that makes a node's Raft storage fail every write, as a broken or full disk would:
/// how tests (and simulations) check that a node which cannot persist acknowledges nothing.
/// Always present, off by default; one relaxed atomic load per write.
#[derive(Debug, Default)]
pub struct DiskFaults {
    failing: AtomicBool,
}

impl DiskFaults {
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The error a failing disk gives a write.
    pub fn check(&self) -> Result<(), sled::Error> {
        if self.is_failing() {
            return Err(sled::Error::Io(std::io::Error::other(
                "injected disk failure",
            )));
        }
        Ok(())
    }
}

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

    /// Like [`SledRaftStorage::open`]; every write fails while `faults` says so.
    pub fn open_with_faults(
        db: &sled::Db,
        partition: u32,
        faults: Arc<DiskFaults>,
    ) -> Result<Self, RaftStorageError> {
        let log = db.open_tree(format!("g{partition}/raft_log"))?;
        let meta = db.open_tree(format!("g{partition}/raft_meta"))?;
        let decode_err = |what: &str, source| RaftStorageError::Decode {
            partition,
            what: what.to_string(),
            source,
        };
        let corrupt = |detail: String| RaftStorageError::Corrupt { partition, detail };

        let mut c = Cached::default();
        if let Some(v) = meta.get(HARD_STATE_KEY)? {
            c.hard_state =
                HardState::parse_from_bytes(&v).map_err(|e| decode_err("hard state", e))?;
        }
        if let Some(v) = meta.get(CONF_STATE_KEY)? {
            c.conf_state =
                ConfState::parse_from_bytes(&v).map_err(|e| decode_err("conf state", e))?;
        }
        if let Some(v) = meta.get(SNAPSHOT_META_KEY)? {
            c.snapshot_meta = SnapshotMetadata::parse_from_bytes(&v)
                .map_err(|e| decode_err("snapshot metadata", e))?;
        }
        if let Some(v) = meta.get(TRUNCATED_KEY)? {
            let raw: [u8; 16] = v
                .as_ref()
                .try_into()
                .map_err(|_| corrupt(format!("truncated state has {} bytes", v.len())))?;
            c.truncated_index = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
            c.truncated_term = u64::from_be_bytes(raw[8..].try_into().expect("8 bytes"));
        }

        // Entries at or below the truncated index are dead (cannot normally exist since
        // compaction is transactional); drop them so the log starts right after it.
        let mut stale = sled::Batch::default();
        let mut any_stale = false;
        for item in log.range(..key(c.truncated_index + 1)) {
            let (k, _) = item?;
            stale.remove(k);
            any_stale = true;
        }
        if any_stale {
            log.apply_batch(stale)?;
        }

        c.last_index = c.truncated_index;
        c.last_term = c.truncated_term;
        if let Some((k, _)) = log.first()? {
            let first = decode_key(partition, &k)?;
            if first != c.first_index() {
                return Err(corrupt(format!(
                    "log starts at {first}, expected {} (truncated index {})",
                    c.first_index(),
                    c.truncated_index
                )));
            }
        }
        if let Some((k, v)) = log.last()? {
            let last = decode_key(partition, &k)?;
            let e = Entry::parse_from_bytes(&v)
                .map_err(|e| decode_err(&format!("log entry {last}"), e))?;
            if e.index != last {
                return Err(corrupt(format!("log key {last} holds entry {}", e.index)));
            }
            c.last_index = last;
            c.last_term = e.term;
        }
        if c.hard_state.commit > c.last_index {
            // Only possible if a crash lost log writes that the hard state (written later in
            // the same unflushed round) survived; nothing of that round was acknowledged.
            // raft panics on commit > last index, so fall back to what the log holds.
            tracing::warn!(
                partition,
                commit = c.hard_state.commit,
                last_index = c.last_index,
                "raft hard state commit beyond the log; clamping"
            );
            c.hard_state.commit = c.last_index;
        }

        Ok(SledRaftStorage {
            inner: Arc::new(Inner {
                partition,
                db: db.clone(),
                log,
                meta,
                state: RwLock::new(c),
                wanted: AtomicU64::new(0),
                faults,
            }),
        })
    }

    /// The partition (Raft group) this storage belongs to.
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// True when nothing was ever stored (a fresh group that needs `initialize`).
    pub fn is_empty(&self) -> bool {
        self.inner.meta.is_empty() && self.inner.log.is_empty()
    }

    /// Static bootstrap: every replica starts with the same ConfState (voters) and an empty log.
    pub fn initialize(&self, voters: &[u64]) -> Result<(), RaftStorageError> {
        let mut st = self.write();
        if !self.is_empty() {
            return Err(RaftStorageError::AlreadyInitialized(self.inner.partition));
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        self.inner
            .meta
            .insert(CONF_STATE_KEY, self.encode("conf state", &cs)?)?;
        st.conf_state = cs;
        Ok(())
    }

    /// Appends entries (as `Ready::entries`), first dropping any existing suffix from the first
    /// new index on (a conflicting tail from an old leader). One sled batch.
    pub fn append(&self, entries: &[Entry]) -> raft::Result<()> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        self.writable()?;
        let mut st = self.write();
        if head.index < st.first_index() {
            // MemStorage panics: "overwrite compacted raft logs".
            return Err(raft::Error::Store(RaftError::Compacted));
        }
        if head.index > st.last_index + 1 {
            return Err(self
                .invalid(format!(
                    "raft logs should be continuous, last index: {}, new appended: {}",
                    st.last_index, head.index
                ))
                .into());
        }
        let mut batch = sled::Batch::default();
        for (i, e) in entries.iter().enumerate() {
            if e.index != head.index + i as u64 {
                return Err(self
                    .invalid(format!(
                        "appended entries are not contiguous: {} at position {i} after {}",
                        e.index, head.index
                    ))
                    .into());
            }
            batch.insert(&key(e.index), self.encode("log entry", e)?);
        }
        let tail = entries.last().expect("non-empty");
        for stale in tail.index + 1..=st.last_index {
            batch.remove(&key(stale));
        }
        self.inner.log.apply_batch(batch).map_err(self.sled_err())?;
        st.last_index = tail.index;
        st.last_term = tail.term;
        Ok(())
    }

    /// Saves the hard state (`Ready::hs`). Append the Ready's entries first: the commit index
    /// must not exceed the last index (raft refuses to restart from such a state).
    pub fn set_hard_state(&self, hs: HardState) -> raft::Result<()> {
        self.writable()?;
        let mut st = self.write();
        self.check_commit(&st, hs.commit)?;
        self.inner
            .meta
            .insert(HARD_STATE_KEY, self.encode("hard state", &hs)?)
            .map_err(self.sled_err())?;
        st.hard_state = hs;
        Ok(())
    }

    /// Saves a new commit index (`LightReady::commit_index`), keeping term and vote.
    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        self.writable()?;
        let mut st = self.write();
        self.check_commit(&st, commit)?;
        let mut hs = st.hard_state.clone();
        hs.commit = commit;
        self.inner
            .meta
            .insert(HARD_STATE_KEY, self.encode("hard state", &hs)?)
            .map_err(self.sled_err())?;
        st.hard_state = hs;
        Ok(())
    }

    /// Saves the conf state (after applying a conf change).
    pub fn set_conf_state(&self, cs: ConfState) -> raft::Result<()> {
        self.writable()?;
        let mut st = self.write();
        self.inner
            .meta
            .insert(CONF_STATE_KEY, self.encode("conf state", &cs)?)
            .map_err(self.sled_err())?;
        st.conf_state = cs;
        Ok(())
    }

    /// Stores the configuration that results from applying the conf change at log `index`,
    /// together with that index. After a restart, committed entries behind the checkpoint are
    /// applied again; the driver skips conf changes at or below [`Self::conf_index`] so that
    /// none is applied twice (re-entering a joint configuration would be wrong).
    pub fn set_conf_state_at(&self, cs: ConfState, index: u64) -> raft::Result<()> {
        self.set_conf_state(cs)?;
        self.inner
            .meta
            .insert(CONF_INDEX_KEY, &index.to_be_bytes()[..])
            .map_err(self.sled_err())?;
        Ok(())
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

    /// Removes every tree of group `partition` from `db` (a replica moved away). The caller
    /// drops its storage handle first.
    pub fn destroy(db: &sled::Db, partition: u32) -> Result<(), RaftStorageError> {
        db.drop_tree(format!("g{partition}/raft_log"))?;
        db.drop_tree(format!("g{partition}/raft_meta"))?;
        Ok(())
    }

    /// Installs a snapshot received from the leader (`Ready::snapshot`; apply it before the
    /// Ready's entries): drops the whole log, sets first index = snapshot index + 1, hard state
    /// commit = snapshot index and term = max(term, snapshot term), conf state = the snapshot's,
    /// and keeps the snapshot so this replica can serve it in turn. `SnapshotOutOfDate` when the
    /// snapshot is older than the first index (as `MemStorage`). One sled transaction.
    pub fn apply_snapshot(&self, mut snap: Snapshot) -> raft::Result<()> {
        self.writable()?;
        let mut st = self.write();
        let meta = snap.take_metadata();
        let index = meta.index;
        if st.first_index() > index {
            return Err(raft::Error::Store(RaftError::SnapshotOutOfDate));
        }
        let mut hs = st.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = index;
        let cs = meta.get_conf_state().clone();

        let mut log_batch = sled::Batch::default();
        for i in st.first_index()..=st.last_index {
            log_batch.remove(&key(i));
        }
        let mut meta_batch = sled::Batch::default();
        meta_batch.insert(HARD_STATE_KEY, self.encode("hard state", &hs)?);
        meta_batch.insert(CONF_STATE_KEY, self.encode("conf state", &cs)?);
        meta_batch.insert(TRUNCATED_KEY, &truncated_bytes(index, meta.term)[..]);
        meta_batch.insert(SNAPSHOT_META_KEY, self.encode("snapshot metadata", &meta)?);
        meta_batch.insert(SNAPSHOT_DATA_KEY, snap.take_data().to_vec());
        self.transact(log_batch, meta_batch)?;

        st.truncated_index = index;
        st.truncated_term = meta.term;
        st.last_index = index;
        st.last_term = meta.term;
        st.hard_state = hs;
        st.conf_state = cs;
        st.snapshot_meta = meta;
        self.satisfy_wish(index);
        Ok(())
    }

    /// Stores a snapshot built by the driver from the applied state machine (`data` = the
    /// serialized partition image) at `index` (must be <= applied index, hence <= the stored
    /// commit), so `Storage::snapshot` can serve it. `conf_state` must be the configuration as
    /// of `index`; `term` must be the term of entry `index`. Replaces the previous snapshot;
    /// `SnapshotOutOfDate` if that one is newer or `index` is below the truncated index.
    pub fn store_snapshot(
        &self,
        index: u64,
        term: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> raft::Result<()> {
        self.writable()?;
        let st = self.write();
        if index == 0 {
            return Err(self.invalid("snapshot at index 0".into()).into());
        }
        if index < st.snapshot_meta.index || index < st.truncated_index {
            return Err(raft::Error::Store(RaftError::SnapshotOutOfDate));
        }
        if index > st.hard_state.commit {
            return Err(self
                .invalid(format!(
                    "snapshot at {index} beyond the stored commit {} (set_commit first)",
                    st.hard_state.commit
                ))
                .into());
        }
        let actual = self.term_of(&st, index)?;
        if actual != term {
            return Err(self
                .invalid(format!(
                    "snapshot at {index} claims term {term}, log has {actual}"
                ))
                .into());
        }
        let meta = SnapshotMetadata {
            index,
            term,
            conf_state: Some(conf_state).into(),
            ..Default::default()
        };
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META_KEY, self.encode("snapshot metadata", &meta)?);
        batch.insert(SNAPSHOT_DATA_KEY, data);
        self.inner
            .meta
            .apply_batch(batch)
            .map_err(self.sled_err())?;
        let mut st = st;
        st.snapshot_meta = meta;
        self.satisfy_wish(index);
        Ok(())
    }

    /// Drops log entries before `index` (log compaction after a snapshot); the term of
    /// `index - 1` is kept. No-op when `index <= first_index`; an error beyond `last + 1` or
    /// beyond `commit + 1` (never compact what is not committed — and not beyond the applied
    /// index, which only the caller knows). One sled transaction.
    pub fn compact(&self, index: u64) -> raft::Result<()> {
        self.writable()?;
        let mut st = self.write();
        if index <= st.first_index() {
            return Ok(());
        }
        if index > st.last_index + 1 {
            return Err(self
                .invalid(format!(
                    "compact not received raft logs: {index}, last index: {}",
                    st.last_index
                ))
                .into());
        }
        if index > st.hard_state.commit + 1 {
            return Err(self
                .invalid(format!(
                    "compact to {index} beyond the commit {}",
                    st.hard_state.commit
                ))
                .into());
        }
        let term = self.term_of(&st, index - 1)?;
        let mut log_batch = sled::Batch::default();
        for i in st.first_index()..index {
            log_batch.remove(&key(i));
        }
        let mut meta_batch = sled::Batch::default();
        meta_batch.insert(TRUNCATED_KEY, &truncated_bytes(index - 1, term)[..]);
        self.transact(log_batch, meta_batch)?;
        st.truncated_index = index - 1;
        st.truncated_term = term;
        Ok(())
    }

    /// Asks whether a newer snapshot is wanted (`Storage::snapshot` was called with a request it
    /// could not serve): `Some(i)` means "store a snapshot at an applied index >= i". Stays set
    /// until `store_snapshot`/`apply_snapshot` reach `i`.
    pub fn snapshot_wanted(&self) -> Option<u64> {
        match self.inner.wanted.load(Ordering::Acquire) {
            0 => None,
            i => Some(i),
        }
    }

    /// The stored snapshot's metadata (index 0 = none).
    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.read().snapshot_meta.clone()
    }

    /// The data (partition image) of the stored snapshot; `None` when there is none.
    pub fn snapshot_data(&self) -> Result<Option<Vec<u8>>, RaftStorageError> {
        if self.read().snapshot_meta.index == 0 {
            return Ok(None);
        }
        Ok(self.inner.meta.get(SNAPSHOT_DATA_KEY)?.map(|d| d.to_vec()))
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

impl raft::Storage for SledRaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.read();
        Ok(RaftState::new(st.hard_state.clone(), st.conf_state.clone()))
    }

    /// Entries `[low, high)`, at least one even if it alone exceeds `max_size`; `Compacted`
    /// below the first index, `Unavailable` when `high > last_index + 1` (where `MemStorage`
    /// panics). One range scan; entries past the size limit are not decoded.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        // `None` and `raft::NO_LIMIT` (u64::MAX) both mean unlimited.
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let st = self.read();
        if low < st.first_index() {
            return Err(raft::Error::Store(RaftError::Compacted));
        }
        if high > st.last_index + 1 {
            return Err(raft::Error::Store(RaftError::Unavailable));
        }
        if low > high {
            return Err(self.invalid(format!("invalid slice {low} > {high}")).into());
        }
        let mut out = Vec::with_capacity((high - low).min(256) as usize);
        let mut size = 0u64;
        let mut next = low;
        for item in self.inner.log.range(key(low)..key(high)) {
            let (k, v) = item.map_err(self.sled_err())?;
            let idx = decode_key(self.inner.partition, &k)?;
            if idx != next {
                break; // reported below as a gap
            }
            // The stored bytes are the canonical encoding, so their length is exactly the
            // `compute_size()` that raft's `limit_size` sums.
            size = size.saturating_add(v.len() as u64);
            if !out.is_empty() && size > max_size {
                return Ok(out);
            }
            out.push(self.decode_entry(idx, &v)?);
            next += 1;
        }
        if next != high {
            return Err(RaftStorageError::Corrupt {
                partition: self.inner.partition,
                detail: format!(
                    "entry {next} missing from the log [{}, {}]",
                    st.first_index(),
                    st.last_index
                ),
            }
            .into());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.read();
        self.term_of(&st, idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index)
    }

    /// The stored snapshot if its index is >= `request_index` and >= the truncated index (a
    /// follower sent a snapshot must be able to continue from the log); otherwise the wish is
    /// recorded for [`SledRaftStorage::snapshot_wanted`] and the answer is
    /// `SnapshotTemporarilyUnavailable`, the only error raft tolerates here (anything else is
    /// fatal in raft), so a read failure is logged and reported the same way.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let st = self.read();
        let need = request_index.max(st.truncated_index);
        let unavailable = || raft::Error::Store(RaftError::SnapshotTemporarilyUnavailable);
        if st.snapshot_meta.index == 0 || st.snapshot_meta.index < need {
            self.wish(need);
            return Err(unavailable());
        }
        // A replica added after this snapshot was taken would refuse it (raft ignores a
        // snapshot whose configuration does not name the receiver): ask for a newer one.
        let cs = st.snapshot_meta.get_conf_state();
        let names = |id: u64| {
            cs.voters.contains(&id)
                || cs.learners.contains(&id)
                || cs.voters_outgoing.contains(&id)
                || cs.learners_next.contains(&id)
        };
        if to != 0 && !cs.voters.is_empty() && !names(to) {
            self.wish(st.snapshot_meta.index + 1);
            return Err(unavailable());
        }
        let data = match self.inner.meta.get(SNAPSHOT_DATA_KEY) {
            Ok(Some(d)) => d,
            Ok(None) => {
                tracing::error!(
                    partition = self.inner.partition,
                    "raft snapshot metadata without data"
                );
                self.wish(st.snapshot_meta.index + 1);
                return Err(unavailable());
            }
            Err(e) => {
                tracing::error!(partition = self.inner.partition, error = %e, "reading raft snapshot");
                return Err(unavailable());
            }
        };
        let mut snap = Snapshot::default();
        snap.set_metadata(st.snapshot_meta.clone());
        snap.data = data.to_vec().into();
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn open() -> (tempfile::TempDir, SledRaftStorage) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, SledRaftStorage::open(&db, 7).unwrap())
    }

    #[test]
    fn fresh_group_is_empty_until_initialized() {
        let (_dir, s) = open();
        assert!(s.is_empty());
        assert_eq!(s.first_index(), Ok(1));
        assert_eq!(s.last_index(), Ok(0));
        assert_eq!(s.term(0), Ok(0));
        assert!(!s.initial_state().unwrap().initialized());
        s.initialize(&[1, 2, 3]).unwrap();
        assert!(!s.is_empty());
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert!(matches!(
            s.initialize(&[1]),
            Err(RaftStorageError::AlreadyInitialized(7))
        ));
    }

    #[test]
    fn trees_are_named_per_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = SledRaftStorage::open(&db, 3).unwrap();
        s.append(&[entry(1, 1)]).unwrap();
        s.set_hard_state(HardState::default()).unwrap();
        let names: Vec<_> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
        assert!(names.contains(&b"g3/raft_log".to_vec()));
        assert!(names.contains(&b"g3/raft_meta".to_vec()));
        assert_eq!(
            db.open_tree("g3/raft_log")
                .unwrap()
                .get(1u64.to_be_bytes())
                .unwrap()
                .unwrap(),
            entry(1, 1).write_to_bytes().unwrap()
        );
    }

    #[test]
    fn commit_beyond_last_index_is_refused() {
        let (_dir, s) = open();
        s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        let hs = HardState {
            commit: 3,
            ..Default::default()
        };
        assert!(s.set_hard_state(hs).is_err());
        assert!(s.set_commit(3).is_err());
        s.set_commit(2).unwrap();
        assert_eq!(s.hard_state().commit, 2);
    }
}

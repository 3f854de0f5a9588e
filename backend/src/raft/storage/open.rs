//! Opening a group's storage: loading the small state into the cache and checking that the
//! log, the truncated state and the hard state agree, repairing what a crash can leave behind.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};

use super::{
    decode_key, key, Cached, DiskFaults, Inner, RaftStorageError, SledRaftStorage, CONF_STATE_KEY,
    HARD_STATE_KEY, SNAPSHOT_META_KEY, TRUNCATED_KEY,
};

impl SledRaftStorage {
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
}

//! Snapshots in storage: the one the driver builds from the applied state, the one a leader
//! sends (installed in place of the log), and the wish raft leaves when it asked for a newer
//! one than is stored.

use std::sync::atomic::Ordering;

use raft::prelude::{ConfState, Snapshot, SnapshotMetadata};
use raft::StorageError as RaftError;

use super::{
    key, truncated_bytes, RaftStorageError, SledRaftStorage, CONF_STATE_KEY, HARD_STATE_KEY,
    SNAPSHOT_DATA_KEY, SNAPSHOT_META_KEY, TRUNCATED_KEY,
};

impl SledRaftStorage {
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
}

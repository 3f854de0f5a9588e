//! Writes the driver makes from a Ready round: bootstrap, appended entries, hard and conf
//! state; and the removals: log compaction and dropping a moved-away group.
//!
//! None of them flushes (the driver flushes the shared db once per round).

use raft::prelude::{ConfState, Entry, HardState};
use raft::StorageError as RaftError;

use super::{
    key, truncated_bytes, RaftStorageError, SledRaftStorage, CONF_INDEX_KEY, CONF_STATE_KEY,
    HARD_STATE_KEY, TRUNCATED_KEY,
};

impl SledRaftStorage {
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

    /// Removes every tree of group `partition` from `db` (a replica moved away). The caller
    /// drops its storage handle first.
    pub fn destroy(db: &sled::Db, partition: u32) -> Result<(), RaftStorageError> {
        db.drop_tree(format!("g{partition}/raft_log"))?;
        db.drop_tree(format!("g{partition}/raft_meta"))?;
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
}

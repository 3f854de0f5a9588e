//! The [`raft::Storage`] trait: what raft reads (initial state, entries, terms, bounds and
//! snapshots), answered from the cache and the log tree with the errors raft tolerates.

use raft::prelude::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftError};

use super::{decode_key, key, RaftStorageError, SledRaftStorage, SNAPSHOT_DATA_KEY};

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

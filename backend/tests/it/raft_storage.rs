//! `SledRaftStorage` against raft-rs's `MemStorage` test expectations (ported from
//! raft-0.7.0/src/storage.rs), plus durability across reopen, corruption, and `RawNode` runs
//! (one voter; three voters with a follower caught up by snapshot).
//!
//! Where `SledRaftStorage` deliberately differs from `MemStorage` the expectation is marked
//! `DIFF` with the reason (see the module docs of `tiermq_backend::raft::storage`).

use std::collections::VecDeque;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage, StorageError};
use tiermq_backend::raft::storage::{RaftStorageError, SledRaftStorage};

type RaftResult<T> = raft::Result<T>;

fn new_entry(index: u64, term: u64) -> Entry {
    Entry {
        term,
        index,
        ..Default::default()
    }
}

fn new_snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters;
    s
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

fn is_other(r: &raft::Error) -> bool {
    matches!(r, raft::Error::Store(StorageError::Other(_)))
}

/// Opens the database, waiting for a previous handle's background threads to let go of the
/// file lock (sled releases it asynchronously after the last handle is dropped).
fn open_db(dir: &Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open {dir:?}: {e}"),
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    db: sled::Db,
    s: SledRaftStorage,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let s = SledRaftStorage::open(&db, 0).unwrap();
        Fixture { dir, db, s }
    }

    /// The `MemStorage` fixture `storage.wl().entries = ents`: a log holding exactly `ents`.
    /// Built the way a real log gets there: a snapshot just before the first entry (term one
    /// less than the first entry's), then an append; everything committed.
    fn with_entries(ents: &[Entry]) -> Fixture {
        let f = Fixture::new();
        let first = &ents[0];
        if first.index > 1 {
            f.s.apply_snapshot(new_snapshot(first.index - 1, first.term - 1, vec![]))
                .unwrap();
        }
        f.s.append(ents).unwrap();
        f.s.set_commit(ents.last().unwrap().index).unwrap();
        f
    }

    fn reopen(self) -> Fixture {
        let Fixture { dir, db, s } = self;
        s.flush().unwrap();
        drop(s);
        drop(db);
        let db = open_db(dir.path());
        let s = SledRaftStorage::open(&db, 0).unwrap();
        Fixture { dir, db, s }
    }

    fn all_entries(&self) -> Vec<Entry> {
        let first = self.s.first_index().unwrap();
        let last = self.s.last_index().unwrap();
        self.s.entries(first, last + 1, None, ctx()).unwrap()
    }
}

fn ents_3_4_5() -> Vec<Entry> {
    vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]
}

// ---- ported from MemStorage's tests ----

#[test]
fn test_storage_term() {
    let ents = ents_3_4_5();
    let tests: Vec<(u64, RaftResult<u64>)> = vec![
        // DIFF: MemStorage's fixture cannot know the term of 2 and answers Compacted; here the
        // log got to [3, 5] by a snapshot at 2, whose term is retained (MemStorage too
        // answers the snapshot's term for its index). Below that: Compacted.
        (1, Err(store_err(StorageError::Compacted))),
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, Err(store_err(StorageError::Unavailable))),
    ];
    for (i, (idx, wterm)) in tests.into_iter().enumerate() {
        let f = Fixture::with_entries(&ents);
        let t = f.s.term(idx);
        assert_eq!(t, wterm, "#{i}: term({idx})");
    }
}

#[test]
fn test_storage_entries() {
    let ents = vec![
        new_entry(3, 3),
        new_entry(4, 4),
        new_entry(5, 5),
        new_entry(6, 6),
    ];
    let size_of = |e: &Entry| u64::from(e.compute_size());
    let max_u64 = u64::MAX;
    let tests: Vec<(u64, u64, u64, RaftResult<Vec<Entry>>)> = vec![
        (2, 6, max_u64, Err(store_err(StorageError::Compacted))),
        (3, 4, max_u64, Ok(vec![new_entry(3, 3)])),
        (4, 5, max_u64, Ok(vec![new_entry(4, 4)])),
        (4, 6, max_u64, Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (
            4,
            7,
            max_u64,
            Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
        ),
        // even if maxsize is zero, the first entry should be returned
        (4, 7, 0, Ok(vec![new_entry(4, 4)])),
        // limit to 2
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]),
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) / 2,
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) - 1,
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        // all
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]),
            Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
        ),
    ];
    let f = Fixture::with_entries(&ents);
    for (i, (lo, hi, maxsize, wentries)) in tests.into_iter().enumerate() {
        let e = f.s.entries(lo, hi, maxsize, ctx());
        assert_eq!(e, wentries, "#{i}: entries({lo}, {hi}, {maxsize})");
    }
    // None and NO_LIMIT mean unlimited; an empty range is empty.
    assert_eq!(f.s.entries(3, 7, None, ctx()).unwrap(), ents);
    assert_eq!(f.s.entries(3, 7, raft::NO_LIMIT, ctx()).unwrap(), ents);
    assert_eq!(f.s.entries(5, 5, 0, ctx()).unwrap(), vec![]);
    // DIFF: MemStorage panics when high > last_index + 1.
    assert_eq!(
        f.s.entries(4, 8, None, ctx()),
        Err(store_err(StorageError::Unavailable))
    );
}

#[test]
fn entries_respect_max_size_with_payloads() {
    let f = Fixture::new();
    let ents: Vec<Entry> = (1..=20)
        .map(|i| {
            let mut e = new_entry(i, 1);
            e.data = vec![i as u8; 100 * i as usize].into();
            e
        })
        .collect();
    f.s.append(&ents).unwrap();
    for max in [0u64, 1, 150, 350, 1000, 5000, 30_000] {
        for lo in [1u64, 5, 19] {
            let mut want = ents[lo as usize - 1..].to_vec();
            raft::util::limit_size(&mut want, Some(max));
            assert_eq!(
                f.s.entries(lo, 21, max, ctx()).unwrap(),
                want,
                "lo {lo} max {max}"
            );
        }
    }
}

#[test]
fn test_storage_last_index() {
    let f = Fixture::with_entries(&ents_3_4_5());
    assert_eq!(f.s.last_index(), Ok(5));
    f.s.append(&[new_entry(6, 5)]).unwrap();
    assert_eq!(f.s.last_index(), Ok(6));
}

#[test]
fn test_storage_first_index() {
    let f = Fixture::with_entries(&ents_3_4_5());
    assert_eq!(f.s.first_index(), Ok(3));
    f.s.compact(4).unwrap();
    assert_eq!(f.s.first_index(), Ok(4));
}

#[test]
fn test_storage_compact() {
    let ents = ents_3_4_5();
    let tests = vec![(2, 3, 3, 3), (3, 3, 3, 3), (4, 4, 4, 2), (5, 5, 5, 1)];
    for (i, (idx, windex, wterm, wlen)) in tests.into_iter().enumerate() {
        let f = Fixture::with_entries(&ents);
        f.s.compact(idx).unwrap();
        let index = f.s.first_index().unwrap();
        assert_eq!(index, windex, "#{i}: first index");
        let term =
            f.s.entries(index, index + 1, 1, ctx())
                .map(|v| v.first().map_or(0, |e| e.term))
                .unwrap_or(0);
        assert_eq!(term, wterm, "#{i}: term");
        let last = f.s.last_index().unwrap();
        let len = f.s.entries(index, last + 1, 100, ctx()).unwrap().len();
        assert_eq!(len, wlen, "#{i}: len");
        // The term of the entry before the first is retained (trait contract).
        assert_eq!(f.s.term(index - 1), Ok(index - 1), "#{i}: term(first - 1)");
        assert_eq!(
            f.s.term(index - 2),
            Err(store_err(StorageError::Compacted)),
            "#{i}"
        );
    }
}

#[test]
fn compact_everything_and_beyond() {
    let f = Fixture::with_entries(&ents_3_4_5());
    // Compacting to last + 1 empties the log; first stays at last + 1 (DIFF: MemStorage
    // falls back to snapshot index + 1 once its vector is empty).
    f.s.compact(6).unwrap();
    assert_eq!(f.s.first_index(), Ok(6));
    assert_eq!(f.s.last_index(), Ok(5));
    assert_eq!(f.s.term(5), Ok(5));
    assert_eq!(f.s.entries(6, 6, None, ctx()), Ok(vec![]));
    f.s.append(&[new_entry(6, 6)]).unwrap();
    assert_eq!(f.all_entries(), vec![new_entry(6, 6)]);
    // DIFF: MemStorage panics when compacting beyond last + 1.
    assert!(is_other(&f.s.compact(8).unwrap_err()));
    // Never beyond commit + 1 (commit is 5 here).
    assert!(is_other(&f.s.compact(7).unwrap_err()));
    f.s.set_commit(6).unwrap();
    f.s.compact(7).unwrap();
    assert_eq!(f.s.first_index(), Ok(7));
}

#[test]
fn test_storage_create_snapshot() {
    // MemStorage builds snapshots itself from hard_state.commit (without data); here the
    // driver stores them. Same metadata expectations for the served cases.
    let ents = ents_3_4_5();
    let nodes = vec![1, 2, 3];
    let cs = ConfState {
        voters: nodes.clone(),
        ..Default::default()
    };

    let with_data = |mut s: Snapshot, data: &[u8]| {
        s.data = data.to_vec().into();
        s
    };
    // (index stored, requested index, result)
    let unavailable = Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
    let tests: Vec<(u64, u64, RaftResult<Snapshot>, Option<u64>)> = vec![
        (
            4,
            0,
            Ok(with_data(new_snapshot(4, 4, nodes.clone()), b"img4")),
            None,
        ),
        (
            5,
            5,
            Ok(with_data(new_snapshot(5, 5, nodes.clone()), b"img5")),
            None,
        ),
        // DIFF: MemStorage fakes a snapshot at the requested index (6) with the data at 5;
        // here the wish is recorded and raft retries later.
        (5, 6, unavailable, Some(6)),
    ];
    for (i, (idx, windex, wresult, wwanted)) in tests.into_iter().enumerate() {
        let f = Fixture::with_entries(&ents);
        f.s.store_snapshot(idx, idx, cs.clone(), format!("img{idx}").into_bytes())
            .unwrap();
        let result = f.s.snapshot(windex, 0);
        assert_eq!(result, wresult, "#{i}");
        assert_eq!(f.s.snapshot_wanted(), wwanted, "#{i}");
    }
}

#[test]
fn snapshot_wishes_are_recorded_until_served() {
    let f = Fixture::with_entries(&ents_3_4_5());
    let cs = ConfState::default();
    // A snapshot at the fixture's base (2) was installed by apply_snapshot: served.
    assert_eq!(f.s.snapshot(0, 2).unwrap().get_metadata().index, 2);
    assert_eq!(f.s.snapshot_wanted(), None);

    // Compacting beyond the stored snapshot: a follower needs one covering the truncated index.
    f.s.compact(5).unwrap();
    assert_eq!(
        f.s.snapshot(0, 2),
        Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
    );
    assert_eq!(f.s.snapshot_wanted(), Some(4));
    // A larger request raises the wish; a smaller one does not lower it.
    let _ = f.s.snapshot(5, 3);
    let _ = f.s.snapshot(0, 3);
    assert_eq!(f.s.snapshot_wanted(), Some(5));
    // A snapshot below the wish does not satisfy it...
    f.s.store_snapshot(4, 4, cs.clone(), b"four".to_vec())
        .unwrap();
    assert_eq!(f.s.snapshot_wanted(), Some(5));
    assert_eq!(f.s.snapshot(0, 2).unwrap().data.as_ref(), b"four");
    // ...one at it does.
    f.s.store_snapshot(5, 5, cs.clone(), b"five".to_vec())
        .unwrap();
    assert_eq!(f.s.snapshot_wanted(), None);
    let snap = f.s.snapshot(5, 3).unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (5, 5)
    );
    assert_eq!(snap.data.as_ref(), b"five");
}

#[test]
fn store_snapshot_preconditions() {
    let f = Fixture::new();
    let cs = ConfState::default();
    // Nothing stored yet: unavailable, and some snapshot is wanted.
    assert_eq!(
        f.s.snapshot(0, 2),
        Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
    );
    assert_eq!(f.s.snapshot_wanted(), Some(1));
    f.s.append(&[new_entry(1, 1), new_entry(2, 1), new_entry(3, 2)])
        .unwrap();
    f.s.set_commit(2).unwrap();
    // Beyond the commit.
    assert!(is_other(
        &f.s.store_snapshot(3, 2, cs.clone(), vec![]).unwrap_err()
    ));
    // Wrong term.
    assert!(is_other(
        &f.s.store_snapshot(2, 2, cs.clone(), vec![]).unwrap_err()
    ));
    assert!(is_other(
        &f.s.store_snapshot(0, 0, cs.clone(), vec![]).unwrap_err()
    ));
    f.s.store_snapshot(2, 1, cs.clone(), vec![]).unwrap();
    // Re-storing at the same index is allowed; an older one is out of date.
    f.s.store_snapshot(2, 1, cs.clone(), b"again".to_vec())
        .unwrap();
    assert_eq!(f.s.snapshot(0, 2).unwrap().data.as_ref(), b"again");
    assert_eq!(
        f.s.store_snapshot(1, 1, cs, vec![]),
        Err(store_err(StorageError::SnapshotOutOfDate))
    );
}

#[test]
fn test_storage_append() {
    let ents = ents_3_4_5();
    let tests: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (
            vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
            Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
        ),
        (
            vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ]),
        ),
        // overwrite compacted raft logs is not allowed (MemStorage panics; here an error)
        (
            vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)],
            None,
        ),
        // truncate the existing entries and append
        (
            vec![new_entry(4, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 5)]),
        ),
        // direct append
        (
            vec![new_entry(6, 6)],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 6),
            ]),
        ),
    ];
    for (i, (entries, wentries)) in tests.into_iter().enumerate() {
        let f = Fixture::with_entries(&ents);
        let res = f.s.append(&entries);
        match wentries {
            Some(wentries) => {
                res.unwrap();
                assert_eq!(f.all_entries(), wentries, "#{i}");
                // and durably so
                let f = f.reopen();
                assert_eq!(f.all_entries(), wentries, "#{i} after reopen");
            }
            None => {
                assert_eq!(res, Err(store_err(StorageError::Compacted)), "#{i}");
                assert_eq!(f.all_entries(), ents, "#{i}: unchanged");
            }
        }
    }
}

#[test]
fn append_rejects_gaps_and_keeps_log_intact() {
    let f = Fixture::with_entries(&ents_3_4_5());
    // A gap after the last index (MemStorage panics).
    assert!(is_other(&f.s.append(&[new_entry(7, 5)]).unwrap_err()));
    // A non-contiguous batch.
    assert!(is_other(
        &f.s.append(&[new_entry(6, 5), new_entry(8, 5)]).unwrap_err()
    ));
    assert_eq!(f.all_entries(), ents_3_4_5());
    assert_eq!(f.s.append(&[]), Ok(()));
}

#[test]
fn test_storage_apply_snapshot() {
    let nodes = vec![1, 2, 3];
    let f = Fixture::new();

    // Apply snapshot successfully
    let mut snap = new_snapshot(4, 4, nodes.clone());
    snap.data = b"image".to_vec().into();
    f.s.apply_snapshot(snap.clone()).unwrap();

    // Apply snapshot fails due to StorageError::SnapshotOutOfDate
    assert_eq!(
        f.s.apply_snapshot(new_snapshot(3, 3, nodes.clone())),
        Err(store_err(StorageError::SnapshotOutOfDate))
    );

    // The state MemStorage would have, plus the snapshot kept for serving.
    assert_eq!(f.s.first_index(), Ok(5));
    assert_eq!(f.s.last_index(), Ok(4));
    assert_eq!(f.s.term(4), Ok(4));
    let rs = f.s.initial_state().unwrap();
    assert_eq!((rs.hard_state.commit, rs.hard_state.term), (4, 4));
    assert_eq!(rs.conf_state.voters, nodes);
    assert_eq!(f.s.snapshot(4, 2), Ok(snap.clone()));
}

#[test]
fn apply_snapshot_replaces_the_log_and_keeps_a_higher_term() {
    let f = Fixture::new();
    f.s.append(
        &(1..=10)
            .map(|i| new_entry(i, 1 + i / 4))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let hs = HardState {
        term: 9,
        vote: 2,
        commit: 3,
        ..Default::default()
    };
    f.s.set_hard_state(hs).unwrap();
    f.s.apply_snapshot(new_snapshot(6, 2, vec![1, 2])).unwrap();
    assert_eq!(f.s.first_index(), Ok(7));
    assert_eq!(f.s.last_index(), Ok(6));
    assert_eq!(f.s.term(7), Err(store_err(StorageError::Unavailable)));
    let hs = f.s.hard_state();
    assert_eq!((hs.term, hs.vote, hs.commit), (9, 2, 6));
    let f = f.reopen();
    assert_eq!(f.s.first_index(), Ok(7));
    assert_eq!(f.s.last_index(), Ok(6));
    assert_eq!(f.s.term(6), Ok(2));
    assert!(f.all_entries().is_empty());
    assert_eq!(f.s.initial_state().unwrap().conf_state.voters, vec![1, 2]);
    f.s.append(&[new_entry(7, 3)]).unwrap();
    assert_eq!(f.all_entries(), vec![new_entry(7, 3)]);
}

// ---- durability, isolation, corruption ----

#[test]
fn reopen_recovers_log_hard_state_conf_state_and_snapshot() {
    let f = Fixture::new();
    assert!(f.s.is_empty());
    f.s.initialize(&[1, 2, 3]).unwrap();
    let ents: Vec<Entry> = (1..=30)
        .map(|i| {
            let mut e = new_entry(i, 1 + i / 10);
            e.data = format!("cmd{i}").into_bytes().into();
            e
        })
        .collect();
    f.s.append(&ents[..20]).unwrap();
    f.s.append(&ents[20..]).unwrap();
    let mut hs = HardState {
        term: 4,
        vote: 3,
        commit: 25,
        ..Default::default()
    };
    f.s.set_hard_state(hs.clone()).unwrap();
    f.s.set_commit(27).unwrap();
    hs.commit = 27;
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    f.s.set_conf_state(cs.clone()).unwrap();
    let snap_cs = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    f.s.store_snapshot(20, 3, snap_cs.clone(), b"partition image".to_vec())
        .unwrap();
    f.s.compact(16).unwrap();

    let f = f.reopen();
    assert!(!f.s.is_empty());
    assert_eq!(f.s.first_index(), Ok(16));
    assert_eq!(f.s.last_index(), Ok(30));
    assert_eq!(f.s.term(15), Ok(2));
    assert_eq!(f.s.term(14), Err(store_err(StorageError::Compacted)));
    assert_eq!(f.all_entries(), ents[15..].to_vec());
    let rs = f.s.initial_state().unwrap();
    assert_eq!(rs.hard_state, hs);
    assert_eq!(rs.conf_state, cs);
    let snap = f.s.snapshot(0, 2).unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (20, 3)
    );
    assert_eq!(snap.get_metadata().get_conf_state(), &snap_cs);
    assert_eq!(snap.data.as_ref(), b"partition image");
    assert_eq!(f.s.snapshot_wanted(), None);
}

#[test]
fn groups_and_clones_share_nothing_but_what_they_should() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let a = SledRaftStorage::open(&db, 1).unwrap();
    let b = SledRaftStorage::open(&db, 2).unwrap();
    a.append(&[new_entry(1, 1), new_entry(2, 1)]).unwrap();
    b.append(&[new_entry(1, 5)]).unwrap();
    assert_eq!(a.last_index(), Ok(2));
    assert_eq!(b.last_index(), Ok(1));
    assert_eq!(b.term(1), Ok(5));
    // A clone sees the original's writes (shared cache).
    let a2 = a.clone();
    a.append(&[new_entry(3, 2)]).unwrap();
    assert_eq!(a2.last_index(), Ok(3));
    assert_eq!(a2.term(3), Ok(2));
    assert_eq!(a.partition(), 1);
}

fn corrupt_log_entry(path: &Path, index: u64) {
    let db = open_db(path);
    db.open_tree("g0/raft_log")
        .unwrap()
        .insert(index.to_be_bytes(), &[0xff, 0xff, 0xff][..])
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn corrupt_entry_is_an_error_not_a_panic() {
    let f = Fixture::with_entries(&ents_3_4_5());
    f.s.flush().unwrap();
    let Fixture { dir, db, s } = f;
    drop(s);
    drop(db);
    corrupt_log_entry(dir.path(), 4);

    let db = open_db(dir.path());
    let s = SledRaftStorage::open(&db, 0).unwrap();
    assert_eq!(s.entries(3, 4, None, ctx()), Ok(vec![new_entry(3, 3)]));
    let err = s.entries(3, 6, None, ctx()).unwrap_err();
    assert!(is_other(&err), "{err:?}");
    assert!(err.to_string().contains("corrupt log entry 4"), "{err}");
    assert!(is_other(&s.term(4).unwrap_err()));
    // The last entry is cached and unaffected.
    assert_eq!(s.term(5), Ok(5));
    // compact needs the term of index - 1.
    assert!(is_other(&s.compact(5).unwrap_err()));
    assert_eq!(s.first_index(), Ok(3));
}

#[test]
fn corrupt_last_entry_or_meta_fails_open() {
    let f = Fixture::with_entries(&ents_3_4_5());
    f.s.flush().unwrap();
    let Fixture { dir, db, s } = f;
    drop(s);
    drop(db);

    corrupt_log_entry(dir.path(), 5);
    {
        let db = open_db(dir.path());
        match SledRaftStorage::open(&db, 0) {
            Err(RaftStorageError::Decode { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a corrupt log"),
        }
        // An entry stored under the wrong key.
        db.open_tree("g0/raft_log")
            .unwrap()
            .insert(
                5u64.to_be_bytes(),
                new_entry(9, 5).write_to_bytes().unwrap(),
            )
            .unwrap();
        assert!(matches!(
            SledRaftStorage::open(&db, 0),
            Err(RaftStorageError::Corrupt { .. })
        ));
        db.open_tree("g0/raft_log")
            .unwrap()
            .insert(
                5u64.to_be_bytes(),
                new_entry(5, 5).write_to_bytes().unwrap(),
            )
            .unwrap();
        SledRaftStorage::open(&db, 0).unwrap();

        let meta = db.open_tree("g0/raft_meta").unwrap();
        for k in [&b"hard_state"[..], b"conf_state", b"snapshot_meta"] {
            let old = meta.insert(k, &[0xff, 0xff][..]).unwrap().unwrap();
            assert!(
                matches!(
                    SledRaftStorage::open(&db, 0),
                    Err(RaftStorageError::Decode { .. })
                ),
                "{}",
                String::from_utf8_lossy(k)
            );
            meta.insert(k, old).unwrap();
        }
        let old = meta.insert(b"truncated", &[1u8; 3][..]).unwrap().unwrap();
        assert!(matches!(
            SledRaftStorage::open(&db, 0),
            Err(RaftStorageError::Corrupt { .. })
        ));
        meta.insert(b"truncated", old).unwrap();
        // A hole at the start of the log.
        db.open_tree("g0/raft_log")
            .unwrap()
            .remove(3u64.to_be_bytes())
            .unwrap();
        assert!(matches!(
            SledRaftStorage::open(&db, 0),
            Err(RaftStorageError::Corrupt { .. })
        ));
    }
}

#[test]
fn hole_in_the_middle_is_an_error_from_entries() {
    let f = Fixture::with_entries(&ents_3_4_5());
    f.db.open_tree("g0/raft_log")
        .unwrap()
        .remove(4u64.to_be_bytes())
        .unwrap();
    assert!(is_other(&f.s.entries(3, 6, None, ctx()).unwrap_err()));
    assert!(is_other(&f.s.entries(4, 5, None, ctx()).unwrap_err()));
    assert!(is_other(&f.s.term(4).unwrap_err()));
}

// ---- RawNode over SledRaftStorage ----

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn config(id: u64, applied: u64) -> Config {
    let c = Config {
        id,
        election_tick: 10,
        heartbeat_tick: 1,
        applied,
        max_size_per_msg: 4096,
        max_inflight_msgs: 64,
        ..Default::default()
    };
    c.validate().unwrap();
    c
}

/// A replica: storage, node, and a toy state machine (the applied commands in order).
struct Replica {
    dir: tempfile::TempDir,
    db: sled::Db,
    store: SledRaftStorage,
    node: RawNode<SledRaftStorage>,
    applied: Vec<Vec<u8>>,
    applied_index: u64,
}

impl Replica {
    fn new(id: u64, voters: &[u64]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let store = SledRaftStorage::open(&db, 0).unwrap();
        assert!(store.is_empty());
        store.initialize(voters).unwrap();
        let node = RawNode::new(&config(id, 0), store.clone(), &logger()).unwrap();
        Replica {
            dir,
            db,
            store,
            node,
            applied: Vec::new(),
            applied_index: 0,
        }
    }

    /// Drops node, storage and db, and reopens them; the state machine is kept (it would
    /// live in the same sled db in the real backend, flushed with it).
    fn restart(self) -> Replica {
        let id = self.node.raft.id;
        let Replica {
            dir,
            db,
            store,
            node,
            applied,
            applied_index,
        } = self;
        store.flush().unwrap();
        drop(node);
        drop(store);
        drop(db);
        let db = open_db(dir.path());
        let store = SledRaftStorage::open(&db, 0).unwrap();
        assert!(!store.is_empty());
        let node = RawNode::new(&config(id, applied_index), store.clone(), &logger()).unwrap();
        Replica {
            dir,
            db,
            store,
            node,
            applied,
            applied_index,
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            assert_eq!(e.index, self.applied_index + 1, "applied in order");
            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                self.applied.push(e.data.to_vec());
            }
            self.applied_index = e.index;
        }
    }

    /// One Ready round in the documented order; returns the messages to send.
    fn handle_ready(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        if !self.node.has_ready() {
            return out;
        }
        let mut rd = self.node.ready();
        out.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.store.apply_snapshot(snap.clone()).unwrap();
            self.applied = decode_image(&snap.data);
            self.applied_index = snap.get_metadata().index;
        }
        let committed = rd.take_committed_entries();
        self.apply(committed);
        self.store.append(rd.entries()).unwrap();
        if let Some(hs) = rd.hs() {
            self.store.set_hard_state(hs.clone()).unwrap();
        }
        self.db.flush().unwrap();
        out.extend(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit).unwrap();
        }
        out.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed);
        self.node.advance_apply();
        // The driver's snapshot duty: serve wishes from the applied state.
        if let Some(wanted) = self.store.snapshot_wanted() {
            if self.applied_index >= wanted {
                let term = self.store.term(self.applied_index).unwrap();
                let cs = self.store.initial_state().unwrap().conf_state;
                self.store
                    .store_snapshot(self.applied_index, term, cs, encode_image(&self.applied))
                    .unwrap();
            }
        }
        out
    }
}

fn encode_image(applied: &[Vec<u8>]) -> Vec<u8> {
    applied.join(&b'\n')
}

fn decode_image(data: &[u8]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

fn cmd(i: usize) -> Vec<u8> {
    format!("cmd{i}").into_bytes()
}

#[test]
fn raw_node_single_voter_commits_and_recovers() {
    let mut r = Replica::new(1, &[1]);
    r.node.campaign().unwrap();
    while r.node.has_ready() {
        assert!(r.handle_ready().is_empty());
    }
    assert_eq!(r.node.raft.state, StateRole::Leader);

    for i in 0..100 {
        r.node.propose(vec![], cmd(i)).unwrap();
        if i % 7 == 0 {
            r.handle_ready();
        }
    }
    while r.node.has_ready() {
        r.handle_ready();
    }
    assert_eq!(r.applied, (0..100).map(cmd).collect::<Vec<_>>());
    let last = r.store.last_index().unwrap();
    assert_eq!(last, 101, "an empty entry on election + 100 commands");
    let hs = r.store.hard_state();
    assert_eq!(hs.commit, last);
    assert_eq!(r.node.raft.raft_log.committed, last);
    let term = hs.term;

    let r = r.restart();
    assert_eq!(r.node.raft.raft_log.last_index(), last);
    assert_eq!(r.node.raft.raft_log.committed, last);
    assert_eq!(r.node.raft.term, term);
    assert_eq!(r.store.hard_state(), hs);

    // It carries on: elected again, one more command committed.
    let mut r = r;
    r.node.campaign().unwrap();
    while r.node.has_ready() {
        r.handle_ready();
    }
    r.node.propose(vec![], cmd(100)).unwrap();
    while r.node.has_ready() {
        r.handle_ready();
    }
    assert_eq!(r.applied.len(), 101);
    assert_eq!(r.store.hard_state().commit, last + 2);
    assert_eq!(r.node.raft.term, term + 1);
}

/// Three replicas in memory; messages to or from `cut` are dropped.
struct Cluster {
    replicas: Vec<Option<Replica>>,
    cut: Option<u64>,
    queue: VecDeque<Message>,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            replicas: (1..=3)
                .map(|id| Some(Replica::new(id, &[1, 2, 3])))
                .collect(),
            cut: None,
            queue: VecDeque::new(),
        }
    }

    fn r(&mut self, id: u64) -> &mut Replica {
        self.replicas[id as usize - 1].as_mut().unwrap()
    }

    /// Handles Readys and delivers messages until quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            for id in 1..=3 {
                let msgs = self.r(id).handle_ready();
                self.queue.extend(msgs);
            }
            if self.queue.is_empty() && (1..=3).all(|id| !self.r(id).node.has_ready()) {
                return;
            }
            while let Some(m) = self.queue.pop_front() {
                if self.cut == Some(m.from) || self.cut == Some(m.to) {
                    continue;
                }
                let to = m.to;
                // A failed step (e.g. a stale message) is not a storage problem here.
                let _ = self.r(to).node.step(m);
            }
        }
        panic!("cluster does not settle");
    }

    fn tick(&mut self) {
        for id in 1..=3 {
            if self.cut != Some(id) {
                self.r(id).node.tick();
            }
        }
        self.settle();
    }
}

#[test]
fn raw_node_three_voters_follower_catches_up_by_snapshot() {
    let mut c = Cluster::new();
    c.r(1).node.campaign().unwrap();
    c.settle();
    assert_eq!(c.r(1).node.raft.state, StateRole::Leader);

    for i in 0..20 {
        c.r(1).node.propose(vec![], cmd(i)).unwrap();
    }
    c.settle();
    for id in 1..=3 {
        assert_eq!(c.r(id).applied.len(), 20, "replica {id}");
    }

    // Cut replica 3 off; the majority goes on.
    c.cut = Some(3);
    for i in 20..50 {
        c.r(1).node.propose(vec![], cmd(i)).unwrap();
        if i % 10 == 0 {
            c.settle();
        }
    }
    c.settle();
    assert_eq!(c.r(1).applied.len(), 50);
    assert_eq!(c.r(2).applied.len(), 50);
    assert_eq!(c.r(3).applied.len(), 20);
    let lagging_last = c.r(3).store.last_index().unwrap();

    // Compact the majority's logs past replica 3's last index, without a stored snapshot:
    // the leader must ask for one (snapshot_wanted), the driver builds it, raft sends it.
    for id in 1..=2 {
        let applied = c.r(id).applied_index;
        c.r(id).store.compact(applied).unwrap();
        assert!(c.r(id).store.first_index().unwrap() > lagging_last + 1);
    }
    c.cut = None;
    for _ in 0..50 {
        c.tick();
        if c.r(3).applied.len() == 50 {
            break;
        }
    }
    let leader_applied = c.r(1).applied.clone();
    assert_eq!(c.r(3).applied, leader_applied, "caught up by snapshot");
    let snap = c.r(3).store.snapshot_metadata();
    assert!(snap.index > lagging_last, "replica 3 installed a snapshot");
    assert_eq!(c.r(3).store.first_index().unwrap(), snap.index + 1);
    // The leader built it on request (nobody stored one before).
    assert!(c.r(1).store.snapshot_metadata().index >= snap.index);
    assert_eq!(c.r(1).store.snapshot_wanted(), None);

    // Replication by log continues, and replica 3 restarts from its snapshot + log.
    for i in 50..60 {
        c.r(1).node.propose(vec![], cmd(i)).unwrap();
    }
    c.settle();
    let want: Vec<Vec<u8>> = (0..60).map(cmd).collect();
    for id in 1..=3 {
        assert_eq!(c.r(id).applied, want, "replica {id}");
    }
    let last = c.r(3).store.last_index().unwrap();
    let commit = c.r(3).store.hard_state().commit;
    let r3 = c.replicas[2].take().unwrap().restart();
    assert_eq!(r3.node.raft.raft_log.last_index(), last);
    assert_eq!(r3.node.raft.raft_log.committed, commit);
    assert_eq!(r3.node.raft.raft_log.first_index(), snap.index + 1);
    c.replicas[2] = Some(r3);
    c.r(1).node.propose(vec![], cmd(60)).unwrap();
    c.settle();
    assert_eq!(c.r(3).applied.len(), 61);
    let leader_applied = c.r(1).applied.clone();
    assert_eq!(c.r(3).applied, leader_applied);
}

#[test]
fn hard_state_commit_beyond_a_lost_log_tail_is_clamped_on_open() {
    // A crash can keep a round's hard state but lose its entries (nothing of that round was
    // acknowledged); raft refuses commit > last index, so open clamps it.
    let f = Fixture::with_entries(&ents_3_4_5());
    let hs = HardState {
        term: 5,
        vote: 1,
        commit: 9,
        ..Default::default()
    };
    f.db.open_tree("g0/raft_meta")
        .unwrap()
        .insert(b"hard_state", hs.write_to_bytes().unwrap())
        .unwrap();
    let f = f.reopen();
    let got = f.s.hard_state();
    assert_eq!((got.term, got.vote, got.commit), (5, 1, 5));
}

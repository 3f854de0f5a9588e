//! Unit tests of the storage internals (the behaviour against raft's contract is tested in
//! `backend/tests/it/raft_storage.rs`).

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

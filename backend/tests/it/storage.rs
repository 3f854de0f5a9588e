//! The partition store: write-ahead log + incremental checkpoints in sled.
//!
//! Every test compares against the same commands applied in memory: recovery (checkpoint +
//! replay of the log tail) must give back exactly that state.

use std::path::Path;
use std::sync::Arc;

use tiermq_backend::partition::command::{AckCmd, Command, Entry};
use tiermq_backend::partition::session::SessionLimits;
use tiermq_backend::partition::Partition;
use tiermq_backend::storage::{PartitionStore, StorageError};
use tiermq_common::session_api::{SubscribeRequest, SubscriptionOptions, Will};
use tiermq_common::{Message, ProtocolVersion, QoS};

const T0: u64 = 1_700_000_000_000;

/// Opens the database, waiting for a previous handle's background threads to let go of the
/// file lock (sled releases it asynchronously after the last handle is dropped).
fn open_db(dir: &Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return db,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open {dir:?}: {e}"),
        }
    }
}

fn connect(id: &str, expiry: u32, will: bool) -> Command {
    Command::Connect {
        client_id: id.into(),
        protocol: ProtocolVersion::V5,
        clean_start: false,
        session_expiry_secs: expiry,
        receive_maximum: 2,
        will: will.then(|| Will {
            message: Message::new(format!("will/{id}"), "bye", QoS::AtLeastOnce, false),
            delay_secs: 30,
        }),
        frontend_id: 0,
        connection: 0,
    }
}

fn subscribe(id: &str, epoch: u64, filter: &str) -> Command {
    Command::Subscribe {
        client_id: id.into(),
        epoch,
        subscriptions: vec![SubscribeRequest {
            filter: filter.into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..Default::default()
            },
            subscription_id: Some(1),
        }],
    }
}

fn publish(topic: &str, payload: &str, qos: QoS, retain: bool) -> Command {
    Command::Publish {
        message: Arc::new(Message::new(topic, payload.to_string(), qos, retain)),
        publisher: None,
        store_retained: retain,
        inbound_qos2: None,
    }
}

fn disconnect(id: &str, epoch: u64, expiry: Option<u32>) -> Command {
    Command::Disconnect {
        client_id: id.into(),
        epoch,
        normal: false,
        with_will: false,
        session_expiry_secs: expiry,
    }
}

fn ack(id: &str, epoch: u64, kind: AckCmd, packet_id: u16) -> Command {
    Command::Ack {
        client_id: id.into(),
        epoch,
        kind,
        packet_id,
    }
}

/// A workload touching sessions, queues, in-flight state, retained messages and timers.
/// Epochs are log indexes, so the connect of entry `i` (1-based) has epoch `i`.
fn workload() -> Vec<Entry> {
    let cmds = vec![
        connect("a", 3600, true),                       // 1: a epoch 1
        subscribe("a", 1, "t/#"),                       // 2
        connect("b", 0, false),                         // 3: b epoch 3
        subscribe("b", 3, "t/1"),                       // 4
        publish("t/1", "m1", QoS::AtLeastOnce, false),  // 5
        publish("t/2", "m2", QoS::ExactlyOnce, false),  // 6
        publish("t/3", "m3", QoS::AtLeastOnce, false),  // 7: a's window (2) is full
        ack("a", 1, AckCmd::PubAck, 1),                 // 8
        ack("a", 1, AckCmd::PubRec, 2),                 // 9
        publish("r/1", "keep", QoS::AtLeastOnce, true), // 10
        publish("r/2", "gone", QoS::AtLeastOnce, true), // 11
        Command::Qos2Received {
            client_id: "a".into(),
            epoch: 1,
            packet_id: 77,
        }, // 12
        disconnect("a", 1, None),                       // 13: a offline, will pending
        publish("t/4", "m4", QoS::AtLeastOnce, false),  // 14: queued for a
        publish("r/2", "", QoS::AtLeastOnce, true),     // 15: r/2 deleted
        disconnect("b", 3, None),                       // 16: b removed (expiry 0)
        connect("c", 60, false),                        // 17
        subscribe("c", 17, "r/#"),                      // 18: gets r/1
        Command::Tick,                                  // 19
    ];
    cmds.into_iter()
        .enumerate()
        .map(|(i, command)| Entry {
            now_ms: T0 + i as u64 * 1000,
            command,
        })
        .collect()
}

fn image_bytes(p: &Partition) -> Vec<u8> {
    postcard::to_stdvec(&p.image()).unwrap()
}

fn in_memory(entries: &[Entry]) -> Partition {
    let mut p = Partition::new(SessionLimits::default());
    for (i, e) in entries.iter().enumerate() {
        p.apply(i as u64 + 1, e.clone());
    }
    p
}

/// Appends `entries` in batches of `batch` (applying each), checkpointing after the batch that
/// reaches `checkpoint_after` entries, if any. Returns the live partition.
async fn run(
    store: &PartitionStore,
    entries: &[Entry],
    batch: usize,
    checkpoint_after: Option<usize>,
) -> Partition {
    let mut p = Partition::new(SessionLimits::default());
    let mut index = 1u64;
    let mut checkpointed = false;
    for chunk in entries.chunks(batch) {
        store.append(index, chunk).unwrap();
        store.flush().await.unwrap();
        for e in chunk {
            p.apply(index, e.clone());
            index += 1;
        }
        if let Some(n) = checkpoint_after {
            if !checkpointed && (index - 1) as usize >= n {
                store.checkpoint(&mut p).unwrap();
                checkpointed = true;
            }
        }
    }
    p
}

/// Reopens the store and rebuilds the partition from checkpoint + tail.
fn recover(dir: &Path) -> (Partition, usize) {
    let db = open_db(dir);
    let store = PartitionStore::open(&db, 0).unwrap();
    let r = store.recover(SessionLimits::default()).unwrap();
    let mut p = r.partition;
    let n = r.tail.len();
    for (index, e) in r.tail {
        p.apply(index, e);
    }
    (p, n)
}

#[tokio::test]
async fn recover_from_log_only() {
    let dir = tempfile::tempdir().unwrap();
    let entries = workload();
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        run(&store, &entries, 3, None).await;
        assert_eq!(store.log_records(), entries.len().div_ceil(3));
    }
    let (p, replayed) = recover(dir.path());
    assert_eq!(replayed, entries.len());
    assert_eq!(image_bytes(&p), image_bytes(&in_memory(&entries)));
    assert_eq!(p.applied_index(), entries.len() as u64);
}

#[tokio::test]
async fn recover_from_checkpoint_plus_tail() {
    let entries = workload();
    let expected = image_bytes(&in_memory(&entries));
    for checkpoint_after in 1..entries.len() {
        let dir = tempfile::tempdir().unwrap();
        let covered;
        {
            let db = open_db(dir.path());
            let store = PartitionStore::open(&db, 0).unwrap();
            let live = run(&store, &entries, 2, Some(checkpoint_after)).await;
            assert_eq!(image_bytes(&live), expected);
            covered = checkpoint_after.div_ceil(2) * 2;
            assert_eq!(
                store.log_records(),
                (entries.len() - covered).div_ceil(2),
                "checkpoint deletes exactly the covered records"
            );
        }
        let (p, replayed) = recover(dir.path());
        assert_eq!(
            replayed,
            entries.len() - covered,
            "checkpoint at {checkpoint_after}"
        );
        assert_eq!(
            image_bytes(&p),
            expected,
            "checkpoint at {checkpoint_after}"
        );
    }
}

#[tokio::test]
async fn checkpoint_of_everything_then_more() {
    let dir = tempfile::tempdir().unwrap();
    let entries = workload();
    let (first, rest) = entries.split_at(10);
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        let mut p = run(&store, first, 4, None).await;
        store.checkpoint(&mut p).unwrap();
        assert_eq!(store.log_records(), 0);
        // A second checkpoint with nothing new is harmless.
        store.checkpoint(&mut p).unwrap();
        let mut index = p.applied_index() + 1;
        for chunk in rest.chunks(4) {
            store.append(index, chunk).unwrap();
            for e in chunk {
                p.apply(index, e.clone());
                index += 1;
            }
        }
        store.flush().await.unwrap();
        assert_eq!(store.log_records(), rest.len().div_ceil(4));
    }
    let (p, replayed) = recover(dir.path());
    assert_eq!(replayed, rest.len());
    assert_eq!(image_bytes(&p), image_bytes(&in_memory(&entries)));
    // Recover, checkpoint, recover again: still the same.
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        let r = store.recover(SessionLimits::default()).unwrap();
        let mut p = r.partition;
        for (i, e) in r.tail {
            p.apply(i, e);
        }
        store.checkpoint(&mut p).unwrap();
        assert_eq!(store.log_records(), 0);
    }
    let (p, replayed) = recover(dir.path());
    assert_eq!(replayed, 0);
    assert_eq!(image_bytes(&p), image_bytes(&in_memory(&entries)));
}

#[tokio::test]
async fn checkpoint_keeps_a_batch_that_straddles_it() {
    let dir = tempfile::tempdir().unwrap();
    let entries = workload();
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        // One record holding entries 1..=6, of which only 1..=4 are applied at checkpoint time.
        store.append(1, &entries[..6]).unwrap();
        store.flush().await.unwrap();
        let mut p = Partition::new(SessionLimits::default());
        for (i, e) in entries[..4].iter().enumerate() {
            p.apply(i as u64 + 1, e.clone());
        }
        store.checkpoint(&mut p).unwrap();
        assert_eq!(
            store.log_records(),
            1,
            "entries 5 and 6 exist only in that record"
        );
    }
    let (p, replayed) = recover(dir.path());
    assert_eq!(replayed, 2);
    assert_eq!(image_bytes(&p), image_bytes(&in_memory(&entries[..6])));
}

#[tokio::test]
async fn removals_are_written_by_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let e = |i: u64, command| Entry {
        now_ms: T0 + i * 1000,
        command,
    };
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        let mut p = Partition::new(SessionLimits::default());
        let first = vec![
            e(0, connect("gone", 10, false)),
            e(1, subscribe("gone", 1, "x/#")),
            e(2, publish("r/x", "v", QoS::AtLeastOnce, true)),
            e(3, connect("stays", 3600, false)),
        ];
        store.append(1, &first).unwrap();
        for (i, x) in first.into_iter().enumerate() {
            p.apply(i as u64 + 1, x);
        }
        store.checkpoint(&mut p).unwrap();
        assert_eq!(p.session_count(), 2);
        assert_eq!(p.retained_count(), 1);
        // Delete the retained message; the session ends (expiry 0 at disconnect).
        let second = vec![
            e(4, publish("r/x", "", QoS::AtLeastOnce, true)),
            e(5, disconnect("gone", 1, Some(0))),
        ];
        store.append(5, &second).unwrap();
        for (i, x) in second.into_iter().enumerate() {
            p.apply(i as u64 + 5, x);
        }
        store.checkpoint(&mut p).unwrap();
        assert_eq!(store.log_records(), 0);
    }
    let (p, replayed) = recover(dir.path());
    assert_eq!(replayed, 0);
    assert!(p.session("gone").is_none(), "deleted session came back");
    assert!(
        p.retained_message("r/x").is_none(),
        "deleted retained message came back"
    );
    assert!(p.session("stays").is_some());
    assert!(p.filters().is_empty());
}

#[tokio::test]
async fn session_expired_by_tick_is_removed_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        let mut p = Partition::new(SessionLimits::default());
        let cmds = [connect("s", 5, false), disconnect("s", 1, None)];
        for (i, c) in cmds.into_iter().enumerate() {
            p.apply(
                i as u64 + 1,
                Entry {
                    now_ms: T0,
                    command: c,
                },
            );
        }
        store.checkpoint(&mut p).unwrap();
        p.apply(
            3,
            Entry {
                now_ms: T0 + 6000,
                command: Command::Tick,
            },
        );
        assert!(p.session("s").is_none());
        store.checkpoint(&mut p).unwrap();
    }
    let (p, _) = recover(dir.path());
    assert!(p.session("s").is_none());
    assert_eq!(p.applied_index(), 3);
}

#[tokio::test]
async fn partitions_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let entries = workload();
    {
        let db = open_db(dir.path());
        let s0 = PartitionStore::open(&db, 0).unwrap();
        let s1 = PartitionStore::open(&db, 1).unwrap();
        run(&s0, &entries, 5, Some(8)).await;
        s1.append(1, &entries[..1]).unwrap();
        s1.flush().await.unwrap();
    }
    let db = open_db(dir.path());
    let r1 = PartitionStore::open(&db, 1)
        .unwrap()
        .recover(SessionLimits::default())
        .unwrap();
    assert_eq!(r1.partition.session_count(), 0);
    assert_eq!(r1.tail.len(), 1);
}

#[test]
fn corrupt_log_record_is_a_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        store.append(1, &workload()[..2]).unwrap();
        db.open_tree("p0/log")
            .unwrap()
            .insert(3u64.to_be_bytes(), &[0xff, 0xff, 0xff, 0x13][..])
            .unwrap();
        db.flush().unwrap();
    }
    let db = open_db(dir.path());
    let store = PartitionStore::open(&db, 0).unwrap();
    match store.recover(SessionLimits::default()) {
        Err(StorageError::Decode { tree, .. }) => assert_eq!(tree, "log"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("corrupt record accepted"),
    }
}

#[test]
fn corrupt_log_key_is_a_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let store = PartitionStore::open(&db, 0).unwrap();
    db.open_tree("p0/log")
        .unwrap()
        .insert(b"abc", postcard::to_stdvec(&workload()[..1]).unwrap())
        .unwrap();
    let err = store.recover(SessionLimits::default()).err().unwrap();
    assert!(matches!(err, StorageError::Decode { .. }), "{err}");
}

#[tokio::test]
async fn corrupt_state_records_are_decode_errors() {
    for (key, value) in [
        (&b"s/a"[..], &[0xffu8, 0xff, 0x01][..]),
        (&b"r/t"[..], &[0x05u8][..]),
        (&b"m/applied"[..], &[1u8, 2, 3][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let store = PartitionStore::open(&db, 0).unwrap();
        run(&store, &workload(), 4, Some(4)).await;
        db.open_tree("p0/state")
            .unwrap()
            .insert(key, value)
            .unwrap();
        match store.recover(SessionLimits::default()) {
            Err(StorageError::Decode { tree, .. }) => assert_eq!(tree, "state"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("corrupt {key:?} accepted"),
        }
    }
}

#[test]
fn decode_error_message_names_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let store = PartitionStore::open(&db, 0).unwrap();
    db.open_tree("p0/log")
        .unwrap()
        .insert(1u64.to_be_bytes(), &[0x01, 0xff][..])
        .unwrap();
    let err = store.recover(SessionLimits::default()).err().unwrap();
    assert!(err.to_string().contains("corrupt record in log"), "{err}");
}

//! The backend crate's integration tests, in one binary (one link instead of one per file; CI
//! time). Each module is one former `backend/tests/<name>.rs`; run one with
//! `cargo test -p tiermq-backend --test it <name>::` (e.g. `--test it raft_cluster::`).

mod local_broker;
mod orphans;
mod placement;
mod raft_cluster;
mod raft_grpc;
mod raft_recovery;
mod raft_storage;
mod storage;

//! How the storage fails: its error type, and the switch that makes every write fail on
//! purpose so tests can check that a node which cannot persist acknowledges nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use raft::StorageError as RaftError;

/// Errors of [`SledRaftStorage`](super::SledRaftStorage). Inside the [`raft::Storage`] methods
/// they travel as `raft::Error::Store(raft::StorageError::Other(..))`.
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

//! `[storage]`: where and how the standalone broker keeps its data.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Data folder of the standalone broker (created if missing).
    #[arg(long, env = "TIERMQ_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Number of partitions, fixed when the data folder is created.
    #[arg(long, env = "TIERMQ_PARTITIONS", default_value_t = 1)]
    pub partitions: u32,
    /// Checkpoint after this many log entries.
    #[arg(skip = 20_000_u64)]
    pub checkpoint_entries: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

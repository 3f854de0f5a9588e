//! Configuration: defaults, a TOML file, `TIERMQ_*` environment variables and flags, in rising
//! order of precedence (a flag wins). Every setting has a default that works, so `tiermq
//! standalone` needs no file at all.
//!
//! # Each setting is declared once
//!
//! A setting is one field of a section struct (`[mqtt]` is [`MqttSettings`], one file each):
//! the field name is its TOML key (serde), its doc comment is both the rustdoc and the `--help`
//! text, and one `#[arg]` attribute says the rest:
//!
//! - `#[arg(long, env = "TIERMQ_NAME", default_value_t = 5)]`: a flag and an environment
//!   variable, and the default (`--help` prints both);
//! - `#[arg(skip = 5_u64)]`: file only, with that default.
//!
//! Each section's `Default` is computed from those attributes (`flags::defaults`), so there is
//! no second list of defaults. Adding a setting is adding a field, plus a line in
//! `validate.rs` when not every value of its type is valid.
//!
//! # Why serde and clap, and not figment
//!
//! The three layers need nothing beyond the crates the binary already has. serde reads the file
//! over the defaults; then clap's `update_from_arg_matches` sets exactly the fields whose flag or
//! variable was given (clap already ranks a flag over its variable) and leaves the others alone
//! ([`SettingsFlags`]). figment would merge the same layers, but its `Env` provider derives a
//! key from a variable's name, and ours do not follow the keys (`TIERMQ_LOG` is `log.level`,
//! `TIERMQ_PARTITIONS` is `storage.partitions` while `TIERMQ_CLUSTER_PARTITIONS` is
//! `cluster.partitions`): it would need a table of names, a second declaration of every
//! variable, and the flags would still be clap's. The error messages stay those of toml (file:
//! unknown key, bad value with its line), clap (flag or variable: the flag and the bad value)
//! and [`ConfigError::Invalid`] (a value out of range, naming the setting).

mod cluster;
mod flags;
mod limits;
mod listeners;
mod log;
mod metrics;
mod mqtt;
mod session;
mod storage;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use cluster::ClusterSettings;
pub use flags::{NodeFlags, SettingsFlags};
pub use limits::LimitsSettings;
pub use listeners::{CertIdentity, ListenerFlags, ListenerKind, ListenerSettings, DEFAULT_WS_PATH};
pub use log::{LogFormat, LogSettings};
pub use metrics::{MetricsListen, MetricsSettings, DEFAULT_METRICS_LISTEN};
pub use mqtt::MqttSettings;
pub use session::SessionSettings;
pub use storage::StorageSettings;

/// Everything configurable, as the TOML file spells it; the flags of each section are listed
/// under its heading in `--help`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    #[command(flatten, next_help_heading = "MQTT")]
    pub mqtt: MqttSettings,
    #[command(flatten, next_help_heading = "Storage (standalone)")]
    pub storage: StorageSettings,
    #[command(flatten, next_help_heading = "Sessions")]
    pub session: SessionSettings,
    #[command(flatten, next_help_heading = "Cluster")]
    pub cluster: ClusterSettings,
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogSettings,
    #[command(flatten, next_help_heading = "Metrics")]
    pub metrics: MetricsSettings,
    /// Connection, rate and size limits against greedy or hostile clients (`[limits]`).
    #[command(flatten, next_help_heading = "Limits")]
    pub limits: LimitsSettings,
    /// Client listeners (`[[listeners]]`). Empty: one plain TCP listener on `mqtt.listen`.
    #[arg(skip)]
    pub listeners: Vec<ListenerSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

impl Settings {
    /// The defaults, with the file over them if there is one (not validated: flags may follow).
    pub fn from_file(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let Some(path) = file else {
            return Ok(Settings::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The client listeners to open: `listeners`, or else one TCP listener on `mqtt.listen`.
    pub fn effective_listeners(&self) -> Vec<ListenerSettings> {
        if self.listeners.is_empty() {
            vec![ListenerSettings::new(ListenerKind::Tcp, self.mqtt.listen)]
        } else {
            self.listeners.clone()
        }
    }
}

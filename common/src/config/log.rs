//! `[log]`: what is logged, and how.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter such as `info` or `tiermq=debug,info`; `RUST_LOG` wins when set. The
    /// default keeps raft-rs, which logs every election step at INFO, at WARN.
    #[arg(
        long = "log-level",
        env = "TIERMQ_LOG",
        default_value = "info,slog=warn"
    )]
    pub level: String,
    /// `text` (human-readable) or `json` (one JSON object per line, for log shippers).
    #[arg(long = "log-format", env = "TIERMQ_LOG_FORMAT", default_value = "text")]
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

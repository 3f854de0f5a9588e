//! The command line of a node: `--config`, the listener flags, and every setting's flag and
//! `TIERMQ_*` variable as its field declares them; and the defaults those declarations hold.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};

use super::{ConfigError, ListenerFlags, Settings};

/// What `tiermq standalone|frontend|backend` takes. Settings come from their defaults, then
/// `--config FILE`, then `TIERMQ_*` variables, then flags.
#[derive(Args, Debug, Clone, Default)]
pub struct NodeFlags {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "TIERMQ_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub listeners: ListenerFlags,
    #[command(flatten)]
    pub settings: SettingsFlags,
}

impl NodeFlags {
    /// Defaults, then the file (if any), then the environment and the flags; validated.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let mut s = Settings::from_file(self.config.as_deref())?;
        self.settings.apply(&mut s)?;
        let extra = self.listeners.listeners()?;
        if !extra.is_empty() {
            // Listeners given by flag come on top of what is configured, the default TCP
            // listener included.
            s.listeners = s.effective_listeners();
            s.listeners.extend(extra);
        }
        s.validate()?;
        Ok(s)
    }
}

/// The settings given by flag or environment variable, as clap parsed them from the
/// `#[arg]` attributes of the settings' fields. Values from a default are left out: the
/// file goes between the defaults and these.
#[derive(Debug, Clone, Default)]
pub struct SettingsFlags(ArgMatches);

impl SettingsFlags {
    /// Lays the given values over `settings`; the others keep the file's (or default) value.
    pub fn apply(&self, settings: &mut Settings) -> Result<(), ConfigError> {
        settings
            .update_from_arg_matches(&self.0)
            .map_err(|e| ConfigError::Invalid {
                name: "flags",
                message: e.to_string(),
            })
    }
}

impl Args for SettingsFlags {
    fn augment_args(cmd: Command) -> Command {
        Settings::augment_args_for_update(cmd)
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Settings::augment_args_for_update(cmd)
    }
}

impl FromArgMatches for SettingsFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut matches = matches.clone();
        let defaults: Vec<String> = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::DefaultValue))
            .map(|id| id.to_string())
            .collect();
        for id in defaults {
            matches.try_clear_id(&id).expect("an id of these matches");
        }
        Ok(SettingsFlags(matches))
    }
    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// A settings section as its fields' attributes declare its defaults (`default_value`,
/// `default_value_t`, `skip = ...`), environment ignored: the `Default` of every section, so
/// that each default is written once and `--help` shows it.
pub(super) fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(Command::new("defaults")).mut_args(|a| a.env(None));
    let matches = cmd
        .try_get_matches_from(["defaults"])
        .expect("the declared defaults parse");
    T::from_arg_matches(&matches).expect("the declared defaults convert")
}

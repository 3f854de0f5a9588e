//! The internal-TLS settings (`cluster.tls_ca`, `cluster.tls_cert`, `cluster.tls_key`) as
//! flags, for the nodes and for the CLI tools that call a backend's gRPC API
//! (`cluster status`, `health --grpc`, `backend drain`).
//!
//! The tools read the same `TIERMQ_CLUSTER_TLS_*` variables as the nodes, so inside a node's
//! container (or with a node's environment) they need no extra flags; `--config` reads the
//! `[cluster]` table of a node's file.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgMatches, Args, Command, FromArgMatches};
use tiermq_common::config::{ClusterSettings, ConfigError, Settings};
use tiermq_proto::tls::GrpcTls;

/// The three files (all or none), as the nodes' `cluster.tls_*` settings declare their flags
/// and variables: the same `Arg`s, taken from [`ClusterSettings`], so that names and help are
/// written once.
#[derive(Debug, Clone, Default)]
pub struct ClusterTlsFlags(ArgMatches);

/// The ids (field names) of the flags taken.
const FILES: [&str; 3] = ["tls_ca", "tls_cert", "tls_key"];

impl ClusterTlsFlags {
    /// Sets the files given by flag or variable.
    fn apply(&self, cluster: &mut ClusterSettings) {
        let fields = [
            &mut cluster.tls_ca,
            &mut cluster.tls_cert,
            &mut cluster.tls_key,
        ];
        for (id, field) in FILES.into_iter().zip(fields) {
            if let Some(path) = self.0.get_one::<PathBuf>(id) {
                *field = Some(path.clone());
            }
        }
    }
}

impl Args for ClusterTlsFlags {
    fn augment_args(cmd: Command) -> Command {
        let node = ClusterSettings::augment_args_for_update(Command::new("node"));
        node.get_arguments()
            .filter(|a| FILES.contains(&a.get_id().as_str()))
            .fold(cmd, |cmd, a| cmd.arg(a.clone().display_order(None)))
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ClusterTlsFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ClusterTlsFlags(matches.clone()))
    }
    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

/// What a CLI tool takes: the flags, and a node's config file to read them from.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterTlsArgs {
    #[command(flatten)]
    pub files: ClusterTlsFlags,
    /// A node's TOML file: its `cluster.tls_*` settings are used (flags win).
    #[arg(long, short = 'c', env = "TIERMQ_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// The client TLS to use, `None` for plain gRPC.
    pub fn load(&self) -> anyhow::Result<Option<GrpcTls>> {
        load(&self.settings()?.cluster)
    }

    /// The node's file (if given) with the flags and variables over it.
    fn settings(&self) -> Result<Settings, ConfigError> {
        let mut settings = Settings::from_file(self.config.as_deref())?;
        self.files.apply(&mut settings.cluster);
        settings.validate()?;
        Ok(settings)
    }
}

/// Reads the files named by `cluster.tls_*`, if set.
pub fn load(cluster: &ClusterSettings) -> anyhow::Result<Option<GrpcTls>> {
    match cluster.tls_files()? {
        None => Ok(None),
        Some((ca, cert, key)) => GrpcTls::load(ca, cert, key)
            .map(Some)
            .context("cannot set up TLS for the internal gRPC"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tool takes the nodes' three flags (same names, variables and help) and nothing else
    /// of theirs; a flag wins over the node's file.
    #[test]
    fn the_nodes_flags_over_the_nodes_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        let toml = "[cluster]\ntls_ca = \"ca.pem\"\ntls_cert = \"b1.pem\"\ntls_key = \"b1.key\"\n";
        std::fs::write(&file, toml).unwrap();
        let mut cmd = ClusterTlsArgs::augment_args(Command::new("tool"));
        let help = cmd.render_help().to_string();
        for shown in [
            "--cluster-tls-ca",
            "--cluster-tls-key",
            "TIERMQ_CLUSTER_TLS_CERT",
        ] {
            assert!(help.contains(shown), "{help}");
        }
        assert!(!help.contains("--peers"), "{help}");
        let args = [
            "tool",
            "-c",
            file.to_str().unwrap(),
            "--cluster-tls-cert",
            "admin.pem",
        ];
        let matches = cmd.try_get_matches_from(args).unwrap();
        let s = ClusterTlsArgs::from_arg_matches(&matches)
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(s.cluster.tls_cert, Some(PathBuf::from("admin.pem")));
        assert_eq!(s.cluster.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(s.cluster.tls_key, Some(PathBuf::from("b1.key")));
    }
}

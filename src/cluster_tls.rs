//! The internal-TLS settings (`cluster.tls_ca`, `cluster.tls_cert`, `cluster.tls_key`) as
//! flags, for the nodes and for the CLI tools that call a backend's gRPC API
//! (`cluster status`, `health --grpc`, `backend drain`).
//!
//! The tools read the same `TIERMQ_CLUSTER_TLS_*` variables as the nodes, so inside a node's
//! container (or with a node's environment) they need no extra flags; `--config` reads the
//! `[cluster]` table of a node's file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tiermq_common::config::{ClusterSettings, Overrides, Settings};
use tiermq_proto::tls::GrpcTls;

/// The three files; all or none.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterTlsFlags {
    /// Internal gRPC over mutual TLS: the cluster CA (PEM) that signs every node's
    /// certificate (needs --cluster-tls-cert and --cluster-tls-key too).
    #[arg(long = "cluster-tls-ca", env = "TIERMQ_CLUSTER_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// This node's (or tool's) certificate chain, PEM, signed by the cluster CA.
    #[arg(long = "cluster-tls-cert", env = "TIERMQ_CLUSTER_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --cluster-tls-cert, PEM.
    #[arg(long = "cluster-tls-key", env = "TIERMQ_CLUSTER_TLS_KEY")]
    pub key: Option<PathBuf>,
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
        let overrides = Overrides {
            cluster_tls_ca: self.files.ca.clone(),
            cluster_tls_cert: self.files.cert.clone(),
            cluster_tls_key: self.files.key.clone(),
            ..Overrides::default()
        };
        let settings = Settings::load(self.config.as_deref(), &overrides)?;
        load(&settings.cluster)
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

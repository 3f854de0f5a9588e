//! `[cluster]`: cluster mode (`tiermq backend` / `tiermq frontend`), and the checks of what each
//! role needs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// (backend) This backend's node id, 1, 2, ...; must appear in `peers`.
    #[arg(long, env = "TIERMQ_NODE_ID", default_value_t = 0)]
    pub node_id: u64,
    /// (backend) gRPC address of this backend (Raft between backends, and the frontend API).
    #[arg(long, env = "TIERMQ_GRPC_LISTEN", default_value = "0.0.0.0:7000")]
    pub grpc_listen: SocketAddr,
    /// (backend) Every backend of the cluster as `id=host:port`, this one included, e.g.
    /// `1=b1:7000,2=b2:7000` (the static bootstrap; once the membership record has changed,
    /// the record stored in the data folder wins).
    #[arg(long, env = "TIERMQ_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// (backend) Join a running cluster through any of these members' gRPC addresses instead
    /// of bootstrapping one. Needs `advertise` (or this node in `peers`). See docs/scaling.md.
    #[arg(long, env = "TIERMQ_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// (backend) This node's gRPC address as the other members reach it, `host:port`. Unset:
    /// this node's entry in `peers`.
    #[arg(long, env = "TIERMQ_ADVERTISE")]
    pub advertise: Option<String>,
    /// (backend) Replica moves (learner → snapshot → promotion) a node runs at once among the
    /// groups it leads, after a membership change: the pace of a rebalance. Lower keeps
    /// client latency steadier on a loaded cluster; higher finishes sooner.
    #[arg(long, env = "TIERMQ_MAX_MOVES", default_value_t = 2)]
    pub max_moves: usize,
    /// Partitions of the cluster, fixed at bootstrap.
    #[arg(
        id = "cluster_partitions",
        long = "cluster-partitions",
        env = "TIERMQ_CLUSTER_PARTITIONS",
        value_name = "CLUSTER_PARTITIONS",
        default_value_t = 16
    )]
    pub partitions: u32,
    /// Replicas per partition (Raft group size).
    #[arg(long, env = "TIERMQ_REPLICATION", default_value_t = 3)]
    pub replication: usize,
    /// (backend) On a graceful stop (SIGTERM, Ctrl-C), first hand the leadership of every
    /// partition led here to another replica, waiting at most this many seconds, so clients
    /// do not wait for an election timeout. 0: stop at once.
    #[arg(long, env = "TIERMQ_LEADER_TRANSFER_SECS", default_value_t = 5)]
    pub leader_transfer_secs: u64,
    /// (frontend) Backend gRPC addresses to learn the cluster from, `host:port`, e.g.
    /// `b1:7000,b2:7000` (any subset: it learns the rest).
    #[arg(long, env = "TIERMQ_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// (frontend) This frontend's id; 0 draws a random one at start, so a restarted frontend
    /// is a new one and the sessions of the old one are released (their wills fire).
    #[arg(long, env = "TIERMQ_FRONTEND_ID", default_value_t = 0)]
    pub frontend_id: u64,
    /// (frontend) Where clients go when this frontend drains: `host:port` of other
    /// frontends (or a load balancer), sent to MQTT 5 clients as the Server Reference of
    /// DISCONNECT 0x9C Use another server. Empty: 0x9C without a reference.
    #[arg(long, env = "TIERMQ_SERVER_REFERENCES", value_delimiter = ',')]
    pub server_references: Vec<String>,
    /// (frontend) MQTT 3.1.1 connections closed per second while draining (they cannot be
    /// told where to go, so their reconnects are spread out); 0 closes them all at once.
    #[arg(long, env = "TIERMQ_DRAIN_RATE", default_value_t = 500)]
    pub drain_rate: u32,
    /// (frontend) A drain gives up waiting for connections to leave after this many seconds;
    /// those left get DISCONNECT 0x8B and the process exits.
    #[arg(long, env = "TIERMQ_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Internal gRPC over mutual TLS (all three files or none): the cluster CA (PEM) that
    /// signs every node's certificate; the gRPC server then requires client certificates.
    #[arg(long = "cluster-tls-ca", env = "TIERMQ_CLUSTER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This node's (or tool's) certificate chain, PEM (leaf first), signed by the cluster CA;
    /// shown as server and as client.
    #[arg(long = "cluster-tls-cert", env = "TIERMQ_CLUSTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of the cluster certificate, PEM.
    #[arg(long = "cluster-tls-key", env = "TIERMQ_CLUSTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

impl ClusterSettings {
    /// Parses `peers` into id → address.
    pub fn peer_map(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut map = BTreeMap::new();
        for p in &self.peers {
            let bad = || ConfigError::Invalid {
                name: "cluster.peers",
                message: format!("`{p}` is not `id=host:port`"),
            };
            let (id, addr) = p.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            if id == 0 || addr.trim().is_empty() || !addr.contains(':') {
                return Err(bad());
            }
            if map.insert(id, addr.trim().to_string()).is_some() {
                return Err(ConfigError::Invalid {
                    name: "cluster.peers",
                    message: format!("node id {id} appears twice"),
                });
            }
        }
        Ok(map)
    }

    /// The internal TLS files `(ca, cert, key)` when set; an error when only some are.
    pub fn tls_files(&self) -> Result<Option<(&Path, &Path, &Path)>, ConfigError> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::Invalid {
                name: "cluster.tls_ca",
                message: "internal TLS needs all of cluster.tls_ca, cluster.tls_cert and \
                          cluster.tls_key (--cluster-tls-ca/-cert/-key)"
                    .into(),
            }),
        }
    }

    /// Checks what a frontend node needs.
    pub fn validate_frontend(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError::Invalid {
                name: "cluster.backends",
                message: "a frontend needs --backends host:port[,host:port...]".into(),
            });
        }
        Ok(())
    }

    /// This backend's address for the other members: `advertise`, else its `peers` entry.
    pub fn advertised_addr(&self) -> Result<Option<String>, ConfigError> {
        if let Some(a) = &self.advertise {
            return Ok(Some(a.clone()));
        }
        Ok(self.peer_map()?.get(&self.node_id).cloned())
    }

    /// Checks what a backend node needs.
    pub fn validate_backend(&self) -> Result<(), ConfigError> {
        let peers = self.peer_map()?;
        if self.node_id == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.node_id",
                message: "a backend needs --node-id (1, 2, ...)".into(),
            });
        }
        if let Some(a) = &self.advertise {
            if a.trim().is_empty() || !a.contains(':') {
                return Err(ConfigError::Invalid {
                    name: "cluster.advertise",
                    message: format!("`{a}` is not `host:port`"),
                });
            }
        }
        if self.max_moves == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.max_moves",
                message: "must be at least 1".into(),
            });
        }
        if !self.join.is_empty() {
            if self.advertised_addr()?.is_none() {
                return Err(ConfigError::Invalid {
                    name: "cluster.advertise",
                    message: "a joining backend needs --advertise host:port (its gRPC address \
                              as the other members reach it)"
                        .into(),
                });
            }
        } else if !peers.contains_key(&self.node_id) {
            return Err(ConfigError::Invalid {
                name: "cluster.peers",
                message: format!("must list this node ({}) as `id=host:port`", self.node_id),
            });
        }
        if self.partitions == 0 || self.partitions > 4096 {
            return Err(ConfigError::Invalid {
                name: "cluster.partitions",
                message: "must be between 1 and 4096".into(),
            });
        }
        if self.replication == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.replication",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

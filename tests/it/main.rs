//! The root package's integration tests, in one binary (one link of the whole broker instead
//! of one per file; CI time). Each module is one former `tests/<name>.rs`; run one with
//! `cargo test --test it <name>::` (e.g. `cargo test --test it publish::`).
//!
//! The modules share one process and run two at a time: no test changes process-wide state
//! that another reads (settings of child processes are flags, not the environment), ports for
//! child processes come from [`support::free_port`] (never the same twice in the process), and
//! tests that load the machine or time what they measure hold [`support::heavy`].

mod fuzz_support;
mod support;

mod acl;
mod bad_input;
mod cluster;
mod cluster_membership;
mod cluster_parity;
mod cluster_tls;
mod config;
mod conformance;
mod connect;
mod drain;
mod durability;
mod enhanced_auth;
mod fuzz;
mod hostile;
mod leader_transfer;
mod logging;
mod metrics;
mod operations;
mod password_auth;
mod probe;
mod publish;
mod retained;
mod scaling;
mod scram_auth;
mod sessions;
mod shared_subscriptions;
mod sys_topics;
mod tls_ws;
mod topic_alias;
mod wills;

//! The common crate's integration tests, in one binary (one link instead of one per file; CI
//! time). Each module is one former `common/tests/<name>.rs`; run one with
//! `cargo test -p tiermq-common --test it <name>::` (e.g. `--test it codec_fixtures::`).
//! The captured packets stay in `common/tests/fixtures/`.

mod codec_fixtures;
mod codec_props;
mod topic_props;

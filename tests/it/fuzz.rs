//! Fuzzing the MQTT decoder and the connection handler with seeded random inputs (see
//! `fuzz_support`). The quick tests run in CI; the long run is
//!
//! ```sh
//! FUZZ_INPUTS=10000000 FUZZ_SEED=1 FUZZ_SECS=1500 \
//!   cargo test --release --test it fuzz:: -- --ignored --nocapture
//! ```
//!
//! (`FUZZ_INPUTS` decoder inputs, then `FUZZ_CONNECTIONS` connections, default a fifth of
//! `FUZZ_INPUTS`; results in docs/security.md).

use std::time::{Duration, Instant};

use crate::fuzz_support::{check_decoder_input, fuzz_connections, fuzz_decoder, Report, Target};
use crate::support::{heavy, heavy_blocking};
use tiermq_common::ProtocolVersion;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn assert_clean(what: &str, r: &Report) {
    println!(
        "{what}: {} inputs in {:.1} s ({:.0}/s), {} accepted, {} failures, {} panics",
        r.inputs,
        r.elapsed.as_secs_f64(),
        r.inputs as f64 / r.elapsed.as_secs_f64().max(1e-9),
        r.accepted,
        r.failures.len(),
        r.panics
    );
    assert!(r.failures.is_empty(), "{what}: {:#?}", r.failures);
    assert_eq!(r.panics, 0, "{what}: first panic: {:?}", r.first_panic);
}

fn fuzz_dir() -> tempfile::TempDir {
    // sled flushes on every durable batch: tmpfs keeps a long run from waiting on the disk.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn decoder_quick_20k_inputs() {
    let _heavy = heavy_blocking();
    let r = fuzz_decoder(20_251_126, 20_000, None);
    assert_eq!(r.inputs, 20_000);
    assert!(
        r.accepted > 2_000,
        "the generator makes decodable packets: {r:?}"
    );
    assert_clean("decoder", &r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_handler_quick_20k_inputs() {
    let _heavy = heavy().await;
    let dir = fuzz_dir();
    let target = Target::open(dir.path());
    let r = fuzz_connections(&target, 20_251_126, 20_000, 16, None).await;
    assert_eq!(r.inputs, 20_000);
    assert!(r.accepted > 5_000, "connections get answers: {r:?}");
    assert_clean("connections", &r);
}

/// Regression inputs the fuzzer found (none so far) stay here as bytes.
#[test]
fn decoder_regressions() {
    let cases: &[(Option<ProtocolVersion>, &[u8])] = &[];
    for (state, bytes) in cases {
        check_decoder_input(*state, 1 << 20, bytes).unwrap();
    }
}

/// The long run: `FUZZ_INPUTS` decoder inputs and `FUZZ_CONNECTIONS` connections from
/// `FUZZ_SEED`, bounded by `FUZZ_SECS` in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run; see the file's header"]
async fn fuzz_long_run() {
    let inputs = env_u64("FUZZ_INPUTS", 10_000_000);
    let seed = env_u64("FUZZ_SEED", 1);
    let secs = env_u64("FUZZ_SECS", 1500);
    let connections = env_u64("FUZZ_CONNECTIONS", inputs / 5);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    println!(
        "fuzz: seed {seed}, {inputs} decoder inputs, {} connections, at most {secs} s",
        connections
    );
    let decoder = tokio::task::spawn_blocking(move || fuzz_decoder(seed, inputs, Some(deadline)))
        .await
        .unwrap();
    assert_clean("decoder", &decoder);
    let dir = fuzz_dir();
    let target = Target::open(dir.path());
    let conns = fuzz_connections(&target, seed, connections, 16, Some(deadline)).await;
    assert_clean("connections", &conns);
    println!(
        "fuzz total: {} inputs in {:.0} s, seed {seed}",
        decoder.inputs + conns.inputs,
        started.elapsed().as_secs_f64()
    );
}

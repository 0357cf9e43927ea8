//! Test-only crate: the end-to-end tests are the `[[test]]` targets beside
//! this file; here are the helpers they share.

/// Property-test settings with a seed that is printed, so a failure seen
/// once (in CI, say) can be replayed: `PROPTEST_RNG_SEED=<seed>` reruns
/// the same cases; `KD_FUZZ_SCALE=<n>` runs n times the cases, for a
/// longer hunt than CI's. No failure files are written into the source tree.
pub fn fuzz_config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            t.map_or(0, |d| d.as_nanos() as u64)
        });
    eprintln!("proptest seed {seed}: rerun with PROPTEST_RNG_SEED={seed}");
    let scale: u32 = std::env::var("KD_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    Config {
        cases: cases.saturating_mul(scale.max(1)),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

/// The workspace's root folder.
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `kd` binary `make test` builds before the tests run.
pub fn kd() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let kd = target.join("debug/kd");
    assert!(
        kd.exists(),
        "{} is missing: `make test` builds it first",
        kd.display()
    );
    kd
}

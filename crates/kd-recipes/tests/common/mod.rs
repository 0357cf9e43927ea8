#![allow(dead_code)]

use kd_core::Registry;
use kd_recipes::{Recipe, RecipeError};

pub fn registry() -> Registry {
    kd_methods::link();
    Registry::global().expect("the linked methods have distinct names")
}

/// Plans `text` as a recipe at `test.rhai` (in the crate folder, so the
/// workspace's `recipes/` is its import root).
pub fn plan(text: &str) -> Result<Vec<kd_engine::Plan>, RecipeError> {
    Recipe::from_source("test.rhai", text, &[])?
        .with_printer(|_| {})
        .plans(&registry())
}

/// The location and message of a recipe error; panics on any other result.
pub fn located(r: Result<impl std::fmt::Debug, RecipeError>) -> (String, usize, usize, String) {
    match r {
        Err(RecipeError::Script {
            file,
            line,
            column,
            message,
        }) => (file, line, column, message),
        other => panic!("expected a script error, got {other:?}"),
    }
}

/// A small, valid experiment on synthetic data, as Rhai source.
pub const TINY: &str = r#"experiment("tiny")
    .data(synthetic(#{ train_size: 64, test_size: 32 }).batch_size(16))
    .student("resnet8")"#;

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

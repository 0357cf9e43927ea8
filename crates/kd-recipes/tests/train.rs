//! Trains the shipped example recipes through `kd_engine::run`, the way
//! `kd run` does. Minutes of CPU each, so ignored by default:
//! `cargo test -p kd-recipes --release --test train -- --ignored --nocapture`.

mod common;

use std::path::Path;
use std::time::Instant;

use common::registry;
use kd_recipes::{Recipe, RunRecord, Scripts};

fn train(rel: &str, sets: &[(&str, &str)]) -> Vec<RunRecord> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let sets: Vec<(String, String)> = sets
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let out = tempfile::tempdir().unwrap();
    let registry = registry();
    let scripts = Scripts::new();
    let start = Instant::now();
    let records = Recipe::load(root.join(rel), &sets)
        .unwrap()
        .execute(&registry, &mut |plan| {
            let mut observer = kd_engine::Silent;
            let mut opts = kd_engine::RunOptions {
                run_dir: out.path().join(&plan.name),
                resume: false,
                observer: &mut observer,
                scripts: &scripts,
                stop: None,
                log_every: 50,
                progress_bar: false,
            };
            Ok(kd_engine::run(plan, &registry, &mut opts)?)
        })
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    eprintln!(
        "{rel}: {:.0} s\n{}",
        start.elapsed().as_secs_f64(),
        kd_recipes::summary_table(&records)
    );
    records
}

#[test]
#[ignore = "trains for minutes"]
fn quickstart_trains_teacher_then_student() {
    let r = train("quickstart.rhai", &[("device", "cpu")]);
    let stages = &r[0].result.stages;
    assert_eq!(stages.len(), 2);
    // Better than chance (10 classes) after a few epochs.
    assert!(
        stages[0].best_top1 > 20.0 && stages[1].best_top1 > 20.0,
        "{stages:?}"
    );
}

#[test]
#[ignore = "trains for minutes"]
fn script_schedules_drive_training() {
    let r = train("examples/three_losses.rhai", &[("epochs", "2")]);
    let distill = &r[0].result.stages[1];
    let w = |e: usize, label: &str| distill.epochs[e].weights[label];
    // sp is off in epoch 0 and 3000 after; st's weight follows 0.9·min(1, 2·fraction).
    assert_eq!(w(0, "sp"), 0.0);
    assert_eq!(w(1, "sp"), 3000.0);
    assert!(
        w(0, "st") > 0.0 && w(0, "st") < w(1, "st") && w(1, "st") <= 0.9,
        "{:?}",
        distill.epochs
    );
}

//! Cost of tracking on the training thread: one training step alone, and the
//! same step followed by what the engine reports per step to the MLflow
//! observer (loss terms, total, lr, weight, images/s), and those calls alone.
//! The tracker runs journal-only here; journal writing and shipping happen on
//! background threads either way.
//!
//! The two step variants are measured interleaved: every sample of either runs
//! a block of tracked steps and a block of plain steps and keeps the time of
//! its own block, so the drift of a shared machine (other jobs, frequency
//! changes) falls on both alike and the ratio of their means is the overhead.
//! Blocks rather than alternate steps, so the journal thread's work for a
//! tracked step lands in the tracked block (at most the last step's spills).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{DataPlan, DeviceChoice, MethodPlan, ModelPlan, Plan, StagePlan, StepHarness};
use kd_tracking::{RunSpec, RunStatus, Tracker};

fn plan() -> Plan {
    Plan {
        name: "bench".into(),
        seed: 0,
        device: DeviceChoice::Auto,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                train_size: 128,
                test_size: 2,
                ..Default::default()
            }),
            batch_size: 64,
            ..Default::default()
        },
        student: ModelPlan {
            arch: "resnet8".into(),
            weights: None,
        },
        teacher: Some(ModelPlan {
            arch: "resnet20".into(),
            weights: None,
        }),
        stages: vec![StagePlan {
            name: "distill".into(),
            epochs: 1,
            subject: Default::default(),
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods: vec![MethodPlan::new("ce", 0.1), MethodPlan::new("st", 0.9)],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
        }],
    }
}

const KEYS: [&str; 7] = [
    "train/loss",
    "train/lr",
    "loss/ce/ce",
    "loss/st/st",
    "weight/ce",
    "weight/st",
    "train/images_per_sec",
];

/// One step, followed by the per-step metric calls when `tracker` is given.
fn step(h: &mut StepHarness, tracker: Option<&Tracker>, n: &mut i64) -> Duration {
    let t0 = Instant::now();
    let loss = h.step().unwrap();
    if let Some(tr) = tracker {
        for k in KEYS {
            tr.metric(k, loss, *n);
        }
        *n += 1;
    }
    black_box(loss);
    t0.elapsed()
}

fn bench(c: &mut Criterion) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut h = StepHarness::new(&plan(), &registry).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(dir.path(), RunSpec::new("bench").name("bench")).unwrap();
    let mut g = c.benchmark_group("train_step_tracking");
    g.sample_size(20);
    let mut n = 0i64;
    for tracked in [true, false] {
        let name = if tracked { "step+tracking" } else { "step" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (mut with, mut without) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..iters {
                    with += step(&mut h, Some(&tracker), &mut n);
                }
                for _ in 0..iters {
                    without += step(&mut h, None, &mut n);
                }
                if tracked { with } else { without }
            })
        });
    }
    // The tracking calls alone: what the training thread pays per step,
    // measured without the step's noise.
    let mut s = 0i64;
    g.bench_function("tracking_calls_per_step", |b| {
        b.iter(|| {
            for k in KEYS {
                tracker.metric(k, 0.5, s);
            }
            s += 1;
        })
    });
    g.finish();
    tracker.finish(RunStatus::Finished);
}

criterion_group!(benches, bench);
criterion_main!(benches);

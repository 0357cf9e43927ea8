//! Cost of tracking on the training thread: one training step alone, and the
//! same step followed by what the engine reports per step to the MLflow
//! observer (loss terms, total, lr, weight, images/s), and those calls alone.
//! The tracker runs journal-only here; journal writing and shipping happen on
//! background threads either way. Overhead = calls / step.

use std::hint::black_box;

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

fn bench(c: &mut Criterion) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut h = StepHarness::new(&plan(), &registry).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(dir.path(), RunSpec::new("bench").name("bench")).unwrap();
    let keys = [
        "train/loss",
        "train/lr",
        "loss/ce/ce",
        "loss/st/st",
        "weight/ce",
        "weight/st",
        "train/images_per_sec",
    ];
    let mut g = c.benchmark_group("train_step_tracking");
    g.sample_size(20);
    let mut step = 0i64;
    g.bench_function("step+tracking", |b| {
        b.iter(|| {
            let loss = h.step().unwrap();
            for k in keys {
                tracker.metric(k, loss, step);
            }
            step += 1;
            black_box(loss)
        })
    });
    // Measured after the tracked step, so warm-up order cannot favour it.
    g.bench_function("step", |b| b.iter(|| black_box(h.step().unwrap())));
    // The tracking calls alone: what the training thread pays per step,
    // measured without the step's noise.
    let mut s = 0i64;
    g.bench_function("tracking_calls_per_step", |b| {
        b.iter(|| {
            for k in keys {
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

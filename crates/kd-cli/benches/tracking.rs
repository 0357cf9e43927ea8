//! Cost of tracking on the training thread: one training step alone, and the
//! same step followed by what the engine reports per step to the MLflow
//! observer (loss terms, total, lr, weight, images/s), and those calls alone.
//! The tracker runs journal-only here; journal writing and shipping happen on
//! background threads either way.
//!
//! The two step variants are measured interleaved: every sample of either runs
//! a block of tracked steps and a block of plain steps (which first
//! alternates) and reports the time of its own block. Criterion measures the
//! two functions minutes apart, so their reported times carry the drift of a
//! shared machine; the bench therefore also prints the paired overhead, the
//! ratio of the tracked and the plain blocks' total times over every sample.
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
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
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
        student: ModelPlan::new("resnet8"),
        teacher: Some(ModelPlan::new("resnet20")),
        teacher_cache: None,
        stages: vec![StagePlan {
            name: "distill".into(),
            epochs: 1,
            subject: Default::default(),
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods: vec![MethodPlan::new("ce", 0.1), MethodPlan::new("st", 0.9)],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
            keep_optimizer: false,
            clip_grad: None,
            ema: None,
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

/// Per sample `ln(tracked / plain)`, each pair measured back to back (for
/// small values, the relative overhead): mean, its standard error, median.
/// The median resists the bursts of other jobs on a shared machine.
fn paired_overhead(pairs: &[(f64, f64)]) -> (f64, f64, f64) {
    let mut d: Vec<f64> = pairs.iter().map(|(w, wo)| (w / wo).ln()).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    d.sort_by(f64::total_cmp);
    let median = if d.is_empty() {
        f64::NAN
    } else {
        d[d.len() / 2]
    };
    (mean, (var / n).sqrt(), median)
}

/// CPU time (ns) the tracker's background threads have used so far, from
/// the kernel's per-thread accounting (`/proc/self/task/*/schedstat`): what
/// tracking can take from the training threads besides its calls. Linux only;
/// `None` elsewhere.
fn tracker_threads_cpu_ns() -> Option<u64> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("kd-journal") || comm.trim().starts_with("kd-ship") {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
            total = Some(total.unwrap_or(0) + ns);
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut h = StepHarness::new(&plan(), &registry).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(dir.path(), RunSpec::new("bench").name("bench")).unwrap();
    let mut g = c.benchmark_group("train_step_tracking");
    g.sample_size(30);
    let mut n = 0i64;
    // Every sample of either function runs both blocks, so the two totals
    // below are paired in time: their ratio is the overhead, free of the
    // drift between the moments criterion measures one function and the other.
    let mut pairs: Vec<(f64, f64)> = Vec::new();
    // Opening the run (journal, fsync) is paid once, not per step.
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = tracker_threads_cpu_ns();
    let mut tracked_first = true;
    for tracked in [true, false] {
        let name = if tracked { "step+tracking" } else { "step" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (mut with, mut without) = (Duration::ZERO, Duration::ZERO);
                for pass in 0..2 {
                    let tracked_now = (pass == 0) == tracked_first;
                    for _ in 0..iters {
                        if tracked_now {
                            with += step(&mut h, Some(&tracker), &mut n);
                        } else {
                            without += step(&mut h, None, &mut n);
                        }
                    }
                }
                tracked_first = !tracked_first;
                pairs.push((with.as_secs_f64(), without.as_secs_f64()));
                if tracked { with } else { without }
            })
        });
    }
    if let (Some(after), Some(before)) = (tracker_threads_cpu_ns(), cpu_before) {
        let ns = after - before;
        println!(
            "tracker threads: {:.1} µs of CPU per tracked step ({} tracked steps)",
            ns as f64 / 1e3 / n.max(1) as f64,
            n
        );
    }
    let (mean, se, median) = paired_overhead(&pairs);
    println!(
        "paired overhead of tracking over {} samples: mean {:+.2}% ± {:.2}% (standard error), median {:+.2}%",
        pairs.len(),
        100.0 * mean,
        100.0 * se,
        100.0 * median
    );
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

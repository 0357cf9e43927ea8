//! Per-call cost of a script schedule (called once per training step and
//! weighted term), against a built-in schedule for scale.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kd_core::Progress;
use kd_engine::{Schedule, ScheduleResolver, Weight};
use kd_recipes::Scripts;

const SOURCE: &str = "
fn ramp(p) { 8.0 * min(1.0, p.fraction * 4.0) }
fn scaled(k, p) { k * (1.0 - p.fraction) }
";

fn at(step: usize) -> Progress {
    Progress {
        epoch: step / 390,
        epochs: 240,
        step: step % 390,
        steps_per_epoch: 390,
        global_step: step,
    }
}

fn bench(c: &mut Criterion) {
    let scripts = Scripts::new();
    let mut named = scripts.resolve("ramp", SOURCE).expect("ramp compiles");
    let mut captured = scripts
        .resolve("scaled(0.5)", SOURCE)
        .expect("scaled compiles");
    let mut builtin = Weight::Schedule(Schedule::Warmup {
        value: 8.0,
        epochs: 20.0,
    })
    .compile(&scripts)
    .expect("builtin");
    let mut step = 0;
    let mut next = || {
        step = (step + 1) % (240 * 390);
        at(step)
    };
    c.bench_function("script schedule fn(p)", |b| {
        b.iter(|| black_box(named.value(black_box(next())).unwrap()))
    });
    let mut step = 0;
    let mut next = || {
        step = (step + 1) % (240 * 390);
        at(step)
    };
    c.bench_function("script schedule closure with a capture", |b| {
        b.iter(|| black_box(captured.value(black_box(next())).unwrap()))
    });
    c.bench_function("built-in warmup", |b| {
        b.iter(|| black_box(builtin.value(black_box(at(1000))).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

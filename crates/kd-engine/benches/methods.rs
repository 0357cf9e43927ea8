//! Forward + backward of every registered method's loss on fixed random taps
//! shaped like resnet8x4 (student) and resnet32x4 (teacher) at batch 64, and
//! one full training step of resnet32x4 -> resnet8x4 with `st`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kd_core::{BuildCx, Losses, Needs, Progress, Registry, StepIo, Tap, TapShapes, Taps, ViewTaps};
use kd_engine::{MethodPlan, Plan, StepHarness};
use tch::{Device, Kind, Tensor, nn};

const BATCH: i64 = 64;

fn taps(shapes: &TapShapes) -> Taps {
    let t = |tap| {
        let mut s = vec![BATCH];
        s.extend_from_slice(shapes.get(tap).unwrap());
        Tensor::randn(&s, (Kind::Float, Device::Cpu))
    };
    let depth = shapes
        .taps
        .iter()
        .filter(|(t, _)| matches!(t, Tap::Feat(_)))
        .count();
    Taps {
        feat: (0..depth).map(|k| t(Tap::Feat(k)).relu()).collect(),
        preact: (0..depth).map(|k| t(Tap::Preact(k))).collect(),
        embed: t(Tap::Embed),
        logits: t(Tap::Logits),
        extra: Vec::new(),
    }
}

fn shapes_of(arch: &str) -> TapShapes {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = kd_models::build(arch, &vs.root(), 100).unwrap();
    tch::no_grad(|| {
        TapShapes::of(&net.forward_taps(
            &Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            false,
        ))
    })
}

fn losses(c: &mut Criterion) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let (s_shapes, t_shapes) = (shapes_of("resnet8x4"), shapes_of("resnet32x4"));
    let n_data = 50_000;
    let mut group = c.benchmark_group("loss_fwd_bwd");
    group.sample_size(10);
    for entry in registry.iter() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut needs = Needs::default();
        let built = {
            let mut cx = BuildCx::new(
                entry.name,
                &s_shapes,
                Some(&t_shapes),
                vs.root(),
                &mut needs,
                n_data,
                100,
            );
            entry.build(serde_json::Value::Null, &mut cx)
        };
        let Ok(mut method) = built else {
            eprintln!("skipping {}: {}", entry.name, built.err().unwrap());
            continue;
        };
        let student = taps(&s_shapes);
        let teacher = taps(&t_shapes);
        let target = Tensor::randint(100, [BATCH], (Kind::Int64, Device::Cpu));
        let index = Tensor::randint(n_data, [BATCH], (Kind::Int64, Device::Cpu));
        let contrast = needs
            .contrast
            .as_ref()
            .map(|c| Tensor::randint(n_data, [BATCH, c.k as i64 + 1], (Kind::Int64, Device::Cpu)));
        let grads: Vec<Tensor> = needs
            .grads
            .iter()
            .map(|g| {
                let mut s = vec![BATCH];
                match g.wrt {
                    Some(tap) => s.extend_from_slice(s_shapes.get(tap).unwrap()),
                    None => s.extend_from_slice(&[3, 32, 32]),
                }
                Tensor::randn(&s, (Kind::Float, Device::Cpu)).set_requires_grad(g.create_graph)
            })
            .collect();
        let views: Vec<Option<ViewTaps>> = needs
            .views
            .iter()
            .map(|_| {
                Some(ViewTaps {
                    student: taps(&s_shapes),
                    teacher: taps(&t_shapes),
                })
            })
            .collect();
        let leaves: Vec<Tensor> = student
            .named()
            .iter()
            .map(|(_, t)| t.set_requires_grad(true))
            .collect();
        let student = Taps {
            feat: leaves[..student.feat.len()]
                .iter()
                .map(|t| t.shallow_clone())
                .collect(),
            preact: leaves[student.feat.len()..2 * student.feat.len()]
                .iter()
                .map(|t| t.shallow_clone())
                .collect(),
            embed: leaves[leaves.len() - 2].shallow_clone(),
            logits: leaves[leaves.len() - 1].shallow_clone(),
            extra: Vec::new(),
        };
        let progress = Progress {
            epoch: 20,
            epochs: 240,
            step: 0,
            steps_per_epoch: 782,
            global_step: 20 * 782,
        };
        group.bench_function(entry.name, |b| {
            b.iter(|| {
                let io = StepIo {
                    student: &student,
                    teacher: Some(&teacher),
                    grads: &grads,
                    views: &views,
                    augmented: None,
                    target: &target,
                    index: Some(&index),
                    contrast_index: contrast.as_ref(),
                    progress,
                    train: true,
                    soft_target: None,
                };
                let mut out = Losses::default();
                method.losses(&io, &mut out).unwrap();
                let total = out.total();
                if total.requires_grad() {
                    total.backward();
                }
                let _ = black_box(total);
            })
        });
    }
    group.finish();
}

fn plan(method: &str, weight: f64) -> Plan {
    let methods = vec![MethodPlan::new("ce", 1.0), MethodPlan::new(method, weight)];
    kd_engine::bench_plan("resnet32x4", "resnet8x4", methods, BATCH as usize, 100)
}

fn train_step(c: &mut Criterion) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    let mut h = StepHarness::new(&plan("st", 0.9), &registry).unwrap();
    group.bench_function("resnet32x4_to_resnet8x4_st_b64", |b| {
        b.iter(|| black_box(h.step().unwrap()))
    });
    group.finish();
}

criterion_group!(benches, losses, train_step);
criterion_main!(benches);

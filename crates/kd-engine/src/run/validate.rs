//! Everything that can be known about a plan before it trains: numbers in
//! range, files present and fitting, methods buildable on the models' taps.
//! A recipe validates all its plans this way before its first run starts.

use std::path::PathBuf;

use kd_core::Registry;
use tch::{Device, Kind, Tensor, nn};

use super::checkpoint::Carry;
use super::methods::{BuildEnv, build_stage};
use super::momentum::check_keep;
use super::nets::{Exec, Net, roles, shapes_of};
use crate::plan::{DeviceChoice, LrSchedule, ModelPlan, OptimizerKind, Plan, StagePlan, Subject};
use crate::schedule::{Schedule, ScheduleResolver, Weight};
use crate::{EngineError, Result};

/// Checks a plan against the registry, the model zoo, the taps, its data
/// and its weight files without loading data or training. Weight files
/// named in `pending` are skipped: an earlier run of the same recipe writes
/// them.
pub fn validate(
    plan: &Plan,
    registry: &Registry,
    scripts: &dyn ScheduleResolver,
    pending: &[PathBuf],
) -> Result<()> {
    numbers(plan).map_err(EngineError::Plan)?;
    kd_data::check(&plan.data.source)?;
    plan.data.normalize.stats(&plan.data.source)?;
    // Building the networks allocates what the plan asks for, which can be
    // more than the machine has (a huge class count, say).
    crate::error::guarded("libtorch cannot build the plan's networks", || {
        networks(plan, registry, scripts, pending)
    })
}

/// The plan's networks and methods, built on the CPU from its weights.
fn networks(
    plan: &Plan,
    registry: &Registry,
    scripts: &dyn ScheduleResolver,
    pending: &[PathBuf],
) -> Result<()> {
    let (n_train, classes) = kd_data::describe(&plan.data.source)?;
    let n_data = n_train - (n_train as f64 * plan.data.val_fraction).round() as i64;
    let device = Device::Cpu;
    let net_of = |m: &ModelPlan| -> Result<Net> {
        if let (Some(file), Some(want)) = (m.source_file(), &m.source_sha256) {
            let got = crate::tensors::sha256_file(file);
            if got.as_ref() != Some(want) {
                return Err(EngineError::Plan(format!(
                    "{}: the module file is not the one the plan was saved with (SHA-256 {want}, now {}); restore it, or drop source_sha256 from the plan to train the new one",
                    file.display(),
                    got.as_deref().unwrap_or("unreadable")
                )));
            }
        }
        let vs = nn::VarStore::new(device);
        let model = kd_models::build(&m.arch, &vs.root(), classes)?;
        let mut net = Net { vs, model };
        if m.reset_classifier && m.weights.is_none() {
            return Err(EngineError::Plan(format!(
                "{}: reset_classifier keeps a fresh classifier while loading weights, but the model has none to load",
                m.arch
            )));
        }
        if let Some(w) = m.weights.as_ref().filter(|w| !pending.contains(w)) {
            kd_models::load_weights_with(&mut net.vs, w, m.load_options())?;
        }
        Ok(net)
    };
    let student = net_of(&plan.student)?;
    let cache = plan
        .teacher_cache
        .as_ref()
        .map(|dir| {
            let m = super::cache::Manifest::read(dir)?;
            m.check_plan(plan, dir)?;
            Ok::<_, EngineError>((dir, m))
        })
        .transpose()?;
    let teacher = plan.teacher.as_ref().map(net_of).transpose()?;
    if plan.stages.is_empty() {
        return Err(EngineError::Plan("the plan has no stages".into()));
    }
    check_keep(&plan.stages)?;
    if plan.device == DeviceChoice::Cpu {
        Exec::of(plan, Device::Cpu)?;
    }
    let side = plan.data.source.image_size();
    let probe = Tensor::zeros([2, 3, side, side], (Kind::Float, device));
    for (who, net) in [("student", Some(&student)), ("teacher", teacher.as_ref())] {
        if let Some(net) = net {
            net.model
                .check_input(&probe)
                .map_err(|e| EngineError::Plan(format!("{who}: {e}")))?;
        }
    }
    let env = BuildEnv {
        registry,
        device,
        n_data,
        classes,
        scripts,
    };
    for (si, stage) in plan.stages.iter().enumerate() {
        if stage.epochs == 0 || stage.methods.is_empty() {
            return Err(EngineError::Plan(format!(
                "stage `{}` needs at least one epoch and one method",
                stage.name
            )));
        }
        if stage.subject == Subject::Teacher && teacher.is_none() {
            return Err(EngineError::Plan(format!(
                "stage `{}` trains the teacher, but the plan has none",
                stage.name
            )));
        }
        let (net, other) = roles(stage.subject, &student, teacher.as_ref());
        if stage.train.contains(&crate::plan::Part::Network) {
            net.model
                .check_trainable(&probe)
                .map_err(|e| EngineError::Plan(format!("stage `{}`: {e}", stage.name)))?;
        }
        let s_shapes = shapes_of(net, &probe);
        let t_shapes = match &cache {
            Some((_, m)) if stage.subject == Subject::Student => Some(m.shapes()),
            _ => other.map(|t| shapes_of(t, &probe)),
        };
        let (_, _, needs) = build_stage(stage, &env, &s_shapes, t_shapes.as_ref(), &Carry::new())
            .map_err(|e| {
                let held = cache.as_ref().map_or(String::new(), |(dir, m)| {
                    let taps: Vec<&str> = m.taps.iter().map(|(n, _)| n.as_str()).collect();
                    format!(
                        " (the teacher's outputs come from the cache {}, which holds {}; write it with --taps to cache more)",
                        dir.display(),
                        taps.join(", ")
                    )
                });
                EngineError::Plan(format!("stage `{}`: {e}{held}", stage.name))
            })?;
        if let Some((dir, m)) = &cache {
            m.check_stage(dir, plan, si, stage, &needs)?;
        }
    }
    Ok(())
}

/// The plan's numbers, each finite and in the range training needs.
fn numbers(plan: &Plan) -> Result<(), String> {
    let d = &plan.data;
    if d.batch_size == 0 || d.eval_batch_size == 0 {
        return Err("batch_size and eval_batch_size must be at least 1".into());
    }
    if !(0.0..1.0).contains(&d.val_fraction) {
        return Err(format!(
            "val_fraction must be in [0, 1), got {}",
            d.val_fraction
        ));
    }
    if let Some(m) = &d.mixup {
        let side = d.source.image_size();
        m.check(side, side)?;
    }
    if let Some(re) = &d.random_erasing {
        re.check()?;
    }
    if let Some(ra) = &d.randaugment {
        ra.check()?;
        if !d.augment {
            return Err(
                "randaugment is part of the training augmentation; it needs augment: true".into(),
            );
        }
    }
    for stage in &plan.stages {
        stage_numbers(stage).map_err(|e| format!("stage `{}`: {e}", stage.name))?;
    }
    let foreign = std::iter::once(&plan.student)
        .chain(&plan.teacher)
        .find(|m| kd_models::torchscript::is_foreign(&m.arch));
    if let (true, Some(m)) = (plan.cuda_graph, foreign) {
        return Err(format!(
            "cuda_graph cannot capture `{}`: a foreign network's forward runs code kd does not see (Python hooks, TorchScript), which a replayed graph would skip; drop cuda_graph",
            m.arch
        ));
    }
    if plan.cuda_graph && plan.precision == crate::plan::Precision::Fp16 {
        return Err("cuda_graph cannot capture fp16 steps: the loss scale's overflow check reads the device every step; use bf16 (no loss scale) or drop cuda_graph".into());
    }
    for s in plan
        .stages
        .iter()
        .filter(|s| s.optimizer.kind == OptimizerKind::Dot)
    {
        // DOT's two backwards and the update that joins them are the
        // reference's in fp32/bf16 on one process; the rest is not defined
        // there (which loss's gradient a scale or a clip would apply to).
        let refuse = |what: &str| {
            Err(format!(
                "stage `{}`: the dot optimizer cannot be combined with {what}; use sgd there",
                s.name
            ))
        };
        if plan.precision == crate::plan::Precision::Fp16 {
            return refuse("precision fp16 (its loss scale); bf16 has none");
        }
        if plan.cuda_graph {
            return refuse("cuda_graph");
        }
        if s.clip_grad.is_some() {
            return refuse("clip_grad");
        }
    }
    Ok(())
}

/// AdamW's and LAMB's settings, gradient clipping and the EMA.
fn optimizer_numbers(stage: &StagePlan) -> Result<(), String> {
    let o = &stage.optimizer;
    if o.kind == OptimizerKind::Dot {
        let (task, kd) = (o.momentum - o.delta, o.momentum + o.delta);
        if !(o.delta.is_finite() && (0.0..1.0).contains(&task) && (0.0..1.0).contains(&kd)) {
            return Err(format!(
                "dot's momenta momentum - delta ({task}) and momentum + delta ({kd}) must each be in [0, 1); got momentum {} and delta {}",
                o.momentum, o.delta
            ));
        }
    }
    if matches!(o.kind, OptimizerKind::Adamw | OptimizerKind::Lamb) {
        let [b1, b2] = o.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(format!(
                "{} betas must each be in [0, 1), got [{b1}, {b2}]",
                o.kind.name()
            ));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(format!("eps must be a finite number > 0, got {}", o.eps));
        }
    }
    if let Some(m) = o.max_grad_norm
        && !(m.is_finite() && m > 0.0)
    {
        return Err(format!(
            "max_grad_norm must be a finite number > 0, got {m}"
        ));
    }
    if let Some(c) = stage.clip_grad
        && !(c.is_finite() && c > 0.0)
    {
        return Err(format!("clip_grad must be a finite number > 0, got {c}"));
    }
    if let Some(e) = &stage.ema {
        for (name, v) in [("decay", e.decay), ("min_decay", e.min_decay)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("ema {name} must be in [0, 1], got {v}"));
            }
        }
        for (name, v) in [
            ("warmup_gamma", e.warmup_gamma),
            ("warmup_power", e.warmup_power),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("ema {name} must be a finite number > 0, got {v}"));
            }
        }
    }
    Ok(())
}

fn stage_numbers(stage: &StagePlan) -> Result<(), String> {
    let o = &stage.optimizer;
    if !(o.lr.is_finite() && o.lr > 0.0) {
        return Err(format!("lr must be a finite number > 0, got {}", o.lr));
    }
    if !(0.0..1.0).contains(&o.momentum) {
        return Err(format!("momentum must be in [0, 1), got {}", o.momentum));
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        return Err(format!(
            "weight_decay must be a finite number >= 0, got {}",
            o.weight_decay
        ));
    }
    if o.nesterov && o.momentum == 0.0 {
        return Err("nesterov needs a momentum > 0 (as in torch.optim.SGD)".into());
    }
    optimizer_numbers(stage)?;
    match &stage.lr_schedule {
        LrSchedule::Multistep { milestones, gamma } => {
            if !(gamma.is_finite() && *gamma > 0.0) {
                return Err(format!("lr gamma must be a finite number > 0, got {gamma}"));
            }
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("lr milestones must increase, got {milestones:?}"));
            }
            // A milestone the stage never reaches would silently train at
            // the undecayed rate, which no one means.
            if let Some(m) = milestones.iter().find(|&&m| m >= stage.epochs) {
                return Err(format!(
                    "lr milestone {m} is past the end of the {}-epoch stage (milestones are epochs below {}); drop it or lengthen the stage",
                    stage.epochs, stage.epochs
                ));
            }
        }
        LrSchedule::Cosine { warmup_epochs, .. } if *warmup_epochs >= stage.epochs => {
            return Err(format!(
                "cosine warm-up of {warmup_epochs} epochs leaves nothing of a {}-epoch stage",
                stage.epochs
            ));
        }
        LrSchedule::Cosine {
            min_lr, warmup_lr, ..
        } => {
            for (name, v) in [("min_lr", min_lr), ("warmup_lr", warmup_lr)] {
                if !(v.is_finite() && *v >= 0.0 && *v <= o.lr) {
                    return Err(format!(
                        "cosine {name} must be in [0, lr = {}], got {v}",
                        o.lr
                    ));
                }
            }
        }
        _ => {}
    }
    for m in &stage.methods {
        for (what, w) in m.weights() {
            weight_numbers(w).map_err(|e| format!("method `{}`, {what}: {e}", m.label()))?;
        }
    }
    Ok(())
}

/// A weight's constants are finite (a script's values are checked when the
/// recipe evaluates it, and at every step).
fn weight_numbers(w: &Weight) -> Result<(), String> {
    let values: Vec<f64> = match w {
        Weight::Const(v) => vec![*v],
        Weight::Schedule(Schedule::Warmup { value, epochs }) => vec![*value, *epochs],
        Weight::Schedule(Schedule::Until { value, fraction }) => vec![*value, *fraction],
        Weight::Schedule(Schedule::Cosine { from, to }) => vec![*from, *to],
        Weight::Schedule(Schedule::Step { values, .. }) => values.clone(),
        Weight::Schedule(Schedule::Script { .. }) => vec![],
    };
    match values.iter().find(|v| !v.is_finite()) {
        Some(v) => Err(format!("must be a finite number, got {v}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use kd_core::Taps;
    use tch::{Device, Kind, Tensor};

    use super::super::nets::{Exec, Net};
    use crate::plan::{DeviceChoice, Plan, Precision};

    fn plan(precision: Precision) -> Plan {
        let mut p = crate::bench_plan("resnet8", "resnet8", vec![], 8, 10);
        p.device = DeviceChoice::Cpu;
        p.precision = precision;
        p
    }

    #[test]
    fn cpu_takes_bf16_where_it_has_bf16_kernels_and_refuses_fp16() {
        let supported = kd_aten::cpu_bf16_supported();
        for p in [Precision::Bf16, Precision::TeacherBf16] {
            match Exec::of(&plan(p), Device::Cpu) {
                Ok(_) => assert!(supported, "{p:?} accepted on a CPU without bf16 kernels"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!supported, "{p:?} refused on a CPU with bf16 kernels: {e}");
                    assert!(e.contains("needs CUDA or a CPU with bf16 kernels"), "{e}");
                }
            }
        }
        let e = Exec::of(&plan(Precision::Fp16), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("precision `fp16` needs CUDA"), "{e}");
        assert!(e.contains("`fp32`") && e.contains("`bf16`"), "{e}");
    }

    /// `bf16` runs every forward in bf16; `teacher-bf16` only those of
    /// networks the stage does not train. Taps come back fp32 either way.
    #[test]
    fn teacher_bf16_runs_only_frozen_forwards_in_bf16() {
        if !kd_aten::cpu_bf16_supported() {
            eprintln!("skipped: this CPU has no bf16 kernels");
            return;
        }
        tch::manual_seed(0);
        let net = Net::zoo("resnet8", 10, Device::Cpu).unwrap();
        let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let exec = |p: Precision| {
            let mut e = Exec::of(&plan(p), Device::Cpu).unwrap();
            // Running statistics in "training" forwards: none of these
            // forwards may move them, so that all see the same network.
            e.frozen_bn = true;
            e
        };
        let logits = |t: Taps| {
            assert_eq!(t.logits.kind(), Kind::Float);
            t.logits
        };
        let trained = |p| logits(net.taps(&x, true, &exec(p)).unwrap());
        let frozen = |p| logits(net.frozen_taps(&x, &exec(p)));
        let fp32 = frozen(Precision::Fp32);
        let bf16 = frozen(Precision::Bf16);
        let rel = |a: &Tensor| {
            (a - &fp32).abs().max().double_value(&[]) / fp32.abs().max().double_value(&[])
        };
        assert!(trained(Precision::Fp32).equal(&fp32));
        assert!(trained(Precision::TeacherBf16).equal(&fp32));
        assert!(frozen(Precision::TeacherBf16).equal(&bf16));
        assert!(trained(Precision::Bf16).equal(&bf16));
        // bf16 keeps 8 bits of mantissa: about 1% off through 8 layers.
        assert!(rel(&bf16) > 1e-4 && rel(&bf16) < 5e-2, "{}", rel(&bf16));
    }
}

//! kd's `dot` optimiser against mdistiller's Distillation-Oriented Trainer:
//! the trajectories of `tests/golden/dot.py` (the reference's update, one
//! tensor at a time) are reproduced bit for bit through the engine's path,
//! `backward_split` of a task loss and a distillation loss, then `step`;
//! and in a run, the engine hands it the losses apart (a method that reads
//! the teacher is a distillation loss) and resumes it exactly.

mod common;

use std::path::Path;

use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    DataPlan, DeviceChoice, MethodPlan, ModelPlan, Optimizer, OptimizerKind, OptimizerPlan, Plan,
    StagePlan, tensors,
};
use tch::{Kind, Tensor};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    lr: Vec<f64>,
    momentum: f64,
    delta: f64,
    weight_decay: f64,
}

/// `Σ_i sum(p_i · g_i)` over the parameters `which` reaches: its gradient
/// is the fixture's, exactly, and nothing for the others.
fn loss(
    params: &[Tensor],
    file: &kd_engine::tensors::TensorFile,
    which: &str,
    k: usize,
    reach: &[usize],
) -> Tensor {
    reach
        .iter()
        .map(|&i| (&params[i] * file.get(&format!("{which}/{k}/{i}")).unwrap()).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap()
}

#[test]
fn trajectories_equal_mdistillers_dot_bit_for_bit() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/optim/dot.safetensors");
    let file = kd_engine::tensors::read(&path).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&file.metadata["cases"]).unwrap();
    let task: Vec<usize> = serde_json::from_str(&file.metadata["task"]).unwrap();
    let kd: Vec<usize> = serde_json::from_str(&file.metadata["kd"]).unwrap();
    let n = file.with_prefix("init/").count();
    assert!(n == 4 && cases.len() == 3);
    for case in &cases {
        let params: Vec<Tensor> = (0..n)
            .map(|i| {
                file.get(&format!("init/{i}"))
                    .unwrap()
                    .copy()
                    .set_requires_grad(true)
            })
            .collect();
        let cfg = OptimizerPlan {
            lr: case.lr[0],
            momentum: case.momentum,
            delta: case.delta,
            weight_decay: case.weight_decay,
            ..OptimizerPlan::of(OptimizerKind::Dot)
        };
        let named = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect();
        let mut opt = Optimizer::new(cfg, named);
        assert!(opt.splits_losses());
        for (k, lr) in case.lr.iter().enumerate() {
            opt.zero_grad().unwrap();
            let (t, d) = (
                loss(&params, &file, "task", k, &task),
                loss(&params, &file, "kd", k, &kd),
            );
            opt.backward_split(Some(&t), Some(&d)).unwrap();
            opt.step(*lr).unwrap();
            for (i, p) in params.iter().enumerate() {
                let want = file.get(&format!("expect/{}/{k}/{i}", case.name)).unwrap();
                let diff = (p.detach() - want).abs().max().double_value(&[]);
                assert_eq!(
                    diff, 0.0,
                    "{}: step {k}, parameter {i} differs by {diff:e}",
                    case.name
                );
            }
        }
        // The state a checkpoint saves: both buffers of each parameter and
        // the update count (the first update is special).
        let names: Vec<String> = opt.state().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"p2:momentum_kd_buffer".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"dot/step".to_string()), "{names:?}");
    }
}

/// With `delta` 0 the two buffers carry one momentum, and their sum is
/// plain SGD's buffer: the same trajectory up to rounding.
#[test]
fn delta_zero_is_sgd_up_to_rounding() {
    tch::manual_seed(3);
    let init: Vec<Tensor> = [[5, 4], [3, 2]]
        .iter()
        .map(|s| Tensor::randn(*s, tch::kind::FLOAT_CPU))
        .collect();
    let run = |kind: OptimizerKind| {
        let params: Vec<Tensor> = init
            .iter()
            .map(|t| t.copy().set_requires_grad(true))
            .collect();
        let named = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect();
        let mut opt = Optimizer::new(
            OptimizerPlan {
                delta: 0.0,
                ..OptimizerPlan::of(kind)
            },
            named,
        );
        for step in 0..6 {
            opt.zero_grad().unwrap();
            let task = (&params[0] * &params[0]).sum(Kind::Float)
                + params[1].sum(Kind::Float) * step as f64;
            // Quadratic: rounding does not grow over the steps.
            let kd = ((&params[0] - 1.0).square().sum(Kind::Float)
                + (&params[1] * &params[1] * 2.0).sum(Kind::Float))
                * 0.3;
            if opt.splits_losses() {
                opt.backward_split(Some(&task), Some(&kd)).unwrap();
            } else {
                opt.backward(&(task + kd)).unwrap();
            }
            opt.step(0.05).unwrap();
        }
        params
    };
    let (sgd, dot) = (run(OptimizerKind::Sgd), run(OptimizerKind::Dot));
    for (a, b) in sgd.iter().zip(&dot) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff:e}");
    }
    let plan = OptimizerPlan::of(OptimizerKind::Dot);
    assert_eq!((plan.momentum, plan.delta), (0.9, 0.075));
}

fn distill_plan(teacher: &Path) -> Plan {
    let mut fitnet = MethodPlan::new("fitnet", 0.5);
    fitnet.config = serde_json::json!({"tap": "feat/2", "connector": "conv_reg"});
    Plan {
        name: "dot".into(),
        seed: 7,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                classes: 10,
                train_size: 96,
                test_size: 32,
                ..Default::default()
            }),
            batch_size: 32,
            ..Default::default()
        },
        student: ModelPlan::new("resnet8"),
        teacher: Some(ModelPlan {
            weights: Some(teacher.to_path_buf()),
            ..ModelPlan::new("resnet8")
        }),
        teacher_cache: None,
        stages: vec![StagePlan {
            optimizer: OptimizerPlan::of(OptimizerKind::Dot),
            ..StagePlan::new(
                "distill",
                2,
                vec![
                    MethodPlan::new("ce", 1.0),
                    MethodPlan::new("st", 0.9),
                    fitnet,
                ],
            )
        }],
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

/// `ce` reads no teacher: a task loss; `st` and `fitnet` read it. FitNet's
/// regressor is reached by the distillation loss alone, so only its
/// distillation buffer moves; the student's layers carry both. A run
/// stopped after its first epoch and resumed ends as the whole run.
#[test]
fn a_dot_run_splits_task_and_distillation_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let plan = distill_plan(&teacher);
    let (a, b) = (dir.path().join("whole"), dir.path().join("resumed"));
    let (_, mid) = common::whole_and_resumed(&plan, &a, &b);
    let names: Vec<String> = mid
        .with_prefix("optim.")
        .map(|(n, _)| n.to_string())
        .collect();
    let get = |n: &str| {
        mid.get(&format!("optim.{n}"))
            .unwrap_or_else(|| panic!("optim.{n} not in the checkpoint: {names:?}"))
    };
    assert_eq!(get("dot/step").double_value(&[]), 3.0);
    let moved = |n: &str| get(n).abs().max().double_value(&[]) > 0.0;
    for layer in ["net.conv1.weight", "net.fc.weight"] {
        assert!(moved(&format!("{layer}:momentum_buffer")), "{layer}");
        assert!(moved(&format!("{layer}:momentum_kd_buffer")), "{layer}");
    }
    let regressor = names
        .iter()
        .find(|n| n.starts_with("method.2.") && n.ends_with("conv.weight:momentum_kd_buffer"))
        .unwrap_or_else(|| panic!("no FitNet regressor state: {names:?}"))
        .trim_end_matches(":momentum_kd_buffer")
        .to_string();
    assert!(moved(&format!("{regressor}:momentum_kd_buffer")));
    assert!(!moved(&format!("{regressor}:momentum_buffer")));
    let fa = tensors::read(&a.join("checkpoint.safetensors")).unwrap();
    let fb = tensors::read(&b.join("checkpoint.safetensors")).unwrap();
    let mut n = 0;
    for (name, t) in fa.with_prefix("") {
        let u = fb
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing after resuming"));
        assert!(t.equal(u), "{name} differs after resuming");
        n += 1;
    }
    assert!(n > 50, "{n}");
}

/// What DOT cannot be combined with is refused before training, by name.
#[test]
fn dot_refuses_what_it_is_not_defined_for() {
    kd_methods::link();
    let registry = kd_core::Registry::global().unwrap();
    let check = |plan: &Plan| {
        kd_engine::validate(plan, &registry, &kd_engine::NoScripts, &[])
            .unwrap_err()
            .to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let mut plan = distill_plan(&teacher);
    plan.stages[0].clip_grad = Some(1.0);
    let e = check(&plan);
    assert!(
        e.contains("dot optimizer cannot be combined with clip_grad"),
        "{e}"
    );
    let mut plan = distill_plan(&teacher);
    plan.stages[0].optimizer.delta = 0.2;
    let e = check(&plan);
    assert!(e.contains("momentum + delta (1.1"), "{e}");
}

/// A term a method marks as task (DeiT's class-token cross-entropy) goes
/// with the task loss: with α 0 DeiT's distillation term is 0·KL, so the
/// distillation buffers stay zero and the task buffers move.
#[test]
fn a_methods_task_term_takes_the_task_momentum() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let mut plan = distill_plan(&teacher);
    plan.student =
        ModelPlan::new("deit_tiny_distilled_patch16_224(img_size=32,patch_size=8,depth=1)");
    let mut deit = MethodPlan::new("deit", 1.0);
    deit.config = serde_json::json!({"alpha": 0.0});
    plan.stages[0].methods = vec![deit];
    let (_, mid) = common::whole_and_resumed(&plan, &dir.path().join("a"), &dir.path().join("b"));
    let norm = |n: &str| {
        mid.get(&format!("optim.net.{n}"))
            .unwrap_or_else(|| panic!("optim.net.{n} not checkpointed"))
            .abs()
            .max()
            .double_value(&[])
    };
    for layer in ["head.weight", "blocks.0.attn.qkv.weight"] {
        assert!(norm(&format!("{layer}:momentum_buffer")) > 0.0, "{layer}");
        assert_eq!(norm(&format!("{layer}:momentum_kd_buffer")), 0.0, "{layer}");
    }
}

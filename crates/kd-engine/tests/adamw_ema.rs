//! A run with AdamW (timm's parameter groups), gradient clipping and an EMA
//! of the student, stopped after its first epoch and resumed, ends exactly
//! as the uninterrupted run: weights, AdamW's moments and step counts, the
//! EMA and the epoch records, bit for bit on the CPU.

mod common;

use std::path::Path;

use kd_data::{DataSource, SyntheticConfig};
use kd_engine::tensors::{self, TensorFile};
use kd_engine::{
    DataPlan, DeviceChoice, EmaPlan, MethodPlan, ModelPlan, OptimizerKind, OptimizerPlan, Plan,
    StagePlan,
};

fn plan() -> Plan {
    Plan {
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
        name: "adamw_ema".into(),
        seed: 3,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                train_size: 96,
                test_size: 32,
                ..Default::default()
            }),
            batch_size: 32,
            ..Default::default()
        },
        student: ModelPlan::new("resnet8"),
        teacher: None,
        teacher_cache: None,
        stages: vec![StagePlan {
            optimizer: OptimizerPlan {
                lr: 2e-3,
                weight_decay: 0.05,
                ..OptimizerPlan::of(OptimizerKind::Adamw)
            },
            lr_schedule: kd_engine::LrSchedule::Cosine {
                warmup_epochs: 1,
                min_lr: 0.0,
                warmup_lr: 0.0,
            },
            clip_grad: Some(1.0),
            ema: Some(EmaPlan {
                decay: 0.9,
                warmup: true,
                ..Default::default()
            }),
            ..StagePlan::new("train", 2, vec![MethodPlan::new("ce", 1.0)])
        }],
    }
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("epochs.jsonl")).unwrap();
    let mut by_epoch = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let r = v["record"].as_object_mut().unwrap();
        // Timing differs between runs.
        r.remove("images_per_sec");
        r.remove("eval_secs");
        by_epoch.insert(r["epoch"].as_u64().unwrap(), v);
    }
    by_epoch.into_values().collect()
}

fn same_tensors(a: &TensorFile, b: &TensorFile, prefix: &str) -> usize {
    let mut n = 0;
    for (name, t) in a.with_prefix(prefix) {
        let u = b
            .get(&format!("{prefix}{name}"))
            .unwrap_or_else(|| panic!("{prefix}{name} missing"));
        assert!(t.equal(u), "{prefix}{name} differs after resuming");
        n += 1;
    }
    n
}

#[test]
fn resumed_adamw_ema_run_ends_exactly_as_the_whole_run() {
    let plan = plan();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_, mid) = common::whole_and_resumed(&plan, a.path(), b.path());
    // AdamW's state is in the checkpoint: 3 steps of one epoch so far.
    let step = mid
        .get("optim.net.conv1.weight:step")
        .expect("AdamW step counts are checkpointed");
    assert_eq!(step.double_value(&[]), 3.0);
    assert!(mid.get("optim.net.conv1.weight:exp_avg_sq").is_some());
    assert!(
        mid.get("ema.conv1.weight").is_some(),
        "the EMA is checkpointed"
    );

    let fa = tensors::read(&a.path().join("checkpoint.safetensors")).unwrap();
    let fb = tensors::read(&b.path().join("checkpoint.safetensors")).unwrap();
    assert!(same_tensors(&fa, &fb, "student.") > 10);
    assert!(same_tensors(&fa, &fb, "ema.") > 10);
    assert!(same_tensors(&fa, &fb, "optim.") > 30);
    let (ra, rb) = (records(a.path()), records(b.path()));
    assert_eq!(ra, rb, "epoch records differ after resuming");
    assert_eq!(ra.len(), 2);
    for r in &ra {
        assert!(r["record"]["ema_top1"].is_number(), "{r}");
    }
    // The EMA's own weights file, next to last and best: the checkpoint's
    // average, not the raw student.
    let ema = tensors::read(&a.path().join("train.ema.safetensors")).unwrap();
    let last = tensors::read(&a.path().join("train.last.safetensors")).unwrap();
    let w = ema.get("conv1.weight").unwrap();
    assert!(w.equal(fa.get("ema.conv1.weight").unwrap()));
    assert!(!w.equal(last.get("conv1.weight").unwrap()));
}

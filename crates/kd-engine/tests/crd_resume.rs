//! A run with memory banks, stopped after its first epoch and resumed from
//! its checkpoint, continues with the same banks: at the end they equal the
//! banks of an uninterrupted run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    DataPlan, DeviceChoice, EngineError, EpochRecord, MethodPlan, ModelPlan, NoScripts, Observer,
    Plan, RunOptions, Silent, StagePlan, tensors,
};

fn plan() -> Plan {
    let mut crd = MethodPlan::new("crd", 0.8);
    crd.config = serde_json::json!({"nce_n": 32, "feat_dim": 16});
    Plan {
        name: "crd".into(),
        seed: 4,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                train_size: 96,
                test_size: 16,
                ..Default::default()
            }),
            batch_size: 32,
            ..Default::default()
        },
        student: ModelPlan {
            arch: "resnet8".into(),
            weights: None,
        },
        teacher: Some(ModelPlan {
            arch: "resnet8".into(),
            weights: None,
        }),
        stages: vec![StagePlan {
            name: "distill".into(),
            epochs: 2,
            subject: Default::default(),
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods: vec![MethodPlan::new("ce", 1.0), crd],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
        }],
    }
}

/// Raises the stop flag once the first epoch is done (as Ctrl-C would).
struct StopAfterFirst(Arc<AtomicBool>);
impl Observer for StopAfterFirst {
    fn epoch(&mut self, _: &str, _: i64, _: &EpochRecord) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn resumed_crd_run_has_identical_banks() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut opts = RunOptions {
        run_dir: a.path().into(),
        resume: false,
        observer: &mut Silent,
        scripts: &NoScripts,
        stop: None,
        log_every: 0,
        progress_bar: false,
    };
    kd_engine::run(&plan(), &registry, &mut opts).unwrap();

    let flag = Arc::new(AtomicBool::new(false));
    let mut stopper = StopAfterFirst(flag.clone());
    let mut opts = RunOptions {
        run_dir: b.path().into(),
        resume: false,
        observer: &mut stopper,
        scripts: &NoScripts,
        stop: Some(flag),
        log_every: 0,
        progress_bar: false,
    };
    let err = kd_engine::run(&plan(), &registry, &mut opts).unwrap_err();
    assert!(matches!(err, EngineError::Interrupted(_)), "{err}");
    let mid = tensors::read(&b.path().join("checkpoint.safetensors")).unwrap();
    let mid_bank = mid
        .get("method.1.contrast.memory_s")
        .expect("banks are in the checkpoint")
        .copy();

    let mut opts = RunOptions {
        run_dir: b.path().into(),
        resume: true,
        observer: &mut Silent,
        scripts: &NoScripts,
        stop: None,
        log_every: 0,
        progress_bar: false,
    };
    kd_engine::run(&plan(), &registry, &mut opts).unwrap();
    let fa = tensors::read(&a.path().join("checkpoint.safetensors")).unwrap();
    let fb = tensors::read(&b.path().join("checkpoint.safetensors")).unwrap();
    for name in [
        "carry.crd/contrast.memory_s",
        "carry.crd/contrast.memory_t",
        "carry.crd/contrast.Z_s",
        "carry.crd/embed_s.linear.weight",
    ] {
        let (x, y) = (fa.get(name).unwrap(), fb.get(name).unwrap());
        assert!(x.equal(y), "{name} differs after resume");
    }
    assert!(
        !mid_bank.equal(fa.get("carry.crd/contrast.memory_s").unwrap()),
        "the second epoch updates the banks"
    );
}

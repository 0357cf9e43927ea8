//! A BSS run stopped after its first epoch and resumed from its checkpoint
//! ends with the same student as an uninterrupted run: the attack classes
//! come from the engine's keyed draws, not from torch's global generator
//! (whose state a resumed process does not share).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    DataPlan, DeviceChoice, EngineError, EpochRecord, MethodPlan, ModelPlan, NoScripts, Observer,
    Plan, RunOptions, Silent, StagePlan, tensors,
};

fn plan() -> Plan {
    let mut bss = MethodPlan::new("bss", 1.0);
    // Active from the first epoch, few steps: the test is about which rows
    // and classes are attacked, not about the attack's strength.
    bss.config = serde_json::json!({"warmup_epochs": 0, "num_steps": 2, "attack_size": 8});
    Plan {
        name: "bss".into(),
        seed: 1,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            // Few classes, so that untrained networks get rows right on both
            // sides, yet more than two, so that the attack class is a draw.
            // With torch's global generator instead of the keyed draws this
            // run does not resume exactly (checked by hand).
            source: DataSource::Synthetic(SyntheticConfig {
                classes: 4,
                train_size: 64,
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
            methods: vec![MethodPlan::new("ce", 1.0), bss],
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

fn opts<'a>(
    dir: &std::path::Path,
    resume: bool,
    observer: &'a mut dyn Observer,
    stop: Option<Arc<AtomicBool>>,
) -> RunOptions<'a> {
    RunOptions {
        run_dir: dir.into(),
        resume,
        observer,
        scripts: &NoScripts,
        stop,
        log_every: 0,
        progress_bar: false,
    }
}

#[test]
fn resumed_bss_run_ends_with_the_same_student() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = kd_engine::run(
        &plan(),
        &registry,
        &mut opts(a.path(), false, &mut Silent, None),
    )
    .unwrap();
    for record in &whole.stages[0].epochs {
        assert!(
            record.terms["bss/bss"] > 0.0,
            "epoch {} attacked nothing: {:?}",
            record.epoch,
            record.terms
        );
    }

    let flag = Arc::new(AtomicBool::new(false));
    let mut stopper = StopAfterFirst(flag.clone());
    let err = kd_engine::run(
        &plan(),
        &registry,
        &mut opts(b.path(), false, &mut stopper, Some(flag)),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Interrupted(_)), "{err}");
    // Whatever else this process draws from torch's generator in between
    // must not matter.
    tch::manual_seed(12345);
    kd_engine::run(
        &plan(),
        &registry,
        &mut opts(b.path(), true, &mut Silent, None),
    )
    .unwrap();

    let fa = tensors::read(&a.path().join("distill.last.safetensors")).unwrap();
    let fb = tensors::read(&b.path().join("distill.last.safetensors")).unwrap();
    assert!(!fa.tensors.is_empty());
    for (name, x) in &fa.tensors {
        let y = fb.get(name).unwrap();
        assert!(x.equal(y), "{name} differs after resume");
    }
}

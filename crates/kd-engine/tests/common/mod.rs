//! What the engine's resume tests share: a run stopped after its first
//! epoch (as Ctrl-C would stop it) and resumed from its checkpoint, beside
//! the same run uninterrupted.

// Each test file compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kd_core::Registry;
use kd_engine::tensors::{self, TensorFile};
use kd_engine::{
    EngineError, EpochRecord, NoScripts, Observer, Plan, RunOptions, RunResult, Silent,
};

/// Raises the stop flag once the first epoch is done.
pub struct StopAfterFirst(pub Arc<AtomicBool>);

impl Observer for StopAfterFirst {
    fn epoch(&mut self, _: &str, _: i64, _: &EpochRecord) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub fn options<'a>(
    dir: &Path,
    resume: bool,
    observer: &'a mut dyn Observer,
    stop: Option<Arc<AtomicBool>>,
) -> RunOptions<'a> {
    std::fs::create_dir_all(dir).unwrap();
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

/// Runs `plan` whole in `whole`; in `resumed`, stops it after its first
/// epoch and resumes it, with torch's generator moved elsewhere in between
/// (what a resumed process draws from it must not matter). Returns the
/// whole run's result and the checkpoint the interrupted run left.
pub fn whole_and_resumed(plan: &Plan, whole: &Path, resumed: &Path) -> (RunResult, TensorFile) {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let result = kd_engine::run(
        plan,
        &registry,
        &mut options(whole, false, &mut Silent, None),
    )
    .unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let mut stopper = StopAfterFirst(flag.clone());
    let err = kd_engine::run(
        plan,
        &registry,
        &mut options(resumed, false, &mut stopper, Some(flag)),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Interrupted(_)), "{err}");
    let mid = tensors::read(&resumed.join("checkpoint.safetensors")).unwrap();
    tch::manual_seed(12345);
    let _ = tch::Tensor::rand([100], tch::kind::FLOAT_CPU);
    kd_engine::run(
        plan,
        &registry,
        &mut options(resumed, true, &mut Silent, None),
    )
    .unwrap();
    (result, mid)
}

/// Every tensor of weights file `file` (e.g. `distill.last.safetensors`)
/// is bit for bit the same in both run folders.
pub fn same_weights(a: &Path, b: &Path, file: &str) {
    let fa = tensors::read(&a.join(file)).unwrap();
    let fb = tensors::read(&b.join(file)).unwrap();
    assert!(!fa.tensors.is_empty(), "{file} is empty");
    for (name, x) in &fa.tensors {
        let y = fb
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing after resume"));
        assert!(x.equal(y), "{name} of {file} differs after resume");
    }
}

/// A resnet8 teacher file (`teacher<seed>.safetensors`) whose BatchNorms
/// saw a few batches, so that folding them is not an identity.
pub fn teacher_file(dir: &Path, seed: i64) -> PathBuf {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::build("resnet8", &vs.root(), 10).unwrap();
    tch::no_grad(|| {
        for _ in 0..3 {
            let x = tch::Tensor::randn([16, 3, 32, 32], tch::kind::FLOAT_CPU);
            let _ = net.forward_taps(&x, true);
        }
    });
    let path = dir.join(format!("teacher{seed}.safetensors"));
    kd_models::save_weights(&vs, &path).unwrap();
    path
}

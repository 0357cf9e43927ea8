//! Mixup/CutMix and RandomErasing in a distillation run: the frozen teacher
//! sees the same mixed, erased images as the student (consistent teaching),
//! methods get the mixed labels, and a mixed run stopped after its first
//! epoch and resumed ends exactly where the uninterrupted run ends.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kd_core::{BuildCx, Losses, Method, Registry, Side, StepIo, TapRef, register_method};
use kd_data::{
    CropPadding, DataSource, Loader, LoaderConfig, Mixup, Normalize, RandomErasing, SyntheticConfig,
};
use kd_engine::{DataPlan, DeviceChoice, MethodPlan, ModelPlan, Plan, Silent, StagePlan};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

/// What a step handed the methods: (epoch, step, teacher logits, labels,
/// mixed labels).
type Seen = (usize, usize, Tensor, Tensor, Option<Tensor>);
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProbeConfig {}

/// Records what the teacher computed on each training batch; no loss.
struct Probe {
    teacher: TapRef,
}

impl Method for Probe {
    const NAME: &'static str = "mixup_probe";
    const SUMMARY: &'static str = "test: records the teacher's logits";
    type Config = ProbeConfig;

    fn build(_: ProbeConfig, cx: &mut BuildCx) -> kd_core::Result<Self> {
        Ok(Probe {
            teacher: cx.tap(Side::Teacher, "logits")?,
        })
    }

    fn losses(&mut self, io: &StepIo, _: &mut Losses) -> kd_core::Result<()> {
        if io.train {
            SEEN.lock().unwrap().push((
                io.progress.epoch,
                io.progress.step,
                io.tap(self.teacher).copy(),
                io.target.copy(),
                io.soft_target.map(Tensor::copy),
            ));
        }
        Ok(())
    }
}

register_method!(Probe);

fn synthetic() -> SyntheticConfig {
    SyntheticConfig {
        classes: 4,
        train_size: 64,
        test_size: 16,
        ..Default::default()
    }
}

fn mixup() -> Mixup {
    Mixup {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        ..Default::default()
    }
}

fn erasing() -> RandomErasing {
    RandomErasing {
        prob: 0.5,
        ..Default::default()
    }
}

/// A resnet8 teacher file, its BatchNorms calibrated so that they matter.
fn teacher(dir: &Path) -> (PathBuf, Box<dyn kd_models::Network>) {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = kd_models::build("resnet8", &vs.root(), 4).unwrap();
    tch::no_grad(|| {
        for _ in 0..3 {
            let x = Tensor::randn([16, 3, 32, 32], tch::kind::FLOAT_CPU);
            let _ = net.forward_taps(&x, true);
        }
    });
    let path = dir.join("teacher.safetensors");
    kd_models::save_weights(&vs, &path).unwrap();
    (path, net)
}

fn plan(name: &str, teacher: &Path, epochs: usize, extra: Option<MethodPlan>) -> Plan {
    let mut ce = MethodPlan::new("ce", 1.0);
    ce.config = serde_json::json!({"label_smoothing": 0.1});
    let mut methods = vec![ce, MethodPlan::new("st", 1.0)];
    methods.extend(extra);
    Plan {
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
        name: name.into(),
        seed: 9,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(synthetic()),
            batch_size: 16,
            mixup: Some(mixup()),
            random_erasing: Some(erasing()),
            ..Default::default()
        },
        student: ModelPlan::new("resnet8"),
        teacher: Some(ModelPlan {
            weights: Some(teacher.into()),
            ..ModelPlan::new("resnet8")
        }),
        teacher_cache: None,
        stages: vec![StagePlan::new("distill", epochs, methods)],
    }
}

/// `f` on the run's training loader before erasing and mixing: the
/// plan's data, seed (for stage 0), batch size and crop.
fn with_loader<T>(f: impl FnOnce(Loader) -> T) -> T {
    let source = DataSource::Synthetic(synthetic());
    let mut splits = kd_data::load(&source, 0.0, 0).unwrap();
    splits.normalize_with(&Normalize::Default, &source).unwrap();
    let cfg = LoaderConfig {
        batch_size: 16,
        shuffle: true,
        augment: true,
        padding: CropPadding::Zero,
        drop_last: false,
        contrast: None,
    };
    f(Loader::new(&splits.train, cfg, 9, Device::Cpu).unwrap())
}

/// The run's training batches as the loader makes them: the same seed,
/// order, erasing and mixing.
fn batches(epoch: usize) -> Vec<kd_data::Batch> {
    with_loader(|l| {
        let loader = l.random_erasing(erasing()).unwrap().mixup(mixup()).unwrap();
        let order = loader.order(epoch);
        (0..loader.batches_per_epoch())
            .map(|b| loader.batch(&order, epoch, b).unwrap())
            .collect()
    })
}

#[test]
fn the_teacher_sees_the_mixed_images_and_methods_the_mixed_labels() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (file, net) = teacher(dir.path());
    SEEN.lock().unwrap().clear();
    let probe = MethodPlan::new("mixup_probe", 1.0);
    let p = plan("mixed", &file, 1, Some(probe));
    kd_engine::run(
        &p,
        &registry,
        &mut common::options(&dir.path().join("run"), false, &mut Silent, None),
    )
    .unwrap();
    let seen = std::mem::take(&mut *SEEN.lock().unwrap());
    let want = batches(0);
    assert_eq!(seen.len(), want.len(), "one record per training step");
    let mut mixed = 0;
    for (epoch, step, logits, target, soft) in &seen {
        assert_eq!(*epoch, 0);
        let b = &want[*step];
        assert!(target.equal(&b.labels), "step {step}: the rows' own labels");
        let soft = soft
            .as_ref()
            .expect("a mixing run gives every batch soft targets");
        assert!(
            soft.equal(b.soft_target.as_ref().unwrap()),
            "step {step}: mixed labels"
        );
        let one_hot = b.labels.one_hot(4).to_kind(Kind::Float);
        if !soft.equal(&one_hot) {
            mixed += 1;
        }
        // The teacher's logits are its forward on the mixed batch (folded
        // BatchNorm in the run: equal within the fold's rounding)...
        let on_mixed = tch::no_grad(|| net.forward_taps(&b.images, false).logits);
        let diff = (logits - &on_mixed).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "step {step}: teacher logits differ by {diff}");
    }
    assert!(
        mixed >= 2,
        "only {mixed} of {} batches were mixed",
        seen.len()
    );
    // ... and not its forward on the images before erasing and mixing.
    let plain = with_loader(|l| l.batch(&l.order(0), 0, 0).unwrap());
    let first = &seen.iter().find(|s| s.1 == 0).unwrap().2;
    let on_plain = tch::no_grad(|| net.forward_taps(&plain.images, false).logits);
    assert!((first - on_plain).abs().max().double_value(&[]) > 1e-2);
}

#[test]
fn a_mixed_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = teacher(dir.path());
    let p = plan("resume", &file, 2, None);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // The mixing and erasing draws are keyed, not torch's generator's.
    common::whole_and_resumed(&p, &a, &b);
    common::same_weights(&a, &b, "distill.last.safetensors");
}

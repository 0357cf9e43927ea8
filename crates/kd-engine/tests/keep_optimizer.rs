//! A stage with `keep_optimizer` continues the previous stage's SGD, as
//! KD-Zoo's AB and FSP do with one `torch.optim.SGD` for the init and main
//! stages: a run split into such stages ends where one continuous stage
//! ends. Without the option each stage starts with zero momentum.
//!
//! The data set is two images without augmentation, in one batch: every
//! epoch of every stage sees the same images whatever the loader's seed, so
//! splitting a stage changes nothing but the optimiser, and the order of the
//! two images, which moves float sums in their last bits (`NOISE`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::tensors::{self, TensorFile};
use kd_engine::{
    DataPlan, DeviceChoice, EngineError, EpochRecord, MethodPlan, ModelPlan, NoScripts, Observer,
    Part, Plan, RunOptions, Sgd, Silent, StagePlan, Subject,
};
use tempfile::TempDir;

/// Far above the rounding of reordered sums, far below what resetting the
/// momentum changes.
const NOISE: f64 = 1e-5;

fn stage(name: &str, epochs: usize, subject: Subject, keep: bool) -> StagePlan {
    StagePlan {
        name: name.into(),
        epochs,
        subject,
        train: vec![Part::Network, Part::Methods],
        methods: vec![MethodPlan::new("ce", 1.0)],
        optimizer: Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            ..Default::default()
        },
        lr_schedule: Default::default(),
        keep_optimizer: keep,
        clip_grad: None,
        ema: None,
    }
}

fn plan(name: &str, stages: Vec<StagePlan>, teacher: bool) -> Plan {
    let model = |arch: &str| ModelPlan {
        arch: arch.into(),
        weights: None,
        source_sha256: None,
        reset_classifier: false,
    };
    Plan {
        name: name.into(),
        seed: 5,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                classes: 2,
                train_size: 2,
                test_size: 4,
                ..Default::default()
            }),
            batch_size: 8,
            augment: false,
            ..Default::default()
        },
        student: model("resnet8"),
        // The same architecture as the student: the same parameter names,
        // which must not lend the student the teacher's momentum.
        teacher: teacher.then(|| model("resnet8")),
        teacher_cache: None,
        stages,
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

/// Raises the stop flag after an epoch of the named stage (as Ctrl-C would).
struct StopAfter(&'static str, Arc<AtomicBool>);
impl Observer for StopAfter {
    fn epoch(&mut self, stage: &str, _: i64, _: &EpochRecord) {
        if stage == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

fn options<'a>(
    dir: &Path,
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

fn run(plan: &Plan) -> TempDir {
    kd_methods::link();
    let dir = tempfile::tempdir().unwrap();
    kd_engine::run(
        plan,
        &Registry::global().unwrap(),
        &mut options(dir.path(), false, &mut Silent, None),
    )
    .unwrap();
    dir
}

/// The student's weights after the run's last stage.
fn student(dir: &TempDir, plan: &Plan) -> TensorFile {
    let last = &plan.stages.last().unwrap().name;
    tensors::read(&dir.path().join(format!("{last}.last.safetensors"))).unwrap()
}

/// Largest difference between two weight files of the same network.
fn max_diff(a: &TensorFile, b: &TensorFile) -> f64 {
    assert!(!a.tensors.is_empty());
    a.tensors
        .iter()
        .map(|(n, x)| {
            let y = b.get(n).unwrap_or_else(|| panic!("{n} missing"));
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn kept_optimizer_equals_one_continuous_stage() {
    for nesterov in [false, true] {
        let s = |name, epochs, keep| {
            let mut st = stage(name, epochs, Subject::Student, keep);
            st.optimizer.nesterov = nesterov;
            st
        };
        let one = plan("one", vec![s("all", 3, false)], false);
        let kept = plan("kept", vec![s("init", 2, false), s("main", 1, true)], false);
        let reset = plan(
            "reset",
            vec![s("init", 2, false), s("main", 1, false)],
            false,
        );
        let (d1, dk, dr) = (run(&one), run(&kept), run(&reset));
        let same = max_diff(&student(&d1, &one), &student(&dk, &kept));
        assert!(
            same < NOISE,
            "nesterov {nesterov}: a kept optimiser continues as one stage would ({same:e})"
        );
        let ck = |d: &TempDir| tensors::read(&d.path().join("checkpoint.safetensors")).unwrap();
        let (c1, ckept) = (ck(&d1), ck(&dk));
        let bufs: Vec<_> = c1.with_prefix("optim.net.").collect();
        assert!(!bufs.is_empty());
        for (n, b) in bufs {
            let other = ckept.get(&format!("optim.net.{n}")).unwrap();
            let d = (b - other).abs().max().double_value(&[]);
            assert!(d < NOISE, "momentum of {n} differs by {d:e}");
        }
        let gap = max_diff(&student(&d1, &one), &student(&dr, &reset));
        assert!(
            gap > 100.0 * NOISE,
            "nesterov {nesterov}: resetting changes the step ({gap:e})"
        );
    }
}

/// Without the option the second stage starts from zero momentum: its one
/// step is then plain SGD's, exactly.
#[test]
fn without_the_option_momentum_starts_at_zero() {
    let reset = plan(
        "reset",
        vec![
            stage("init", 2, Subject::Student, false),
            stage("main", 1, Subject::Student, false),
        ],
        false,
    );
    let mut plain = reset.clone();
    plain.stages[1].optimizer.momentum = 0.0;
    let (dr, dp) = (run(&reset), run(&plain));
    assert_eq!(max_diff(&student(&dr, &reset), &student(&dp, &plain)), 0.0);
    let mut kept = reset.clone();
    kept.stages[1].keep_optimizer = true;
    let dk = run(&kept);
    assert!(max_diff(&student(&dk, &kept), &student(&dp, &plain)) > 100.0 * NOISE);
}

/// A chain of kept stages is one optimiser: the student's momentum crosses a
/// stage that trains the teacher (the same architecture, the same parameter
/// names), through the checkpoint when the run is resumed in between.
#[test]
fn momentum_crosses_a_teacher_stage_and_a_resume() {
    let three = plan(
        "three",
        vec![
            stage("s0", 2, Subject::Student, false),
            stage("t", 1, Subject::Teacher, true),
            stage("s1", 1, Subject::Student, true),
        ],
        true,
    );
    let two = plan(
        "two",
        vec![
            stage("s0", 2, Subject::Student, false),
            stage("s1", 1, Subject::Student, true),
        ],
        true,
    );
    let mut fresh = two.clone();
    fresh.stages[1].keep_optimizer = false;
    let (d3, d2, df) = (run(&three), run(&two), run(&fresh));
    let same = max_diff(&student(&d3, &three), &student(&d2, &two));
    assert!(
        same < NOISE,
        "the teacher stage in between changes nothing of the student's optimiser ({same:e})"
    );
    let gap = max_diff(&student(&d3, &three), &student(&df, &fresh));
    assert!(gap > 100.0 * NOISE, "the momentum did carry over ({gap:e})");
    kd_methods::link();
    let registry = Registry::global().unwrap();
    for stop_after in ["s0", "t"] {
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut stopper = StopAfter(stop_after, flag.clone());
        let err = kd_engine::run(
            &three,
            &registry,
            &mut options(dir.path(), false, &mut stopper, Some(flag)),
        )
        .unwrap_err();
        assert!(matches!(err, EngineError::Interrupted(_)), "{err}");
        if stop_after == "t" {
            let mid = tensors::read(&dir.path().join("checkpoint.safetensors")).unwrap();
            let carried: Vec<_> = mid.with_prefix("momentum.student/").collect();
            assert!(
                !carried.is_empty(),
                "the checkpoint holds the student's momentum"
            );
        }
        kd_engine::run(
            &three,
            &registry,
            &mut options(dir.path(), true, &mut Silent, None),
        )
        .unwrap();
        let resumed = tensors::read(&dir.path().join("s1.last.safetensors")).unwrap();
        assert_eq!(
            max_diff(&student(&d3, &three), &resumed),
            0.0,
            "resumed after `{stop_after}`"
        );
    }
}

#[test]
fn the_first_stage_cannot_keep_an_optimizer() {
    let p = plan("first", vec![stage("s", 1, Subject::Student, true)], false);
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let e = kd_engine::validate(&p, &registry, &NoScripts, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stage `s` keeps the optimiser of the stage before it"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let e = kd_engine::run(
        &p,
        &registry,
        &mut options(dir.path(), false, &mut Silent, None),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("but it is the first stage"), "{e}");
}

/// KD-Zoo's init stages (`train_init` in train_kd.py) compute
/// `criterionCls(out_s, target) * 0.0`: the classifier gets a zero gradient
/// and so still takes weight decay (and momentum) from the one optimiser.
/// In kd a `ce` at weight 0 does the same, and changes nothing else: one
/// step of SGD from a zero gradient scales the classifier by `1 - lr·wd`.
#[test]
fn a_zero_weighted_loss_keeps_the_classifier_in_the_update() {
    let mut alone = stage("init", 1, Subject::Student, false);
    alone.methods = vec![MethodPlan::new("at", 1.0)];
    let mut with_ce = alone.clone();
    with_ce.methods.push(MethodPlan::new("ce", 0.0));
    let (pa, pb) = (
        plan("alone", vec![alone], true),
        plan("with_ce", vec![with_ce], true),
    );
    let (da, db) = (run(&pa), run(&pb));
    let (a, b) = (student(&da, &pa), student(&db, &pb));
    let (lr, wd) = (0.05, 5e-4);
    for (n, x) in &a.tensors {
        let y = b.get(n).unwrap();
        if n.starts_with("fc.") {
            // Two images in one batch of 8: one epoch is one step.
            let want = x * (1.0 - lr * wd);
            let d = (y - &want).abs().max().double_value(&[]);
            assert!(d < 1e-7, "{n}: decayed by weight decay alone ({d:e})");
            assert!(!x.equal(y), "{n} moved");
        } else {
            assert!(x.equal(y), "{n}: a zero-weighted term changes nothing else");
        }
    }
}

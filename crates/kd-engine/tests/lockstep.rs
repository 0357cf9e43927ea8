//! Runs in lockstep (one teacher forward per batch for all students) end
//! exactly as the same runs alone: weights, method state and every epoch
//! record bit for bit on the CPU, with runs that take gradient taps of the
//! teacher (its forward shared with its graph) and runs of more stages than
//! others in the group; a failing run stops alone; a group interrupted and
//! resumed ends as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::tensors;
use kd_engine::{
    DataPlan, DeviceChoice, EngineError, EpochRecord, MethodPlan, ModelPlan, NoScripts, Observer,
    Plan, RunOptions, RunResult, Silent, StagePlan, Weight,
};
use tch::{Device, nn};

fn plan(name: &str, teacher: &Path, method: MethodPlan) -> Plan {
    Plan {
        name: name.into(),
        seed: 5,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                classes: 10,
                train_size: 80,
                test_size: 16,
                ..Default::default()
            }),
            batch_size: 32,
            ..Default::default()
        },
        student: ModelPlan {
            arch: "resnet8".into(),
            weights: None,
            source_sha256: None,
            reset_classifier: false,
        },
        teacher: Some(ModelPlan {
            arch: "resnet8".into(),
            weights: Some(teacher.to_path_buf()),
            source_sha256: None,
            reset_classifier: false,
        }),
        teacher_cache: None,
        stages: vec![StagePlan {
            name: "distill".into(),
            epochs: 2,
            subject: Default::default(),
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods: vec![MethodPlan::new("ce", 1.0), method],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
            keep_optimizer: false,
            clip_grad: None,
            ema: None,
        }],
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

fn methods() -> Vec<(&'static str, MethodPlan)> {
    let mut crd = MethodPlan::new("crd", 0.8);
    crd.config = serde_json::json!({"nce_n": 16, "feat_dim": 8});
    let mut fitnet = MethodPlan::new("fitnet", 1.0);
    fitnet.config = serde_json::json!({"connector": "conv_reg"});
    vec![
        ("st", MethodPlan::new("st", 0.9)),
        ("crd", crd),
        ("fitnet", fitnet),
        ("at", MethodPlan::new("at", 100.0)),
        ("sobolev", MethodPlan::new("sobolev", 20.0)),
        ("lwm", MethodPlan::new("lwm", 0.4)),
    ]
}

/// `plan` with an init stage of one epoch on `method` before its stage of
/// two on CE alone, as AB's recipes have: in lockstep, its init stage runs
/// beside the other runs' first stage, and its second stage needs no teacher
/// forward.
fn with_init_stage(mut plan: Plan, method: MethodPlan) -> Plan {
    plan.stages[0].methods.truncate(1);
    let mut init = plan.stages[0].clone();
    init.name = "init".into();
    init.epochs = 1;
    init.methods = vec![method];
    plan.stages.insert(0, init);
    plan
}

fn options<'a>(
    dir: PathBuf,
    resume: bool,
    observer: &'a mut dyn Observer,
    stop: Option<Arc<AtomicBool>>,
) -> RunOptions<'a> {
    RunOptions {
        run_dir: dir,
        resume,
        observer,
        scripts: &NoScripts,
        stop,
        log_every: 1,
        progress_bar: false,
    }
}

/// Epoch records of every stage, without the wall-clock numbers.
fn records(r: &RunResult) -> Vec<EpochRecord> {
    r.stages
        .iter()
        .flat_map(|s| s.epochs.iter().cloned())
        .map(|mut e| {
            e.images_per_sec = 0.0;
            e.eval_secs = 0.0;
            e
        })
        .collect()
}

fn assert_same_files(a: &Path, b: &Path, files: &[&str]) {
    for f in files {
        let (x, y) = (
            tensors::read(&a.join(f)).unwrap(),
            tensors::read(&b.join(f)).unwrap(),
        );
        assert_eq!(x.tensors.len(), y.tensors.len(), "{f}");
        for (name, t) in &x.tensors {
            assert!(
                t.equal(y.get(name).unwrap()),
                "{}/{f}: `{name}` differs",
                a.display()
            );
        }
    }
}

fn group(
    plans: &[Plan],
    root: &Path,
    resume: bool,
    stop: Option<Arc<AtomicBool>>,
    observer: &mut dyn Observer,
) -> Vec<Result<RunResult, EngineError>> {
    let registry = Registry::global().unwrap();
    let mut silents: Vec<Silent> = plans.iter().skip(1).map(|_| Silent).collect();
    let observers =
        std::iter::once(observer).chain(silents.iter_mut().map(|s| s as &mut dyn Observer));
    let mut opts: Vec<RunOptions> = plans
        .iter()
        .zip(observers)
        .map(|(p, obs)| options(root.join(&p.name), resume, obs, stop.clone()))
        .collect();
    kd_engine::run_group(plans, &registry, &mut opts).unwrap()
}

#[test]
fn lockstep_runs_equal_solo_runs_and_failures_stay_alone() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let mut plans: Vec<Plan> = methods()
        .into_iter()
        .map(|(n, m)| plan(n, &teacher, m))
        .collect();
    let mut broken = MethodPlan::new("st", 1.0);
    broken.weight = Weight::Const(f64::NAN);
    plans.insert(1, plan("broken", &teacher, broken));
    let ab = plan("ab", &teacher, MethodPlan::new("ce", 1.0));
    plans.push(with_init_stage(ab, MethodPlan::new("ab", 10.0)));
    // DOT's two backwards per step, beside the others' one.
    let mut dot = plan("st_dot", &teacher, MethodPlan::new("st", 0.9));
    dot.stages[0].optimizer = kd_engine::OptimizerPlan::of(kd_engine::OptimizerKind::Dot);
    plans.push(dot);
    let keys: Vec<_> = plans.iter().map(kd_engine::lockstep_key).collect();
    assert!(keys[0].is_some() && keys.iter().all(|k| *k == keys[0]));

    let solo_root = dir.path().join("solo");
    let solo: Vec<_> = plans
        .iter()
        .map(|p| {
            kd_engine::run(
                p,
                &registry,
                &mut options(solo_root.join(&p.name), false, &mut Silent, None),
            )
        })
        .collect();
    let grouped = group(&plans, &dir.path().join("group"), false, None, &mut Silent);

    for ((p, s), g) in plans.iter().zip(&solo).zip(&grouped) {
        if p.name == "broken" {
            for r in [s, g] {
                let err = r.as_ref().unwrap_err();
                assert!(matches!(err, EngineError::NonFinite { .. }), "{err}");
            }
            continue;
        }
        let (s, g) = (s.as_ref().unwrap(), g.as_ref().unwrap());
        assert_eq!(records(s), records(g), "{}: epoch records differ", p.name);
        assert_eq!(
            records(s).len(),
            p.stages.iter().map(|s| s.epochs).sum::<usize>()
        );
        let mut files = vec![
            "checkpoint.safetensors",
            "distill.last.safetensors",
            "distill.best.safetensors",
        ];
        if p.stages.len() > 1 {
            files.extend(["init.last.safetensors", "init.best.safetensors"]);
        }
        assert_same_files(
            &solo_root.join(&p.name),
            &dir.path().join("group").join(&p.name),
            &files,
        );
    }
}

/// Raises the stop flag once the first epoch of the observed run is done.
struct StopAfterFirst(Arc<AtomicBool>);
impl Observer for StopAfterFirst {
    fn epoch(&mut self, _: &str, _: i64, _: &EpochRecord) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn resumed_group_equals_uninterrupted_group() {
    kd_methods::link();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let mut plans: Vec<Plan> = methods()
        .into_iter()
        .take(2)
        .map(|(n, m)| plan(n, &teacher, m))
        .collect();
    let ab = plan("ab", &teacher, MethodPlan::new("ce", 1.0));
    plans.push(with_init_stage(ab, MethodPlan::new("ab", 10.0)));
    // DOT's two backwards per step, beside the others' one.
    let mut dot = plan("st_dot", &teacher, MethodPlan::new("st", 0.9));
    dot.stages[0].optimizer = kd_engine::OptimizerPlan::of(kd_engine::OptimizerKind::Dot);
    plans.push(dot);
    let whole = group(&plans, &dir.path().join("whole"), false, None, &mut Silent);
    let flag = Arc::new(AtomicBool::new(false));
    let cut = group(
        &plans,
        &dir.path().join("cut"),
        false,
        Some(flag.clone()),
        &mut StopAfterFirst(flag),
    );
    for r in &cut {
        assert!(
            matches!(r, Err(EngineError::Interrupted(_))),
            "{:?}",
            r.as_ref().err()
        );
    }
    // The teacher is still its file's: the checkpoints leave it out.
    for p in &plans {
        let ckpt = tensors::read(
            &dir.path()
                .join("cut")
                .join(&p.name)
                .join("checkpoint.safetensors"),
        )
        .unwrap();
        assert!(
            ckpt.tensors.iter().all(|(n, _)| !n.starts_with("teacher.")),
            "{}",
            p.name
        );
        assert!(ckpt.tensors.iter().any(|(n, _)| n.starts_with("student.")));
    }
    tch::manual_seed(999);
    let resumed = group(&plans, &dir.path().join("cut"), true, None, &mut Silent);
    for ((p, w), r) in plans.iter().zip(&whole).zip(&resumed) {
        assert_eq!(
            records(w.as_ref().unwrap()),
            records(r.as_ref().unwrap()),
            "{}",
            p.name
        );
        let files = ["checkpoint.safetensors", "distill.last.safetensors"];
        assert_same_files(
            &dir.path().join("whole").join(&p.name),
            &dir.path().join("cut").join(&p.name),
            &files,
        );
    }
}

#[test]
fn a_checkpoint_without_its_teacher_refuses_a_changed_teacher_file() {
    kd_methods::link();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let plans = vec![plan("st", &teacher, MethodPlan::new("st", 0.9))];
    let flag = Arc::new(AtomicBool::new(false));
    let cut = group(
        &plans,
        dir.path(),
        false,
        Some(flag.clone()),
        &mut StopAfterFirst(flag),
    );
    assert!(matches!(cut[0], Err(EngineError::Interrupted(_))));
    // Other weights under the same name.
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = kd_models::build("resnet8", &vs.root(), 10).unwrap();
    kd_models::save_weights(&vs, &teacher).unwrap();
    let err = group(&plans, dir.path(), true, None, &mut Silent)
        .remove(0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("contents changed"), "{err}");
}

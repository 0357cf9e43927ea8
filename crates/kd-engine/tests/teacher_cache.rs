//! Runs that read their teacher's outputs from a cache end bit for bit
//! where the same runs computing them end: alone, in lockstep (one cache
//! serving the group), with cached feature taps, and resumed. A cache of
//! another teacher, data, seed or length, and methods that need the
//! teacher itself, are refused before training, naming what differs.

mod common;

use std::path::{Path, PathBuf};

use kd_core::Registry;
use kd_data::{DataSource, Mixup, SyntheticConfig};
use kd_engine::tensors;
use kd_engine::{
    CacheDtype, CacheManifest, CacheSpec, CacheWriter, DataPlan, DeviceChoice, EpochRecord,
    MethodPlan, ModelPlan, NoScripts, Plan, RunOptions, RunResult, Silent, StagePlan,
};

/// The tests of this file one at a time: the forward counter is the
/// process's, and `cargo test` runs tests on threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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
            // The teacher sees the mixed images: the cache must hold them.
            mixup: Some(Mixup {
                mixup_alpha: 0.8,
                cutmix_alpha: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        },
        student: ModelPlan::new("resnet8"),
        teacher: Some(ModelPlan {
            weights: Some(teacher.to_path_buf()),
            ..ModelPlan::new("resnet8")
        }),
        teacher_cache: None,
        stages: vec![StagePlan::new(
            "distill",
            2,
            vec![MethodPlan::new("ce", 1.0), method],
        )],
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

fn spec(seeds: &[u64], epochs: usize, taps: &[&str]) -> CacheSpec {
    CacheSpec {
        seeds: seeds.to_vec(),
        stages: vec![0],
        epochs,
        top_k: 0,
        dtype: CacheDtype::Fp32,
        taps: taps.iter().map(|t| t.to_string()).collect(),
    }
}

fn write_cache(plan: &Plan, spec: CacheSpec, dir: &Path) -> CacheManifest {
    let mut w = CacheWriter::new(plan, spec, dir, false).unwrap();
    w.write(false).unwrap();
    w.manifest.clone()
}

fn cached(plan: &Plan, dir: &Path) -> Plan {
    Plan {
        teacher_cache: Some(dir.to_path_buf()),
        ..plan.clone()
    }
}

fn options(dir: PathBuf) -> RunOptions<'static> {
    RunOptions {
        run_dir: dir,
        resume: false,
        observer: Box::leak(Box::new(Silent)),
        scripts: &NoScripts,
        stop: None,
        log_every: 1,
        progress_bar: false,
    }
}

fn group(plans: &[Plan], root: &Path) -> Vec<RunResult> {
    let registry = Registry::global().unwrap();
    let mut opts: Vec<RunOptions> = plans.iter().map(|p| options(root.join(&p.name))).collect();
    kd_engine::run_group(plans, &registry, &mut opts)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Epoch records without the wall-clock numbers.
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

fn assert_same_runs(plans: &[Plan], a: (&Path, &[RunResult]), b: (&Path, &[RunResult])) {
    for ((p, ra), rb) in plans.iter().zip(a.1).zip(b.1) {
        assert_eq!(records(ra), records(rb), "{}: epoch records differ", p.name);
        for f in [
            "distill.last.safetensors",
            "distill.best.safetensors",
            "checkpoint.safetensors",
        ] {
            common::same_weights(&a.0.join(&p.name), &b.0.join(&p.name), f);
        }
    }
}

#[test]
fn cached_runs_end_bit_for_bit_where_online_runs_end_alone_and_in_lockstep() {
    let _serial = serial();
    kd_methods::link();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let mut dist = MethodPlan::new("dist", 1.0);
    dist.config = serde_json::json!({"beta": 2.0, "gamma": 2.0});
    let plans: Vec<Plan> = [
        ("st", MethodPlan::new("st", 0.9)),
        ("dkd", MethodPlan::new("dkd", 1.0)),
        ("dist", dist),
        // Reads feature taps of the teacher: cached with --taps.
        ("at", MethodPlan::new("at", 1000.0)),
    ]
    .into_iter()
    .map(|(n, m)| plan(n, &teacher, m))
    .collect();
    let cache = dir.path().join("cache");
    let m = write_cache(
        &plans[0],
        spec(&[5], 2, &["feat/1", "feat/2", "feat/3"]),
        &cache,
    );
    assert!(m.approximation.is_none(), "fp32 logits are exact");

    let online = dir.path().join("online");
    let with_cache: Vec<Plan> = plans.iter().map(|p| cached(p, &cache)).collect();
    let replayed = dir.path().join("cached");
    // In lockstep: one cache read serves every run of a batch.
    let a = group(&plans, &online);
    let before = kd_engine::teacher_forwards();
    let b = group(&with_cache, &replayed);
    assert_eq!(
        kd_engine::teacher_forwards(),
        before,
        "a cached run runs no teacher"
    );
    assert!(before > 0, "the online runs count their teacher forwards");
    assert_same_runs(&plans, (&online, &a), (&replayed, &b));
    // Alone.
    let alone = dir.path().join("alone");
    let c = group(&with_cache[..1], &alone);
    assert_same_runs(&plans[..1], (&online, &a[..1]), (&alone, &c));
}

#[test]
fn a_cached_run_stopped_and_resumed_ends_where_the_online_run_ends() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let p = plan("st", &teacher, MethodPlan::new("st", 0.9));
    let cache = dir.path().join("cache");
    write_cache(&p, spec(&[5], 2, &[]), &cache);
    let (online, cached_whole) = (dir.path().join("online"), dir.path().join("whole"));
    let (a, _) = common::whole_and_resumed(&p, &online, &dir.path().join("unused"));
    let (b, _) = common::whole_and_resumed(
        &cached(&p, &cache),
        &cached_whole,
        &dir.path().join("resumed"),
    );
    assert_eq!(records(&a), records(&b));
    for f in ["distill.last.safetensors", "checkpoint.safetensors"] {
        common::same_weights(&online, &dir.path().join("resumed"), f);
    }
}

fn refusal(plan: &Plan) -> String {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let err = kd_engine::validate(plan, &registry, &NoScripts, &[]).unwrap_err();
    // The run refuses it too, before its first step.
    let dir = tempfile::tempdir().unwrap();
    let run = kd_engine::run(plan, &registry, &mut options(dir.path().join("r"))).unwrap_err();
    assert!(
        tensors::read(&dir.path().join("r/checkpoint.safetensors")).is_err(),
        "nothing trained"
    );
    format!("{err} / {run}")
}

#[test]
fn a_cache_of_other_batches_or_teacher_or_too_short_is_refused_naming_the_field() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let p = plan("st", &teacher, MethodPlan::new("st", 0.9));
    let cache = dir.path().join("cache");
    write_cache(&p, spec(&[5], 2, &[]), &cache);
    let c = cached(&p, &cache);

    let mut other = c.clone();
    other.data.batch_size = 16;
    let e = refusal(&other);
    assert!(
        e.contains("data.batch_size: 32 in the cache, 16 in the plan"),
        "{e}"
    );

    let mut other = c.clone();
    other.data.mixup = None;
    assert!(refusal(&other).contains("data.mixup"));

    let mut other = c.clone();
    other.seed = 6;
    assert!(refusal(&other).contains("seed 6 is not cached"));

    let mut other = c.clone();
    other.stages[0].epochs = 3;
    assert!(refusal(&other).contains("shorter than the run"));

    let mut other = c.clone();
    let retrained = common::teacher_file(dir.path(), 4);
    other.teacher.as_mut().unwrap().weights = Some(retrained);
    assert!(refusal(&other).contains("teacher weights differ"));

    // Methods that need the teacher network, or taps not cached.
    for (method, says) in [
        ("sobolev", "gradient taps of the teacher"),
        ("bss", "adversarial views"),
        ("dml", "mutual learning"),
        ("at", "holds logits"),
    ] {
        let mut other = c.clone();
        other.stages[0].methods[1] = MethodPlan::new(method, 1.0);
        let e = refusal(&other);
        assert!(e.contains(says), "{method}: {e}");
    }
}

#[test]
fn top_k_and_half_precision_caches_record_their_distance_to_the_teacher() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let p = plan("st", &teacher, MethodPlan::new("st", 0.9));
    let mut s = spec(&[5], 1, &[]);
    s.top_k = 3;
    s.dtype = CacheDtype::Fp16;
    let m = write_cache(&p, s, &dir.path().join("topk"));
    let ap = m.approximation.expect("top-K is an approximation");
    assert!(
        ap.kl_t1_mean > 0.0 && ap.kl_t1_mean <= ap.kl_t1_max,
        "{ap:?}"
    );
    let mut s = spec(&[5], 1, &[]);
    s.dtype = CacheDtype::Bf16;
    let half = write_cache(&p, s, &dir.path().join("bf16"))
        .approximation
        .unwrap();
    // Keeping 3 of 10 classes loses more than rounding all 10.
    assert!(half.kl_t1_mean < ap.kl_t1_mean, "{half:?} vs {ap:?}");
    // A run trains on the reconstructed logits.
    let mut one = cached(&p, &dir.path().join("topk"));
    one.stages[0].epochs = 1;
    let r = group(&[one], &dir.path().join("run"));
    assert!(records(&r[0])[0].train_loss.is_finite());
}

#[test]
fn a_cache_is_extended_by_more_epochs_and_refused_for_another_storage() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::teacher_file(dir.path(), 3);
    let p = plan("st", &teacher, MethodPlan::new("st", 0.9));
    let cache = dir.path().join("cache");
    write_cache(&p, spec(&[5], 1, &[]), &cache);
    let mut w = CacheWriter::new(&p, spec(&[5], 2, &[]), &cache, false).unwrap();
    let (total, left) = w.sizes();
    assert_eq!(
        (total, left),
        (2 * w.manifest.bytes_per_epoch, w.manifest.bytes_per_epoch)
    );
    let before = kd_engine::teacher_forwards();
    w.write(false).unwrap();
    // One epoch of 80 samples in batches of 32 was left: 3 forwards.
    assert_eq!(kd_engine::teacher_forwards() - before, 3);
    assert_eq!(w.manifest.written.len(), 2);
    let mut other = spec(&[5], 2, &[]);
    other.top_k = 3;
    let e = CacheWriter::new(&p, other, &cache, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another teacher, data or storage"), "{e}");
}

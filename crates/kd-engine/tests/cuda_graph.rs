//! The plumbing of `cuda_graph: true`, on the CPU: with
//! `KD_CUDA_GRAPH_EMULATE=1` the engine keeps the captured step's batch
//! buffers, keys and warm-up as on CUDA, and "replays" by running the step
//! again on the captured buffers. A run so made must equal the same run
//! without graphs bit for bit, which fails if a buffer is not refreshed, a
//! changed learning rate does not capture again, or a smaller last batch
//! is pushed through the captured shapes. Whether a real CUDA graph gives
//! the same losses is checked on a GPU by `scripts/gpu-smoke`.

use std::path::Path;

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    EngineError, LrSchedule, MethodPlan, Observer, Plan, RunOptions, RunResult, Silent, tensors,
};

fn emulate() {
    // SAFETY: set before any thread of this test process reads it.
    unsafe { std::env::set_var("KD_CUDA_GRAPH_EMULATE", "1") };
}

/// resnet8 from resnet8 on 176 samples in batches of 32 (five full batches
/// and one of 16 an epoch), 3 epochs.
fn plan(name: &str, methods: Vec<MethodPlan>, lr: LrSchedule, graph: bool) -> Plan {
    let mut plan = kd_engine::bench_plan("resnet8", "resnet8", methods, 32, 10);
    plan.name = name.into();
    plan.device = kd_engine::DeviceChoice::Cpu;
    plan.data.source = DataSource::Synthetic(SyntheticConfig {
        classes: 10,
        train_size: 176,
        test_size: 16,
        ..Default::default()
    });
    plan.stages[0].epochs = 3;
    plan.stages[0].lr_schedule = lr;
    plan.cuda_graph = graph;
    plan
}

fn methods() -> Vec<MethodPlan> {
    let mut crd = MethodPlan::new("crd", 0.8);
    crd.config = serde_json::json!({"nce_n": 16, "feat_dim": 8});
    vec![MethodPlan::new("ce", 1.0), MethodPlan::new("st", 0.9), crd]
}

/// Keeps the `cuda_graph_*` metrics a run reports at the end of its stage.
#[derive(Default)]
struct GraphMetrics(Vec<(String, f64)>);
impl Observer for GraphMetrics {
    fn metrics(&mut self, _: i64, values: &[(String, f64)]) {
        self.0.extend(
            values
                .iter()
                .filter(|(k, _)| k.contains("cuda_graph"))
                .cloned(),
        );
    }
}

fn options<'a>(plan: &Plan, dir: &Path, observer: &'a mut dyn Observer) -> RunOptions<'a> {
    RunOptions {
        run_dir: dir.join(&plan.name),
        resume: false,
        observer,
        scripts: &kd_engine::NoScripts,
        stop: None,
        log_every: 1,
        progress_bar: false,
    }
}

fn run(plan: &Plan, dir: &Path, observer: &mut dyn Observer) -> Result<RunResult, EngineError> {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    kd_engine::run(plan, &registry, &mut options(plan, dir, observer))
}

fn assert_same_run(a: &RunResult, b: &RunResult) {
    let records = |r: &RunResult| {
        let mut e = r.stages[0].epochs.clone();
        e.iter_mut().for_each(|e| {
            e.images_per_sec = 0.0;
            e.eval_secs = 0.0;
        });
        e
    };
    assert_eq!(records(a), records(b));
    for f in ["checkpoint.safetensors", "distill.last.safetensors"] {
        let (x, y) = (
            tensors::read(&a.run_dir.join(f)).unwrap(),
            tensors::read(&b.run_dir.join(f)).unwrap(),
        );
        assert_eq!(x.tensors.len(), y.tensors.len());
        for (name, t) in &x.tensors {
            assert!(t.equal(y.get(name).unwrap()), "{f}: `{name}` differs");
        }
    }
}

/// Trains the plan with and without graphs under `lr`, checks that the two
/// runs end alike, and returns the graphed run's [captures, replays, eager].
fn graphed_against_eager(lr: LrSchedule) -> [f64; 3] {
    emulate();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = GraphMetrics::default();
    let graphed = run(
        &plan("graphed", methods(), lr.clone(), true),
        dir.path(),
        &mut seen,
    );
    let eager = run(
        &plan("eager", methods(), lr, false),
        dir.path(),
        &mut Silent,
    );
    assert_same_run(&graphed.unwrap(), &eager.unwrap());
    ["captures", "replays", "eager"].map(|k| {
        let key = format!("stage/distill/cuda_graph_{k}");
        seen.0
            .iter()
            .find(|(n, _)| *n == key)
            .map_or(-1.0, |(_, v)| *v)
    })
}

#[test]
fn a_graphed_run_equals_the_eager_run_and_captures_again_when_the_lr_steps() {
    let lr = LrSchedule::Multistep {
        milestones: vec![2],
        gamma: 0.1,
    };
    // 18 steps: two warm-up steps and the three batches of 16 run eagerly;
    // a capture at epoch 0 and one when the learning rate drops at epoch 2;
    // the other 11 full batches are replays.
    assert_eq!(graphed_against_eager(lr), [2.0, 11.0, 5.0]);
}

#[test]
fn a_per_step_schedule_turns_graphs_off_for_the_stage() {
    // One capture (after the warm-up), replaced at the next step: off.
    let lr = LrSchedule::Cosine {
        warmup_epochs: 0,
        min_lr: 0.0,
        warmup_lr: 0.0,
    };
    assert_eq!(graphed_against_eager(lr), [1.0, 0.0, 17.0]);
}

#[test]
fn graphed_runs_in_a_lockstep_group_equal_their_solo_runs() {
    emulate();
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.safetensors");
    {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = kd_models::build("resnet8", &vs.root(), 10).unwrap();
        kd_models::save_weights(&vs, &teacher).unwrap();
    }
    let with_teacher = |name: &str, graph: bool| {
        let mut p = plan(name, methods(), LrSchedule::Constant, graph);
        p.teacher.as_mut().unwrap().weights = Some(teacher.clone());
        p
    };
    let plans = [with_teacher("g", true), with_teacher("e", false)];
    assert_eq!(
        kd_engine::lockstep_key(&plans[0]),
        kd_engine::lockstep_key(&plans[1])
    );
    let solo: Vec<RunResult> = plans
        .iter()
        .map(|p| run(p, &dir.path().join("solo"), &mut Silent).unwrap())
        .collect();
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let (mut a, mut b) = (Silent, Silent);
    let mut opts: Vec<RunOptions> = plans
        .iter()
        .zip([&mut a as &mut dyn Observer, &mut b])
        .map(|(p, observer)| options(p, &dir.path().join("group"), observer))
        .collect();
    let grouped = kd_engine::run_group(&plans, &registry, &mut opts).unwrap();
    for (s, g) in solo.iter().zip(&grouped) {
        assert_same_run(s, g.as_ref().unwrap());
    }
}

#[test]
fn adversarial_views_are_refused_with_graphs() {
    emulate();
    let dir = tempfile::tempdir().unwrap();
    let mut bss = MethodPlan::new("bss", 1.0);
    bss.config = serde_json::json!({"attack_size": 4});
    let methods = vec![MethodPlan::new("ce", 1.0), bss];
    let err = run(
        &plan("bss", methods, LrSchedule::Constant, true),
        dir.path(),
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("adversarial views"), "{err}");
}

#[test]
fn fp16_steps_are_refused_with_graphs() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut p = plan("fp16", methods(), LrSchedule::Constant, true);
    p.precision = kd_engine::Precision::Fp16;
    let err = kd_engine::validate(&p, &registry, &kd_engine::NoScripts, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cuda_graph cannot capture fp16"), "{err}");
}

//! Runs a plan: builds the networks, then each stage in turn; resumes from
//! the run folder's checkpoint, written atomically after every epoch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kd_core::{
    BuildCx, DynMethod, Losses, Needs, Progress, Registry, Side, StepIo, TapShapes, ViewRef,
    ViewTaps,
};
use kd_data::{Batch, Loader, LoaderConfig, Splits};
use kd_models::Network;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::observe::{EpochRecord, Observer, RunResult, StageResult};
use crate::optim::Optimizer;
use crate::plan::{DeviceChoice, ModelPlan, Part, Plan, StagePlan, Subject};
use crate::schedule::{ScheduleFn, ScheduleResolver};
use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result, attack, eval};

pub struct RunOptions<'a> {
    pub run_dir: PathBuf,
    /// Continue from `run_dir/checkpoint.safetensors` when it exists.
    pub resume: bool,
    pub observer: &'a mut dyn Observer,
    pub scripts: &'a dyn ScheduleResolver,
    /// Set (e.g. by Ctrl-C) to stop at the next step.
    pub stop: Option<Arc<AtomicBool>>,
    /// Report step metrics every this many steps.
    pub log_every: usize,
    pub progress_bar: bool,
}

pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(EngineError::Plan(
            "device `cuda` asked for, but no CUDA device is available; use `cpu` or `auto`".into(),
        )),
    }
}

pub(crate) struct Net {
    pub(crate) vs: nn::VarStore,
    model: Box<dyn Network>,
}

impl Net {
    /// A zoo network with fresh weights.
    pub(crate) fn zoo(arch: &str, classes: i64, device: Device) -> Result<Net> {
        let vs = nn::VarStore::new(device);
        let model = kd_models::build(arch, &vs.root(), classes)?;
        Ok(Net { vs, model })
    }
}

fn build_net(m: &ModelPlan, classes: i64, device: Device) -> Result<Net> {
    let mut net = Net::zoo(&m.arch, classes, device)?;
    if let Some(w) = &m.weights {
        kd_models::load_weights(&mut net.vs, w)?;
    }
    Ok(net)
}

/// The plan's student and teacher, initialised from the plan's seed (student
/// first, so a run and a bench harness of the same plan start alike).
fn build_nets(plan: &Plan, classes: i64, device: Device) -> Result<(Net, Option<Net>)> {
    tch::manual_seed(plan.seed as i64);
    let student = build_net(&plan.student, classes, device)?;
    let teacher = plan
        .teacher
        .as_ref()
        .map(|t| build_net(t, classes, device))
        .transpose()?;
    Ok((student, teacher))
}

/// A method instance of a stage, with its own parameters and schedules.
struct Active {
    label: String,
    method: Box<dyn DynMethod>,
    vs: nn::VarStore,
    weight: Box<dyn ScheduleFn>,
    fields: Vec<(String, Box<dyn ScheduleFn>)>,
    /// Adversarial views this method requested (indices into `Needs::views`).
    views: std::ops::Range<usize>,
}

/// Metadata of the resume checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resume {
    stage: usize,
    next_epoch: usize,
    history: Vec<EpochRecord>,
    best_top1: f64,
    best_epoch: usize,
    finished: Vec<StageResult>,
}

/// Method parameters carried from one stage to the next, by label.
type Carry = BTreeMap<String, Vec<(String, Tensor)>>;

pub fn run(plan: &Plan, registry: &Registry, opts: &mut RunOptions) -> Result<RunResult> {
    let device = device(plan.device)?;
    let splits = kd_data::load(&plan.data.source, plan.data.val_fraction, 0)?;
    let classes = splits.train.num_classes;
    let (mut student, mut teacher) = build_nets(plan, classes, device)?;
    std::fs::create_dir_all(&opts.run_dir).map_err(|e| EngineError::io(&opts.run_dir, e))?;

    let ckpt_path = opts.run_dir.join("checkpoint.safetensors");
    let mut carry = Carry::new();
    let mut resume: Option<(Resume, TensorFile)> = None;
    if opts.resume && ckpt_path.exists() {
        let file = tensors::read(&ckpt_path)?;
        let meta: Resume = file
            .metadata
            .get("resume")
            .and_then(|m| serde_json::from_str(m).ok())
            .ok_or_else(|| EngineError::Format {
                path: ckpt_path.clone(),
                msg: "not a kd checkpoint (no resume metadata)".into(),
            })?;
        load_into(&student.vs, &file, "student.", &ckpt_path)?;
        if let Some(t) = &teacher {
            load_into(&t.vs, &file, "teacher.", &ckpt_path)?;
        }
        for (name, t) in file.with_prefix("carry.") {
            if let Some((label, var)) = name.split_once('/') {
                carry
                    .entry(label.to_string())
                    .or_default()
                    .push((var.to_string(), t.to_device(device)));
            }
        }
        resume = Some((meta, file));
    }

    let mut results: Vec<StageResult> = resume
        .as_ref()
        .map(|r| r.0.finished.clone())
        .unwrap_or_default();
    for (si, stage) in plan.stages.iter().enumerate() {
        if si < results.len() {
            continue;
        }
        let start = resume.take().filter(|(m, _)| m.stage == si);
        let cx = StageCx {
            plan,
            si,
            registry,
            device,
            splits: &splits,
            ckpt: &ckpt_path,
            finished: &results,
            scripts: opts.scripts,
        };
        let result = run_stage(
            &cx,
            stage,
            &mut student,
            teacher.as_mut(),
            &mut carry,
            start,
            opts,
        )?;
        results.push(result);
    }
    // The run is complete: a later `--resume` has nothing left to do.
    write_checkpoint(
        &ckpt_path,
        &student,
        teacher.as_ref(),
        &[],
        &[],
        None,
        &carry,
        &Resume {
            stage: plan.stages.len(),
            next_epoch: 0,
            history: vec![],
            best_top1: 0.0,
            best_epoch: 0,
            finished: results.clone(),
        },
    )?;
    Ok(RunResult {
        name: plan.name.clone(),
        run_dir: opts.run_dir.clone(),
        stages: results,
    })
}

struct StageCx<'a> {
    plan: &'a Plan,
    si: usize,
    registry: &'a Registry,
    device: Device,
    splits: &'a Splits,
    ckpt: &'a Path,
    finished: &'a [StageResult],
    scripts: &'a dyn ScheduleResolver,
}

fn load_into(vs: &nn::VarStore, file: &TensorFile, prefix: &str, path: &Path) -> Result<()> {
    let vars = vs.variables();
    for (name, var) in &vars {
        let key = format!("{prefix}{name}");
        let src = file.get(&key).ok_or_else(|| EngineError::Format {
            path: path.to_path_buf(),
            msg: format!("checkpoint lacks `{key}`"),
        })?;
        tch::no_grad(|| var.shallow_clone().copy_(src));
    }
    Ok(())
}

fn shapes_of(net: &Net, probe: &Tensor) -> TapShapes {
    tch::no_grad(|| TapShapes::of(&net.model.forward_taps(probe, false)))
}

/// What building a stage's methods needs to know about the run.
struct BuildEnv<'a> {
    registry: &'a Registry,
    device: Device,
    n_data: i64,
    classes: i64,
    scripts: &'a dyn ScheduleResolver,
}

fn build_methods(
    stage: &StagePlan,
    cx: &BuildEnv,
    s_shapes: &TapShapes,
    t_shapes: Option<&TapShapes>,
    needs: &mut Needs,
    carry: &Carry,
    prefix: &str,
) -> Result<Vec<Active>> {
    let mut out: Vec<Active> = Vec::new();
    for mp in &stage.methods {
        let entry = cx.registry.get(&mp.method)?;
        if out.iter().any(|a| a.label == mp.label()) {
            return Err(EngineError::Plan(format!(
                "stage `{}` uses label `{}` twice; give one a distinct `label`",
                stage.name,
                mp.label()
            )));
        }
        let vs = nn::VarStore::new(cx.device);
        let first_view = needs.views.len();
        let method = {
            let mut bcx = BuildCx::new(
                entry.name,
                s_shapes,
                t_shapes,
                vs.root(),
                needs,
                cx.n_data,
                cx.classes,
            );
            entry.build(mp.config.clone(), &mut bcx)?
        };
        let views = first_view..needs.views.len();
        if let Some(saved) = carry.get(&format!("{prefix}{}", mp.label())) {
            let vars = vs.variables();
            for (name, t) in saved {
                if let Some(v) = vars.get(name).filter(|v| v.size() == t.size()) {
                    tch::no_grad(|| v.shallow_clone().copy_(t));
                }
            }
        }
        let mut fields = Vec::new();
        for (field, w) in &mp.schedule {
            if !entry.schedulable.contains(&field.as_str()) {
                return Err(EngineError::Plan(format!(
                    "method `{}`: field `{field}` cannot be scheduled; schedulable: {:?}",
                    mp.method, entry.schedulable
                )));
            }
            fields.push((field.clone(), w.compile(cx.scripts)?));
        }
        out.push(Active {
            label: mp.label().to_string(),
            method,
            vs,
            weight: mp.weight.compile(cx.scripts)?,
            fields,
            views,
        });
    }
    Ok(out)
}

fn named_vars(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Everything a step needs that does not change within a stage.
struct StageNets<'a> {
    net: &'a Net,
    other: Option<&'a Net>,
    net_trains: bool,
    mutual: bool,
    needs: &'a Needs,
    draws: &'a Draws,
}

/// What a step does with its loss.
enum Update<'a> {
    /// Training: backward, then an SGD step at this learning rate.
    Sgd(&'a mut Optimizer, f64),
    /// Backward only, leaving the gradients for the caller (the probe, on
    /// networks whose gradients start empty).
    Backward,
}

struct StepOut {
    /// Per method label: weight applied, then each term's value.
    weights: Vec<f64>,
    terms: Vec<(String, f64)>,
    total: f64,
    correct: i64,
    n: i64,
}

/// Builds a stage's methods, and in mutual learning a second instance of
/// each for the peer with the roles swapped.
fn build_stage(
    stage: &StagePlan,
    env: &BuildEnv,
    s_shapes: &TapShapes,
    t_shapes: Option<&TapShapes>,
    carry: &Carry,
) -> Result<(Vec<Active>, Vec<Active>, Needs)> {
    let mut needs = Needs::default();
    let methods = build_methods(stage, env, s_shapes, t_shapes, &mut needs, carry, "")?;
    if !needs.mutual {
        return Ok((methods, Vec::new(), needs));
    }
    let t = t_shapes.expect("mutual requires a teacher, checked at build");
    let mut peer_needs = Needs::default();
    let peers = build_methods(
        stage,
        env,
        t,
        Some(s_shapes),
        &mut peer_needs,
        carry,
        "peer/",
    )?;
    if !needs.grads.is_empty() || !needs.views.is_empty() || needs.contrast.is_some() {
        return Err(EngineError::Plan(format!(
            "stage `{}`: mutual learning cannot be combined with gradient taps, adversarial views or contrast sampling",
            stage.name
        )));
    }
    Ok((methods, peers, needs))
}

/// Checks a plan against the registry, the model zoo, the taps and the data
/// description without loading data or training. `check_files`: also check
/// that weight files which exist fit their models (off for plans whose
/// weights an earlier run of the same recipe will write).
pub fn validate(
    plan: &Plan,
    registry: &Registry,
    scripts: &dyn ScheduleResolver,
    check_files: bool,
) -> Result<()> {
    let (n_train, classes) = kd_data::describe(&plan.data.source)?;
    let n_data = n_train - (n_train as f64 * plan.data.val_fraction).round() as i64;
    let device = Device::Cpu;
    let net_of = |m: &ModelPlan| -> Result<Net> {
        let vs = nn::VarStore::new(device);
        let model = kd_models::build(&m.arch, &vs.root(), classes)?;
        let mut net = Net { vs, model };
        // Files that exist must fit; a missing one (like a missing data set)
        // is reported by the run that needs it, naming the file.
        if let (Some(w), true) = (&m.weights, check_files)
            && w.exists()
        {
            kd_models::load_weights(&mut net.vs, w)?;
        }
        Ok(net)
    };
    let student = net_of(&plan.student)?;
    let teacher = plan.teacher.as_ref().map(net_of).transpose()?;
    if plan.stages.is_empty() {
        return Err(EngineError::Plan("the plan has no stages".into()));
    }
    if plan.data.batch_size == 0 {
        return Err(EngineError::Plan("batch_size must be at least 1".into()));
    }
    let probe = Tensor::zeros([2, 3, 32, 32], (Kind::Float, device));
    let env = BuildEnv {
        registry,
        device,
        n_data,
        classes,
        scripts,
    };
    for stage in &plan.stages {
        if stage.epochs == 0 || stage.methods.is_empty() {
            return Err(EngineError::Plan(format!(
                "stage `{}` needs at least one epoch and one method",
                stage.name
            )));
        }
        if stage.subject == Subject::Teacher && teacher.is_none() {
            return Err(EngineError::Plan(format!(
                "stage `{}` trains the teacher, but the plan has none",
                stage.name
            )));
        }
        let (net, other) = roles(stage.subject, &student, teacher.as_ref());
        let s_shapes = shapes_of(net, &probe);
        let t_shapes = other.map(|t| shapes_of(t, &probe));
        build_stage(stage, &env, &s_shapes, t_shapes.as_ref(), &Carry::new())
            .map_err(|e| EngineError::Plan(format!("stage `{}`: {e}", stage.name)))?;
    }
    Ok(())
}

/// A stage ready to step: its methods, optimiser and where its draws come from.
struct Prepared {
    methods: Vec<Active>,
    peers: Vec<Active>,
    needs: Needs,
    opt: Optimizer,
    draws: Draws,
    net_trains: bool,
    mutual: bool,
}

/// Where a step's per-row uniform draws (`Method::attack_targets`) come from.
enum Draws {
    /// Training: a ChaCha stream keyed by this stage seed and (epoch, batch),
    /// never torch's global generator, so that a resumed run draws exactly
    /// what the uninterrupted one did.
    Seeded(u64),
    /// Fixed by the caller (the conformance probe).
    Given(Tensor),
}

/// splitmix64 of a combined key: nearby keys give unrelated seeds.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Tells the draw stream apart from the loader's, which is keyed by the
/// same run seed.
const DRAW_STREAM: u64 = 0x6472_6177_735f_7631;

impl Draws {
    fn seeded(run_seed: u64, stage: usize) -> Draws {
        Draws::Seeded(mix(run_seed, stage as u64, DRAW_STREAM))
    }

    fn for_step(&self, p: Progress, rows: i64, device: Device) -> Tensor {
        use rand::{Rng, SeedableRng};
        match self {
            Draws::Seeded(seed) => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(
                    *seed,
                    p.epoch as u64,
                    p.step as u64,
                ));
                let u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                Tensor::from_slice(&u).to_device(device)
            }
            Draws::Given(u) => u.to_device(device),
        }
    }
}

/// Builds a stage's methods and optimiser for `net` and `other`, shaped by
/// the taps of `probe` images. `init_seed` seeds the methods' initialisation.
#[allow(clippy::too_many_arguments)]
fn prepare_stage(
    env: &BuildEnv,
    init_seed: u64,
    draws: Draws,
    stage: &StagePlan,
    student: &mut Net,
    mut teacher: Option<&mut Net>,
    carry: &Carry,
    probe: &Tensor,
) -> Result<Prepared> {
    let net_trains = stage.train.contains(&Part::Network);
    let methods_train = stage.train.contains(&Part::Methods);
    let name = &stage.name;
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    let s_shapes = shapes_of(net, probe);
    let t_shapes = other.as_ref().map(|t| shapes_of(t, probe));
    tch::manual_seed(init_seed as i64);
    let (mut methods, mut peers, needs) =
        build_stage(stage, env, &s_shapes, t_shapes.as_ref(), carry)?;
    let mutual = needs.mutual;

    // Freezing needs mutable access; the loop below borrows again.
    {
        let (net, other): (&mut Net, Option<&mut Net>) = match stage.subject {
            Subject::Student => (&mut *student, teacher.as_deref_mut()),
            Subject::Teacher => (teacher.as_deref_mut().expect("checked by the caller"), None),
        };
        if net_trains {
            net.vs.unfreeze()
        } else {
            net.vs.freeze()
        }
        if let Some(o) = other {
            if mutual {
                o.vs.unfreeze()
            } else {
                o.vs.freeze()
            }
        }
    }
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    // Parameters of this stage's optimiser, named for the checkpoint.
    let mut params = Vec::new();
    if net_trains {
        params.extend(named_vars(&net.vs, "net."));
    }
    if let (Some(t), true) = (other, mutual) {
        params.extend(named_vars(&t.vs, "peer."));
    }
    for (prefix, list) in [("method.", &mut methods), ("peermethod.", &mut peers)] {
        for (i, a) in list.iter_mut().enumerate() {
            if methods_train {
                params.extend(named_vars(&a.vs, &format!("{prefix}{i}.")));
            } else {
                a.vs.freeze();
            }
        }
    }
    let opt = Optimizer::new(stage.optimizer.clone(), params);
    if opt.is_empty() {
        return Err(EngineError::Plan(format!(
            "stage `{name}` trains nothing: `train` is {:?} and those have no parameters",
            stage.train
        )));
    }

    Ok(Prepared {
        methods,
        peers,
        needs,
        opt,
        draws,
        net_trains,
        mutual,
    })
}

/// A stage of a run ready to step, with its loader.
fn prepare(
    cx: &StageCx,
    stage: &StagePlan,
    student: &mut Net,
    teacher: Option<&mut Net>,
    carry: &Carry,
) -> Result<(Prepared, Loader)> {
    let device = cx.device;
    let probe = {
        let l = Loader::new(&cx.splits.train, loader_cfg(cx, None, false), 0, device)?;
        l.batch(&[0, 1], 0, 0).images
    };
    let env = BuildEnv {
        registry: cx.registry,
        device,
        n_data: cx.splits.train.len(),
        classes: cx.splits.train.num_classes,
        scripts: cx.scripts,
    };
    let prep = prepare_stage(
        &env,
        cx.plan.seed + cx.si as u64,
        Draws::seeded(cx.plan.seed, cx.si),
        stage,
        student,
        teacher,
        carry,
        &probe,
    )?;
    let contrast = prep.needs.contrast.as_ref().map(|c| (c.k, c.other_classes));
    let loader = Loader::new(
        &cx.splits.train,
        loader_cfg(cx, contrast, cx.plan.data.augment),
        cx.plan.seed.wrapping_add(cx.si as u64 * 7919),
        device,
    )?;
    Ok((prep, loader))
}

/// The stage's subject network and the other one (frozen teacher or peer).
fn roles<'a>(
    subject: Subject,
    student: &'a Net,
    teacher: Option<&'a Net>,
) -> (&'a Net, Option<&'a Net>) {
    match subject {
        Subject::Student => (student, teacher),
        Subject::Teacher => (
            teacher.expect("a teacher stage has a teacher, checked by run_stage"),
            None,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    cx: &StageCx,
    stage: &StagePlan,
    student: &mut Net,
    mut teacher: Option<&mut Net>,
    carry: &mut Carry,
    start: Option<(Resume, TensorFile)>,
    opts: &mut RunOptions,
) -> Result<StageResult> {
    let name = &stage.name;
    if stage.epochs == 0 {
        return Err(EngineError::Plan(format!("stage `{name}` has 0 epochs")));
    }
    if stage.methods.is_empty() {
        return Err(EngineError::Plan(format!("stage `{name}` has no methods")));
    }
    if stage.subject == Subject::Teacher && teacher.is_none() {
        return Err(EngineError::Plan(format!(
            "stage `{name}` trains the teacher, but the plan has none"
        )));
    }
    let (
        Prepared {
            mut methods,
            mut peers,
            needs,
            mut opt,
            draws,
            net_trains,
            mutual,
        },
        loader,
    ) = prepare(cx, stage, student, teacher.as_deref_mut(), carry)?;
    let student: &Net = student;
    let teacher: Option<&Net> = teacher.as_deref();
    let (net, other) = roles(stage.subject, student, teacher);
    let steps = loader.batches_per_epoch();
    let device = cx.device;

    let (mut history, mut best_top1, mut best_epoch, first_epoch) = match &start {
        Some((meta, file)) => {
            for (i, a) in methods.iter().enumerate() {
                load_into(&a.vs, file, &format!("method.{i}."), cx.ckpt)?;
            }
            for (i, a) in peers.iter().enumerate() {
                load_into(&a.vs, file, &format!("peermethod.{i}."), cx.ckpt)?;
            }
            for (n, t) in file.with_prefix("optim.") {
                if let Some(buf) = opt.buffer_mut(n) {
                    tch::no_grad(|| buf.copy_(t));
                }
            }
            (
                meta.history.clone(),
                meta.best_top1,
                meta.best_epoch,
                meta.next_epoch,
            )
        }
        None => (Vec::new(), f64::NEG_INFINITY, 0, 0),
    };
    let nets = StageNets {
        net,
        other,
        net_trains,
        mutual,
        needs: &needs,
        draws: &draws,
    };
    let (last_path, best_path) = (
        cx.ckpt.with_file_name(format!("{name}.last.safetensors")),
        cx.ckpt.with_file_name(format!("{name}.best.safetensors")),
    );
    opts.observer.stage_start(cx.si, name);
    let frozen_teacher = nets
        .other
        .filter(|_| stage.subject == Subject::Student && !mutual);
    if let Some(t) = frozen_teacher {
        let (top1, top5) = eval::accuracy(
            t.model.as_ref(),
            &cx.splits.test,
            cx.plan.data.eval_batch_size,
            device,
        );
        opts.observer.teacher_eval(name, top1, top5);
    }
    let epochs_before: i64 = cx.finished.iter().map(|r| r.epochs.len() as i64).sum();

    for epoch in first_epoch..stage.epochs {
        let order = loader.order(epoch);
        let bar = progress_bar(
            opts.progress_bar,
            steps,
            &format!("{name} {}/{}", epoch + 1, stage.epochs),
        );
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0i64);
        let mut weight_sum = vec![0.0; methods.len()];
        let mut term_sum: BTreeMap<String, f64> = BTreeMap::new();
        let mut lr = 0.0;
        for b in 0..steps {
            if opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                return Err(EngineError::Interrupted(cx.ckpt.to_path_buf()));
            }
            let progress = Progress {
                epoch,
                epochs: stage.epochs,
                step: b,
                steps_per_epoch: steps,
                global_step: epoch * steps + b,
            };
            lr = stage.lr_schedule.lr(stage.optimizer.lr, progress);
            let batch = loader.batch(&order, epoch, b);
            let out = step(
                &nets,
                &mut methods,
                &mut peers,
                &batch,
                progress,
                Update::Sgd(&mut opt, lr),
            )?;
            if let Some((term, value)) = out.terms.iter().find(|(_, v)| !v.is_finite()) {
                return Err(EngineError::NonFinite {
                    term: term.clone(),
                    value: *value,
                    epoch,
                    step: b,
                });
            }
            loss_sum += out.total * out.n as f64;
            correct += out.correct;
            seen += out.n;
            for (s, w) in weight_sum.iter_mut().zip(&out.weights) {
                *s += w;
            }
            for (t, v) in &out.terms {
                *term_sum.entry(t.clone()).or_default() += v;
            }
            let global = (epochs_before as usize + epoch) * steps + b;
            if opts.log_every > 0 && (b % opts.log_every == 0 || b + 1 == steps) {
                let mut values: Vec<(String, f64)> =
                    vec![("train/loss".into(), out.total), ("train/lr".into(), lr)];
                values.extend(out.terms.iter().map(|(t, v)| (format!("loss/{t}"), *v)));
                values.extend(
                    methods
                        .iter()
                        .zip(&out.weights)
                        .map(|(a, w)| (format!("weight/{}", a.label), *w)),
                );
                values.push((
                    "train/images_per_sec".into(),
                    seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
                ));
                opts.observer.metrics(global as i64, &values);
            }
            bar.set_message(format!(
                "loss {:.4} acc {:.2}%",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let ips = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let (test_top1, test_top5) = eval::accuracy(
            nets.net.model.as_ref(),
            &cx.splits.test,
            cx.plan.data.eval_batch_size,
            device,
        );
        let val = cx.splits.val.as_ref().map(|v| {
            eval::accuracy(
                nets.net.model.as_ref(),
                v,
                cx.plan.data.eval_batch_size,
                device,
            )
        });
        let peer_top1 = if mutual {
            nets.other.map(|t| {
                eval::accuracy(
                    t.model.as_ref(),
                    &cx.splits.test,
                    cx.plan.data.eval_batch_size,
                    device,
                )
                .0
            })
        } else {
            None
        };
        let selector = val.map(|v| v.0).unwrap_or(test_top1);
        if selector > best_top1 || history.is_empty() {
            best_top1 = selector;
            best_epoch = epoch;
            kd_models::save_weights(&nets.net.vs, &best_path)?;
        }
        let record = EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: 100.0 * correct as f64 / seen.max(1) as f64,
            test_top1,
            test_top5,
            val_top1: val.map(|v| v.0),
            val_top5: val.map(|v| v.1),
            weights: methods
                .iter()
                .zip(&weight_sum)
                .map(|(a, s)| (a.label.clone(), s / steps as f64))
                .collect(),
            terms: term_sum
                .into_iter()
                .map(|(t, s)| (t, s / steps as f64))
                .collect(),
            images_per_sec: ips,
            best_top1,
            peer_top1,
        };
        history.push(record.clone());
        append_jsonl(&cx.ckpt.with_file_name("epochs.jsonl"), name, &record)?;
        let meta = Resume {
            stage: cx.si,
            next_epoch: epoch + 1,
            history: history.clone(),
            best_top1,
            best_epoch,
            finished: cx.finished.to_vec(),
        };
        write_checkpoint(
            cx.ckpt,
            student,
            teacher,
            &methods,
            &peers,
            Some(&opt),
            carry,
            &meta,
        )?;
        opts.observer
            .epoch(name, epochs_before + epoch as i64, &record);
    }
    kd_models::save_weights(&nets.net.vs, &last_path)?;
    for a in &methods {
        carry.insert(a.label.clone(), named_vars(&a.vs, ""));
    }
    for a in &peers {
        carry.insert(format!("peer/{}", a.label), named_vars(&a.vs, ""));
    }
    let last = history
        .last()
        .cloned()
        .expect("a stage has at least one epoch");
    let result = StageResult {
        name: name.clone(),
        best_top1,
        best_epoch,
        last_top1: last.test_top1,
        last_top5: last.test_top5,
        epochs: history,
        last_weights: last_path.clone(),
        best_weights: best_path.clone(),
    };
    opts.observer.artifact(&last_path);
    opts.observer.artifact(&best_path);
    opts.observer.stage_end(&result);
    Ok(result)
}

fn loader_cfg(cx: &StageCx, contrast: Option<(usize, bool)>, augment: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: cx.plan.data.batch_size,
        shuffle: true,
        augment,
        drop_last: false,
        contrast,
    }
}

fn progress_bar(enabled: bool, steps: usize, prefix: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

fn append_jsonl(path: &Path, stage: &str, record: &EpochRecord) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| EngineError::io(path, e))?;
    let line = serde_json::json!({"stage": stage, "record": record});
    writeln!(f, "{line}").map_err(|e| EngineError::io(path, e))
}

#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    path: &Path,
    student: &Net,
    teacher: Option<&Net>,
    methods: &[Active],
    peers: &[Active],
    opt: Option<&Optimizer>,
    carry: &Carry,
    meta: &Resume,
) -> Result<()> {
    let file = checkpoint_file(Some(student), teacher, methods, peers, opt, carry, meta)?;
    tensors::write(path, &file)
}

fn checkpoint_file(
    student: Option<&Net>,
    teacher: Option<&Net>,
    methods: &[Active],
    peers: &[Active],
    opt: Option<&Optimizer>,
    carry: &Carry,
    meta: &Resume,
) -> Result<TensorFile> {
    let mut file = TensorFile::default();
    let mut add = |prefix: String, vs: &nn::VarStore| {
        for (n, t) in named_vars(vs, &prefix) {
            file.push(n, &t);
        }
    };
    if let Some(s) = student {
        add("student.".into(), &s.vs);
    }
    if let Some(t) = teacher {
        add("teacher.".into(), &t.vs);
    }
    for (i, a) in methods.iter().enumerate() {
        add(format!("method.{i}."), &a.vs);
    }
    for (i, a) in peers.iter().enumerate() {
        add(format!("peermethod.{i}."), &a.vs);
    }
    if let Some(opt) = opt {
        for (n, b) in opt.state() {
            file.push(format!("optim.{n}"), b);
        }
    }
    for (label, vars) in carry {
        for (n, t) in vars {
            file.push(format!("carry.{label}/{n}"), t);
        }
    }
    file.metadata.insert(
        "resume".into(),
        serde_json::to_string(meta).map_err(|e| EngineError::Plan(e.to_string()))?,
    );
    file.metadata
        .insert("format".into(), "kd-checkpoint-1".into());
    Ok(file)
}

/// Gradient of the target-class logit w.r.t. the input or a tap.
fn target_grad(
    taps: &kd_core::Taps,
    input: &Tensor,
    wrt: Option<kd_core::Tap>,
    target: &Tensor,
    create_graph: bool,
) -> Tensor {
    let picked = taps
        .logits
        .gather(1, &target.unsqueeze(1), false)
        .sum(Kind::Float);
    let x = match wrt {
        Some(t) => taps.get(t).expect("grad taps are validated at build"),
        None => input,
    };
    Tensor::run_backward(&[&picked], &[x], true, create_graph).remove(0)
}

/// One training step, in the engine's fixed order: teacher forward, student
/// forward, gradient taps, adversarial views, losses, backward and update,
/// after-step hooks.
fn step(
    nets: &StageNets,
    methods: &mut [Active],
    peers: &mut [Active],
    batch: &Batch,
    progress: Progress,
    update: Update,
) -> Result<StepOut> {
    let needs = nets.needs;
    let (x, y) = (&batch.images, &batch.labels);
    let grad_of = |side: Side| needs.grads.iter().any(|g| g.side == side);

    // Teacher (or peer). A frozen teacher runs in eval mode without graph
    // unless a gradient tap of it was asked for.
    let t_input = if grad_of(Side::Teacher) {
        x.detach().set_requires_grad(true)
    } else {
        x.shallow_clone()
    };
    let t_live = nets.other.map(|t| {
        if nets.mutual || grad_of(Side::Teacher) {
            t.model.forward_taps(&t_input, nets.mutual)
        } else {
            tch::no_grad(|| t.model.forward_taps(&t_input, false))
        }
    });
    let s_input = if grad_of(Side::Student) {
        x.detach().set_requires_grad(true)
    } else {
        x.shallow_clone()
    };
    let s_taps = if nets.net_trains || grad_of(Side::Student) {
        nets.net.model.forward_taps(&s_input, nets.net_trains)
    } else {
        tch::no_grad(|| nets.net.model.forward_taps(&s_input, false))
    };
    let mut grads = Vec::with_capacity(needs.grads.len());
    for g in &needs.grads {
        let grad = match g.side {
            Side::Student => target_grad(&s_taps, &s_input, g.wrt, y, g.create_graph),
            Side::Teacher => target_grad(
                t_live.as_ref().expect("teacher grads need a teacher"),
                &t_input,
                g.wrt,
                y,
                false,
            )
            .detach(),
        };
        grads.push(if g.create_graph && g.side == Side::Student {
            grad
        } else {
            grad.detach()
        });
    }
    let t_taps = t_live.as_ref().map(|t| t.detach());
    macro_rules! base_io {
        ($views:expr) => {
            StepIo {
                student: &s_taps,
                teacher: t_taps.as_ref(),
                grads: &grads,
                views: $views,
                target: y,
                index: Some(&batch.index),
                contrast_index: batch.contrast_index.as_ref(),
                progress,
                train: true,
            }
        };
    }

    let mut views: Vec<Option<ViewTaps>> = (0..needs.views.len()).map(|_| None).collect();
    if !needs.views.is_empty() {
        let teacher = nets
            .other
            .expect("adversarial views need a teacher, checked at build");
        let draws = nets.draws.for_step(progress, y.size()[0], x.device());
        for a in methods.iter_mut() {
            for v in a.views.clone() {
                let picked = a
                    .method
                    .attack_targets(ViewRef(v), &base_io!(&[]), &draws)?;
                if let Some((rows, classes)) = picked.filter(|(rows, _)| rows.numel() > 0) {
                    let adv = attack::attack(
                        teacher.model.as_ref(),
                        &x.index_select(0, &rows),
                        &y.index_select(0, &rows),
                        &classes,
                        &needs.views[v],
                    );
                    let t_adv = tch::no_grad(|| teacher.model.forward_taps(&adv, false));
                    let s_adv = nets.net.model.forward_taps(&adv, nets.net_trains);
                    views[v] = Some(ViewTaps {
                        student: s_adv,
                        teacher: t_adv,
                    });
                }
            }
        }
    }

    let io = base_io!(&views);
    let mut weights = Vec::with_capacity(methods.len());
    let mut terms: Vec<(String, Tensor)> = Vec::new();
    let mut total: Option<Tensor> = None;
    for a in methods.iter_mut() {
        apply_fields(a, progress)?;
        let w = a.weight.value(progress)?;
        weights.push(w);
        let mut losses = Losses::default();
        a.method.losses(&io, &mut losses)?;
        for (t, v) in losses.terms {
            let weighted = &v * w;
            total = Some(match total {
                Some(acc) => acc + weighted,
                None => weighted,
            });
            terms.push((format!("{}/{t}", a.label), v));
        }
    }
    // A peer learns from the student with the roles swapped.
    if nets.mutual {
        let t_live = t_live.as_ref().expect("mutual learning has a peer");
        let s_det = s_taps.detach();
        let peer_io = StepIo {
            student: t_live,
            teacher: Some(&s_det),
            grads: &[],
            views: &[],
            ..base_io!(&[])
        };
        for a in peers.iter_mut() {
            apply_fields(a, progress)?;
            let w = a.weight.value(progress)?;
            let mut losses = Losses::default();
            a.method.losses(&peer_io, &mut losses)?;
            for (t, v) in losses.terms {
                total = Some(total.map_or(&v * w, |acc| acc + &v * w));
                terms.push((format!("peer/{}/{t}", a.label), v));
            }
        }
    }
    let total = total.ok_or_else(|| EngineError::Plan("no loss terms in this step".into()))?;

    // One device-to-host copy for every number logged this step.
    let correct = s_taps.logits.argmax(1, false).eq_tensor(y).sum(Kind::Float);
    let mut scalars: Vec<Tensor> = terms
        .iter()
        .map(|(_, t)| t.detach().to_kind(Kind::Float).reshape([1]))
        .collect();
    scalars.push(total.detach().to_kind(Kind::Float).reshape([1]));
    scalars.push(correct.reshape([1]));
    let host: Vec<f64> = Vec::try_from(
        Tensor::cat(&scalars, 0)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double),
    )?;
    let (total_v, correct_v) = (host[host.len() - 2], host[host.len() - 1]);
    let term_values: Vec<(String, f64)> = terms
        .iter()
        .map(|(n, _)| n.clone())
        .zip(host.iter().copied())
        .collect();
    if term_values.iter().any(|(_, v)| !v.is_finite()) || !total_v.is_finite() {
        return Ok(StepOut {
            weights,
            terms: term_values,
            total: total_v,
            correct: 0,
            n: 0,
        });
    }

    match update {
        Update::Sgd(opt, lr) => {
            opt.zero_grad();
            total.backward();
            opt.step(lr);
        }
        Update::Backward => total.backward(),
    }
    tch::no_grad(|| -> Result<()> {
        for a in methods.iter_mut() {
            a.method.after_step(&io)?;
        }
        Ok(())
    })?;
    Ok(StepOut {
        weights,
        terms: term_values,
        total: total_v,
        correct: correct_v as i64,
        n: y.size()[0],
    })
}

fn apply_fields(a: &mut Active, progress: Progress) -> Result<()> {
    for (field, f) in a.fields.iter_mut() {
        let v = f.value(progress)?;
        a.method.set_scheduled(field, v)?;
    }
    Ok(())
}

/// One training step of a plan's first stage on a fixed batch, for
/// benchmarks: the same code path as `run`, without epochs or evaluation.
pub struct StepHarness {
    student: Net,
    teacher: Option<Net>,
    prep: Prepared,
    batch: Batch,
    subject: Subject,
    lr: f64,
}

impl StepHarness {
    pub fn new(plan: &Plan, registry: &Registry) -> Result<StepHarness> {
        let device = device(plan.device)?;
        let splits = kd_data::load(&plan.data.source, 0.0, 0)?;
        let classes = splits.train.num_classes;
        let (mut student, mut teacher) = build_nets(plan, classes, device)?;
        let stage = plan
            .stages
            .first()
            .ok_or_else(|| EngineError::Plan("the plan has no stages".into()))?;
        let ckpt = PathBuf::new();
        let cx = StageCx {
            plan,
            si: 0,
            registry,
            device,
            splits: &splits,
            ckpt: &ckpt,
            finished: &[],
            scripts: &crate::NoScripts,
        };
        let (prep, loader) = prepare(&cx, stage, &mut student, teacher.as_mut(), &Carry::new())?;
        let order = loader.order(0);
        let batch = loader.batch(&order, 0, 0);
        Ok(StepHarness {
            student,
            teacher,
            prep,
            batch,
            subject: stage.subject,
            lr: stage.optimizer.lr,
        })
    }

    /// Runs one step; returns the total loss.
    pub fn step(&mut self) -> Result<f64> {
        let (net, other) = roles(self.subject, &self.student, self.teacher.as_ref());
        let p = &mut self.prep;
        let nets = StageNets {
            net,
            other,
            net_trains: p.net_trains,
            mutual: p.mutual,
            needs: &p.needs,
            draws: &p.draws,
        };
        let progress = Progress {
            epoch: 0,
            epochs: 1,
            step: 0,
            steps_per_epoch: 1,
            global_step: 0,
        };
        Ok(step(
            &nets,
            &mut p.methods,
            &mut p.peers,
            &self.batch,
            progress,
            Update::Sgd(&mut p.opt, self.lr),
        )?
        .total)
    }
}

/// What one probed step leaves behind.
pub(crate) struct Probed {
    /// `label/term` with its value, before the method's weight.
    pub terms: Vec<(String, f64)>,
    /// The methods' variables after the step (`after_step` included).
    pub method_vars: Vec<(String, Tensor)>,
}

/// One training step of a single `stage` (subject: the student) on `batch`,
/// through the same preparation and step as `run`, except that the update
/// is left out: the loss's gradients stay on the student's variables, whose
/// gradients must start empty. `set_vars` fills each method's variables
/// once it is built; `draws` stand for the training stream's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_step(
    registry: &Registry,
    stage: &StagePlan,
    student: &mut Net,
    mut teacher: Option<&mut Net>,
    set_vars: &mut dyn FnMut(&mut nn::VarStore) -> Result<()>,
    batch: &Batch,
    progress: Progress,
    draws: Option<Tensor>,
    n_data: i64,
    classes: i64,
) -> Result<Probed> {
    let env = BuildEnv {
        registry,
        device: batch.images.device(),
        n_data,
        classes,
        scripts: &crate::NoScripts,
    };
    let probe = batch.images.narrow(0, 0, batch.images.size()[0].min(2));
    let mut prep = prepare_stage(
        &env,
        0,
        Draws::Given(Tensor::new()),
        stage,
        student,
        teacher.as_deref_mut(),
        &Carry::new(),
        &probe,
    )?;
    if prep.needs.contrast.is_some() {
        return Err(EngineError::Plan(
            "the method needs contrast indices from the loader, which a probed step does not draw"
                .into(),
        ));
    }
    match draws {
        Some(u) => prep.draws = Draws::Given(u),
        // Without views nothing reads the draws.
        None if prep.needs.views.is_empty() => {}
        None => {
            return Err(EngineError::Plan(
                "the method chooses attack classes at random: give one uniform draw in [0, 1) per batch row (`batch/attack_u`)".into(),
            ));
        }
    }
    for a in prep.methods.iter_mut() {
        set_vars(&mut a.vs)?;
    }
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    let nets = StageNets {
        net,
        other,
        net_trains: prep.net_trains,
        mutual: prep.mutual,
        needs: &prep.needs,
        draws: &prep.draws,
    };
    let out = step(
        &nets,
        &mut prep.methods,
        &mut prep.peers,
        batch,
        progress,
        Update::Backward,
    )?;
    if let Some((term, value)) = out.terms.iter().find(|(_, v)| !v.is_finite()) {
        return Err(EngineError::Plan(format!(
            "loss term `{term}` is {value}; no gradients"
        )));
    }
    let method_vars = prep
        .methods
        .iter()
        .flat_map(|a| named_vars(&a.vs, ""))
        .collect();
    Ok(Probed {
        terms: out.terms,
        method_vars,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: usize, step: usize) -> Progress {
        Progress {
            epoch,
            epochs: 10,
            step,
            steps_per_epoch: 10,
            global_step: epoch * 10 + step,
        }
    }

    /// Draws are a function of (seed, stage, epoch, batch) alone: torch's
    /// global generator, which anything may advance, plays no part.
    #[test]
    fn draws_are_keyed_by_seed_stage_epoch_and_batch() {
        let get = |seed, stage, epoch, step| {
            Vec::<f32>::try_from(Draws::seeded(seed, stage).for_step(
                at(epoch, step),
                64,
                Device::Cpu,
            ))
            .unwrap()
        };
        tch::manual_seed(1);
        let first = get(7, 0, 3, 2);
        tch::manual_seed(2);
        let _ = Tensor::rand([100], (Kind::Float, Device::Cpu));
        assert_eq!(get(7, 0, 3, 2), first);
        assert!(first.iter().all(|u| (0.0..1.0).contains(u)));
        for other in [
            get(8, 0, 3, 2),
            get(7, 1, 3, 2),
            get(7, 0, 4, 2),
            get(7, 0, 3, 3),
        ] {
            assert_ne!(other, first);
        }
        let given = Draws::Given(Tensor::from_slice(&[0.25f32, 0.5]));
        assert_eq!(
            Vec::<f32>::try_from(given.for_step(at(0, 0), 2, Device::Cpu)).unwrap(),
            vec![0.25, 0.5]
        );
    }
}

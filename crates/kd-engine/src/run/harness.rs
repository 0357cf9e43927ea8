//! The engine's step outside a run: a fixed-batch harness for benchmarks
//! and the conformance probe's single step, on the code path of training.

use kd_core::{Progress, Registry};
use kd_data::Batch;
use tch::{Tensor, nn};

use super::checkpoint::Carry;
use super::draws::Draws;
use super::graph::GraphStats;
use super::methods::BuildEnv;
use super::nets::{Exec, Net, build_nets, device, named_vars, roles};
use super::pending::Pending;
use super::prepare::{Prepared, StageCx, prepare, prepare_stage};
use super::step::{Update, step};
use kd_data::{DataSource, SyntheticConfig};

use crate::plan::{
    DataPlan, DeviceChoice, MethodPlan, ModelPlan, Part, Plan, Precision, StagePlan, Subject,
};
use crate::tensors::TensorFile;
use crate::{EngineError, Result};

/// A distillation step to benchmark: `teacher` (fresh weights) into
/// `student` with `methods`, one stage, SGD's defaults, on a synthetic set
/// of exactly one batch of `classes` classes without augmentation, so that
/// an outside reference given the same starting point computes the same
/// steps. Device `auto`, fp32, channels-last: set the fields to change them.
pub fn bench_plan(
    teacher: &str,
    student: &str,
    methods: Vec<MethodPlan>,
    batch: usize,
    classes: i64,
) -> Plan {
    let model = ModelPlan::new;
    Plan {
        name: "bench".into(),
        seed: 0,
        device: DeviceChoice::Auto,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                classes,
                train_size: batch as i64,
                test_size: 2,
                ..Default::default()
            }),
            batch_size: batch,
            augment: false,
            ..Default::default()
        },
        student: model(student),
        teacher: Some(model(teacher)),
        teacher_cache: None,
        stages: vec![StagePlan {
            name: "distill".into(),
            epochs: 1,
            subject: Subject::Student,
            train: vec![Part::Network, Part::Methods],
            methods,
            optimizer: Default::default(),
            lr_schedule: Default::default(),
            keep_optimizer: false,
            clip_grad: None,
            ema: None,
        }],
        precision: Precision::Fp32,
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

/// Steps of a plan's first stage on one fixed batch, for benchmarks: the
/// same preparation and step as a run, without epochs or evaluation.
pub struct StepHarness {
    student: Net,
    teacher: Option<Net>,
    prep: Prepared,
    batch: Batch,
    subject: Subject,
    lr: f64,
    exec: Exec,
    pending: Pending,
}

impl StepHarness {
    pub fn new(plan: &Plan, registry: &Registry) -> Result<StepHarness> {
        let exec = Exec::of(plan, device(plan.device)?)?;
        let mut splits = kd_data::load(&plan.data.source, 0.0, 0)?;
        splits.normalize_with(&plan.data.normalize, &plan.data.source)?;
        let classes = splits.train.num_classes;
        let (mut student, mut teacher) = build_nets(plan, classes, &exec)?;
        let stage = plan
            .stages
            .first()
            .ok_or_else(|| EngineError::Plan("the plan has no stages".into()))?;
        let cx = StageCx {
            plan,
            si: 0,
            registry,
            exec: &exec,
            splits: &splits,
            scripts: &crate::NoScripts,
            cached_teacher: None,
        };
        let (prep, loader) = prepare(&cx, stage, &mut student, teacher.as_mut(), &Carry::new())?;
        let batch = loader.batch(&loader.order(0), 0, 0)?;
        Ok(StepHarness {
            student,
            teacher,
            prep,
            batch,
            subject: stage.subject,
            lr: stage.optimizer.lr,
            exec,
            pending: Pending::default(),
        })
    }

    /// Issues one step without waiting for the device; `read` collects.
    pub fn step_async(&mut self) -> Result<()> {
        let (net, other) = roles(self.subject, &self.student, self.teacher.as_ref());
        let progress = Progress {
            epoch: 0,
            epochs: 1,
            step: 0,
            steps_per_epoch: 1,
            global_step: 0,
        };
        let out =
            self.prep
                .train_step(net, other, &self.exec, &self.batch, progress, None, self.lr)?;
        self.pending.push(0, self.lr, out);
        Ok(())
    }

    /// How the steps ran under `cuda_graph: true` (captured, replayed,
    /// eager); `None` without it.
    pub fn graph_stats(&self) -> Option<GraphStats> {
        self.prep.graph.as_ref().map(|g| g.stats)
    }

    /// The total loss of every step issued since the last read, in order.
    pub fn read(&mut self) -> Result<Vec<f64>> {
        Ok(self.pending.read()?.into_iter().map(|v| v.total).collect())
    }

    /// Runs one step and returns its total loss.
    pub fn step(&mut self) -> Result<f64> {
        self.step_async()?;
        Ok(self.read()?.pop().unwrap_or(f64::NAN))
    }

    /// The starting point of the steps, for an outside reference to start
    /// from: `student/<key>`, `teacher/<key>`, `method/<label>/<key>` and
    /// `batch/input`, `batch/target`.
    pub fn state(&self) -> TensorFile {
        let mut file = TensorFile::default();
        for (n, t) in named_vars(&self.student.vs, "student/") {
            file.push(n, &t);
        }
        if let Some(t) = &self.teacher {
            for (n, t) in named_vars(&t.vs, "teacher/") {
                file.push(n, &t);
            }
        }
        for a in &self.prep.methods {
            for (n, t) in named_vars(&a.vs, &format!("method/{}/", a.label)) {
                file.push(n, &t);
            }
        }
        file.push("batch/input", &self.batch.images);
        file.push("batch/target", &self.batch.labels);
        file
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
    let exec = Exec {
        channels_last: true,
        precision: Precision::Fp32,
        device: batch.images.device(),
        frozen_bn: false,
        sync_bn: false,
        graph: None,
    };
    student.use_channels_last()?;
    if let Some(t) = teacher.as_deref_mut() {
        t.use_channels_last()?;
    }
    let env = BuildEnv {
        registry,
        device: exec.device,
        n_data,
        classes,
        scripts: &crate::NoScripts,
    };
    let probe = batch.images.narrow(0, 0, batch.images.size()[0].min(2));
    let mut prep = prepare_stage(
        &env,
        &exec,
        0,
        Draws::Given(Tensor::new()),
        stage,
        student,
        teacher.as_deref_mut(),
        &Carry::new(),
        &probe,
        None,
    )?;
    if prep.needs.contrast.is_some() {
        return Err(EngineError::Plan(
            "the method needs contrast indices from the loader, which a probed step does not draw"
                .into(),
        ));
    }
    prep.draws = given_draws(draws, prep.needs.views.is_empty())?;
    for a in prep.methods.iter_mut() {
        set_vars(&mut a.vs)?;
    }
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    let (nets, methods, peers, _) = prep.split(net, other, &exec);
    let out = step(
        &nets,
        methods,
        peers,
        batch,
        progress,
        None,
        Update::Backward,
    )?;
    let values = read_one(out)?;
    let method_vars = prep
        .methods
        .iter()
        .flat_map(|a| named_vars(&a.vs, ""))
        .collect();
    Ok(Probed {
        terms: values.terms,
        method_vars,
    })
}

/// The probe's stand-in for the training stream's draws: required when the
/// method attacks (it chooses classes at random), unused otherwise.
fn given_draws(draws: Option<Tensor>, no_views: bool) -> Result<Draws> {
    match draws {
        Some(u) => Ok(Draws::Given(u)),
        None if no_views => Ok(Draws::Given(Tensor::new())),
        None => Err(EngineError::Plan(
            "the method chooses attack classes at random: give one uniform draw in [0, 1) per batch row (`batch/attack_u`)".into(),
        )),
    }
}

/// A probed step's values on the host, refused when one is not finite.
fn read_one(out: super::step::StepOut) -> Result<super::pending::StepValues> {
    let mut pending = Pending::default();
    pending.push(0, 0.0, out);
    let values = pending.read()?.pop().expect("one step was read");
    if let Some((term, value)) = values.non_finite() {
        return Err(EngineError::Plan(format!(
            "loss term `{term}` is {value}; no gradients"
        )));
    }
    Ok(values)
}

//! An experiment: the plan of one run, built up before `run(...)`.

use kd_engine::{DataPlan, DeviceChoice, ModelPlan, Paper, Plan, Precision, StagePlan};
use rhai::{Dynamic, Engine, FuncRegistration, Map};

use super::models::model;
use super::{Fallible, count, def, doc_comment, typed};
use crate::error::user;

#[derive(Debug, Clone)]
pub(crate) struct Experiment {
    pub name: String,
    pub seed: u64,
    pub device: DeviceChoice,
    pub precision: Precision,
    pub channels_last: bool,
    pub batchnorm: kd_engine::BatchNorm,
    pub cuda_graph: bool,
    pub data: DataPlan,
    pub student: Option<ModelPlan>,
    pub teacher: Option<ModelPlan>,
    pub teacher_cache: Option<std::path::PathBuf>,
    pub stages: Vec<StagePlan>,
    pub paper: Option<Paper>,
}

impl Default for Experiment {
    fn default() -> Self {
        Experiment {
            name: String::new(),
            seed: 0,
            device: DeviceChoice::default(),
            precision: Precision::default(),
            channels_last: true,
            batchnorm: Default::default(),
            cuda_graph: false,
            data: DataPlan::default(),
            student: None,
            teacher: None,
            teacher_cache: None,
            stages: Vec::new(),
            paper: None,
        }
    }
}

impl Experiment {
    pub fn plan(&self) -> Result<Plan, String> {
        let student = self.student.clone().ok_or_else(|| {
            format!(
                "experiment `{}` has no student; add `.student(\"resnet8\")`",
                self.name
            )
        })?;
        if self.stages.is_empty() {
            return Err(format!(
                "experiment `{}` has no stages; add `.add(stage(\"train\", 240).add(method(\"ce\")))`",
                self.name
            ));
        }
        Ok(Plan {
            name: self.name.clone(),
            seed: self.seed,
            device: self.device,
            data: self.data.clone(),
            student,
            teacher: self.teacher.clone(),
            teacher_cache: self.teacher_cache.clone(),
            stages: self.stages.clone(),
            precision: self.precision,
            channels_last: self.channels_last,
            batchnorm: self.batchnorm,
            cuda_graph: self.cuda_graph,
            paper: self.paper.clone(),
        })
    }
}

pub(super) fn register(e: &mut Engine) {
    e.register_type_with_name::<Experiment>("Experiment");
    e.register_fn("to_string", |x: &mut Experiment| match x.plan() {
        Ok(p) => crate::yaml::to_yaml(std::slice::from_ref(&p)).unwrap_or_default(),
        Err(msg) => format!("incomplete experiment: {msg}"),
    });
    def(
        e,
        "experiment",
        &["name: String", "Experiment"],
        "A new experiment; `name` is also its run folder, so each run of a recipe needs its own.",
        |name: &str| -> Fallible<Experiment> {
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(user(format!(
                    "experiment name `{name}` must be a plain folder name"
                )));
            }
            Ok(Experiment {
                name: name.to_string(),
                ..Experiment::default()
            })
        },
    );
    FuncRegistration::new_getter("name")
        .with_params_info(["experiment: &mut Experiment", "String"])
        .with_comments([doc_comment("The experiment's name.")])
        .register_into_engine(e, |x: &mut Experiment| x.name.clone());
    FuncRegistration::new_getter("seed")
        .with_params_info(["experiment: &mut Experiment", "int"])
        .with_comments([doc_comment("The experiment's seed.")])
        .register_into_engine(e, |x: &mut Experiment| x.seed as i64);
    def(
        e,
        "name",
        &["experiment: Experiment", "name: String", "Experiment"],
        "Renames the experiment (and its run folder).",
        |mut x: Experiment, name: &str| -> Fallible<Experiment> {
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(user(format!(
                    "experiment name `{name}` must be a plain folder name"
                )));
            }
            x.name = name.to_string();
            Ok(x)
        },
    );
    def(
        e,
        "seed",
        &["experiment: Experiment", "seed: int", "Experiment"],
        "Seed of initialisation and data order.",
        |mut x: Experiment, seed: i64| -> Fallible<Experiment> {
            x.seed = count(seed, "seed")? as u64;
            Ok(x)
        },
    );
    def(
        e,
        "device",
        &["experiment: Experiment", "device: String", "Experiment"],
        "`\"auto\"` (CUDA when available; default), `\"cpu\"` or `\"cuda\"`.",
        |mut x: Experiment, d: &str| -> Fallible<Experiment> {
            x.device = match d {
                "auto" => DeviceChoice::Auto,
                "cpu" => DeviceChoice::Cpu,
                "cuda" => DeviceChoice::Cuda,
                other => {
                    return Err(user(format!(
                        "unknown device `{other}`; devices: auto, cpu, cuda"
                    )));
                }
            };
            Ok(x)
        },
    );
    def(
        e,
        "precision",
        &["experiment: Experiment", "precision: String", "Experiment"],
        "`\"fp32\"` (default); `\"bf16\"` (autocast on CUDA and on CPUs with bf16 kernels); `\"teacher-bf16\"` (only the forwards of networks the stage does not train, e.g. the frozen teacher, in bf16); `\"fp16\"` on CUDA (with a dynamic loss scale). Weights, optimiser state and loss terms stay fp32.",
        |mut x: Experiment, p: &str| -> Fallible<Experiment> {
            x.precision = p.parse().map_err(user)?;
            Ok(x)
        },
    );
    def(
        e,
        "cuda_graph",
        &["experiment: Experiment", "on: bool", "Experiment"],
        "Capture each stage's full-batch training step as a CUDA graph and replay it (default `false`; CUDA only; the losses are those of the uncaptured step, and a step whose learning rate or loss weights changed captures again).",
        |mut x: Experiment, on: bool| -> Fallible<Experiment> {
            x.cuda_graph = on;
            Ok(x)
        },
    );
    def(
        e,
        "channels_last",
        &["experiment: Experiment", "on: bool", "Experiment"],
        "Convolutions in channels-last memory order (default `true`; same values up to float rounding).",
        |mut x: Experiment, on: bool| -> Fallible<Experiment> {
            x.channels_last = on;
            Ok(x)
        },
    );
    def(
        e,
        "batchnorm",
        &["experiment: Experiment", "mode: String", "Experiment"],
        "`\"batch\"` (default): BatchNorm trains on each batch's statistics; `\"frozen\"`: on the running statistics, left unchanged (fine-tuning; data-parallel runs equal to one process); `\"sync\"`: on the statistics of the whole data-parallel job's batch (SyncBatchNorm; `\"batch\"` in one process).",
        |mut x: Experiment, m: &str| -> Fallible<Experiment> {
            x.batchnorm = m.parse().map_err(user)?;
            Ok(x)
        },
    );
    def(
        e,
        "paper",
        &["experiment: Experiment", "result: Map", "Experiment"],
        "The number this configuration's source reports, for `kd report` and MLflow:\n`#{ top1: 73.33, epoch: \"best\" | \"last\" | \"unstated\", runs: 5, source: \"RepDistiller README, table 1\" }`\n(`epoch` defaults to best; leave `runs` out where the source does not say).",
        |mut x: Experiment, result: Map| -> Fallible<Experiment> {
            let p: Paper = typed(&Dynamic::from_map(result), "paper")?;
            if !(p.top1.is_finite() && p.top1 > 0.0 && p.top1 <= 100.0) {
                return Err(user(format!(
                    "paper: top1 is a test accuracy in percent, in (0, 100]; got {}",
                    p.top1
                )));
            }
            if p.source.trim().is_empty() {
                return Err(user(
                    "paper: `source` must name where the number is printed",
                ));
            }
            if p.runs == Some(0) {
                return Err(user("paper: `runs` must be at least 1 (or left out)"));
            }
            x.paper = Some(p);
            Ok(x)
        },
    );
    def(
        e,
        "data",
        &["experiment: Experiment", "data: Data", "Experiment"],
        "The data set and its loader settings.",
        |mut x: Experiment, d: DataPlan| {
            x.data = d;
            x
        },
    );
    def(
        e,
        "student",
        &["experiment: Experiment", "arch: String", "Experiment"],
        "The student, a zoo model with fresh weights.",
        |mut x: Experiment, arch: &str| -> Fallible<Experiment> {
            x.student = Some(model(arch, None)?);
            Ok(x)
        },
    );
    def(
        e,
        "student",
        &["experiment: Experiment", "model: Model", "Experiment"],
        "The student, e.g. `model(\"resnet8\", \"init.safetensors\")`.",
        |mut x: Experiment, m: ModelPlan| {
            x.student = Some(m);
            x
        },
    );
    def(
        e,
        "teacher",
        &["experiment: Experiment", "arch: String", "Experiment"],
        "A teacher with fresh weights, for a plan that trains it in a `teacher_stage`.",
        |mut x: Experiment, arch: &str| -> Fallible<Experiment> {
            x.teacher = Some(model(arch, None)?);
            Ok(x)
        },
    );
    def(
        e,
        "teacher",
        &[
            "experiment: Experiment",
            "arch: String",
            "weights: String",
            "Experiment",
        ],
        "A trained teacher: zoo name and checkpoint (safetensors).",
        |mut x: Experiment, arch: &str, weights: &str| -> Fallible<Experiment> {
            x.teacher = Some(model(arch, Some(weights))?);
            Ok(x)
        },
    );
    def(
        e,
        "teacher",
        &["experiment: Experiment", "model: Model", "Experiment"],
        "The teacher as a `model(...)`.",
        |mut x: Experiment, m: ModelPlan| {
            x.teacher = Some(m);
            x
        },
    );
    def(
        e,
        "teacher_cache",
        &["experiment: Experiment", "dir: String", "Experiment"],
        "Reads the teacher's outputs from a folder written by `kd cache-teacher` instead of running the teacher (which is then never built); the cache must match the plan's teacher file, data, seed and epochs.",
        |mut x: Experiment, dir: &str| {
            x.teacher_cache = Some(dir.into());
            x
        },
    );
    def(
        e,
        "add",
        &["experiment: Experiment", "stage: Stage", "Experiment"],
        "Appends a stage; stages run in order on the same networks.",
        |mut x: Experiment, s: StagePlan| {
            x.stages.push(s);
            x
        },
    );
}

//! The declarative plan of a run: what recipes produce, what `kd plan`
//! prints as YAML and what `kd run plan.yaml` replays exactly.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kd_data::{CropPadding, DataSource, Mixup, Normalize, RandomErasing, TimmRandAugment};
use serde::{Deserialize, Serialize};

use crate::schedule::Weight;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Run name; also the run folder under `out_dir`.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub data: DataPlan,
    pub student: ModelPlan,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<ModelPlan>,
    /// A folder written by `kd cache-teacher`: the teacher's outputs are
    /// read from it instead of computed (the teacher is never built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_cache: Option<PathBuf>,
    pub stages: Vec<StagePlan>,
    /// Arithmetic of the forward passes: `bf16` and `teacher-bf16` on CUDA
    /// and on CPUs with bf16 kernels, `fp16` on CUDA only.
    #[serde(default)]
    pub precision: Precision,
    /// Convolutions in channels-last memory order (NHWC), faster on the
    /// CPU's oneDNN kernels and on tensor cores; values are the same up to
    /// float rounding.
    #[serde(default = "yes")]
    pub channels_last: bool,
    /// What BatchNorm normalises with while training.
    #[serde(default)]
    pub batchnorm: BatchNorm,
    /// Capture each stage's full-batch training step as a CUDA graph and
    /// replay it (CUDA only; the losses are those of the uncaptured step).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cuda_graph: bool,
    /// The number the recipe's source reports for this configuration, so
    /// a run can be told faithful or broken (`kd report`, MLflow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paper: Option<Paper>,
}

/// A published result: top-1 test accuracy (%) of the student, which
/// epoch it is taken at, over how many runs, and where it is printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paper {
    pub top1: f64,
    #[serde(default)]
    pub epoch: PaperEpoch,
    /// Runs the number is a mean of; absent where the source does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u32>,
    /// Publication, table and column: `RepDistiller README, table 1,
    /// resnet110 -> resnet20`.
    pub source: String,
}

/// Which epoch a published number is read at. Sources that report the
/// best test epoch flatter a method against those that report the last;
/// `kd report` compares like with like (an unstated one with the best).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaperEpoch {
    #[default]
    Best,
    Last,
    Unstated,
}

impl std::str::FromStr for PaperEpoch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best" => Ok(PaperEpoch::Best),
            "last" => Ok(PaperEpoch::Last),
            "unstated" => Ok(PaperEpoch::Unstated),
            other => Err(format!(
                "unknown paper epoch `{other}`; valid: best, last, unstated"
            )),
        }
    }
}

/// BatchNorm in training forwards: each batch's own statistics (PyTorch's
/// `train()`; in a data-parallel job, each rank's batch), the running
/// statistics, left unchanged (as in `eval()`; fine-tuning a pretrained
/// network, and data-parallel runs that must equal one process on the
/// combined batch), or the statistics of the whole job's batch
/// (`torch.nn.SyncBatchNorm`: one allreduce per BatchNorm layer in the
/// forward and one in the backward). `sync` in a single process, or a job
/// of one rank, is `batch` exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchNorm {
    #[default]
    Batch,
    Frozen,
    Sync,
}

impl std::str::FromStr for BatchNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "batch" => Ok(BatchNorm::Batch),
            "frozen" => Ok(BatchNorm::Frozen),
            "sync" => Ok(BatchNorm::Sync),
            other => Err(format!(
                "unknown batchnorm `{other}`; valid: batch, frozen, sync"
            )),
        }
    }
}

fn yes() -> bool {
    true
}

/// The precision of a plan's forward passes. Master weights, optimiser
/// state and every loss term stay fp32; `fp16` adds a dynamic loss scale.
/// `bf16` runs on CUDA and on CPUs whose oneDNN has bf16 kernels; `fp16`
/// on CUDA only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
    /// bf16 for the forwards of networks the stage does not train (the
    /// frozen teacher's, in distillation), fp32 for the network it trains:
    /// the teacher's forward is cheaper, the student's gradients untouched.
    #[serde(rename = "teacher-bf16")]
    TeacherBf16,
}

impl Precision {
    /// Its name in plans and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::TeacherBf16 => "teacher-bf16",
        }
    }

    /// The precision of the forwards of trained networks.
    pub fn trained(self) -> Precision {
        match self {
            Precision::TeacherBf16 => Precision::Fp32,
            p => p,
        }
    }

    /// The precision of the forwards of frozen networks (no gradient).
    pub fn frozen(self) -> Precision {
        match self {
            Precision::TeacherBf16 => Precision::Bf16,
            p => p,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp16" => Ok(Precision::Fp16),
            "teacher-bf16" => Ok(Precision::TeacherBf16),
            other => Err(format!(
                "unknown precision `{other}`; valid: fp32, bf16, fp16, teacher-bf16"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataPlan {
    pub source: DataSource,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub augment: bool,
    /// What the random crop's border is filled with.
    pub crop_padding: CropPadding,
    /// The mean and std images are normalised with, for training and
    /// evaluation alike.
    pub normalize: Normalize,
    /// Fraction of the training set held out for validation (0: none).
    pub val_fraction: f64,
    /// Processes of the data-parallel job that trains the plan, each on
    /// `batch_size` images of every step: the effective batch is
    /// `batch_size * world_size`, so runs differing in it are different
    /// experiments (reports keep them apart, a resume refuses the change).
    pub world_size: usize,
    /// timm's Mixup/CutMix of every training batch (the teacher sees the
    /// mixed images too); the labels become mixed distributions
    /// (`StepIo::soft_target`). Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixup: Option<Mixup>,
    /// timm's RandomErasing of every training image, after normalisation
    /// and before Mixup. Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_erasing: Option<RandomErasing>,
    /// timm's RandAugment (`rand-m9-mstd0.5-inc1` by default) of every
    /// training image after its crop and flip, before normalisation; part
    /// of `augment`. Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub randaugment: Option<TimmRandAugment>,
}

impl DataPlan {
    /// Images per optimiser step over the whole job.
    pub fn effective_batch(&self) -> usize {
        self.batch_size * self.world_size.max(1)
    }
}

impl Default for DataPlan {
    fn default() -> Self {
        DataPlan {
            source: DataSource::default(),
            batch_size: 64,
            eval_batch_size: 256,
            augment: true,
            crop_padding: CropPadding::Zero,
            normalize: Normalize::Default,
            val_fraction: 0.0,
            world_size: 1,
            mixup: None,
            random_erasing: None,
            randaugment: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPlan {
    /// Zoo name (`kd models`), or `torchscript:FILE`.
    pub arch: String,
    /// safetensors weights to start from (a PyTorch `state_dict` loads as-is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// SHA-256 of the file `arch` names (`torchscript:FILE`): the saved
    /// plan pins the module's code and initial weights, so a resume
    /// refuses a file that changed. Filled in by the canonical form
    /// (`folder::canonical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// Load `weights` except the classifier, which keeps its fresh
    /// initialisation for this run's classes (timm's `pretrained=True,
    /// num_classes=N`; fine-tuning an ImageNet network on CIFAR-100).
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset_classifier: bool,
}

impl ModelPlan {
    /// `arch` with fresh weights.
    pub fn new(arch: &str) -> ModelPlan {
        ModelPlan {
            arch: arch.into(),
            weights: None,
            source_sha256: None,
            reset_classifier: false,
        }
    }

    /// How its weights file loads.
    pub fn load_options(&self) -> kd_models::LoadOptions {
        kd_models::LoadOptions {
            reset_classifier: self.reset_classifier,
        }
    }

    /// The file a foreign architecture is loaded from, if it is one: a
    /// TorchScript file, or the `.py` file of a Python spec.
    pub fn source_file(&self) -> Option<&std::path::Path> {
        if let Some(spec) = self
            .arch
            .strip_prefix(kd_models::torchscript::PYTHON_PREFIX)
        {
            return kd_aten::python_source_file(spec);
        }
        self.arch
            .strip_prefix(kd_models::torchscript::PREFIX)
            .map(std::path::Path::new)
    }
}

/// Which network a stage trains as its subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    /// Distillation into the student (the teacher, if any, is frozen).
    #[default]
    Student,
    /// Train the teacher itself, with no teacher of its own.
    Teacher,
}

/// What the optimiser of a stage updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The stage's subject network.
    Network,
    /// The methods' own modules (connectors, regressors, embeddings).
    Methods,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    pub name: String,
    pub epochs: usize,
    #[serde(default)]
    pub subject: Subject,
    #[serde(default = "default_train")]
    pub train: Vec<Part>,
    pub methods: Vec<MethodPlan>,
    #[serde(default)]
    pub optimizer: Sgd,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Clip the gradients' global 2-norm to this before each update
    /// (`torch.nn.utils.clip_grad_norm_`), after data-parallel averaging
    /// and loss-scale unscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad: Option<f64>,
    /// Keep an exponential moving average of the network this stage trains
    /// (timm's ModelEmaV3), evaluated beside it every epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaPlan>,
    /// Continue the previous stage's optimiser instead of a fresh one: the
    /// momentum buffers of the parameters both stages train carry over, as
    /// when one `torch.optim.SGD` serves both (KD-Zoo's AB and FSP). The
    /// learning rate and the other settings are still this stage's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_optimizer: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl StagePlan {
    /// A stage training the student and the methods' modules with
    /// `methods` for `epochs`, every other field at its default.
    pub fn new(name: &str, epochs: usize, methods: Vec<MethodPlan>) -> StagePlan {
        StagePlan {
            name: name.into(),
            epochs,
            subject: Subject::default(),
            train: default_train(),
            methods,
            optimizer: Sgd::default(),
            lr_schedule: LrSchedule::default(),
            keep_optimizer: false,
            clip_grad: None,
            ema: None,
        }
    }
}

fn default_train() -> Vec<Part> {
    vec![Part::Network, Part::Methods]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodPlan {
    /// Registered method name (`kd methods`).
    pub method: String,
    /// Name of its loss terms in logs; defaults to the method name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default = "one")]
    pub weight: Weight,
    /// Schedules of the method's schedulable config fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schedule: BTreeMap<String, Weight>,
}

fn one() -> Weight {
    Weight::Const(1.0)
}

impl MethodPlan {
    pub fn new(method: &str, weight: f64) -> MethodPlan {
        MethodPlan {
            method: method.into(),
            label: None,
            config: serde_json::Value::Null,
            weight: Weight::Const(weight),
            schedule: BTreeMap::new(),
        }
    }

    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.method)
    }

    /// The method's weight and its scheduled config fields, each with how
    /// a message names it (`weight`, ``schedule of `T` ``).
    pub fn weights(&self) -> impl Iterator<Item = (String, &Weight)> {
        std::iter::once(("weight".to_string(), &self.weight)).chain(
            self.schedule
                .iter()
                .map(|(f, w)| (format!("schedule of `{f}`"), w)),
        )
    }
}

/// A stage's optimiser: `kind` (`sgd` when absent, so plans written
/// before there was a choice read as they did) and its settings. Each kind
/// reads only its own keys (an unknown one is refused, naming the valid
/// ones) and fills the others with its defaults:
///
/// - `sgd`: `torch.optim.SGD` (weight decay added to the gradient,
///   momentum buffer, optional Nesterov); lr 0.05, momentum 0.9, weight
///   decay 5e-4.
/// - `adamw`: `torch.optim.AdamW` (decoupled weight decay); lr 1e-3,
///   betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
/// - `lamb`: `timm.optim.Lamb` (Adam moments, coupled weight decay, the
///   layer-wise trust ratio, the global gradient norm clipped to
///   `max_grad_norm` inside); lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight
///   decay 0.01, max_grad_norm 1.
///
/// `no_decay_1d` (every kind): no weight decay on parameters of at most one
/// dimension (norm weights, biases), on names ending in `.bias`, and on
/// `pos_embed`, `cls_token` and `dist_token` (a ViT's `no_weight_decay()`),
/// as timm's `param_groups_weight_decay`. Off by default for `sgd` (today's
/// numbers), on for `adamw` and `lamb` (what timm does).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerPlan {
    pub kind: OptimizerKind,
    pub lr: f64,
    /// SGD only.
    pub momentum: f64,
    /// SGD only.
    pub nesterov: bool,
    pub weight_decay: f64,
    /// AdamW and LAMB.
    pub betas: [f64; 2],
    /// AdamW and LAMB.
    pub eps: f64,
    pub no_decay_1d: bool,
    /// LAMB only: the global gradient norm is clipped to this inside the
    /// update (timm's `max_grad_norm`; `None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// LAMB only: trust ratio clipped at 1 (LAMBC).
    pub trust_clip: bool,
    /// LAMB only: the trust ratio also for parameters without weight decay.
    pub always_adapt: bool,
    /// DOT only: the task loss's momentum is `momentum - delta`, the
    /// distillation loss's `momentum + delta`.
    pub delta: f64,
}

/// The stage optimiser's settings; `kind` says which optimiser.
pub type Sgd = OptimizerPlan;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adamw,
    Lamb,
    /// mdistiller's Distillation-Oriented Trainer (Zhao et al., ICCV 2023):
    /// SGD with separate momentum buffers for the task and the
    /// distillation losses' gradients.
    Dot,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Lamb => "lamb",
            OptimizerKind::Dot => "dot",
        }
    }
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adamw" => Ok(OptimizerKind::Adamw),
            "lamb" => Ok(OptimizerKind::Lamb),
            "dot" => Ok(OptimizerKind::Dot),
            other => Err(format!(
                "unknown optimizer `{other}`; valid: sgd, adamw, lamb, dot"
            )),
        }
    }
}

impl Default for OptimizerPlan {
    fn default() -> Self {
        OptimizerPlan::of(OptimizerKind::Sgd)
    }
}

impl OptimizerPlan {
    /// The defaults of `kind` (PyTorch's and timm's, SGD's kd's own).
    pub fn of(kind: OptimizerKind) -> Self {
        let base = OptimizerPlan {
            kind,
            lr: 1e-3,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            no_decay_1d: true,
            max_grad_norm: None,
            trust_clip: false,
            always_adapt: false,
            delta: 0.0,
        };
        match kind {
            OptimizerKind::Sgd => OptimizerPlan {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                no_decay_1d: false,
                ..base
            },
            // mdistiller's CIFAR-100 DOT configs.
            OptimizerKind::Dot => OptimizerPlan {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                no_decay_1d: false,
                delta: 0.075,
                ..base
            },
            OptimizerKind::Adamw => base,
            OptimizerKind::Lamb => OptimizerPlan {
                eps: 1e-6,
                max_grad_norm: Some(1.0),
                ..base
            },
        }
    }
}

/// What each kind reads and writes, with its defaults.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SgdKeys {
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    #[serde(skip_serializing_if = "is_false")]
    no_decay_1d: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DotKeys {
    lr: f64,
    momentum: f64,
    delta: f64,
    weight_decay: f64,
    #[serde(skip_serializing_if = "is_false")]
    no_decay_1d: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AdamwKeys {
    lr: f64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    no_decay_1d: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LambKeys {
    lr: f64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    no_decay_1d: bool,
    max_grad_norm: Option<f64>,
    trust_clip: bool,
    always_adapt: bool,
}

macro_rules! keys_default {
    ($t:ident, $kind:expr, $($f:ident),*) => {
        impl Default for $t {
            fn default() -> Self {
                OptimizerPlan::of($kind).into()
            }
        }
        impl From<OptimizerPlan> for $t {
            fn from(o: OptimizerPlan) -> Self {
                $t { $($f: o.$f),* }
            }
        }
        impl $t {
            fn plan(self) -> OptimizerPlan {
                OptimizerPlan { $($f: self.$f,)* ..OptimizerPlan::of($kind) }
            }
        }
    };
}
keys_default!(
    SgdKeys,
    OptimizerKind::Sgd,
    lr,
    momentum,
    nesterov,
    weight_decay,
    no_decay_1d
);
keys_default!(
    DotKeys,
    OptimizerKind::Dot,
    lr,
    momentum,
    delta,
    weight_decay,
    no_decay_1d
);
keys_default!(
    AdamwKeys,
    OptimizerKind::Adamw,
    lr,
    betas,
    eps,
    weight_decay,
    no_decay_1d
);
keys_default!(
    LambKeys,
    OptimizerKind::Lamb,
    lr,
    betas,
    eps,
    weight_decay,
    no_decay_1d,
    max_grad_norm,
    trust_clip,
    always_adapt
);

impl Serialize for OptimizerPlan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let keys = match self.kind {
            // As before there was a choice: no `kind` for SGD.
            OptimizerKind::Sgd => serde_json::to_value(SgdKeys::from(self.clone())),
            OptimizerKind::Adamw => serde_json::to_value(AdamwKeys::from(self.clone())),
            OptimizerKind::Lamb => serde_json::to_value(LambKeys::from(self.clone())),
            OptimizerKind::Dot => serde_json::to_value(DotKeys::from(self.clone())),
        };
        let mut map = match keys.map_err(S::Error::custom)? {
            serde_json::Value::Object(m) => m,
            _ => return Err(S::Error::custom("optimizer keys are a map")),
        };
        if self.kind != OptimizerKind::Sgd {
            map.insert("kind".into(), self.kind.name().into());
        }
        // `kind` first, for the reader.
        let mut out = serde_json::Map::new();
        if let Some(k) = map.remove("kind") {
            out.insert("kind".into(), k);
        }
        out.extend(map);
        serde_json::Value::Object(out).serialize(s)
    }
}

impl<'de> Deserialize<'de> for OptimizerPlan {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = match serde_json::Value::deserialize(d)? {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                return Err(D::Error::custom(format!(
                    "optimizer: expected a map of settings, got {other}"
                )));
            }
        };
        let kind = match map.remove("kind") {
            None => OptimizerKind::Sgd,
            Some(serde_json::Value::String(k)) => k.parse().map_err(D::Error::custom)?,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "optimizer kind must be a string (sgd, adamw, lamb, dot), got {other}"
                )));
            }
        };
        let v = serde_json::Value::Object(map);
        let plan = match kind {
            OptimizerKind::Sgd => serde_json::from_value::<SgdKeys>(v).map(SgdKeys::plan),
            OptimizerKind::Adamw => serde_json::from_value::<AdamwKeys>(v).map(AdamwKeys::plan),
            OptimizerKind::Lamb => serde_json::from_value::<LambKeys>(v).map(LambKeys::plan),
            OptimizerKind::Dot => serde_json::from_value::<DotKeys>(v).map(DotKeys::plan),
        };
        // SGD's messages stay what they were before there was a choice.
        plan.map_err(|e| match kind {
            OptimizerKind::Sgd => D::Error::custom(e),
            _ => D::Error::custom(format!("{} optimizer: {e}", kind.name())),
        })
    }
}

/// An exponential moving average of the stage's network, as timm's
/// `ModelEmaV3` updated with `step` = the number of optimiser updates so
/// far in the stage: `decay` is 0 (a copy) until `update_after_step`
/// updates have passed; then `decay`, or with `warmup`
/// `clamp(1 - (1 + k / warmup_gamma)^-warmup_power, min_decay, decay)` at
/// the k-th update after that. Parameters and floating-point buffers are
/// lerped towards the network's (buffers copied with `exclude_buffers`),
/// integer buffers copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaPlan {
    pub decay: f64,
    pub min_decay: f64,
    pub update_after_step: u64,
    pub warmup: bool,
    pub warmup_gamma: f64,
    pub warmup_power: f64,
    pub exclude_buffers: bool,
}

impl Default for EmaPlan {
    fn default() -> Self {
        EmaPlan {
            decay: 0.9998,
            min_decay: 0.0,
            update_after_step: 0,
            warmup: false,
            warmup_gamma: 1.0,
            warmup_power: 2.0 / 3.0,
            exclude_buffers: false,
        }
    }
}

impl EmaPlan {
    /// The decay of the update made after `step` optimiser updates
    /// (timm's `ModelEmaV3.get_decay(step)`).
    pub fn decay_at(&self, step: u64) -> f64 {
        let k = step.saturating_sub(self.update_after_step + 1);
        if k == 0 {
            return 0.0;
        }
        if self.warmup {
            let d = 1.0 - (1.0 + k as f64 / self.warmup_gamma).powf(-self.warmup_power);
            d.min(self.decay).max(self.min_decay)
        } else {
            self.decay
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    #[default]
    Constant,
    /// lr · gamma^(number of milestones passed), stepped per epoch.
    Multistep {
        milestones: Vec<usize>,
        #[serde(default = "tenth")]
        gamma: f64,
    },
    /// Cosine decay over the stage after a linear warm-up, per step: from
    /// `warmup_lr` up to the base lr over `warmup_epochs`, then down to
    /// `min_lr` (timm's `CosineLRScheduler` knobs; both 0 by default).
    Cosine {
        #[serde(default)]
        warmup_epochs: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        min_lr: f64,
        #[serde(default, skip_serializing_if = "is_zero")]
        warmup_lr: f64,
    },
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn tenth() -> f64 {
    0.1
}

impl LrSchedule {
    /// Learning rate at a point of the stage.
    pub fn lr(&self, base: f64, p: kd_core::Progress) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Multistep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| p.epoch >= m).count() as i32)
            }
            LrSchedule::Cosine {
                warmup_epochs,
                min_lr,
                warmup_lr,
            } => {
                let warm = warmup_epochs * p.steps_per_epoch;
                let total = (p.epochs * p.steps_per_epoch).max(1);
                if p.global_step < warm {
                    warmup_lr + (base - warmup_lr) * (p.global_step + 1) as f64 / warm as f64
                } else {
                    let t = (p.global_step - warm) as f64 / (total - warm).max(1) as f64;
                    min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kd_core::Progress;

    use super::*;

    fn at(epoch: usize, step: usize) -> Progress {
        Progress {
            epoch,
            epochs: 240,
            step,
            steps_per_epoch: 10,
            global_step: epoch * 10 + step,
        }
    }

    #[test]
    fn multistep_matches_repdistiller_schedule() {
        let s = LrSchedule::Multistep {
            milestones: vec![150, 180, 210],
            gamma: 0.1,
        };
        let lr = |e| s.lr(0.05, at(e, 0));
        assert_eq!(lr(0), 0.05);
        assert_eq!(lr(149), 0.05);
        assert!((lr(150) - 0.005).abs() < 1e-12);
        assert!((lr(180) - 0.0005).abs() < 1e-12);
        assert!((lr(239) - 0.00005).abs() < 1e-12);
    }

    #[test]
    fn cosine_floors_at_min_lr_and_warms_from_warmup_lr() {
        let s = LrSchedule::Cosine {
            warmup_epochs: 2,
            min_lr: 1e-5,
            warmup_lr: 5e-7,
        };
        // Step 0 of 20 warm-up steps: a twentieth of the way up.
        let want0 = 5e-7 + (5e-4 - 5e-7) / 20.0;
        assert!((s.lr(5e-4, at(0, 0)) - want0).abs() < 1e-15);
        assert!((s.lr(5e-4, at(1, 9)) - 5e-4).abs() < 1e-15);
        // Half way through the decay: the mean of base and floor.
        let mid = at(2 + 119, 0);
        assert!((s.lr(5e-4, mid) - (5e-4 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((s.lr(5e-4, at(239, 9)) - 1e-5).abs() < 1e-9);
    }

    #[test]
    fn cosine_warms_up_then_decays() {
        let s = LrSchedule::Cosine {
            warmup_epochs: 1,
            min_lr: 0.0,
            warmup_lr: 0.0,
        };
        assert!((s.lr(1.0, at(0, 0)) - 0.1).abs() < 1e-12);
        assert!((s.lr(1.0, at(0, 9)) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, at(1, 0)) - 1.0).abs() < 1e-12);
        assert!(s.lr(1.0, at(239, 9)) < 1e-3);
    }

    #[test]
    fn unknown_plan_keys_are_refused() {
        let err = serde_json::from_str::<Sgd>(r#"{"lr": 0.1, "momentun": 0.9}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `momentun`, expected one of `lr`, `momentum`, `nesterov`, `weight_decay`"), "{err}");
    }
}

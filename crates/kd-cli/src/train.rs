//! `kd train-teacher` and `kd distill`: plans built from flags, for the
//! common cases that need no recipe.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    DataPlan, DeviceChoice, LrSchedule, MethodPlan, ModelPlan, Plan, Sgd, StagePlan, Subject,
    Weight,
};

/// Flags shared by every command that trains.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// `synthetic`, `digits` (UCI handwritten digits, written by the
    /// bootstrap), `cifar10:DIR`, `cifar100:DIR` or `imagefolder:DIR`
    /// (torchvision's layout: DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Padding of the random crop: `zero` (RepDistiller) or `reflect`
    /// (KD-Zoo).
    #[arg(long, default_value = "zero")]
    pub crop_padding: kd_data::CropPadding,
    /// Normalisation constants: `default` (the data set's own; RepDistiller's
    /// for CIFAR-100), `kdzoo` or `repdistiller`.
    #[arg(long, default_value = "default")]
    pub normalize: kd_data::Normalize,
    /// ImageFolder data: side of the square training and evaluation
    /// images (RandomResizedCrop / CenterCrop size) [default: 224].
    #[arg(long)]
    pub image_size: Option<u32>,
    /// ImageFolder data: evaluation resizes the shorter side to this
    /// before the centre crop [default: 256].
    #[arg(long)]
    pub resize_size: Option<u32>,
    /// ImageFolder data: leave out image files that cannot be decoded
    /// (each named in a warning) instead of stopping with an error.
    #[arg(long)]
    pub skip_corrupt: bool,
    /// Synthetic data: training samples.
    #[arg(long, default_value_t = 5000)]
    pub train_size: i64,
    /// Synthetic data: number of classes (even).
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    /// Fraction of the training set held out for validation (selects the
    /// best epoch when above 0).
    #[arg(long, default_value_t = 0.0)]
    pub val_fraction: f64,
    /// Epochs of training.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// SGD learning rate (> 0).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Epochs at which the learning rate is multiplied by 0.1 (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub milestones: Vec<usize>,
    /// Cosine learning-rate decay instead of milestones.
    #[arg(long)]
    pub cosine: bool,
    /// SGD weight decay (>= 0).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Seeds; several run one after another and are summarised as mean ± std.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Where to train: CUDA when available (auto), or forced.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Forward-pass precision: fp32, or on CUDA bf16 / fp16 (master weights
    /// and loss terms stay fp32; fp16 adds a dynamic loss scale).
    #[arg(long, default_value = "fp32")]
    pub precision: kd_engine::Precision,
    /// BatchNorm while training: `batch` (each batch's statistics),
    /// `frozen` (the running statistics, left unchanged) or `sync` (the
    /// whole data-parallel job's batch, SyncBatchNorm; `batch` in one
    /// process).
    #[arg(long, default_value = "batch")]
    pub batchnorm: kd_engine::BatchNorm,
    /// Capture each stage's full-batch training step as a CUDA graph and
    /// replay it (CUDA only; same losses as without).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Keep convolutions in PyTorch's default NCHW order instead of
    /// channels-last.
    #[arg(long)]
    pub no_channels_last: bool,
    /// Folder holding run folders.
    #[arg(long, default_value = "runs")]
    pub out: PathBuf,
    /// Run name (default derived from the models and methods).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub folders: FolderArgs,
    /// Train the runs one after another instead of in lockstep (runs that
    /// share a teacher file, data, seed and batch size otherwise compute
    /// each batch's teacher forward once for all of them).
    #[arg(long)]
    pub solo: bool,
    /// MLflow tracking server (else MLFLOW_TRACKING_URI, else `kd mlflow up`'s).
    #[arg(long)]
    pub tracking_uri: Option<String>,
}

/// What to do with run folders that already exist (see docs/runs.md).
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct FolderArgs {
    /// Continue the runs from their checkpoints; the plan must be the one
    /// each run saved. Runs of the command not started yet start.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// With --resume: the last stage may have more epochs than the saved
    /// plan (nothing else may differ); training goes on from the checkpoint.
    #[arg(long, requires = "resume")]
    pub extend: bool,
    /// Start the runs again: an existing run folder is moved to
    /// OUT/.archive/NAME.SECONDS first.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

pub fn data_source(spec: &str, train_size: i64, classes: i64) -> Result<DataSource> {
    Ok(match spec.split_once(':') {
        None if spec == "synthetic" => DataSource::Synthetic(SyntheticConfig {
            train_size,
            classes,
            ..Default::default()
        }),
        Some(("cifar10", dir)) => DataSource::Cifar10 { path: dir.into() },
        Some(("cifar100", dir)) => DataSource::Cifar100 { path: dir.into() },
        None if spec == "digits" => DataSource::Digits,
        Some(("imagefolder", dir)) => DataSource::image_folder(dir),
        _ => bail!(
            "unknown --data `{spec}`; valid: synthetic, digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR"
        ),
    })
}

impl TrainArgs {
    /// `--data` with the options that apply to it.
    fn source(&self) -> Result<DataSource> {
        let mut source = data_source(&self.data, self.train_size, self.classes)?;
        match &mut source {
            DataSource::ImageFolder {
                image_size,
                resize_size,
                skip_corrupt,
                ..
            } => {
                *image_size = self.image_size.unwrap_or(*image_size);
                *resize_size = self.resize_size.unwrap_or(*resize_size);
                *skip_corrupt = self.skip_corrupt;
            }
            _ if self.image_size.is_some() || self.resize_size.is_some() || self.skip_corrupt => {
                bail!(
                    "--image-size, --resize-size and --skip-corrupt apply to --data imagefolder:DIR only"
                )
            }
            _ => {}
        }
        Ok(source)
    }

    fn stage(&self, name: &str, methods: Vec<MethodPlan>) -> StagePlan {
        StagePlan {
            name: name.into(),
            epochs: self.epochs,
            subject: Subject::Student,
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods,
            optimizer: Sgd {
                lr: self.lr,
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
            },
            lr_schedule: if self.cosine {
                LrSchedule::Cosine { warmup_epochs: 0 }
            } else if self.milestones.is_empty() {
                LrSchedule::Constant
            } else {
                LrSchedule::Multistep {
                    milestones: self.milestones.clone(),
                    gamma: 0.1,
                }
            },
            keep_optimizer: false,
        }
    }

    pub fn plan(
        &self,
        name: String,
        student: ModelPlan,
        teacher: Option<ModelPlan>,
        stage: &str,
        methods: Vec<MethodPlan>,
        seed: u64,
    ) -> Result<Plan> {
        Ok(Plan {
            name,
            seed,
            device: self.device.into(),
            data: DataPlan {
                source: self.source()?,
                batch_size: self.batch_size,
                val_fraction: self.val_fraction,
                crop_padding: self.crop_padding,
                normalize: self.normalize,
                ..Default::default()
            },
            student,
            teacher,
            stages: vec![self.stage(stage, methods)],
            precision: self.precision,
            channels_last: !self.no_channels_last,
            batchnorm: self.batchnorm,
            cuda_graph: self.cuda_graph,
            paper: None,
        })
    }
}

/// `NAME[:WEIGHT]` → a method with that weight (default 1).
pub fn parse_method(spec: &str) -> Result<MethodPlan> {
    let (name, weight) = match spec.split_once(':') {
        Some((n, w)) => (
            n,
            w.parse::<f64>()
                .with_context(|| format!("weight of `{spec}` is not a number"))?,
        ),
        None => (spec, 1.0),
    };
    Ok(MethodPlan {
        weight: Weight::Const(weight),
        ..MethodPlan::new(name, weight)
    })
}

/// `METHOD.FIELD=VALUE` sets a config field (VALUE as JSON, else a string).
pub fn apply_config(methods: &mut [MethodPlan], spec: &str) -> Result<()> {
    let (path, value) = spec
        .split_once('=')
        .with_context(|| format!("--config `{spec}`: expected METHOD.FIELD=VALUE"))?;
    let (method, field) = path
        .split_once('.')
        .with_context(|| format!("--config `{spec}`: expected METHOD.FIELD=VALUE"))?;
    let value: serde_json::Value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.into()));
    let m = methods
        .iter_mut()
        .find(|m| m.method == method)
        .with_context(|| format!("--config `{spec}`: no --method `{method}` in this run"))?;
    if !m.config.is_object() {
        m.config = serde_json::json!({});
    }
    m.config[field] = value;
    Ok(())
}

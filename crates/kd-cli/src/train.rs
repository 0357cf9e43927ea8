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
    /// Synthetic data: training samples [default: 5000].
    #[arg(long, allow_negative_numbers = true)]
    pub train_size: Option<i64>,
    /// Synthetic data: number of classes (even) [default: 10].
    #[arg(long, allow_negative_numbers = true)]
    pub classes: Option<i64>,
    /// Fraction of the training set held out for validation (selects the
    /// best epoch when above 0).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Mixup of every training batch with this Beta α (timm's `--mixup`;
    /// 0: off). The teacher sees the mixed images too.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub mixup: f64,
    /// CutMix with this Beta α (timm's `--cutmix`; 0: off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub cutmix: f64,
    /// CutMix boxes with sides in `MIN,MAX` of the image's instead of
    /// from λ (timm's `--cutmix-minmax`; turns CutMix on).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub cutmix_minmax: Option<Vec<f64>>,
    /// Probability that a batch is mixed (timm's `--mixup-prob`).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub mixup_prob: f64,
    /// Probability of CutMix rather than Mixup when both are on (timm's
    /// `--mixup-switch-prob`).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub mixup_switch_prob: f64,
    /// RandomErasing of each training image with this probability (timm's
    /// `--reprob`; 0: off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub reprob: f64,
    /// What RandomErasing fills a box with: `pixel` (normal noise per
    /// pixel), `rand` (per channel) or `const` (zeros) (timm's `--remode`).
    #[arg(long, default_value = "pixel")]
    pub remode: kd_data::EraseMode,
    /// RandomErasing: at most this many boxes per image (timm's `--recount`).
    #[arg(long, default_value_t = 1)]
    pub recount: u32,
    /// timm's RandAugment of each training image after its crop and flip,
    /// as timm's `--aa` config string (e.g. `rand-m9-mstd0.5-inc1`: 2 ops,
    /// magnitude 9 with noise of std 0.5, the increasing op set); off when
    /// absent.
    #[arg(long)]
    pub aa: Option<String>,
    /// Epochs of training.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Optimiser: `sgd`, `adamw` (torch.optim.AdamW), `lamb` (timm's Lamb)
    /// or `dot` (mdistiller's Distillation-Oriented Trainer: SGD with the
    /// task and distillation losses' momenta apart).
    #[arg(long, default_value = "sgd")]
    pub optimizer: kd_engine::OptimizerKind,
    /// Learning rate (> 0) [default: 0.05 for sgd, 1e-3 for adamw and lamb].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Epochs at which the learning rate is multiplied by 0.1 (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "cosine")]
    pub milestones: Vec<usize>,
    /// Cosine learning-rate decay instead of milestones.
    #[arg(long)]
    pub cosine: bool,
    /// With --cosine: epochs of linear warm-up from --warmup-lr to --lr.
    #[arg(long, default_value_t = 0, requires = "cosine")]
    pub warmup_epochs: usize,
    /// With --cosine: the learning rate the warm-up starts from.
    #[arg(long, default_value_t = 0.0, requires = "cosine")]
    pub warmup_lr: f64,
    /// With --cosine: the floor of the decay (timm's min_lr).
    #[arg(long, default_value_t = 0.0, requires = "cosine")]
    pub min_lr: f64,
    /// Weight decay (>= 0) [default: 5e-4 for sgd, 0.01 for adamw and lamb].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// SGD momentum, in [0, 1) [default: 0.9]; dot's mean momentum.
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f64>,
    /// Nesterov momentum (sgd).
    #[arg(long)]
    pub nesterov: bool,
    /// DOT: the task loss's momentum is momentum - delta, the distillation
    /// losses' momentum + delta [default: 0.075, mdistiller's CIFAR-100].
    #[arg(long, allow_negative_numbers = true)]
    pub dot_delta: Option<f64>,
    /// AdamW and LAMB: the moments' decay rates, `BETA1,BETA2`
    /// [default: 0.9,0.999].
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 2,
        allow_negative_numbers = true
    )]
    pub betas: Option<Vec<f64>>,
    /// AdamW and LAMB: the denominator's epsilon [default: 1e-8 for adamw,
    /// 1e-6 for lamb].
    #[arg(long, allow_negative_numbers = true)]
    pub eps: Option<f64>,
    /// Weight decay on every parameter, also norm weights, biases and a
    /// ViT's pos_embed/cls_token (by default adamw and lamb spare them, as
    /// timm does; sgd decays them unless --no-decay-1d).
    #[arg(long, conflicts_with = "no_decay_1d")]
    pub decay_1d: bool,
    /// No weight decay on norm weights, biases, pos_embed, cls_token and
    /// dist_token (timm's parameter groups); the default for adamw and lamb.
    #[arg(long)]
    pub no_decay_1d: bool,
    /// Clip the gradients' global 2-norm to this before each update.
    #[arg(long, allow_negative_numbers = true)]
    pub clip_grad: Option<f64>,
    /// Keep an EMA of the trained network with this decay (timm's
    /// ModelEmaV3), evaluated each epoch, saved as `<stage>.ema.safetensors`.
    #[arg(long, allow_negative_numbers = true)]
    pub ema_decay: Option<f64>,
    /// With --ema-decay: timm's EMA warm-up (decay 1 - (1 + step)^-2/3, up
    /// to the given decay).
    #[arg(long, requires = "ema_decay")]
    pub ema_warmup: bool,
    /// Seeds; several run one after another and are summarised as mean ± std.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Where to train: CUDA when available (auto), or forced.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Forward-pass precision: fp32; bf16 on CUDA and on CPUs with bf16
    /// kernels (AVX-512 and newer); fp16 on CUDA (adds a dynamic loss
    /// scale); teacher-bf16: the frozen teacher's forward in bf16, the
    /// student's in fp32. Master weights and loss terms stay fp32.
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
    /// Run name (default derived from the models and methods); `_s<seed>`
    /// is appended to each run's folder and MLflow name.
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

/// The supervised term of the shortcut commands (`train-teacher`,
/// `distill`); recipes name their losses themselves. The only method the
/// command line names, and only as the default a flag (`--ce`) weights.
pub const LABEL_LOSS: &str = "ce";

/// `--data SPEC`; `--train-size` and `--classes` shape the synthetic set
/// and are refused with a fixed one (they would be silently ignored).
pub fn data_source(
    spec: &str,
    train_size: Option<i64>,
    classes: Option<i64>,
) -> Result<DataSource> {
    if spec != "synthetic" && (train_size.is_some() || classes.is_some()) {
        bail!(
            "--train-size and --classes shape --data synthetic only; `{spec}` has its own images and classes"
        );
    }
    let d = SyntheticConfig::default();
    Ok(match spec.split_once(':') {
        None if spec == "synthetic" => DataSource::Synthetic(SyntheticConfig {
            train_size: train_size.unwrap_or(d.train_size),
            classes: classes.unwrap_or(d.classes),
            ..d
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
    /// Where and how this command's plans run.
    pub fn exec(&self) -> crate::exec::Exec<'_> {
        crate::exec::Exec {
            out: &self.out,
            folders: self.folders,
            solo: self.solo,
            tracking_uri: self.tracking_uri.as_deref(),
            recipe: None,
            scripts: &kd_engine::NoScripts,
        }
    }

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

    fn stage(&self, name: &str, methods: Vec<MethodPlan>) -> Result<StagePlan> {
        Ok(StagePlan {
            name: name.into(),
            epochs: self.epochs,
            subject: Subject::Student,
            train: vec![kd_engine::Part::Network, kd_engine::Part::Methods],
            methods,
            optimizer: self.optimizer_plan()?,
            lr_schedule: if self.cosine {
                LrSchedule::Cosine {
                    warmup_epochs: self.warmup_epochs,
                    min_lr: self.min_lr,
                    warmup_lr: self.warmup_lr,
                }
            } else if self.milestones.is_empty() {
                LrSchedule::Constant
            } else {
                LrSchedule::Multistep {
                    milestones: self.milestones.clone(),
                    gamma: 0.1,
                }
            },
            keep_optimizer: false,
            clip_grad: self.clip_grad,
            ema: self.ema_decay.map(|decay| kd_engine::EmaPlan {
                decay,
                warmup: self.ema_warmup,
                ..Default::default()
            }),
        })
    }

    /// `--optimizer` with the flags that apply to it, the others refused.
    fn optimizer_plan(&self) -> Result<Sgd> {
        use kd_engine::OptimizerKind;
        let kind = self.optimizer;
        let base = Sgd::of(kind);
        let sgd = kind == OptimizerKind::Sgd;
        let dot = kind == OptimizerKind::Dot;
        if !(sgd || dot) && self.momentum.is_some() {
            bail!(
                "--momentum applies to --optimizer sgd or dot, not {}",
                kind.name()
            );
        }
        if !sgd && self.nesterov {
            bail!("--nesterov applies to --optimizer sgd, not {}", kind.name());
        }
        if !dot && self.dot_delta.is_some() {
            bail!(
                "--dot-delta applies to --optimizer dot, not {}",
                kind.name()
            );
        }
        if (sgd || dot) && (self.betas.is_some() || self.eps.is_some()) {
            bail!(
                "--betas and --eps apply to --optimizer adamw or lamb, not {}",
                kind.name()
            );
        }
        let betas = match self.betas.as_deref() {
            None => base.betas,
            Some(&[b1, b2]) => [b1, b2],
            Some(other) => bail!("--betas takes two numbers, BETA1,BETA2; got {other:?}"),
        };
        Ok(Sgd {
            lr: self.lr.unwrap_or(base.lr),
            momentum: self.momentum.unwrap_or(base.momentum),
            nesterov: self.nesterov,
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            betas,
            eps: self.eps.unwrap_or(base.eps),
            no_decay_1d: (base.no_decay_1d || self.no_decay_1d) && !self.decay_1d,
            delta: self.dot_delta.unwrap_or(base.delta),
            ..base
        })
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
        let data = DataPlan {
            source: self.source()?,
            batch_size: self.batch_size,
            val_fraction: self.val_fraction,
            crop_padding: self.crop_padding,
            normalize: self.normalize,
            world_size: kd_dist::world_size(),
            mixup: self.mixup_plan()?,
            random_erasing: self.erasing_plan(),
            randaugment: self
                .aa
                .as_deref()
                .map(|aa| aa.parse::<kd_data::TimmRandAugment>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("--aa: {e}"))?,
            ..Default::default()
        };
        Ok(Plan {
            name,
            seed,
            device: self.device.into(),
            data,
            student,
            teacher,
            teacher_cache: None,
            stages: vec![self.stage(stage, methods)?],
            precision: self.precision,
            channels_last: !self.no_channels_last,
            batchnorm: self.batchnorm,
            cuda_graph: self.cuda_graph,
            paper: None,
        })
    }
}

impl TrainArgs {
    /// `--mixup`, `--cutmix`, `--cutmix-minmax`, `--mixup-prob`,
    /// `--mixup-switch-prob` as timm's train.py reads them: mixing is on
    /// when an α is above 0 or a minmax is given. Values are checked with
    /// the plan.
    fn mixup_plan(&self) -> Result<Option<kd_data::Mixup>> {
        let minmax = match self.cutmix_minmax.as_deref() {
            None => None,
            Some(&[lo, hi]) => Some([lo, hi]),
            Some(other) => bail!("--cutmix-minmax takes two numbers, MIN,MAX; got {other:?}"),
        };
        if self.mixup <= 0.0 && self.cutmix <= 0.0 && minmax.is_none() {
            if self.mixup < 0.0 || self.cutmix < 0.0 {
                bail!("--mixup and --cutmix take an α >= 0 (0: off)");
            }
            return Ok(None);
        }
        Ok(Some(kd_data::Mixup {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            cutmix_minmax: minmax,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            ..Default::default()
        }))
    }

    /// `--reprob`, `--remode`, `--recount` (timm's names); off at 0.
    fn erasing_plan(&self) -> Option<kd_data::RandomErasing> {
        (self.reprob != 0.0).then(|| kd_data::RandomErasing {
            prob: self.reprob,
            mode: self.remode,
            max_count: Some(self.recount),
            ..Default::default()
        })
    }
}

/// One run per seed training `model` on the labels alone (a teacher, or
/// the baseline a distillation is compared with).
pub fn label_runs(train: &TrainArgs, name: &str, model: &ModelPlan) -> Result<Vec<Plan>> {
    seeds(train, name, |run_name, seed| {
        train.plan(
            run_name,
            model.clone(),
            None,
            "train",
            vec![MethodPlan::new(LABEL_LOSS, 1.0)],
            seed,
        )
    })
}

/// `NAME[:WEIGHT]` → a method with that weight (default 1). A method that
/// takes prefixed specs (`python:losses.py:MyLoss[:WEIGHT]`, see
/// `kd_core::Method::SPEC_PREFIXES`) gets the rest as its config field.
pub fn parse_method(registry: &kd_core::Registry, spec: &str) -> Result<MethodPlan> {
    if let Some((method, field, rest)) = registry.for_spec(spec) {
        let (source, weight) = match rest.rsplit_once(':').map(|(s, w)| (s, w.parse::<f64>())) {
            Some((s, Ok(w))) => (s, w),
            _ => (rest, 1.0),
        };
        return Ok(MethodPlan {
            config: serde_json::json!({ field: source }),
            ..MethodPlan::new(method, weight)
        });
    }
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

/// One plan per seed; the run name gets a `_s<seed>` suffix. A seed given
/// twice would name two runs alike, so it is refused here, before any plan.
pub fn seeds(
    train: &TrainArgs,
    name: &str,
    mut make: impl FnMut(String, u64) -> Result<Plan>,
) -> Result<Vec<Plan>> {
    if train.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = train.seeds.iter().find(|s| !seen.insert(**s)) {
        bail!("--seeds gives seed {dup} twice; each seed is one run (`{name}_s{dup}`)");
    }
    train
        .seeds
        .iter()
        .map(|&seed| make(format!("{name}_s{seed}"), seed))
        .collect()
}

/// `kd distill`'s method groups: `--method`'s, then each `--compare`'s,
/// labelled by their method names, each with `--config` applied where it
/// names one of its methods and the label loss at weight `ce` in front.
pub(crate) fn method_groups(
    registry: &kd_core::Registry,
    methods: &[String],
    compare: &[String],
    configs: &[String],
    ce: f64,
) -> Result<Vec<(String, Vec<kd_engine::MethodPlan>)>> {
    let specs = std::iter::once(methods.to_vec()).chain(
        compare
            .iter()
            .map(|c| c.split('+').map(str::to_string).collect()),
    );
    let mut groups = Vec::new();
    for spec in specs {
        let label = spec
            .iter()
            .map(|m| m.split(':').next().unwrap_or(m))
            .collect::<Vec<_>>()
            .join("+");
        let group = spec
            .iter()
            .map(|m| parse_method(registry, m))
            .collect::<Result<Vec<_>>>()?;
        groups.push((label, group));
    }
    for c in configs {
        let method = c.split(['.', '=']).next().unwrap_or_default();
        let mut applied = false;
        for (_, group) in groups
            .iter_mut()
            .filter(|(_, g)| g.iter().any(|m| m.method == method))
        {
            apply_config(group, c)?;
            applied = true;
        }
        if !applied {
            bail!("--config `{c}`: no --method or --compare group uses `{method}`");
        }
    }
    if ce > 0.0 {
        for (_, group) in &mut groups {
            group.insert(0, kd_engine::MethodPlan::new(LABEL_LOSS, ce));
        }
    }
    // Every default filled in, as recipes store them: `--config st.T=4`
    // (the default) and no `--config` are then the same plan on resume.
    for m in groups.iter_mut().flat_map(|(_, g)| g.iter_mut()) {
        m.config = registry
            .get(&m.method)?
            .resolve_config(std::mem::take(&mut m.config))?;
    }
    if let Some(dup) = (1..groups.len()).find(|&i| groups[..i].iter().any(|g| g.0 == groups[i].0)) {
        bail!(
            "two method groups are both named `{}`; each --method/--compare group is one run per seed, named after its methods, so compare other methods (weights and configs of one method belong in a recipe, or in separate commands with --name)",
            groups[dup].0
        );
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use kd_engine::ModelPlan;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: super::TrainArgs,
    }

    fn plan(args: &[&str]) -> anyhow::Result<kd_engine::Plan> {
        let cli = Cli::try_parse_from(std::iter::once("kd").chain(args.iter().copied()))?;
        let student = ModelPlan::new("resnet8");
        cli.train
            .plan("t".into(), student, None, "train", vec![], 0)
    }

    #[test]
    fn aa_sets_timm_randaugment_and_refuses_unknown_sections() {
        let p = plan(&["--aa", "rand-m9-mstd0.5-inc1"]).unwrap();
        assert_eq!(
            p.data.randaugment,
            Some(kd_data::TimmRandAugment::default())
        );
        assert_eq!(plan(&[]).unwrap().data.randaugment, None);
        let e = plan(&["--aa", "rand-m9-x3"]).unwrap_err().to_string();
        assert!(e.contains("--aa") && e.contains("unknown key `x`"), "{e}");
    }
}

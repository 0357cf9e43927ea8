use serde::{Serialize, de::DeserializeOwned};
use tch::{Kind, Tensor, nn};

use crate::{KdError, Progress, Result, Side, Tap, TapShapes, Taps};

/// A distillation method: a typed config, the requests it makes when built,
/// and the loss terms it returns each step.
pub trait Method: Send + Sized + 'static {
    /// Registry key used by recipes, e.g. `"vid"`.
    const NAME: &'static str;
    /// The paper, on one line.
    const SUMMARY: &'static str;
    /// Numeric config fields a recipe may schedule over training; the engine
    /// sets them through [`Method::set_scheduled`] before each step.
    const SCHEDULABLE: &'static [&'static str] = &[];
    /// Prefixes of a method spec on the command line that name this method
    /// with one config field set to the rest: `("python:", "entry")` reads
    /// `--method python:losses.py:MyLoss` as this method with
    /// `entry = "losses.py:MyLoss"`.
    const SPEC_PREFIXES: &'static [(&'static str, &'static str)] = &[];

    /// `#[serde(default, deny_unknown_fields)]`, defaults from the reference.
    type Config: DeserializeOwned + Serialize + Default;

    fn build(cfg: Self::Config, cx: &mut BuildCx) -> Result<Self>;

    /// Pushes this step's named loss terms (before the recipe's weight).
    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()>;

    /// Runs after the optimiser step, without gradient (e.g. memory banks).
    fn after_step(&mut self, _io: &StepIo) -> Result<()> {
        Ok(())
    }

    /// For an adversarial view this method requested: which rows of the batch
    /// to attack and toward which class. `None` skips the view this step.
    ///
    /// `draws` are uniforms in [0, 1), one per batch row (`[B]`, float32 on
    /// the batch's device), for any random choice made here. The engine takes
    /// them from a stream keyed by the run's seed, stage, epoch and batch, so
    /// a method that uses them instead of torch's global generator is
    /// reproducible and resumes exactly; the conformance probe feeds them
    /// from a fixture. Index them by batch row, so a row's draw does not
    /// depend on which other rows were chosen.
    fn attack_targets(
        &mut self,
        _view: ViewRef,
        _io: &StepIo,
        _draws: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    fn set_scheduled(&mut self, field: &str, _value: f64) -> Result<()> {
        Err(KdError::Plan {
            method: Self::NAME.into(),
            msg: format!(
                "field `{field}` cannot be scheduled; schedulable: {:?}",
                Self::SCHEDULABLE
            ),
        })
    }
}

/// The body of a [`Method::set_scheduled`]: sets the field named `field`
/// among `fields` (name, the config value it schedules) to `value` once
/// `check` accepts it; an unknown field is refused naming the schedulable
/// ones.
pub fn set_scheduled_field(
    method: &str,
    fields: &mut [(&str, &mut f64)],
    field: &str,
    value: f64,
    check: impl FnOnce(&str, f64) -> std::result::Result<(), String>,
) -> Result<()> {
    let plan = |msg: String| KdError::Plan {
        method: method.into(),
        msg,
    };
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    let Some((_, slot)) = fields.iter_mut().find(|(n, _)| *n == field) else {
        return Err(plan(format!(
            "field `{field}` cannot be scheduled; schedulable: {}",
            names.join(", ")
        )));
    };
    check(field, value).map_err(|m| plan(format!("scheduled {m}")))?;
    **slot = value;
    Ok(())
}

/// Object-safe face of [`Method`], what the engine holds.
pub trait DynMethod: Send {
    fn name(&self) -> &'static str;
    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()>;
    fn after_step(&mut self, io: &StepIo) -> Result<()>;
    fn attack_targets(
        &mut self,
        view: ViewRef,
        io: &StepIo,
        draws: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>>;
    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()>;
}

impl<M: Method> DynMethod for M {
    fn name(&self) -> &'static str {
        M::NAME
    }
    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        Method::losses(self, io, out)
    }
    fn after_step(&mut self, io: &StepIo) -> Result<()> {
        Method::after_step(self, io)
    }
    fn attack_targets(
        &mut self,
        view: ViewRef,
        io: &StepIo,
        draws: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Method::attack_targets(self, view, io, draws)
    }
    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        Method::set_scheduled(self, field, value)
    }
}

/// A validated feature tap of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TapRef {
    pub side: Side,
    pub tap: Tap,
}

/// Handle of a gradient tap (see [`BuildCx::input_grad`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradRef(pub usize);

/// Handle of an adversarial view (see [`BuildCx::adversarial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewRef(pub usize);

/// A gradient of the target-class logit, `d logit[y] / d wrt`.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSpec {
    pub side: Side,
    /// `None`: the input image; otherwise a feature tap of the same side.
    pub wrt: Option<Tap>,
    /// Keep the graph so the loss backpropagates through the gradient. The
    /// teacher's gradients are always detached.
    pub create_graph: bool,
}

/// The iterative targeted attack on the teacher used by adversarial views:
/// each step moves the selected images toward their attack class while the
/// teacher still predicts the true class (BSS, Heo et al. 2019).
#[derive(Debug, Clone, PartialEq)]
pub struct AttackSpec {
    pub step_alpha: f64,
    pub num_steps: usize,
    pub eps: f64,
    pub clamp: (f64, f64),
}

/// A second view of every training batch: the same samples drawn again by
/// the loader (their own crop and flip) and then augmented by `policy`;
/// the student (training, with a graph) and the teacher (frozen) are both
/// evaluated on it. Methods that do not ask for it see no change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentSpec {
    pub policy: AugmentPolicy,
}

/// Strong augmentation policies of the loader.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AugmentPolicy {
    /// FixMatch's RandAugment as MLKD's code uses it: `n` operations drawn
    /// with replacement from 14 (autocontrast, brightness, color, contrast,
    /// equalize, identity, posterize, rotate, sharpness, shear x/y,
    /// solarize, translate x/y), each at a uniformly random magnitude,
    /// then a cutout of up to half the image side.
    RandAugment { n: usize },
}

/// How the data loader draws contrast indices: column 0 is the sample itself,
/// then `k` negatives.
#[derive(Debug, Clone, PartialEq)]
pub struct ContrastSpec {
    pub k: usize,
    /// Draw negatives only from other classes (CRD's "exact" mode).
    pub other_classes: bool,
}

/// Everything the methods of a run asked of the engine, collected at build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    /// Every tap a method asked for through [`BuildCx::tap`], once each: a
    /// network may skip the work only unlisted taps need.
    pub taps: Vec<TapRef>,
    pub grads: Vec<GradSpec>,
    pub views: Vec<AttackSpec>,
    /// The augmented second view, if a method asked for one.
    pub augmented: Option<AugmentSpec>,
    pub contrast: Option<ContrastSpec>,
    pub index: bool,
    pub mutual: bool,
    pub teacher: bool,
}

impl Needs {
    /// The taps of `side` the methods asked for.
    pub fn read(&self, side: Side) -> Vec<Tap> {
        (self.taps.iter())
            .filter(|t| t.side == side)
            .map(|t| t.tap)
            .collect()
    }
}

/// What a method may ask for while it is built.
pub struct BuildCx<'a> {
    method: &'static str,
    student: &'a TapShapes,
    teacher: Option<&'a TapShapes>,
    params: nn::Path<'a>,
    needs: &'a mut Needs,
    n_data: i64,
    num_classes: i64,
    /// Whether this method asked for anything of the teacher.
    distills: bool,
}

impl<'a> BuildCx<'a> {
    pub fn new(
        method: &'static str,
        student: &'a TapShapes,
        teacher: Option<&'a TapShapes>,
        params: nn::Path<'a>,
        needs: &'a mut Needs,
        n_data: i64,
        num_classes: i64,
    ) -> Self {
        BuildCx {
            method,
            student,
            teacher,
            params,
            needs,
            n_data,
            num_classes,
            distills: false,
        }
    }

    fn uses_teacher(&mut self) {
        self.needs.teacher = true;
        self.distills = true;
    }

    /// Whether the method built asked for anything of the teacher (a tap,
    /// a gradient, an adversarial or augmented view, a peer): a
    /// distillation loss, as opposed to a task loss on the labels alone.
    /// Optimisers that treat the two apart (DOT) read it.
    pub fn distills(&self) -> bool {
        self.distills
    }

    fn shapes(&self, side: Side) -> Result<&'a TapShapes> {
        match side {
            Side::Student => Ok(self.student),
            Side::Teacher => self
                .teacher
                .ok_or_else(|| self.error("needs a teacher, and this stage has none")),
        }
    }

    /// A feature tap by name (`feat/2`, `preact/3`, `embed`, `logits`).
    pub fn tap(&mut self, side: Side, name: &str) -> Result<TapRef> {
        let tap = self
            .shapes(side)?
            .resolve(name, side)
            .map_err(|e| self.error(e.to_string()))?;
        if side == Side::Teacher {
            self.uses_teacher();
        }
        let tap = TapRef { side, tap };
        if !self.needs.taps.contains(&tap) {
            self.needs.taps.push(tap);
        }
        Ok(tap)
    }

    /// The same tap on both sides, checked to exist on both.
    pub fn tap_pair(&mut self, name: &str) -> Result<(TapRef, TapRef)> {
        Ok((
            self.tap(Side::Student, name)?,
            self.tap(Side::Teacher, name)?,
        ))
    }

    /// The same feature map on both sides, with each side's per-sample
    /// shape `[C, H, W]`; a tap that is not a map is refused by name.
    pub fn map_pair(&mut self, name: &str) -> Result<(TapRef, TapRef, [i64; 3], [i64; 3])> {
        let (s, t) = self.tap_pair(name)?;
        let (ss, ts) = (self.shape(s), self.shape(t));
        match (<[i64; 3]>::try_from(&ss[..]), <[i64; 3]>::try_from(&ts[..])) {
            (Ok(a), Ok(b)) => Ok((s, t, a, b)),
            _ => Err(self.error(format!(
                "tap `{name}` is not a feature map (student {ss:?}, teacher {ts:?})"
            ))),
        }
    }

    /// Per-sample shape of a tap (no batch dimension).
    pub fn shape(&self, tap: TapRef) -> Vec<i64> {
        self.shapes(tap.side)
            .ok()
            .and_then(|s| s.get(tap.tap))
            .map(<[i64]>::to_vec)
            .unwrap_or_default()
    }

    /// The root of this method's own modules. Names below it are the
    /// `state_dict` keys of the reference module (`regressor.0.weight`).
    pub fn params(&self) -> &nn::Path<'a> {
        &self.params
    }

    /// A saved, never-trained tensor (running statistics, memory banks).
    pub fn buffer(&self, name: &str, shape: &[i64]) -> Tensor {
        self.params.zeros_no_train(name, shape)
    }

    /// Gradient of the target-class logit w.r.t. the input image.
    pub fn input_grad(&mut self, side: Side, create_graph: bool) -> Result<GradRef> {
        self.shapes(side)?;
        Ok(self.push_grad(GradSpec {
            side,
            wrt: None,
            create_graph,
        }))
    }

    /// Gradient of the target-class logit w.r.t. a feature tap.
    pub fn tap_grad(&mut self, tap: TapRef, create_graph: bool) -> GradRef {
        self.push_grad(GradSpec {
            side: tap.side,
            wrt: Some(tap.tap),
            create_graph,
        })
    }

    fn push_grad(&mut self, spec: GradSpec) -> GradRef {
        if spec.side == Side::Teacher {
            self.uses_teacher();
        }
        if let Some(i) = self.needs.grads.iter().position(|g| *g == spec) {
            return GradRef(i);
        }
        self.needs.grads.push(spec);
        GradRef(self.needs.grads.len() - 1)
    }

    /// Adversarial samples from the teacher; both networks are evaluated on
    /// them. The method chooses rows and classes in `attack_targets`.
    pub fn adversarial(&mut self, spec: AttackSpec) -> Result<ViewRef> {
        self.shapes(Side::Teacher)?;
        self.uses_teacher();
        self.needs.views.push(spec);
        Ok(ViewRef(self.needs.views.len() - 1))
    }

    /// A second, strongly augmented view of every batch, with the
    /// teacher evaluated on it too. One per run: methods asking for the
    /// same policy share it; another policy is an error.
    pub fn augmented_view(&mut self, spec: AugmentSpec) -> Result<()> {
        self.shapes(Side::Teacher)?;
        self.uses_teacher();
        match self.needs.augmented {
            Some(have) if have != spec => Err(KdError::Plan {
                method: self.method.into(),
                msg: format!(
                    "asks for the augmented view {spec:?}, but another method of the stage asked for {have:?}; a stage has one"
                ),
            }),
            _ => {
                self.needs.augmented = Some(spec);
                Ok(())
            }
        }
    }

    /// Per-sample dataset indices in every batch.
    pub fn sample_index(&mut self) {
        self.needs.index = true;
    }

    /// Per-sample indices plus `k` contrast indices drawn by the loader.
    pub fn contrast(&mut self, spec: ContrastSpec) -> Result<()> {
        if spec.k as i64 >= self.n_data {
            return Err(self.error(format!(
                "asks for {} negatives but the data set has {} samples",
                spec.k, self.n_data
            )));
        }
        match &self.needs.contrast {
            Some(other) if *other != spec => Err(self.error(format!(
                "asks for contrast sampling {spec:?}, another method asked for {other:?}"
            ))),
            _ => {
                self.needs.index = true;
                self.needs.contrast = Some(spec);
                Ok(())
            }
        }
    }

    /// Trains the teacher too, as a peer with its own optimiser (DML).
    pub fn mutual(&mut self) -> Result<()> {
        self.shapes(Side::Teacher)?;
        self.needs.mutual = true;
        self.uses_teacher();
        Ok(())
    }

    pub fn n_data(&self) -> i64 {
        self.n_data
    }

    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// An error attributed to the method being built.
    pub fn error(&self, msg: impl Into<String>) -> KdError {
        KdError::Plan {
            method: self.method.to_string(),
            msg: msg.into(),
        }
    }
}

/// Taps of both networks on an adversarial view.
#[derive(Debug)]
pub struct ViewTaps {
    pub student: Taps,
    pub teacher: Taps,
}

/// What the engine hands a method each step.
pub struct StepIo<'a> {
    pub student: &'a Taps,
    /// Detached (a frozen teacher, or a peer in mutual learning).
    pub teacher: Option<&'a Taps>,
    pub grads: &'a [Tensor],
    pub views: &'a [Option<ViewTaps>],
    /// Both networks on the augmented view, for methods that asked for it.
    pub augmented: Option<&'a ViewTaps>,
    pub target: &'a Tensor,
    /// The labels as class distributions (`[B, classes]`, rows summing to
    /// one, unsmoothed) when the run mixes its training batches
    /// (Mixup/CutMix): row `i` is `λ·onehot(y_i) + (1-λ)·onehot(y_j)`, `j`
    /// the row mixed into it; a batch the draw left unmixed has one-hot
    /// rows (timm's targets). `None` when the run does not mix, and in
    /// evaluation. `target` keeps each row's own label.
    pub soft_target: Option<&'a Tensor>,
    pub index: Option<&'a Tensor>,
    pub contrast_index: Option<&'a Tensor>,
    pub progress: Progress,
    /// Training (BatchNorm in method modules uses batch statistics).
    pub train: bool,
}

impl StepIo<'_> {
    /// The tensor behind a tap handle. Handles are validated when built, so
    /// a missing side is an engine bug.
    pub fn tap(&self, t: TapRef) -> &Tensor {
        let taps = match t.side {
            Side::Student => self.student,
            Side::Teacher => self
                .teacher
                .expect("engine supplies the teacher to methods that requested it"),
        };
        taps.get(t.tap).expect("taps are validated at build time")
    }

    pub fn grad(&self, g: GradRef) -> &Tensor {
        &self.grads[g.0]
    }

    /// Taps on an adversarial view, `None` when nothing was attacked.
    pub fn view(&self, v: ViewRef) -> Option<&ViewTaps> {
        self.views.get(v.0).and_then(Option::as_ref)
    }

    /// The augmented view's taps; `None` outside training steps (evaluation
    /// and probes without one), where methods fall back to the batch alone.
    pub fn augmented(&self) -> Option<&ViewTaps> {
        self.augmented
    }

    pub fn target(&self) -> &Tensor {
        self.target
    }

    /// The label distribution a supervised term trains toward: the mixed
    /// labels of a mixed batch, else one-hot labels, with label smoothing
    /// `smoothing` spread uniformly over the `classes` (timm's
    /// `mixup_target`: `(1-ε)·y + ε/classes`). `[B, classes]`, float32.
    pub fn label_distribution(&self, classes: i64, smoothing: f64) -> Tensor {
        let y = match self.soft_target {
            Some(t) => t.to_kind(Kind::Float),
            None => self.target.one_hot(classes).to_kind(Kind::Float),
        };
        if smoothing > 0.0 {
            y * (1.0 - smoothing) + smoothing / classes as f64
        } else {
            y
        }
    }

    pub fn index(&self) -> &Tensor {
        self.index
            .expect("engine supplies indices to methods that requested them")
    }

    pub fn contrast_index(&self) -> &Tensor {
        self.contrast_index
            .expect("engine supplies contrast indices to methods that requested them")
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }
}

/// Named loss terms of one method in one step.
#[derive(Debug, Default)]
pub struct Losses {
    pub terms: Vec<(String, Tensor)>,
    /// Indices into `terms` of task terms on the labels alone within a
    /// method that distills (DeiT's class-token cross-entropy): an
    /// optimiser that treats the two apart (DOT) counts them as task.
    pub task_terms: Vec<usize>,
}

impl Losses {
    pub fn push(&mut self, name: impl Into<String>, value: Tensor) {
        self.terms.push((name.into(), value));
    }

    /// A term that reads only the student and the labels, in a method
    /// whose other terms read the teacher.
    pub fn push_task(&mut self, name: impl Into<String>, value: Tensor) {
        self.task_terms.push(self.terms.len());
        self.push(name, value);
    }

    /// Sum of all terms (a zero scalar when there are none).
    pub fn total(&self) -> Tensor {
        self.terms
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, tch::Device::Cpu)))
    }
}

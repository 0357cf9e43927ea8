//! The teacher's outputs computed once and replayed. A run's batches are
//! known in advance (order and augmentation are keyed by seed, stage,
//! epoch and sample), so `kd cache-teacher` writes the frozen teacher's
//! logits (all of them, or the top K with the remaining mass) and any taps
//! asked for, for every (seed, stage, epoch, step, rank) a run will train;
//! a plan with `teacher_cache` reads them and never builds the teacher.
//!
//! Layout: `manifest.json`, then one safetensors file per
//! `seed-S/stage-I/epoch-EEEE.safetensors` holding each tap's rows in the
//! order (step, rank) and their counts (`rows`, `[steps, world]`).

use std::path::{Path, PathBuf};

use kd_core::{Needs, Side, Tap, TapShapes, Taps};
use kd_data::Splits;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::nets::{Exec, Net, build_net, device, shapes_of};
use super::prepare::{probe_images, train_loader};
use super::step::count_teacher_forwards;
use crate::plan::{Plan, Precision, StagePlan, Subject};
use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result, eval};

/// The version of the layout below; a cache of another is refused.
pub const CACHE_FORMAT: u32 = 1;

/// How logits and taps are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl CacheDtype {
    fn kind(self) -> Kind {
        match self {
            CacheDtype::Fp32 => Kind::Float,
            CacheDtype::Fp16 => Kind::Half,
            CacheDtype::Bf16 => Kind::BFloat16,
        }
    }

    fn bytes(self) -> u64 {
        match self {
            CacheDtype::Fp32 => 4,
            CacheDtype::Fp16 | CacheDtype::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for CacheDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" => Ok(CacheDtype::Fp32),
            "fp16" => Ok(CacheDtype::Fp16),
            "bf16" => Ok(CacheDtype::Bf16),
            other => Err(format!(
                "unknown cache dtype `{other}`; valid: fp32, fp16, bf16"
            )),
        }
    }
}

/// What to cache, beyond what the plan fixes.
#[derive(Debug, Clone)]
pub struct CacheSpec {
    pub seeds: Vec<u64>,
    /// Stage indices whose batches to cache (each stage's loader has its
    /// own stream); a one-stage plan's is `[0]`.
    pub stages: Vec<usize>,
    pub epochs: usize,
    /// 0: every logit; K: the top K and the remaining probability mass.
    pub top_k: usize,
    pub dtype: CacheDtype,
    /// Taps besides the logits, by name (`feat/3`, `embed`).
    pub taps: Vec<String>,
}

/// What a cache holds and what it was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub kd_version: String,
    pub teacher: CachedTeacher,
    /// The plan's `data`, less its evaluation batch size: every training
    /// batch is a function of it, the seed and the stage.
    pub data: serde_json::Value,
    pub seeds: Vec<u64>,
    pub stages: Vec<usize>,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    /// Data-parallel ranks each step is split over (`data.world_size`).
    pub world: usize,
    pub classes: i64,
    pub top_k: usize,
    pub dtype: CacheDtype,
    /// Per-sample shapes of the cached taps, `logits` first.
    pub taps: Vec<(String, Vec<i64>)>,
    /// Taps the teacher gave in channels-last memory order: they are read
    /// back so, as reductions over them round by their order in memory.
    #[serde(default)]
    pub channels_last_taps: Vec<String>,
    /// How the teacher's forward ran: replay is bit-exact for a run whose
    /// teacher would have run the same way.
    pub forward: CachedForward,
    /// The teacher's test top-1 and top-5 (%), as a run reports it.
    pub teacher_test: (f64, f64),
    pub rows_per_epoch: u64,
    pub bytes_per_epoch: u64,
    /// How far the stored distribution is from the teacher's (top-K or
    /// half precision); `None` when the logits are stored exactly.
    pub approximation: Option<Approximation>,
    /// The (seed, stage, epoch) files written so far.
    pub written: Vec<Written>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedTeacher {
    pub arch: String,
    pub weights: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedForward {
    pub device: String,
    pub precision: Precision,
    pub channels_last: bool,
}

/// Mean KL(teacher ‖ stored) per sample, at temperatures 1 and 4, and its
/// largest value at temperature 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approximation {
    pub kl_t1_mean: f64,
    pub kl_t4_mean: f64,
    pub kl_t1_max: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Written {
    pub seed: u64,
    pub stage: usize,
    pub epoch: usize,
    pub rows: u64,
    pub kl_t1_sum: f64,
    pub kl_t4_sum: f64,
    pub kl_t1_max: f64,
}

fn epoch_file(dir: &Path, seed: u64, stage: usize, epoch: usize) -> PathBuf {
    dir.join(format!(
        "seed-{seed}/stage-{stage}/epoch-{epoch:04}.safetensors"
    ))
}

fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

fn cache_err(dir: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Plan(format!("teacher cache {}: {}", dir.display(), msg.into()))
}

/// The plan's data as the cache fingerprints it. The world size is the
/// launch's (a saved plan may say another): checked against the job's.
fn data_key(plan: &Plan) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(&plan.data).map_err(|e| EngineError::Plan(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.remove("eval_batch_size");
        m.remove("world_size");
    }
    Ok(v)
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = manifest_path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            cache_err(
                dir,
                format!(
                    "cannot read {} ({e}); write the cache with `kd cache-teacher`",
                    path.display()
                ),
            )
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            cache_err(
                dir,
                format!("manifest.json is not a kd cache manifest ({e})"),
            )
        })?;
        if m.format != CACHE_FORMAT {
            return Err(cache_err(
                dir,
                format!(
                    "format {} (kd {}), this kd reads format {CACHE_FORMAT}; write the cache again",
                    m.format, m.kd_version
                ),
            ));
        }
        Ok(m)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EngineError::Plan(e.to_string()))?;
        tensors::atomic_write(&manifest_path(dir), text.as_bytes())
    }

    /// Whether the stored logits differ from the teacher's.
    pub fn approximate(&self) -> bool {
        self.top_k > 0 || self.dtype != CacheDtype::Fp32
    }

    fn has(&self, seed: u64, stage: usize, epoch: usize) -> bool {
        self.written
            .iter()
            .any(|w| (w.seed, w.stage, w.epoch) == (seed, stage, epoch))
    }

    fn summarize(&mut self) {
        let rows: u64 = self.written.iter().map(|w| w.rows).sum();
        self.approximation = (self.approximate() && rows > 0).then(|| Approximation {
            kl_t1_mean: self.written.iter().map(|w| w.kl_t1_sum).sum::<f64>() / rows as f64,
            kl_t4_mean: self.written.iter().map(|w| w.kl_t4_sum).sum::<f64>() / rows as f64,
            kl_t1_max: self.written.iter().map(|w| w.kl_t1_max).fold(0.0, f64::max),
        });
    }

    /// The cached taps' shapes, as methods see the teacher's.
    pub fn shapes(&self) -> TapShapes {
        TapShapes {
            taps: self
                .taps
                .iter()
                .filter_map(|(n, s)| Tap::parse(n).map(|t| (t, s.clone())))
                .collect(),
        }
    }

    /// Refuses a plan whose teacher, data or seed the cache was not
    /// written for, naming the field that differs.
    pub fn check_plan(&self, plan: &Plan, dir: &Path) -> Result<()> {
        let Some(teacher) = plan.teacher.as_ref() else {
            return Err(cache_err(
                dir,
                "the plan has no teacher; a cache replaces a teacher's forward, name the teacher it was written from",
            ));
        };
        let Some(weights) = teacher.weights.as_ref() else {
            return Err(cache_err(
                dir,
                "the plan's teacher has no weights file; the cache is matched to the file's SHA-256",
            ));
        };
        if teacher.arch != self.teacher.arch {
            return Err(cache_err(
                dir,
                format!(
                    "written for teacher `{}`, the plan's is `{}`",
                    self.teacher.arch, teacher.arch
                ),
            ));
        }
        let sha = tensors::sha256_file(weights);
        if sha.as_deref() != Some(self.teacher.sha256.as_str()) {
            return Err(cache_err(
                dir,
                format!(
                    "teacher weights differ: written from SHA-256 {}, {} has {}",
                    self.teacher.sha256,
                    weights.display(),
                    sha.as_deref().unwrap_or("(unreadable)")
                ),
            ));
        }
        let data = data_key(plan)?;
        if data != self.data {
            let (a, b) = (self.data.as_object(), data.as_object());
            let field = a
                .zip(b)
                .and_then(|(a, b)| {
                    a.keys()
                        .chain(b.keys())
                        .find(|k| a.get(*k) != b.get(*k))
                        .map(|k| (k.clone(), a.get(k).cloned(), b.get(k).cloned()))
                })
                .map(|(k, c, r)| {
                    let show = |v: Option<serde_json::Value>| {
                        v.map_or("(absent)".into(), |v| v.to_string())
                    };
                    format!(
                        "data.{k}: {} in the cache, {} in the plan",
                        show(c),
                        show(r)
                    )
                })
                .unwrap_or_else(|| "data".into());
            return Err(cache_err(
                dir,
                format!("written for other batches: {field}"),
            ));
        }
        let world = kd_dist::world_size();
        if self.world != world {
            return Err(cache_err(
                dir,
                format!(
                    "written for {} data-parallel rank(s), this job has {world}; write it with --world {world}",
                    self.world
                ),
            ));
        }
        if !self.seeds.contains(&plan.seed) {
            return Err(cache_err(
                dir,
                format!(
                    "seed {} is not cached (seeds {:?}); write it with --seeds",
                    plan.seed, self.seeds
                ),
            ));
        }
        if plan.cuda_graph {
            return Err(cache_err(
                dir,
                "cuda_graph captures the teacher's forward with the step; drop cuda_graph",
            ));
        }
        Ok(())
    }

    /// Refuses stage `si` when it reads teacher outputs the cache does not
    /// hold, or trains past its epochs.
    pub fn check_stage(
        &self,
        dir: &Path,
        plan: &Plan,
        si: usize,
        stage: &StagePlan,
        needs: &Needs,
    ) -> Result<()> {
        if stage.subject == Subject::Teacher {
            return Err(cache_err(
                dir,
                format!(
                    "stage `{}` trains the teacher; a cached teacher is frozen",
                    stage.name
                ),
            ));
        }
        if !needs.teacher {
            return Ok(());
        }
        let refuse = |what: &str| {
            Err(cache_err(
                dir,
                format!(
                    "stage `{}` asks for {what}, which needs the teacher itself; run it without --teacher-cache",
                    stage.name
                ),
            ))
        };
        if needs.mutual {
            return refuse("a peer that trains (mutual learning)");
        }
        if needs.grads.iter().any(|g| g.side == Side::Teacher) {
            return refuse("gradient taps of the teacher");
        }
        if !needs.views.is_empty() {
            return refuse("adversarial views attacking the teacher");
        }
        if needs.augmented.is_some() {
            return refuse("the teacher on a second, strongly augmented view");
        }
        if !self.stages.contains(&si) {
            return Err(cache_err(
                dir,
                format!(
                    "stage `{}` (index {si}) is not cached (stages {:?}); write it with --stages",
                    stage.name, self.stages
                ),
            ));
        }
        if let Some(e) = (0..stage.epochs).find(|&e| !self.has(plan.seed, si, e)) {
            return Err(cache_err(
                dir,
                format!(
                    "shorter than the run: stage `{}` trains {} epochs, the cache has seed {} epoch {e} missing ({} epochs cached); write it with --epochs {} (it resumes)",
                    stage.name, stage.epochs, plan.seed, self.epochs, stage.epochs
                ),
            ));
        }
        Ok(())
    }
}

/// A cache being read by a run: one epoch's file in memory at a time.
pub(crate) struct CacheReader {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
    loaded: Option<((u64, usize, usize), EpochRows)>,
}

struct EpochRows {
    /// First row of each (step, rank), and one past the last.
    starts: Vec<i64>,
    world: usize,
    taps: Vec<(Tap, Stored)>,
}

enum Stored {
    Full(Tensor),
    /// Top-K logits, their classes and the probability mass of the rest.
    TopK {
        values: Tensor,
        indices: Tensor,
        rest: Tensor,
    },
}

impl CacheReader {
    pub(crate) fn open(dir: &Path, plan: &Plan) -> Result<CacheReader> {
        let manifest = Manifest::read(dir)?;
        manifest.check_plan(plan, dir)?;
        Ok(CacheReader {
            dir: dir.to_path_buf(),
            manifest,
            loaded: None,
        })
    }

    /// The teacher's taps for step `step` of `epoch` (this rank's rows),
    /// in fp32 on `device`.
    pub(crate) fn taps(
        &mut self,
        (seed, stage, epoch): (u64, usize, usize),
        step: usize,
        rows: i64,
        device: Device,
    ) -> Result<Taps> {
        let key = (seed, stage, epoch);
        if self.loaded.as_ref().is_none_or(|(k, _)| *k != key) {
            self.loaded = None;
            let path = epoch_file(&self.dir, seed, stage, epoch);
            self.loaded = Some((key, read_epoch(&path, &self.manifest)?));
        }
        let (_, e) = self.loaded.as_ref().expect("loaded above");
        let rank = kd_dist::group().map_or(0, |g| g.world.rank);
        let i = step * e.world + rank;
        let (start, end) = match (e.starts.get(i), e.starts.get(i + 1)) {
            (Some(&s), Some(&t)) => (s, t),
            _ => {
                return Err(cache_err(
                    &self.dir,
                    format!(
                        "epoch {epoch} holds {} steps, the run asks for step {step}",
                        (e.starts.len() - 1) / e.world
                    ),
                ));
            }
        };
        if end - start != rows {
            return Err(cache_err(
                &self.dir,
                format!(
                    "epoch {epoch} step {step} holds {} rows, the run's batch has {rows}",
                    end - start
                ),
            ));
        }
        let classes = self.manifest.classes;
        let cut = |t: &Tensor| t.narrow(0, start, rows).to_device(device);
        let layout = |tap: &Tap, t: Tensor| -> Result<Tensor> {
            let name = tap.to_string();
            match self.manifest.channels_last_taps.contains(&name) {
                true => Ok(kd_aten::channels_last(&t)?),
                false => Ok(t),
            }
        };
        let mut taps = Taps {
            feat: Vec::new(),
            preact: Vec::new(),
            embed: Tensor::new(),
            logits: Tensor::new(),
            extra: Vec::new(),
        };
        for (tap, stored) in &e.taps {
            let t = match stored {
                Stored::Full(t) => cut(t).to_kind(Kind::Float),
                Stored::TopK {
                    values,
                    indices,
                    rest,
                } => top_k_logits(&cut(values), &cut(indices), &cut(rest), classes),
            };
            place(&mut taps, *tap, layout(tap, t)?);
        }
        Ok(taps)
    }
}

fn place(taps: &mut Taps, tap: Tap, t: Tensor) {
    let at = |v: &mut Vec<Tensor>, k: usize, t: Tensor| {
        while v.len() <= k {
            v.push(Tensor::new());
        }
        v[k] = t;
    };
    match tap {
        Tap::Feat(k) => at(&mut taps.feat, k, t),
        Tap::Preact(k) => at(&mut taps.preact, k, t),
        Tap::Embed => taps.embed = t,
        Tap::Logits => taps.logits = t,
        other => taps.extra.push((other, t)),
    }
}

fn read_epoch(path: &Path, m: &Manifest) -> Result<EpochRows> {
    let file = tensors::read(path)?;
    let get = |name: &str| {
        file.get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| EngineError::Format {
                path: path.to_path_buf(),
                msg: format!("no tensor `{name}`; the file is not one of this cache's"),
            })
    };
    let rows = get("rows")?;
    let counts = Vec::<i64>::try_from(rows.reshape([-1]))?;
    let mut starts = vec![0];
    for c in counts {
        starts.push(starts.last().copied().unwrap_or(0) + c);
    }
    let mut taps = Vec::new();
    for (name, _) in &m.taps {
        let tap = Tap::parse(name).ok_or_else(|| EngineError::Format {
            path: path.to_path_buf(),
            msg: format!("unknown tap `{name}` in the manifest"),
        })?;
        let stored = if tap == Tap::Logits && m.top_k > 0 {
            Stored::TopK {
                values: get("logits.values")?,
                indices: get("logits.indices")?,
                rest: get("logits.rest")?,
            }
        } else {
            Stored::Full(get(name)?)
        };
        taps.push((tap, stored));
    }
    Ok(EpochRows {
        starts,
        world: m.world.max(1),
        taps,
    })
}

/// Logits whose softmax is the stored top-K probabilities exactly and
/// spreads the remaining mass evenly over the other classes:
/// `l_i = v_i` for the top K, `l = lse(v) + log(rest / (C - K)) -
/// log(1 - rest)` elsewhere.
fn top_k_logits(values: &Tensor, indices: &Tensor, rest: &Tensor, classes: i64) -> Tensor {
    let v = values.to_kind(Kind::Float);
    let k = v.size()[1];
    let rest = rest
        .to_kind(Kind::Float)
        .clamp(1e-30, 1.0 - 1e-7)
        .unsqueeze(1);
    let others = (classes - k).max(1) as f64;
    let fill = v.logsumexp([1], true) + (&rest / others).log() - (-&rest).log1p();
    let out = fill.expand([v.size()[0], classes], false).contiguous();
    out.scatter(1, &indices.to_kind(Kind::Int64), &v)
}

/// Writes a teacher cache for `plan`'s teacher and batches.
pub struct CacheWriter {
    plan: Plan,
    spec: CacheSpec,
    dir: PathBuf,
    exec: Exec,
    splits: Splits,
    teacher: Net,
    taps: Vec<Tap>,
    pub manifest: Manifest,
}

impl CacheWriter {
    /// Builds the teacher and the manifest; an existing cache in `dir` is
    /// continued when it was written for the same plan and spec, refused
    /// otherwise (or replaced, with `overwrite`).
    pub fn new(plan: &Plan, spec: CacheSpec, dir: &Path, overwrite: bool) -> Result<CacheWriter> {
        let t = plan
            .teacher
            .as_ref()
            .ok_or_else(|| cache_err(dir, "the plan has no teacher"))?;
        let weights = t
            .weights
            .as_ref()
            .ok_or_else(|| cache_err(dir, "the teacher has no weights file"))?;
        let sha256 = tensors::sha256_file(weights).ok_or_else(|| {
            cache_err(
                dir,
                format!("cannot read the teacher's weights {}", weights.display()),
            )
        })?;
        if spec.seeds.is_empty() || spec.stages.is_empty() || spec.epochs == 0 {
            return Err(cache_err(
                dir,
                "nothing to write: give at least one seed, one stage and one epoch",
            ));
        }
        let exec = Exec::of(plan, device(plan.device)?)?;
        let mut splits = kd_data::load(&plan.data.source, plan.data.val_fraction, 0)?;
        splits.normalize_with(&plan.data.normalize, &plan.data.source)?;
        let classes = splits.train.num_classes;
        let mut teacher = build_net(t, classes, &exec)?;
        let probe = exec.input(&probe_images(plan, &splits, exec.device)?)?;
        let shapes = shapes_of(&teacher, &probe);
        let probed = tch::no_grad(|| teacher.model.forward_taps(&probe, false));
        // As a stage that does not train it: frozen, BatchNorm folded.
        teacher.vs.freeze();
        teacher.model.fold_batchnorm(true);
        let mut taps = vec![Tap::Logits];
        for name in &spec.taps {
            let tap = shapes.resolve(name, Side::Teacher)?;
            if !taps.contains(&tap) {
                taps.push(tap);
            }
        }
        if spec.top_k as i64 >= classes {
            return Err(cache_err(
                dir,
                format!(
                    "--top-k {} is not below the {classes} classes; use 0 for every logit",
                    spec.top_k
                ),
            ));
        }
        let world = plan.data.world_size.max(1);
        let loader = train_loader(plan, &splits, 0, None, false, None, exec.device)?;
        let steps = train_loader(plan, &splits, 0, None, false, Some((0, world)), exec.device)?
            .batches_per_epoch();
        let rows = (loader.len().div_ceil(world) * world) as u64;
        let per_row: u64 = taps
            .iter()
            .map(|&tap| match tap {
                Tap::Logits if spec.top_k > 0 => spec.top_k as u64 * (spec.dtype.bytes() + 4) + 4,
                _ => {
                    shapes
                        .get(tap)
                        .map_or(0, |s| s.iter().product::<i64>() as u64)
                        * spec.dtype.bytes()
                }
            })
            .sum();
        let test = tch::no_grad(|| {
            eval::accuracy(
                teacher.model.as_ref(),
                &splits.test,
                plan.data.eval_batch_size,
                exec.device,
            )
        })?;
        let channels_last_taps = taps
            .iter()
            .filter(|&&t| {
                probed
                    .get(t)
                    .is_some_and(|x| x.dim() == 4 && kd_aten::is_channels_last(x))
            })
            .map(Tap::to_string)
            .collect();
        let mut manifest = Manifest {
            format: CACHE_FORMAT,
            kd_version: env!("CARGO_PKG_VERSION").into(),
            teacher: CachedTeacher {
                arch: t.arch.clone(),
                weights: weights.clone(),
                sha256,
            },
            data: data_key(plan)?,
            seeds: spec.seeds.clone(),
            stages: spec.stages.clone(),
            epochs: spec.epochs,
            steps_per_epoch: steps,
            world,
            classes,
            top_k: spec.top_k,
            dtype: spec.dtype,
            taps: taps
                .iter()
                .map(|&t| (t.to_string(), shapes.get(t).unwrap_or_default().to_vec()))
                .collect(),
            forward: CachedForward {
                device: format!("{:?}", exec.device),
                precision: exec.precision,
                channels_last: exec.channels_last,
            },
            teacher_test: test,
            channels_last_taps,
            rows_per_epoch: rows,
            bytes_per_epoch: rows * per_row,
            approximation: None,
            written: Vec::new(),
        };
        if manifest_path(dir).exists() {
            if overwrite {
                std::fs::remove_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
            } else {
                let old = Manifest::read(dir)?;
                // More seeds, stages or epochs extend a cache; anything
                // else makes another one.
                let same = Manifest {
                    seeds: manifest.seeds.clone(),
                    stages: manifest.stages.clone(),
                    epochs: manifest.epochs,
                    written: Vec::new(),
                    approximation: None,
                    kd_version: manifest.kd_version.clone(),
                    teacher_test: manifest.teacher_test,
                    ..old.clone()
                } == manifest;
                if !same {
                    return Err(cache_err(
                        dir,
                        "holds a cache written for another teacher, data or spec; choose another folder or overwrite it",
                    ));
                }
                for s in old.seeds {
                    if !manifest.seeds.contains(&s) {
                        manifest.seeds.push(s);
                    }
                }
                for i in old.stages {
                    if !manifest.stages.contains(&i) {
                        manifest.stages.push(i);
                    }
                }
                manifest.epochs = manifest.epochs.max(old.epochs);
                manifest.written = old.written;
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        manifest.summarize();
        manifest.write(dir)?;
        Ok(CacheWriter {
            plan: plan.clone(),
            spec,
            dir: dir.to_path_buf(),
            exec,
            splits,
            teacher,
            taps,
            manifest,
        })
    }

    /// Bytes the whole cache takes, and those still to write.
    pub fn sizes(&self) -> (u64, u64) {
        let m = &self.manifest;
        let files = (m.seeds.len() * m.stages.len() * m.epochs) as u64;
        let left = files - m.written.len() as u64;
        (files * m.bytes_per_epoch, left * m.bytes_per_epoch)
    }

    /// Writes every missing epoch file; returns the images per second of
    /// the teacher's forwards and stores (0 when nothing was left).
    pub fn write(&mut self, progress: bool) -> Result<f64> {
        let m = &self.manifest;
        let todo: Vec<(u64, usize, usize)> = m
            .seeds
            .iter()
            .flat_map(|&s| {
                m.stages
                    .iter()
                    .flat_map(move |&i| (0..m.epochs).map(move |e| (s, i, e)))
            })
            .filter(|&(s, i, e)| !m.has(s, i, e))
            .collect();
        let bar = match progress {
            true => indicatif::ProgressBar::new((todo.len() * m.steps_per_epoch) as u64),
            false => indicatif::ProgressBar::hidden(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "cache [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let started = std::time::Instant::now();
        let mut images = 0u64;
        for (seed, si, epoch) in todo {
            let w = self.write_epoch(seed, si, epoch, &bar)?;
            images += w.rows;
            self.manifest.written.push(w);
            self.manifest.summarize();
            self.manifest.write(&self.dir)?;
        }
        bar.finish_and_clear();
        Ok(images as f64 / started.elapsed().as_secs_f64().max(1e-9))
    }

    fn write_epoch(
        &self,
        seed: u64,
        si: usize,
        epoch: usize,
        bar: &indicatif::ProgressBar,
    ) -> Result<Written> {
        let plan = Plan {
            seed,
            ..self.plan.clone()
        };
        let world = self.manifest.world;
        let loaders = (0..world)
            .map(|r| {
                let shard = (world > 1).then_some((r, world));
                train_loader(
                    &plan,
                    &self.splits,
                    si,
                    None,
                    false,
                    shard,
                    self.exec.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let orders: Vec<Vec<i64>> = loaders.iter().map(|l| l.order(epoch)).collect();
        let mut parts: Vec<Vec<Tensor>> = self.taps.iter().map(|_| Vec::new()).collect();
        let mut top: [Vec<Tensor>; 3] = Default::default();
        let mut counts = Vec::new();
        let mut kl = (0.0, 0.0, 0.0f64);
        let kind = self.spec.dtype.kind();
        for b in 0..self.manifest.steps_per_epoch {
            for (l, order) in loaders.iter().zip(&orders) {
                let batch = l.batch(order, epoch, b)?;
                let x = self.exec.input(&batch.images)?;
                count_teacher_forwards(1);
                let taps = self.teacher.frozen_taps(&x, &self.exec);
                counts.push(taps.logits.size()[0]);
                for (tap, out) in self.taps.iter().zip(parts.iter_mut()) {
                    let t = taps.get(*tap).expect("resolved at build");
                    if *tap == Tap::Logits && self.spec.top_k > 0 {
                        let (v, i) = t.topk(self.spec.top_k as i64, 1, true, true);
                        let p = t.softmax(1, Kind::Float);
                        let rest = (p
                            .gather(1, &i, false)
                            .sum_dim_intlist(1, false, Kind::Float)
                            * -1.0
                            + 1.0)
                            .clamp_min(0.0);
                        let (v, i) = (v.to_kind(kind), i.to_kind(Kind::Int));
                        let back = top_k_logits(&v, &i, &rest, self.manifest.classes);
                        add_kl(&mut kl, t, &back);
                        top[0].push(v.to_device(Device::Cpu));
                        top[1].push(i.to_device(Device::Cpu));
                        top[2].push(rest.to_device(Device::Cpu));
                    } else {
                        let stored = t.to_kind(kind);
                        if *tap == Tap::Logits && self.manifest.approximate() {
                            add_kl(&mut kl, t, &stored.to_kind(Kind::Float));
                        }
                        out.push(stored.to_device(Device::Cpu).contiguous());
                    }
                }
            }
            bar.inc(1);
        }
        let mut file = TensorFile::default();
        let rows: i64 = counts.iter().sum();
        file.push(
            "rows",
            &Tensor::from_slice(&counts)
                .reshape([self.manifest.steps_per_epoch as i64, world as i64]),
        );
        for (tap, out) in self.taps.iter().zip(&parts) {
            if !out.is_empty() {
                file.push(tap.to_string(), &Tensor::cat(out, 0));
            }
        }
        if self.spec.top_k > 0 {
            for (name, list) in ["logits.values", "logits.indices", "logits.rest"]
                .iter()
                .zip(&top)
            {
                file.push(*name, &Tensor::cat(list, 0));
            }
        }
        let path = epoch_file(&self.dir, seed, si, epoch);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
        }
        tensors::write(&path, &file)?;
        Ok(Written {
            seed,
            stage: si,
            epoch,
            rows: rows as u64,
            kl_t1_sum: kl.0,
            kl_t4_sum: kl.1,
            kl_t1_max: kl.2,
        })
    }
}

/// Adds KL(softmax(t/T) ‖ softmax(s/T)) summed over rows, at T = 1 and 4,
/// and the largest row's at T = 1.
fn add_kl(acc: &mut (f64, f64, f64), teacher: &Tensor, stored: &Tensor) {
    let kl = |temp: f64| {
        let p = (teacher / temp).log_softmax(1, Kind::Double);
        let q = (stored / temp).log_softmax(1, Kind::Double);
        (p.exp() * (&p - q)).sum_dim_intlist(1, false, Kind::Double)
    };
    let k1 = kl(1.0);
    acc.0 += k1.sum(Kind::Double).double_value(&[]);
    acc.1 += kl(4.0).sum(Kind::Double).double_value(&[]);
    acc.2 = acc.2.max(k1.max().double_value(&[]));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored top K keep their probabilities and the rest its mass.
    #[test]
    fn top_k_logits_keep_the_top_probabilities_and_the_rest_mass() {
        tch::manual_seed(0);
        let logits = Tensor::randn([5, 10], (Kind::Float, Device::Cpu)) * 3.0;
        let (v, i) = logits.topk(3, 1, true, true);
        let p = logits.softmax(1, Kind::Float);
        let rest = p
            .gather(1, &i, false)
            .sum_dim_intlist(1, false, Kind::Float)
            * -1.0
            + 1.0;
        let back = top_k_logits(&v, &i, &rest, 10).softmax(1, Kind::Float);
        let top_diff = (back.gather(1, &i, false) - p.gather(1, &i, false))
            .abs()
            .max();
        assert!(top_diff.double_value(&[]) < 1e-6);
        let back_rest = back
            .gather(1, &i, false)
            .sum_dim_intlist(1, false, Kind::Float)
            * -1.0
            + 1.0;
        assert!((back_rest - &rest).abs().max().double_value(&[]) < 1e-6);
        // The other classes share the rest evenly.
        let mask = Tensor::ones([5, 10], (Kind::Bool, Device::Cpu)).scatter_value(1, &i, 0);
        let others = back.masked_select(&mask).reshape([5, 7]);
        let spread = others.max_dim(1, false).0 - others.min_dim(1, false).0;
        assert!(spread.max().double_value(&[]) < 1e-7);
    }
}

//! The manifest: what a cache holds, what it was computed from, and the
//! checks a plan must pass to read it.

use std::path::{Path, PathBuf};

use kd_core::{Needs, Side, Tap, TapShapes};
use serde::{Deserialize, Serialize};

use super::{CACHE_FORMAT, CacheDtype, cache_err, data_key, manifest_path};
use crate::plan::{Plan, Precision, StagePlan, Subject};
use crate::tensors;
use crate::{EngineError, Result};

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

    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EngineError::Plan(e.to_string()))?;
        tensors::atomic_write(&manifest_path(dir), text.as_bytes())
    }

    /// Takes over what `old` (the folder's manifest) has written, when it
    /// was written for the same teacher, data and storage: more seeds,
    /// stages or epochs extend a cache, anything else makes another one.
    pub(crate) fn continue_from(&mut self, old: Manifest, dir: &Path) -> Result<()> {
        let comparable = Manifest {
            seeds: self.seeds.clone(),
            stages: self.stages.clone(),
            epochs: self.epochs,
            written: Vec::new(),
            approximation: None,
            kd_version: self.kd_version.clone(),
            teacher_test: self.teacher_test,
            ..old.clone()
        };
        if comparable != *self {
            return Err(cache_err(
                dir,
                "holds a cache written for another teacher, data or storage; choose another folder, or pass --overwrite",
            ));
        }
        for s in old.seeds {
            if !self.seeds.contains(&s) {
                self.seeds.push(s);
            }
        }
        for i in old.stages {
            if !self.stages.contains(&i) {
                self.stages.push(i);
            }
        }
        self.epochs = self.epochs.max(old.epochs);
        self.written = old.written;
        Ok(())
    }

    /// Whether the stored logits differ from the teacher's.
    pub fn approximate(&self) -> bool {
        self.top_k > 0 || self.dtype != CacheDtype::Fp32
    }

    pub(crate) fn has(&self, seed: u64, stage: usize, epoch: usize) -> bool {
        self.written
            .iter()
            .any(|w| (w.seed, w.stage, w.epoch) == (seed, stage, epoch))
    }

    pub(crate) fn summarize(&mut self) {
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
        // Hashed once per file version in a process: the runs of a sweep
        // (and the run's own checkpoint check) share it.
        let sha = super::super::member::teacher_file_sha256(plan);
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

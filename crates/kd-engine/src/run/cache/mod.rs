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
mod manifest;
mod reader;
mod writer;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::plan::Plan;
use crate::{EngineError, Result};

pub use manifest::{Approximation, CachedForward, CachedTeacher, Manifest, Written};
pub(crate) use reader::CacheReader;
pub use writer::CacheWriter;

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

pub(crate) fn epoch_file(dir: &Path, seed: u64, stage: usize, epoch: usize) -> PathBuf {
    dir.join(format!(
        "seed-{seed}/stage-{stage}/epoch-{epoch:04}.safetensors"
    ))
}

pub(crate) fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

pub(crate) fn cache_err(dir: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Plan(format!("teacher cache {}: {}", dir.display(), msg.into()))
}

/// The plan's data as the cache fingerprints it. The world size is the
/// launch's (a saved plan may say another): checked against the job's.
pub(crate) fn data_key(plan: &Plan) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(&plan.data).map_err(|e| EngineError::Plan(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.remove("eval_batch_size");
        m.remove("world_size");
    }
    Ok(v)
}

/// Logits whose softmax is the stored top-K probabilities exactly and
/// spreads the remaining mass evenly over the other classes:
/// `l_i = v_i` for the top K, `l = lse(v) + log(rest / (C - K)) -
/// log(1 - rest)` elsewhere.
pub(crate) fn top_k_logits(
    values: &Tensor,
    indices: &Tensor,
    rest: &Tensor,
    classes: i64,
) -> Tensor {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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

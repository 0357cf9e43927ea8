//! Reading a cache back during a run: one epoch's file in memory at a time.

use std::path::{Path, PathBuf};

use kd_core::{Tap, Taps};
use tch::{Device, Kind, Tensor};

use super::{Manifest, cache_err, epoch_file, top_k_logits};
use crate::plan::Plan;
use crate::tensors;
use crate::{EngineError, Result};

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

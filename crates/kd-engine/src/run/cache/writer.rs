//! Writing a cache: the teacher's forward on every batch a run will train.

use std::path::{Path, PathBuf};

use kd_core::{Side, Tap};
use kd_data::Splits;
use tch::{Device, Kind, Tensor};

use super::super::nets::{Exec, Net, build_net, device, shapes_of};
use super::super::prepare::{probe_images, train_loader};
use super::super::step::count_teacher_forwards;
use super::{
    CACHE_FORMAT, CacheSpec, CachedForward, CachedTeacher, Manifest, Written, cache_err, data_key,
    epoch_file, manifest_path, top_k_logits,
};
use crate::plan::Plan;
use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result, eval};

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
                manifest.continue_from(Manifest::read(dir)?, dir)?;
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

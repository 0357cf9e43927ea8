//! One run of a plan, advanced a stage, an epoch and a step at a time by
//! `group`, which may drive several runs in lockstep.

use std::path::PathBuf;

use kd_core::{Progress, Registry};
use kd_data::{Batch, Splits};

use super::RunOptions;
use super::cache::CacheReader;
use super::checkpoint::{
    Carry, Restored, Resume, Snapshot, append_jsonl, restore, world_size, write_checkpoint,
};
use super::momentum::{Momentum, check_keep, hand_on};
use super::nets::{
    Exec, Net, build_nets, check_in_sync, device, named_vars, roles, sync_bn_stats, sync_from_main,
};
use super::prepare::StageCx;
use super::stage::StageRun;
use super::step::{Share, SharedTeacher, count_teacher_forwards};
use crate::observe::{EpochRecord, RunResult, StageResult};
use crate::plan::{Plan, StagePlan, Subject};
use crate::{EngineError, Result, eval};

/// Step values are read back this often when step metrics are off, to
/// notice a non-finite loss.
const READ_EVERY: usize = 50;

pub(crate) struct Member<'a, 'o> {
    pub(crate) plan: &'a Plan,
    pub(crate) opts: &'a mut RunOptions<'o>,
    pub(crate) exec: Exec,
    pub(crate) student: Net,
    pub(crate) teacher: Option<Net>,
    pub(crate) carry: Carry,
    /// Momentum buffers for a later stage that keeps the optimiser.
    pub(crate) momentum: Momentum,
    pub(crate) restored: Option<Restored>,
    pub(crate) results: Vec<StageResult>,
    pub(crate) ckpt: PathBuf,
    pub(crate) stage: Option<StageRun>,
    /// No stage of this run has trained its teacher: its taps are those of
    /// the weights it was loaded with, which other runs may share.
    pub(crate) pristine_teacher: bool,
    /// SHA-256 of the teacher's weights file: while the teacher is pristine,
    /// checkpoints leave it out and name the file's contents instead.
    teacher_sha256: Option<String>,
    /// The teacher's outputs, read from a cache (`teacher_cache`).
    cache: Option<CacheReader>,
}

impl<'a, 'o> Member<'a, 'o> {
    /// Builds the networks and, with `resume`, restores the checkpoint.
    pub(crate) fn start(
        plan: &'a Plan,
        opts: &'a mut RunOptions<'o>,
        classes: i64,
    ) -> Result<Self> {
        check_keep(&plan.stages)?;
        let cache = plan
            .teacher_cache
            .as_ref()
            .map(|dir| CacheReader::open(dir, plan))
            .transpose()?;
        let exec = Exec::of(plan, device(plan.device)?)?;
        let (student, teacher) = build_nets(plan, classes, &exec)?;
        if kd_dist::is_main() {
            std::fs::create_dir_all(&opts.run_dir)
                .map_err(|e| EngineError::io(&opts.run_dir, e))?;
        }
        let ckpt = opts.run_dir.join("checkpoint.safetensors");
        let mut restored = match opts.resume && ckpt.exists() {
            true => Some(restore(&ckpt, &student, teacher.as_ref(), exec.device)?),
            false => None,
        };
        if let Some(r) = &restored {
            let m = &r.meta;
            let fits = plan
                .stages
                .get(m.stage)
                .map_or(m.stage == plan.stages.len(), |s| m.next_epoch <= s.epochs);
            if m.world != world_size() {
                return Err(EngineError::Format {
                    path: ckpt.clone(),
                    msg: format!(
                        "written by a job of {} rank(s), resumed by {}; resume with the same number (each rank's share of the data depends on it)",
                        m.world,
                        world_size()
                    ),
                });
            }
            if !fits {
                return Err(EngineError::Format {
                    path: ckpt.clone(),
                    msg: format!(
                        "the checkpoint is at stage {}, epoch {}, which the plan does not have",
                        m.stage, m.next_epoch
                    ),
                });
            }
        }
        sync_from_main(&student.vs)?;
        if let Some(t) = &teacher {
            sync_from_main(&t.vs)?;
        }
        let pristine_teacher = restored.as_ref().is_none_or(|r| r.meta.pristine_teacher);
        let teacher_sha256 = teacher_file_sha256(plan);
        if let Some(m) = restored
            .as_ref()
            .map(|r| &r.meta)
            .filter(|m| !m.teacher_saved)
        {
            check_teacher_file(
                plan,
                m.teacher_sha256.as_deref(),
                teacher_sha256.as_deref(),
                &ckpt,
            )?;
        }
        let results = restored
            .as_ref()
            .map(|r| r.meta.finished.clone())
            .unwrap_or_default();
        let carry = restored
            .as_mut()
            .map(|r| std::mem::take(&mut r.carry))
            .unwrap_or_default();
        let momentum = restored
            .as_mut()
            .map(|r| std::mem::take(&mut r.momentum))
            .unwrap_or_default();
        Ok(Member {
            plan,
            opts,
            exec,
            student,
            teacher,
            carry,
            momentum,
            restored,
            results,
            ckpt,
            stage: None,
            pristine_teacher,
            teacher_sha256,
            cache,
        })
    }

    fn stage_plan(&self) -> &'a StagePlan {
        &self.plan.stages[self.results.len()]
    }

    fn stage_run(&mut self) -> &mut StageRun {
        self.stage.as_mut().expect("a stage is in progress")
    }

    /// Prepares the run's next stage; `teacher_eval` holds the frozen
    /// teacher's accuracy once one run of a group has measured it.
    pub(crate) fn begin_stage(
        &mut self,
        registry: &Registry,
        splits: &Splits,
        teacher_eval: &mut Option<(f64, f64)>,
    ) -> Result<()> {
        let (si, stage) = (self.results.len(), self.stage_plan());
        check_stage(stage, self.teacher.is_some())?;
        let exec = self.exec;
        let cached = self.cache.as_ref().map(|c| c.manifest.shapes());
        let cx = StageCx {
            plan: self.plan,
            si,
            registry,
            exec: &exec,
            splits,
            scripts: self.opts.scripts,
            cached_teacher: cached.as_ref(),
        };
        let run = StageRun::begin(self, &cx)?;
        if let Some(c) = &self.cache {
            c.manifest
                .check_stage(&c.dir, self.plan, si, stage, &run.prep.needs)?;
        }
        // A teacher this stage does not train (prepared folded) is evaluated
        // first, and stays shareable while no stage has trained it.
        let fixed = stage.subject == Subject::Student && !run.prep.mutual;
        if !fixed {
            self.pristine_teacher = false;
        }
        self.opts.observer.stage_start(si, &stage.name);
        if let (Some(c), true) = (&self.cache, fixed) {
            // Measured when the cache was written, as a run measures it.
            let acc = c.manifest.teacher_test;
            self.opts.observer.teacher_eval(&stage.name, acc.0, acc.1);
        } else if let (Some(t), true) = (self.teacher.as_ref(), fixed) {
            let acc = match (*teacher_eval, self.pristine_teacher) {
                (Some(acc), true) => acc,
                _ => {
                    let bs = self.plan.data.eval_batch_size;
                    count_teacher_forwards((splits.test.len() as usize).div_ceil(bs.max(1)) as u64);
                    eval::accuracy(t.model.as_ref(), &splits.test, bs, exec.device)?
                }
            };
            if self.pristine_teacher {
                *teacher_eval = Some(acc);
            }
            self.opts.observer.teacher_eval(&stage.name, acc.0, acc.1);
        }
        self.stage = Some(run);
        Ok(())
    }

    /// Whether the stage in progress trains in `epoch` (a resumed run
    /// skips the epochs it has; a shorter stage than the group's waits).
    pub(crate) fn trains_in(&self, epoch: usize) -> bool {
        let epochs = self.stage_plan().epochs;
        self.stage
            .as_ref()
            .is_some_and(|s| s.first_epoch <= epoch && epoch < epochs)
    }

    /// How this run's teacher forward can be computed once for all the
    /// runs that share it (`None`: it cannot).
    pub(crate) fn teacher_share(&self) -> Option<Share> {
        // A captured step computes its own teacher forward.
        if self.exec.graph.is_some() {
            return None;
        }
        let subject = self.stage_plan().subject;
        let stage = self.stage.as_ref()?;
        stage
            .teacher_share(subject)
            .filter(|_| self.pristine_teacher)
    }

    /// Whether the teacher's outputs come from a cache.
    pub(crate) fn reads_cache(&self) -> bool {
        self.cache.is_some()
    }

    pub(crate) fn stopped(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    pub(crate) fn begin_epoch(&mut self, epoch: usize) {
        let (stage, bar) = (self.stage_plan(), self.opts.progress_bar);
        self.stage_run().begin_epoch(epoch, stage, bar);
    }

    /// Batch `b` of the epoch in progress, its images in the layout of the
    /// networks' weights (the step's own conversion is then free).
    pub(crate) fn input_batch(&self, b: usize) -> Result<Batch> {
        let run = self.stage.as_ref().expect("a stage is in progress");
        let mut batch = run.batch(b)?;
        batch.images = self.exec.input(&batch.images)?;
        Ok(batch)
    }

    /// The frozen teacher's forward on `batch` (images already in the
    /// weights' layout, as `input_batch` gives them), as a step computes it;
    /// with `graph`, as a step that takes gradient taps of it does.
    pub(crate) fn shared_teacher(
        &mut self,
        b: usize,
        batch: &Batch,
        graph: bool,
    ) -> Result<Option<SharedTeacher>> {
        if let Some(cache) = &mut self.cache {
            let si = self.results.len();
            let run = self.stage.as_ref().expect("a stage is in progress");
            let epoch = run.epoch.as_ref().expect("an epoch is in progress").epoch;
            let rows = batch.labels.size()[0];
            let taps = cache.taps((self.plan.seed, si, epoch), b, rows, self.exec.device)?;
            return Ok(Some(SharedTeacher { taps, live: None }));
        }
        let Some(t) = &self.teacher else {
            return Ok(None);
        };
        let x = self.exec.input(&batch.images)?;
        Ok(Some(SharedTeacher::compute(t, &x, graph, &self.exec)?))
    }

    /// Step `b` of the epoch in progress; `shared`: the frozen teacher's
    /// forward on this batch, when another run of the group computed it.
    pub(crate) fn step(
        &mut self,
        b: usize,
        batch: &Batch,
        shared: Option<&SharedTeacher>,
    ) -> Result<()> {
        let stage = self.stage_plan();
        let shared = shared.filter(|_| self.pristine_teacher);
        let run = self.stage.as_mut().expect("a stage is in progress");
        let e = run.epoch.as_mut().expect("an epoch is in progress");
        let progress = Progress {
            epoch: e.epoch,
            epochs: stage.epochs,
            step: b,
            steps_per_epoch: run.steps,
            global_step: e.epoch * run.steps + b,
        };
        let lr = stage.lr_schedule.lr(stage.optimizer.lr, progress);
        let (net, other) = roles(stage.subject, &self.student, self.teacher.as_ref());
        let out = run
            .prep
            .train_step(net, other, &self.exec, batch, progress, shared, lr)?;
        if let Some(ema) = &run.ema {
            // timm's `model_ema.update(model, step=num_updates)`.
            ema.update(progress.global_step as u64 + 1)?;
        }
        e.pending.push(b, lr, out);
        e.lr = lr;
        let every = if self.opts.log_every > 0 {
            self.opts.log_every
        } else {
            READ_EVERY
        };
        if (b + 1).is_multiple_of(every) || b + 1 == run.steps {
            self.read_pending()?;
        }
        Ok(())
    }
}

impl Member<'_, '_> {
    /// Reads the pending step values back, checks them, adds them to the
    /// epoch's totals and reports the step metrics due.
    fn read_pending(&mut self) -> Result<()> {
        let log_every = self.opts.log_every;
        let run = self.stage.as_mut().expect("a stage is in progress");
        let (steps, before) = (run.steps, run.epochs_before);
        let labels: Vec<String> = run.prep.methods.iter().map(|a| a.label.clone()).collect();
        let e = run.epoch.as_mut().expect("an epoch is in progress");
        for v in e.pending.read()? {
            if let Some((term, value)) = v.non_finite() {
                let (epoch, step) = (e.epoch, v.step);
                return Err(EngineError::NonFinite {
                    term,
                    value,
                    epoch,
                    step,
                });
            }
            e.loss_sum += v.total * v.n as f64;
            e.correct += v.correct;
            e.seen += v.n;
            for (m, w) in e.weight_mean.iter_mut().zip(&v.weights) {
                *m += (w - *m) / (v.step + 1) as f64;
            }
            for (t, x) in &v.terms {
                *e.term_sum.entry(t.clone()).or_default() += x;
            }
            if log_every > 0 && (v.step % log_every == 0 || v.step + 1 == steps) {
                let global = (before as usize + e.epoch) * steps + v.step;
                let secs = v.at.duration_since(e.started).as_secs_f64().max(1e-9);
                let mut values = vec![
                    ("train/loss".to_string(), v.total),
                    ("train/lr".into(), v.lr),
                ];
                values.extend(v.terms.iter().map(|(t, x)| (format!("loss/{t}"), *x)));
                values.extend(
                    labels
                        .iter()
                        .zip(&v.weights)
                        .map(|(l, w)| (format!("weight/{l}"), *w)),
                );
                values.push(("train/images_per_sec".into(), e.seen as f64 / secs));
                self.opts.observer.metrics(global as i64, &values);
            }
            e.bar.inc(1);
        }
        let seen = e.seen.max(1) as f64;
        e.bar.set_message(format!(
            "loss {:.4} acc {:.2}%",
            e.loss_sum / seen,
            100.0 * e.correct as f64 / seen
        ));
        Ok(())
    }

    /// Test, validation and (in mutual learning) peer accuracy of the
    /// stage's network.
    fn evaluate(&self, splits: &Splits) -> Result<Accuracy> {
        let stage = self.stage_plan();
        let (net, other) = roles(stage.subject, &self.student, self.teacher.as_ref());
        let (bs, device) = (self.plan.data.eval_batch_size, self.exec.device);
        let acc = |net: &Net, data: &kd_data::Dataset| {
            eval::accuracy(net.model.as_ref(), data, bs, device)
        };
        let mutual = self.stage.as_ref().is_some_and(|s| s.prep.mutual);
        let ema = self.stage.as_ref().and_then(|s| s.ema.as_ref());
        Ok(Accuracy {
            ema: ema.map(|e| acc(&e.net, &splits.test)).transpose()?,
            test: acc(net, &splits.test)?,
            val: splits.val.as_ref().map(|v| acc(net, v)).transpose()?,
            peer_top1: other
                .filter(|_| mutual)
                .map(|t| acc(t, &splits.test).map(|a| a.0))
                .transpose()?,
        })
    }

    /// Closes the epoch: evaluation, best weights, epoch log, checkpoint.
    pub(crate) fn end_epoch(&mut self, splits: &Splits) -> Result<()> {
        self.read_pending()?;
        if let Some(run) = &self.stage {
            let (net, other) = roles(
                self.stage_plan().subject,
                &self.student,
                self.teacher.as_ref(),
            );
            // SyncBatchNorm leaves the networks' running statistics equal
            // on every rank already (the end-of-epoch check compares
            // them); method modules keep their own BatchNorms, per rank.
            if !self.exec.sync_bn {
                sync_bn_stats(&net.vs)?;
                if run.prep.mutual
                    && let Some(o) = other
                {
                    sync_bn_stats(&o.vs)?;
                }
            }
            for a in run.prep.methods.iter().chain(&run.prep.peers) {
                sync_bn_stats(&a.vs)?;
            }
            // Lerped from each rank's own running statistics.
            if let Some(e) = &run.ema {
                sync_bn_stats(&e.net.vs)?;
            }
        }
        // The steps' throughput, before the evaluation below.
        let trained = self
            .stage
            .as_ref()
            .and_then(|s| s.epoch.as_ref())
            .map_or(0.0, |e| e.started.elapsed().as_secs_f64());
        let evaluating = std::time::Instant::now();
        let acc = self.evaluate(splits)?;
        let eval_secs = evaluating.elapsed().as_secs_f64();
        let stage = self.stage_plan();
        let run = self.stage.as_mut().expect("a stage is in progress");
        let mut e = run.epoch.take().expect("an epoch is in progress");
        e.bar.finish_and_clear();
        // Throughput is this rank's; loss and accuracy are the whole job's.
        let ips = e.seen as f64 / trained.max(1e-9);
        if let Some(g) = kd_dist::group() {
            let sums = tch::Tensor::from_slice(&[e.loss_sum, e.correct as f64, e.seen as f64]);
            g.all_reduce_sum(std::slice::from_ref(&sums))?;
            let v = Vec::<f64>::try_from(&sums)?;
            (e.loss_sum, e.correct, e.seen) = (v[0], v[1] as i64, v[2] as i64);
        }
        let selector = acc.val.map(|v| v.0).unwrap_or(acc.test.0);
        if selector > run.best_top1 || run.history.is_empty() {
            run.best_top1 = selector;
            run.best_epoch = e.epoch;
            let (net, _) = roles(stage.subject, &self.student, self.teacher.as_ref());
            let best = format!("{}.best.safetensors", stage.name);
            if kd_dist::is_main() {
                net.save(&self.ckpt.with_file_name(best))?;
            }
        }
        let (seen, steps) = (e.seen.max(1) as f64, run.steps as f64);
        let labels = run.prep.methods.iter().map(|a| a.label.clone());
        let record = EpochRecord {
            epoch: e.epoch,
            lr: e.lr,
            train_loss: e.loss_sum / seen,
            train_top1: 100.0 * e.correct as f64 / seen,
            test_top1: acc.test.0,
            test_top5: acc.test.1,
            val_top1: acc.val.map(|v| v.0),
            val_top5: acc.val.map(|v| v.1),
            weights: labels.zip(e.weight_mean.iter().copied()).collect(),
            terms: e
                .term_sum
                .into_iter()
                .map(|(t, s)| (t, s / steps))
                .collect(),
            images_per_sec: ips,
            eval_secs,
            best_top1: run.best_top1,
            peer_top1: acc.peer_top1,
            ema_top1: acc.ema.map(|a| a.0),
            ema_top5: acc.ema.map(|a| a.1),
        };
        run.history.push(record.clone());
        // Data-parallel: the network and every method's state (memory banks
        // included) must be the same on all ranks.
        let (net, other) = roles(stage.subject, &self.student, self.teacher.as_ref());
        check_in_sync(&net.vs, "the network's weights")?;
        // A mutual-learning peer's running statistics are not broadcast under
        // SyncBatchNorm either: check that they agree.
        if self.exec.sync_bn
            && run.prep.mutual
            && let Some(o) = other
        {
            check_in_sync(&o.vs, "the peer network's weights")?;
        }
        for a in &run.prep.methods {
            check_in_sync(&a.vs, &format!("method `{}`'s state", a.label))?;
        }
        self.save_epoch(&record)
    }

    /// The epoch log line and the checkpoint after `record`'s epoch.
    fn save_epoch(&mut self, record: &EpochRecord) -> Result<()> {
        let stage = self.stage_plan();
        let run = self.stage.as_ref().expect("a stage is in progress");
        // Only rank 0 of a data-parallel job writes the run's files.
        let main = kd_dist::is_main();
        if main {
            append_jsonl(
                &self.ckpt.with_file_name("epochs.jsonl"),
                &stage.name,
                record,
            )?;
        }
        let teacher_saved = !self.pristine_teacher || self.teacher_sha256.is_none();
        let meta = Resume {
            stage: self.results.len(),
            next_epoch: record.epoch + 1,
            history: run.history.clone(),
            best_top1: run.best_top1,
            best_epoch: run.best_epoch,
            finished: self.results.clone(),
            world: world_size(),
            pristine_teacher: self.pristine_teacher,
            teacher_saved,
            teacher_sha256: self.teacher_sha256.clone(),
        };
        let p = &run.prep;
        let snap = Snapshot {
            student: &self.student,
            teacher: self.teacher.as_ref().filter(|_| teacher_saved),
            methods: &p.methods,
            peers: &p.peers,
            opt: Some(&p.opt),
            ema: run.ema.as_ref().map(|e| &e.net),
            carry: &self.carry,
            momentum: &self.momentum,
            meta: &meta,
        };
        if main {
            write_checkpoint(&self.ckpt, &snap)?;
        }
        let global = run.epochs_before + record.epoch as i64;
        self.opts.observer.epoch(&stage.name, global, record);
        Ok(())
    }

    /// Closes the stage: last weights, method parameters carried on, result.
    pub(crate) fn finish_stage(&mut self) -> Result<()> {
        let stage = self.stage_plan();
        let run = self.stage.take().expect("a stage is in progress");
        let (net, _) = roles(stage.subject, &self.student, self.teacher.as_ref());
        let last_path = self
            .ckpt
            .with_file_name(format!("{}.last.safetensors", stage.name));
        let best_path = self
            .ckpt
            .with_file_name(format!("{}.best.safetensors", stage.name));
        if kd_dist::is_main() {
            net.save(&last_path)?;
        }
        if let Some(e) = &run.ema {
            let path = self
                .ckpt
                .with_file_name(format!("{}.ema.safetensors", stage.name));
            if kd_dist::is_main() {
                e.net.save(&path)?;
            }
            self.opts.observer.artifact(&path);
        }
        if let Some(g) = &run.prep.graph {
            // How many steps the CUDA graph replayed, for the run's record.
            let at = (run.epochs_before + run.history.len() as i64) * run.steps as i64;
            let s = g.stats;
            let values = [
                ("captures", s.captures),
                ("replays", s.replays),
                ("eager", s.eager),
            ]
            .map(|(k, v)| (format!("stage/{}/cuda_graph_{k}", stage.name), v as f64));
            self.opts.observer.metrics(at, &values);
        }
        let next = self.plan.stages.get(self.results.len() + 1);
        hand_on(&mut self.momentum, &run.prep, stage, next);
        for a in &run.prep.methods {
            self.carry.insert(a.label.clone(), named_vars(&a.vs, ""));
        }
        for a in &run.prep.peers {
            self.carry
                .insert(format!("peer/{}", a.label), named_vars(&a.vs, ""));
        }
        let last = run
            .history
            .last()
            .cloned()
            .expect("a stage has at least one epoch");
        let result = StageResult {
            name: stage.name.clone(),
            best_top1: run.best_top1,
            best_epoch: run.best_epoch,
            last_top1: last.test_top1,
            last_top5: last.test_top5,
            epochs: run.history,
            last_weights: last_path.clone(),
            best_weights: best_path.clone(),
        };
        self.opts.observer.artifact(&last_path);
        self.opts.observer.artifact(&best_path);
        self.opts.observer.stage_end(&result);
        self.results.push(result);
        Ok(())
    }

    /// The run is complete. The checkpoint stays the last epoch's, whole
    /// (optimiser and method state included): a later `--resume` only closes
    /// the last stage again, and `--extend` can train it on.
    pub(crate) fn finish(self) -> Result<RunResult> {
        Ok(RunResult {
            name: self.plan.name.clone(),
            run_dir: self.opts.run_dir.clone(),
            stages: self.results,
        })
    }
}

/// Top-1 and top-5 (%) on the test split, and on the validation split if any.
struct Accuracy {
    test: (f64, f64),
    /// The stage's EMA network on the test split.
    ema: Option<(f64, f64)>,
    val: Option<(f64, f64)>,
    peer_top1: Option<f64>,
}

/// Refuses a stage the plan cannot run (also checked by `validate`).
fn check_stage(stage: &StagePlan, has_teacher: bool) -> Result<()> {
    let name = &stage.name;
    if stage.epochs == 0 {
        return Err(EngineError::Plan(format!("stage `{name}` has 0 epochs")));
    }
    if stage.methods.is_empty() {
        return Err(EngineError::Plan(format!("stage `{name}` has no methods")));
    }
    if stage.subject == Subject::Teacher && !has_teacher {
        return Err(EngineError::Plan(format!(
            "stage `{name}` trains the teacher, but the plan has none"
        )));
    }
    Ok(())
}

/// The SHA-256 of the plan's teacher weights file, hashed once per file
/// version (path, size, modification time) in a process: the runs of a
/// sweep share one teacher, and an earlier run of a recipe may rewrite it.
pub(crate) fn teacher_file_sha256(plan: &Plan) -> Option<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Version = (PathBuf, u64, std::time::SystemTime);
    static SEEN: OnceLock<Mutex<HashMap<Version, Option<String>>>> = OnceLock::new();
    let path = plan.teacher.as_ref()?.weights.as_ref()?;
    let meta = std::fs::metadata(path).ok()?;
    let version = (path.clone(), meta.len(), meta.modified().ok()?);
    let mut seen = SEEN.get_or_init(Default::default).lock().ok()?;
    seen.entry(version)
        .or_insert_with(|| crate::tensors::sha256_file(path))
        .clone()
}

/// A checkpoint without the teacher resumes only from the same teacher file.
fn check_teacher_file(
    plan: &Plan,
    saved: Option<&str>,
    now: Option<&str>,
    ckpt: &std::path::Path,
) -> Result<()> {
    if saved.is_some() && saved == now {
        return Ok(());
    }
    let file = plan
        .teacher
        .as_ref()
        .and_then(|t| t.weights.as_ref())
        .map_or_else(|| "(none)".into(), |w| w.display().to_string());
    Err(EngineError::Format {
        path: ckpt.to_path_buf(),
        msg: format!(
            "the checkpoint takes its teacher from {file}, whose contents changed since it was written (SHA-256 {} then, {} now); put the original file back, or start the run again with --overwrite",
            saved.unwrap_or("unknown"),
            now.unwrap_or("unreadable")
        ),
    })
}

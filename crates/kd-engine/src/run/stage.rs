//! One stage of one run, driven a step at a time: a run alone and a group
//! of runs in lockstep use the same calls.

use std::collections::BTreeMap;
use std::time::Instant;

use kd_data::{Batch, Loader};

use super::checkpoint::restore_stage;
use super::ema::EmaNet;
use super::member::Member;
use super::momentum::resume_momentum;
use super::nets::{roles, sync_from_main};
use super::pending::Pending;
use super::prepare::{Prepared, StageCx, prepare};
use super::step::{Share, teacher_share};
use crate::Result;
use crate::observe::EpochRecord;
use crate::plan::{StagePlan, Subject};

pub(crate) struct StageRun {
    pub(crate) prep: Prepared,
    loader: Loader,
    pub(crate) steps: usize,
    pub(crate) history: Vec<EpochRecord>,
    pub(crate) best_top1: f64,
    pub(crate) best_epoch: usize,
    /// The first epoch this process trains (later than 0 on resume).
    pub(crate) first_epoch: usize,
    /// Epochs of the run's earlier stages, for global epoch numbers.
    pub(crate) epochs_before: i64,
    pub(crate) epoch: Option<EpochState>,
    /// The moving average of the stage's network (`ema:` in the plan).
    pub(crate) ema: Option<EmaNet>,
}

/// The epoch in progress.
pub(crate) struct EpochState {
    pub(crate) epoch: usize,
    order: Vec<i64>,
    pub(crate) started: Instant,
    pub(crate) pending: Pending,
    pub(crate) bar: indicatif::ProgressBar,
    pub(crate) lr: f64,
    pub(crate) loss_sum: f64,
    pub(crate) correct: i64,
    pub(crate) seen: i64,
    /// Each method's mean weight over the epoch's steps so far (a running
    /// mean: a constant weight stays exactly itself, where a sum divided by
    /// the steps drifts by ulps: 0.1 over 18 steps is 0.10000000000000003).
    pub(crate) weight_mean: Vec<f64>,
    pub(crate) term_sum: BTreeMap<String, f64>,
}

impl StageRun {
    /// Prepares stage `si` of `m`, restoring it when the checkpoint stopped
    /// inside it.
    pub(crate) fn begin(m: &mut Member, cx: &StageCx) -> Result<StageRun> {
        let stage = &cx.plan.stages[cx.si];
        // Built before `prepare` seeds the stage's draws, which building
        // a network would move on.
        let ema = match &stage.ema {
            Some(plan) => {
                let arch = match stage.subject {
                    Subject::Student => Some(&cx.plan.student),
                    Subject::Teacher => cx.plan.teacher.as_ref(),
                }
                .map_or("", |m| m.arch.as_str());
                let classes = cx.splits.train.num_classes;
                Some(EmaNet::build(arch, classes, cx.exec, plan.clone())?)
            }
            None => None,
        };
        let (mut prep, loader) = prepare(cx, stage, &mut m.student, m.teacher.as_mut(), &m.carry)?;
        if stage.keep_optimizer {
            resume_momentum(&mut prep, stage.subject, &m.momentum)?;
        }
        // Only a chain of stages that keep the optimiser needs the buffers
        // again; the checkpoint need not hold them otherwise.
        if !cx
            .plan
            .stages
            .get(cx.si + 1)
            .is_some_and(|s| s.keep_optimizer)
        {
            m.momentum.clear();
        }
        let mut run = StageRun {
            steps: loader.batches_per_epoch(),
            prep,
            loader,
            history: Vec::new(),
            best_top1: f64::NEG_INFINITY,
            best_epoch: 0,
            first_epoch: 0,
            epochs_before: m.results.iter().map(|r| r.epochs.len() as i64).sum(),
            epoch: None,
            ema,
        };
        if let Some(e) = &mut run.ema {
            let (net, _) = roles(stage.subject, &m.student, m.teacher.as_ref());
            e.set(net)?;
        }
        if let Some(r) = m.restored.take() {
            if r.meta.stage == cx.si {
                let p = &mut run.prep;
                restore_stage(&r.file, &m.ckpt, &p.methods, &p.peers, &mut p.opt)?;
                if let Some(e) = &run.ema {
                    e.restore(&r.file, &m.ckpt)?;
                }
                run.history = r.meta.history.clone();
                run.best_top1 = r.meta.best_top1;
                run.best_epoch = r.meta.best_epoch;
                run.first_epoch = r.meta.next_epoch;
            } else {
                m.restored = Some(r);
            }
        }
        for a in run.prep.methods.iter().chain(&run.prep.peers) {
            sync_from_main(&a.vs)?;
        }
        Ok(run)
    }

    /// How the teacher's taps can come from a forward shared with other
    /// runs (`None`: the stage trains its teacher).
    pub(crate) fn teacher_share(&self, subject: Subject) -> Option<Share> {
        let needs = &self.prep.needs;
        let fixed = subject == Subject::Student && !self.prep.mutual && needs.teacher;
        teacher_share(fixed, needs)
    }

    pub(crate) fn batch(&self, b: usize) -> Result<Batch> {
        let e = self.epoch.as_ref().expect("an epoch is in progress");
        Ok(self.loader.batch(&e.order, e.epoch, b)?)
    }

    pub(crate) fn begin_epoch(&mut self, epoch: usize, stage: &StagePlan, bar: bool) {
        self.epoch = Some(EpochState {
            epoch,
            order: self.loader.order(epoch),
            started: Instant::now(),
            pending: Pending::default(),
            bar: progress_bar(
                bar,
                self.steps,
                &format!("{} {}/{}", stage.name, epoch + 1, stage.epochs),
            ),
            lr: 0.0,
            loss_sum: 0.0,
            correct: 0,
            seen: 0,
            weight_mean: vec![0.0; self.prep.methods.len()],
            term_sum: BTreeMap::new(),
        });
    }
}

fn progress_bar(enabled: bool, steps: usize, prefix: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

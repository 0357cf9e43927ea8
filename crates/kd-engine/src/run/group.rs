//! Runs in lockstep: plans that share their teacher, data, seed and batch
//! size see the same batches in the same order in their stage of the same
//! index, so each batch's teacher forward is computed once and handed to
//! every student of that stage (with its graph when some run takes gradient
//! taps of the teacher). Stages may differ in length and number between the
//! runs: a run waits out the epochs it does not have. A run alone is a group
//! of one, through the same code.

use kd_core::Registry;
use kd_data::Splits;

use super::RunOptions;
use super::member::Member;
use super::step::Share;
use crate::observe::RunResult;
use crate::plan::{Plan, Subject};
use crate::{EngineError, Result};

/// Plans with equal keys can run as one group. `None` for plans that gain
/// nothing from it: without a teacher loaded from a file, or whose teacher
/// is trained by a stage (their teachers would not stay equal).
pub fn lockstep_key(plan: &Plan) -> Option<String> {
    let teacher = plan.teacher.as_ref().filter(|t| t.weights.is_some())?;
    if plan.stages.iter().any(|s| s.subject == Subject::Teacher) {
        return None;
    }
    let key = serde_json::json!({
        "seed": plan.seed,
        "device": plan.device,
        "data": plan.data,
        "teacher": teacher,
        "precision": plan.precision,
        "channels_last": plan.channels_last,
        "teacher_cache": plan.teacher_cache,
    });
    Some(key.to_string())
}

/// Runs `plans` (each with its `opts`) in lockstep, one result per plan: a
/// run that fails stops alone and the others go on. Plans of one group must
/// share a [`lockstep_key`] (or be a single plan).
pub fn run_group(
    plans: &[Plan],
    registry: &Registry,
    opts: &mut [RunOptions],
) -> Result<Vec<Result<RunResult>>> {
    if plans.len() != opts.len() {
        return Err(EngineError::Plan("one set of run options per plan".into()));
    }
    if plans.len() > 1 {
        let key = lockstep_key(&plans[0]);
        if key.is_none() || plans.iter().any(|p| lockstep_key(p) != key) {
            return Err(EngineError::Plan(
                "plans run in lockstep must share teacher weights, data, seed, batch size and precision".into(),
            ));
        }
    }
    let Some(first) = plans.first() else {
        return Ok(Vec::new());
    };
    super::nets::install_collectives();
    same_plans_on_all_ranks(plans)?;
    let mut splits = kd_data::load(&first.data.source, first.data.val_fraction, 0)?;
    splits.normalize_with(&first.data.normalize, &first.data.source)?;
    let classes = splits.train.num_classes;
    let mut results: Vec<Option<Result<RunResult>>> = plans.iter().map(|_| None).collect();
    let mut live: Vec<(usize, Member)> = Vec::new();
    for (i, (plan, o)) in plans.iter().zip(opts.iter_mut()).enumerate() {
        match Member::start(plan, o, classes) {
            Ok(m) => live.push((i, m)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let stages = plans.iter().map(|p| p.stages.len()).max().unwrap_or(0);
    // The frozen teacher's accuracy, measured once for every stage of every
    // run whose teacher no stage has trained.
    let mut teacher_eval = None;
    for si in 0..stages {
        run_stage(
            si,
            &mut live,
            &mut results,
            registry,
            &splits,
            &mut teacher_eval,
        );
    }
    for (i, m) in live {
        results[i] = Some(m.finish());
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every run ends with a result"))
        .collect())
}

/// Data-parallel: every rank must train the same plans (a rank started with
/// other flags would average gradients of another model).
fn same_plans_on_all_ranks(plans: &[Plan]) -> Result<()> {
    use std::hash::{Hash, Hasher};
    let Some(g) = kd_dist::group() else {
        return Ok(());
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(plans)
        .map_err(|e| EngineError::Plan(e.to_string()))?
        .hash(&mut h);
    let mine = h.finish() as i64;
    let all = g.all_gather(&tch::Tensor::from_slice(&[mine]))?;
    let hashes: Vec<i64> = all.iter().map(|t| t.int64_value(&[0])).collect();
    if hashes.iter().any(|&x| x != mine) {
        return Err(EngineError::Plan(format!(
            "data-parallel ranks were given different plans (plan hashes by rank: {hashes:?}); start every rank with the same command"
        )));
    }
    Ok(())
}

type Live<'a, 'o> = Vec<(usize, Member<'a, 'o>)>;

/// Keeps the members for which `f` succeeds; the others end with its error.
fn each(
    live: &mut Live,
    results: &mut [Option<Result<RunResult>>],
    mut f: impl FnMut(&mut Member) -> Result<()>,
) {
    live.retain_mut(|(i, m)| match f(m) {
        Ok(()) => true,
        Err(e) => {
            results[*i] = Some(Err(e));
            false
        }
    });
}

/// Stage `si` for every member that has it ahead of it.
fn run_stage(
    si: usize,
    live: &mut Live,
    results: &mut [Option<Result<RunResult>>],
    registry: &Registry,
    splits: &Splits,
    teacher_eval: &mut Option<(f64, f64)>,
) {
    let mut in_stage: Live = Vec::new();
    let mut done: Live = Vec::new();
    for (i, m) in live.drain(..) {
        if m.results.len() == si && si < m.plan.stages.len() {
            in_stage.push((i, m))
        } else {
            done.push((i, m))
        }
    }
    each(&mut in_stage, results, |m| {
        m.begin_stage(registry, splits, teacher_eval)
    });
    let epochs = in_stage
        .iter()
        .map(|(_, m)| m.plan.stages[si].epochs)
        .max()
        .unwrap_or(0);
    let first = in_stage
        .iter()
        .filter_map(|(_, m)| m.stage.as_ref().map(|s| s.first_epoch))
        .min();
    for epoch in first.unwrap_or(epochs)..epochs {
        run_epoch(epoch, &mut in_stage, results, splits);
    }
    each(&mut in_stage, results, |m| m.finish_stage());
    live.extend(done);
    live.extend(in_stage);
    live.sort_by_key(|(i, _)| *i);
}

/// Steps between the data-parallel ranks' votes on stopping. Every rank
/// must stop at the same step (a rank still stepping would wait in the
/// gradient allreduce for a peer that left), so a signal that reached some
/// ranks stops all of them at the next vote. A vote is one allreduce of a
/// single number, a device sync under NCCL, so it is not taken every step.
const STOP_VOTE_EVERY: usize = 8;

/// Whether the runs stop before step `b`: a signal here, or, in a
/// data-parallel job, on any rank at a voting step.
fn stop_now(active: &Live, b: usize) -> std::result::Result<bool, kd_dist::DistError> {
    let here = active.iter().any(|(_, m)| m.stopped());
    match kd_dist::group() {
        None => Ok(here),
        Some(g) if b.is_multiple_of(STOP_VOTE_EVERY) => g.any(here),
        Some(_) => Ok(false),
    }
}

fn run_epoch(
    epoch: usize,
    in_stage: &mut Live,
    results: &mut [Option<Result<RunResult>>],
    splits: &Splits,
) {
    let (mut active, mut waiting): (Live, Live) =
        in_stage.drain(..).partition(|(_, m)| m.trains_in(epoch));
    active.iter_mut().for_each(|(_, m)| m.begin_epoch(epoch));
    let steps = active
        .first()
        .and_then(|(_, m)| m.stage.as_ref())
        .map_or(0, |s| s.steps);
    for b in 0..steps {
        match stop_now(&active, b) {
            Ok(false) => {}
            Ok(true) => {
                each(&mut active, results, |m| {
                    Err(EngineError::Interrupted(m.ckpt.clone()))
                });
                break;
            }
            Err(e) => {
                let msg = e.to_string();
                each(&mut active, results, |_| {
                    Err(EngineError::Plan(msg.clone()))
                });
                break;
            }
        }
        // Members share their exec (part of the lockstep key): one layout
        // conversion serves all of them.
        let batch = match active.first().map(|(_, m)| m.input_batch(b)) {
            Some(Ok(batch)) => batch,
            Some(Err(e)) => {
                let msg = format!("preparing batch {b}: {e}");
                each(&mut active, results, |_| {
                    Err(EngineError::Plan(msg.clone()))
                });
                break;
            }
            None => break,
        };
        // With its graph when any run takes gradient taps of the teacher:
        // the other runs read the same values, detached.
        let graph = active
            .iter()
            .any(|(_, m)| m.teacher_share() == Some(Share::Graph));
        // A teacher that fails here fails again, with its own error, in
        // each run's step; a cache that cannot be read fails the runs now.
        let shared = match active
            .iter_mut()
            .find(|(_, m)| m.teacher_share().is_some())
            .map(|(_, m)| m.shared_teacher(b, &batch, graph))
        {
            Some(Ok(s)) => s,
            Some(Err(e)) if active.iter().any(|(_, m)| m.reads_cache()) => {
                let msg = e.to_string();
                each(&mut active, results, |_| {
                    Err(EngineError::Plan(msg.clone()))
                });
                break;
            }
            _ => None,
        };
        each(&mut active, results, |m| {
            // Contrast indices differ between methods, and only some draw
            // the augmented view; the first view's images do not differ.
            let own = if m.stage.as_ref().is_some_and(|s| {
                s.prep.needs.contrast.is_some() || s.prep.needs.augmented.is_some()
            }) {
                Some(m.input_batch(b)?)
            } else {
                None
            };
            m.step(b, own.as_ref().unwrap_or(&batch), shared.as_ref())
        });
        if active.is_empty() {
            break;
        }
    }
    each(&mut active, results, |m| m.end_epoch(splits));
    in_stage.append(&mut waiting);
    in_stage.append(&mut active);
    in_stage.sort_by_key(|(i, _)| *i);
}

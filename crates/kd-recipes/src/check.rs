//! Checks a plan before anything trains: the engine's own validation, then
//! every script schedule evaluated at a few points of its stage, so a
//! schedule that fails or returns a non-number is caught at planning time.

use std::path::PathBuf;

use kd_core::{Progress, Registry};
use kd_engine::{Plan, Schedule, ScheduleResolver, Weight};

pub(crate) fn plan(
    plan: &Plan,
    registry: &Registry,
    scripts: &dyn ScheduleResolver,
    pending: &[PathBuf],
) -> Result<(), String> {
    // Weights an earlier run of this recipe will write do not exist yet.
    // The models built to check the plan are not the recipe's memory.
    crate::sandbox::memory::excluding(|| kd_engine::validate(plan, registry, scripts, pending))
        .map_err(|e| e.to_string())?;
    let (n_train, _) = kd_data::describe(&plan.data.source).map_err(|e| e.to_string())?;
    let n = (n_train as f64 * (1.0 - plan.data.val_fraction)).round() as usize;
    let steps = n.div_ceil(plan.data.batch_size.max(1)).max(1);
    for stage in &plan.stages {
        // Progress counts a stage's steps in a `usize`: a stage longer than
        // that could never finish, and its schedules could not be asked.
        if stage.epochs.checked_mul(steps).is_none() {
            return Err(format!(
                "stage `{}`: {} epochs of {steps} steps each are more steps than training can count",
                stage.name, stage.epochs
            ));
        }
        for m in &stage.methods {
            for (what, w) in m.weights() {
                if !matches!(w, Weight::Schedule(Schedule::Script { .. })) {
                    continue;
                }
                let fail = |e: kd_engine::EngineError| {
                    format!(
                        "stage `{}`, method `{}`, {what}: {e}",
                        stage.name,
                        m.label()
                    )
                };
                let mut f = w.compile(scripts).map_err(fail)?;
                for p in probes(stage.epochs, steps) {
                    f.value(p).map_err(fail)?;
                }
            }
        }
    }
    Ok(())
}

/// The first step, the middle and the last step of a stage.
fn probes(epochs: usize, steps_per_epoch: usize) -> [Progress; 3] {
    let at = |epoch: usize, step: usize| Progress {
        epoch,
        epochs,
        step,
        steps_per_epoch,
        global_step: epoch * steps_per_epoch + step,
    };
    [
        at(0, 0),
        at(epochs / 2, 0),
        at(epochs.saturating_sub(1), steps_per_epoch - 1),
    ]
}

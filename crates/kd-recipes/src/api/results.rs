//! What `run(...)` gives back to the script: run and stage results with
//! their accuracies, weight paths and per-epoch metrics.

use std::path::Path;

use kd_engine::{Plan, RunResult, StageResult};
use rhai::{Array, Dynamic, Engine, FuncRegistration};

use super::{Fallible, def, doc_comment};
use crate::error::user;

/// What `run(...)` returns to the script: the plan and its result, or in a
/// dry run a placeholder with zero accuracies and not-yet-written weights.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub plan: Plan,
    pub result: RunResult,
    pub dry_run: bool,
}

impl Outcome {
    pub fn last(&self) -> Option<&StageResult> {
        self.result.last()
    }
}

fn getter<T: Clone + Send + Sync + 'static, R: Clone + Send + Sync + 'static>(
    e: &mut Engine,
    ty: &str,
    name: &str,
    ret: &str,
    doc: &str,
    f: fn(&mut T) -> R,
) {
    FuncRegistration::new_getter(name)
        .with_params_info([format!("result: &mut {ty}"), ret.to_string()])
        .with_comments([doc_comment(doc)])
        .register_into_engine(e, f);
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

pub(super) fn register(e: &mut Engine) {
    e.register_type_with_name::<Outcome>("RunResult");
    e.register_type_with_name::<StageResult>("StageResult");
    e.register_fn("to_string", |o: &mut Outcome| match o.last() {
        Some(l) => format!(
            "{}: best top-1 {:.2} (epoch {}), last {:.2}",
            o.plan.name, l.best_top1, l.best_epoch, l.last_top1
        ),
        None => o.plan.name.clone(),
    });
    let r = "RunResult";
    getter(
        e,
        r,
        "name",
        "String",
        "The run's name (its folder).",
        |o: &mut Outcome| o.plan.name.clone(),
    );
    getter(e, r, "seed", "int", "The run's seed.", |o: &mut Outcome| {
        o.plan.seed as i64
    });
    getter(
        e,
        r,
        "dry_run",
        "bool",
        "True in a dry run, where every number is 0.",
        |o: &mut Outcome| o.dry_run,
    );
    getter(
        e,
        r,
        "run_dir",
        "String",
        "The run folder.",
        |o: &mut Outcome| path(&o.result.run_dir),
    );
    getter(
        e,
        r,
        "best",
        "float",
        "Best test top-1 of the last stage.",
        |o: &mut Outcome| o.last().map_or(0.0, |l| l.best_top1),
    );
    getter(
        e,
        r,
        "last",
        "float",
        "Test top-1 after the last epoch of the last stage.",
        |o: &mut Outcome| o.last().map_or(0.0, |l| l.last_top1),
    );
    getter(
        e,
        r,
        "best_weights",
        "String",
        "Weights of the last stage's network at its best epoch.",
        |o: &mut Outcome| o.last().map(|l| path(&l.best_weights)).unwrap_or_default(),
    );
    getter(
        e,
        r,
        "last_weights",
        "String",
        "Weights of the last stage's network after its last epoch.",
        |o: &mut Outcome| o.last().map(|l| path(&l.last_weights)).unwrap_or_default(),
    );
    getter(
        e,
        r,
        "stages",
        "Array",
        "Results of every stage, in order.",
        |o: &mut Outcome| {
            o.result
                .stages
                .iter()
                .cloned()
                .map(Dynamic::from)
                .collect::<Array>()
        },
    );
    def(
        e,
        "stage",
        &["result: RunResult", "name: String", "StageResult"],
        "The result of the stage called `name`.",
        |o: &mut Outcome, name: &str| -> Fallible<StageResult> {
            o.result
                .stages
                .iter()
                .find(|st| st.name == name)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        o.result.stages.iter().map(|st| st.name.as_str()).collect();
                    user(format!(
                        "run `{}` has no stage `{name}`; stages: {}",
                        o.plan.name,
                        names.join(", ")
                    ))
                })
        },
    );

    let st = "StageResult";
    getter(
        e,
        st,
        "name",
        "String",
        "The stage's name.",
        |r: &mut StageResult| r.name.clone(),
    );
    getter(
        e,
        st,
        "best",
        "float",
        "Best test top-1 (chosen on validation when there is a split).",
        |r: &mut StageResult| r.best_top1,
    );
    getter(
        e,
        st,
        "best_epoch",
        "int",
        "Epoch of the best top-1.",
        |r: &mut StageResult| r.best_epoch as i64,
    );
    getter(
        e,
        st,
        "last",
        "float",
        "Test top-1 after the last epoch.",
        |r: &mut StageResult| r.last_top1,
    );
    getter(
        e,
        st,
        "last_top5",
        "float",
        "Test top-5 after the last epoch.",
        |r: &mut StageResult| r.last_top5,
    );
    getter(
        e,
        st,
        "best_weights",
        "String",
        "Weights at the best epoch.",
        |r: &mut StageResult| path(&r.best_weights),
    );
    getter(
        e,
        st,
        "last_weights",
        "String",
        "Weights after the last epoch.",
        |r: &mut StageResult| path(&r.last_weights),
    );
    getter(
        e,
        st,
        "epochs",
        "Array",
        "Per-epoch metrics: maps with epoch, lr, train_loss, train_top1,\ntest_top1, test_top5, weights, terms, ...",
        |r: &mut StageResult| {
            r.epochs
                .iter()
                .map(|rec| rhai::serde::to_dynamic(rec).unwrap_or(Dynamic::UNIT))
                .collect::<Array>()
        },
    );
}

//! `run(...)`, its results, `summary(...)` and `param(...)`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kd_engine::{Plan, RunResult, StageResult};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FuncRegistration, Position, Variant};

use super::{Experiment, Fallible, Msg, Session, def, doc_comment};
use crate::error::user;
use crate::summary::{self, RunRecord};

/// What `run(...)` returns to the script: the plan and its result, or in a
/// dry run a placeholder with zero accuracies and not-yet-written weights.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub plan: Plan,
    pub result: RunResult,
    pub dry_run: bool,
}

impl Outcome {
    fn last(&self) -> Option<&StageResult> {
        self.result.last()
    }
}

/// The result a dry run hands back: every number 0, weight paths under a
/// `<pending:name>` folder that later plans may name.
fn placeholder(plan: &Plan) -> RunResult {
    let dir = PathBuf::from(format!("<pending:{}>", plan.name));
    let stages = plan
        .stages
        .iter()
        .map(|s| StageResult {
            name: s.name.clone(),
            epochs: Vec::new(),
            best_top1: 0.0,
            best_epoch: 0,
            last_top1: 0.0,
            last_top5: 0.0,
            last_weights: dir.join(format!("{}.last.safetensors", s.name)),
            best_weights: dir.join(format!("{}.best.safetensors", s.name)),
        })
        .collect();
    RunResult { name: plan.name.clone(), run_dir: dir, stages }
}

fn run(s: &Session, x: &Experiment) -> Fallible<Outcome> {
    let plan = x.plan().map_err(user)?;
    if s.log().plans.iter().any(|p| p.name == plan.name) {
        return Err(user(format!(
            "experiment name `{}` is used by an earlier run of this recipe; give each run its own, e.g. `.name(`{}-s${{seed}}`)`",
            plan.name, plan.name
        )));
    }
    let pending = s.log().pending.clone();
    crate::check::plan(&plan, &s.registry, &s.scripts, &pending).map_err(|e| user(format!("experiment `{}`: {e}", plan.name)))?;
    s.log().plans.push(plan.clone());
    let outcome = match &s.link {
        None => {
            let result = placeholder(&plan);
            s.log().pending.extend(result.stages.iter().flat_map(|st| [st.best_weights.clone(), st.last_weights.clone()]));
            Outcome { plan, result, dry_run: true }
        }
        Some(link) => {
            let stopped = || Box::new(EvalAltResult::ErrorTerminated(Dynamic::UNIT, Position::NONE));
            link.tx.send(Msg::Run(Box::new(plan.clone()))).map_err(|_| stopped())?;
            let reply = link.rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            // A failed run stops the recipe; `try`/`catch` cannot swallow it.
            let Ok(Some(result)) = reply else { return Err(stopped()) };
            Outcome { plan, result, dry_run: false }
        }
    };
    s.log().outcomes.push(outcome.clone());
    Ok(outcome)
}

/// Reads a `--set name=value` override, typed like the default.
fn param(s: &Session, name: &str, default: Option<Dynamic>) -> Fallible<Dynamic> {
    let mut params = s.params();
    params.read.insert(name.to_string());
    let Some(text) = params.overrides.get(name).cloned() else {
        return default.ok_or_else(|| user(format!("param `{name}` has no default; pass `--set {name}=VALUE`")));
    };
    let bad = |expected: &str| user(format!("--set {name}={text}: expected {expected}"));
    let Some(default) = default else { return Ok(expression(&text).unwrap_or_else(|| text.clone().into())) };
    if default.is_string() {
        Ok(text.into())
    } else if default.is_int() {
        text.trim().parse::<i64>().map(Dynamic::from).map_err(|_| bad("an int"))
    } else if default.is_float() {
        text.trim().parse::<f64>().map(Dynamic::from).map_err(|_| bad("a number"))
    } else if default.is_bool() {
        text.trim().parse::<bool>().map(Dynamic::from).map_err(|_| bad("true or false"))
    } else {
        match expression(&text) {
            Some(v) if v.type_id() == default.type_id() => Ok(v),
            _ => Err(bad(&format!("a Rhai literal of type {}", default.type_name()))),
        }
    }
}

/// A literal (number, string, array, map) in Rhai syntax; an engine without
/// functions cannot evaluate anything else.
fn expression(text: &str) -> Option<Dynamic> {
    Engine::new_raw().eval_expression::<Dynamic>(text).ok()
}

fn getter<T: Variant + Clone, R: Variant + Clone>(e: &mut Engine, ty: &str, name: &str, ret: &str, doc: &str, f: fn(&mut T) -> R) {
    FuncRegistration::new_getter(name).with_params_info([format!("result: &mut {ty}"), ret.to_string()]).with_comments([doc_comment(doc)]).register_into_engine(e, f);
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn records(results: &Array) -> Fallible<Vec<RunRecord>> {
    results
        .iter()
        .map(|v| {
            v.clone()
                .try_cast::<Outcome>()
                .map(|o| RunRecord { plan: o.plan, result: o.result })
                .ok_or_else(|| user(format!("summary takes an array of run results, found a {}", v.type_name())))
        })
        .collect()
}

pub(super) fn register(e: &mut Engine, s: &Arc<Session>) {
    e.register_type_with_name::<Outcome>("RunResult");
    e.register_type_with_name::<StageResult>("StageResult");
    e.register_fn("to_string", |o: &mut Outcome| match o.last() {
        Some(l) => format!("{}: best top-1 {:.2} (epoch {}), last {:.2}", o.plan.name, l.best_top1, l.best_epoch, l.last_top1),
        None => o.plan.name.clone(),
    });
    let (s1, s2, s3) = (Arc::clone(s), Arc::clone(s), Arc::clone(s));
    def(
        e,
        "run",
        &["experiment: Experiment", "RunResult"],
        "Validates the experiment and runs it (`kd run`), or records it and returns\na placeholder with zero accuracies (`kd plan`, and the check before `kd run`).",
        move |x: Experiment| run(&s1, &x),
    );
    def(
        e,
        "summary",
        &["results: Array", "String"],
        "A table of runs grouped by configuration (all but name and seed), with\nmean ± std over seeds of the best and the last top-1 of each run's last stage.",
        |results: Array| -> Fallible<String> { Ok(summary::table(&records(&results)?)) },
    );
    def(
        e,
        "param",
        &["name: String", "default: ?", "?"],
        "A value the command line can override with `--set name=value`, parsed\nto the default's type.",
        move |name: &str, default: Dynamic| param(&s2, name, Some(default)),
    );
    def(e, "param", &["name: String", "?"], "A value the command line must give with `--set name=value`.", move |name: &str| param(&s3, name, None));

    let r = "RunResult";
    getter(e, r, "name", "String", "The run's name (its folder).", |o: &mut Outcome| o.plan.name.clone());
    getter(e, r, "seed", "int", "The run's seed.", |o: &mut Outcome| o.plan.seed as i64);
    getter(e, r, "dry_run", "bool", "True in a dry run, where every number is 0.", |o: &mut Outcome| o.dry_run);
    getter(e, r, "run_dir", "String", "The run folder.", |o: &mut Outcome| path(&o.result.run_dir));
    getter(e, r, "best", "float", "Best test top-1 of the last stage.", |o: &mut Outcome| o.last().map_or(0.0, |l| l.best_top1));
    getter(e, r, "last", "float", "Test top-1 after the last epoch of the last stage.", |o: &mut Outcome| o.last().map_or(0.0, |l| l.last_top1));
    getter(e, r, "best_weights", "String", "Weights of the last stage's network at its best epoch.", |o: &mut Outcome| {
        o.last().map(|l| path(&l.best_weights)).unwrap_or_default()
    });
    getter(e, r, "last_weights", "String", "Weights of the last stage's network after its last epoch.", |o: &mut Outcome| {
        o.last().map(|l| path(&l.last_weights)).unwrap_or_default()
    });
    getter(e, r, "stages", "Array", "Results of every stage, in order.", |o: &mut Outcome| {
        o.result.stages.iter().cloned().map(Dynamic::from).collect::<Array>()
    });
    def(e, "stage", &["result: RunResult", "name: String", "StageResult"], "The result of the stage called `name`.", |o: &mut Outcome, name: &str| -> Fallible<StageResult> {
        o.result.stages.iter().find(|st| st.name == name).cloned().ok_or_else(|| {
            let names: Vec<&str> = o.result.stages.iter().map(|st| st.name.as_str()).collect();
            user(format!("run `{}` has no stage `{name}`; stages: {}", o.plan.name, names.join(", ")))
        })
    });

    let st = "StageResult";
    getter(e, st, "name", "String", "The stage's name.", |r: &mut StageResult| r.name.clone());
    getter(e, st, "best", "float", "Best test top-1 (chosen on validation when there is a split).", |r: &mut StageResult| r.best_top1);
    getter(e, st, "best_epoch", "int", "Epoch of the best top-1.", |r: &mut StageResult| r.best_epoch as i64);
    getter(e, st, "last", "float", "Test top-1 after the last epoch.", |r: &mut StageResult| r.last_top1);
    getter(e, st, "last_top5", "float", "Test top-5 after the last epoch.", |r: &mut StageResult| r.last_top5);
    getter(e, st, "best_weights", "String", "Weights at the best epoch.", |r: &mut StageResult| path(&r.best_weights));
    getter(e, st, "last_weights", "String", "Weights after the last epoch.", |r: &mut StageResult| path(&r.last_weights));
    getter(e, st, "epochs", "Array", "Per-epoch metrics: maps with epoch, lr, train_loss, train_top1,\ntest_top1, test_top5, weights, terms, ...", |r: &mut StageResult| {
        r.epochs.iter().map(|rec| rhai::serde::to_dynamic(rec).unwrap_or(Dynamic::UNIT)).collect::<Array>()
    });
}

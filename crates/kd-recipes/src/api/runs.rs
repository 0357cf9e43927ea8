//! `run(...)`, `summary(...)` and `param(...)`.

use std::path::PathBuf;
use std::sync::Arc;

use kd_engine::{Plan, RunResult, StageResult};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Position};

use super::results::Outcome;
use super::{Experiment, Fallible, Msg, Session, def};
use crate::error::user;
use crate::summary::{self, RunRecord};

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
    RunResult {
        name: plan.name.clone(),
        run_dir: dir,
        stages,
    }
}

/// Validates and records each experiment, then runs them together (or, in
/// a dry run, hands back placeholders).
fn run_many(s: &Session, xs: &[Experiment]) -> Fallible<Vec<Outcome>> {
    let mut plans: Vec<Plan> = Vec::with_capacity(xs.len());
    for x in xs {
        let plan = x.plan().map_err(user)?;
        let taken = s
            .log()
            .plans
            .iter()
            .chain(&plans)
            .any(|p| p.name == plan.name);
        if taken {
            return Err(user(format!(
                "experiment name `{}` is used by an earlier run of this recipe; give each run its own, e.g. `.name(`{}-s${{seed}}`)`",
                plan.name, plan.name
            )));
        }
        let pending = s.log().pending.clone();
        crate::check::plan(&plan, &s.registry, &s.scripts, &pending)
            .map_err(|e| user(format!("experiment `{}`: {e}", plan.name)))?;
        plans.push(plan);
    }
    s.log().plans.extend(plans.iter().cloned());
    let results: Vec<(RunResult, bool)> = match &s.link {
        None => plans.iter().map(|p| (placeholder(p), true)).collect(),
        Some(link) => {
            let stopped = || {
                Box::new(EvalAltResult::ErrorTerminated(
                    Dynamic::UNIT,
                    Position::NONE,
                ))
            };
            // Training's memory is not the recipe's.
            let reply = crate::sandbox::memory::excluding(|| {
                link.tx.send(Msg::Run(plans.clone())).ok()?;
                link.rx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv()
                    .ok()
            });
            // A failed run stops the recipe; `try`/`catch` cannot swallow it.
            let Some(reply) = reply else {
                return Err(stopped());
            };
            let results: Option<Vec<RunResult>> = reply.into_iter().collect();
            results
                .ok_or_else(stopped)?
                .into_iter()
                .map(|r| (r, false))
                .collect()
        }
    };
    let mut out = Vec::with_capacity(plans.len());
    for (plan, (result, dry_run)) in plans.into_iter().zip(results) {
        if dry_run {
            s.log().pending.extend(
                result
                    .stages
                    .iter()
                    .flat_map(|st| [st.best_weights.clone(), st.last_weights.clone()]),
            );
        }
        let outcome = Outcome {
            plan,
            result,
            dry_run,
        };
        s.log().outcomes.push(outcome.clone());
        out.push(outcome);
    }
    Ok(out)
}

fn run(s: &Session, x: &Experiment) -> Fallible<Outcome> {
    Ok(run_many(s, std::slice::from_ref(x))?.remove(0))
}

fn experiments(xs: &Array) -> Fallible<Vec<Experiment>> {
    xs.iter()
        .map(|v| {
            v.clone().try_cast::<Experiment>().ok_or_else(|| {
                user(format!(
                    "run_all takes an array of experiments, found a {}",
                    super::type_name(v)
                ))
            })
        })
        .collect()
}

/// Reads a `--set name=value` override, typed like the default.
fn param(s: &Session, name: &str, default: Option<Dynamic>) -> Fallible<Dynamic> {
    let mut params = s.params();
    params.read.insert(name.to_string());
    let Some(text) = params.overrides.get(name).cloned() else {
        return default.ok_or_else(|| {
            user(format!(
                "param `{name}` has no default; pass `--set {name}=VALUE`"
            ))
        });
    };
    let bad = |expected: &str| user(format!("--set {name}={text}: expected {expected}"));
    let Some(default) = default else {
        return Ok(expression(&text).unwrap_or_else(|| text.clone().into()));
    };
    if default.is_string() {
        Ok(text.into())
    } else if default.is_int() {
        text.trim()
            .parse::<i64>()
            .map(Dynamic::from)
            .map_err(|_| bad("an int"))
    } else if default.is_float() {
        text.trim()
            .parse::<f64>()
            .map(Dynamic::from)
            .map_err(|_| bad("a number"))
    } else if default.is_bool() {
        text.trim()
            .parse::<bool>()
            .map(Dynamic::from)
            .map_err(|_| bad("true or false"))
    } else {
        match expression(&text) {
            Some(v) if v.type_id() == default.type_id() => Ok(v),
            _ => Err(bad(&format!(
                "a Rhai literal of type {}",
                super::type_name(&default)
            ))),
        }
    }
}

/// A literal (number, string, array, map) in Rhai syntax; an engine without
/// functions cannot evaluate anything else.
fn expression(text: &str) -> Option<Dynamic> {
    Engine::new_raw().eval_expression::<Dynamic>(text).ok()
}

fn records(results: &Array) -> Fallible<Vec<RunRecord>> {
    results
        .iter()
        .map(|v| {
            v.clone()
                .try_cast::<Outcome>()
                .map(|o| RunRecord {
                    plan: o.plan,
                    result: o.result,
                })
                .ok_or_else(|| {
                    user(format!(
                        "summary takes an array of run results, found a {}",
                        super::type_name(v)
                    ))
                })
        })
        .collect()
}

pub(super) fn register(e: &mut Engine, s: &Arc<Session>) {
    super::results::register(e);
    let (s1, s2, s3, s4, s5) = (
        Arc::clone(s),
        Arc::clone(s),
        Arc::clone(s),
        Arc::clone(s),
        Arc::clone(s),
    );
    def(
        e,
        "run_all",
        &["experiments: Array", "Array"],
        "Runs several experiments together and returns their results in order. Those\nthat share teacher weights, data, seed, batch size and stage lengths train in\nlockstep: each batch's teacher forward is computed once for all of them, and\neach run's results are exactly those it gets alone.",
        move |xs: Array| -> Fallible<Array> {
            let outcomes = run_many(&s4, &experiments(&xs)?)?;
            Ok(outcomes.into_iter().map(Dynamic::from).collect())
        },
    );
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
        move |results: Array| -> Fallible<String> {
            s5.log().summarized = true;
            Ok(summary::table(&records(&results)?))
        },
    );
    def(
        e,
        "param",
        &["name: String", "default: ?", "?"],
        "A value the command line can override with `--set name=value`, parsed\nto the default's type.",
        move |name: &str, default: Dynamic| param(&s2, name, Some(default)),
    );
    def(
        e,
        "param",
        &["name: String", "?"],
        "A value the command line must give with `--set name=value`.",
        move |name: &str| param(&s3, name, None),
    );
}

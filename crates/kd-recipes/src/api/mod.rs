//! The Rhai API, one module per concern. Every builder takes its value and
//! returns a changed copy, never touching the original: a base experiment
//! can be reused in a loop without one iteration leaking into the next.

mod data;
mod experiment;
mod methods;
mod models;
mod results;
mod runs;
mod schedules;
mod stages;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use kd_core::Registry;
use kd_engine::{Plan, RunResult};
use rhai::{Dynamic, Engine, EvalAltResult, FuncRegistration, RhaiNativeFunc};

pub(crate) use experiment::Experiment;
pub(crate) use results::Outcome;
pub(crate) use schedules::register_progress;

use crate::error::user;
use crate::sandbox::Sources;
use crate::scripts::Scripts;

pub(crate) type Fallible<T> = Result<T, Box<EvalAltResult>>;

/// State shared by the API functions of one evaluation.
pub(crate) struct Session {
    pub registry: Registry,
    pub sources: Arc<Sources>,
    pub scripts: Scripts,
    pub params: Mutex<Params>,
    pub log: Mutex<Log>,
    /// Set in the real run of `execute`: where `run(...)` sends plans.
    pub link: Option<Link>,
}

impl Session {
    pub fn new(
        registry: Registry,
        sources: Arc<Sources>,
        overrides: BTreeMap<String, String>,
        link: Option<Link>,
    ) -> Session {
        Session {
            registry,
            sources,
            scripts: Scripts::new(),
            params: Mutex::new(Params {
                overrides,
                read: BTreeSet::new(),
            }),
            log: Mutex::default(),
            link,
        }
    }

    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn params(&self) -> MutexGuard<'_, Params> {
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct Params {
    pub overrides: BTreeMap<String, String>,
    pub read: BTreeSet<String>,
}

#[derive(Default)]
pub(crate) struct Log {
    pub plans: Vec<Plan>,
    pub outcomes: Vec<Outcome>,
    /// Weight paths of dry-run results: later plans may name them before
    /// any file exists.
    pub pending: Vec<PathBuf>,
    /// The script called `summary(...)`: it shows its own table.
    pub summarized: bool,
}

/// From the script thread to the runner's.
pub(crate) enum Msg {
    /// Plans to train, together (in lockstep where they can be).
    Run(Vec<Plan>),
    Done(Box<crate::Result<Log>>),
}

/// The script thread's end of the channel to the runner.
pub(crate) struct Link {
    pub tx: Sender<Msg>,
    /// One reply per plan sent; `None` for a run that failed.
    pub rx: Mutex<Receiver<Vec<Option<RunResult>>>>,
}

/// Registers the whole API for one evaluation.
pub(crate) fn register(engine: &mut Engine, session: &Arc<Session>) {
    data::register(engine);
    models::register(engine);
    schedules::register(engine);
    methods::register(engine, session);
    stages::register(engine);
    experiment::register(engine);
    runs::register(engine, session);
}

/// Registers a function with its parameter names and doc comment, which the
/// editor stub (`recipes/kd.d.rhai`) and error hints show. `params` ends
/// with the return type.
pub(crate) fn def<
    A: 'static,
    const N: usize,
    const X: bool,
    R: Clone + Send + Sync + 'static,
    const F: bool,
>(
    engine: &mut Engine,
    name: &str,
    params: &[&str],
    doc: &str,
    f: impl RhaiNativeFunc<A, N, X, R, F> + Send + Sync + 'static,
) {
    FuncRegistration::new(name)
        .with_params_info(params)
        .with_comments([doc_comment(doc)])
        .register_into_engine(engine, f);
}

/// `doc` as a Rhai doc comment, every line starting with `///`.
pub(crate) fn doc_comment(doc: &str) -> String {
    doc.lines()
        .map(|l| format!("/// {l}").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The name a script knows a value's type by: without its engine at hand,
/// Rhai names an API type by its Rust path.
pub(crate) fn type_name(v: &Dynamic) -> &'static str {
    use std::any::type_name as rust;
    let api = [
        (rust::<kd_engine::DataPlan>(), "Data"),
        (rust::<Experiment>(), "Experiment"),
        (rust::<kd_engine::MethodPlan>(), "Method"),
        (rust::<kd_engine::ModelPlan>(), "Model"),
        (rust::<Outcome>(), "RunResult"),
        (rust::<kd_engine::StageResult>(), "StageResult"),
        (rust::<kd_core::Progress>(), "Progress"),
        (rust::<kd_engine::Schedule>(), "Schedule"),
        (rust::<kd_engine::StagePlan>(), "Stage"),
    ];
    let name = v.type_name();
    api.iter()
        .find(|(r, _)| *r == name)
        .map_or(name, |(_, script)| script)
}

/// A number given as int or float.
pub(crate) fn number(v: &Dynamic, what: &str) -> Fallible<f64> {
    match (v.as_float(), v.as_int()) {
        (Ok(f), _) => Ok(f),
        (_, Ok(i)) => Ok(i as f64),
        _ => Err(user(format!(
            "{what} must be a number, got {}",
            type_name(v)
        ))),
    }
}

pub(crate) fn count(n: i64, what: &str) -> Fallible<usize> {
    usize::try_from(n).map_err(|_| user(format!("{what} must not be negative, got {n}")))
}

pub(crate) fn positive(n: i64, what: &str) -> Fallible<usize> {
    match usize::try_from(n) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(user(format!("{what} must be at least 1, got {n}"))),
    }
}

/// A Rhai value (usually an object map) as JSON, for serde-typed configs.
pub(crate) fn to_json(v: &Dynamic) -> Fallible<serde_json::Value> {
    rhai::serde::from_dynamic::<serde_json::Value>(v).map_err(|mut e| {
        e.set_position(rhai::Position::NONE);
        user(e.to_string())
    })
}

/// Deserialises a config map into `T`, refusing unknown keys by name.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(v: &Dynamic, what: &str) -> Fallible<T> {
    serde_json::from_value(to_json(v)?).map_err(|e| user(format!("{what}: {e}")))
}

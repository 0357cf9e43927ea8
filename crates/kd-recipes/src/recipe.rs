//! Loading and evaluating a recipe, in the two modes: planning (every
//! `run(...)` validated and recorded, nothing trains) and executing (a full
//! planning pass first, then the real pass handing each plan to a runner).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kd_core::Registry;
use kd_engine::{Plan, RunResult};
use rhai::{AST, Engine, Scope};

use crate::api::{self, Link, Log, Msg, Session};
use crate::error::{self, RecipeError, Result};
use crate::sandbox::{self, Imports, Sources, Watched, limits};
use crate::summary::RunRecord;

type Printer = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs one plan for real; given to [`Recipe::execute`].
pub type Runner<'a> = dyn FnMut(&Plan) -> anyhow::Result<RunResult> + 'a;

/// Trains the plans of one `run_all(...)` together (one `run(...)` gives
/// one plan); one result per plan, in order.
pub type BatchRunner<'a> = dyn FnMut(&[Plan]) -> Vec<anyhow::Result<RunResult>> + 'a;

pub struct Recipe {
    path: PathBuf,
    /// The path as messages show it, and the Rhai source name.
    id: String,
    text: Arc<str>,
    ast: AST,
    overrides: BTreeMap<String, String>,
    printer: Printer,
    /// Whether the last execution called `summary(...)`.
    summarized: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipe")
            .field("path", &self.path)
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

/// Splits a command line's `key=value`.
pub fn parse_set(arg: &str) -> Result<(String, String)> {
    let (k, v) = arg.split_once('=').ok_or_else(|| RecipeError::Override {
        key: arg.into(),
        message: "expected key=value".into(),
    })?;
    Ok((k.trim().to_string(), v.to_string()))
}

impl Recipe {
    /// Reads and compiles a recipe; a syntax error is reported here, with
    /// its line and column. `overrides` are `--set` pairs for `param(...)`.
    pub fn load(path: impl AsRef<Path>, overrides: &[(String, String)]) -> Result<Recipe> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Recipe::from_source(path, text, overrides)
    }

    /// A recipe from text; `path` places it (messages, import folders).
    pub fn from_source(
        path: impl AsRef<Path>,
        text: impl Into<String>,
        overrides: &[(String, String)],
    ) -> Result<Recipe> {
        let path = path.as_ref().to_path_buf();
        let id = path.display().to_string();
        let text: Arc<str> = text.into().into();
        let mut map = BTreeMap::new();
        for (k, v) in overrides {
            let valid = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(RecipeError::Override {
                    key: k.clone(),
                    message: "a param name is letters, digits and `_`".into(),
                });
            }
            map.insert(k.clone(), v.clone());
        }
        let mut ast = sandbox::base(limits::OPERATIONS)
            .compile(&*text)
            .map_err(|e| error::from_parse(&id, &e))?;
        ast.set_source(id.as_str());
        Ok(Recipe {
            path,
            id,
            text,
            ast,
            overrides: map,
            printer: Arc::new(|s| eprintln!("{s}")),
            summarized: Default::default(),
        })
    }

    /// Where the script's `print` goes (default: stderr).
    pub fn with_printer(mut self, printer: impl Fn(&str) + Send + Sync + 'static) -> Recipe {
        self.printer = Arc::new(printer);
        self
    }

    /// Whether the last [`Recipe::execute_batched`] printed its own table
    /// through `summary(...)`, so the caller need not print another.
    pub fn printed_summary(&self) -> bool {
        self.summarized.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every plan the recipe reaches, validated, in order; nothing trains.
    /// `run(...)` returns placeholders (zero accuracies), so a recipe that
    /// branches on results may reach other plans when executed. The
    /// script's `print`s stay silent: they would show placeholder numbers.
    pub fn plans(&self, registry: &Registry) -> Result<Vec<Plan>> {
        let log = std::thread::scope(|scope| {
            join(script_thread(scope, || {
                self.evaluate(registry, None, true)
            })?)
        })?;
        Ok(log.plans)
    }

    /// Plans the whole recipe first, so that a mistake in its last run fails
    /// before the first trains; then evaluates it again, handing each plan
    /// to `runner` (on this thread) and its result back to the script.
    pub fn execute(&self, registry: &Registry, runner: &mut Runner<'_>) -> Result<Vec<RunRecord>> {
        self.execute_batched(registry, &mut |plans| {
            plans.iter().map(&mut *runner).collect()
        })
    }

    /// As [`Recipe::execute`], handing the plans of each `run_all(...)` to
    /// `runner` at once.
    pub fn execute_batched(
        &self,
        registry: &Registry,
        runner: &mut BatchRunner<'_>,
    ) -> Result<Vec<RunRecord>> {
        std::thread::scope(|scope| {
            join(script_thread(scope, || {
                self.evaluate(registry, None, true)
            })?)
        })?;
        let mut failure = None;
        let log = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<Msg>();
            let (reply_tx, reply_rx) = mpsc::channel::<Vec<Option<RunResult>>>();
            let link = Link {
                tx: tx.clone(),
                rx: Mutex::new(reply_rx),
            };
            // The script runs on its own thread so the runner, which borrows
            // from the caller, never has to cross threads or be 'static.
            let worker = script_thread(scope, move || {
                let out = self.evaluate(registry, Some(link), false);
                let _ = tx.send(Msg::Done(Box::new(out)));
            })?;
            let out = loop {
                match rx.recv() {
                    Ok(Msg::Run(plans)) => {
                        let mut reply = Vec::with_capacity(plans.len());
                        for (plan, r) in plans.iter().zip(runner(&plans)) {
                            match r {
                                Ok(r) => reply.push(Some(r)),
                                Err(e) => {
                                    if failure.is_none() {
                                        failure = Some((plan.name.clone(), e));
                                    }
                                    reply.push(None);
                                }
                            }
                        }
                        let _ = reply_tx.send(reply);
                    }
                    Ok(Msg::Done(out)) => break *out,
                    Err(_) => {
                        break Err(RecipeError::Script {
                            file: self.id.clone(),
                            line: 0,
                            column: 0,
                            message: "the recipe thread ended early".into(),
                        });
                    }
                }
            };
            join(worker);
            out
        });
        if let Some((plan, source)) = failure {
            return Err(RecipeError::Run { plan, source });
        }
        let log = log?;
        self.summarized
            .store(log.summarized, std::sync::atomic::Ordering::Relaxed);
        Ok(log
            .outcomes
            .into_iter()
            .map(|o| RunRecord {
                plan: o.plan,
                result: o.result,
            })
            .collect())
    }

    fn evaluate(&self, registry: &Registry, link: Option<Link>, quiet: bool) -> Result<Log> {
        let _budget = sandbox::memory::activate();
        let sources = Arc::new(Sources::default());
        sources.add(&self.id, Arc::clone(&self.text), &self.ast);
        let registry =
            Registry::from_entries(registry.iter()).map_err(|e| RecipeError::Engine(e.into()))?;
        let session = Arc::new(Session::new(
            registry,
            Arc::clone(&sources),
            self.overrides.clone(),
            link,
        ));
        let watched = Watched::default();
        watched.add(&self.ast);
        let mut engine = sandbox::engine(limits::OPERATIONS, &watched);
        engine.set_module_resolver(Imports::new(&self.path, sources, watched));
        api::register(&mut engine, &session);
        let (print, debug) = (Arc::clone(&self.printer), Arc::clone(&self.printer));
        let id = self.id.clone();
        engine.on_print(move |s| {
            if !quiet {
                print(s)
            }
        });
        engine.on_debug(move |s, src, pos| {
            if !quiet {
                debug(&format!(
                    "{}:{}: {s}",
                    src.unwrap_or(&id),
                    pos.line().unwrap_or(0)
                ))
            }
        });
        let result = engine.run_ast_with_scope(&mut Scope::new(), &self.ast);
        result.map_err(|e| error::from_eval(&self.id, *e, &|name| hint(&engine, name)))?;
        let params = session.params();
        if let Some(key) = params.overrides.keys().find(|k| !params.read.contains(*k)) {
            let read: Vec<&str> = params.read.iter().map(String::as_str).collect();
            let known = if read.is_empty() {
                "it reads none".to_string()
            } else {
                format!("it reads: {}", read.join(", "))
            };
            return Err(RecipeError::Override {
                key: key.clone(),
                message: format!("the recipe has no param `{key}`; {known}"),
            });
        }
        drop(params);
        Ok(std::mem::take(&mut *session.log()))
    }
}

/// Scripts run on a thread of their own with a stack deep enough for Rhai's
/// call-depth limit, whatever thread (a test's 2 MiB one) calls in.
fn script_thread<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Result<std::thread::ScopedJoinHandle<'scope, T>> {
    std::thread::Builder::new()
        .name("kd-recipe".into())
        .stack_size(16 << 20)
        .spawn_scoped(scope, f)
        .map_err(|source| RecipeError::Read {
            path: "<recipe thread>".into(),
            source,
        })
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// For "no function matches" errors (a typo or a wrong argument type): the
/// signatures of the API's functions called `name`, or similar names.
fn hint(engine: &Engine, name: &str) -> Option<String> {
    let sigs = engine.gen_fn_signatures(false);
    let prefix = format!("{name}(");
    let same: Vec<&String> = sigs.iter().filter(|s| s.starts_with(&prefix)).collect();
    if !same.is_empty() {
        return Some(format!(
            "expected {}",
            same.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    let mut near: Vec<&str> = sigs
        .iter()
        .filter_map(|s| s.split('(').next())
        .filter(|n| !n.starts_with("get$") && edits(n, name) <= 2)
        .collect();
    near.sort_unstable();
    near.dedup();
    (!near.is_empty()).then(|| {
        format!(
            "did you mean {}?",
            near.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    })
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

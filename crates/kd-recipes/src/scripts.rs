//! Script schedules: a loss weight or method field given as a Rhai function
//! of training progress. A plan stores it as `script{function, source}`:
//! `source` is the text of the file defining the function and `function` its
//! name (for a closure, the position of its body), followed by the values a
//! closure captured, as Rhai literals: `ramp` or `closure@12:40(0.5, "x")`.
//! [`Scripts`] compiles each source once and calls the function on the
//! compiled AST without evaluating the script again, so replaying a plan
//! never re-runs a recipe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kd_core::Progress;
use kd_engine::{EngineError, ScheduleFn, ScheduleResolver};
use rhai::{AST, Array, CallFnOptions, Dynamic, Engine, Scope};

use crate::sandbox::{self, Watched};

/// Turns `script` schedules of plans into callables; pass it to
/// `kd_engine::run` and `kd_engine::validate` as their `scripts`.
pub struct Scripts {
    engine: Arc<Engine>,
    watched: Watched,
    compiled: Mutex<HashMap<String, Arc<AST>>>,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

impl Scripts {
    pub fn new() -> Scripts {
        let watched = Watched::default();
        let mut engine = sandbox::engine(sandbox::limits::SCHEDULE_OPERATIONS, &watched);
        crate::api::register_progress(&mut engine);
        Scripts {
            engine: Arc::new(engine),
            watched,
            compiled: Mutex::default(),
        }
    }

    fn compile(&self, source: &str) -> Result<Arc<AST>, EngineError> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ast) = compiled.get(source) {
            return Ok(Arc::clone(ast));
        }
        let ast = self
            .engine
            .compile(source)
            .map_err(|e| EngineError::Plan(format!("schedule source does not compile: {e}")))?;
        self.watched.add(&ast);
        let ast = Arc::new(ast);
        compiled.insert(source.to_string(), Arc::clone(&ast));
        Ok(ast)
    }

    /// Splits `name(lit, …)` into the name and the captured values.
    fn parse_function(&self, function: &str) -> Result<(String, Vec<Dynamic>), EngineError> {
        let Some((name, rest)) = function.split_once('(') else {
            return Ok((function.trim().to_string(), Vec::new()));
        };
        let args = rest.strip_suffix(')').ok_or_else(|| {
            EngineError::Plan(format!("schedule function `{function}`: missing `)`"))
        })?;
        let values = self
            .engine
            .eval_expression::<Array>(&format!("[{args}]"))
            .map_err(|e| {
                EngineError::Plan(format!(
                    "schedule function `{function}`: captured values do not parse: {e}"
                ))
            })?;
        Ok((name.trim().to_string(), values.into_iter().collect()))
    }
}

impl ScheduleResolver for Scripts {
    fn resolve(&self, function: &str, source: &str) -> kd_engine::Result<Box<dyn ScheduleFn>> {
        let ast = self.compile(source)?;
        let (stable, captured) = self.parse_function(function)?;
        let arity = captured.len() + 1;
        let name = runtime_name(&ast, &stable, arity).ok_or_else(|| {
            EngineError::Plan(format!("schedule function `{stable}` taking {arity} parameter(s) is not defined in its source"))
        })?;
        Ok(Box::new(ScriptSchedule {
            engine: Arc::clone(&self.engine),
            ast,
            name,
            captured,
            scope: Scope::new(),
        }))
    }
}

const CLOSURE: &str = "closure@";

/// How a plan names a script function: by its name, or for a closure, whose
/// Rhai name is a hash seeded anew in every process, by the position of its
/// body in the source: `closure@LINE:COLUMN`.
pub(crate) fn stable_name(ast: &AST, name: &str, arity: usize) -> Result<String, String> {
    if !name.starts_with("anon$") {
        return Ok(name.to_string());
    }
    let def = ast
        .iter_fn_def()
        .find(|f| f.name == name && f.params.len() == arity)
        .ok_or_else(|| format!("closure `{name}` not found in its source"))?;
    let pos = def.body.start_position();
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => Ok(format!("{CLOSURE}{l}:{c}")),
        _ => Err(
            "a closure without a source position cannot be stored in a plan; use a named function"
                .into(),
        ),
    }
}

/// The name in this process of the function a plan names.
fn runtime_name(ast: &AST, stable: &str, arity: usize) -> Option<String> {
    let Some(at) = stable.strip_prefix(CLOSURE) else {
        return ast
            .iter_functions()
            .any(|f| f.name == stable && f.params.len() == arity)
            .then(|| stable.to_string());
    };
    let (line, column) = at.split_once(':')?;
    let (line, column): (usize, usize) = (line.parse().ok()?, column.parse().ok()?);
    ast.iter_fn_def()
        .find(|f| {
            f.name.starts_with("anon$")
                && f.params.len() == arity
                && f.body.start_position().line() == Some(line)
                && f.body.start_position().position() == Some(column)
        })
        .map(|f| f.name.to_string())
}

struct ScriptSchedule {
    engine: Arc<Engine>,
    ast: Arc<AST>,
    name: String,
    captured: Vec<Dynamic>,
    scope: Scope<'static>,
}

impl ScheduleFn for ScriptSchedule {
    fn value(&mut self, p: Progress) -> kd_engine::Result<f64> {
        let mut args = Vec::with_capacity(self.captured.len() + 1);
        args.extend(self.captured.iter().cloned());
        args.push(Dynamic::from(p));
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let fail = |msg: String| {
            EngineError::Plan(format!(
                "schedule `{}` at epoch {}, step {}: {msg}",
                self.name, p.epoch, p.step
            ))
        };
        let out: Dynamic = self
            .engine
            .call_fn_with_options(options, &mut self.scope, &self.ast, &self.name, args)
            .map_err(|e| {
                fail(
                    sandbox::limit_message(&e, sandbox::limits::SCHEDULE_OPERATIONS)
                        .unwrap_or_else(|| e.to_string()),
                )
            })?;
        let v = match (out.as_float(), out.as_int()) {
            (Ok(f), _) => f,
            (_, Ok(i)) => i as f64,
            _ => {
                return Err(fail(format!(
                    "returned {}, not a number",
                    crate::api::type_name(&out)
                )));
            }
        };
        if !v.is_finite() {
            return Err(fail(format!("returned {v}")));
        }
        Ok(v)
    }
}

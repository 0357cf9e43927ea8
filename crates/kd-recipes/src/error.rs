use std::path::PathBuf;

use rhai::{EvalAltResult, ParseError, Position};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RecipeError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A mistake in a recipe (syntax, unknown function, wrong argument type,
    /// unknown method, config field or model, a plan that does not validate),
    /// located in the file that holds it. `line` and `column` are 1-based; 0
    /// when Rhai gives no position.
    #[error("{}", located(file, *line, *column, message))]
    Script {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A `--set key=value` that is malformed or names no `param` of the recipe.
    #[error("--set {key}: {message}")]
    Override { key: String, message: String },
    /// The runner failed on a plan; nothing after it ran.
    #[error("run `{plan}`: {source:#}")]
    Run { plan: String, source: anyhow::Error },
    /// A saved plan that does not validate.
    #[error("plan `{plan}`: {message}")]
    Invalid { plan: String, message: String },
    #[error("{origin}: {message}")]
    Yaml { origin: String, message: String },
    #[error(transparent)]
    Engine(#[from] kd_engine::EngineError),
}

fn located(file: &str, line: usize, column: usize, message: &str) -> String {
    match (line, column) {
        (0, _) => format!("{file}: {message}"),
        (l, 0) => format!("{file}:{l}: {message}"),
        (l, c) => format!("{file}:{l}:{c}: {message}"),
    }
}

pub type Result<T, E = RecipeError> = std::result::Result<T, E>;

/// An error a native API function raises; Rhai fills in the call's position.
pub(crate) fn user(msg: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        msg.into().into(),
        Position::NONE,
    ))
}

fn script(file: &str, pos: Position, message: String) -> RecipeError {
    RecipeError::Script {
        file: file.to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
    }
}

pub(crate) fn from_parse(file: &str, err: &ParseError) -> RecipeError {
    let message = crate::sandbox::parse_limit_message(err.err_type())
        .unwrap_or_else(|| format!("syntax error: {}", err.err_type()));
    script(file, err.position(), message)
}

/// Locates an evaluation error at its innermost cause: an error inside a
/// function of an imported module names that module's file, not the import.
/// `hint` may add context to "function not found" (the valid signatures).
pub(crate) fn from_eval(
    file: &str,
    err: EvalAltResult,
    hint: &dyn Fn(&str) -> Option<String>,
) -> RecipeError {
    let (mut file, mut at, mut err) = (file.to_string(), Position::NONE, err);
    while let EvalAltResult::ErrorInFunctionCall(_, src, inner, pos)
    | EvalAltResult::ErrorInModule(src, inner, pos) = err
    {
        if inner.position().is_none() {
            at = pos;
        } else if !src.is_empty() {
            file = src;
        }
        err = *inner;
    }
    if !err.position().is_none() {
        at = err.position();
    }
    let message = message_of(err, hint);
    script(&file, at, message)
}

fn message_of(err: EvalAltResult, hint: &dyn Fn(&str) -> Option<String>) -> String {
    if let Some(message) = crate::sandbox::limit_message(&err, crate::limits::OPERATIONS) {
        return message;
    }
    match err {
        EvalAltResult::ErrorRuntime(d, _) => d.to_string(),
        EvalAltResult::ErrorParsing(p, _) => {
            crate::sandbox::parse_limit_message(&p).unwrap_or_else(|| format!("syntax error: {p}"))
        }
        EvalAltResult::ErrorFunctionNotFound(sig, _) => {
            let name = sig.split([' ', '(']).next().unwrap_or(&sig).to_string();
            // Rhai spells a string argument three ways at once.
            let sig = sig.replace("&str | ImmutableString | String", "string");
            let mut msg = format!("no function matches `{sig}`");
            if let Some(h) = hint(&name) {
                msg.push_str("; ");
                msg.push_str(&h);
            }
            msg
        }
        mut other => {
            other.set_position(Position::NONE);
            other.to_string()
        }
    }
}

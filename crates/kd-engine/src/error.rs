use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Kd(#[from] kd_core::KdError),
    #[error(transparent)]
    Model(#[from] kd_models::ModelError),
    #[error(transparent)]
    Data(#[from] kd_data::DataError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Aten(#[from] kd_aten::AtenError),
    #[error(transparent)]
    Dist(#[from] kd_dist::DistError),
    // Not a `source`: the message already holds it, and error chains
    // printed in full would say it twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A plan the engine cannot run; the message names the stage, method
    /// or field (callers add the plan's name).
    #[error("{0}")]
    Plan(String),
    #[error(
        "loss term `{term}` is {value} at epoch {epoch}, step {step}; stopped, the last good checkpoint is kept"
    )]
    NonFinite {
        term: String,
        value: f64,
        epoch: usize,
        step: usize,
    },
    #[error("interrupted; continue with --resume (checkpoint {0})")]
    Interrupted(PathBuf),
}

impl EngineError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.to_path_buf(),
            err: source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Runs `f`, turning a libtorch exception into [`EngineError::Plan`]
/// (`{what}: {libtorch's first line}`): tch's infallible tensor ops panic
/// on them, and user input (a fixture, a plan asking for a model too big
/// to allocate) can provoke one; the user gets a line, not a C++ trace.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        // tch wraps libtorch's message: `... Torch("<what>\nException raised from ...`.
        let cause = msg.split_once("Torch(\"").map_or(msg, |(_, w)| w);
        // Debug-printed, so its line breaks are the two characters `\n`.
        let cause = cause.split("\\n").next().unwrap_or(cause);
        let cause = cause.split(['\n', '"']).next().unwrap_or(cause).trim();
        Err(EngineError::Plan(format!("{what}: {cause}")))
    })
}

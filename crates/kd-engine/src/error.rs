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
    #[error("interrupted; resume with the same command (checkpoint {0})")]
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

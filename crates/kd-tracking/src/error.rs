use std::path::PathBuf;

/// Everything that can go wrong between a run folder and an MLflow server.
///
/// Server answers keep MLflow's own `error_code` (`RESOURCE_DOES_NOT_EXIST`,
/// `INVALID_PARAMETER_VALUE`, ...) so callers can branch on it instead of on
/// message text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MLflow answered HTTP {status}: {error_code}: {message}")]
    Server {
        status: u16,
        error_code: String,
        message: String,
    },
    #[error("cannot reach MLflow at {url}: {reason}")]
    Transport { url: String, reason: String },
    /// The server took longer than the request's limit; it may still have
    /// done the work.
    #[error("MLflow at {url} did not answer in time")]
    Timeout { url: String },
    #[error("unexpected answer from MLflow at {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("tracking URI `{0}` is not an http(s) MLflow server address")]
    BadUri(String),
    #[error(
        "run artifact root `{0}` is not served by the mlflow-artifacts proxy \
         (start the server with --serve-artifacts)"
    )]
    ArtifactRoot(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Journal { path: PathBuf, reason: String },
    #[error("run folder {0} is held by a live process; sync it after that process ends")]
    RunLive(PathBuf),
    #[error("no kd runs in {0}: no folder there holds a journal.jsonl")]
    NoRuns(PathBuf),
    #[error("run {child} waits for its parent run {parent} to reach the server")]
    ParentPending { child: PathBuf, parent: PathBuf },
    #[error("MLflow server: {0}")]
    ServerProcess(String),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// MLflow's `error_code` when the server answered with one.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Error::Server { error_code, .. } => Some(error_code),
            _ => None,
        }
    }

    /// Whether trying the same request later may succeed: the server was
    /// away, overloaded or failed internally. Anything else is an answer about
    /// the request itself, and repeating it would get the same answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Timeout { .. } | Error::ParentPending { .. } => true,
            Error::Server { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            // A proxy in front of MLflow may answer with HTML while the
            // backend restarts.
            Error::Protocol { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

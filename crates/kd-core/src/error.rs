use thiserror::Error;

/// Every way a plan, a method or a step can fail, phrased for the user who
/// wrote the recipe: what was wrong, and what would have been valid.
#[derive(Debug, Error)]
pub enum KdError {
    #[error("unknown method `{name}`{}; registered methods: {valid}", nearest.as_ref().map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default())]
    UnknownMethod {
        name: String,
        /// The registered name closest in spelling, if any is close.
        nearest: Option<String>,
        valid: String,
    },
    #[error("method `{method}` config: {msg}")]
    Config { method: String, msg: String },
    #[error("unknown tap `{name}` on the {side}; valid taps: {valid}")]
    UnknownTap {
        name: String,
        side: String,
        valid: String,
    },
    #[error("method `{method}`: {msg}")]
    Plan { method: String, msg: String },
    #[error("method `{0}` is registered twice")]
    DuplicateMethod(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = KdError> = std::result::Result<T, E>;

use serde::{Deserialize, Serialize};

/// Where training stands, as schedules and methods see it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Zero-based epoch within the current stage.
    pub epoch: usize,
    pub epochs: usize,
    /// Zero-based step within the epoch.
    pub step: usize,
    pub steps_per_epoch: usize,
    /// Steps done in this stage before this one.
    pub global_step: usize,
}

impl Progress {
    /// Fraction of the stage done, in [0, 1).
    pub fn fraction(&self) -> f64 {
        let total = (self.epochs * self.steps_per_epoch).max(1);
        self.global_step as f64 / total as f64
    }
}

//! What the engine reports while it runs. Tracking (MLflow), progress output
//! and tests implement [`Observer`]; the engine never knows who listens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One finished epoch of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub test_top1: f64,
    /// NaN, and absent from the files, for fewer than 6 classes, where
    /// every prediction is in the top 5 (see [`crate::accuracy`]).
    #[serde(default = "no_top5", skip_serializing_if = "is_nan")]
    pub test_top5: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "not_a_top5")]
    pub val_top5: Option<f64>,
    /// Mean weight applied to each method's loss over the epoch.
    pub weights: BTreeMap<String, f64>,
    /// Mean of each loss term (before weights) over the epoch.
    pub terms: BTreeMap<String, f64>,
    /// Training images per second of this rank: the epoch's steps, from
    /// its first batch to its last step's values read back, without the
    /// evaluation.
    pub images_per_sec: f64,
    /// Seconds spent evaluating after the epoch's steps (test, validation,
    /// EMA and peer networks).
    #[serde(default)]
    pub eval_secs: f64,
    pub best_top1: f64,
    /// Test top-1 of the peer network in mutual learning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_top1: Option<f64>,
    /// Test top-1 and top-5 of the stage's EMA network (`ema:`), beside
    /// the raw network's (which alone selects the best epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "not_a_top5")]
    pub ema_top5: Option<f64>,
}

// JSON has no NaN (serde_json writes null, which does not read back as a
// number): a top-5 that does not exist is left out and read back as NaN.
fn no_top5() -> f64 {
    f64::NAN
}

fn is_nan(x: &f64) -> bool {
    x.is_nan()
}

fn not_a_top5(x: &Option<f64>) -> bool {
    x.is_none_or(f64::is_nan)
}

/// Result of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub name: String,
    pub epochs: Vec<EpochRecord>,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub last_top1: f64,
    #[serde(default = "no_top5", skip_serializing_if = "is_nan")]
    pub last_top5: f64,
    /// Weights of the stage's network after its last epoch, and at its best
    /// test top-1 (selected on validation accuracy when a split exists).
    pub last_weights: PathBuf,
    pub best_weights: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub run_dir: PathBuf,
    pub stages: Vec<StageResult>,
}

impl RunResult {
    /// The last stage, whose numbers a run is known by.
    pub fn last(&self) -> Option<&StageResult> {
        self.stages.last()
    }
}

pub trait Observer {
    /// Step-level values (loss terms, total, lr, weights, images/s).
    fn metrics(&mut self, _step: i64, _values: &[(String, f64)]) {}
    fn stage_start(&mut self, _index: usize, _name: &str) {}
    /// Test accuracy (top-1, top-5, in %) of the frozen teacher a stage
    /// distils from, measured before its first epoch: a teacher whose
    /// weights did not load shows here, not as a mysteriously weak student.
    fn teacher_eval(&mut self, _stage: &str, _top1: f64, _top5: f64) {}
    fn epoch(&mut self, _stage: &str, _global_epoch: i64, _record: &EpochRecord) {}
    fn stage_end(&mut self, _result: &StageResult) {}
    /// A file the run produced (checkpoints, plots).
    fn artifact(&mut self, _path: &Path) {}
}

/// Listens to nothing.
pub struct Silent;
impl Observer for Silent {}

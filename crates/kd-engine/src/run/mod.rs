//! Runs plans: builds the networks, then each stage in turn, resuming from
//! the run folder's checkpoint (written atomically after every epoch).
//!
//! - `group`: the loop over stages, epochs and steps, for one run or for
//!   several in lockstep sharing their frozen teacher's forward;
//! - `member`: one run's state and what each point of the loop does to it;
//! - `stage`, `prepare`, `methods`: a stage's methods, optimiser and loader;
//! - `momentum`: optimiser state carried into a stage that keeps it;
//! - `step`: one training step; `pending`: its values, read back in windows;
//! - `checkpoint`, `nets`, `draws`, `harness` (benchmarks and the probe);
//! - `validate`: what can be checked before anything trains.

mod cache;
mod checkpoint;
mod draws;
mod ema;
mod graph;
mod group;
mod harness;
mod member;
mod methods;
mod momentum;
mod nets;
mod pending;
mod prepare;
mod stage;
mod step;
mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use kd_core::Registry;

pub use cache::{
    Approximation as CacheApproximation, CACHE_FORMAT, CacheDtype, CacheSpec, CacheWriter,
    Manifest as CacheManifest,
};
pub use graph::GraphStats;
pub use group::{lockstep_key, run_group};
pub(crate) use harness::probe_step;
pub use harness::{StepHarness, bench_plan};
pub(crate) use nets::Net;
pub use nets::device;
pub use step::teacher_forwards;
pub use validate::validate;

use crate::observe::{Observer, RunResult};
use crate::plan::Plan;
use crate::schedule::ScheduleResolver;
use crate::{EngineError, Result};

pub struct RunOptions<'a> {
    pub run_dir: PathBuf,
    /// Continue from `run_dir/checkpoint.safetensors` when it exists.
    pub resume: bool,
    pub observer: &'a mut dyn Observer,
    pub scripts: &'a dyn ScheduleResolver,
    /// Set (e.g. by Ctrl-C) to stop at the next step.
    pub stop: Option<Arc<AtomicBool>>,
    /// Report step metrics every this many steps.
    pub log_every: usize,
    pub progress_bar: bool,
}

/// Runs one plan.
pub fn run(plan: &Plan, registry: &Registry, opts: &mut RunOptions) -> Result<RunResult> {
    run_group(
        std::slice::from_ref(plan),
        registry,
        std::slice::from_mut(opts),
    )?
    .pop()
    .unwrap_or_else(|| Err(EngineError::Plan("no result".into())))
}

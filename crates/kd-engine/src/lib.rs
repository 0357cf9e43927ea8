//! The engine: turns a validated plan into training. It knows taps, gradient
//! taps, adversarial views, memory banks, mutual learning and stages; it
//! never names a method.

mod attack;
mod ema;
mod error;
mod eval;
pub mod folder;
pub mod observe;
mod optim;
pub mod plan;
pub mod probe;
pub mod report;
mod run;
pub mod saved;
pub mod schedule;
pub mod tensors;

pub use ema::ema_update;
pub use error::{EngineError, Result};
pub use eval::accuracy;
pub use observe::{EpochRecord, Observer, RunResult, Silent, StageResult};
pub use optim::{Optimizer, takes_weight_decay};
pub use plan::{
    BatchNorm, DataPlan, DeviceChoice, EmaPlan, LrSchedule, MethodPlan, ModelPlan, OptimizerKind,
    OptimizerPlan, Paper, PaperEpoch, Part, Plan, Precision, Sgd, StagePlan, Subject,
};
pub use run::{
    CACHE_FORMAT, CacheApproximation, CacheDtype, CacheManifest, CacheSpec, CacheWriter,
    GraphStats, RunOptions, StepHarness, bench_plan, device, lockstep_key, run, run_group,
    teacher_forwards, validate,
};
pub use schedule::{NoScripts, Schedule, ScheduleFn, ScheduleResolver, Weight};

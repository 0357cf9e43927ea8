//! MLflow tracking for `kd` runs that never slows training down and never
//! loses a point when the server is away.
//!
//! Why it is built this way:
//! - **Journal first.** Every param, tag, metric, artifact and status goes to
//!   `journal.jsonl` in the run folder before anything else; the server gets
//!   a copy. A run made with no server, through an outage or up to a crash is
//!   complete on disk, and [`sync`] ships it later.
//! - **Non-blocking.** [`Tracker`] calls only put an event on a channel;
//!   background threads write the journal and ship batches with retries.
//!   [`Tracker::finish`] waits a bounded time for the server.
//! - **Exactly once.** Entries are acknowledged (`acked.jsonl`) only after
//!   the server took them and are never sent again; [`sync`] resumes at the
//!   first unacknowledged entry, creating the server run first if it never
//!   got there. A run folder reopened on resume logs each metric step once
//!   (the first point wins; a resume from a checkpoint replays steps), and
//!   journals from older versions that hold a step twice ship it once.
//! - **A finished run stays finished.** Once a run's journal holds
//!   FINISHED, reopening it appends data but never changes its status on
//!   the server (RUNNING, FAILED or KILLED), and [`sync`] never closes it
//!   again; [`journaled_status`] tells whether a folder holds one.
//! - **Own REST client.** The published Rust MLflow crates are unmaintained;
//!   the few endpoints needed are in [`Client`], on `ureq`.
//!
//! ```no_run
//! use kd_tracking::{RunSpec, RunStatus, Tracker, resolve_uri};
//! # fn main() -> Result<(), kd_tracking::Error> {
//! let runs = std::path::Path::new("runs");
//! let uri = resolve_uri(None, None, runs);
//! let sweep = Tracker::start(runs.join("sweep"), RunSpec::new("cifar").name("sweep").tracking_uri(uri))?;
//! let trial = sweep.child(runs.join("sweep/t0"), RunSpec::new("cifar").name("t0"))?;
//! trial.param("lr", 0.1);
//! trial.metric("train/loss", 2.3, 0);
//! trial.finish(RunStatus::Finished);
//! let report = sweep.finish(RunStatus::Finished);
//! if report.needs_sync() {
//!     eprintln!("server incomplete: run `kd sync` later");
//! }
//! # Ok(()) }
//! ```

mod client;
mod error;
pub mod journal;
mod plot;
pub mod server;
mod ship;
mod sync;
mod tracker;
mod uri;

pub use client::{
    Client, MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, Metric,
    RunInfo, RunStatus,
};
pub use error::{Error, Result};
pub use journal::{journaled_status, metric_history, run_identity};
pub use plot::{Bar, History, plot_bars, plot_curves};
pub use server::ServerInfo;
pub use sync::{SyncReport, sync, sync_all};
pub use tracker::{FinishReport, Options, RunSpec, Tracker};
pub use uri::resolve_uri;

//! The `kd` command line. [`run`] is the whole program, callable in-process
//! by the tests; `main.rs` only maps its result to an exit code. Each
//! subcommand lives in `commands/`; running plans (folders, tracking,
//! lockstep groups, sweeps) in `exec`.

mod commands;
mod console;
mod exec;
mod out;
mod track;
mod train;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kd_core::Registry;

pub use exec::{Exec, execute, run_sweep};

#[derive(Parser, Debug)]
#[command(
    name = "kd",
    version,
    about = "Knowledge distillation on libtorch: recipes, plugins, tracking"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a network from scratch on the labels (to serve as a teacher).
    TrainTeacher(commands::train_teacher::Args),
    /// Distill a frozen teacher into a student with one or more methods.
    Distill(commands::distill::Args),
    /// Write the frozen teacher's outputs on every batch of `kd distill`
    /// runs with the same flags, for `--teacher-cache` (no teacher forward).
    CacheTeacher(commands::cache_teacher::Args),
    /// Run a recipe (`.rhai`) or a saved plan (YAML, as printed by `kd plan`).
    Run(commands::run::Args),
    /// Print the plans a recipe resolves to, as YAML, validated (weights,
    /// data folders, numbers, methods); nothing trains. Given saved plans
    /// (`.yaml`), validates and prints them.
    Plan(commands::plan::Args),
    /// List the model zoo.
    Models,
    /// The local MLflow server (SQLite store and artifacts under OUT/mlflow).
    #[command(subcommand)]
    Mlflow(commands::mlflow::Mlflow),
    /// Send to MLflow whatever a run (or every run under a folder) has not
    /// delivered yet; marks runs whose process died FAILED or KILLED.
    Sync(commands::sync::Args),
    /// List registered methods with their config fields and defaults.
    Methods(commands::methods::Args),
    /// Conformance checks against a PyTorch reference.
    #[command(subcommand)]
    Probe(commands::probe::Probe),
    /// Time training steps of one distillation on a fixed batch (what
    /// `scripts/bench-vs-torch` compares with PyTorch).
    Bench(commands::bench::BenchArgs),
    /// Images per second of the ImageFolder training pipeline alone (what
    /// `scripts/bench-data` compares with torchvision's DataLoader).
    #[command(hide = true)]
    BenchData(commands::bench_data::BenchDataArgs),
    /// Summarise finished runs: per configuration, mean ± std over seeds of
    /// the best and last top-1, and the gap to the number the recipe's
    /// source reports; writes report.md and report.png.
    Report(commands::report::ReportArgs),
}

/// Runs `kd` with the given arguments (the first is the program name).
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cli = Cli::try_parse_from(&args)?;
    exec::remember_command(&args);
    if matches!(
        cli.cmd,
        Cmd::TrainTeacher(_) | Cmd::Distill(_) | Cmd::Run(_)
    ) {
        join_world()?;
    }
    kd_methods::link();
    let registry = Registry::global()?;
    match cli.cmd {
        Cmd::TrainTeacher(a) => commands::train_teacher::run(&a, &registry),
        Cmd::CacheTeacher(a) => commands::cache_teacher::run(&a, &registry),
        Cmd::Distill(a) => commands::distill::run(&a, &registry),
        Cmd::Run(a) => commands::run::run(a, &registry),
        Cmd::Plan(a) => commands::plan::run(&a, &registry),
        Cmd::Models => commands::models::run(),
        Cmd::Mlflow(m) => commands::mlflow::run(m),
        Cmd::Sync(a) => commands::sync::run(&a),
        Cmd::Methods(a) => commands::methods::run(&a, &registry),
        Cmd::Probe(p) => commands::probe::run(p, &registry),
        Cmd::Bench(a) => commands::bench::bench(&a, &registry),
        Cmd::BenchData(a) => commands::bench_data::bench_data(&a),
        Cmd::Report(a) => commands::report::report(&a),
    }
}

/// Joins the data-parallel job torchrun (or the user) described in the
/// environment, if any: Gloo on CPUs, NCCL when CUDA is there.
/// `KD_DIST_TIMEOUT` (seconds, default 120) bounds the rendezvous and every
/// collective, so a rank that dies or hangs stops the others.
fn join_world() -> Result<()> {
    let Some(world) = kd_dist::World::from_env()? else {
        return Ok(());
    };
    if kd_dist::group().is_some() {
        return Ok(());
    }
    let secs: u64 = match std::env::var("KD_DIST_TIMEOUT") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("KD_DIST_TIMEOUT={v} is not a number of seconds"))?,
        Err(_) => 120,
    };
    let nccl = tch::Cuda::is_available() && kd_dist::has_nccl();
    let pg = kd_dist::ProcessGroup::new(world, nccl, std::time::Duration::from_secs(secs))?;
    Ok(kd_dist::init(pg)?)
}

/// An error and its causes on one line, each said once: a cause whose text
/// an outer message already holds (many wrap their source's text) is left
/// out, so no prefix or OS error repeats.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

/// Maps errors to one line on stderr and an exit code; `--help` and
/// `--version` print normally. A reader that closed stdout early (`kd
/// methods | head`) ends the command quietly, as it does any Unix tool.
pub fn main_exit<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(clap_err) = e.downcast_ref::<clap::Error>() {
                let _ = clap_err.print();
                return if clap_err.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            if out::is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

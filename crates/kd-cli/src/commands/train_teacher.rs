//! `kd train-teacher`: a network trained on the labels alone.

use anyhow::Result;
use kd_core::Registry;
use kd_engine::ModelPlan;
use kd_engine::report::{summarize, table};

use crate::exec::{self, paired};
use crate::out::out;
use crate::train::{TrainArgs, label_runs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Zoo name (`kd models`).
    #[arg(long)]
    arch: String,
    #[command(flatten)]
    train: TrainArgs,
}

pub fn run(a: &Args, registry: &Registry) -> Result<()> {
    let name = a
        .train
        .name
        .clone()
        .unwrap_or_else(|| format!("teacher_{}", kd_models::torchscript::short_name(&a.arch)));
    let student = ModelPlan {
        arch: a.arch.clone(),
        weights: None,
        source_sha256: None,
    };
    let runs = label_runs(&a.train, &name, &student)?;
    let sweep = format!("{name}_sweep");
    exec::check_all(registry, &[(&runs, &sweep)], &a.train)?;
    let results = exec::run_sweep(registry, &runs, &a.train.exec(), &sweep)?;
    if kd_dist::is_main() {
        out!("{}", table(&[summarize(&name, &paired(&runs, &results))]))?;
    }
    Ok(())
}

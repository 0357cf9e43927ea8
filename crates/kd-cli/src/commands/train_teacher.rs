//! `kd train-teacher`: a network trained on the labels alone.

use anyhow::Result;
use kd_core::Registry;
use kd_engine::report::{summarize, table};
use kd_engine::{MethodPlan, ModelPlan};

use crate::exec::{self, paired};
use crate::out::out;
use crate::train::{LABEL_LOSS, TrainArgs, seeds};

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
        .unwrap_or_else(|| format!("teacher_{}", a.arch));
    let student = ModelPlan {
        arch: a.arch.clone(),
        weights: None,
    };
    let runs = seeds(&a.train, &name, |run_name, seed| {
        a.train.plan(
            run_name,
            student.clone(),
            None,
            "train",
            vec![MethodPlan::new(LABEL_LOSS, 1.0)],
            seed,
        )
    })?;
    let sweep = format!("{name}_sweep");
    exec::check_all(registry, &[(&runs, &sweep)], &a.train)?;
    let results = exec::run_sweep(registry, &runs, &a.train.exec(), &sweep)?;
    if kd_dist::is_main() {
        out!("{}", table(&[summarize(&name, &paired(&runs, &results))]))?;
    }
    Ok(())
}

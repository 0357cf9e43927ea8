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
    /// Weights to start from (safetensors or a `torch.save` state_dict),
    /// e.g. ImageNet weights to fine-tune.
    #[arg(long)]
    init_weights: Option<std::path::PathBuf>,
    /// With --init-weights: load everything but the classifier, which
    /// starts fresh for this data's classes (timm's `pretrained=True,
    /// num_classes=N`).
    #[arg(long, requires = "init_weights")]
    reset_classifier: bool,
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
        weights: a.init_weights.clone(),
        reset_classifier: a.reset_classifier,
        ..ModelPlan::new(&a.arch)
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

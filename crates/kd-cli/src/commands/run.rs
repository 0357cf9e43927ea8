//! `kd run`: a recipe, or saved plans, run to the end.

use std::path::PathBuf;

use anyhow::Result;
use kd_core::Registry;
use kd_engine::report::{group, table};

use crate::exec::{self, Exec, paired};
use crate::out::out;
use crate::train::FolderArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The recipe (`.rhai`) or saved plans (`.yaml`).
    path: PathBuf,
    /// `NAME=VALUE`: overrides a recipe's `param("NAME", default)`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Folder holding run folders.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    #[command(flatten)]
    folders: FolderArgs,
    /// MLflow tracking server (else MLFLOW_TRACKING_URI, else `kd mlflow
    /// up`'s).
    #[arg(long)]
    tracking_uri: Option<String>,
    /// Train the plans of a sweep one after another, never in lockstep
    /// with a shared teacher forward.
    #[arg(long)]
    solo: bool,
}

pub fn run(a: Args, registry: &Registry) -> Result<()> {
    let scripts = kd_recipes::Scripts::new();
    let ex = Exec {
        out: &a.out,
        folders: a.folders,
        solo: a.solo,
        tracking_uri: a.tracking_uri.as_deref(),
        recipe: Some(&a.path),
        scripts: &scripts,
    };
    if kd_recipes::is_recipe(&a.path) {
        let recipe = super::plan::load_recipe(&a.path, &a.sets)?;
        // Every run folder the recipe reaches is checked before the first
        // run changes one (planning validates the rest).
        let plans = exec::stamped(recipe.plans(registry)?);
        exec::preflight(&plans, &ex, &[])?;
        let runs = recipe.execute_batched(registry, &mut |plans| {
            exec::run_batch(registry, &exec::stamped(plans.to_vec()), &ex)
        })?;
        if kd_dist::is_main() && !recipe.printed_summary() {
            eprint!("{}", kd_recipes::summary_table(&runs));
        }
        return Ok(());
    }
    let plans = exec::stamped(super::plan::saved_plans(
        &a.path, &a.sets, registry, &scripts,
    )?);
    exec::preflight(&plans, &ex, &[])?;
    let results = exec::run_batch(registry, &plans, &ex)
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    if kd_dist::is_main() {
        out!("{}", table(&group(&paired(&plans, &results))))?;
    }
    Ok(())
}

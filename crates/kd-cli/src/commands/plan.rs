//! `kd plan`: the plans a recipe resolves to (or saved plans), validated
//! and printed as YAML; nothing trains.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use kd_core::Registry;
use kd_engine::Plan;

use crate::out::out;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The recipe (`.rhai`) or saved plans (`.yaml`).
    recipe: PathBuf,
    /// `NAME=VALUE`: overrides a recipe's `param("NAME", default)`.
    #[arg(long = "set")]
    sets: Vec<String>,
}

pub fn run(a: &Args, registry: &Registry) -> Result<()> {
    let plans = if kd_recipes::is_recipe(&a.recipe) {
        load_recipe(&a.recipe, &a.sets)?.plans(registry)?
    } else {
        saved_plans(&a.recipe, &a.sets, registry, &kd_recipes::Scripts::new())?
    };
    out!("{}", kd_recipes::to_yaml(&crate::exec::stamped(plans))?)?;
    Ok(())
}

/// A recipe with `--set`'s overrides.
pub(crate) fn load_recipe(path: &Path, sets: &[String]) -> Result<kd_recipes::Recipe> {
    not_a_folder(path)?;
    let overrides = sets
        .iter()
        .map(|s| kd_recipes::parse_set(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(kd_recipes::Recipe::load(path, &overrides)?)
}

/// Saved plans (YAML), each validated.
pub(crate) fn saved_plans(
    path: &Path,
    sets: &[String],
    registry: &Registry,
    scripts: &kd_recipes::Scripts,
) -> Result<Vec<Plan>> {
    not_a_folder(path)?;
    if !sets.is_empty() {
        bail!("--set applies to recipes (.rhai), not to saved plans");
    }
    let plans = kd_recipes::read_plans(path)?;
    for plan in &plans {
        kd_recipes::validate(plan, registry, scripts)?;
    }
    Ok(plans)
}

fn not_a_folder(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{} is a folder; give a recipe (.rhai) or saved plans (.yaml)",
            path.display()
        );
    }
    Ok(())
}

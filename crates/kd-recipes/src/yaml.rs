//! Plans as YAML: what `kd plan` prints and `kd run plan.yaml` replays. A
//! recipe's plans are one document each, separated by `---`.

use std::path::Path;

use kd_engine::Plan;

use crate::error::{RecipeError, Result};

pub fn to_yaml(plans: &[Plan]) -> Result<String> {
    serde_saphyr::to_string_multiple(plans).map_err(|e| RecipeError::Yaml {
        origin: "plan".into(),
        message: e.to_string(),
    })
}

/// Parses one or more plan documents; `origin` names the text in errors.
pub fn from_yaml(text: &str, origin: &str) -> Result<Vec<Plan>> {
    let plans: Vec<Plan> = serde_saphyr::from_multiple(text).map_err(|e| RecipeError::Yaml {
        origin: origin.into(),
        message: e.to_string(),
    })?;
    if plans.is_empty() {
        return Err(RecipeError::Yaml {
            origin: origin.into(),
            message: "no plan in this file".into(),
        });
    }
    Ok(plans)
}

pub fn read_plans(path: &Path) -> Result<Vec<Plan>> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_yaml(&text, &path.display().to_string())
}

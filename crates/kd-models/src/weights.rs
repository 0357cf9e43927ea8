//! PyTorch-compatible weights in safetensors: a `state_dict` saved from
//! RepDistiller's models loads as it is, and what [`save_weights`] writes
//! loads back into PyTorch with `load_state_dict(safetensors.torch.load_file(..))`
//! (BatchNorm fills in the `num_batches_tracked` it lacks).

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::ModelError;

/// How many names each category of a mismatch report lists.
const LISTED: usize = 10;

/// `nn.DataParallel` wraps the model as `module`.
const DATA_PARALLEL: &str = "module.";

/// PyTorch's BatchNorm step counter: only used when `momentum=None`, which no
/// zoo model sets, so there is nothing to load it into.
fn is_ignored(key: &str) -> bool {
    key == "num_batches_tracked" || key.ends_with(".num_batches_tracked")
}

/// Loads every variable of `vs` from the safetensors file at `path`.
///
/// Keys may carry a leading `module.`; `*.num_batches_tracked` is ignored.
/// Tensors are converted to each variable's kind and device, as PyTorch's
/// `load_state_dict` does. Any missing key, unexpected key or shape mismatch
/// fails the whole load before a single variable changes.
pub fn load_weights(vs: &mut VarStore, path: &Path) -> Result<(), ModelError> {
    let file = Tensor::read_safetensors(path).map_err(|source| ModelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut vars = vs.variables();

    let mut loaded: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut duplicate = Vec::new();
    for (key, tensor) in file {
        let key = match key.strip_prefix(DATA_PARALLEL) {
            Some(stripped) => stripped.to_string(),
            None => key,
        };
        if is_ignored(&key) {
            continue;
        }
        if loaded.insert(key.clone(), tensor).is_some() {
            duplicate.push(key);
        }
    }

    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !loaded.contains_key(*k))
        .cloned()
        .collect();
    missing.sort();
    let unexpected: Vec<String> = loaded
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .cloned()
        .collect();
    duplicate.sort();
    let mismatched: Vec<String> = loaded
        .iter()
        .filter_map(|(k, t)| {
            let v = vars.get(k)?;
            (v.size() != t.size())
                .then(|| format!("{k} (file {:?}, model {:?})", t.size(), v.size()))
        })
        .collect();

    let report: Vec<String> = [
        ("missing", missing),
        ("unexpected", unexpected),
        ("duplicate (with and without `module.`)", duplicate),
        ("shape mismatch", mismatched),
    ]
    .into_iter()
    .filter_map(|(label, items)| summarise(label, &items))
    .collect();
    if !report.is_empty() {
        return Err(ModelError::Mismatch {
            path: path.to_path_buf(),
            report: report.join("; "),
        });
    }

    tch::no_grad(|| {
        for (key, tensor) in &loaded {
            if let Some(var) = vars.get_mut(key) {
                var.f_copy_(tensor).map_err(|source| ModelError::Copy {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    })
}

/// `"<n> <label>: a, b, ... and <m> more"`, or nothing for an empty list.
fn summarise(label: &str, items: &[String]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let shown = items
        .iter()
        .take(LISTED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let more = match items.len().saturating_sub(LISTED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!("{} {label}: {shown}{more}", items.len()))
}

/// Writes every variable of `vs` to `path` as safetensors, keys sorted, in
/// the layout [`load_weights`] and PyTorch read.
pub fn save_weights(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).map_err(|source| ModelError::Write {
        path: path.to_path_buf(),
        source,
    })
}

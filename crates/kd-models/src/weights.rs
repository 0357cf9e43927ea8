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
/// zoo model sets, so zoo models have nothing to load it into (a foreign
/// module that keeps it loads it, and may lack it in older files).
fn is_ignored(key: &str) -> bool {
    key == "num_batches_tracked" || key.ends_with(".num_batches_tracked")
}

/// Loads every variable of `vs` from the weights file at `path`: safetensors,
/// or a file Python's `torch.save` wrote (read by libtorch's unpickler, no
/// Python involved): a bare `state_dict`, or a checkpoint dict holding one
/// under some key (`model`, `state_dict`, `net`, ...: the key whose tensors
/// name the most of the model's variables is taken).
///
/// Keys may carry a leading `module.`; `*.num_batches_tracked` is ignored.
/// Tensors are converted to each variable's kind and device, as PyTorch's
/// `load_state_dict` does. Any missing key, unexpected key or shape mismatch
/// fails the whole load before a single variable changes.
pub fn load_weights(vs: &mut VarStore, path: &Path) -> Result<(), ModelError> {
    load_weights_with(vs, path, LoadOptions::default())
}

/// How [`load_weights_with`] departs from a strict load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Leave the classifier (the layers whose bias
    /// [`crate::is_model_classifier_bias`] names: `fc`, `head`, `head_dist`,
    /// ...) as initialised and ignore the
    /// file's, whatever its class count: timm's `pretrained=True,
    /// num_classes=N`.
    pub reset_classifier: bool,
}

/// [`load_weights`], with `opts`.
pub fn load_weights_with(
    vs: &mut VarStore,
    path: &Path,
    opts: LoadOptions,
) -> Result<(), ModelError> {
    let read_err = |reason: String| ModelError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let mut vars = vs.variables();
    let file = match check_safetensors(path) {
        Ok(()) => Tensor::read_safetensors(path).map_err(|e| read_err(plain(&e)))?,
        Err(why) if why.contains("torch.save") => {
            let all = kd_aten::pickle_tensors(path).map_err(|e| {
                let e = e.to_string();
                match e.split_once("holds no tensors") {
                    // Read, but not weights: say what it is instead.
                    Some((_, rest)) => {
                        read_err(format!("a torch.save file that holds no tensors{rest}"))
                    }
                    None => read_err(format!("{why} (reading it as one failed: {e})")),
                }
            })?;
            state_dict_within(all, &vars)
        }
        Err(why) => return Err(read_err(why)),
    };

    let mut loaded: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut duplicate = Vec::new();
    for (key, tensor) in file {
        let key = match key.strip_prefix(DATA_PARALLEL) {
            Some(stripped) => stripped.to_string(),
            None => key,
        };
        if is_ignored(&key) && !vars.contains_key(&key) {
            continue;
        }
        if loaded.insert(key.clone(), tensor).is_some() {
            duplicate.push(key);
        }
    }

    // Weights made for another image, patch or window size, as timm loads them.
    crate::timm_filter::adapt(&mut loaded, &vars);
    if opts.reset_classifier {
        let stems: Vec<String> = vars
            .keys()
            .filter(|k| crate::is_model_classifier_bias(k))
            .map(|k| k.strip_suffix("bias").unwrap_or(k).to_string())
            .collect();
        if stems.is_empty() {
            return Err(read_err(
                "reset_classifier: the model has no classifier kd knows (fc, classifier, linear, head)".into(),
            ));
        }
        for stem in &stems {
            for key in [format!("{stem}weight"), format!("{stem}bias")] {
                loaded.remove(&key);
                vars.remove(&key);
            }
        }
    }

    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !loaded.contains_key(*k) && !is_ignored(k))
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
                var.f_copy_(tensor).map_err(|e| ModelError::Copy {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    reason: plain(&e),
                })?;
            }
        }
        Ok(())
    })
}

/// The tensors of a `torch.save` file that form the model's `state_dict`:
/// those under the key prefix (none, `model.`, `state_dict.`, ...) whose
/// names, that prefix and a `module.` removed, match the most variables.
fn state_dict_within(
    all: Vec<(String, Tensor)>,
    vars: &std::collections::HashMap<String, Tensor>,
) -> Vec<(String, Tensor)> {
    let mut prefixes: Vec<String> = vec![String::new()];
    for (k, _) in &all {
        let mut at = 0;
        while let Some(dot) = k[at..].find('.') {
            let p = k[..at + dot + 1].to_string();
            if !prefixes.contains(&p) {
                prefixes.push(p);
            }
            at += dot + 1;
        }
    }
    let stripped = |k: &str, p: &str| -> Option<String> {
        let rest = k.strip_prefix(p)?;
        Some(rest.strip_prefix(DATA_PARALLEL).unwrap_or(rest).to_string())
    };
    let hits = |p: &str| {
        all.iter()
            .filter(|(k, _)| stripped(k, p).is_some_and(|n| vars.contains_key(&n)))
            .count()
    };
    let best = prefixes
        .iter()
        .max_by_key(|p| (hits(p), std::cmp::Reverse(p.len())))
        .cloned()
        .unwrap_or_default();
    all.into_iter()
        .filter_map(|(k, t)| k.strip_prefix(best.as_str()).map(|n| (n.to_string(), t)))
        .collect()
}

/// Why `path` cannot be a safetensors file, in words, from its first bytes:
/// missing, a PyTorch pickle (with the command that converts it), or a
/// header that does not fit. `Ok` does not promise the rest parses.
pub fn check_safetensors(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| io_reason(&e))?;
    let len = f.metadata().map_err(|e| io_reason(&e))?.len();
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        return Err("is a folder, not a safetensors file".into());
    }
    let mut head = [0u8; 9];
    let n = f.read(&mut head).map_err(|e| io_reason(&e))?;
    let head = &head[..n];
    let header = head
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if matches!(header, Some(h) if h >= 2 && h <= len - 8 && head.get(8) == Some(&b'{')) {
        return Ok(());
    }
    // torch.save writes a zip archive (PyTorch >= 1.6) or a bare pickle.
    let pickled = head.starts_with(b"PK\x03\x04") || head.starts_with(&[0x80]);
    let pth = path
        .extension()
        .is_some_and(|e| ["pth", "pt", "tar", "ckpt", "bin"].iter().any(|x| e == *x));
    if pickled || pth {
        return Err(format!(
            "looks like a PyTorch checkpoint (torch.save) that libtorch cannot read without Python; convert it once, from a folder where the model's Python classes import if it is a whole pickled model (torch.save(model); weights_only=False runs its pickle, so only for a file you trust), with: \
             python -c \"import torch, safetensors.torch as st; m = torch.load('{p}', map_location='cpu', weights_only=False); \
             m = m.get('model', m.get('state_dict', m)) if isinstance(m, dict) else m; \
             sd = m.state_dict() if hasattr(m, 'state_dict') else m; \
             st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{p}.safetensors')\"",
            p = path.display()
        ));
    }
    Err(format!(
        "not a safetensors file ({len} bytes; safetensors starts with an 8-byte header length and a JSON header)"
    ))
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A tch error in words: the safetensors crate prints its errors in Rust's
/// debug form, which says nothing to a user.
pub fn plain(e: &tch::TchError) -> String {
    match e {
        tch::TchError::SafeTensorError { err, .. } => {
            format!("not a valid safetensors file ({err:?})")
        }
        tch::TchError::Io(io) => io_reason(io),
        other => other.to_string(),
    }
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
    let named = cpu_named(vs);
    Tensor::write_safetensors(&named, path).map_err(|e| ModelError::Write {
        path: path.to_path_buf(),
        reason: plain(&e),
    })
}

/// The same weights as `torch.save(model.state_dict(), path)` writes them,
/// for PyTorch users who `torch.load` rather than read safetensors.
pub fn save_pt(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    kd_aten::save_state_dict(&cpu_named(vs), path).map_err(|e| ModelError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The variables by name, on the CPU, contiguous, sorted by name.
fn cpu_named(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

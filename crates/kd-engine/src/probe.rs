//! The conformance harness: runs one method on taps read from a fixture, as a
//! training step would, and writes the loss, the gradients w.r.t. every
//! student tap and the method's parameters and buffers after the call.

use std::path::Path;

use kd_core::{BuildCx, Losses, Needs, Progress, Registry, StepIo, Tap, TapShapes, Taps};
use tch::{Device, Kind, Tensor, nn};

use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result};

/// Taps, their shapes, and the given (tap, leaf tensor) pairs.
type GivenTaps = (Taps, TapShapes, Vec<(Tap, Tensor)>);

/// Taps given by a fixture; absent ones are empty placeholders that no
/// method can reach, since `BuildCx` validates against the given shapes.
fn taps_from(file: &TensorFile, prefix: &str, requires_grad: bool) -> Result<Option<GivenTaps>> {
    let mut given = Vec::new();
    for (name, t) in file.with_prefix(prefix) {
        let tap = Tap::parse(name).ok_or_else(|| {
            EngineError::Plan(format!("fixture tensor `{prefix}{name}` is not a tap name"))
        })?;
        let t = t
            .to_kind(Kind::Float)
            .detach()
            .set_requires_grad(requires_grad);
        given.push((tap, t));
    }
    if given.is_empty() {
        return Ok(None);
    }
    let depth = given
        .iter()
        .filter_map(|(t, _)| match t {
            Tap::Feat(k) | Tap::Preact(k) => Some(k + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut taps = Taps {
        feat: (0..depth).map(|_| Tensor::new()).collect(),
        preact: (0..depth).map(|_| Tensor::new()).collect(),
        embed: Tensor::new(),
        logits: Tensor::new(),
    };
    let mut shapes = TapShapes::default();
    for (tap, t) in &given {
        let slot = match *tap {
            Tap::Feat(k) => &mut taps.feat[k],
            Tap::Preact(k) => &mut taps.preact[k],
            Tap::Embed => &mut taps.embed,
            Tap::Logits => &mut taps.logits,
        };
        *slot = t.shallow_clone();
        shapes.taps.push((*tap, t.size()[1..].to_vec()));
    }
    Ok(Some((taps, shapes, given)))
}

/// Runs the fixture at `path` through its method. See tests/golden/gen.py
/// for the fixture layout.
pub fn probe_loss(path: &Path, registry: &Registry) -> Result<TensorFile> {
    let file = tensors::read(path)?;
    let bad = |msg: String| EngineError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let method = file
        .metadata
        .get("method")
        .ok_or_else(|| bad("metadata has no `method`".into()))?;
    let entry = registry.get(method)?;
    let params: serde_json::Value = match file.metadata.get("params") {
        Some(p) => serde_json::from_str(p)
            .map_err(|e| bad(format!("metadata `params` is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let (student, s_shapes, s_leaves) = taps_from(&file, "student/", true)?
        .ok_or_else(|| bad("no `student/<tap>` tensors".into()))?;
    let teacher = taps_from(&file, "teacher/", false)?;
    let target = file
        .get("batch/target")
        .ok_or_else(|| bad("no `batch/target`".into()))?;
    let index = file.get("batch/index");
    let contrast_index = file.get("batch/contrast_index");
    let max_index = [index, contrast_index]
        .into_iter()
        .flatten()
        .map(|t| t.max().int64_value(&[]) + 1)
        .max();
    let n_data = match file.metadata.get("n_data") {
        Some(n) => n
            .parse()
            .map_err(|_| bad(format!("metadata `n_data` is not an integer: {n}")))?,
        None => max_index.unwrap_or(target.size()[0]),
    };
    let num_classes = s_shapes.get(Tap::Logits).map(|s| s[0]).unwrap_or(10);

    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut needs = Needs::default();
    let mut m = {
        let mut cx = BuildCx::new(
            entry.name,
            &s_shapes,
            teacher.as_ref().map(|t| &t.1),
            vs.root(),
            &mut needs,
            n_data,
            num_classes,
        );
        entry.build(params, &mut cx)?
    };
    if !needs.grads.is_empty() || !needs.views.is_empty() {
        return Err(EngineError::Plan(format!(
            "method `{method}` needs gradient taps or adversarial views; `kd probe loss` feeds taps only"
        )));
    }
    set_vars(&mut vs, &file, path)?;

    let io = StepIo {
        student: &student,
        teacher: teacher.as_ref().map(|t| &t.0),
        grads: &[],
        views: &[],
        target,
        index,
        contrast_index,
        progress: Progress {
            epoch: 0,
            epochs: 1,
            step: 0,
            steps_per_epoch: 1,
            global_step: 0,
        },
        train: true,
    };
    let mut losses = Losses::default();
    m.losses(&io, &mut losses)?;
    let loss = losses.total();
    loss.backward();
    tch::no_grad(|| m.after_step(&io))?;

    let mut out = TensorFile::default();
    out.metadata.insert("method".into(), method.clone());
    out.push("loss", &loss.to_kind(Kind::Float));
    for (name, t) in &losses.terms {
        out.push(format!("terms/{name}"), t);
    }
    for (tap, leaf) in &s_leaves {
        let g = leaf.grad();
        let g = if g.defined() { g } else { leaf.zeros_like() };
        out.push(format!("grad/student/{tap}"), &g);
    }
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        out.push(format!("method/{name}"), &t);
    }
    Ok(out)
}

/// Copies `method/<name>` tensors of the fixture into the method's variables.
fn set_vars(vs: &mut nn::VarStore, file: &TensorFile, path: &Path) -> Result<()> {
    let vars = vs.variables();
    for (name, value) in file.with_prefix("method/") {
        let Some(var) = vars.get(name) else {
            let mut known: Vec<_> = vars.keys().cloned().collect();
            known.sort();
            return Err(EngineError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "fixture sets `method/{name}`, which the method does not have; it has: {}",
                    known.join(", ")
                ),
            });
        };
        if var.size() != value.size() {
            return Err(EngineError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "`method/{name}` has shape {:?}, the method's has {:?}",
                    value.size(),
                    var.size()
                ),
            });
        }
        tch::no_grad(|| var.shallow_clone().copy_(&value.to_kind(var.kind())));
    }
    Ok(())
}

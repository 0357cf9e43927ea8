//! A TorchScript module (`torch.jit.script` or `torch.jit.trace`, saved
//! with `.save`) as a network of kd: `torchscript:FILE` wherever a zoo
//! name goes. Its parameters and buffers join the VarStore under their
//! `state_dict` names, as the module's own tensors, so the optimiser,
//! checkpoints and weight files see exactly what the module computes with.
//!
//! `forward(x)` returns the logits, or a `Dict[str, Tensor]` holding
//! `"logits"` and any of the zoo's taps by name (`feat/0`..`feat/n`,
//! `preact/k`, `embed`), which feature methods then read.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use kd_aten::ForeignModule;
use kd_core::Taps;
use tch::{Tensor, nn};

use crate::{ModelError, Network};

/// The prefix that names a TorchScript file instead of a zoo model.
pub const PREFIX: &str = "torchscript:";

/// The prefix that names a Python module spec (`FILE.py:NAME(args)`,
/// `package.module:NAME(args)`), built and run by kd's embedded Python.
pub const PYTHON_PREFIX: &str = "python:";

/// Whether `arch` names a network from PyTorch (`python:`, `torchscript:`)
/// rather than a zoo one.
pub fn is_foreign(arch: &str) -> bool {
    arch.starts_with(PREFIX) || arch.starts_with(PYTHON_PREFIX)
}

/// A model name fit for a run's folder (and a shell): a zoo name as it is,
/// its keyword arguments joined by `-`
/// (`vit_tiny_patch16_224(img_size=32,patch_size=4)` is
/// `vit_tiny_patch16_224-img_size=32-patch_size=4`), a Python spec's class
/// or function (`python:nets/a.py:Net(width=2)` is `Net`), a TorchScript
/// file's stem.
pub fn short_name(arch: &str) -> String {
    if let Some(spec) = arch.strip_prefix(PYTHON_PREFIX) {
        let call = spec.split_once(':').map_or(spec, |(_, c)| c);
        let end = call.find(['(', '[']).unwrap_or(call.len());
        return call[..end].to_string();
    }
    if let Some(file) = arch.strip_prefix(PREFIX) {
        let stem = Path::new(file).file_stem().unwrap_or_default();
        return stem.to_string_lossy().into_owned();
    }
    match arch.split_once('(') {
        Some((name, args)) => std::iter::once(name)
            .chain(args.trim_end_matches(')').split(',').map(str::trim))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-"),
        None => arch.to_string(),
    }
}

/// A network kd did not build: a TorchScript file, or a PyTorch module in
/// kd's embedded Python.
pub struct TorchScriptNet {
    module: Box<dyn ForeignModule>,
    file: PathBuf,
    /// The mode last set, so a forward switches only when it changes.
    training: Cell<Option<bool>>,
    /// Every buffer, to tell (and undo) what a training forward updates.
    buffers: Vec<Tensor>,
    /// Whether it has BatchNorm running statistics.
    batch_norm: bool,
    /// Each output's shape beyond the batch, from the first forward.
    shapes: std::cell::RefCell<Vec<(String, Vec<i64>)>>,
}

fn bad(file: &Path, reason: impl std::fmt::Display) -> ModelError {
    let python = file.to_string_lossy().starts_with(PYTHON_PREFIX);
    ModelError::InvalidConfig {
        family: if python { "python" } else { "torchscript" },
        reason: format!("{}: {reason}", file.display()),
    }
}

impl TorchScriptNet {
    /// Loads `file` on `p`'s device and adds its tensors under `p`.
    pub fn load(file: &Path, p: &nn::Path) -> Result<TorchScriptNet, ModelError> {
        if !file.is_file() {
            return Err(bad(file, "no such file"));
        }
        let module = kd_aten::JitModule::load(file, p.device()).map_err(|e| bad(file, e))?;
        Self::with_module(Box::new(module), file, p)
    }

    /// Builds the module a Python spec names, in kd's embedded Python, on
    /// `p`'s device and adds its tensors under `p`.
    pub fn from_python(spec: &str, p: &nn::Path) -> Result<TorchScriptNet, ModelError> {
        let name = Path::new(&format!("{PYTHON_PREFIX}{spec}")).to_path_buf();
        let module = kd_aten::PythonModule::load(spec, p.device()).map_err(|e| bad(&name, e))?;
        Self::with_module(Box::new(module), &name, p)
    }

    fn with_module(
        module: Box<dyn ForeignModule>,
        file: &Path,
        p: &nn::Path,
    ) -> Result<TorchScriptNet, ModelError> {
        module.add_to(p).map_err(|e| bad(file, e))?;
        let buffers = module.buffers().map_err(|e| bad(file, e))?;
        let batch_norm = buffers.iter().any(|(n, _)| n.ends_with("running_mean"));
        let kept: Vec<Tensor> = buffers.into_iter().map(|(_, t)| t).collect();
        Ok(TorchScriptNet {
            module,
            file: file.to_path_buf(),
            training: Cell::new(None),
            buffers: kept,
            batch_norm,
            shapes: Default::default(),
        })
    }

    fn mode(&self, train: bool) -> Result<(), ModelError> {
        if self.training.get() != Some(train) {
            self.module
                .set_train(train)
                .map_err(|e| bad(&self.file, e))?;
            self.training.set(Some(train));
        }
        Ok(())
    }

    /// The module's outputs as taps; an error names what it returned.
    pub fn try_taps(&self, xs: &Tensor, train: bool) -> Result<Taps, ModelError> {
        self.mode(train)?;
        let out = self.module.forward(xs).map_err(|e| bad(&self.file, e))?;
        self.same_shapes(&out)?;
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        let find = |k: &str| {
            out.iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t.shallow_clone())
        };
        let logits = find("logits").ok_or_else(|| {
            bad(
                &self.file,
                format!(
                    "forward returned a dict without \"logits\" (keys: {})",
                    names.join(", ")
                ),
            )
        })?;
        let depth = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("feat/")
                    .and_then(|k| k.parse::<usize>().ok())
            })
            .map(|k| k + 1)
            .max()
            .unwrap_or(0);
        // Absent taps stay undefined: methods are built against the taps
        // the probe forward showed, so none can ask for them.
        let tap = |k: String| find(&k).unwrap_or_else(Tensor::new);
        let known = |n: &str| {
            n == "logits"
                || n == "embed"
                || ["feat/", "preact/"].iter().any(|p| {
                    n.strip_prefix(p)
                        .is_some_and(|k| k.parse::<usize>().is_ok_and(|k| k < depth))
                })
        };
        if let Some(other) = names.iter().find(|n| !known(n)) {
            return Err(bad(
                &self.file,
                format!(
                    "forward returned `{other}`, which is not a tap; taps: logits, embed, feat/0..feat/N, preact/0..preact/N (preact/k only beside feat/k)"
                ),
            ));
        }
        Ok(Taps {
            feat: (0..depth).map(|k| tap(format!("feat/{k}"))).collect(),
            preact: (0..depth).map(|k| tap(format!("preact/{k}"))).collect(),
            embed: tap("embed".into()),
            logits,
            extra: Vec::new(),
        })
    }
}

impl TorchScriptNet {
    /// Methods size their connectors from the first forward's taps: an
    /// output whose shape beyond the batch changes later is an error.
    fn same_shapes(&self, out: &[(String, Tensor)]) -> Result<(), ModelError> {
        let beyond_batch = |t: &Tensor| t.size().get(1..).unwrap_or_default().to_vec();
        let mut seen = self.shapes.borrow_mut();
        if seen.is_empty() {
            *seen = out
                .iter()
                .map(|(n, t)| (n.clone(), beyond_batch(t)))
                .collect();
            return Ok(());
        }
        for (name, t) in out {
            let shape = &beyond_batch(t);
            if let Some((_, was)) = seen.iter().find(|(n, _)| n == name)
                && was != shape
            {
                return Err(bad(
                    &self.file,
                    format!(
                        "`{name}` changed shape from [B, {}] to [B, {}] between forwards; kd sizes methods from the first forward, so taps must keep their shape beyond the batch",
                        join(was),
                        join(shape)
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn join(dims: &[i64]) -> String {
    dims.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Network for TorchScriptNet {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        // The trait's forward cannot fail; the plan's check ran the same
        // forward first (`check_trainable`, the probe of the taps), so a
        // failure here is the module's own, reported as libtorch's are.
        self.try_taps(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }

    fn is_from_pytorch(&self) -> bool {
        true
    }

    fn check_trainable(&self, probe: &Tensor) -> Result<(), ModelError> {
        let before: Vec<Tensor> = self.buffers.iter().map(Tensor::copy).collect();
        tch::no_grad(|| self.try_taps(probe, true))?;
        let moved = self.buffers.iter().zip(&before).any(|(a, b)| !a.equal(b));
        for (t, b) in self.buffers.iter().zip(&before) {
            tch::no_grad(|| t.shallow_clone().copy_(b));
        }
        if self.batch_norm && !moved {
            return Err(bad(
                &self.file,
                "its BatchNorm layers do not update their running statistics in training mode: the module was traced in eval mode, which bakes BatchNorm into inference, so it cannot train (as a teacher it is fine); trace it after `model.train()`, or use `torch.jit.script`",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_names_fit_a_folder() {
        for (arch, want) in [
            ("resnet8x4", "resnet8x4"),
            (
                "vit_tiny_patch16_224(img_size=32, patch_size=4)",
                "vit_tiny_patch16_224-img_size=32-patch_size=4",
            ),
            ("python:nets/a.py:Net(width=2)", "Net"),
            (
                "python:torchvision.models:resnet18(num_classes=10)[feat/1=layer2]",
                "resnet18",
            ),
            ("python:m.py:Net", "Net"),
            ("torchscript:/tmp/x/student.pt", "student"),
        ] {
            assert_eq!(super::short_name(arch), want, "{arch}");
        }
    }
}

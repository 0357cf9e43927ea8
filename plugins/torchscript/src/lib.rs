//! A loss written in PyTorch, run by kd: a TorchScript module (saved with
//! `torch.jit.script(loss).save(FILE)`, or a Python spec
//! `losses.py:MyLoss(T=4)` that the venv's Python builds and scripts) whose
//! `forward(student: Dict[str, Tensor], teacher: Dict[str, Tensor],
//! target: Tensor)` returns the loss, or a `Dict[str, Tensor]` of named
//! terms. The taps named in the config are handed over under their names
//! (`feat/2`, `logits`, ...); the module's own parameters (connectors) train
//! with the student and are saved in checkpoints under their `state_dict`
//! names.

use kd_aten::ForeignModule;
use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The TorchScript file.
    pub file: String,
    /// Or the Python spec of the loss module: `FILE.py:NAME(args)` or
    /// `package.module:NAME(args)`.
    pub entry: String,
    /// Taps handed to `forward`, the same on both sides.
    pub taps: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: String::new(),
            entry: String::new(),
            taps: vec!["logits".into()],
        }
    }
}

pub struct TorchScriptLoss {
    module: Box<dyn ForeignModule>,
    file: String,
    taps: Vec<(String, TapRef, TapRef)>,
    training: Option<bool>,
}

impl Method for TorchScriptLoss {
    const NAME: &'static str = "torchscript";
    const SUMMARY: &'static str =
        "A loss written in PyTorch, as a TorchScript module (config: file, taps)";
    const SPEC_PREFIXES: &'static [(&'static str, &'static str)] =
        &[("python:", "entry"), ("torchscript:", "file")];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let device = cx.params().device();
        let (module, source) = match (cfg.file.is_empty(), cfg.entry.is_empty()) {
            (false, true) => {
                let path = std::path::Path::new(&cfg.file);
                if !path.is_file() {
                    return Err(cx.error(format!("`{}`: no such file", cfg.file)));
                }
                let m = kd_aten::JitModule::load(path, device)
                    .map_err(|e| cx.error(format!("`{}`: {e}", cfg.file)))?;
                (Box::new(m) as Box<dyn ForeignModule>, cfg.file)
            }
            (true, false) => {
                let m = kd_aten::PythonModule::load(&cfg.entry, device)
                    .map_err(|e| cx.error(format!("`{}`: {e}", cfg.entry)))?;
                (Box::new(m) as Box<dyn ForeignModule>, cfg.entry)
            }
            _ => {
                return Err(cx.error(
                    "needs one of `file` (torch.jit.script(loss).save(FILE)) or `entry` (FILE.py:NAME(args))",
                ));
            }
        };
        module
            .add_to(cx.params())
            .map_err(|e| cx.error(format!("`{source}`: {e}")))?;
        let mut taps = Vec::new();
        for name in &cfg.taps {
            let (s, t) = cx.tap_pair(name)?;
            taps.push((name.clone(), s, t));
        }
        Ok(TorchScriptLoss {
            module,
            file: source,
            taps,
            training: None,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| {
            kd_core::KdError::Invalid(format!("method `torchscript`, `{}`: {e}", self.file))
        };
        if self.training != Some(io.train) {
            self.module.set_train(io.train).map_err(|e| fail(&e))?;
            self.training = Some(io.train);
        }
        let side = |f: &dyn Fn(&(String, TapRef, TapRef)) -> TapRef| -> Vec<(String, Tensor)> {
            self.taps
                .iter()
                .map(|x| (x.0.clone(), io.tap(f(x)).shallow_clone()))
                .collect()
        };
        let (s, t) = (side(&|x| x.1), side(&|x| x.2));
        for (name, term) in self
            .module
            .loss(&s, &t, io.target())
            .map_err(|e| fail(&e))?
        {
            if term.numel() != 1 {
                return Err(fail(&format!(
                    "loss term `{name}` has shape {:?}; each term must be a scalar",
                    term.size()
                )));
            }
            out.push(name, term.reshape([]));
        }
        Ok(())
    }
}

register_method!(TorchScriptLoss);

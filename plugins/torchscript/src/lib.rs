//! A loss written in PyTorch, run by kd: `python` (a module of the user's,
//! `losses.py:MyLoss(T=4)`, run in kd's embedded Python) or `torchscript`
//! (a file saved with `torch.jit.script(loss).save(FILE)`). Its
//! `forward(student: Dict[str, Tensor], teacher: Dict[str, Tensor],
//! target: Tensor)` returns the loss, or a `Dict[str, Tensor]` of named
//! terms, each logged, weighted and scheduled like a plugin's. The taps
//! named in the config are handed over under their names (`feat/2`,
//! `logits`, ...); the module's own parameters (connectors) train with the
//! student and are saved in checkpoints under their `state_dict` names.

use kd_aten::ForeignModule;
use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PythonConfig {
    /// The loss module: `FILE.py:NAME(args)` or `package.module:NAME(args)`.
    pub entry: String,
    /// Taps handed to `forward`, the same on both sides.
    pub taps: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TorchScriptConfig {
    /// The TorchScript file.
    pub file: String,
    /// Taps handed to `forward`, the same on both sides.
    pub taps: Vec<String>,
}

impl Default for PythonConfig {
    fn default() -> Self {
        PythonConfig {
            entry: String::new(),
            taps: vec!["logits".into()],
        }
    }
}

impl Default for TorchScriptConfig {
    fn default() -> Self {
        TorchScriptConfig {
            file: String::new(),
            taps: vec!["logits".into()],
        }
    }
}

/// A foreign loss module and the taps it reads.
pub struct ForeignLoss {
    module: Box<dyn ForeignModule>,
    method: &'static str,
    source: String,
    taps: Vec<(String, TapRef, TapRef)>,
    training: Option<bool>,
}

impl ForeignLoss {
    fn new(
        method: &'static str,
        module: Box<dyn ForeignModule>,
        source: String,
        names: &[String],
        cx: &mut BuildCx,
    ) -> Result<Self> {
        module
            .add_to(cx.params())
            .map_err(|e| cx.error(format!("`{source}`: {e}")))?;
        let mut taps = Vec::new();
        for name in names {
            let (s, t) = cx.tap_pair(name)?;
            taps.push((name.clone(), s, t));
        }
        Ok(ForeignLoss {
            module,
            method,
            source,
            taps,
            training: None,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| {
            KdError::Invalid(format!("method `{}`, `{}`: {e}", self.method, self.source))
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
        let terms = self
            .module
            .loss(&s, &t, io.target())
            .map_err(|e| fail(&e))?;
        for (name, term) in terms {
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

pub struct PythonLoss(ForeignLoss);

impl Method for PythonLoss {
    const NAME: &'static str = "python";
    const SUMMARY: &'static str =
        "A loss written in PyTorch, run in kd's embedded Python (config: entry, taps)";
    const SPEC_PREFIXES: &'static [(&'static str, &'static str)] = &[("python:", "entry")];
    type Config = PythonConfig;

    fn build(cfg: PythonConfig, cx: &mut BuildCx) -> Result<Self> {
        if cfg.entry.is_empty() {
            return Err(cx.error("needs `entry`: the loss module, FILE.py:NAME(args)"));
        }
        let m = kd_aten::PythonModule::load(&cfg.entry, cx.params().device())
            .map_err(|e| cx.error(format!("`{}`: {e}", cfg.entry)))?;
        ForeignLoss::new(Self::NAME, Box::new(m), cfg.entry, &cfg.taps, cx).map(PythonLoss)
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        self.0.losses(io, out)
    }
}

pub struct TorchScriptLoss(ForeignLoss);

impl Method for TorchScriptLoss {
    const NAME: &'static str = "torchscript";
    const SUMMARY: &'static str =
        "A loss written in PyTorch, saved as a TorchScript file (config: file, taps)";
    const SPEC_PREFIXES: &'static [(&'static str, &'static str)] = &[("torchscript:", "file")];
    type Config = TorchScriptConfig;

    fn build(cfg: TorchScriptConfig, cx: &mut BuildCx) -> Result<Self> {
        if cfg.file.is_empty() {
            return Err(cx.error("needs `file`: torch.jit.script(loss).save(FILE)"));
        }
        let path = std::path::Path::new(&cfg.file);
        if !path.is_file() {
            return Err(cx.error(format!("`{}`: no such file", cfg.file)));
        }
        let m = kd_aten::JitModule::load(path, cx.params().device())
            .map_err(|e| cx.error(format!("`{}`: {e}", cfg.file)))?;
        ForeignLoss::new(Self::NAME, Box::new(m), cfg.file, &cfg.taps, cx).map(TorchScriptLoss)
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        self.0.losses(io, out)
    }
}

register_method!(PythonLoss);
register_method!(TorchScriptLoss);

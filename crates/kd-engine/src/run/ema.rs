//! The stage's EMA network (`ema:` in the stage plan): a second instance
//! of the network the stage trains, its weights the moving average of the
//! trained ones, evaluated beside it every epoch, saved in checkpoints
//! (`ema.<var>`) and as `<stage>.ema.safetensors`.

use tch::Tensor;

use super::nets::{Exec, Net, named_vars};
use crate::ema::ema_update;
use crate::plan::EmaPlan;
use crate::tensors::TensorFile;
use crate::{EngineError, Result};

pub(crate) struct EmaNet {
    pub(crate) net: Net,
    plan: EmaPlan,
    /// The average's variables and the trained network's, paired by name
    /// once (`set`), with which of them are parameters: the per-step
    /// update only walks these lists.
    pairs: (Vec<Tensor>, Vec<Tensor>, Vec<bool>),
}

impl EmaNet {
    /// A fresh `arch` network for the average. Building it draws from
    /// torch's generator: call it before the stage seeds its own draws.
    pub(crate) fn build(arch: &str, classes: i64, exec: &Exec, plan: EmaPlan) -> Result<EmaNet> {
        let mut net = Net::zoo(arch, classes, exec.device)?;
        if exec.channels_last {
            net.use_channels_last()?;
        }
        net.vs.freeze();
        // Only ever evaluated for its accuracy: a ViT skips the work no
        // logit needs (`Network::read_taps`).
        net.model.read_taps(Some(&[kd_core::Tap::Logits]));
        Ok(EmaNet {
            net,
            plan,
            pairs: Default::default(),
        })
    }

    /// Pairs of (average, network) tensors by name, and which are parameters.
    fn pairs(&self, source: &Net) -> Result<(Vec<Tensor>, Vec<Tensor>, Vec<bool>)> {
        let mine = named_vars(&self.net.vs, "");
        let theirs = named_vars(&source.vs, "");
        if mine.len() != theirs.len() || mine.iter().zip(&theirs).any(|(a, b)| a.0 != b.0) {
            return Err(EngineError::Plan(
                "the EMA network's variables differ from the trained network's".into(),
            ));
        }
        let is_param = theirs.iter().map(|(_, t)| t.requires_grad()).collect();
        let (_, e): (Vec<_>, Vec<_>) = mine.into_iter().unzip();
        let (_, m): (Vec<_>, Vec<_>) = theirs.into_iter().unzip();
        Ok((e, m, is_param))
    }

    /// The average starts as a copy of `source` (timm copies the model),
    /// the network it follows from then on.
    pub(crate) fn set(&mut self, source: &Net) -> Result<()> {
        self.pairs = self.pairs(source)?;
        let (e, m, _) = &self.pairs;
        tch::no_grad(|| -> Result<()> {
            for (e, m) in e.iter().zip(m) {
                e.shallow_clone().f_copy_(m)?;
            }
            Ok(())
        })
    }

    /// After the stage's `step`-th optimiser update of the network `set`
    /// gave.
    pub(crate) fn update(&self, step: u64) -> Result<()> {
        let (e, m, is_param) = &self.pairs;
        ema_update(&self.plan, step, e, m, is_param)
    }

    /// The average as the checkpoint holds it.
    pub(crate) fn restore(&self, file: &TensorFile, path: &std::path::Path) -> Result<()> {
        super::nets::load_into(&self.net.vs, file, "ema.", path)
    }
}

//! Cross-entropy on the labels: the supervised term of every recipe.

use kd_core::{BuildCx, Losses, Method, Result, Side, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Label smoothing ε (0 = plain cross-entropy, the reference setting).
    pub label_smoothing: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            label_smoothing: 0.0,
        }
    }
}

pub struct Ce {
    logits: TapRef,
    smoothing: f64,
}

impl Method for Ce {
    const NAME: &'static str = "ce";
    const SUMMARY: &'static str = "Cross-entropy with the ground-truth labels";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.label_smoothing) {
            return Err(cx.error(format!(
                "label_smoothing must be in [0, 1), got {}",
                cfg.label_smoothing
            )));
        }
        Ok(Ce {
            logits: cx.tap(Side::Student, "logits")?,
            smoothing: cfg.label_smoothing,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let logits = io.tap(self.logits);
        let loss = logits.log_softmax(1, logits.kind()).nll_loss(io.target());
        let loss = if self.smoothing > 0.0 {
            let uniform = -logits
                .log_softmax(1, logits.kind())
                .mean_dim(1, false, logits.kind());
            loss * (1.0 - self.smoothing) + uniform.mean(logits.kind()) * self.smoothing
        } else {
            loss
        };
        out.push("ce", loss);
        Ok(())
    }
}

register_method!(Ce);

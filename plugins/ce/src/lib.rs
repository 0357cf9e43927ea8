//! Cross-entropy on the labels: the supervised term of every recipe.
//!
//! On a mixed batch (Mixup/CutMix: `StepIo::soft_target`) it is timm's
//! `SoftTargetCrossEntropy` toward `io.label_distribution(classes, ε)`
//! (the mixed labels smoothed as timm's `mixup_target` smooths them);
//! otherwise PyTorch's `cross_entropy(label_smoothing=ε)`, as before.

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
        if io.soft_target.is_some() {
            let target = io.label_distribution(logits.size()[1], self.smoothing);
            let loss = (-target * logits.log_softmax(-1, logits.kind()))
                .sum_dim_intlist(-1, false, logits.kind())
                .mean(logits.kind());
            out.push("ce", loss);
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use kd_core::testing;
    use tch::{Kind, Tensor};

    use super::*;

    /// On mixed batches `ce` is timm's `SoftTargetCrossEntropy` toward
    /// `mixup_target(y, classes, λ, ε)`, computed by timm in
    /// `tests/golden/mixup.py`; the distributions are smoothed after mixing
    /// here and before there, which moves the last bits only.
    #[test]
    fn soft_targets_give_timms_soft_target_cross_entropy() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/data/mixup.safetensors");
        let f: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .collect();
        let (logits, y) = (&f["ce/logits"], &f["ce/labels"]);
        let s = testing::taps(vec![], logits.shallow_clone());
        for k in 0..4 {
            let lam = f[&format!("ce/{k}/lam")].double_value(&[0]);
            let smoothing = f[&format!("ce/{k}/smoothing")].double_value(&[0]);
            let want = f[&format!("ce/{k}/loss")].double_value(&[0]);
            let y1 = y.one_hot(5).to_kind(Kind::Float);
            let soft = &y1 * lam + y1.flip([0]) * (1.0 - lam);
            let cfg = Config {
                label_smoothing: smoothing,
            };
            let mut ce = testing::build_typed::<Ce>(cfg.clone(), &s, None).unwrap();
            let io = StepIo {
                soft_target: Some(&soft),
                ..testing::io(&s, None, y)
            };
            let got = ce.losses_with(&io).unwrap().total().double_value(&[]);
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "case {k} (λ {lam}, ε {smoothing}): {got} vs timm's {want}"
            );
            // Unmixed, the hard-label path gives the same value.
            let hard = testing::build_typed::<Ce>(cfg, &s, None)
                .unwrap()
                .losses_with(&testing::io(&s, None, y))
                .unwrap()
                .total()
                .double_value(&[]);
            if lam == 1.0 {
                assert!((hard - want).abs() <= 1e-6 * want.abs(), "case {k}: {hard}");
            } else {
                assert!(
                    (hard - want).abs() > 1e-3,
                    "case {k}: mixing changes the loss"
                );
            }
        }
    }
}

//! SRD, "Understanding the Role of the Projector in Knowledge Distillation"
//! (Miles & Mikolajczyk, AAAI 2024), as torchdistill's `SRDLoss` with its
//! `SRDModelWrapper`s: the student's pooled feature goes through a linear
//! projector, both sides' pooled features through a BatchNorm without
//! affine parameters (batch statistics while training), and
//! `2·log Σ|ẑ_s − ẑ_t|^p + KL(softmax(t/T) ‖ softmax(s/T))` (batch mean).

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Feature compared, the same tap on both sides: a vector, or a map
    /// averaged over its positions (the wrappers' `z.mean(-1).mean(-1)` of
    /// `layer4`'s output, which is `embed`).
    pub tap: String,
    /// `p` of the feature term (torchdistill's official config: 4).
    pub exponent: f64,
    /// Softmax temperature of the KL term (no T² factor, as the reference).
    #[serde(rename = "T")]
    pub t: f64,
    /// The BatchNorms' `eps` (the official config's 1e-4).
    pub eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "embed".into(),
            exponent: 4.0,
            t: 1.0,
            eps: 1e-4,
        }
    }
}

pub struct Srd {
    feat: (TapRef, TapRef),
    logits: (TapRef, TapRef),
    linear: nn::Linear,
    norm_s: nn::BatchNorm,
    norm_t: nn::BatchNorm,
    cfg: Config,
}

/// `[B, C]` from a vector or a `[B, C, H, W]` map.
fn pooled(x: &Tensor) -> Tensor {
    if x.dim() == 4 {
        x.mean_dim(-1, false, Kind::Float)
            .mean_dim(-1, false, Kind::Float)
    } else {
        x.shallow_clone()
    }
}

impl Method for Srd {
    const NAME: &'static str = "srd";
    const SUMMARY: &'static str = "Understanding the Role of the Projector in Knowledge Distillation (Miles & Mikolajczyk, 2024)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        for (name, v) in [("exponent", cfg.exponent), ("T", cfg.t), ("eps", cfg.eps)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(cx.error(format!("{name} must be a finite number > 0, got {v}")));
            }
        }
        let feat = cx.tap_pair(&cfg.tap)?;
        let logits = cx.tap_pair("logits")?;
        let (ss, ts) = (cx.shape(feat.0), cx.shape(feat.1));
        if ss.is_empty() || ts.is_empty() || ss.len() == 2 || ts.len() == 2 {
            return Err(cx.error(format!(
                "tap `{}` is neither a vector nor a feature map (student {ss:?}, teacher {ts:?})",
                cfg.tap
            )));
        }
        let (cs, ct) = (ss[0], ts[0]);
        let p = cx.params();
        let norm = nn::BatchNormConfig {
            affine: false,
            eps: cfg.eps,
            ..Default::default()
        };
        Ok(Srd {
            feat,
            logits,
            linear: nn::linear(p / "linear", cs, ct, Default::default()),
            norm_s: nn::batch_norm1d(p / "norm_s", ct, norm),
            norm_t: nn::batch_norm1d(p / "norm_t", ct, norm),
            cfg,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let z_s = self
            .norm_s
            .forward_t(&self.linear.forward(&pooled(io.tap(self.feat.0))), io.train);
        let z_t = self
            .norm_t
            .forward_t(&pooled(io.tap(self.feat.1)), io.train);
        let gap = (z_s - z_t).abs().pow_tensor_scalar(self.cfg.exponent);
        out.push("feat", gap.sum(Kind::Float).log() * 2.0);
        let t = self.cfg.t;
        let log_s = (io.tap(self.logits.0) / t).log_softmax(1, Kind::Float);
        let log_t = (io.tap(self.logits.1) / t).log_softmax(1, Kind::Float);
        let batch = log_s.size()[0] as f64;
        let kl = (log_t.exp() * (&log_t - log_s)).sum(Kind::Float) / batch;
        out.push("kl", kl);
        Ok(())
    }
}

register_method!(Srd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(seed: i64, b: i64, c: i64, classes: i64) -> Taps {
        tch::manual_seed(seed);
        let map = Tensor::randn([b, c, 2, 2], tch::kind::FLOAT_CPU);
        testing::maps(vec![map], classes)
    }

    #[test]
    fn positive_gap_and_refusals() {
        let (s, t) = (taps(1, 4, 3, 5), taps(2, 4, 6, 5));
        let l = testing::loss::<Srd>(serde_json::json!({"tap": "feat/0"}), &s, Some(&t)).unwrap();
        assert!(l.is_finite(), "{l}");
        let e = testing::loss::<Srd>(serde_json::json!({"tap": "feat/0", "T": 0.0}), &s, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("T must be a finite number > 0"), "{e}");
        let e = testing::loss::<Srd>(serde_json::json!({"tap": "feat/9"}), &s, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown tap `feat/9`"), "{e}");
    }
}

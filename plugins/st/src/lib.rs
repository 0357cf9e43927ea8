//! Soft targets (Hinton et al., 2015): KL(p_t^T || p_s^T) · T²; optionally
//! on per-sample standardised logits (logit standardisation, Sun et al., 2024).

use kd_core::{
    BuildCx, Losses, Method, Result, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Softmax temperature.
    #[serde(rename = "T")]
    pub t: f64,
    /// Logit standardisation: z-score each sample's logits before `/ T`
    /// (`T` is then the LS paper's base temperature).
    pub ls: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { t: 4.0, ls: false }
    }
}

pub struct St {
    s: TapRef,
    t: TapRef,
    temp: f64,
    ls: bool,
}

/// `(z - mean) / (1e-7 + std)` per sample with the unbiased std, as the LS
/// code's `normalize` (logit-standardization-KD, mdistiller/distillers/KD.py).
fn standardize(z: &Tensor) -> Tensor {
    let mean = z.mean_dim(-1, true, z.kind());
    (z - mean) / (z.std_dim(-1, true, true) + 1e-7)
}

impl Method for St {
    const NAME: &'static str = "st";
    const SUMMARY: &'static str =
        "Distilling the Knowledge in a Neural Network (Hinton et al., 2015)";
    const SCHEDULABLE: &'static [&'static str] = &["T"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.t <= 0.0 {
            return Err(cx.error(format!("T must be positive, got {}", cfg.t)));
        }
        let (s, t) = cx.tap_pair("logits")?;
        Ok(St {
            s,
            t,
            temp: cfg.t,
            ls: cfg.ls,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (mut s, mut t) = (
            io.tap(self.s).shallow_clone(),
            io.tap(self.t).shallow_clone(),
        );
        if self.ls {
            (s, t) = (standardize(&s), standardize(&t));
        }
        let kind = s.kind();
        let log_p_s = (&s / self.temp).log_softmax(1, kind);
        let log_p_t = (&t / self.temp).log_softmax(1, kind);
        // batchmean KL, as F.kl_div(..., reduction='batchmean'); T² keeps the
        // gradient scale independent of T.
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(kind) / s.size()[0] as f64;
        out.push("st", kl * (self.temp * self.temp));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let mut fields = [("T", &mut self.temp)];
        set_scheduled_field(Self::NAME, &mut fields, field, value, |_, v| {
            match v > 0.0 {
                true => Ok(()),
                false => Err(format!("T must be positive, got {v}")),
            }
        })
    }
}

register_method!(St);

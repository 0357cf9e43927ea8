//! Soft targets (Hinton et al., 2015): KL(p_t^T || p_s^T) · T².

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Softmax temperature.
    #[serde(rename = "T")]
    pub t: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { t: 4.0 }
    }
}

pub struct St {
    s: TapRef,
    t: TapRef,
    temp: f64,
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
        Ok(St { s, t, temp: cfg.t })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (io.tap(self.s), io.tap(self.t));
        let kind = s.kind();
        let log_p_s = (s / self.temp).log_softmax(1, kind);
        let log_p_t = (t / self.temp).log_softmax(1, kind);
        // batchmean KL, as F.kl_div(..., reduction='batchmean'); T² keeps the
        // gradient scale independent of T.
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(kind) / s.size()[0] as f64;
        out.push("st", kl * (self.temp * self.temp));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        match field {
            "T" if value > 0.0 => {
                self.temp = value;
                Ok(())
            }
            "T" => Err(KdError::Plan {
                method: "st".into(),
                msg: format!("scheduled T must be positive, got {value}"),
            }),
            _ => Err(KdError::Plan {
                method: "st".into(),
                msg: format!("field `{field}` cannot be scheduled; schedulable: T"),
            }),
        }
    }
}

register_method!(St);

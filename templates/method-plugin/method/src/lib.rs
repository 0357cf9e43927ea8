//! Cosine logit matching, as a template for a method of your own: the
//! student's logits point where the teacher's do,
//! `L = mean_b (1 - cos(z_s, z_t / T))` (the temperature only scales the
//! teacher's logits, which a cosine ignores; it is here to show a
//! schedulable field). Replace the equation and keep the shape: a typed
//! config with defaults, `build` that asks for taps, `losses` that pushes
//! named terms, and `register_method!`.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Teacher temperature (no effect on a cosine; see the module docs).
    #[serde(rename = "T")]
    pub t: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { t: 1.0 }
    }
}

pub struct CosLogits {
    s: TapRef,
    t: TapRef,
    temperature: f64,
}

impl Method for CosLogits {
    const NAME: &'static str = "cos_logits";
    const SUMMARY: &'static str = "Cosine logit matching (kd's method-plugin template)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t) = cx.tap_pair("logits")?;
        Ok(CosLogits {
            s,
            t,
            temperature: cfg.t,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (zs, zt) = (io.tap(self.s), io.tap(self.t) / self.temperature);
        let cos = Tensor::cosine_similarity(zs, &zt, 1, 1e-8);
        out.push("cos", (1f64 - cos).mean(Kind::Float));
        Ok(())
    }
}

/// Links this crate into a binary (see `../kd/src/main.rs`), so that
/// `register_method!` reaches kd's registry.
pub fn link() {}

register_method!(CosLogits);

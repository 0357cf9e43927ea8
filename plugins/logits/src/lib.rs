//! Logit regression (Ba & Caruana, 2014): mean squared error between logits.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {}

pub struct Logits {
    s: TapRef,
    t: TapRef,
}

impl Method for Logits {
    const NAME: &'static str = "logits";
    const SUMMARY: &'static str = "Do Deep Nets Really Need to be Deep? (Ba & Caruana, 2014)";
    type Config = Config;

    fn build(_: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t) = cx.tap_pair("logits")?;
        Ok(Logits { s, t })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        out.push(
            "logits",
            io.tap(self.s)
                .mse_loss(io.tap(self.t), tch::Reduction::Mean),
        );
        Ok(())
    }
}

register_method!(Logits);

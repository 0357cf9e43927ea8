//! Overhaul of feature distillation (Heo et al., 2019): before the ReLU, the
//! teacher's negative responses are raised to a per-channel margin (the mean
//! negative response), the student passes a 1×1 conv + BatchNorm connector,
//! and a partial L2 skips positions where the student is already below a
//! non-positive teacher: `mean((C(s) - t̃)² · [¬(C(s) ≤ t̃ ∧ t̃ ≤ 0)])`,
//! `t̃ = max(t, m)`. One connector per tap; the loss is their mean.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, Tap, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init, Module, ModuleT};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Pre-activation taps (`preact/k`): the margin is defined before the ReLU.
    pub taps: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { taps: vec!["preact/1".into(), "preact/2".into(), "preact/3".into()] }
    }
}

/// `connector` of one tap: `0` the 1×1 conv, `1` the BatchNorm.
struct Stage {
    s: TapRef,
    t: TapRef,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

pub struct Ofd {
    stages: Vec<Stage>,
}

/// Per-channel mean of the negative entries, over batch and positions.
fn margin(t: &Tensor) -> Tensor {
    let mask = t.lt(0.0).to_kind(t.kind());
    let dims: &[i64] = &[0, 2, 3];
    (t * &mask).sum_dim_intlist(dims, true, None::<Kind>) / (mask.sum_dim_intlist(dims, true, None::<Kind>) + 1e-6)
}

fn stage(name: &str, k: usize, cx: &mut BuildCx) -> Result<Stage> {
    let (s, t) = cx.tap_pair(name)?;
    if !matches!(s.tap, Tap::Preact(_)) {
        return Err(cx.error(format!(
            "tap `{name}` is not a pre-activation; OFD's margin needs `preact/k` taps (valid: preact/1, preact/2, ...)"
        )));
    }
    let (ss, ts) = (cx.shape(s), cx.shape(t));
    if ss.len() != 3 || ts.len() != 3 || ss[1..] != ts[1..] {
        return Err(cx.error(format!(
            "tap `{name}` must have the same resolution on both sides, got student {ss:?}, teacher {ts:?}"
        )));
    }
    let p = cx.params() / k / "connector";
    let ws_init = Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };
    let conv = nn::conv2d(&p / 0, ss[0], ts[0], 1, nn::ConvConfig { bias: false, ws_init, ..Default::default() });
    let bn_cfg = nn::BatchNormConfig { ws_init: Init::Const(1.0), bs_init: Init::Const(0.0), ..Default::default() };
    let bn = nn::batch_norm2d(&p / 1, ts[0], bn_cfg);
    Ok(Stage { s, t, conv, bn })
}

impl Method for Ofd {
    const NAME: &'static str = "ofd";
    const SUMMARY: &'static str = "A Comprehensive Overhaul of Feature Distillation (Heo et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one tap"));
        }
        let stages = cfg.taps.iter().enumerate().map(|(k, name)| stage(name, k, cx)).collect::<Result<_>>()?;
        Ok(Ofd { stages })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut total: Option<Tensor> = None;
        for st in &self.stages {
            let t = io.tap(st.t);
            let t = t.maximum(&margin(t));
            // BatchNorm uses batch statistics and updates its running ones in training.
            let s = st.bn.forward_t(&st.conv.forward(io.tap(st.s)), io.train);
            let mask = s.le_tensor(&t).logical_and(&t.le(0.0)).to_kind(s.kind()) * -1.0 + 1.0;
            let l = ((&s - &t).pow_tensor_scalar(2) * mask).mean(s.kind());
            total = Some(match total {
                Some(acc) => acc + l,
                None => l,
            });
        }
        let total = total.ok_or_else(|| KdError::Invalid("ofd has no taps".into()))?;
        out.push("ofd", total / self.stages.len() as f64);
        Ok(())
    }
}

register_method!(Ofd);

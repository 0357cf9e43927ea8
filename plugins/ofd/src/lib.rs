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
        Config {
            taps: vec!["preact/1".into(), "preact/2".into(), "preact/3".into()],
        }
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
    (t * &mask).sum_dim_intlist(dims, true, None::<Kind>)
        / (mask.sum_dim_intlist(dims, true, None::<Kind>) + 1e-6)
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
    let ws_init = Init::Kaiming {
        dist: NormalOrUniform::Normal,
        fan: FanInOut::FanOut,
        non_linearity: NonLinearity::ReLU,
    };
    let conv = nn::conv2d(
        &p / 0,
        ss[0],
        ts[0],
        1,
        nn::ConvConfig {
            bias: false,
            ws_init,
            ..Default::default()
        },
    );
    let bn_cfg = nn::BatchNormConfig {
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        ..Default::default()
    };
    let bn = nn::batch_norm2d(&p / 1, ts[0], bn_cfg);
    Ok(Stage { s, t, conv, bn })
}

impl Method for Ofd {
    const NAME: &'static str = "ofd";
    const SUMMARY: &'static str =
        "A Comprehensive Overhaul of Feature Distillation (Heo et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one tap"));
        }
        let stages = cfg
            .taps
            .iter()
            .enumerate()
            .map(|(k, name)| stage(name, k, cx))
            .collect::<Result<_>>()?;
        Ok(Ofd { stages })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut total: Option<Tensor> = None;
        for st in &self.stages {
            let t = io.tap(st.t);
            let t = t.maximum(&margin(t));
            // BatchNorm uses batch statistics and updates its running ones in training.
            let s = st.bn.forward_t(&st.conv.forward(io.tap(st.s)), io.train);
            // Skipped where both the student and the teacher are at or below
            // the margin side: the partial L2 of OFD.
            let skip = s.le_tensor(&t).logical_and(&t.le(0.0));
            let mask = skip.logical_not().to_kind(s.kind());
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

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::Device;

    use super::*;

    const F: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn taps(fm: Tensor) -> Taps {
        testing::preacts(vec![fm], 3)
    }

    /// Builds on `tap` with the connector's conv set to the identity.
    fn build(tap: &str, s: &Taps, t: &Taps) -> Result<(Ofd, nn::VarStore)> {
        let cfg = Config {
            taps: vec![tap.into()],
        };
        let built = testing::build_typed::<Ofd>(cfg, s, Some(t))?;
        let mut w = built.vs.variables()["0.connector.0.weight"].shallow_clone();
        let c = w.size()[0];
        tch::no_grad(|| w.copy_(&Tensor::eye(c, F).view([c, c, 1, 1])));
        Ok((built.method, built.vs))
    }

    fn step(m: &mut Ofd, s: &Taps, t: &Taps, train: bool) -> f64 {
        let target = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
        let io = StepIo {
            train,
            ..testing::io(s, Some(t), &target)
        };
        let mut out = Losses::default();
        m.losses(&io, &mut out).unwrap();
        out.total().double_value(&[])
    }

    fn eval_loss(s: &Taps, t: &Taps) -> f64 {
        step(&mut build("preact/0", s, t).unwrap().0, s, t, false)
    }

    #[test]
    fn margin_and_partial_l2_by_hand() {
        let full = |v: f64| taps(Tensor::full([2, 2, 2, 2], v, F));
        let bn = 1.0 / (1.0f64 + 1e-5).sqrt(); // eval BN with running mean 0, var 1
        // Positive teacher: margin 0 leaves it; every position counts: (0 - 2)².
        assert!((eval_loss(&full(0.0), &full(2.0)) - 4.0).abs() < 1e-5);
        // All-negative teacher: margin ≈ -1 is the teacher itself. A student
        // below it is skipped, one above it is penalised: (0 - (-1))².
        assert!(eval_loss(&full(-3.0), &full(-1.0)).abs() < 1e-9);
        let l = eval_loss(&full(0.5), &full(-1.0));
        assert!((l - (0.5 * bn + 1.0).powi(2)).abs() < 1e-4, "{l}");
        let vs = build("preact/0", &full(0.0), &full(0.0)).unwrap().1;
        let mut names: Vec<_> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "0.connector.0.weight",
                "0.connector.1.bias",
                "0.connector.1.running_mean",
                "0.connector.1.running_var",
                "0.connector.1.weight"
            ]
        );
    }

    #[test]
    fn running_statistics_move_only_in_training() {
        let s = taps(Tensor::arange(16, F).view([2, 2, 2, 2]));
        let t = taps(Tensor::zeros([2, 2, 2, 2], F));
        let (mut m, vs) = build("preact/0", &s, &t).unwrap();
        step(&mut m, &s, &t, false);
        let mean = vs.variables()["0.connector.1.running_mean"].shallow_clone();
        assert_eq!(mean.abs().sum(Kind::Float).double_value(&[]), 0.0);
        step(&mut m, &s, &t, true);
        // Channel 0 holds 0..3 and 8..11 (mean 5.5), channel 1 4..7, 12..15 (9.5); momentum 0.1.
        let got = Vec::<f64>::try_from(
            vs.variables()["0.connector.1.running_mean"].to_kind(Kind::Double),
        )
        .unwrap();
        assert!(
            (got[0] - 0.55).abs() < 1e-6 && (got[1] - 0.95).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn refuses_post_activation_taps() {
        let s = taps(Tensor::zeros([2, 2, 2, 2], F));
        let err = build("feat/0", &s, &s).err().unwrap().to_string();
        assert!(
            err.contains("tap `feat/0` is not a pre-activation") && err.contains("preact/k"),
            "{err}"
        );
    }
}

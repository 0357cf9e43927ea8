//! Attention feature distillation (Wang et al., 2020), as KD-Zoo implements
//! it: per-channel weights ρ from an SE block on the pooled teacher map,
//! `ρ = sigmoid(W₂ relu(W₁ avgpool(t)))` normalised to sum to one, weight the
//! mean squared distance of each channel's L2-normalised maps:
//! `mean_b Σ_c ρ_bc · mean_hw (s/‖s‖ - t/‖t‖)²`. One block per tap; the loss
//! is their mean.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub taps: Vec<String>,
    /// Hidden width of the attention block, as a multiple of the channels.
    pub att_f: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            taps: vec!["feat/1".into(), "feat/2".into(), "feat/3".into()],
            att_f: 1.0,
        }
    }
}

const EPS: f64 = 1e-6;

/// `attention` of one tap: `0` conv, `1` ReLU, `2` conv, all 1×1 with bias.
struct Stage {
    s: TapRef,
    t: TapRef,
    attention: nn::Sequential,
}

pub struct Afd {
    stages: Vec<Stage>,
}

fn conv1x1(p: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    let ws_init = Init::Kaiming {
        dist: NormalOrUniform::Normal,
        fan: FanInOut::FanOut,
        non_linearity: NonLinearity::ReLU,
    };
    nn::conv2d(
        p,
        i,
        o,
        1,
        nn::ConvConfig {
            ws_init,
            bs_init: Init::Const(0.0),
            ..Default::default()
        },
    )
}

fn stage(att_f: f64, name: &str, k: usize, cx: &mut BuildCx) -> Result<Stage> {
    let (s, t) = cx.tap_pair(name)?;
    let (ss, ts) = (cx.shape(s), cx.shape(t));
    // No connector: the maps are compared channel by channel.
    if ts.len() != 3 || ss != ts {
        return Err(cx.error(format!(
            "tap `{name}` must be a feature map of the same shape on both sides (AFD has no connector), got student {ss:?}, teacher {ts:?}"
        )));
    }
    let mid = (ts[0] as f64 * att_f) as i64;
    if mid < 1 {
        return Err(cx.error(format!(
            "att_f = {att_f} leaves no hidden channels for tap `{name}`"
        )));
    }
    let p = cx.params() / k / "attention";
    let attention = nn::seq()
        .add(conv1x1(&p / 0, ts[0], mid))
        .add_fn(Tensor::relu)
        .add(conv1x1(&p / 2, mid, ts[0]));
    Ok(Stage { s, t, attention })
}

/// Each channel's map divided by its L2 norm (plus ε).
fn normalise(fm: &Tensor) -> Tensor {
    fm / (fm.norm_scalaropt_dim(2, [2, 3], true) + EPS)
}

impl Method for Afd {
    const NAME: &'static str = "afd";
    const SUMMARY: &'static str =
        "Pay Attention to Features, Transfer Learn Faster CNNs (Wang et al., 2020)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(cfg.att_f > 0.0 && cfg.att_f.is_finite()) {
            return Err(cx.error(format!("att_f must be positive, got {}", cfg.att_f)));
        }
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one tap"));
        }
        let stages = cfg
            .taps
            .iter()
            .enumerate()
            .map(|(k, name)| stage(cfg.att_f, name, k, cx))
            .collect::<Result<_>>()?;
        Ok(Afd { stages })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut total: Option<Tensor> = None;
        for st in &self.stages {
            let (s, t) = (io.tap(st.s), io.tap(st.t));
            let b = t.size()[0];
            let rho = st
                .attention
                .forward(&t.adaptive_avg_pool2d([1, 1]))
                .reshape([b, -1])
                .sigmoid();
            let rho = &rho / rho.sum_dim_intlist(1, true, None::<Kind>);
            let dist = (normalise(s) - normalise(t)).pow_tensor_scalar(2).mean_dim(
                &[2i64, 3][..],
                false,
                None::<Kind>,
            );
            let l = (rho * dist)
                .sum_dim_intlist(1, false, None::<Kind>)
                .mean_dim(0, false, None::<Kind>);
            total = Some(match total {
                Some(acc) => acc + l,
                None => l,
            });
        }
        let total = total.ok_or_else(|| KdError::Invalid("afd has no taps".into()))?;
        out.push("afd", total / self.stages.len() as f64);
        Ok(())
    }
}

register_method!(Afd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(fm: &[f32], c: i64) -> Taps {
        let fm = Tensor::from_slice(fm)
            .view([1, c, 1, -1])
            .repeat([2, 1, 1, 1]);
        testing::maps(vec![fm], 3)
    }

    /// One step with every parameter zeroed; returns the loss and the
    /// method's variables with their shapes.
    fn run(att_f: f64, s: &Taps, t: &Taps) -> Result<(f64, Vec<String>)> {
        let cfg = Config {
            taps: vec!["feat/0".into()],
            att_f,
        };
        let mut m = testing::build_typed::<Afd>(cfg, s, Some(t))?;
        for (_, mut v) in m.vs.variables() {
            tch::no_grad(|| {
                let _ = v.zero_();
            });
        }
        Ok((m.loss(s, Some(t))?, m.names_and_sizes()))
    }

    #[test]
    fn uniform_attention_by_hand() {
        // A zeroed SE block gives ρ = ½ per channel. Channel 0: student (1, 0)
        // and teacher (0, 1) normalise to opposite unit vectors, mean squared
        // gap 1; channel 1: (0, 3) and (0, 5) both become (0, 1), gap 0.
        let (l, names) = run(
            1.0,
            &taps(&[1., 0., 0., 3.], 2),
            &taps(&[0., 1., 0., 5.], 2),
        )
        .unwrap();
        assert!((l - 0.5).abs() < 1e-5, "{l}");
        assert_eq!(
            names,
            [
                "0.attention.0.bias[2]",
                "0.attention.0.weight[2, 2, 1, 1]",
                "0.attention.2.bias[2]",
                "0.attention.2.weight[2, 2, 1, 1]"
            ]
        );
    }

    #[test]
    fn refuses_channel_mismatch_and_empty_block() {
        let err = run(
            1.0,
            &taps(&[1., 0., 0., 3.], 2),
            &taps(&[0., 1., 0., 5.], 4),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("same shape on both sides")
                && err.contains("student [2, 1, 2], teacher [4, 1, 1]"),
            "{err}"
        );
        let err = run(
            0.4,
            &taps(&[1., 0., 0., 3.], 2),
            &taps(&[0., 1., 0., 5.], 2),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("att_f = 0.4 leaves no hidden channels"),
            "{err}"
        );
    }
}

//! ICKD, inter-channel correlation (Liu et al., ICCV 2021), as torchdistill's
//! `ChSimLoss` with its `Student4ICKD` embedding: the student's map goes
//! through a 3×3 convolution and a BatchNorm to the teacher's channels;
//! each side's `C×C` Gram matrix over positions, rows L2-normalised, is
//! matched: `Σ (Ĝ_s − Ĝ_t)² / (C·B²)`.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Feature map compared, the same tap on both sides (torchdistill's
    /// ImageNet config: `layer4`, kd's `feat/4` of a torchvision ResNet;
    /// `feat/3` is a CIFAR ResNet's last stage).
    pub tap: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "feat/3".into(),
        }
    }
}

pub struct Ickd {
    s: TapRef,
    t: TapRef,
    conv2d: nn::Conv2D,
    l2norm: nn::BatchNorm,
}

/// Row-normalised channel Gram matrices, `[B, C, C]`.
fn correlation(x: &Tensor) -> Tensor {
    let [b, c, ..] = x.size()[..] else {
        unreachable!("build checks for maps")
    };
    let f = x.reshape([b, c, -1]);
    let g = f.bmm(&f.transpose(1, 2));
    &g / g.norm_scalaropt_dim(2, [2], true).clamp_min(1e-12)
}

impl Method for Ickd {
    const NAME: &'static str = "ickd";
    const SUMMARY: &'static str = "Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge Distillation (Liu et al., 2021)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t, ss, ts) = cx.map_pair(&cfg.tap)?;
        // The embedding keeps the student's size (3×3, padding 1).
        if ss[1..] != ts[1..] {
            return Err(cx.error(format!(
                "tap `{}`: student and teacher maps differ in size ({ss:?} vs {ts:?})",
                cfg.tap
            )));
        }
        let p = cx.params() / "embed";
        let conv = nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        };
        Ok(Ickd {
            s,
            t,
            conv2d: nn::conv2d(&p / "conv2d", ss[0], ts[0], 3, conv),
            // PyTorch's BatchNorm starts at weight 1 (tch's default draws it).
            l2norm: nn::batch_norm2d(
                &p / "l2norm",
                ts[0],
                nn::BatchNormConfig {
                    ws_init: nn::Init::Const(1.0),
                    ..Default::default()
                },
            ),
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let embedded = self
            .l2norm
            .forward_t(&self.conv2d.forward(io.tap(self.s)), io.train);
        let gap = correlation(&embedded) - correlation(io.tap(self.t));
        let [b, c, ..] = embedded.size()[..] else {
            unreachable!("a map")
        };
        out.push("ickd", gap.square().sum(Kind::Float) / (c * b * b) as f64);
        Ok(())
    }
}

register_method!(Ickd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(seed: i64, c: i64, hw: i64) -> Taps {
        tch::manual_seed(seed);
        testing::maps(vec![Tensor::randn([2, c, hw, hw], tch::kind::FLOAT_CPU)], 3)
    }

    #[test]
    fn refuses_maps_of_other_sizes_and_vectors() {
        let (s, t) = (taps(1, 3, 4), taps(2, 5, 2));
        let cfg = serde_json::json!({"tap": "feat/0"});
        let e = testing::loss::<Ickd>(cfg.clone(), &s, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("differ in size"), "{e}");
        let e = testing::loss::<Ickd>(serde_json::json!({"tap": "embed"}), &s, Some(&s))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a feature map"), "{e}");
        let t = taps(2, 5, 4);
        assert!(testing::loss::<Ickd>(cfg, &s, Some(&t)).unwrap() > 0.0);
    }
}

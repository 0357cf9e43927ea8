//! FitNets (Romero et al., 2015): the student's hint layer regresses the
//! teacher's, `‖r(F_s) − F_t‖²` averaged over elements, where `r` is the
//! identity (KD-Zoo) or a learned convolutional regressor (RepDistiller).

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Reduction, Tensor};

/// What maps the student's hint onto the teacher's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connector {
    /// KD-Zoo: none; student and teacher maps must have the same shape.
    #[default]
    None,
    /// RepDistiller's `ConvReg`: convolution, BatchNorm, ReLU.
    ConvReg,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Hint (teacher) and guided (student) layer, the same tap on both sides.
    pub tap: String,
    pub connector: Connector,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "feat/3".into(),
            connector: Connector::None,
        }
    }
}

enum Conv {
    Same(nn::Conv2D),
    Up(nn::ConvTranspose2D),
}

/// RepDistiller's `ConvReg` with PyTorch's default initialisation: maps a
/// `[Cs, Hs, Ws]` map onto `[Ct, Ht, Wt]` by a stride-2 convolution (Hs = 2Ht),
/// a stride-2 transposed convolution (2Hs = Ht) or a `(1+Hs−Ht)×(1+Ws−Wt)`
/// convolution (Hs ≥ Ht), then BatchNorm and, optionally, ReLU. Parameters:
/// `conv.{weight,bias}`, `bn.{weight,bias,running_mean,running_var}`.
pub struct ConvReg {
    conv: Conv,
    bn: nn::BatchNorm,
    relu: bool,
}

/// PyTorch's default for conv weights and biases: U(±1/√fan_in).
fn default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

impl ConvReg {
    /// `s` and `t` are per-sample shapes `[C, H, W]`; the error says why no
    /// regressor fits them.
    pub fn new(
        p: &nn::Path,
        s: &[i64],
        t: &[i64],
        relu: bool,
    ) -> std::result::Result<ConvReg, String> {
        let (Ok([cs, hs, ws]), Ok([ct, ht, wt])) =
            (<[i64; 3]>::try_from(s), <[i64; 3]>::try_from(t))
        else {
            return Err(format!(
                "needs feature maps, got student {s:?} and teacher {t:?}"
            ));
        };
        let conv = if hs == 2 * ht {
            let init = default_init(cs * 9);
            let cfg = nn::ConvConfig {
                stride: 2,
                padding: 1,
                ws_init: init,
                bs_init: init,
                ..Default::default()
            };
            Conv::Same(nn::conv2d(p / "conv", cs, ct, 3, cfg))
        } else if 2 * hs == ht {
            // A transposed weight is [Cs, Ct, k, k]; PyTorch's fan-in reads dim 1.
            let init = default_init(ct * 16);
            let cfg = nn::ConvTransposeConfig {
                stride: 2,
                padding: 1,
                ws_init: init,
                bs_init: init,
                ..Default::default()
            };
            Conv::Up(nn::conv_transpose2d(p / "conv", cs, ct, 4, cfg))
        } else if hs >= ht && ws >= wt {
            let k = [1 + hs - ht, 1 + ws - wt];
            let init = default_init(cs * k[0] * k[1]);
            let cfg = nn::ConvConfigND::<[i64; 2]> {
                ws_init: init,
                bs_init: init,
                ..Default::default()
            };
            Conv::Same(nn::conv(p / "conv", cs, ct, k, cfg))
        } else {
            return Err(format!(
                "no regressor maps a {hs}×{ws} student map onto a {ht}×{wt} teacher map"
            ));
        };
        let bn_cfg = nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        };
        Ok(ConvReg {
            conv,
            bn: nn::batch_norm2d(p / "bn", ct, bn_cfg),
            relu,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.conv {
            Conv::Same(c) => c.forward(x),
            Conv::Up(c) => c.forward(x),
        };
        let y = self.bn.forward_t(&y, train);
        if self.relu { y.relu() } else { y }
    }
}

pub struct FitNet {
    s: TapRef,
    t: TapRef,
    regressor: Option<ConvReg>,
}

impl Method for FitNet {
    const NAME: &'static str = "fitnet";
    const SUMMARY: &'static str = "FitNets: Hints for Thin Deep Nets (Romero et al., 2015)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t) = cx.tap_pair(&cfg.tap)?;
        let (ss, ts) = (cx.shape(s), cx.shape(t));
        let regressor = match cfg.connector {
            Connector::None if ss != ts => {
                return Err(cx.error(format!(
                    "tap `{}`: student {ss:?} and teacher {ts:?} differ; \
                     connector \"conv_reg\" learns a regressor between them",
                    cfg.tap
                )));
            }
            Connector::None => None,
            Connector::ConvReg => Some(
                ConvReg::new(cx.params(), &ss, &ts, true)
                    .map_err(|e| cx.error(format!("tap `{}`: {e}", cfg.tap)))?,
            ),
        };
        Ok(FitNet { s, t, regressor })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let s = io.tap(self.s);
        let guided = match &self.regressor {
            Some(r) => r.forward(s, io.train),
            None => s.shallow_clone(),
        };
        out.push("fitnet", guided.mse_loss(io.tap(self.t), Reduction::Mean));
        Ok(())
    }
}

register_method!(FitNet);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::{Device, Kind};

    use super::*;

    fn taps(fm: Tensor) -> Taps {
        testing::maps(vec![fm], 2)
    }

    /// Builds and runs one step; returns the loss and the method's variables.
    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<(f64, Vec<String>)> {
        let mut m = testing::build::<FitNet>(cfg, s, Some(t))?;
        Ok((m.loss(s, Some(t))?, m.names()))
    }

    #[test]
    fn identity_hint_is_plain_mse() {
        let s = taps(Tensor::from_slice(&[1f32, 2., 3., 4.]).view([1, 1, 2, 2]));
        let t = taps(Tensor::from_slice(&[1f32, 0., 3., 0.]).view([1, 1, 2, 2]));
        let (l, names) = run(serde_json::json!({"tap": "feat/0"}), &s, &t).unwrap();
        assert!((l - (4.0 + 16.0) / 4.0).abs() < 1e-6, "{l}");
        assert!(names.is_empty());
    }

    #[test]
    fn regressor_shapes_and_names() {
        let t = taps(Tensor::ones([2, 8, 4, 4], (Kind::Float, Device::Cpu)));
        for (s_shape, w_shape) in [
            ([2, 4, 8, 8], [8, 4, 3, 3]),
            ([2, 4, 2, 2], [4, 8, 4, 4]),
            ([2, 4, 5, 6], [8, 4, 2, 3]),
        ] {
            let s = taps(Tensor::randn(s_shape, (Kind::Float, Device::Cpu)));
            let (l, names) = run(
                serde_json::json!({"tap": "feat/0", "connector": "conv_reg"}),
                &s,
                &t,
            )
            .unwrap();
            assert!(l.is_finite());
            let want = [
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.weight",
                "conv.bias",
                "conv.weight",
            ];
            assert_eq!(names, want);
            let vs = nn::VarStore::new(Device::Cpu);
            let r = ConvReg::new(&vs.root(), &s_shape[1..], &[8, 4, 4], true).unwrap();
            let w = vs.variables()["conv.weight"].shallow_clone();
            assert_eq!(w.size(), w_shape);
            let y = r.forward(&Tensor::randn(s_shape, (Kind::Float, Device::Cpu)), true);
            assert_eq!(y.size(), [2, 8, 4, 4]);
            assert!(
                y.min().double_value(&[]) >= 0.0,
                "ReLU closes the regressor"
            );
        }
    }

    #[test]
    fn refuses_mismatch_without_connector_and_unreachable_sizes() {
        let s = taps(Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu)));
        let t = taps(Tensor::zeros([1, 8, 2, 2], (Kind::Float, Device::Cpu)));
        let err = run(serde_json::json!({"tap": "feat/0"}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv_reg") && err.contains("[4, 2, 2]"),
            "{err}"
        );
        let err = run(serde_json::json!({}), &s, &t).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `feat/3`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let t = taps(Tensor::zeros([1, 8, 5, 5], (Kind::Float, Device::Cpu)));
        let err = run(
            serde_json::json!({"tap": "feat/0", "connector": "conv_reg"}),
            &s,
            &t,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no regressor"), "{err}");
        let err = run(
            serde_json::json!({"tap": "embed", "connector": "conv_reg"}),
            &s,
            &t,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs feature maps"), "{err}");
    }

    #[test]
    fn regressor_init_matches_pytorch_bounds() {
        let vs = nn::VarStore::new(Device::Cpu);
        ConvReg::new(&vs.root(), &[16, 8, 8], &[32, 8, 8], true).unwrap();
        let v = vs.variables();
        let bound = 1.0 / 16f64.sqrt();
        let w = &v["conv.weight"];
        assert!(
            w.abs().max().double_value(&[]) <= bound
                && w.abs().max().double_value(&[]) > 0.8 * bound
        );
        assert_eq!(v["bn.weight"].sum(Kind::Float).double_value(&[]), 32.0);
        assert_eq!(v["bn.running_var"].sum(Kind::Float).double_value(&[]), 32.0);
    }
}

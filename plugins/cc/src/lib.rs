//! Correlation congruence (Peng et al., 2019): match the batch correlation
//! matrices of the embeddings under a Gaussian RBF kernel, expanded to order P:
//! `k(x, y) = Σ_{p≤P} e^{-2γ} (2γ)^p / p! · (x·y)^p` on L2-normalised x, y.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kernel width of the Gaussian RBF.
    pub gamma: f64,
    /// Order of the Taylor expansion.
    #[serde(rename = "P_order")]
    pub p_order: u32,
    /// A vector tap (one value per channel), as the pooled embedding.
    pub tap: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gamma: 0.4,
            p_order: 2,
            tap: "embed".into(),
        }
    }
}

pub struct Cc {
    s: TapRef,
    t: TapRef,
    /// `e^{-2γ} (2γ)^p / p!` for p = 0..=P.
    coef: Vec<f64>,
}

impl Cc {
    fn correlation(&self, feat: &Tensor) -> Tensor {
        let f = feat / feat.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        let sim = f.matmul(&f.tr());
        let mut corr = sim.zeros_like();
        for (p, c) in self.coef.iter().enumerate() {
            corr += sim.pow_tensor_scalar(p as i64) * *c;
        }
        corr
    }
}

impl Method for Cc {
    const NAME: &'static str = "cc";
    const SUMMARY: &'static str =
        "Correlation Congruence for Knowledge Distillation (Peng et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(cfg.gamma > 0.0 && cfg.gamma.is_finite()) {
            return Err(cx.error(format!("gamma must be positive, got {}", cfg.gamma)));
        }
        let (s, t) = cx.tap_pair(&cfg.tap)?;
        for side in [s, t] {
            let shape = cx.shape(side);
            if shape.len() != 1 {
                return Err(cx.error(format!(
                    "tap `{}` is {shape:?} on the {}; CC needs a vector tap such as `embed`",
                    cfg.tap, side.side
                )));
            }
        }
        let two_g = 2.0 * cfg.gamma;
        let mut coef = vec![(-two_g).exp()];
        for p in 1..=cfg.p_order {
            coef.push(coef[p as usize - 1] * two_g / f64::from(p));
        }
        Ok(Cc { s, t, coef })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (cs, ct) = (
            self.correlation(io.tap(self.s)),
            self.correlation(io.tap(self.t)),
        );
        out.push("cc", cs.mse_loss(&ct, Reduction::Mean));
        Ok(())
    }
}

register_method!(Cc);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    /// Two embeddings, also as a feature map `feat/0` of 1×1 maps.
    fn taps(embed: &[f32]) -> Taps {
        testing::maps(vec![Tensor::from_slice(embed).view([2, -1, 1, 1])], 3)
    }

    fn run(cfg: Config, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss_typed::<Cc>(cfg, s, Some(t))
    }

    #[test]
    fn first_order_kernel_by_hand() {
        // Student rows orthogonal (sim = I), teacher rows equal (sim = 1):
        // off-diagonal correlations differ by e^{-2γ}·2γ = e^{-1} at γ = 0.5,
        // and P = 0 terms cancel. mse = 2·e^{-2} / 4 = 0.0676676.
        // Scaling a row must not matter: the kernel sees unit vectors.
        let (s, t) = (taps(&[3., 0., 0., 1.]), taps(&[1., 1., 2., 2.]));
        let cfg = |p| Config {
            gamma: 0.5,
            p_order: p,
            tap: "embed".into(),
        };
        let l1 = run(cfg(1), &s, &t).unwrap();
        assert!((l1 - 0.0676676).abs() < 1e-6, "{l1}");
        // Order 2 adds e^{-1}·1²/2 to each off-diagonal gap: (1.5 e^{-1})²/2.
        let l2 = run(cfg(2), &s, &t).unwrap();
        assert!((l2 - 0.1522521).abs() < 1e-6, "{l2}");
        assert!(run(cfg(0), &s, &t).unwrap().abs() < 1e-9);
    }

    #[test]
    fn refuses_feature_maps_and_bad_gamma() {
        let s = taps(&[1., 0., 0., 1.]);
        let cfg = Config {
            tap: "feat/0".into(),
            ..Config::default()
        };
        let err = run(cfg, &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("tap `feat/0` is [2, 1, 1]") && err.contains("vector tap"),
            "{err}"
        );
        let err = run(
            Config {
                gamma: 0.0,
                ..Config::default()
            },
            &s,
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gamma must be positive"), "{err}");
        let err = kd_core::build_config::<Cc>(kd_core::serde_json::json!({"p_order": 3}))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown field `p_order`"), "{err}");
    }
}

//! Variational information distillation (Ahn et al., 2019): maximise a
//! variational lower bound on the mutual information between student and
//! teacher features, i.e. minimise the Gaussian negative log-likelihood
//! `½ (log σ²_c + (μ(s) - t)² / σ²_c)` of the teacher's features under a mean
//! regressed from the student's and a learned per-channel variance
//! `σ²_c = softplus(α_c) + ε`. One regressor per tap; the loss is their mean.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init, Module};
use tch::{Tensor, nn::init::FanInOut, nn::init::NonLinearity, nn::init::NormalOrUniform};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub taps: Vec<String>,
    /// Initial variance σ² of every channel.
    pub init_var: f64,
    /// Width of the regressor's hidden layers, as a multiple of the teacher's channels.
    pub sf: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            taps: vec!["feat/1".into(), "feat/2".into(), "feat/3".into()],
            init_var: 5.0,
            sf: 1.0,
        }
    }
}

/// Floor on the variance, as in the reference.
const EPS: f64 = 1e-6;

/// `regressor` (1×1 conv, ReLU, 1×1 conv, ReLU, 1×1 conv) and `alpha` of one tap.
struct Stage {
    s: TapRef,
    t: TapRef,
    regressor: nn::Sequential,
    alpha: Tensor,
}

pub struct Vid {
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
            bias: false,
            ws_init,
            ..Default::default()
        },
    )
}

fn stage(cfg: &Config, name: &str, k: usize, cx: &mut BuildCx) -> Result<Stage> {
    let (s, t) = cx.tap_pair(name)?;
    let (ss, ts) = (cx.shape(s), cx.shape(t));
    if ss.len() != 3 || ts.len() != 3 || ss[1..] != ts[1..] {
        return Err(cx.error(format!(
            "tap `{name}` must be a feature map of the same resolution on both sides, got student {ss:?}, teacher {ts:?}"
        )));
    }
    let mid = (cfg.sf * ts[0] as f64) as i64;
    if mid < 1 {
        return Err(cx.error(format!(
            "sf = {} leaves no hidden channels for tap `{name}`",
            cfg.sf
        )));
    }
    let p = cx.params() / k;
    let r = &p / "regressor";
    let regressor = nn::seq()
        .add(conv1x1(&r / 0, ss[0], mid))
        .add_fn(Tensor::relu)
        .add(conv1x1(&r / 2, mid, mid))
        .add_fn(Tensor::relu)
        .add(conv1x1(&r / 4, mid, ts[0]));
    // softplus(α) + ε = init_var at the start.
    let alpha0 = ((cfg.init_var - EPS).exp() - 1.0).ln();
    let alpha = p.var("alpha", &[ts[0]], Init::Const(alpha0));
    Ok(Stage {
        s,
        t,
        regressor,
        alpha,
    })
}

impl Method for Vid {
    const NAME: &'static str = "vid";
    const SUMMARY: &'static str =
        "Variational Information Distillation for Knowledge Transfer (Ahn et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(cfg.init_var > EPS && cfg.init_var.is_finite()) {
            return Err(cx.error(format!("init_var must exceed {EPS}, got {}", cfg.init_var)));
        }
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one tap"));
        }
        let stages = cfg
            .taps
            .iter()
            .enumerate()
            .map(|(k, name)| stage(&cfg, name, k, cx))
            .collect::<Result<_>>()?;
        Ok(Vid { stages })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut total: Option<Tensor> = None;
        for st in &self.stages {
            let mean = st.regressor.forward(io.tap(st.s));
            let var = (st.alpha.exp() + 1.0).log() + EPS;
            let var = var.view([1, -1, 1, 1]);
            let nll = (var.log() + (mean - io.tap(st.t)).pow_tensor_scalar(2) / &var) * 0.5;
            let l = nll.mean(nll.kind());
            total = Some(match total {
                Some(acc) => acc + l,
                None => l,
            });
        }
        let total = total.ok_or_else(|| KdError::Invalid("vid has no taps".into()))?;
        out.push("vid", total / self.stages.len() as f64);
        Ok(())
    }
}

register_method!(Vid);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::{Device, Kind};

    use super::*;

    const F: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// Batch 2, `feat/0` and `feat/1` the same `c`×`hw`×`hw` map of `value`.
    fn taps(c: i64, hw: i64, value: f64) -> Taps {
        let fm = Tensor::full([2, c, hw, hw], value, F);
        testing::maps(vec![fm.shallow_clone(), fm], 3)
    }

    /// One step with the regressor's convolutions zeroed; returns the loss
    /// and the method's variables with their shapes.
    fn run(cfg: Config, s: &Taps, t: &Taps) -> Result<(f64, Vec<String>)> {
        let mut m = testing::build_typed::<Vid>(cfg, s, Some(t))?;
        for (_, mut v) in m.vs.variables() {
            if v.dim() == 4 {
                tch::no_grad(|| {
                    let _ = v.zero_();
                });
            }
        }
        Ok((m.loss(s, Some(t))?, m.names_and_sizes()))
    }

    fn cfg(sf: f64, init_var: f64) -> Config {
        Config {
            taps: vec!["feat/0".into(), "feat/1".into()],
            init_var,
            sf,
        }
    }

    #[test]
    fn zero_regressor_leaves_the_variance_term() {
        // μ = 0 (regressor zeroed), t = 1, σ² = init_var = 5 on every channel:
        // ½ (ln 5 + 1/5) = 0.904719 on both taps, so also their mean.
        let (loss, names) = run(cfg(0.5, 5.0), &taps(4, 2, 0.3), &taps(6, 2, 1.0)).unwrap();
        assert!((loss - 0.904719).abs() < 1e-5, "{loss}");
        assert_eq!(
            names[..4],
            [
                "0.alpha[6]",
                "0.regressor.0.weight[3, 4, 1, 1]",
                "0.regressor.2.weight[3, 3, 1, 1]",
                "0.regressor.4.weight[6, 3, 1, 1]"
            ]
        );
        assert_eq!(names.len(), 8);
    }

    #[test]
    fn refuses_mismatched_resolution_and_bad_variance() {
        let err = run(cfg(1.0, 5.0), &taps(4, 2, 0.), &taps(6, 4, 0.))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("same resolution") && err.contains("student [4, 2, 2], teacher [6, 4, 4]"),
            "{err}"
        );
        let err = run(cfg(1.0, 0.0), &taps(4, 2, 0.), &taps(6, 2, 0.))
            .unwrap_err()
            .to_string();
        assert!(err.contains("init_var must exceed"), "{err}");
        let err = run(cfg(0.1, 5.0), &taps(4, 2, 0.), &taps(6, 2, 0.))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sf = 0.1 leaves no hidden channels"), "{err}");
    }
}

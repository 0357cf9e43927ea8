//! PAD, prime-aware adaptive distillation (Zhang et al., ECCV 2020), its L2
//! form as torchdistill's `PADL2Loss` with the `VarianceBranch4PAD`
//! wrapper: a variance branch (linear, BatchNorm) reads the student's
//! embedding and predicts a log-variance per dimension, which weighs the
//! squared gap to the teacher's embedding like a Gaussian likelihood:
//! `mean((t − s)² / (ε + e^{log σ²}) + log σ²)`. Samples the student cannot
//! match ("non-prime") get a large variance and count less.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Kind;
use tch::nn::{self, Module, ModuleT};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Embedding compared, the same tap on both sides, flattened per sample
    /// (torchdistill's `avgpool` output: kd's `embed`).
    pub tap: String,
    /// Added to the variance (the reference config's 1e-6).
    pub eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "embed".into(),
            eps: 1e-6,
        }
    }
}

pub struct Pad {
    s: TapRef,
    t: TapRef,
    linear: nn::Linear,
    norm: nn::BatchNorm,
    eps: f64,
}

impl Method for Pad {
    const NAME: &'static str = "pad";
    const SUMMARY: &'static str = "Prime-Aware Adaptive Distillation (Zhang et al., 2020)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
            return Err(cx.error(format!("eps must be a finite number >= 0, got {}", cfg.eps)));
        }
        let (s, t) = cx.tap_pair(&cfg.tap)?;
        let dim = |shape: Vec<i64>| shape.iter().product::<i64>();
        let (ds, dt) = (dim(cx.shape(s)), dim(cx.shape(t)));
        if ds != dt {
            return Err(cx.error(format!(
                "tap `{}` has {ds} values per sample on the student and {dt} on the teacher; PAD compares them one to one",
                cfg.tap
            )));
        }
        // `var_estimator = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))`.
        let p = cx.params() / "var_estimator";
        let norm = nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        };
        Ok(Pad {
            s,
            t,
            linear: nn::linear(&p / 0, ds, ds, Default::default()),
            norm: nn::batch_norm1d(&p / 1, ds, norm),
            eps: cfg.eps,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let s = io.tap(self.s).flatten(1, -1);
        let t = io.tap(self.t).flatten(1, -1);
        let log_var = self.norm.forward_t(&self.linear.forward(&s), io.train);
        let nll = (t - s).square() / (log_var.exp() + self.eps) + log_var;
        out.push("pad", nll.mean(Kind::Float));
        Ok(())
    }
}

register_method!(Pad);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::Tensor;

    use super::*;

    #[test]
    fn refuses_embeddings_of_other_sizes() {
        let taps = |seed: i64, c: i64| -> Taps {
            tch::manual_seed(seed);
            testing::maps(vec![Tensor::randn([4, c, 1, 1], tch::kind::FLOAT_CPU)], 3)
        };
        let (s, t) = (taps(1, 3), taps(2, 5));
        let e = testing::loss::<Pad>(serde_json::json!({}), &s, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 values per sample on the student and 5"),
            "{e}"
        );
        let t = taps(2, 3);
        assert!(
            testing::loss::<Pad>(serde_json::json!({}), &s, Some(&t))
                .unwrap()
                .is_finite()
        );
    }
}

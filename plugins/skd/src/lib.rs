//! SKD, "Streamlined Knowledge Distillation" (Jeong, Lee & Choi, CVPR 2026),
//! as torchdistill's `SKDInstanceLoss` and `SKDDirectionLoss`: an
//! instance-wise KL between softened distributions, and a direction-wise
//! term on the batch's Gram matrices of L2-normalised logits, whose row
//! differences `D` are measured by their Mahalanobis norm under their own
//! (Tikhonov-regularised) covariance: `mean_i √(D_iᵀ (Σ + λI)⁻¹ D_i)`.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Softmax temperature of the instance term (no T² factor, as the
    /// reference).
    #[serde(rename = "T")]
    pub t: f64,
    /// λ added to the covariance's diagonal.
    pub tikhonov: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            t: 4.0,
            tikhonov: 0.1,
        }
    }
}

pub struct Skd {
    s: TapRef,
    t: TapRef,
    cfg: Config,
}

/// `[B, B]` cosine similarities of the rows.
fn gram(z: &Tensor) -> Tensor {
    let z = z / z.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    z.mm(&z.tr())
}

impl Method for Skd {
    const NAME: &'static str = "skd";
    const SUMMARY: &'static str = "Streamlined Knowledge Distillation (Jeong et al., 2026)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        for (name, v) in [("T", cfg.t), ("tikhonov", cfg.tikhonov)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(cx.error(format!("{name} must be a finite number > 0, got {v}")));
            }
        }
        let (s, t) = cx.tap_pair("logits")?;
        Ok(Skd { s, t, cfg })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (z_s, z_t) = (io.tap(self.s), io.tap(self.t));
        let b = z_s.size()[0];
        if b < 2 {
            return Err(KdError::Invalid(
                "skd: the direction term's covariance needs a batch of at least 2".into(),
            ));
        }
        let tau = self.cfg.t;
        let log_s = (z_s / tau).log_softmax(1, Kind::Float);
        let log_t = (z_t / tau).log_softmax(1, Kind::Float);
        out.push(
            "instance",
            (log_t.exp() * (&log_t - log_s)).sum(Kind::Float) / b as f64,
        );
        // `torch.cov(D.t())`: each column of D a variable, each row an observation.
        let d = gram(z_s) - gram(z_t);
        let eye = Tensor::eye(b, (Kind::Float, d.device()));
        let cov = d.tr().f_cov(1, None::<Tensor>, None::<Tensor>)? + eye * self.cfg.tikhonov;
        let inv = cov.f_linalg_cholesky(false)?.f_cholesky_inverse(false)?;
        let dist = Tensor::einsum("bi,ij,bj->b", &[&d, &inv, &d], None::<i64>);
        out.push("direction", dist.sqrt().mean(Kind::Float));
        Ok(())
    }
}

register_method!(Skd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(seed: i64) -> Taps {
        tch::manual_seed(seed);
        testing::taps(Vec::new(), Tensor::randn([6, 5], tch::kind::FLOAT_CPU))
    }

    /// Identical logits: no KL, and a zero difference has zero Mahalanobis
    /// norm (the covariance is then λI).
    #[test]
    fn identical_logits_cost_nothing_and_refusals() {
        let s = taps(1);
        let l = testing::loss::<Skd>(serde_json::json!({}), &s, Some(&s)).unwrap();
        assert!(l.abs() < 1e-6, "{l}");
        let t = taps(2);
        assert!(testing::loss::<Skd>(serde_json::json!({}), &s, Some(&t)).unwrap() > 0.1);
        let e = testing::loss::<Skd>(serde_json::json!({"tikhonov": 0.0}), &s, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tikhonov must be a finite number > 0"), "{e}");
    }
}

//! Probabilistic knowledge transfer (Passalis & Tefas, 2018): turn the
//! cosine similarities within a batch, rescaled to [0, 1], into conditional
//! probabilities `p_{j|i}` and minimise `KL(p_t ‖ p_s)`.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The reference's guard against division by zero and log of zero.
const EPS: f64 = 1e-6;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Representation matched, flattened per sample; the same tap on both sides.
    pub tap: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "embed".into(),
        }
    }
}

pub struct Pkt {
    s: TapRef,
    t: TapRef,
}

/// `p_{j|i}`: row-normalised `(cos(x_i, x_j) + 1) / 2`.
fn conditional_probs(x: &Tensor) -> Tensor {
    let x = x.flatten(1, -1);
    let x = &x / (x.norm_scalaropt_dim(2, [1], true) + EPS);
    // The reference zeroes NaNs (from non-finite inputs) after normalising.
    let x = x.where_self(&x.isnan().logical_not(), &x.zeros_like());
    let sim = (x.mm(&x.tr()) + 1.0) / 2.0;
    &sim / sim.sum_dim_intlist(1, true, sim.kind())
}

impl Method for Pkt {
    const NAME: &'static str = "pkt";
    const SUMMARY: &'static str = "Learning Deep Representations with Probabilistic Knowledge Transfer (Passalis & Tefas, 2018)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t) = cx.tap_pair(&cfg.tap)?;
        Ok(Pkt { s, t })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (p_s, p_t) = (
            conditional_probs(io.tap(self.s)),
            conditional_probs(io.tap(self.t)),
        );
        // Mean over all B² entries, not a per-row sum: the reference's scale.
        let kl = (&p_t * ((&p_t + EPS) / (p_s + EPS)).log()).mean(p_t.kind());
        out.push("pkt", kl);
        Ok(())
    }
}

register_method!(Pkt);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    /// Batch `b` of embeddings, also as a feature map `feat/0` of 1×1 maps.
    fn taps(embed: &[f32], b: i64) -> Taps {
        testing::maps(vec![Tensor::from_slice(embed).view([b, -1, 1, 1])], 3)
    }

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss::<Pkt>(cfg, s, Some(t))
    }

    #[test]
    fn orthogonal_student_against_collinear_teacher() {
        // Student: orthogonal rows → sim [[1, .5], [.5, 1]] → p = [[2/3, 1/3], ..].
        // Teacher: equal rows → sim all ones → p = 1/2 everywhere.
        // Each entry: ½ ln(½ / p_s); two of 2/3 and two of 1/3, mean over 4:
        // (½ ln(3/4) + ½ ln(3/2)) / 2 = 0.0294458 (eps shifts the 7th digit).
        let (s, t) = (taps(&[1., 0., 0., 1.], 2), taps(&[1., 0., 2., 0.], 2));
        let l = run(serde_json::json!({}), &s, &t).unwrap();
        assert!((l - 0.0294458).abs() < 1e-5, "{l}");
        let same = run(serde_json::json!({"tap": "feat/0"}), &s, &s).unwrap();
        assert!(same.abs() < 1e-6, "{same}");
    }

    #[test]
    fn refuses_unknown_tap() {
        let s = taps(&[1., 0., 0., 1.], 2);
        let err = run(serde_json::json!({"tap": "feat/2"}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown tap `feat/2`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
    }
}

//! Relational knowledge distillation (Park et al., 2019): match the pairwise
//! distances within a batch, each normalised by its mean, and the angles of
//! all triplets, both under the Huber (smooth L1) loss:
//! `w_dist · ℓ_δ(ψ_D(s), ψ_D(t)) + w_angle · ℓ_δ(ψ_A(s), ψ_A(t))`.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Weight of the distance term.
    pub w_dist: f64,
    /// Weight of the angle term.
    pub w_angle: f64,
    /// Representation related, flattened per sample; the same tap on both sides.
    pub tap: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            w_dist: 25.0,
            w_angle: 50.0,
            tap: "embed".into(),
        }
    }
}

pub struct Rkd {
    s: TapRef,
    t: TapRef,
    w_dist: f64,
    w_angle: f64,
}

/// Euclidean distances with a zero diagonal, divided by their mean over the
/// positive entries. Squared distances are floored at 1e-12 before the root.
fn distance_potential(e: &Tensor) -> Tensor {
    let sq = e.square().sum_dim_intlist(1, false, e.kind());
    let d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - e.mm(&e.tr()) * 2.0;
    let n = e.size()[0];
    let eye = Tensor::eye(n, (Kind::Bool, e.device()));
    let d = d2.clamp_min(1e-12).sqrt().masked_fill(&eye, 0.0);
    let mean = d.masked_select(&d.gt(0.0)).mean(d.kind());
    d / mean
}

/// Cosine of the angle at `j` of every triplet `(i, j, k)`, flattened.
fn angle_potential(e: &Tensor) -> Tensor {
    let vd = e.unsqueeze(0) - e.unsqueeze(1);
    let unit = &vd / vd.norm_scalaropt_dim(2, [2], true).clamp_min(1e-12);
    unit.bmm(&unit.transpose(1, 2)).flatten(0, -1)
}

impl Method for Rkd {
    const NAME: &'static str = "rkd";
    const SUMMARY: &'static str = "Relational Knowledge Distillation (Park et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.w_dist < 0.0 || cfg.w_angle < 0.0 {
            return Err(cx.error(format!(
                "w_dist and w_angle must be non-negative, got {} and {}",
                cfg.w_dist, cfg.w_angle
            )));
        }
        let (s, t) = cx.tap_pair(&cfg.tap)?;
        Ok(Rkd {
            s,
            t,
            w_dist: cfg.w_dist,
            w_angle: cfg.w_angle,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (io.tap(self.s).flatten(1, -1), io.tap(self.t).flatten(1, -1));
        if s.size()[0] < 2 {
            return Err(KdError::Plan {
                method: "rkd".into(),
                msg: "needs at least two samples per batch".into(),
            });
        }
        let dist =
            distance_potential(&s).smooth_l1_loss(&distance_potential(&t), Reduction::Mean, 1.0);
        let angle = angle_potential(&s).smooth_l1_loss(&angle_potential(&t), Reduction::Mean, 1.0);
        out.push("rkd_dist", dist * self.w_dist);
        out.push("rkd_angle", angle * self.w_angle);
        Ok(())
    }
}

register_method!(Rkd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    /// Batch `b` of embeddings, also as a feature map `feat/0` of 1×1 maps.
    fn taps(embed: &[f32], b: i64) -> Taps {
        testing::maps(vec![Tensor::from_slice(embed).view([b, -1, 1, 1])], 3)
    }

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<Vec<(String, f64)>> {
        let out = testing::build::<Rkd>(cfg, s, Some(t))?.losses(s, Some(t))?;
        Ok(out
            .terms
            .iter()
            .map(|(n, v)| (n.clone(), v.double_value(&[])))
            .collect())
    }

    #[test]
    fn hand_computed_triangles() {
        // Student: right isosceles triangle (0,0), (1,0), (0,1); teacher: the
        // equilateral one. Distances over their mean: student off-diagonal
        // [1, 1, √2] / ((2 + √2)/3) = [.87868, .87868, 1.24264]; teacher all 1.
        // Huber (|x| < 1: x²/2) over the 9 entries, each pair twice:
        // (4·.12132²/2 + 2·.24264²/2) / 9 = .0098124; × 25 = .245310.
        let s = taps(&[0., 0., 1., 0., 0., 1.], 3);
        let h = 3f32.sqrt() / 2.0;
        let t = taps(&[0., 0., 1., 0., 0.5, h], 3);
        let terms = run(serde_json::json!({"w_angle": 0.0}), &s, &t).unwrap();
        assert_eq!(terms[0].0, "rkd_dist");
        assert!((terms[0].1 - 0.245310).abs() < 1e-4, "{terms:?}");
        assert_eq!(terms[1], ("rkd_angle".to_string(), 0.0));
        // Angles: a similar (scaled) triangle has the same angles.
        let big = taps(&[0., 0., 3., 0., 0., 3.], 3);
        let terms = run(serde_json::json!({}), &s, &big).unwrap();
        assert!(terms.iter().all(|(_, v)| v.abs() < 1e-6), "{terms:?}");
        let terms = run(serde_json::json!({"w_dist": 0.0}), &s, &t).unwrap();
        assert!(terms[1].1 > 0.0, "{terms:?}");
    }

    #[test]
    fn refuses_bad_config() {
        let s = taps(&[0., 0., 1., 0.], 2);
        let err = run(serde_json::json!({"w_dist": -1.0}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-negative"), "{err}");
        let err = run(serde_json::json!({"tap": "feat/1"}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown tap `feat/1`") && err.contains("valid taps"),
            "{err}"
        );
        let one = taps(&[0., 1.], 1);
        assert!(run(serde_json::json!({}), &one, &one).is_err());
    }
}

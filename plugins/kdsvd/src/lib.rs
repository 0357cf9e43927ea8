//! Self-supervised KD with singular value decomposition (Lee, Kim & Song,
//! ECCV 2018), as RepDistiller's and mdistiller's `KDSVD`: each feature map
//! is compressed to its leading right singular vectors, the student's
//! aligned to the teacher's (best match, sign fixed), and the RBF kernels
//! between consecutive maps' vectors are matched:
//! `Σ_{l>0} ‖exp(-(v_s^l ⊖ v_s^{l-1})²/8) − exp(-(v_t^l ⊖ v_t^{l-1})²/8)‖² / B`.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Singular vectors kept of the teacher's maps (the student keeps `k + 3`
    /// to choose from).
    pub k: i64,
    /// Feature maps, consecutive pairs related; the same tap on both sides.
    pub taps: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            k: 1,
            // The references' `feats[1:]` (mdistiller) and `feat[1:-1]`
            // (RepDistiller): the three stages' outputs.
            taps: vec!["feat/1".into(), "feat/2".into(), "feat/3".into()],
        }
    }
}

pub struct KdSvd {
    pairs: Vec<(TapRef, TapRef)>,
    k: i64,
}

/// Non-finite entries (a failed decomposition) count as zero.
fn finite(x: Tensor) -> Tensor {
    x.where_self(&x.isfinite(), &x.zeros_like())
}

/// `F.normalize(x, dim=1)`.
fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// The `n` leading singular values and right singular vectors of the map
/// read as `[B, C·H, W]` (the references' `view` of an NCHW map), each
/// normalised: `([B, n], [B, W, n])`.
fn svd(map: &Tensor, n: i64) -> (Tensor, Tensor) {
    let [b, c, h, w] = map.size()[..] else {
        unreachable!("build checks for feature maps")
    };
    // `torch.svd(x)` as the references call it: reduced, V (not Vᴴ).
    let (_, s, v) = map.reshape([b, c * h, w]).svd(true, true);
    let v = finite(v);
    let n_s = n.min(s.size()[1]);
    (
        normalize(&finite(s).narrow(1, 0, n_s)),
        normalize(&v.narrow(2, 0, n_s)),
    )
}

/// Each teacher vector takes the student vector most collinear with it,
/// sign-corrected: `v_s · mask`, `mask = sign(cos)` where `|cos|` is its
/// column's maximum.
fn align(v_s: &Tensor, v_t: &Tensor) -> Tensor {
    let cosine = v_s.transpose(-2, -1).matmul(v_t);
    let (best, _) = cosine.abs().max_dim(1, true);
    let mask = cosine
        .sign()
        .where_self(&best.eq_tensor(&cosine.abs()), &cosine.zeros_like());
    v_s.matmul(&mask)
}

/// `exp(-(a_i − b_j)²/8)` for every pair of rows: `[B, W_a, W_b, k]`.
fn rbf(a: &Tensor, b: &Tensor) -> Tensor {
    (-(a.unsqueeze(2) - b.unsqueeze(1)).square() / 8.0).exp()
}

impl Method for KdSvd {
    const NAME: &'static str = "kdsvd";
    const SUMMARY: &'static str = "Self-supervised Knowledge Distillation using Singular Value Decomposition (Lee et al., 2018)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.k < 1 {
            return Err(cx.error(format!("k must be at least 1, got {}", cfg.k)));
        }
        if cfg.taps.len() < 2 {
            return Err(cx.error(
                "taps must name at least two feature maps (the loss relates consecutive ones)",
            ));
        }
        let mut pairs = Vec::new();
        for name in &cfg.taps {
            let (s, t, ss, ts) = cx.map_pair(name)?;
            // Singular vectors live along the width: the two must agree.
            if ss[2] != ts[2] {
                return Err(cx.error(format!(
                    "tap `{name}`: student and teacher maps differ in width ({ss:?} vs {ts:?})"
                )));
            }
            pairs.push((s, t));
        }
        Ok(KdSvd { pairs, k: cfg.k })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut previous: Option<(Tensor, Tensor)> = None;
        let mut total: Option<Tensor> = None;
        for &(s, t) in &self.pairs {
            let (s_t, v_t) = svd(&io.tap(t).to_kind(Kind::Float), self.k);
            let (_, v_s) = svd(&io.tap(s).to_kind(Kind::Float), self.k + 3);
            let scale = s_t.unsqueeze(1);
            let (v_s, v_t) = (align(&v_s, &v_t) * &scale, v_t * &scale);
            if let Some((v_sb, v_tb)) = &previous {
                let gap = rbf(&v_s, v_sb) - rbf(&v_t, v_tb).detach();
                let term = finite(gap.square()).sum(Kind::Float);
                total = Some(match total {
                    Some(sum) => sum + term,
                    None => term,
                });
            }
            previous = Some((v_s, v_t));
        }
        let batch = io.tap(self.pairs[0].0).size()[0] as f64;
        out.push("kdsvd", total.expect("build asks for two taps") / batch);
        Ok(())
    }
}

register_method!(KdSvd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss::<KdSvd>(cfg, s, Some(t))
    }

    fn maps(seed: i64, widths: &[i64]) -> Taps {
        tch::manual_seed(seed);
        let maps = widths
            .iter()
            .map(|&w| Tensor::randn([2, 3, 4, w], tch::kind::FLOAT_CPU))
            .collect();
        testing::maps(maps, 2)
    }

    #[test]
    fn identical_maps_give_zero_and_different_ones_do_not() {
        let s = maps(1, &[4, 4, 3]);
        let same = run(
            serde_json::json!({"taps": ["feat/0", "feat/1", "feat/2"]}),
            &s,
            &s,
        )
        .unwrap();
        assert!(same.abs() < 1e-10, "{same}");
        let t = maps(2, &[4, 4, 3]);
        let other = run(
            serde_json::json!({"taps": ["feat/0", "feat/1", "feat/2"]}),
            &s,
            &t,
        )
        .unwrap();
        assert!(other > 1e-3, "{other}");
    }

    /// A student vector and its negation are the same direction: alignment
    /// flips the sign back, so a negated map costs nothing.
    #[test]
    fn the_sign_of_a_singular_vector_does_not_matter() {
        let s = maps(3, &[4, 4]);
        let neg = testing::maps(
            (0..2)
                .map(|i| -s.get(kd_core::Tap::Feat(i)).unwrap())
                .collect(),
            2,
        );
        let l = run(serde_json::json!({"taps": ["feat/0", "feat/1"]}), &neg, &s).unwrap();
        assert!(l.abs() < 1e-10, "{l}");
    }

    #[test]
    fn refuses_what_it_cannot_relate() {
        let s = maps(4, &[4, 4, 3]);
        let t = maps(5, &[4, 5, 3]);
        let err = run(serde_json::json!({"taps": ["feat/0", "feat/1"]}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ in width"), "{err}");
        let err = run(serde_json::json!({"taps": ["feat/0"]}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least two"), "{err}");
        let err = run(
            serde_json::json!({"k": 0, "taps": ["feat/0", "feat/1"]}),
            &s,
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("k must be at least 1"), "{err}");
    }
}

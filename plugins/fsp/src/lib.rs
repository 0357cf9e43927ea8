//! Flow of solution procedure (Yim et al., 2017): for consecutive stages
//! `(F₁, F₂)` the Gram matrix `G = F₁ F₂ᵀ / (H·W)` across channels,
//! matched under the squared error. Meant for an initialisation stage; see
//! docs/methods.d/fsp.md.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

/// Whose formula to follow where the reference implementations differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// KD-Zoo: mean over pairs; only the first map of a pair is pooled down.
    #[default]
    KdZoo,
    /// RepDistiller: sum over pairs; whichever map is larger is pooled down.
    Repdistiller,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Stage pairs `[first, second]`, the same taps on both sides.
    pub pairs: Vec<[String; 2]>,
    pub variant: Variant,
}

impl Default for Config {
    fn default() -> Self {
        let pair = |a: &str, b: &str| [a.to_string(), b.to_string()];
        Config {
            pairs: vec![
                pair("feat/0", "feat/1"),
                pair("feat/1", "feat/2"),
                pair("feat/2", "feat/3"),
            ],
            variant: Variant::KdZoo,
        }
    }
}

pub struct Fsp {
    /// `[student first, student second, teacher first, teacher second]`.
    pairs: Vec<[TapRef; 4]>,
    variant: Variant,
}

fn pool_to(fm: &Tensor, h: i64, w: i64) -> Tensor {
    if fm.size()[2] == h && fm.size()[3] == w {
        fm.shallow_clone()
    } else {
        fm.adaptive_avg_pool2d([h, w])
    }
}

impl Fsp {
    /// `[B, C₁, C₂]`.
    fn fsp_matrix(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let (ha, hb) = (a.size()[2], b.size()[2]);
        let (a, b) = match self.variant {
            _ if ha > hb => (pool_to(a, hb, b.size()[3]), b.shallow_clone()),
            Variant::Repdistiller if ha < hb => (a.shallow_clone(), pool_to(b, ha, a.size()[3])),
            _ => (a.shallow_clone(), b.shallow_clone()),
        };
        let (a, b) = (a.flatten(2, -1), b.flatten(2, -1));
        a.bmm(&b.transpose(1, 2)) / a.size()[2] as f64
    }
}

impl Method for Fsp {
    const NAME: &'static str = "fsp";
    const SUMMARY: &'static str = "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning (Yim et al., 2017)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.pairs.is_empty() {
            return Err(cx.error("pairs must name at least one pair of taps"));
        }
        let mut pairs = Vec::new();
        for [first, second] in &cfg.pairs {
            let (s1, t1) = cx.tap_pair(first)?;
            let (s2, t2) = cx.tap_pair(second)?;
            let shapes = [cx.shape(s1), cx.shape(s2), cx.shape(t1), cx.shape(t2)];
            let pair = format!("pair [`{first}`, `{second}`]");
            if shapes.iter().any(|s| s.len() != 3) {
                return Err(cx.error(format!("{pair}: needs feature maps, got {shapes:?} (student, student, teacher, teacher)")));
            }
            let [ss1, ss2, ts1, ts2] = &shapes;
            if ss1[0] != ts1[0] || ss2[0] != ts2[0] {
                return Err(cx.error(format!(
                    "{pair}: FSP matrices are C₁×C₂, so channels must agree; student has {}×{}, teacher {}×{}",
                    ss1[0], ss2[0], ts1[0], ts2[0]
                )));
            }
            for (side, a, b) in [("student", ss1, ss2), ("teacher", ts1, ts2)] {
                // Maps of equal height are never pooled, so they must agree.
                let fits = a[1..] == b[1..]
                    || match cfg.variant {
                        Variant::KdZoo => a[1] > b[1],
                        Variant::Repdistiller => a[1] != b[1],
                    };
                if !fits {
                    return Err(cx.error(format!(
                        "{pair}: the {side}'s maps {a:?} and {b:?} cannot be brought to one size; \
                         variant \"kd_zoo\" pools only a taller first map (\"repdistiller\" pools either)"
                    )));
                }
            }
            pairs.push([s1, s2, t1, t2]);
        }
        Ok(Fsp {
            pairs,
            variant: cfg.variant,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let sum = self
            .pairs
            .iter()
            .map(|&[s1, s2, t1, t2]| {
                let g_s = self.fsp_matrix(io.tap(s1), io.tap(s2));
                let g_t = self.fsp_matrix(io.tap(t1), io.tap(t2));
                g_s.mse_loss(&g_t, Reduction::Mean)
            })
            .reduce(|a, b| a + b)
            .expect("build refuses an empty pair list");
        let loss = match self.variant {
            Variant::KdZoo => sum / self.pairs.len() as f64,
            Variant::Repdistiller => sum,
        };
        out.push("fsp", loss);
        Ok(())
    }
}

register_method!(Fsp);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(maps: Vec<Tensor>) -> Taps {
        testing::maps(maps, 2)
    }

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss::<Fsp>(cfg, s, Some(t))
    }

    fn fm(v: &[f32], c: i64, h: i64) -> Tensor {
        Tensor::from_slice(v).view([1, c, h, -1])
    }

    #[test]
    fn hand_computed_gram() {
        // Student feat/0 = one channel [[1, 2], [3, 4]] pooled to 1×1 → 2.5;
        // feat/1 = two 1×1 channels [1, -1] → G_s = [2.5, -2.5].
        // Teacher: feat/0 all 0 → G_t = [0, 0]. MSE = 6.25.
        let s = taps(vec![fm(&[1., 2., 3., 4.], 1, 2), fm(&[1., -1.], 2, 1)]);
        let t = taps(vec![fm(&[0.; 4], 1, 2), fm(&[5., 7.], 2, 1)]);
        let pairs = serde_json::json!([["feat/0", "feat/1"]]);
        let l = run(serde_json::json!({"pairs": pairs}), &s, &t).unwrap();
        assert!((l - 6.25).abs() < 1e-5, "{l}");
        // The same pair twice: KD-Zoo averages, RepDistiller sums.
        let twice = serde_json::json!([["feat/0", "feat/1"], ["preact/0", "preact/1"]]);
        let mean = run(serde_json::json!({"pairs": twice}), &s, &t).unwrap();
        let sum = run(
            serde_json::json!({"pairs": twice, "variant": "repdistiller"}),
            &s,
            &t,
        )
        .unwrap();
        assert!(
            (mean - 6.25).abs() < 1e-5 && (sum - 12.5).abs() < 1e-5,
            "{mean} {sum}"
        );
        // Reversed pair: RepDistiller pools the (larger) second map instead;
        // G is the transpose, so the loss is unchanged.
        let rev = serde_json::json!([["feat/1", "feat/0"]]);
        let r = run(
            serde_json::json!({"pairs": rev, "variant": "repdistiller"}),
            &s,
            &t,
        )
        .unwrap();
        assert!((r - 6.25).abs() < 1e-5, "{r}");
        let err = run(serde_json::json!({"pairs": rev}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be brought to one size"), "{err}");
    }

    #[test]
    fn refuses_bad_pairs() {
        let s = taps(vec![fm(&[1., 2., 3., 4.], 1, 2), fm(&[1., -1.], 2, 1)]);
        let err = run(serde_json::json!({}), &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `feat/2`") && err.contains("valid taps: feat/0, feat/1"),
            "{err}"
        );
        let t = taps(vec![fm(&[1., 2., 3., 4.], 1, 2), fm(&[1., -1., 0.], 3, 1)]);
        let err = run(serde_json::json!({"pairs": [["feat/0", "feat/1"]]}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels must agree"), "{err}");
        let err = run(serde_json::json!({"pairs": [["feat/0", "embed"]]}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs feature maps"), "{err}");
        let err = run(serde_json::json!({"pairs": []}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least one pair"), "{err}");
    }
}

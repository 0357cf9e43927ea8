//! Attention transfer (Zagoruyko & Komodakis, 2017): match the spatial
//! attention maps `Q = Σ_c |A_c|^p`, each normalised by its L2 norm, of
//! several stages.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

/// Whose formula to follow where the reference implementations differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// KD-Zoo: `Σ_c |A|^p / (‖·‖₂ + 1e-6)`, mean over taps.
    #[default]
    KdZoo,
    /// RepDistiller: `normalize(mean_c A^p)`, the larger map average-pooled
    /// to the smaller, sum over taps.
    Repdistiller,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Power applied to the activations.
    pub p: f64,
    /// Feature maps matched, the same tap on both sides.
    pub taps: Vec<String>,
    pub variant: Variant,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            p: 2.0,
            taps: vec!["feat/1".into(), "feat/2".into(), "feat/3".into()],
            variant: Variant::KdZoo,
        }
    }
}

pub struct At {
    pairs: Vec<(TapRef, TapRef)>,
    p: f64,
    variant: Variant,
}

impl At {
    /// KD-Zoo's attention map, `[B, 1, H, W]`.
    fn kd_zoo_map(&self, fm: &Tensor) -> Tensor {
        let am = fm
            .abs()
            .pow_tensor_scalar(self.p)
            .sum_dim_intlist(1, true, fm.kind());
        let norm = am.norm_scalaropt_dim(2, [2, 3], true);
        am / (norm + 1e-6)
    }

    /// RepDistiller's attention map, `[B, H·W]`, pooled to `hw` first.
    fn repdistiller_map(&self, fm: &Tensor, hw: (i64, i64)) -> Tensor {
        let fm = if (fm.size()[2], fm.size()[3]) != hw {
            fm.adaptive_avg_pool2d([hw.0, hw.1])
        } else {
            fm.shallow_clone()
        };
        let am = fm
            .pow_tensor_scalar(self.p)
            .mean_dim(1, false, fm.kind())
            .flatten(1, -1);
        // F.normalize: the norm is floored, not shifted.
        &am / am.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
    }
}

impl Method for At {
    const NAME: &'static str = "at";
    const SUMMARY: &'static str =
        "Paying More Attention to Attention (Zagoruyko & Komodakis, 2017)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.p <= 0.0 {
            return Err(cx.error(format!("p must be positive, got {}", cfg.p)));
        }
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one feature map"));
        }
        let mut pairs = Vec::new();
        for name in &cfg.taps {
            let (s, t, ss, ts) = cx.map_pair(name)?;
            if cfg.variant == Variant::KdZoo && ss[1..] != ts[1..] {
                return Err(cx.error(format!(
                    "tap `{name}`: student and teacher maps differ in size ({ss:?} vs {ts:?}); \
                     variant \"repdistiller\" pools the larger one"
                )));
            }
            pairs.push((s, t));
        }
        Ok(At {
            pairs,
            p: cfg.p,
            variant: cfg.variant,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let terms = self.pairs.iter().map(|&(s, t)| {
            let (fs, ft) = (io.tap(s), io.tap(t));
            match self.variant {
                Variant::KdZoo => self
                    .kd_zoo_map(fs)
                    .mse_loss(&self.kd_zoo_map(ft), Reduction::Mean),
                Variant::Repdistiller => {
                    let hw = (
                        fs.size()[2].min(ft.size()[2]),
                        fs.size()[3].min(ft.size()[3]),
                    );
                    self.repdistiller_map(fs, hw)
                        .mse_loss(&self.repdistiller_map(ft, hw), Reduction::Mean)
                }
            }
        });
        let sum = terms
            .reduce(|a, b| a + b)
            .expect("build refuses an empty tap list");
        let loss = match self.variant {
            Variant::KdZoo => sum / self.pairs.len() as f64,
            Variant::Repdistiller => sum,
        };
        out.push("at", loss);
        Ok(())
    }
}

register_method!(At);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    fn taps(maps: Vec<Tensor>) -> Taps {
        testing::maps(maps, 2)
    }

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss::<At>(cfg, s, Some(t))
    }

    fn map(v: &[f32], c: i64) -> Tensor {
        Tensor::from_slice(v).view([1, c, 1, -1])
    }

    #[test]
    fn hand_computed_attention_maps() {
        // Student: one channel [2, 0] → Q = [4, 0] → [1, 0] (less 1e-6 shift).
        // Teacher: two channels [1, 0] and [0, 1] → Q = [1, 1] → [0.7071, 0.7071].
        // MSE = ((1 - 0.7071)² + 0.7071²) / 2 = 0.292893.
        let s = taps(vec![map(&[2., 0.], 1)]);
        let t = taps(vec![map(&[1., 0., 0., 1.], 2)]);
        let l = run(serde_json::json!({"taps": ["feat/0"]}), &s, &t).unwrap();
        assert!((l - 0.292893).abs() < 1e-5, "{l}");
        // RepDistiller: the same maps (mean over channels changes nothing once
        // normalised), and the same tap twice sums rather than averages.
        let r = run(
            serde_json::json!({"taps": ["feat/0", "preact/0"], "variant": "repdistiller"}),
            &s,
            &t,
        )
        .unwrap();
        assert!((r - 2.0 * 0.292893).abs() < 1e-5, "{r}");
        let k = run(serde_json::json!({"taps": ["feat/0", "preact/0"]}), &s, &t).unwrap();
        assert!((k - 0.292893).abs() < 1e-5, "{k}");
    }

    #[test]
    fn identical_maps_give_zero_and_p_matters() {
        let s = taps(vec![map(&[1., -2., 3., 0.5], 1)]);
        assert!(
            run(serde_json::json!({"taps": ["feat/0"]}), &s, &s)
                .unwrap()
                .abs()
                < 1e-12
        );
        let t = taps(vec![map(&[1., 2., 3., 4.], 1)]);
        let p2 = run(serde_json::json!({"taps": ["feat/0"]}), &s, &t).unwrap();
        let p1 = run(serde_json::json!({"taps": ["feat/0"], "p": 1.0}), &s, &t).unwrap();
        assert!(p2 > 0.0 && (p1 - p2).abs() > 1e-4, "{p1} {p2}");
    }

    #[test]
    fn refuses_bad_taps_and_sizes() {
        let s = taps(vec![map(&[1., 2.], 1)]);
        let err = run(serde_json::json!({}), &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `feat/1`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let err = run(serde_json::json!({"taps": ["embed"]}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a feature map"), "{err}");
        let t = taps(vec![map(&[1., 2., 3., 4.], 1)]);
        let err = run(serde_json::json!({"taps": ["feat/0"]}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ in size"), "{err}");
        assert!(
            run(
                serde_json::json!({"taps": ["feat/0"], "variant": "repdistiller"}),
                &s,
                &t
            )
            .is_ok()
        );
        let err = run(serde_json::json!({"tap": "feat/0"}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `tap`"), "{err}");
    }
}

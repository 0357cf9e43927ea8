//! Similarity-preserving KD (Tung & Mori, 2019): match the row-normalised
//! batch Gram matrices `G = F Fᵀ` of student and teacher, averaged over taps.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Taps whose similarity matrices are matched; the loss is their mean.
    pub taps: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            taps: vec!["feat/1".into(), "feat/2".into(), "feat/3".into()],
        }
    }
}

pub struct Sp {
    pairs: Vec<(TapRef, TapRef)>,
}

/// `normalize(F Fᵀ, p=2, dim=1)` with F the flattened per-sample features.
fn similarity(fm: &Tensor) -> Tensor {
    let f = fm.flatten(1, -1);
    let g = f.mm(&f.tr());
    // F.normalize's floor on the norm keeps an all-zero row at zero.
    &g / g.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

impl Method for Sp {
    const NAME: &'static str = "sp";
    const SUMMARY: &'static str =
        "Similarity-Preserving Knowledge Distillation (Tung & Mori, 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one tap"));
        }
        let pairs = cfg
            .taps
            .iter()
            .map(|name| cx.tap_pair(name))
            .collect::<Result<Vec<_>>>()?;
        Ok(Sp { pairs })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let total = self
            .pairs
            .iter()
            .map(|&(s, t)| similarity(io.tap(s)).mse_loss(&similarity(io.tap(t)), Reduction::Mean))
            .reduce(|a, b| a + b)
            .expect("build refuses an empty tap list");
        out.push("sp", total / self.pairs.len() as f64);
        Ok(())
    }
}

register_method!(Sp);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};

    use super::*;

    /// Batch `b` of embeddings, also as a feature map `feat/0` of 1×1 maps.
    fn taps(embed: &[f32], b: i64) -> Taps {
        testing::maps(vec![Tensor::from_slice(embed).view([b, -1, 1, 1])], 3)
    }

    fn run(cfg: Config, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss_typed::<Sp>(cfg, s, Some(t))
    }

    #[test]
    fn orthogonal_student_against_collinear_teacher() {
        // G_s = I; G_t = all ones, rows normalised to 1/√2. Diagonal error
        // (1 - 1/√2)² = 0.085786, off-diagonal 0.5: mean = 0.292893.
        let (s, t) = (taps(&[1., 0., 0., 1.], 2), taps(&[1., 0., 1., 0.], 2));
        let one = run(
            Config {
                taps: vec!["embed".into()],
            },
            &s,
            &t,
        )
        .unwrap();
        assert!((one - 0.292893).abs() < 1e-5, "{one}");
        // The same tap twice, as a feature map: the mean over taps is unchanged.
        let two = run(
            Config {
                taps: vec!["embed".into(), "feat/0".into()],
            },
            &s,
            &t,
        )
        .unwrap();
        assert!((two - one).abs() < 1e-6, "{two}");
    }

    #[test]
    fn refuses_unknown_and_empty_taps() {
        let s = taps(&[1., 0., 0., 1.], 2);
        let err = run(Config::default(), &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `feat/1`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let err = run(Config { taps: vec![] }, &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least one tap"), "{err}");
    }
}

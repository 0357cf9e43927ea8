//! Decoupled knowledge distillation (Zhao et al., 2022): the KD loss split
//! into target-class KD, a binary KL over (target, all others), and
//! non-target-class KD, a KL over the other classes renormalised, weighted
//! apart: `α·TCKD + β·NCKD`, each × T². Optionally on logits standardised
//! per sample first (logit standardisation, Sun et al., 2024).

use kd_core::{
    BuildCx, Losses, Method, Result, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Weight of TCKD.
    pub alpha: f64,
    /// Weight of NCKD (mdistiller: 8, 6 or 2 by teacher-student pair).
    pub beta: f64,
    /// Softmax temperature (the base temperature when `ls` is on).
    #[serde(rename = "T")]
    pub t: f64,
    /// Logit standardisation: z-score each sample's logits before `/ T`.
    pub ls: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            alpha: 1.0,
            beta: 8.0,
            t: 4.0,
            ls: false,
        }
    }
}

pub struct Dkd {
    s: TapRef,
    t: TapRef,
    cfg: Config,
}

/// `(z - mean) / (1e-7 + std)` per sample, the unbiased std, as the LS code.
pub fn standardize(z: &Tensor) -> Tensor {
    let mean = z.mean_dim(-1, true, z.kind());
    let std = z.std_dim(-1, true, true);
    (z - mean) / (std + 1e-7)
}

/// Σ p_t (log p_t − log p_s) / B, with 0·log 0 = 0 as `F.kl_div`.
fn kl_batchmean(p_t: &Tensor, log_p_s: &Tensor) -> Tensor {
    (p_t.xlogy(p_t) - p_t * log_p_s).sum(Kind::Float) / p_t.size()[0] as f64
}

fn check(field: &str, value: f64) -> std::result::Result<(), String> {
    let ok = if field == "T" {
        value > 0.0
    } else {
        value >= 0.0
    };
    if ok && value.is_finite() {
        Ok(())
    } else {
        let want = if field == "T" {
            "positive"
        } else {
            "non-negative"
        };
        Err(format!("{field} must be finite and {want}, got {value}"))
    }
}

impl Method for Dkd {
    const NAME: &'static str = "dkd";
    const SUMMARY: &'static str = "Decoupled Knowledge Distillation (Zhao et al., 2022)";
    const SCHEDULABLE: &'static [&'static str] = &["alpha", "beta", "T"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        for (field, value) in [("alpha", cfg.alpha), ("beta", cfg.beta), ("T", cfg.t)] {
            check(field, value).map_err(|e| cx.error(e))?;
        }
        let (s, t) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(s).to_vec(), cx.shape(t).to_vec());
        if cs != ct || cs.len() != 1 || cs[0] < 2 {
            return Err(cx.error(format!(
                "needs logits over the same classes (at least 2) on both sides, got student {cs:?} and teacher {ct:?}"
            )));
        }
        Ok(Dkd { s, t, cfg })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (mut s, mut t) = (
            io.tap(self.s).shallow_clone(),
            io.tap(self.t).shallow_clone(),
        );
        if self.cfg.ls {
            (s, t) = (standardize(&s), standardize(&t));
        }
        let temp = self.cfg.t;
        let (s, t) = (s / temp, t / temp);
        let gt = s
            .zeros_like()
            .scatter_value(1, &io.target.unsqueeze(1), 1.0);
        let rest = 1.0 - &gt;

        // TCKD: binary distributions (p_target, Σ p_other) of the full softmax.
        let binary = |p: Tensor| {
            let sum = |m: &Tensor| (&p * m).sum_dim_intlist(1, true, Kind::Float);
            Tensor::cat(&[sum(&gt), sum(&rest)], 1)
        };
        let (b_s, b_t) = (
            binary(s.softmax(1, Kind::Float)),
            binary(t.softmax(1, Kind::Float)),
        );
        let tckd = kl_batchmean(&b_t, &b_s.log());

        // NCKD: the target logit pushed down by 1000 (the authors' masking),
        // so the softmax runs over the other classes only.
        let (s2, t2) = (&s - &gt * 1000.0, &t - &gt * 1000.0);
        let nckd = kl_batchmean(&t2.softmax(1, Kind::Float), &s2.log_softmax(1, Kind::Float));

        let t2_factor = temp * temp;
        out.push("tckd", tckd * (self.cfg.alpha * t2_factor));
        out.push("nckd", nckd * (self.cfg.beta * t2_factor));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let c = &mut self.cfg;
        let mut fields = [
            ("alpha", &mut c.alpha),
            ("beta", &mut c.beta),
            ("T", &mut c.t),
        ];
        set_scheduled_field(Self::NAME, &mut fields, field, value, check)
    }
}

register_method!(Dkd);

#[cfg(test)]
mod tests {
    use kd_core::Taps;
    use kd_core::testing::{self, logits};
    use serde_json::json;

    use super::*;

    fn terms(cfg: serde_json::Value, s: &Taps, t: &Taps, y: &[i64]) -> Result<Vec<f64>> {
        let y = Tensor::from_slice(y);
        let mut b = testing::build::<Dkd>(cfg, s, Some(t))?;
        let out = b.losses_with(&testing::io(s, Some(t), &y))?;
        assert_eq!(out.terms[0].0, "tckd");
        assert_eq!(out.terms[1].0, "nckd");
        Ok(out.terms.iter().map(|(_, v)| v.double_value(&[])).collect())
    }

    #[test]
    fn hand_computed_three_classes() {
        // T = 1, target 0. Student logits (0, 0, 0): binary (1/3, 2/3), others
        // (1/2, 1/2). Teacher (ln 2, ln 1, ln 3) → p = (2/6, 1/6, 3/6): binary
        // (1/3, 2/3) as the student's, so TCKD = 0; others (1/4, 3/4), NCKD =
        // 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812.
        let s = logits(&[&[0.0, 0.0, 0.0]]);
        let t = logits(&[&[2f32.ln(), 0.0, 3f32.ln()]]);
        let v = terms(json!({"T": 1.0, "beta": 1.0}), &s, &t, &[0]).unwrap();
        assert!(v[0].abs() < 1e-6 && (v[1] - 0.130812).abs() < 1e-5, "{v:?}");
        // β and T² scale NCKD; an equal teacher gives zero.
        let v2 = terms(json!({"T": 2.0, "beta": 3.0}), &s, &t, &[0]).unwrap();
        assert!(v2[1] > 0.0, "{v2:?}");
        let v = terms(json!({}), &s, &s, &[1]).unwrap();
        assert!(v.iter().all(|x| x.abs() < 1e-6), "{v:?}");
    }

    #[test]
    fn standardisation_ignores_shift_and_scale() {
        let s = logits(&[&[0.3, -1.0, 2.0, 0.5], &[1.0, 0.0, -0.5, 0.2]]);
        let t = logits(&[&[1.0, 2.0, -1.0, 0.0], &[0.1, 0.4, 0.3, -2.0]]);
        let t_scaled = logits(&[&[13.0, 16.0, 7.0, 10.0], &[5.3, 6.2, 5.9, -1.0]]);
        let cfg = json!({"ls": true, "T": 2.0});
        let (a, b) = (
            terms(cfg.clone(), &s, &t, &[2, 1]).unwrap(),
            terms(cfg, &s, &t_scaled, &[2, 1]).unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        let z = standardize(&t.logits);
        let std = z.std_dim(-1, true, false);
        assert!((std - 1.0).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn refuses_bad_config_and_schedules() {
        let s = logits(&[&[0.0, 1.0]]);
        for cfg in [
            json!({"T": 0.0}),
            json!({"beta": -1.0}),
            json!({"alpha": -0.5}),
        ] {
            assert!(testing::build::<Dkd>(cfg, &s, Some(&s)).is_err());
        }
        let one = logits(&[&[0.0]]);
        let err = testing::build::<Dkd>(json!({}), &one, Some(&one))
            .err()
            .unwrap();
        assert!(err.to_string().contains("at least 2"), "{err}");
        let mut m = testing::build::<Dkd>(json!({}), &s, Some(&s))
            .unwrap()
            .method;
        assert!(m.set_scheduled("beta", 2.0).is_ok() && m.cfg.beta == 2.0);
        assert!(m.set_scheduled("T", -1.0).is_err());
        assert!(m.set_scheduled("ls", 1.0).is_err());
    }
}

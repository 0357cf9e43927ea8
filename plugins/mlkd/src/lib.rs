//! Multi-level logit distillation (Jin et al., CVPR 2023). Predictions
//! P = softmax(z/τ) are aligned at three levels, each at the five
//! temperatures τ ∈ {T, 3, 5, 2, 6} ("prediction augmentation"), on the
//! batch (weak view) and on a strongly augmented view of it:
//!
//!   instance  L_ins   = τ² · 1/B Σ_i KL(P_t,i ‖ P_s,i)
//!   batch     L_batch = ‖P_t P_tᵀ − P_s P_sᵀ‖² / B      (B×B sample relations)
//!   class     L_class = ‖P_tᵀ P_t − P_sᵀ P_s‖² / C      (C×C class relations)
//!
//! masked by the teacher's confidence on the weak view: samples whose top
//! probability, and classes whose summed probability, lie at or below the
//! median. With `ls`, the instance terms see z-scored logits (logit
//! standardisation, Sun et al., 2024). `released` (default) reproduces the
//! authors' code rather than the paper; see [`Config::released`].

use kd_core::{
    AugmentPolicy, AugmentSpec, BuildCx, KdError, Losses, Method, Result, StepIo, TapRef,
    register_method, set_scheduled_field,
};
use kd_plugin_dkd::standardize;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Base temperature, the first of the five (`KD.TEMPERATURE`).
    #[serde(rename = "T")]
    pub t: f64,
    /// Multiplies every instance, batch and class term (`KD.LOSS.KD_WEIGHT`).
    pub kd_weight: f64,
    /// Cross-entropy of the student on the strong view (`KD.LOSS.CE_WEIGHT`);
    /// the weak view's cross-entropy is the recipe's `ce` method.
    pub ce_weight: f64,
    /// z-score logits before the instance terms (the LS code's
    /// `logit_stand`, which leaves batch and class terms on raw logits).
    pub ls: bool,
    /// The released code (true): a weak term is its unmasked value times the
    /// masked fraction (a scalar loss times the mask, then `.mean()`); the
    /// strong instance term takes τ = 2 and 6 on the weak logits; strong
    /// batch and class terms are computed there but not returned, so absent
    /// here. False, the paper: masks select samples (classes) before the
    /// reduction, every strong term sees the strong view, and the strong
    /// class and (masked) batch terms are added.
    pub released: bool,
}

impl Default for Config {
    fn default() -> Self {
        // MLKD's mdistiller cfg (KD T 4, CE 0.1, KD 0.9).
        Config {
            t: 4.0,
            kd_weight: 0.9,
            ce_weight: 0.1,
            ls: false,
            released: true,
        }
    }
}

pub struct Mlkd {
    s: TapRef,
    t: TapRef,
    cfg: Config,
}

/// Per-sample share of the instance term, `[B]`: KL(P_t ‖ P_s)·τ²/B, so
/// that it sums to `kd_loss` (with F.kl_div's 0·log 0 = 0).
fn instance(s: &Tensor, t: &Tensor, tau: f64) -> Tensor {
    let p_t = (t / tau).softmax(1, Kind::Float);
    let log_p_s = (s / tau).log_softmax(1, Kind::Float);
    let kl = (p_t.xlogy(&p_t) - &p_t * log_p_s).sum_dim_intlist(1, false, Kind::Float);
    kl * (tau * tau / s.size()[0] as f64)
}

/// Row shares of a relation term, summing to ‖G_t − G_s‖² / n: with
/// `classes` false G = P Pᵀ over samples (`bc_loss`), else Pᵀ P over
/// classes (`cc_loss`).
fn relation(s: &Tensor, t: &Tensor, tau: f64, classes: bool) -> Tensor {
    let gram = |z: &Tensor| {
        let p = (z / tau).softmax(1, Kind::Float);
        if classes {
            p.tr().mm(&p)
        } else {
            p.mm(&p.tr())
        }
    };
    let d = (gram(t) - gram(s)).square();
    let n = d.size()[0] as f64;
    d.sum_dim_intlist(1, false, Kind::Float) / n
}

/// `x ≤ np.percentile(x, 50)` as 0/1: numpy's linear interpolation between
/// the two middle order statistics, in x's precision as numpy computes it.
fn at_most_median(x: &Tensor) -> Tensor {
    let sorted = x.sort(0, false).0;
    let at = (x.size()[0] - 1) as f64 * 0.5;
    let (a, b) = (sorted.get(at.floor() as i64), sorted.get(at.ceil() as i64));
    let frac = at.fract();
    let thresh = if frac >= 0.5 {
        &b - (&b - &a) * (1.0 - frac)
    } else {
        &a + (&b - &a) * frac
    };
    x.le_tensor(&thresh).to_kind(Kind::Float)
}

fn check(field: &str, value: f64) -> std::result::Result<(), String> {
    let (ok, want) = match field {
        "T" => (value > 0.0, "positive"),
        _ => (value >= 0.0, "non-negative"),
    };
    match ok && value.is_finite() {
        true => Ok(()),
        false => Err(format!("{field} must be finite and {want}, got {value}")),
    }
}

impl Mlkd {
    /// kd_weight · Σ_τ of a level's row shares, reduced under `mask`:
    /// released, the sum times the masked fraction; paper, the masked rows'
    /// sum.
    fn level(&self, taus: &[f64], mask: Option<&Tensor>, rows: impl Fn(f64) -> Tensor) -> Tensor {
        let per_tau = taus.iter().map(|&tau| match mask {
            None => rows(tau).sum(Kind::Float),
            Some(m) if self.cfg.released => rows(tau).sum(Kind::Float) * m.mean(Kind::Float),
            Some(m) => (rows(tau) * m).sum(Kind::Float),
        });
        per_tau.reduce(|a, b| a + b).expect("temperatures") * self.cfg.kd_weight
    }
}

impl Method for Mlkd {
    const NAME: &'static str = "mlkd";
    const SUMMARY: &'static str = "Multi-Level Logit Distillation (Jin et al., CVPR 2023)";
    const SCHEDULABLE: &'static [&'static str] = &["T", "kd_weight", "ce_weight"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let fields = [
            ("T", cfg.t),
            ("kd_weight", cfg.kd_weight),
            ("ce_weight", cfg.ce_weight),
        ];
        for (field, value) in fields {
            check(field, value).map_err(|e| cx.error(e))?;
        }
        let (s, t) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(s), cx.shape(t));
        if cs != ct || cs.len() != 1 || cs[0] < 2 {
            return Err(cx.error(format!(
                "needs logits over the same classes (at least 2) on both sides, got student {cs:?} and teacher {ct:?}"
            )));
        }
        // FixMatch's RandAugment with two operations, as the authors' loader.
        cx.augmented_view(AugmentSpec {
            policy: AugmentPolicy::RandAugment { n: 2 },
        })?;
        Ok(Mlkd { s, t, cfg })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let c = &self.cfg;
        let (s_w, t_w) = (io.tap(self.s), io.tap(self.t));
        let strong = io
            .augmented()
            .map(|v| (&v.student.logits, &v.teacher.logits));
        // The masks pair the views sample by sample: refuse to broadcast.
        if let Some((s, t)) = strong
            && (s.size() != s_w.size() || t.size() != t_w.size())
        {
            return Err(KdError::Plan {
                method: Self::NAME.into(),
                msg: format!(
                    "the augmented view's logits {:?}/{:?} differ from the batch's {:?}",
                    s.size(),
                    t.size(),
                    s_w.size()
                ),
            });
        }
        // Masks from the teacher's weak-view softmax at temperature 1.
        let p_t = t_w.softmax(1, Kind::Float);
        let mask = at_most_median(&p_t.max_dim(1, false).0);
        let class_mask = at_most_median(&p_t.sum_dim_intlist(0, false, Kind::Float));
        let temps = [c.t, 3.0, 5.0, 2.0, 6.0];
        let ls = |z: &Tensor| {
            if c.ls {
                standardize(z)
            } else {
                z.shallow_clone()
            }
        };
        let (zs_w, zt_w) = (ls(s_w), ls(t_w));
        let ins_w = |tau| instance(&zs_w, &zt_w, tau);

        if let Some((s_s, _)) = strong {
            let ce = s_s.log_softmax(1, Kind::Float).nll_loss(io.target());
            out.push_task("ce_strong", ce * c.ce_weight);
        }
        out.push("kd_weak", self.level(&temps, Some(&mask), ins_w));
        if let Some((s_s, t_s)) = strong {
            let (zs_s, zt_s) = (ls(s_s), ls(t_s));
            let ins_s = |tau| instance(&zs_s, &zt_s, tau);
            let kd_strong = if c.released {
                // The code's τ = 2 and 6 "strong" terms read the weak logits.
                self.level(&temps[..3], None, ins_s) + self.level(&temps[3..], None, ins_w)
            } else {
                self.level(&temps, None, ins_s)
            };
            out.push("kd_strong", kd_strong);
        }
        let cc_weak = self.level(&temps, Some(&class_mask), |tau| {
            relation(s_w, t_w, tau, true)
        });
        out.push("cc_weak", cc_weak);
        let bc_weak = self.level(&temps, Some(&mask), |tau| relation(s_w, t_w, tau, false));
        out.push("bc_weak", bc_weak);
        // The paper's strong relation terms; the released code drops them.
        if let (Some((s_s, t_s)), false) = (strong, c.released) {
            let cc_strong = self.level(&temps, None, |tau| relation(s_s, t_s, tau, true));
            out.push("cc_strong", cc_strong);
            let bc_strong = self.level(&temps, Some(&mask), |tau| relation(s_s, t_s, tau, false));
            out.push("bc_strong", bc_strong);
        }
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let c = &mut self.cfg;
        let mut fields = [
            ("T", &mut c.t),
            ("kd_weight", &mut c.kd_weight),
            ("ce_weight", &mut c.ce_weight),
        ];
        set_scheduled_field(Self::NAME, &mut fields, field, value, check)
    }
}

register_method!(Mlkd);

#[cfg(test)]
mod tests {
    use kd_core::testing::{self, logits};
    use kd_core::{Taps, ViewTaps};
    use serde_json::json;

    use super::*;

    /// Named terms of one step, with the strong view when given.
    fn terms(
        cfg: serde_json::Value,
        (s, t): (&Taps, &Taps),
        view: Option<&ViewTaps>,
    ) -> Result<Vec<(String, f64)>> {
        let y = Tensor::zeros([s.logits.size()[0]], (Kind::Int64, tch::Device::Cpu));
        let mut b = testing::build::<Mlkd>(cfg, s, Some(t))?;
        let io = StepIo {
            augmented: view,
            ..testing::io(s, Some(t), &y)
        };
        let out = b.losses_with(&io)?;
        Ok(out
            .terms
            .iter()
            .map(|(n, v)| (n.clone(), v.double_value(&[])))
            .collect())
    }

    fn value(terms: &[(String, f64)], name: &str) -> f64 {
        terms.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// Five samples; the teacher is most confident on samples 3 and 4, so
    /// the median mask keeps 0, 1 and 2 (3 of 5).
    fn batch() -> (Taps, Taps) {
        let s = logits(&[
            &[0.3, -1.0, 2.0],
            &[1.0, 0.0, -0.5],
            &[0.2, 0.1, 0.0],
            &[-1.0, 0.5, 0.3],
            &[0.0, 2.0, 1.0],
        ]);
        let t = logits(&[
            &[1.0, 0.5, 0.0],
            &[0.0, 1.2, 0.3],
            &[0.2, 0.0, 1.5],
            &[6.0, 0.0, 0.0],
            &[0.0, 0.0, 8.0],
        ]);
        (s, t)
    }

    #[test]
    fn median_mask_follows_numpy() {
        let mask =
            |x: &[f32]| Vec::<f32>::try_from(at_most_median(&Tensor::from_slice(x))).unwrap();
        assert_eq!(mask(&[0.1, 0.3, 0.2, 0.7]), [1.0, 0.0, 1.0, 0.0]);
        assert_eq!(mask(&[3.0, 1.0, 2.0]), [0.0, 1.0, 1.0]);
        assert_eq!(mask(&[0.5; 4]), [1.0; 4]);
    }

    #[test]
    fn released_weak_terms_scale_by_the_masked_fraction() {
        let (s, t) = batch();
        let temps = [4.0, 3.0, 5.0, 2.0, 6.0];
        let unmasked: f64 = temps
            .iter()
            .map(|&tau| {
                instance(&s.logits, &t.logits, tau)
                    .sum(Kind::Float)
                    .double_value(&[])
            })
            .sum();
        let on_kept: f64 = temps
            .iter()
            .map(|&tau| {
                instance(&s.logits, &t.logits, tau)
                    .narrow(0, 0, 3)
                    .sum(Kind::Float)
                    .double_value(&[])
            })
            .sum();
        let cfg = |released| json!({"kd_weight": 1.0, "released": released});
        let released = value(&terms(cfg(true), (&s, &t), None).unwrap(), "kd_weak");
        let paper = value(&terms(cfg(false), (&s, &t), None).unwrap(), "kd_weak");
        assert!(
            (released - 0.6 * unmasked).abs() < 1e-5 * unmasked,
            "{released} vs {unmasked}"
        );
        assert!(
            (paper - on_kept).abs() < 1e-5 * on_kept,
            "{paper} vs {on_kept}"
        );

        // A masked-out sample moves the released term, not the paper's.
        let moved = s.logits.copy();
        let _ = moved.get(4).fill_(3.0);
        let moved_s = testing::taps(vec![], moved);
        let moved_terms = |r| value(&terms(cfg(r), (&moved_s, &t), None).unwrap(), "kd_weak");
        assert!((moved_terms(true) - released).abs() > 1e-3);
        assert!((moved_terms(false) - paper).abs() < 1e-6);
    }

    #[test]
    fn strong_terms_need_the_view() {
        let (s, t) = batch();
        let names = |cfg, view| -> Vec<String> {
            terms(cfg, (&s, &t), view)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        // Evaluation steps (and probes without a view): weak terms only.
        assert_eq!(names(json!({}), None), ["kd_weak", "cc_weak", "bc_weak"]);
        let view = ViewTaps {
            student: logits(&[&[0.0f32, 1.0, 0.0][..]; 5]),
            teacher: logits(&[&[1.0f32, 0.0, 0.0][..]; 5]),
        };
        assert_eq!(
            names(json!({}), Some(&view)),
            ["ce_strong", "kd_weak", "kd_strong", "cc_weak", "bc_weak"]
        );
        assert_eq!(
            names(json!({"released": false}), Some(&view)),
            [
                "ce_strong",
                "kd_weak",
                "kd_strong",
                "cc_weak",
                "bc_weak",
                "cc_strong",
                "bc_strong"
            ]
        );
        // A view of another batch size is refused, not broadcast.
        let short = ViewTaps {
            student: logits(&[&[0.0, 1.0, 0.0]]),
            teacher: logits(&[&[1.0, 0.0, 0.0]]),
        };
        assert!(terms(json!({}), (&s, &t), Some(&short)).is_err());
        // The method asks the engine for the view.
        let b = testing::build::<Mlkd>(json!({}), &s, Some(&t)).unwrap();
        assert_eq!(
            b.needs.augmented,
            Some(AugmentSpec {
                policy: AugmentPolicy::RandAugment { n: 2 }
            })
        );
    }

    #[test]
    fn refuses_bad_config_and_schedules() {
        let (s, t) = batch();
        for (cfg, want) in [
            (json!({"T": 0.0}), "T must be finite and positive"),
            (
                json!({"kd_weight": -1.0}),
                "kd_weight must be finite and non-negative",
            ),
            (
                json!({"ce_weight": -0.1}),
                "ce_weight must be finite and non-negative",
            ),
            (json!({"temperature": 2.0}), "temperature"),
        ] {
            let err = testing::build::<Mlkd>(cfg, &s, Some(&t)).err().unwrap();
            assert!(err.to_string().contains(want), "{err}");
        }
        let one = logits(&[&[0.0]]);
        let err = testing::build::<Mlkd>(json!({}), &one, Some(&one))
            .err()
            .unwrap();
        assert!(err.to_string().contains("at least 2"), "{err}");
        assert!(testing::build::<Mlkd>(json!({}), &s, None).is_err());
        let mut m = testing::build::<Mlkd>(json!({}), &s, Some(&t))
            .unwrap()
            .method;
        assert!(m.set_scheduled("kd_weight", 9.0).is_ok() && m.cfg.kd_weight == 9.0);
        assert!(m.set_scheduled("T", f64::INFINITY).is_err());
        assert!(m.set_scheduled("released", 0.0).is_err());
    }
}

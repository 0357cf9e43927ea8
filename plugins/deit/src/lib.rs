//! DeiT's distillation through attention (Touvron et al., ICML 2021), as the
//! authors' `DistillationLoss` (facebookresearch/deit `losses.py`):
//!
//! `L = (1 − α)·CE(z_cls, y) + α·L_dist(z_dist, z_t)`, where `L_dist` is
//! soft: `KL(softmax(z_t/τ) ‖ softmax(z_dist/τ))` summed, · τ² / numel(z_dist)
//! (DeiT's legacy normalisation: per logit, not per sample), or
//! hard: `CE(z_dist, argmax z_t)`.
//!
//! `z_dist` is the student's distillation head (`logits_dist`) when it has
//! one, else its `logits` (a DeiT without distillation token). The base
//! term is inside, as in the authors' loss: a recipe using `deit` adds no
//! `ce` term of its own.

use kd_core::{
    BuildCx, Losses, Method, Result, Side, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::Kind;

/// The distillation term (`--distillation-type` of DeiT's main.py).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillationType {
    /// KL to the teacher's softened distribution.
    #[default]
    Soft,
    /// Cross-entropy with the teacher's top class as the label.
    Hard,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// main.py's default is "none" (no teacher); the method is its soft form.
    pub distillation_type: DistillationType,
    /// Weight of the distillation term; the base term has 1 − α.
    pub alpha: f64,
    /// Temperature of the soft term.
    pub tau: f64,
    /// ε of the base criterion: `(1 − ε)·y + ε/classes` (DeiT's main.py: 0.1).
    pub label_smoothing: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            distillation_type: DistillationType::Soft,
            alpha: 0.5,
            tau: 1.0,
            label_smoothing: 0.0,
        }
    }
}

pub struct Deit {
    cls: TapRef,
    dist: TapRef,
    teacher: TapRef,
    classes: i64,
    cfg: Config,
}

fn check(field: &str, value: f64) -> std::result::Result<(), String> {
    let ok = match field {
        "alpha" => (0.0..=1.0).contains(&value),
        _ => value > 0.0 && value.is_finite(),
    };
    let want = if field == "alpha" {
        "in [0, 1]"
    } else {
        "finite and positive"
    };
    ok.then_some(())
        .ok_or_else(|| format!("{field} must be {want}, got {value}"))
}

impl Method for Deit {
    const NAME: &'static str = "deit";
    const SUMMARY: &'static str = "Training data-efficient image transformers & distillation through attention (Touvron et al., 2021)";
    const SCHEDULABLE: &'static [&'static str] = &["alpha", "tau"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        for (field, value) in [("alpha", cfg.alpha), ("tau", cfg.tau)] {
            check(field, value).map_err(|e| cx.error(e))?;
        }
        if !(0.0..1.0).contains(&cfg.label_smoothing) {
            let e = format!(
                "label_smoothing must be in [0, 1), got {}",
                cfg.label_smoothing
            );
            return Err(cx.error(e));
        }
        let cls = cx.tap(Side::Student, "logits")?;
        let dist = cx.tap(Side::Student, "logits_dist").unwrap_or(cls);
        let teacher = cx.tap(Side::Teacher, "logits")?;
        let (c, d, t) = (cx.shape(cls), cx.shape(dist), cx.shape(teacher));
        if c != t || d != t || t.len() != 1 {
            return Err(cx.error(format!(
                "needs logits over the same classes: student {c:?} (distillation head {d:?}), teacher {t:?}"
            )));
        }
        Ok(Deit {
            cls,
            dist,
            teacher,
            classes: t[0],
            cfg,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (cls, dist, t) = (io.tap(self.cls), io.tap(self.dist), io.tap(self.teacher));
        let (alpha, tau) = (self.cfg.alpha, self.cfg.tau);

        // Base criterion: CE against (mixed, smoothed) label distributions.
        let y = io.label_distribution(self.classes, self.cfg.label_smoothing);
        let base = -(y * cls.log_softmax(1, Kind::Float)).sum_dim_intlist(1, false, Kind::Float);
        out.push_task("base", base.mean(Kind::Float) * (1.0 - alpha));

        let distill = match self.cfg.distillation_type {
            DistillationType::Soft => {
                let (log_s, log_t) = (
                    (dist / tau).log_softmax(1, Kind::Float),
                    (t / tau).log_softmax(1, Kind::Float),
                );
                let kl = (log_t.exp() * (&log_t - log_s)).sum(Kind::Float);
                kl * (tau * tau) / dist.numel() as f64
            }
            DistillationType::Hard => dist
                .log_softmax(1, Kind::Float)
                .nll_loss(&t.argmax(1, false)),
        };
        out.push("distill", distill * alpha);
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let c = &mut self.cfg;
        let mut fields = [("alpha", &mut c.alpha), ("tau", &mut c.tau)];
        set_scheduled_field(Self::NAME, &mut fields, field, value, check)
    }
}

register_method!(Deit);

#[cfg(test)]
mod tests {
    use kd_core::testing::{self, logits};
    use kd_core::{Tap, Taps};
    use serde_json::json;
    use tch::Tensor;

    use super::*;

    fn terms(cfg: serde_json::Value, s: &Taps, t: &Taps, y: &[i64]) -> Result<[f64; 2]> {
        let y = Tensor::from_slice(y);
        let out =
            testing::build::<Deit>(cfg, s, Some(t))?.losses_with(&testing::io(s, Some(t), &y))?;
        assert_eq!(
            (out.terms[0].0.as_str(), out.terms[1].0.as_str()),
            ("base", "distill")
        );
        Ok([
            out.terms[0].1.double_value(&[]),
            out.terms[1].1.double_value(&[]),
        ])
    }

    fn with_dist(mut s: Taps, rows: &[&[f32]]) -> Taps {
        s.extra.push((Tap::LogitsDist, logits(rows).logits));
        s
    }

    #[test]
    fn hand_computed_soft_and_hard() {
        // Student (0, 0): CE = ln 2 for either label. Teacher (ln 3, 0):
        // p_t = (3/4, 1/4), KL(p_t ‖ ½,½) = ¾ ln(3/2) + ¼ ln(1/2) = 0.130812,
        // divided by numel = 2 logits.
        let (s, t) = (logits(&[&[0.0, 0.0]]), logits(&[&[3f32.ln(), 0.0]]));
        let v = terms(json!({}), &s, &t, &[1]).unwrap();
        let ln2 = 2f64.ln();
        assert!(
            (v[0] - 0.5 * ln2).abs() < 1e-6 && (v[1] - 0.5 * 0.130812 / 2.0).abs() < 1e-6,
            "{v:?}"
        );
        // Hard: CE toward the teacher's class 0 on the distillation head
        // (ln 3, 0) → −log ¾; the class head stays on the base term.
        let s = with_dist(s, &[&[3f32.ln(), 0.0]]);
        let v = terms(
            json!({"distillation_type": "hard", "alpha": 0.25}),
            &s,
            &t,
            &[1],
        )
        .unwrap();
        assert!(
            (v[0] - 0.75 * ln2).abs() < 1e-6 && (v[1] + 0.25 * 0.75f64.ln()).abs() < 1e-6,
            "{v:?}"
        );
        // Soft on a distillation head equal to the teacher: zero.
        let v = terms(json!({"tau": 3.0}), &s, &t, &[1]).unwrap();
        assert!(v[1].abs() < 1e-7, "{v:?}");
    }

    #[test]
    fn smoothing_and_mixed_labels_reach_the_base_term() {
        let (s, t) = (logits(&[&[2.0, 0.0, -1.0]]), logits(&[&[0.0, 1.0, 0.0]]));
        let y = Tensor::from_slice(&[0i64]);
        let log_p = s.logits.log_softmax(1, Kind::Double);
        let lp = |k: i64| log_p.double_value(&[0, k]);
        let mut b =
            testing::build::<Deit>(json!({"label_smoothing": 0.3, "alpha": 0.0}), &s, Some(&t))
                .unwrap();
        let base = b.losses_with(&testing::io(&s, Some(&t), &y)).unwrap().terms[0]
            .1
            .double_value(&[]);
        let want = -(0.8 * lp(0) + 0.1 * lp(1) + 0.1 * lp(2));
        assert!((base - want).abs() < 1e-5, "{base} vs {want}");
        let mixed = Tensor::from_slice(&[0.6f32, 0.0, 0.4]).view([1, 3]);
        let io = StepIo {
            soft_target: Some(&mixed),
            ..testing::io(&s, Some(&t), &y)
        };
        let base = b.losses_with(&io).unwrap().terms[0].1.double_value(&[]);
        let want = -(0.52 * lp(0) + 0.1 * lp(1) + 0.38 * lp(2));
        assert!((base - want).abs() < 1e-5, "{base} vs {want}");
    }

    #[test]
    fn refuses_bad_config_shapes_and_schedules() {
        let s = logits(&[&[0.0, 1.0]]);
        for cfg in [
            json!({"alpha": 1.5}),
            json!({"tau": 0.0}),
            json!({"label_smoothing": 1.0}),
            json!({"distillation_type": "none"}),
            json!({"temperature": 2.0}),
        ] {
            assert!(
                testing::build::<Deit>(cfg.clone(), &s, Some(&s)).is_err(),
                "{cfg}"
            );
        }
        let three = logits(&[&[0.0, 1.0, 2.0]]);
        let err = testing::build::<Deit>(json!({}), &s, Some(&three))
            .err()
            .unwrap();
        assert!(err.to_string().contains("same classes"), "{err}");
        let err = testing::build::<Deit>(
            json!({}),
            &with_dist(s.detach(), &[&[0.0, 1.0, 2.0]]),
            Some(&s),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("distillation head [3]"), "{err}");
        let mut m = testing::build::<Deit>(json!({}), &s, Some(&s))
            .unwrap()
            .method;
        assert!(m.set_scheduled("alpha", 0.2).is_ok() && m.cfg.alpha == 0.2);
        assert!(
            m.set_scheduled("tau", -1.0).is_err()
                && m.set_scheduled("label_smoothing", 0.1).is_err()
        );
    }
}

//! DIST (Huang et al., 2022): match relations, not values. With
//! `y = softmax(z / τ)`, the inter-class term is `1 − Pearson` between each
//! sample's student and teacher distributions over the classes, the
//! intra-class term the same between each class's columns over the batch;
//! `τ²·(β·inter + γ·intra)`.

use kd_core::{
    BuildCx, Losses, Method, Result, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Weight of the inter-class relation (rows: samples).
    pub beta: f64,
    /// Weight of the intra-class relation (columns: classes).
    pub gamma: f64,
    /// Softmax temperature; the terms are multiplied by τ².
    pub tau: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            beta: 1.0,
            gamma: 1.0,
            tau: 1.0,
        }
    }
}

pub struct Dist {
    s: TapRef,
    t: TapRef,
    cfg: Config,
}

/// Row-wise Pearson correlation: cosine similarity of the rows centred on
/// their means, with the authors' `eps` added to the product of the norms.
fn pearson(a: &Tensor, b: &Tensor) -> Tensor {
    let centre = |x: &Tensor| x - x.mean_dim(1, true, Kind::Float);
    let (a, b) = (centre(a), centre(b));
    let norm = |x: &Tensor| x.norm_scalaropt_dim(2, [1i64], false);
    (&a * &b).sum_dim_intlist(1, false, Kind::Float) / (norm(&a) * norm(&b) + 1e-8)
}

fn relation(y_s: &Tensor, y_t: &Tensor) -> Tensor {
    1.0 - pearson(y_s, y_t).mean(Kind::Float)
}

fn check(field: &str, value: f64) -> std::result::Result<(), String> {
    let (ok, want) = if field == "tau" {
        (value > 0.0, "positive")
    } else {
        (value >= 0.0, "non-negative")
    };
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(format!("{field} must be finite and {want}, got {value}"))
    }
}

impl Method for Dist {
    const NAME: &'static str = "dist";
    const SUMMARY: &'static str =
        "Knowledge Distillation from A Stronger Teacher (Huang et al., 2022)";
    const SCHEDULABLE: &'static [&'static str] = &["beta", "gamma", "tau"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        for (field, value) in [("beta", cfg.beta), ("gamma", cfg.gamma), ("tau", cfg.tau)] {
            check(field, value).map_err(|e| cx.error(e))?;
        }
        let (s, t) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(s).to_vec(), cx.shape(t).to_vec());
        if cs != ct || cs.len() != 1 || cs[0] < 2 {
            return Err(cx.error(format!(
                "needs logits over the same classes (at least 2) on both sides, got student {cs:?} and teacher {ct:?}"
            )));
        }
        Ok(Dist { s, t, cfg })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let tau = self.cfg.tau;
        // The teacher runs under no_grad in the authors' KDLoss.
        let y_s = (io.tap(self.s) / tau).softmax(1, Kind::Float);
        let y_t = (io.tap(self.t).detach() / tau).softmax(1, Kind::Float);
        let inter = relation(&y_s, &y_t);
        let intra = relation(&y_s.tr(), &y_t.tr());
        let tau2 = tau * tau;
        out.push("inter", inter * (self.cfg.beta * tau2));
        out.push("intra", intra * (self.cfg.gamma * tau2));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let c = &mut self.cfg;
        let mut fields = [
            ("beta", &mut c.beta),
            ("gamma", &mut c.gamma),
            ("tau", &mut c.tau),
        ];
        set_scheduled_field(Self::NAME, &mut fields, field, value, check)
    }
}

register_method!(Dist);

#[cfg(test)]
mod tests {
    use kd_core::Taps;
    use kd_core::testing::{self, logits};
    use serde_json::json;

    use super::*;

    fn terms(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Vec<(String, f64)> {
        let mut b = testing::build::<Dist>(cfg, s, Some(t)).unwrap();
        let out = b.losses(s, Some(t)).unwrap();
        out.terms
            .iter()
            .map(|(n, v)| (n.clone(), v.double_value(&[])))
            .collect()
    }

    #[test]
    fn identical_predictions_cost_nothing() {
        let s = logits(&[&[0.3, -1.0, 2.0], &[1.0, 0.0, -0.5]]);
        // Not exactly zero: the authors' eps sits in the denominator.
        let v = terms(json!({}), &s, &s);
        assert_eq!(v[0].0, "inter");
        assert_eq!(v[1].0, "intra");
        assert!(v.iter().all(|(_, x)| x.abs() < 1e-5), "{v:?}");
    }

    #[test]
    fn two_classes_correlate_by_sign() {
        // Over two classes the centred rows are ±(p − ½)(1, −1), so each
        // row's Pearson correlation is the sign of (p_s − ½)(p_t − ½): one
        // row agreeing and one disagreeing give inter = 1 − (1 − 1)/2 = 1.
        let s = logits(&[&[1.0, 0.0], &[1.0, 0.0]]);
        let t = logits(&[&[2.0, 0.0], &[0.0, 2.0]]);
        let v = terms(json!({}), &s, &t);
        assert!((v[0].1 - 1.0).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn weights_and_temperature_scale_the_terms() {
        let s = logits(&[&[0.3, -1.0, 2.0, 0.5], &[1.0, 0.0, -0.5, 0.2]]);
        let t = logits(&[&[1.0, 2.0, -1.0, 0.0], &[0.1, 0.4, 0.3, -2.0]]);
        let base = terms(json!({"tau": 2.0}), &s, &t);
        let scaled = terms(json!({"tau": 2.0, "beta": 3.0, "gamma": 0.5}), &s, &t);
        assert!((scaled[0].1 - 3.0 * base[0].1).abs() < 1e-6);
        assert!((scaled[1].1 - 0.5 * base[1].1).abs() < 1e-6);
    }

    #[test]
    fn refuses_bad_config_and_schedules() {
        let s = logits(&[&[0.0, 1.0]]);
        for cfg in [
            json!({"tau": 0.0}),
            json!({"beta": -1.0}),
            json!({"gamma": f64::NAN}),
        ] {
            assert!(testing::build::<Dist>(cfg, &s, Some(&s)).is_err());
        }
        assert!(testing::build::<Dist>(json!({"T": 4.0}), &s, Some(&s)).is_err());
        let other = logits(&[&[0.0, 1.0, 2.0]]);
        let err = testing::build::<Dist>(json!({}), &s, Some(&other))
            .err()
            .unwrap();
        assert!(err.to_string().contains("same classes"), "{err}");
        let mut m = testing::build::<Dist>(json!({}), &s, Some(&s))
            .unwrap()
            .method;
        assert!(m.set_scheduled("tau", 4.0).is_ok() && m.cfg.tau == 4.0);
        assert!(m.set_scheduled("tau", 0.0).is_err());
        assert!(m.set_scheduled("T", 1.0).is_err());
    }
}

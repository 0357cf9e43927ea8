//! Transformed teacher matching (Zheng & Yang, 2024): KL from the teacher's
//! power-transformed distribution `p_t^γ / Σ p_t^γ` (the teacher at
//! temperature 1/γ) to the student's plain softmax; no temperature on the
//! student side and no T² factor.

use kd_core::{
    BuildCx, Losses, Method, Result, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Exponent γ of the power transform (`--ttm_l`; the paper's γ = 1/T).
    pub l: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { l: 1.0 }
    }
}

/// TTM's matching, shared with WTTM (`plugins/wttm`), which weights it.
pub struct Matching {
    s: TapRef,
    t: TapRef,
    l: f64,
}

fn check(value: f64) -> std::result::Result<(), String> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(format!("l must be finite and positive, got {value}"))
    }
}

impl Matching {
    pub fn build(cfg: &Config, cx: &mut BuildCx) -> Result<Matching> {
        check(cfg.l).map_err(|e| cx.error(e))?;
        let (s, t) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(s).to_vec(), cx.shape(t).to_vec());
        if cs != ct || cs.len() != 1 {
            return Err(cx.error(format!(
                "needs logits over the same classes on both sides, got student {cs:?} and teacher {ct:?}"
            )));
        }
        Ok(Matching { s, t, l: cfg.l })
    }

    /// Per sample: KL(p_t^γ / Σ p_t^γ ‖ softmax(s)) and Σ_c p_t,c^γ.
    pub fn per_sample(&self, io: &StepIo) -> (Tensor, Tensor) {
        let log_p_s = io.tap(self.s).log_softmax(1, Kind::Float);
        // The authors' order: softmax, then the power, then renormalise (a
        // class whose probability underflows stays at zero).
        let p_t = io
            .tap(self.t)
            .detach()
            .softmax(1, Kind::Float)
            .pow_tensor_scalar(self.l);
        let norm = p_t.sum_dim_intlist(1, false, Kind::Float);
        let p_t = p_t / norm.unsqueeze(1);
        // F.kl_div(log p_s, p_t, reduction='none') summed over classes.
        let kl = (p_t.xlogy(&p_t) - &p_t * log_p_s).sum_dim_intlist(1, false, Kind::Float);
        (kl, norm)
    }

    /// The exponent γ in effect.
    pub fn l(&self) -> f64 {
        self.l
    }

    /// Schedules `l`, the one schedulable field of both methods.
    pub fn set_scheduled(&mut self, method: &str, field: &str, value: f64) -> Result<()> {
        let mut fields = [("l", &mut self.l)];
        set_scheduled_field(method, &mut fields, field, value, |_, v| check(v))
    }
}

pub struct Ttm(Matching);

impl Method for Ttm {
    const NAME: &'static str = "ttm";
    const SUMMARY: &'static str =
        "Knowledge Distillation Based on Transformed Teacher Matching (Zheng & Yang, 2024)";
    const SCHEDULABLE: &'static [&'static str] = &["l"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        Matching::build(&cfg, cx).map(Ttm)
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (kl, _) = self.0.per_sample(io);
        out.push("ttm", kl.mean(Kind::Float));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        self.0.set_scheduled(Self::NAME, field, value)
    }
}

register_method!(Ttm);

#[cfg(test)]
mod tests {
    use kd_core::testing::{self, logits};
    use serde_json::json;

    use super::*;

    #[test]
    fn power_transform_is_a_teacher_temperature() {
        // p_t^γ renormalised is softmax(z_t · γ): with γ = 1/2 and teacher
        // logits (2 ln 2, 0) the target is (2/3, 1/3). A student at
        // (ln 2, 0) matches it exactly; a uniform student costs
        // KL((2/3, 1/3) ‖ (1/2, 1/2)) = 2/3 ln(4/3) + 1/3 ln(2/3).
        let t = logits(&[&[2.0 * 2f32.ln(), 0.0]]);
        let matched = logits(&[&[2f32.ln(), 0.0]]);
        let uniform = logits(&[&[0.0, 0.0]]);
        let cfg = json!({"l": 0.5});
        let zero = testing::loss::<Ttm>(cfg.clone(), &matched, Some(&t)).unwrap();
        let kl = testing::loss::<Ttm>(cfg, &uniform, Some(&t)).unwrap();
        let want = 2.0 / 3.0 * (4f64 / 3.0).ln() + 1.0 / 3.0 * (2f64 / 3.0).ln();
        assert!(zero.abs() < 1e-6 && (kl - want).abs() < 1e-6, "{zero} {kl}");
    }

    #[test]
    fn gamma_one_is_plain_kl_and_the_student_is_not_tempered() {
        // γ = 1: KL(p_t ‖ p_s) at temperature 1, batch mean.
        let s = logits(&[&[0.3, -1.0, 2.0], &[1.0, 0.0, -0.5]]);
        let t = logits(&[&[1.0, 2.0, -1.0], &[0.1, 0.4, 0.3]]);
        let got = testing::loss::<Ttm>(json!({}), &s, Some(&t)).unwrap();
        let (ls, lt) = (
            s.logits.log_softmax(1, Kind::Float),
            t.logits.log_softmax(1, Kind::Float),
        );
        let want = (lt.exp() * (&lt - ls)).sum(Kind::Float).double_value(&[]) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn refuses_bad_config_and_schedules() {
        let s = logits(&[&[0.0, 1.0]]);
        for cfg in [json!({"l": 0.0}), json!({"l": -0.1}), json!({"T": 4.0})] {
            assert!(testing::build::<Ttm>(cfg, &s, Some(&s)).is_err());
        }
        let other = logits(&[&[0.0, 1.0, 2.0]]);
        assert!(testing::build::<Ttm>(json!({}), &s, Some(&other)).is_err());
        let mut m = testing::build::<Ttm>(json!({}), &s, Some(&s))
            .unwrap()
            .method;
        assert!(m.set_scheduled("l", 0.2).is_ok() && m.0.l() == 0.2);
        assert!(m.set_scheduled("l", 0.0).is_err());
        assert!(m.set_scheduled("beta", 1.0).is_err());
    }
}

//! Weighted transformed teacher matching (Zheng & Yang, 2024): TTM's
//! per-sample KL from the power-transformed teacher `p_t^γ / Σ p_t^γ` to the
//! student's plain softmax, weighted by the sample's `U_γ(p_t) = Σ_c p_t,c^γ`
//! (larger for smoother teacher predictions), then the batch mean.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, register_method};
use kd_plugin_ttm::{Config, Matching};
use tch::Kind;

pub struct Wttm(Matching);

impl Method for Wttm {
    const NAME: &'static str = "wttm";
    const SUMMARY: &'static str = "Weighted Transformed Teacher Matching (Zheng & Yang, 2024)";
    const SCHEDULABLE: &'static [&'static str] = &["l"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        Matching::build(&cfg, cx).map(Wttm)
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        // The raw sum of powers weights each sample, not normalised over the
        // batch (`torch.mean(norm*KL)`); the teacher is a constant, so the
        // weight is too.
        let (kl, norm) = self.0.per_sample(io);
        out.push("wttm", (norm * kl).mean(Kind::Float));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        self.0.set_scheduled(Self::NAME, field, value)
    }
}

register_method!(Wttm);

#[cfg(test)]
mod tests {
    use kd_core::testing::{self, logits};
    use serde_json::json;

    use super::*;

    #[test]
    fn each_sample_is_weighted_by_its_sum_of_powers() {
        // γ = 1/2, teacher (2 ln 2, 0): p_t = (4/5, 1/5), Σ p^γ = 3/√5, target
        // (2/3, 1/3). A uniform student costs 3/√5 · KL((2/3, 1/3) ‖ ½).
        // A second, already matched row adds nothing but halves the mean.
        let t = logits(&[&[2.0 * 2f32.ln(), 0.0], &[2.0 * 2f32.ln(), 0.0]]);
        let s = logits(&[&[0.0, 0.0], &[2f32.ln(), 0.0]]);
        let got = testing::loss::<Wttm>(json!({"l": 0.5}), &s, Some(&t)).unwrap();
        let kl = 2.0 / 3.0 * (4f64 / 3.0).ln() + 1.0 / 3.0 * (2f64 / 3.0).ln();
        let want = 3.0 / 5f64.sqrt() * kl / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn gamma_one_weights_every_sample_by_one() {
        // Σ p = 1: WTTM at γ = 1 is TTM at γ = 1, plain KL(p_t ‖ p_s).
        let s = logits(&[&[0.3, -1.0, 2.0], &[1.0, 0.0, -0.5]]);
        let t = logits(&[&[1.0, 2.0, -1.0], &[0.1, 0.4, 0.3]]);
        let got = testing::loss::<Wttm>(json!({}), &s, Some(&t)).unwrap();
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
        for cfg in [
            json!({"l": 0.0}),
            json!({"l": f64::INFINITY}),
            json!({"beta": 1.0}),
        ] {
            assert!(testing::build::<Wttm>(cfg, &s, Some(&s)).is_err());
        }
        let mut m = testing::build::<Wttm>(json!({}), &s, Some(&s))
            .unwrap()
            .method;
        assert!(m.set_scheduled("l", 0.2).is_ok() && m.0.l() == 0.2);
        assert!(m.set_scheduled("l", -1.0).is_err());
        assert!(m.set_scheduled("T", 1.0).is_err());
    }
}

//! Weighted transformed teacher matching (Zheng & Yang, 2024): TTM's
//! per-sample KL from the power-transformed teacher `p_t^γ / Σ p_t^γ` to the
//! student's plain softmax, weighted by the sample's `U_γ(p_t) = Σ_c p_t,c^γ`
//! (larger for smoother teacher predictions), then the batch mean.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Kind;

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

pub struct Wttm {
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

impl Method for Wttm {
    const NAME: &'static str = "wttm";
    const SUMMARY: &'static str = "Weighted Transformed Teacher Matching (Zheng & Yang, 2024)";
    const SCHEDULABLE: &'static [&'static str] = &["l"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        check(cfg.l).map_err(|e| cx.error(e))?;
        let (s, t) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(s).to_vec(), cx.shape(t).to_vec());
        if cs != ct || cs.len() != 1 {
            return Err(cx.error(format!(
                "needs logits over the same classes on both sides, got student {cs:?} and teacher {ct:?}"
            )));
        }
        Ok(Wttm { s, t, l: cfg.l })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let log_p_s = io.tap(self.s).log_softmax(1, Kind::Float);
        // As the authors: softmax, power, renormalise; the teacher is a
        // constant, so the weight is too.
        let p_t = io
            .tap(self.t)
            .detach()
            .softmax(1, Kind::Float)
            .pow_tensor_scalar(self.l);
        let norm = p_t.sum_dim_intlist(1, false, Kind::Float);
        let p_t = p_t / norm.unsqueeze(1);
        let kl = (p_t.xlogy(&p_t) - &p_t * log_p_s).sum_dim_intlist(1, false, Kind::Float);
        // The raw sum of powers weights each sample, not normalised over the
        // batch (`torch.mean(norm*KL)`).
        out.push("wttm", (norm * kl).mean(Kind::Float));
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let plan = |msg| KdError::Plan {
            method: "wttm".into(),
            msg,
        };
        if field != "l" {
            return Err(plan(format!(
                "field `{field}` cannot be scheduled; schedulable: l"
            )));
        }
        check(value).map_err(|e| plan(format!("scheduled {e}")))?;
        self.l = value;
        Ok(())
    }
}

register_method!(Wttm);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use serde_json::json;
    use tch::Tensor;

    use super::*;

    fn logits(rows: &[&[f32]]) -> Taps {
        let b = rows.len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        testing::taps(vec![], Tensor::from_slice(&flat).view([b, -1]))
    }

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
        assert!(m.set_scheduled("l", 0.2).is_ok() && m.l == 0.2);
        assert!(m.set_scheduled("l", -1.0).is_err());
        assert!(m.set_scheduled("T", 1.0).is_err());
    }
}

//! Curriculum temperature for KD (Li et al., AAAI 2023), global variant:
//! batchmean KL(p_t^T ‖ p_s^T) · T² at a learned temperature
//! T = t_start + t_end · σ(θ), where θ reaches the loss through a
//! gradient-reversal layer of strength λ. The student descends the KD loss
//! while θ ascends it, and a recipe raises λ along a curriculum.

use kd_core::{
    BuildCx, Losses, Method, Result, StepIo, TapRef, register_method, set_scheduled_field,
};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::Init;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Lowest temperature.
    pub t_start: f64,
    /// Width of the temperature range: T lies in (t_start, t_start + t_end).
    pub t_end: f64,
    /// Strength of the gradient reversal (the authors' `lambda_` is −λ). The
    /// default is the curriculum's end value; recipes schedule the curriculum.
    pub lambda: f64,
    /// Initial θ; the authors' `Global_T` starts at 1.
    #[serde(rename = "global_T_init")]
    pub global_t_init: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            t_start: 1.0,
            t_end: 20.0,
            lambda: 1.0,
            global_t_init: 1.0,
        }
    }
}

pub struct Ctkd {
    s: TapRef,
    t: TapRef,
    /// θ, `[1]` as the authors' `global_T`.
    theta: Tensor,
    t_start: f64,
    t_end: f64,
    lambda: f64,
}

/// Identity on the value, −λ times the gradient on the way back. Written with
/// a detached copy, so the value is `x` exactly.
fn gradient_reversal(x: &Tensor, lambda: f64) -> Tensor {
    let frozen = x.detach();
    &frozen + (x - &frozen) * (-lambda)
}

fn check_lambda(lambda: f64) -> std::result::Result<(), String> {
    if lambda.is_finite() && lambda >= 0.0 {
        Ok(())
    } else {
        Err(format!("lambda must be a finite number >= 0, got {lambda}"))
    }
}

impl Ctkd {
    /// The learned temperature, a scalar with the reversed path to θ.
    fn temperature(&self) -> Tensor {
        (gradient_reversal(&self.theta, self.lambda).sigmoid() * self.t_end + self.t_start)
            .squeeze()
    }
}

impl Method for Ctkd {
    const NAME: &'static str = "ctkd";
    const SUMMARY: &'static str =
        "Curriculum Temperature for Knowledge Distillation (Li et al., 2023)";
    const SCHEDULABLE: &'static [&'static str] = &["lambda"];
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if !(cfg.t_start > 0.0 && cfg.t_start.is_finite()) {
            return Err(cx.error(format!("t_start must be positive, got {}", cfg.t_start)));
        }
        if !(cfg.t_end >= 0.0 && cfg.t_end.is_finite()) {
            return Err(cx.error(format!("t_end must be >= 0, got {}", cfg.t_end)));
        }
        if !cfg.global_t_init.is_finite() {
            return Err(cx.error(format!(
                "global_T_init must be finite, got {}",
                cfg.global_t_init
            )));
        }
        check_lambda(cfg.lambda).map_err(|m| cx.error(m))?;
        let (s, t) = cx.tap_pair("logits")?;
        let theta = cx
            .params()
            .var("global_T", &[1], Init::Const(cfg.global_t_init));
        Ok(Ctkd {
            s,
            t,
            theta,
            t_start: cfg.t_start,
            t_end: cfg.t_end,
            lambda: cfg.lambda,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (io.tap(self.s), io.tap(self.t));
        let kind = s.kind();
        let temp = self.temperature();
        let log_p_s = (s / &temp).log_softmax(1, kind);
        let log_p_t = (t / &temp).log_softmax(1, kind);
        // batchmean KL times T², with T the learned one: θ's gradient comes
        // from both softened distributions and from the T² factor.
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(kind) / s.size()[0] as f64;
        out.push("kd", kl * temp.square());
        Ok(())
    }

    fn set_scheduled(&mut self, field: &str, value: f64) -> Result<()> {
        let mut fields = [("lambda", &mut self.lambda)];
        set_scheduled_field(Self::NAME, &mut fields, field, value, |_, v| {
            check_lambda(v)
        })
    }
}

register_method!(Ctkd);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kd_core::{Taps, testing, testing::Built};
    use tch::Kind;

    use super::*;

    fn logits(t: Tensor) -> Taps {
        testing::taps(vec![], t)
    }

    fn build(cfg: Config, s: &Taps, t: &Taps) -> Result<Built<Ctkd>> {
        testing::build_typed::<Ctkd>(cfg, s, Some(t))
    }

    /// KD at a fixed temperature, in f64, the reference for θ's gradient.
    fn kd_at(s: &Tensor, t: &Tensor, temp: f64) -> f64 {
        let b = s.size()[0] as f64;
        let (s, t) = (s.to_kind(Kind::Double), t.to_kind(Kind::Double));
        let log_p_s = (s / temp).log_softmax(1, Kind::Double);
        let log_p_t = (t / temp).log_softmax(1, Kind::Double);
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(Kind::Double);
        kl.double_value(&[]) / b * temp * temp
    }

    #[test]
    fn refuses_bad_config() {
        let (s, t) = (
            logits(Tensor::zeros([2, 5], tch::kind::FLOAT_CPU)),
            logits(Tensor::zeros([2, 5], tch::kind::FLOAT_CPU)),
        );
        for cfg in [
            Config {
                t_start: 0.0,
                ..Config::default()
            },
            Config {
                t_end: -1.0,
                ..Config::default()
            },
            Config {
                lambda: -0.5,
                ..Config::default()
            },
            Config {
                lambda: f64::NAN,
                ..Config::default()
            },
            Config {
                global_t_init: f64::INFINITY,
                ..Config::default()
            },
        ] {
            assert!(build(cfg, &s, &t).is_err());
        }
        let mut m = build(Config::default(), &s, &t).unwrap().method;
        assert!(m.set_scheduled("lambda", 0.25).is_ok() && m.lambda == 0.25);
        assert!(m.set_scheduled("lambda", -1.0).is_err());
        let err = m.set_scheduled("t_end", 3.0).unwrap_err().to_string();
        assert!(err.contains("schedulable: lambda"), "{err}");
    }

    #[test]
    fn theta_gradient_is_the_reversed_kd_gradient() {
        tch::manual_seed(0);
        let s = logits((Tensor::randn([4, 7], tch::kind::FLOAT_CPU) * 3.0).set_requires_grad(true));
        let t = logits(Tensor::randn([4, 7], tch::kind::FLOAT_CPU) * 3.0);
        let (theta, lambda, t_start, t_end) = (0.4, 0.6, 1.5, 8.0);
        let cfg = Config {
            t_start,
            t_end,
            lambda,
            global_t_init: theta,
        };
        let mut b = build(cfg, &s, &t).unwrap();
        assert_eq!(b.names_and_sizes(), ["global_T[1]"]);
        let loss = b.losses(&s, Some(&t)).unwrap().total();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let temp = |x: f64| t_start + t_end * sig(x);
        let want = kd_at(&s.logits, &t.logits, temp(theta));
        assert!((loss.double_value(&[]) - want).abs() < 1e-5 * want);
        loss.backward();
        let got = b.vs.variables()["global_T"].grad().double_value(&[0]);
        let h = 1e-4;
        let slope = (kd_at(&s.logits, &t.logits, temp(theta + h))
            - kd_at(&s.logits, &t.logits, temp(theta - h)))
            / (2.0 * h);
        assert!(slope.abs() > 1e-3, "a test with a flat loss proves nothing");
        assert!(
            (got + lambda * slope).abs() < 1e-4 * slope.abs(),
            "{got} vs {}",
            -lambda * slope
        );
        // The student sees the plain KD gradient: no reversal on its side.
        assert!(s.logits.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    /// θ's gradient on the golden fixtures' inputs against the authors'
    /// `GradientReversalFunction`, printed by tests/golden/methods/ctkd.py.
    #[test]
    fn theta_gradient_matches_the_authors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/fixtures");
        for (name, lambda, t_start, t_end, want) in [
            ("ctkd", 1.0, 1.0, 20.0, -0.0473674275),
            ("ctkd_theta", 0.3, 2.0, 10.0, -0.0234529208),
            ("ctkd_lambda0", 0.0, 1.0, 20.0, 0.0),
        ] {
            let file = Tensor::read_safetensors(dir.join(format!("{name}.safetensors"))).unwrap();
            let get = |k: &str| file.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
            let s = logits(get("student/logits").set_requires_grad(true));
            let t = logits(get("teacher/logits"));
            let theta = get("method/global_T").double_value(&[0]);
            let cfg = Config {
                t_start,
                t_end,
                lambda,
                global_t_init: theta,
            };
            let mut b = build(cfg, &s, &t).unwrap();
            let loss = b.losses(&s, Some(&t)).unwrap().total();
            let expect = get("expect/loss").double_value(&[]);
            assert!(
                (loss.double_value(&[]) - expect).abs() <= 1e-5 * expect.abs(),
                "{name}"
            );
            loss.backward();
            let got = b.vs.variables()["global_T"].grad().double_value(&[0]);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-9,
                "{name}: {got} vs {want}"
            );
        }
    }
}

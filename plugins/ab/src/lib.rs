//! Activation boundaries (Heo et al., 2019): on pre-activation maps, push each
//! student neuron to the same side of zero as the teacher's, by a margin `m`:
//! `(s + m)² · [s > −m ∧ t ≤ 0] + (s − m)² · [s ≤ m ∧ t > 0]`. Meant for an
//! initialisation stage; see docs/methods.d/ab.md.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use kd_plugin_fitnet::ConvReg;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// What maps a student map onto the teacher's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connector {
    /// KD-Zoo: none; student and teacher maps must have the same shape.
    #[default]
    None,
    /// RepDistiller's `Connector`: per tap, identity where channels and
    /// height agree, else a `ConvReg` without ReLU (convolution, BatchNorm).
    ConvReg,
}

/// Whose reduction to follow where the reference implementations differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// KD-Zoo: mean over elements, then over taps.
    #[default]
    KdZoo,
    /// RepDistiller: sum over elements / batch / 1000 · 3, tap `i` of `n`
    /// weighted `2^(i−n+1)`, summed over taps.
    Repdistiller,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Margin.
    pub m: f64,
    /// Pre-activation maps matched, the same taps on both sides.
    pub taps: Vec<String>,
    pub connector: Connector,
    pub variant: Variant,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            m: 2.0,
            taps: vec!["preact/1".into(), "preact/2".into(), "preact/3".into()],
            connector: Connector::None,
            variant: Variant::KdZoo,
        }
    }
}

struct Pair {
    s: TapRef,
    t: TapRef,
    connector: Option<ConvReg>,
}

pub struct Ab {
    pairs: Vec<Pair>,
    m: f64,
    variant: Variant,
}

impl Ab {
    /// The element-wise alternative L2 of the paper, Eq. 5.
    fn boundary_loss(&self, s: &Tensor, t: &Tensor) -> Tensor {
        let m = self.m;
        let t_off = t.le(0.0);
        let t_on = t_off.logical_not();
        let push_down = (s + m).square() * s.gt(-m).logical_and(&t_off).to_kind(s.kind());
        let push_up = (s - m).square() * s.le(m).logical_and(&t_on).to_kind(s.kind());
        push_down + push_up
    }
}

impl Method for Ab {
    const NAME: &'static str = "ab";
    const SUMMARY: &'static str = "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons (Heo et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.m < 0.0 {
            return Err(cx.error(format!("m must be non-negative, got {}", cfg.m)));
        }
        if cfg.taps.is_empty() {
            return Err(cx.error("taps must name at least one feature map"));
        }
        let mut pairs = Vec::new();
        for (i, name) in cfg.taps.iter().enumerate() {
            let (s, t, ss, ts) = cx.map_pair(name)?;
            let connector = match cfg.connector {
                Connector::None if ss != ts => {
                    return Err(cx.error(format!(
                        "tap `{name}`: student {ss:?} and teacher {ts:?} differ; \
                         connector \"conv_reg\" learns a mapping between them"
                    )));
                }
                Connector::ConvReg if ss[..2] != ts[..2] => {
                    let p = cx.params() / "connectors" / i;
                    Some(
                        ConvReg::new(&p, &ss, &ts, false)
                            .map_err(|e| cx.error(format!("tap `{name}`: {e}")))?,
                    )
                }
                _ => None,
            };
            pairs.push(Pair { s, t, connector });
        }
        Ok(Ab {
            pairs,
            m: cfg.m,
            variant: cfg.variant,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let n = self.pairs.len();
        let terms = self.pairs.iter().enumerate().map(|(i, pair)| {
            let s = io.tap(pair.s);
            let s = match &pair.connector {
                Some(c) => c.forward(s, io.train),
                None => s.shallow_clone(),
            };
            let loss = self.boundary_loss(&s, io.tap(pair.t));
            match self.variant {
                Variant::KdZoo => loss.mean(s.kind()),
                Variant::Repdistiller => {
                    let w = 2f64.powi(i as i32 + 1 - n as i32);
                    loss.abs().sum(s.kind()) * (w / s.size()[0] as f64 / 1000.0 * 3.0)
                }
            }
        });
        let sum = terms
            .reduce(|a, b| a + b)
            .expect("build refuses an empty tap list");
        let loss = match self.variant {
            Variant::KdZoo => sum / n as f64,
            Variant::Repdistiller => sum,
        };
        out.push("ab", loss);
        Ok(())
    }
}

register_method!(Ab);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::{Device, Kind};

    use super::*;

    fn taps(maps: Vec<Tensor>) -> Taps {
        testing::preacts(maps, 2)
    }

    /// Builds and runs one step; returns the loss and the method's variables.
    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<(f64, Vec<String>)> {
        let mut m = testing::build::<Ab>(cfg, s, Some(t))?;
        Ok((m.loss(s, Some(t))?, m.names()))
    }

    fn fm(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([1, 1, 1, -1])
    }

    #[test]
    fn hand_computed_boundaries() {
        // m = 2. Teacher [-1, -1, 1, 1, 1]; student [-3, 0, 3, 0, -3]:
        // off & s ≤ −m: 0; off & s = 0: (0+2)² = 4; on & s > m: 0;
        // on & s = 0: (0−2)² = 4; on & s = −3: (−3−2)² = 25. Sum 33, mean 6.6.
        let s = taps(vec![fm(&[-3., 0., 3., 0., -3.])]);
        let t = taps(vec![fm(&[-1., -1., 1., 1., 1.])]);
        let (l, names) = run(serde_json::json!({"taps": ["preact/0"]}), &s, &t).unwrap();
        assert!((l - 6.6).abs() < 1e-5, "{l}");
        assert!(names.is_empty());
        let (l1, _) = run(serde_json::json!({"taps": ["preact/0"], "m": 1.0}), &s, &t).unwrap();
        // m = 1: 1 + 1 + 16 = 18, mean 3.6.
        assert!((l1 - 3.6).abs() < 1e-5, "{l1}");
        // RepDistiller, one tap of weight 1: 33 / 1 / 1000 · 3; two taps, the
        // first weighted ½: 1.5 times that.
        let (r, _) = run(
            serde_json::json!({"taps": ["preact/0"], "variant": "repdistiller"}),
            &s,
            &t,
        )
        .unwrap();
        assert!((r - 0.099).abs() < 1e-7, "{r}");
        let cfg = serde_json::json!({"taps": ["preact/0", "preact/0"], "variant": "repdistiller"});
        let (r2, _) = run(cfg, &s, &t).unwrap();
        assert!((r2 - 1.5 * 0.099).abs() < 1e-7, "{r2}");
        let (k2, _) = run(
            serde_json::json!({"taps": ["preact/0", "preact/0"]}),
            &s,
            &t,
        )
        .unwrap();
        assert!((k2 - 6.6).abs() < 1e-5, "{k2}");
    }

    #[test]
    fn connectors_only_where_shapes_differ() {
        let f = |c, h| Tensor::randn([2, c, h, h], (Kind::Float, Device::Cpu));
        let s = taps(vec![f(4, 4), f(8, 4), f(8, 2)]);
        let t = taps(vec![f(4, 4), f(16, 4), f(8, 2)]);
        let cfg = serde_json::json!({"taps": ["preact/0", "preact/1", "preact/2"], "connector": "conv_reg"});
        let (l, names) = run(cfg, &s, &t).unwrap();
        assert!(l.is_finite());
        let want: Vec<String> = [
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "bn.weight",
            "conv.bias",
            "conv.weight",
        ]
        .iter()
        .map(|n| format!("connectors.1.{n}"))
        .collect();
        assert_eq!(names, want);
        let err = run(serde_json::json!({"taps": ["preact/1"]}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv_reg") && err.contains("[8, 4, 4]"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bad_config() {
        let s = taps(vec![fm(&[1., 2.])]);
        let err = run(serde_json::json!({}), &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `preact/1`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let err = run(serde_json::json!({"taps": ["logits"]}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a feature map"), "{err}");
        let err = run(serde_json::json!({"taps": ["preact/0"], "m": -1.0}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-negative"), "{err}");
        let err = run(serde_json::json!({"margin": 1.0}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `margin`"), "{err}");
    }
}

//! Neuron selectivity transfer (Huang & Wang, 2017): the squared MMD between
//! the channels of student and teacher, each channel an `H·W` vector
//! normalised to unit length, with the polynomial kernel `k(x, y) = (xᵀy)²`:
//! `mean k(t, t') + mean k(s, s') − 2 mean k(s, t)`.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Feature map matched, the same tap on both sides.
    pub tap: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "feat/3".into(),
        }
    }
}

pub struct Nst {
    s: TapRef,
    t: TapRef,
}

/// `[B, C, H·W]`, each channel unit-length (F.normalize, dim 2).
fn channels(fm: &Tensor) -> Tensor {
    let f = fm.flatten(2, -1);
    &f / f.norm_scalaropt_dim(2, [2], true).clamp_min(1e-12)
}

/// Mean over the batch and all channel pairs of `(aᵢᵀ bⱼ)²`.
fn poly_kernel_mean(a: &Tensor, b: &Tensor) -> Tensor {
    a.bmm(&b.transpose(1, 2)).square().mean(a.kind())
}

impl Method for Nst {
    const NAME: &'static str = "nst";
    const SUMMARY: &'static str = "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang & Wang, 2017)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t, ss, ts) = cx.map_pair(&cfg.tap)?;
        if ss[1..] != ts[1..] {
            return Err(cx.error(format!(
                "tap `{}`: student and teacher maps differ in size ({ss:?} vs {ts:?}); NST compares channels position by position",
                cfg.tap
            )));
        }
        Ok(Nst { s, t })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (channels(io.tap(self.s)), channels(io.tap(self.t)));
        let mmd =
            poly_kernel_mean(&t, &t) + poly_kernel_mean(&s, &s) - poly_kernel_mean(&s, &t) * 2.0;
        out.push("nst", mmd);
        Ok(())
    }
}

register_method!(Nst);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::{Device, Kind};

    use super::*;

    fn taps(fm: Tensor) -> Taps {
        testing::maps(vec![fm], 2)
    }

    fn run(cfg: serde_json::Value, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss::<Nst>(cfg, s, Some(t))
    }

    #[test]
    fn hand_computed_mmd() {
        // Student channels [1,0] and [0,1]: k(s,s) = [[1,0],[0,1]], mean 1/2.
        // Teacher one channel [3,4] → [.6,.8]: k(t,t) = 1.
        // k(s,t) = [.36, .64], mean 1/2. MMD = 1 + 1/2 − 1 = 1/2.
        let s = taps(Tensor::from_slice(&[1f32, 0., 0., 1.]).view([1, 2, 1, 2]));
        let t = taps(Tensor::from_slice(&[3f32, 4.]).view([1, 1, 1, 2]));
        let l = run(serde_json::json!({"tap": "feat/0"}), &s, &t).unwrap();
        assert!((l - 0.5).abs() < 1e-6, "{l}");
        // Scaling a channel changes nothing once normalised.
        let t2 = taps(Tensor::from_slice(&[30f32, 40.]).view([1, 1, 1, 2]));
        let l2 = run(serde_json::json!({"tap": "preact/0"}), &s, &t2).unwrap();
        assert!((l2 - 0.5).abs() < 1e-6, "{l2}");
        assert!(
            run(serde_json::json!({"tap": "feat/0"}), &s, &s)
                .unwrap()
                .abs()
                < 1e-6
        );
    }

    #[test]
    fn refuses_bad_taps() {
        let s = taps(Tensor::zeros([1, 2, 1, 2], (Kind::Float, Device::Cpu)));
        let err = run(serde_json::json!({}), &s, &s).unwrap_err().to_string();
        assert!(
            err.contains("unknown tap `feat/3`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let err = run(serde_json::json!({"tap": "logits"}), &s, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a feature map"), "{err}");
        let t = taps(Tensor::zeros([1, 2, 2, 2], (Kind::Float, Device::Cpu)));
        let err = run(serde_json::json!({"tap": "feat/0"}), &s, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ in size"), "{err}");
    }
}

//! SGD with PyTorch's update rule. Our own, rather than `tch::nn::Optimizer`,
//! because a resumed run must restore the momentum buffers exactly and tch's
//! optimiser does not expose them. The update itself is PyTorch's
//! multi-tensor SGD (`kd_aten::sgd_foreach`): the same ATen calls, so the
//! same numbers, and on CUDA a handful of kernels for the whole network.

use tch::Tensor;

use crate::Result;
use crate::plan::Sgd;

pub struct Optimizer {
    cfg: Sgd,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Momentum buffers, zero until the first update.
    bufs: Vec<Tensor>,
    scale: Option<LossScale>,
}

/// fp16's dynamic loss scale, as PyTorch's GradScaler with its defaults:
/// 2^16 to start, halved on an overflow (whose step is skipped), doubled
/// after 2000 clean steps.
struct LossScale {
    /// `[scale]`, fp32.
    scale: Tensor,
    /// `[clean steps since the last change]`, int32.
    growth: Tensor,
}

/// Checkpoint names of the loss scale's state.
const SCALE: &str = "loss_scale/scale";
const GROWTH: &str = "loss_scale/growth";

impl Optimizer {
    pub fn new(cfg: Sgd, params: Vec<(String, Tensor)>) -> Optimizer {
        let (names, params): (Vec<String>, Vec<Tensor>) = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .unzip();
        let bufs = params.iter().map(Tensor::zeros_like).collect();
        Optimizer {
            cfg,
            names,
            params,
            bufs,
            scale: None,
        }
    }

    /// Adds fp16's dynamic loss scale: `backward` scales the loss, `step`
    /// unscales the gradients and skips the update when one overflowed.
    pub fn with_loss_scale(mut self, device: tch::Device) -> Optimizer {
        self.scale = Some(LossScale {
            scale: Tensor::full([1], 65536.0, (tch::Kind::Float, device)),
            growth: Tensor::zeros([1], (tch::Kind::Int, device)),
        });
        self
    }

    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        // Fallible: a SyncBatchNorm backward is a collective.
        match &self.scale {
            Some(s) => (loss * &s.scale).f_backward()?,
            None => loss.f_backward()?,
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// In a data-parallel job, averages every parameter's gradient over the
    /// ranks (DDP's semantics); a parameter this rank's loss did not reach
    /// joins with zeros, so all ranks update the same parameters.
    pub fn average_over_ranks(&mut self) -> Result<()> {
        let Some(g) = kd_dist::group() else {
            return Ok(());
        };
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| {
                let grad = p.grad();
                if grad.defined() {
                    grad
                } else {
                    // tch cannot assign a gradient; a backward through a
                    // zero-weighted use of the parameter gives it zeros.
                    (p.sum(None) * 0.0).backward();
                    p.grad()
                }
            })
            .collect();
        g.average(&grads)?;
        Ok(())
    }

    /// Drops the gradients (PyTorch's `set_to_none`): the next backward
    /// hands each parameter its gradient without an accumulating addition.
    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(kd_aten::grads_to_none(&self.params)?)
    }

    /// `d = g + wd·p; buf = m·buf + d; d = nesterov ? d + m·buf : buf;
    /// p -= lr·d`, over the parameters that received a gradient.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if self.overflowed() {
            return Ok(());
        }
        let mut live = (Vec::new(), Vec::new(), Vec::new());
        for (p, b) in self.params.iter().zip(&self.bufs) {
            let g = p.grad();
            if g.defined() {
                live.0.push(p.shallow_clone());
                live.1.push(g);
                live.2.push(b.shallow_clone());
            }
        }
        let Sgd {
            momentum,
            nesterov,
            weight_decay,
            ..
        } = self.cfg;
        let step = kd_aten::SgdStep {
            lr,
            momentum,
            weight_decay,
            nesterov,
        };
        Ok(kd_aten::sgd_foreach(&live.0, &live.1, &live.2, step)?)
    }

    /// With a loss scale: unscales the gradients in place, updates the
    /// scale, and says whether one was not finite. Reading that flag waits
    /// for the device, as PyTorch's GradScaler does.
    fn overflowed(&mut self) -> bool {
        let Some(s) = &mut self.scale else {
            return false;
        };
        let mut found = Tensor::zeros([1], (tch::Kind::Float, s.scale.device()));
        let inv = s.scale.reciprocal();
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                g.internal_amp_non_finite_check_and_unscale(&mut found, &inv);
            }
        }
        let _ = s
            .scale
            .internal_amp_update_scale_(&s.growth, &found, 2.0, 0.5, 2000);
        found.double_value(&[0]) > 0.0
    }

    /// Momentum buffers by parameter name (and the loss scale), for checkpoints.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        let scale = self
            .scale
            .iter()
            .flat_map(|s| [(SCALE, &s.scale), (GROWTH, &s.growth)]);
        self.momentum().chain(scale)
    }

    /// Momentum buffers by parameter name.
    pub fn momentum(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.bufs)
    }

    pub fn buffer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match (name, &mut self.scale) {
            (SCALE, Some(s)) => return Some(&mut s.scale),
            (GROWTH, Some(s)) => return Some(&mut s.growth),
            _ => {}
        }
        let i = self.names.iter().position(|n| n == name)?;
        Some(&mut self.bufs[i])
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    /// The scaled backward's gradients come back unscaled; an overflowing
    /// step is skipped and halves the scale.
    #[test]
    fn loss_scale_unscales_and_skips_overflows() {
        let cfg = Sgd {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(cfg, vec![("p".into(), p.shallow_clone())])
            .with_loss_scale(tch::Device::Cpu);
        opt.zero_grad().unwrap();
        opt.backward(&(&p * 3.0).sum(Kind::Float)).unwrap();
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), [3.0 * 65536.0; 2]);
        opt.step(0.1).unwrap();
        assert_eq!(Vec::<f32>::try_from(p.detach()).unwrap(), [0.7, -2.3]);
        opt.zero_grad().unwrap();
        opt.backward(&(&p * f64::INFINITY).sum(Kind::Float))
            .unwrap();
        opt.step(0.1).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(p.detach()).unwrap(),
            [0.7, -2.3],
            "overflow skipped"
        );
        let scale: Vec<f32> = opt
            .state()
            .filter(|(n, _)| *n == SCALE)
            .map(|(_, t)| t.double_value(&[0]) as f32)
            .collect();
        assert_eq!(scale, [32768.0]);
    }

    /// Three steps by hand against the formula of torch.optim.SGD.
    #[test]
    fn matches_pytorch_sgd_rule() {
        for nesterov in [false, true] {
            let cfg = Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov,
                weight_decay: 0.01,
            };
            let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
            let mut opt = Optimizer::new(cfg.clone(), vec![("p".into(), p.shallow_clone())]);
            let (mut w, mut buf) = ([1.0f64, -2.0], [0.0f64, 0.0]);
            for _ in 0..3 {
                opt.zero_grad().unwrap();
                let loss = (&p * &p * &p).sum(Kind::Double);
                loss.backward();
                opt.step(cfg.lr).unwrap();
                for i in 0..2 {
                    let d = 3.0 * w[i] * w[i] + 0.01 * w[i];
                    buf[i] = 0.9 * buf[i] + d;
                    let step = if nesterov { d + 0.9 * buf[i] } else { buf[i] };
                    w[i] -= 0.1 * step;
                }
            }
            let got: Vec<f64> = Vec::try_from(&p.detach()).unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - w[i]).abs() < 1e-12,
                    "nesterov={nesterov}: {got:?} vs {w:?}"
                );
            }
        }
    }
}

//! SGD with PyTorch's update rule. Our own, rather than `tch::nn::Optimizer`,
//! because a resumed run must restore the momentum buffers exactly and tch's
//! optimiser does not expose them.

use tch::Tensor;

use crate::plan::Sgd;

pub struct Optimizer {
    cfg: Sgd,
    /// (checkpoint name, parameter, momentum buffer)
    params: Vec<(String, Tensor, Tensor)>,
}

impl Optimizer {
    pub fn new(cfg: Sgd, params: Vec<(String, Tensor)>) -> Optimizer {
        let params = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| {
                let buf = t.zeros_like();
                (n, t, buf)
            })
            .collect();
        Optimizer { cfg, params }
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// `d = g + wd·p; buf = m·buf + d; d = nesterov ? d + m·buf : buf; p -= lr·d`.
    /// A zero buffer makes the first step `buf = d`, as PyTorch's.
    pub fn step(&mut self, lr: f64) {
        let Sgd {
            momentum,
            nesterov,
            weight_decay,
            ..
        } = self.cfg;
        tch::no_grad(|| {
            for (_, p, buf) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if weight_decay != 0.0 {
                    &g + &*p * weight_decay
                } else {
                    g
                };
                if momentum != 0.0 {
                    let _ = buf.g_mul_scalar_(momentum).g_add_(&d);
                    d = if nesterov {
                        d + &*buf * momentum
                    } else {
                        buf.shallow_clone()
                    };
                }
                let _ = p.g_sub_(&(d * lr));
            }
        });
    }

    /// Momentum buffers by parameter name, for checkpoints.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, _, b)| (n.as_str(), b))
    }

    pub fn buffer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.params
            .iter_mut()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, b)| b)
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

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
                opt.zero_grad();
                let loss = (&p * &p * &p).sum(Kind::Double);
                loss.backward();
                opt.step(cfg.lr);
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

//! The stage optimiser: SGD, AdamW or LAMB with PyTorch's (and timm's)
//! update rules. Our own, rather than `tch::nn::Optimizer`, because a
//! resumed run must restore the optimiser state exactly and tch's optimiser
//! does not expose it. The updates are PyTorch's multi-tensor ones
//! (`kd_aten::sgd_foreach`, `kd_aten::adamw_foreach`; LAMB is timm's
//! single-tensor update, `kd_aten::lamb`): the same ATen calls, so the same
//! numbers, and on CUDA a handful of kernels for the whole network.
//!
//! Parameters fall into timm's two groups when `no_decay_1d` is set: no
//! weight decay for those of at most one dimension, names ending in
//! `.bias`, a ViT's `pos_embed`, `cls_token`, `dist_token`, and a Swin's
//! `relative_position_bias_table`s.

use tch::Tensor;

use crate::Result;
use crate::plan::{OptimizerKind, OptimizerPlan};

pub struct Optimizer {
    cfg: OptimizerPlan,
    /// Clip the gradients' global 2-norm to this before the update.
    clip: Option<f64>,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Whether each parameter takes weight decay (its group's).
    decays: Vec<bool>,
    /// Each parameter's state, zero until its first update: SGD
    /// `[momentum]`, AdamW `[exp_avg, exp_avg_sq, step]` (`step` a 0-d
    /// fp32 tensor on the CPU, as torch's), LAMB `[exp_avg, exp_avg_sq]`.
    slots: Vec<Vec<Tensor>>,
    /// LAMB's step count (timm's `group['step']`), 0-d fp32 on the CPU.
    lamb_step: Option<Tensor>,
    /// DOT's update count, 0-d fp32 on the CPU: its first update treats
    /// parameters only the distillation loss reaches apart (see `step`).
    dot_step: Option<Tensor>,
    /// DOT: each parameter's gradient from the distillation loss alone
    /// (undefined where that loss did not reach it), taken by
    /// `backward_split` before the task loss's backward.
    kd_grads: Vec<Tensor>,
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
/// Checkpoint name of LAMB's step count.
const LAMB_STEP: &str = "lamb/step";
/// Checkpoint name of DOT's update count.
const DOT_STEP: &str = "dot/step";

/// Names timm's `no_weight_decay()` lists: `VisionTransformer`'s, and
/// `SwinTransformer`'s relative position bias tables.
const NO_DECAY_NAMES: [&str; 4] = [
    "pos_embed",
    "cls_token",
    "dist_token",
    "relative_position_bias_table",
];

/// Whether parameter `name` (shape `t`) takes weight decay under `cfg`:
/// timm's `param_groups_weight_decay` when `no_decay_1d` is set (names are
/// matched on their last component, whatever module holds them).
pub fn takes_weight_decay(cfg: &OptimizerPlan, name: &str, t: &Tensor) -> bool {
    if !cfg.no_decay_1d {
        return true;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    !(t.dim() <= 1 || name.ends_with(".bias") || NO_DECAY_NAMES.contains(&last))
}

/// The names of a kind's per-parameter state slots; SGD's one slot is the
/// parameter's own name in checkpoints (as before there was a choice).
fn slot_names(kind: OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd => &["momentum_buffer"],
        OptimizerKind::Adamw => &["exp_avg", "exp_avg_sq", "step"],
        OptimizerKind::Lamb => &["exp_avg", "exp_avg_sq"],
        OptimizerKind::Dot => &["momentum_buffer", "momentum_kd_buffer"],
    }
}

fn step_tensor() -> Tensor {
    Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu))
}

impl Optimizer {
    pub fn new(cfg: OptimizerPlan, params: Vec<(String, Tensor)>) -> Optimizer {
        let (names, params): (Vec<String>, Vec<Tensor>) = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .unzip();
        let decays = names
            .iter()
            .zip(&params)
            .map(|(n, p)| takes_weight_decay(&cfg, n, p))
            .collect();
        let slots = params
            .iter()
            .map(|p| match cfg.kind {
                OptimizerKind::Sgd => vec![p.zeros_like()],
                OptimizerKind::Adamw => vec![p.zeros_like(), p.zeros_like(), step_tensor()],
                OptimizerKind::Lamb | OptimizerKind::Dot => vec![p.zeros_like(), p.zeros_like()],
            })
            .collect();
        let lamb_step = (cfg.kind == OptimizerKind::Lamb).then(step_tensor);
        let dot_step = (cfg.kind == OptimizerKind::Dot).then(step_tensor);
        Optimizer {
            cfg,
            clip: None,
            names,
            params,
            decays,
            slots,
            lamb_step,
            dot_step,
            kd_grads: Vec::new(),
            scale: None,
        }
    }

    /// Clips the gradients' global 2-norm to `max_norm` before each update
    /// (`torch.nn.utils.clip_grad_norm_`), after unscaling them.
    pub fn with_clip(mut self, max_norm: Option<f64>) -> Optimizer {
        self.clip = max_norm;
        self
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

    pub fn kind(&self) -> OptimizerKind {
        self.cfg.kind
    }

    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        // Fallible: a SyncBatchNorm backward is a collective.
        match &self.scale {
            Some(s) => (loss * &s.scale).f_backward()?,
            None => loss.f_backward()?,
        }
        Ok(())
    }

    /// Whether the update needs the task and distillation losses'
    /// gradients apart (`backward_split` instead of `backward`).
    pub fn splits_losses(&self) -> bool {
        self.cfg.kind == OptimizerKind::Dot
    }

    /// DOT's two backwards, in mdistiller's order: the distillation loss's
    /// gradients kept aside, then the task loss's in `.grad`. Either may be
    /// absent, or not reach a parameter.
    pub fn backward_split(&mut self, task: Option<&Tensor>, kd: Option<&Tensor>) -> Result<()> {
        let task = task.filter(|t| t.requires_grad());
        self.kd_grads = match kd.filter(|k| k.requires_grad()) {
            // Gradients returned rather than accumulated; the graph kept
            // for the task loss, which shares it.
            Some(k) => Tensor::f_run_backward(&[k], &self.params, task.is_some(), false)?,
            None => Vec::new(),
        };
        if let Some(t) = task {
            self.backward(t)?;
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

    /// One update at learning rate `lr` of the parameters that received a
    /// gradient: unscaled (fp16), clipped (`clip_grad`), then SGD
    /// (`d = g + wd·p; buf = m·buf + d; d = nesterov ? d + m·buf : buf;
    /// p -= lr·d`), AdamW or LAMB, each parameter with its group's decay.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if self.overflowed() {
            return Ok(());
        }
        let live: Vec<(usize, Tensor)> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.grad()))
            .filter(|(_, g)| g.defined())
            .collect();
        if let Some(max) = self.clip {
            let grads: Vec<Tensor> = live.iter().map(|(_, g)| g.shallow_clone()).collect();
            let _total_norm = kd_aten::clip_grad_norm(&grads, max)?;
        }
        let cfg = self.cfg.clone();
        let [beta1, beta2] = cfg.betas;
        match cfg.kind {
            OptimizerKind::Sgd => {
                for decay in [false, true] {
                    let (p, g, s) = self.group(&live, decay, 1);
                    if p.is_empty() {
                        continue;
                    }
                    let step = kd_aten::SgdStep {
                        lr,
                        momentum: cfg.momentum,
                        weight_decay: if decay { cfg.weight_decay } else { 0.0 },
                        nesterov: cfg.nesterov,
                    };
                    kd_aten::sgd_foreach(&p, &g, &s[0], step)?;
                }
            }
            OptimizerKind::Adamw => {
                for decay in [false, true] {
                    let (p, g, s) = self.group(&live, decay, 3);
                    if p.is_empty() {
                        continue;
                    }
                    // torch's `state_steps`, fp32, incremented first.
                    let steps: Vec<f64> = s[2]
                        .iter()
                        .map(|t| {
                            let mut t = t.shallow_clone();
                            let _ = t.g_add_scalar_(1.0);
                            t.double_value(&[])
                        })
                        .collect();
                    let h = kd_aten::AdamwStep {
                        lr,
                        beta1,
                        beta2,
                        weight_decay: if decay { cfg.weight_decay } else { 0.0 },
                        eps: cfg.eps,
                    };
                    kd_aten::adamw_foreach(&p, &g, &s[0], &s[1], &steps, h)?;
                }
            }
            OptimizerKind::Lamb => {
                let step = match &mut self.lamb_step {
                    Some(t) => {
                        let _ = t.g_add_scalar_(1.0);
                        t.double_value(&[])
                    }
                    None => 1.0,
                };
                let idx: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
                let p: Vec<Tensor> = idx
                    .iter()
                    .map(|&i| self.params[i].shallow_clone())
                    .collect();
                let g: Vec<Tensor> = live.iter().map(|(_, g)| g.shallow_clone()).collect();
                let m: Vec<Tensor> = idx
                    .iter()
                    .map(|&i| self.slots[i][0].shallow_clone())
                    .collect();
                let v: Vec<Tensor> = idx
                    .iter()
                    .map(|&i| self.slots[i][1].shallow_clone())
                    .collect();
                let wds: Vec<f64> = idx
                    .iter()
                    .map(|&i| {
                        if self.decays[i] {
                            cfg.weight_decay
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let h = kd_aten::LambStep {
                    step,
                    lr,
                    beta1,
                    beta2,
                    eps: cfg.eps,
                    max_grad_norm: cfg.max_grad_norm,
                    trust_clip: cfg.trust_clip,
                    always_adapt: cfg.always_adapt,
                };
                kd_aten::lamb(&p, &g, &m, &v, &wds, h)?;
            }
            OptimizerKind::Dot => self.dot_update(&live, lr)?,
        }
        Ok(())
    }

    /// mdistiller's `DistillationOrientedTrainer.step` (`engine/dot.py`):
    /// the task loss's gradient `g` (in `live`) and the distillation loss's
    /// `k` (`kd_grads`) each drive their own momentum buffer, `buf = m·buf
    /// + d`, `p -= lr·buf`, first the task's, then the distillation's. A
    /// parameter both losses reach uses `momentum − delta` for the task
    /// and `momentum + delta` for the distillation, weight decay added to
    /// the task's gradient only; a parameter one loss reaches uses their
    /// mean for it, with weight decay, except that the reference's first
    /// distillation update of such a parameter copies `k` without it.
    fn dot_update(&mut self, live: &[(usize, Tensor)], lr: f64) -> Result<()> {
        let cfg = &self.cfg;
        let (m_task, m_kd) = (cfg.momentum - cfg.delta, cfg.momentum + cfg.delta);
        let m_one = (m_kd + m_task) / 2.0;
        let wd_all = cfg.weight_decay;
        let kd: Vec<(usize, Tensor)> = std::mem::take(&mut self.kd_grads)
            .into_iter()
            .enumerate()
            .filter(|(_, g)| g.defined())
            .collect();
        let first = match &self.dot_step {
            Some(t) => t.double_value(&[]) == 0.0,
            None => true,
        };
        let mut in_task = vec![false; self.params.len()];
        let mut in_kd = vec![false; self.params.len()];
        live.iter().for_each(|(i, _)| in_task[*i] = true);
        kd.iter().for_each(|(i, _)| in_kd[*i] = true);
        let pick = |list: &[(usize, Tensor)], both: bool, other: &[bool]| -> Vec<(usize, Tensor)> {
            list.iter()
                .filter(|(i, _)| other[*i] == both)
                .map(|(i, g)| (*i, g.shallow_clone()))
                .collect()
        };
        // (gradients, slot, momentum, weight decay of the decaying group)
        let kd_alone_wd = if first { 0.0 } else { wd_all };
        // The reference skips the task buffers altogether when the task's
        // momentum is zero, the mean's too.
        let task_alone = if m_task == 0.0 { 0.0 } else { m_one };
        let passes = [
            (pick(live, true, &in_kd), 0, m_task, wd_all),
            (pick(live, false, &in_kd), 0, task_alone, wd_all),
            (pick(&kd, true, &in_task), 1, m_kd, 0.0),
            (pick(&kd, false, &in_task), 1, m_one, kd_alone_wd),
        ];
        for (grads, slot, momentum, wd) in passes {
            for decay in [false, true] {
                let (p, g, s) = self.group(&grads, decay, 2);
                if p.is_empty() {
                    continue;
                }
                let step = kd_aten::SgdStep {
                    lr,
                    momentum,
                    weight_decay: if decay { wd } else { 0.0 },
                    nesterov: false,
                };
                kd_aten::sgd_foreach(&p, &g, &s[slot], step)?;
            }
        }
        if let Some(t) = &mut self.dot_step {
            let _ = t.g_add_scalar_(1.0);
        }
        Ok(())
    }

    /// The live parameters of one weight-decay group: parameters, gradients
    /// and the first `n` state slots, each a list.
    fn group(
        &self,
        live: &[(usize, Tensor)],
        decay: bool,
        n: usize,
    ) -> (Vec<Tensor>, Vec<Tensor>, Vec<Vec<Tensor>>) {
        let mut p = Vec::new();
        let mut g = Vec::new();
        let mut s: Vec<Vec<Tensor>> = (0..n).map(|_| Vec::new()).collect();
        for (i, grad) in live.iter().filter(|(i, _)| self.decays[*i] == decay) {
            p.push(self.params[*i].shallow_clone());
            g.push(grad.shallow_clone());
            for (k, list) in s.iter_mut().enumerate() {
                list.push(self.slots[*i][k].shallow_clone());
            }
        }
        (p, g, s)
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

    /// The optimiser's whole state by checkpoint name: each parameter's
    /// slots (`momentum`), LAMB's step and the loss scale.
    pub fn state(&self) -> impl Iterator<Item = (String, &Tensor)> {
        let scale = self
            .scale
            .iter()
            .flat_map(|s| [(SCALE, &s.scale), (GROWTH, &s.growth)]);
        let lamb = self.lamb_step.iter().map(|t| (LAMB_STEP, t));
        let dot = self.dot_step.iter().map(|t| (DOT_STEP, t));
        self.momentum().chain(
            lamb.chain(dot)
                .chain(scale)
                .map(|(n, t)| (n.to_string(), t)),
        )
    }

    /// Each parameter's state by name: SGD's momentum buffer under the
    /// parameter's name, the others' slots as `<parameter>:<slot>`.
    pub fn momentum(&self) -> impl Iterator<Item = (String, &Tensor)> {
        let kind = self.cfg.kind;
        self.names
            .iter()
            .zip(&self.slots)
            .flat_map(move |(n, slots)| {
                slot_names(kind)
                    .iter()
                    .zip(slots)
                    .map(move |(slot, t)| match kind {
                        OptimizerKind::Sgd => (n.clone(), t),
                        _ => (format!("{n}:{slot}"), t),
                    })
            })
    }

    /// A state tensor by the name `state` gives it.
    pub fn buffer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match (name, &mut self.scale) {
            (SCALE, Some(s)) => return Some(&mut s.scale),
            (GROWTH, Some(s)) => return Some(&mut s.growth),
            _ => {}
        }
        if name == LAMB_STEP {
            return self.lamb_step.as_mut();
        }
        if name == DOT_STEP {
            return self.dot_step.as_mut();
        }
        let (param, k) = match self.cfg.kind {
            OptimizerKind::Sgd => (name, 0),
            kind => {
                let (param, slot) = name.rsplit_once(':')?;
                (param, slot_names(kind).iter().position(|s| *s == slot)?)
            }
        };
        let i = self.names.iter().position(|n| n == param)?;
        self.slots[i].get_mut(k)
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;
    use crate::plan::Sgd;

    /// The scaled backward's gradients come back unscaled; an overflowing
    /// step is skipped and halves the scale.
    #[test]
    fn loss_scale_unscales_and_skips_overflows() {
        let cfg = Sgd {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            ..Default::default()
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
            .filter(|(n, _)| n == SCALE)
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
                ..Default::default()
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

    /// timm's groups: Swin's bias tables are 2-D but take no decay (its
    /// `no_weight_decay()`), its 2-D projections do.
    #[test]
    fn swin_bias_tables_take_no_weight_decay() {
        let cfg = OptimizerPlan {
            no_decay_1d: true,
            ..Default::default()
        };
        let table = Tensor::zeros([169, 3], (Kind::Float, tch::Device::Cpu));
        let name = "layers.0.blocks.0.attn.relative_position_bias_table";
        assert!(!takes_weight_decay(&cfg, name, &table));
        assert!(takes_weight_decay(
            &cfg,
            "layers.0.blocks.0.attn.qkv.weight",
            &table
        ));
    }
}

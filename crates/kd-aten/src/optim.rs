//! Optimiser updates beyond SGD (`cpp/kd_optim.cpp`): torch.optim.AdamW's
//! multi-tensor update, timm's Lamb, torch.nn.utils.clip_grad_norm_ and the
//! foreach lerp of timm's ModelEmaV3, each the ATen calls of its Python.

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::{AtenError, RawTensor, check, raw};

unsafe extern "C" {
    fn kd_adamw_foreach(
        params: *const RawTensor,
        grads: *const RawTensor,
        exp_avgs: *const RawTensor,
        exp_avg_sqs: *const RawTensor,
        steps: *const f64,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn kd_clip_grad_norm(
        grads: *const RawTensor,
        n: i64,
        max_norm: f64,
        total: *mut RawTensor,
    ) -> *mut c_char;
    fn kd_lamb_clip(
        grads: *const RawTensor,
        n: i64,
        max_grad_norm: f64,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn kd_lamb(
        params: *const RawTensor,
        grads: *const RawTensor,
        exp_avgs: *const RawTensor,
        exp_avg_sqs: *const RawTensor,
        weight_decays: *const f64,
        n: i64,
        clip: RawTensor,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        trust_clip: i32,
        always_adapt: i32,
    ) -> *mut c_char;
    fn kd_foreach_lerp(
        a: *const RawTensor,
        b: *const RawTensor,
        n: i64,
        weight: f64,
    ) -> *mut c_char;
}

/// AdamW hyper-parameters of one update (`torch.optim.AdamW`, no amsgrad,
/// not maximising).
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

fn raws(ts: &[Tensor]) -> Vec<RawTensor> {
    ts.iter().map(raw).collect()
}

fn same_len(what: &str, n: usize, others: &[usize]) -> Result<(), AtenError> {
    if others.iter().any(|&m| m != n) {
        return Err(AtenError(format!(
            "{what}: {n} parameters but lists of {others:?}"
        )));
    }
    Ok(())
}

/// One AdamW update with the ATen calls of PyTorch's multi-tensor AdamW
/// (`_multi_tensor_adam`, decoupled weight decay). `steps[i]`: parameter
/// i's step count including this update (1 on its first).
pub fn adamw_foreach(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[f64],
    h: AdamwStep,
) -> Result<(), AtenError> {
    let n = params.len();
    same_len(
        "adamw",
        n,
        &[grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()],
    )?;
    let (p, g, m, v) = (raws(params), raws(grads), raws(exp_avgs), raws(exp_avg_sqs));
    // SAFETY: live tch tensors (at::Tensor*) and n steps for the call.
    check(unsafe {
        kd_adamw_foreach(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            steps.as_ptr(),
            n as i64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    })
}

/// `torch.nn.utils.clip_grad_norm_(norm_type=2, foreach=True)` on the
/// gradients themselves (scaled in place); returns the total norm before
/// clipping, on the device (nothing waits for it).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor, AtenError> {
    let g = raws(grads);
    let mut out: RawTensor = std::ptr::null_mut();
    // SAFETY: live tensors; `out` receives a new at::Tensor* on success.
    check(unsafe { kd_clip_grad_norm(g.as_ptr(), g.len() as i64, max_norm, &mut out) })?;
    // SAFETY: a heap at::Tensor the shim allocated for us.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// timm Lamb hyper-parameters of one update.
#[derive(Debug, Clone, Copy)]
pub struct LambStep {
    /// The group's step count including this update.
    pub step: f64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (timm's `max_grad_norm`).
    pub max_grad_norm: Option<f64>,
    pub trust_clip: bool,
    pub always_adapt: bool,
}

/// One `timm.optim.Lamb` step (its single-tensor update, which timm runs on
/// the CPU): global gradient-norm clip over `grads`, then per parameter the
/// Adam moments, coupled weight decay `weight_decays[i]` and the trust ratio.
pub fn lamb(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    weight_decays: &[f64],
    h: LambStep,
) -> Result<(), AtenError> {
    let n = params.len();
    same_len(
        "lamb",
        n,
        &[
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            weight_decays.len(),
        ],
    )?;
    let (p, g, m, v) = (raws(params), raws(grads), raws(exp_avgs), raws(exp_avg_sqs));
    let clip = match h.max_grad_norm.filter(|_| n > 0) {
        Some(max) => {
            let mut out: RawTensor = std::ptr::null_mut();
            // SAFETY: live tensors; `out` receives a new at::Tensor*.
            check(unsafe { kd_lamb_clip(g.as_ptr(), n as i64, max, &mut out) })?;
            // SAFETY: a heap at::Tensor the shim allocated for us.
            Some(unsafe { Tensor::from_ptr(out.cast()) })
        }
        None => None,
    };
    let clip_ptr = clip.as_ref().map_or(std::ptr::null_mut::<c_void>(), raw);
    // SAFETY: live tensors and n decays for the call.
    check(unsafe {
        kd_lamb(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            weight_decays.as_ptr(),
            n as i64,
            clip_ptr,
            h.step,
            h.lr,
            h.beta1,
            h.beta2,
            h.eps,
            i32::from(h.trust_clip),
            i32::from(h.always_adapt),
        )
    })
}

/// `torch._foreach_lerp_(a, b, weight)`: each `a[i] += weight * (b[i] - a[i])`.
pub fn foreach_lerp_(a: &[Tensor], b: &[Tensor], weight: f64) -> Result<(), AtenError> {
    same_len("lerp", a.len(), &[b.len()])?;
    let (x, y) = (raws(a), raws(b));
    // SAFETY: live tensors for the call.
    check(unsafe { kd_foreach_lerp(x.as_ptr(), y.as_ptr(), x.len() as i64, weight) })
}

// Optimiser updates that tch does not bind: torch.optim.AdamW's multi-tensor
// update, timm's Lamb (its single-tensor update, what timm runs on the CPU),
// torch.nn.utils.clip_grad_norm_ and the foreach lerp of timm's ModelEmaV3.
// Each follows the Python it names op for op, scalars computed in double as
// Python does (std::pow is the libm pow Python's `**` calls), so results are
// those of PyTorch.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <vector>

#include "kd_ffi.h"

using kd_ffi::gather;

extern "C" {

// torch/optim/adam.py `_multi_tensor_adam`, decoupled weight decay (AdamW),
// not capturable, no amsgrad, not maximising. `steps[i]` is parameter i's
// step count after this update (torch's `state_steps`, already incremented).
char *kd_adamw_foreach(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                       at::Tensor **exp_avg_sqs, const double *steps, int64_t n, double lr,
                       double beta1, double beta2, double weight_decay, double eps) {
  KD_PROTECT({
    if (n == 0) return nullptr;
    at::NoGradGuard no_grad;
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    if (weight_decay != 0.0) at::_foreach_mul_(p, 1 - lr * weight_decay);
    at::_foreach_lerp_(m, g, 1 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    std::vector<at::Scalar> step_size, bc2_sqrt;
    for (int64_t i = 0; i < n; ++i) {
      double bc1 = 1 - std::pow(beta1, steps[i]);
      double bc2 = 1 - std::pow(beta2, steps[i]);
      step_size.emplace_back((lr / bc1) * -1);
      bc2_sqrt.emplace_back(std::pow(bc2, 0.5));
    }
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, bc2_sqrt);
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(p, m, denom, step_size);
  })
}

// torch.nn.utils.clip_grad_norm_(norm_type=2, foreach=True): the gradients
// scaled in place by min(max_norm / (total + 1e-6), 1); `total` (the norm
// before clipping) is returned as a new 0-d tensor.
char *kd_clip_grad_norm(at::Tensor **grads, int64_t n, double max_norm, at::Tensor **total) {
  KD_PROTECT({
    at::NoGradGuard no_grad;
    auto g = gather(grads, n);
    if (n == 0) {
      *total = new at::Tensor(at::zeros({}));
      return nullptr;
    }
    auto norms = at::_foreach_norm(g, 2.0);
    auto t = at::linalg_vector_norm(at::stack(norms), 2.0);
    // Python's `max_norm / tensor` is `tensor.reciprocal() * max_norm`.
    auto coef = (t + 1e-6).reciprocal() * max_norm;
    auto clamped = at::clamp(coef, c10::nullopt, 1.0);
    at::_foreach_mul_(g, clamped);
    *total = new at::Tensor(t);
  })
}

// timm.optim.Lamb's global gradient clip factor (`_get_clip_grad_norm`):
// max(||grads||_2 / max_grad_norm, 1) as a 0-d tensor.
char *kd_lamb_clip(at::Tensor **grads, int64_t n, double max_grad_norm, at::Tensor **out) {
  KD_PROTECT({
    at::NoGradGuard no_grad;
    auto norms = at::_foreach_norm(gather(grads, n), 2.0);
    auto global = at::linalg_vector_norm(at::stack(norms), 2.0);
    *out = new at::Tensor((global / max_grad_norm).clamp_(1.0));
  })
}

// timm.optim.lamb `_single_tensor_lamb` with bias correction and gradient
// averaging, coupled weight decay (`weight_decays[i]` per parameter, its
// group's), no caution. `clip` is kd_lamb_clip's factor or null.
char *kd_lamb(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
              at::Tensor **exp_avg_sqs, const double *weight_decays, int64_t n, at::Tensor *clip,
              double step, double lr, double beta1, double beta2, double eps, int trust_clip,
              int always_adapt) {
  KD_PROTECT({
    at::NoGradGuard no_grad;
    double bias_correction1 = 1 - std::pow(beta1, step);
    double bias_correction2 = 1 - std::pow(beta2, step);
    double beta3 = 1 - beta1;
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor p = *params[i];
      at::Tensor grad = *grads[i];
      if (clip != nullptr) grad = grad / *clip;
      at::Tensor exp_avg = *exp_avgs[i];
      at::Tensor exp_avg_sq = *exp_avg_sqs[i];
      exp_avg.lerp_(grad, beta3);
      exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
      auto denom = (exp_avg_sq.sqrt() / std::pow(bias_correction2, 0.5)).add_(eps);
      auto update = (exp_avg / bias_correction1).div_(denom);
      double wd = weight_decays[i];
      if (wd != 0.0) update.add_(p, wd);
      if (wd != 0.0 || always_adapt) {
        auto w_norm = at::linalg_vector_norm(p, 2.0);
        auto g_norm = at::linalg_vector_norm(update, 2.0);
        auto ratio = w_norm / g_norm;
        auto one = at::scalar_tensor(1.0, ratio.options());
        ratio = at::where(w_norm > 0, at::where(g_norm > 0, ratio, one), one);
        if (trust_clip) ratio = at::clamp(ratio, c10::nullopt, 1.0);
        update.mul_(ratio);
      }
      p.add_(update, -lr);
    }
  })
}

// torch._foreach_lerp_(a, b, weight): timm ModelEmaV3's update.
char *kd_foreach_lerp(at::Tensor **a, at::Tensor **b, int64_t n, double weight) {
  KD_PROTECT({
    if (n == 0) return nullptr;
    at::NoGradGuard no_grad;
    auto x = gather(a, n);
    at::_foreach_lerp_(x, gather(b, n), weight);
  })
}

}  // extern "C"

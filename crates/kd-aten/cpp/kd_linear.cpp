// `F.linear` on the CPU through oneDNN's fp32 matmul, forward and backward.
//
// PyTorch's CPU addmm/mm run MKL's sgemm; on this project's AMD EPYC (and
// other AVX-512 CPUs) oneDNN's JIT matmul runs the shapes of a transformer's
// linear layers (M = batch x tokens, K and N in the hundreds) 10 to 20 %
// faster at the same fp32 precision (no bf16 "fast math": oneDNN's fpmath
// mode stays strict). ATen exports its oneDNN matmul (`mkldnn_matmul`, the
// bf16 addmm path) but reaches it for fp32 only in reduced-precision mode,
// so kd calls it here and gives it its own autograd node: dgrad `g·W` and
// wgrad `gᵀ·x` are oneDNN matmuls too, the bias gradient a column sum.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>

#include "kd_ffi.h"

namespace at::native {
// aten/src/ATen/native/mkldnn/Matmul.cpp (exported; its header is not in
// the wheel): result = beta·result + alpha·(mat1 @ mat2), 2-D or batched
// 3-D, inputs contiguous or transposed in their last two dimensions.
TORCH_API void mkldnn_matmul(const Tensor &mat1, const Tensor &mat2, const Tensor &result,
                             float beta, float alpha);
}  // namespace at::native

namespace {

// Forwards run through oneDNN, for tests to see the path was taken.
std::atomic<int64_t> onednn_forwards{0};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor onednn_mm(const at::Tensor &a, const at::Tensor &b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
  return out;
}

// The last dimension's size replaced: `[..., in]` -> `[..., out]`.
std::vector<int64_t> with_last(const at::Tensor &x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

struct OneDnnLinear : public torch::autograd::Function<OneDnnLinear> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["bias"] = b.defined();
    auto x2 = x.reshape({-1, x.size(-1)});
    at::Tensor y;
    if (b.defined()) {
      // beta = 1 adds the matmul onto the broadcast bias in one pass, as
      // addmm does.
      y = b.expand({x2.size(0), w.size(0)}).contiguous();
      at::native::mkldnn_matmul(x2, w.t(), y, 1.0f, 1.0f);
    } else {
      y = onednn_mm(x2, w.t());
    }
    return y.view(with_last(x, w.size(0)));
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0];
    const auto &w = saved[1];
    auto g = grads[0].reshape({-1, grads[0].size(-1)}).contiguous();
    auto x2 = x.reshape({-1, x.size(-1)});
    at::Tensor gx, gw, gb;
    // Under create_graph the gradients must themselves be differentiable:
    // ATen's own (autograd-recorded) ops then, not the raw matmul.
    const bool graph = at::GradMode::is_enabled();
    if (ctx->needs_input_grad(0)) {
      gx = (graph ? g.mm(w) : onednn_mm(g, w)).view(x.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      gw = graph ? g.t().mm(x2) : onednn_mm(g.t(), x2);
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) {
      gb = g.sum(0);
    }
    return {gx, gw, gb};
  }
};

}  // namespace

extern "C" {

// `F.linear(x, w, b)` (b may be null) through oneDNN, with its own backward.
// fp32 CPU tensors only: the caller keeps everything else on ATen's linear.
char *kd_onednn_linear(at::Tensor *x, at::Tensor *w, at::Tensor *b, at::Tensor **out) {
  KD_PROTECT({
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat &&
                    w->scalar_type() == at::kFloat && x->dim() >= 1,
                "kd_onednn_linear takes fp32 CPU tensors");
    at::Tensor bias = b == nullptr ? at::Tensor() : *b;
    *out = new at::Tensor(OneDnnLinear::apply(*x, *w, bias));
    onednn_forwards.fetch_add(1, std::memory_order_relaxed);
  })
}

int64_t kd_onednn_linear_forwards() { return onednn_forwards.load(std::memory_order_relaxed); }

}  // extern "C"

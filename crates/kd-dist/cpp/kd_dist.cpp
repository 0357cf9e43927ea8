// c10d for kd: the rendezvous (TCPStore behind a PrefixStore), a Gloo or
// NCCL process group, the four collectives the engine uses, and
// SyncBatchNorm's training forward and backward. Every function catches C++
// exceptions and returns them as a malloc'd message (nullptr on success), so
// nothing unwinds across the FFI boundary.
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef KD_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <torch/csrc/autograd/custom_function.h>

#include <chrono>
#include <vector>

#include "kd_ffi.h"

using kd_ffi::error_message;
using kd_ffi::gather;

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

// Sums `t` over the ranks, in place.
void allreduce_sum(c10d::Backend &backend, const at::Tensor &t) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  backend.allreduce(v, o)->wait();
}

// Per-channel broadcast shape of an [N, C, ...] input: [1, C, 1, ...].
std::vector<int64_t> channel_shape(const at::Tensor &x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

// Every axis but the channels: the axes BatchNorm reduces over.
std::vector<int64_t> reduced_dims(const at::Tensor &x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// The dtype the statistics are computed in: half-precision inputs (under
// autocast) are normalised in fp32, as PyTorch's SyncBatchNorm does.
at::ScalarType compute_type(const at::Tensor &x) {
  auto t = x.scalar_type();
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// A BatchNorm's running statistics (either may be undefined). Passed to
// the autograd function as one non-tensor argument: they are buffers that
// the forward updates, not inputs to differentiate.
struct RunningStats {
  at::Tensor mean, var;
};

// torch.nn.SyncBatchNorm's training step with generic ATen ops (no
// CUDA-only kernels), so that it runs on CPU/Gloo and CUDA/NCCL alike.
//
// Forward: each rank's per-channel sum, sum of squares and count go into
// one tensor and one allreduce; the input is normalised with the global
// mean and biased variance; running_mean/running_var move towards the
// global mean and unbiased variance. Backward: the per-channel sums of dy
// and dy*(x - mean) are allreduced in one tensor, so that the input
// gradient is that of one BatchNorm over the concatenated batch; the
// weight and bias gradients are this rank's own sums (the engine's gradient
// average then treats them as DDP does).
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const std::optional<at::Tensor> &weight,
                            const std::optional<at::Tensor> &bias, const RunningStats &running,
                            double momentum, double eps,
                            c10::intrusive_ptr<c10d::Backend> backend) {
    TORCH_CHECK(x.dim() >= 2, "SyncBatchNorm: expected an [N, C, ...] input, got ", x.dim(),
                " dimension(s)");
    const auto c = x.size(1);
    const auto type = compute_type(x);
    const auto xf = x.to(type);
    const auto dims = reduced_dims(x);
    const double n = c == 0 ? 0.0 : static_cast<double>(x.numel() / c);
    auto f64 = x.options().dtype(at::kDouble);
    // This rank's sums, from its own mean and variance (Welford in ATen),
    // combined in float64: a float32 sum of squares minus the squared
    // mean would lose the variance to cancellation when |mean| >> std.
    at::Tensor local;
    if (n > 0) {
      auto [var, mean] = at::var_mean(xf, dims, /*unbiased=*/false, /*keepdim=*/false);
      auto m = mean.to(at::kDouble);
      auto v = var.to(at::kDouble);
      local = at::cat({m * n, (v + m * m) * n, at::full({1}, n, f64)});
    } else {
      // A rank with no rows still joins the collective, with nothing.
      local = at::zeros({2 * c + 1}, f64);
    }
    allreduce_sum(*backend, local);
    auto count = local.narrow(0, 2 * c, 1);
    auto mean = local.narrow(0, 0, c) / count;
    auto var = (local.narrow(0, c, c) / count - mean * mean).clamp_min(0.0);
    auto invstd = (var + eps).rsqrt();
    // The running statistics are buffers: updated in place, outside autograd,
    // identically on every rank (the same reduced sums, the same ops).
    // (A global count of 1 makes the unbiased variance NaN, as in PyTorch's
    // SyncBatchNorm; checking it here would cost a device sync per layer.)
    if (running.mean.defined()) {
      auto rm = running.mean;
      rm.mul_(1.0 - momentum).add_(mean.to(rm.scalar_type()), momentum);
    }
    if (running.var.defined()) {
      auto rv = running.var;
      auto unbiased = var * count / (count - 1.0);
      rv.mul_(1.0 - momentum).add_(unbiased.to(rv.scalar_type()), momentum);
    }
    auto shape = channel_shape(x);
    auto mean_c = mean.to(type);
    auto invstd_c = invstd.to(type);
    auto scale = invstd_c;
    if (weight && weight->defined()) scale = scale * weight->to(type);
    auto y = (xf - mean_c.view(shape)) * scale.view(shape);
    if (bias && bias->defined()) y = y + bias->to(type).view(shape);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean_c, invstd_c,
                            count.to(type)});
    ctx->saved_data["backend"] = c10::IValue::make_capsule(std::move(backend));
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y.to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    // The sums below go through a collective that autograd cannot see: a
    // graph of this backward would give wrong second derivatives.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "batchnorm: sync does not support second derivatives (a gradient taken with "
                "create_graph, as sobolev and lwm do); use batchnorm: batch for these methods");
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0];
    const auto &weight = saved[1];
    const auto &mean = saved[2];
    const auto &invstd = saved[3];
    const auto &count = saved[4];
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Gradient slots are numbered over the tensor inputs that were given.
    const size_t weight_slot = 1, bias_slot = has_weight ? 2 : 1;
    const bool grad_x = ctx->needs_input_grad(0);
    const bool grad_w = has_weight && ctx->needs_input_grad(weight_slot);
    const bool grad_b = has_bias && ctx->needs_input_grad(bias_slot);
    // One gradient slot per forward argument; undefined for the others.
    torch::autograd::variable_list out(7);
    if (!grad_x && !grad_w && !grad_b) return out;

    const auto type = mean.scalar_type();
    const auto shape = channel_shape(x);
    const auto dims = reduced_dims(x);
    const auto dy = grads[0].to(type);
    const auto xmu = x.to(type) - mean.view(shape);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);

    if (grad_w) out[1] = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (grad_b) out[2] = sum_dy.to(mean.scalar_type());
    if (grad_x) {
      const auto c = x.size(1);
      auto both = at::cat({sum_dy, sum_dy_xmu});
      auto *backend =
          static_cast<c10d::Backend *>(ctx->saved_data["backend"].toCapsule().get());
      allreduce_sum(*backend, both);
      auto mean_dy = both.narrow(0, 0, c) / count;
      auto mean_dy_xmu = both.narrow(0, c, c) / count;
      auto scale = has_weight ? invstd * weight.to(type) : invstd;
      auto dx = (dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)) *
                scale.view(shape);
      out[0] = dx.to(x.scalar_type());
    }
    return out;
  }
};

}  // namespace

extern "C" {

// Connects to (or, when `is_server`, hosts) the store at addr:port and
// builds the process group. `nccl` selects NCCL (CUDA tensors) over Gloo.
char *kd_dist_new(const char *addr, int port, int rank, int world, int is_server,
                  int64_t timeout_ms, int nccl, void **out) {
  KD_PROTECT({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(addr, opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>("kd/", tcp);
    auto g = new Group{store, {}};
    if (nccl) {
#ifdef KD_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
      delete g;
      throw std::runtime_error("this kd was built without NCCL (no nccl.h and CUDA headers at build time)");
#endif
    } else {
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
    }
    *out = g;
  })
}

void kd_dist_free(void *g) { delete static_cast<Group *>(g); }

char *kd_dist_allreduce_sum(void *g, at::Tensor **ts, int64_t n) {
  KD_PROTECT({
    auto v = gather(ts, n);
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group *>(g)->backend->allreduce(v, o)->wait();
  })
}

char *kd_dist_broadcast(void *g, at::Tensor **ts, int64_t n, int root) {
  KD_PROTECT({
    auto v = gather(ts, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group *>(g)->backend->broadcast(v, o)->wait();
  })
}

// outs: world tensors shaped like `t`, filled with every rank's `t`.
char *kd_dist_allgather(void *g, at::Tensor *t, at::Tensor **outs, int64_t world) {
  KD_PROTECT({
    std::vector<at::Tensor> in{*t};
    std::vector<std::vector<at::Tensor>> out{gather(outs, world)};
    static_cast<Group *>(g)->backend->allgather(out, in)->wait();
  })
}

char *kd_dist_barrier(void *g) {
  KD_PROTECT({ static_cast<Group *>(g)->backend->barrier()->wait(); })
}

// SyncBatchNorm in training over the group (see SyncBatchNorm above).
// weight, bias, running_mean and running_var may be null; `out` receives
// a new tensor that carries the autograd graph.
char *kd_dist_sync_batch_norm(void *g, at::Tensor *x, at::Tensor *weight, at::Tensor *bias,
                              at::Tensor *running_mean, at::Tensor *running_var,
                              double momentum, double eps, at::Tensor **out) {
  KD_PROTECT({
    auto opt = [](at::Tensor *t) {
      return t == nullptr ? std::optional<at::Tensor>() : std::optional<at::Tensor>(*t);
    };
    RunningStats running{running_mean ? *running_mean : at::Tensor(),
                         running_var ? *running_var : at::Tensor()};
    auto y = SyncBatchNorm::apply(*x, opt(weight), opt(bias), running, momentum, eps,
                                  static_cast<Group *>(g)->backend);
    *out = new at::Tensor(std::move(y));
  })
}

int kd_dist_has_nccl() {
#ifdef KD_NCCL
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"

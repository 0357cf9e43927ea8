// The few libtorch entry points kd needs that tch does not bind. Every
// function catches C++ exceptions and returns them as a malloc'd message
// (nullptr on success), so nothing unwinds across the FFI boundary.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include "kd_ffi.h"

#ifdef KD_CUDA
// Device-generic guards and events (dispatched through c10_cuda at run
// time), so that nothing here calls the CUDA runtime directly.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

using kd_ffi::error_message;
using kd_ffi::gather;

extern "C" {

// torch.optim.SGD's multi-tensor update (torch/optim/sgd.py,
// `_multi_tensor_sgd`, dampening 0, not maximising), on the same ATen ops so
// results are those of PyTorch: on CUDA a few fused multi-tensor kernels for
// the whole list, on the CPU the per-tensor loop PyTorch's default runs.
// Buffers start at zero, which makes the first update `buf = 0 * m + d = d`
// bit for bit, PyTorch's copy of the first gradient.
char *kd_sgd_foreach(at::Tensor **params, at::Tensor **grads, at::Tensor **bufs, int64_t n,
                     double lr, double momentum, double weight_decay, int nesterov) {
  KD_PROTECT({
    if (n == 0) return nullptr;
    at::NoGradGuard no_grad;
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto b = gather(bufs, n);
    std::vector<at::Tensor> d = weight_decay != 0.0 ? at::_foreach_add(g, p, weight_decay) : g;
    if (momentum != 0.0) {
      at::_foreach_mul_(b, momentum);
      at::_foreach_add_(b, d, 1.0);
      if (nesterov) {
        if (weight_decay == 0.0) d = at::_foreach_add(d, b, momentum);
        else at::_foreach_add_(d, b, momentum);
      } else {
        d = b;
      }
    }
    at::_foreach_add_(p, d, -lr);
  })
}

// `F.leaky_relu(t, slope)`: one kernel each way, where tch binds only the
// default slope of 0.01.
char *kd_leaky_relu(at::Tensor *t, double slope, at::Tensor **out) {
  KD_PROTECT({ *out = new at::Tensor(at::leaky_relu(*t, slope)); })
}

// Drops the gradients of `params` (PyTorch's `zero_grad(set_to_none=True)`):
// the next backward then hands each parameter its gradient without an
// accumulating addition, and nothing is zeroed.
char *kd_grads_to_none(at::Tensor **params, int64_t n) {
  KD_PROTECT({
    for (int64_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
  })
}

// `t` in channels-last memory order (same values, NHWC strides).
char *kd_channels_last(at::Tensor *t, at::Tensor **out) {
  KD_PROTECT({ *out = new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast)); })
}

int kd_is_channels_last(at::Tensor *t) {
  return t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
}

// An InferenceMode guard on the heap: enter with _new, leave with _free on
// the same thread.
void *kd_inference_mode_new() { return new c10::InferenceMode(true); }
void kd_inference_mode_free(void *guard) { delete static_cast<c10::InferenceMode *>(guard); }

// Autocast's lower precision on CUDA: 0 float16, 1 bfloat16.
char *kd_set_cuda_autocast_dtype(int bf16) {
  KD_PROTECT({ at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf); })
}

// 1 when autocast's lower precision on CUDA is bfloat16, 0 for float16.
int kd_cuda_autocast_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
}

// Whether oneDNN runs bfloat16 convolutions and matmuls on this CPU: what
// `torch.ops.mkldnn._is_mkldnn_bf16_supported()` answers, asked through the
// dispatcher because ATen's own check (mkldnn_bf16_device_check) is in a
// header libtorch does not ship. 0 where libtorch was built without oneDNN.
int kd_cpu_bf16_supported() {
  try {
    if (!at::hasMKLDNN()) return 0;
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op.has_value()) return 0;
    return op->typed<bool()>().call() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// `torch.autocast("cpu", dtype=torch.bfloat16)` as a heap guard: entering
// saves the thread's CPU autocast state and turns it on at bfloat16;
// leaving restores it and, as torch's __exit__ does, drops the cast-weight
// cache once the outermost autocast region ends (else bf16 copies of
// weights the optimiser has since updated would be reused). Enter with
// _new, leave with _free on the same thread.
struct KdCpuAutocast {
  bool enabled;
  at::ScalarType dtype;
};

void *kd_cpu_autocast_new() {
  auto *g = new KdCpuAutocast{at::autocast::is_autocast_enabled(at::kCPU),
                              at::autocast::get_autocast_dtype(at::kCPU)};
  at::autocast::set_autocast_enabled(at::kCPU, true);
  at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  at::autocast::increment_nesting();
  return g;
}

void kd_cpu_autocast_free(void *guard) {
  auto *g = static_cast<KdCpuAutocast *>(guard);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCPU, g->enabled);
  at::autocast::set_autocast_dtype(at::kCPU, g->dtype);
  delete g;
}

// 1 when autocast is on for the CPU on this thread.
int kd_cpu_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCPU) ? 1 : 0; }

// The pickle program (`data.pkl`) of a file `torch.save` wrote, malloc'd
// into `*out` (`*len` bytes) for the caller to free.
char *kd_pth_pickle(const char *path, char **out, int64_t *len) {
  KD_PROTECT({
    caffe2::serialize::PyTorchStreamReader reader(path);
    auto [data, size] = reader.getRecord("data.pkl");
    *out = static_cast<char *>(std::malloc(size ? size : 1));
    std::memcpy(*out, data.get(), size);
    *len = static_cast<int64_t>(size);
  })
}

// Every tensor of the file at `path`, unpickling `pkl` (its `data.pkl`,
// possibly rewritten by the caller) with the file's tensor records:
// flattened to dotted names, dict keys joined by '.', list items by their
// index; non-tensor values are skipped. `names` and `tensors` are malloc'd
// arrays of `*n` entries the caller frees.
char *kd_pickle_tensors(const char *path, const char *pkl, int64_t pkl_len, char ***names,
                        at::Tensor ***tensors, int64_t *n) {
  KD_PROTECT({
    caffe2::serialize::PyTorchStreamReader reader(path);
    size_t at = 0;
    auto read = [&](char *buf, size_t want) -> size_t {
      size_t k = std::min(want, static_cast<size_t>(pkl_len) - at);
      std::memcpy(buf, pkl + at, k);
      at += k;
      return k;
    };
    auto record = [&](const std::string &key) { return std::get<0>(reader.getRecord("data/" + key)); };
    torch::jit::Unpickler unpickler(read, nullptr, nullptr, record, std::nullopt);
    unpickler.set_version(reader.version());
    c10::IValue root = unpickler.parse_ivalue();
    std::vector<std::pair<std::string, at::Tensor>> found;
    std::vector<std::pair<std::string, c10::IValue>> stack{{"", root}};
    while (!stack.empty()) {
      auto [prefix, v] = stack.back();
      stack.pop_back();
      auto join = [&](const std::string &k) { return prefix.empty() ? k : prefix + "." + k; };
      if (v.isTensor()) {
        found.emplace_back(prefix, v.toTensor());
      } else if (v.isGenericDict()) {
        for (const auto &e : v.toGenericDict()) {
          const auto &k = e.key();
          std::string key = k.isString() ? k.toStringRef() : (k.isInt() ? std::to_string(k.toInt()) : "");
          if (!key.empty()) stack.emplace_back(join(key), e.value());
        }
      } else if (v.isList()) {
        auto l = v.toList();
        for (size_t i = 0; i < l.size(); ++i) stack.emplace_back(join(std::to_string(i)), l.get(i));
      } else if (v.isTuple()) {
        const auto &t = v.toTupleRef().elements();
        for (size_t i = 0; i < t.size(); ++i) stack.emplace_back(join(std::to_string(i)), t[i]);
      }
    }
    if (found.empty()) {
      // Say what the file holds instead, so a wrong file is recognised.
      std::string what = root.tagKind();
      if (root.isGenericDict()) {
        what = "a dict with keys";
        int shown = 0;
        for (const auto &e : root.toGenericDict()) {
          if (shown++ == 8) { what += " ..."; break; }
          what += " " + (e.key().isString() ? e.key().toStringRef() : e.key().tagKind());
        }
      } else if (root.isList()) {
        what = "a list of " + std::to_string(root.toList().size()) + " items";
      }
      throw std::runtime_error("holds no tensors, so no weights: found " + what);
    }
    *n = static_cast<int64_t>(found.size());
    *names = static_cast<char **>(std::malloc(sizeof(char *) * (found.size() + 1)));
    *tensors = static_cast<at::Tensor **>(std::malloc(sizeof(at::Tensor *) * (found.size() + 1)));
    for (size_t i = 0; i < found.size(); ++i) {
      (*names)[i] = error_message(found[i].first.c_str());
      (*tensors)[i] = new at::Tensor(found[i].second);
    }
  })
}

// CUDA graphs (at::cuda::CUDAGraph, which tch does not bind), compiled when
// the CUDA runtime headers were found at build time; no GPU is needed to
// build them.
#ifdef KD_CUDA
struct KdGraph {
  at::cuda::CUDAGraph graph;
};
#else
struct KdGraph {};
#endif

int kd_cuda_graphs_built() {
#ifdef KD_CUDA
  return 1;
#else
  return 0;
#endif
}

// Captures what `body(ctx)` launches on CUDA device `device` into a new
// graph, as torch.cuda.graph does: on a side stream that first waits for the
// device's current stream, which waits for it in turn afterwards. The body
// runs once, recording instead of executing its kernels; its error (a
// malloc'd message) comes back as the call's. The capture is ended even
// after an error, so the stream does not stay in capture mode.
char *kd_cuda_graph_capture(int device, char *(*body)(void *), void *ctx, void **out) {
#ifdef KD_CUDA
  KD_PROTECT({
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::DeviceGuard on_device(c10::Device(c10::DeviceType::CUDA, index));
    c10::Stream current = c10::cuda::getCurrentCUDAStream(index).unwrap();
    c10::Stream side = c10::cuda::getStreamFromPool(false, index).unwrap();
    c10::Event ready(c10::DeviceType::CUDA);
    ready.record(current);
    ready.block(side);
    auto g = std::make_unique<KdGraph>();
    char *err = nullptr;
    {
      c10::StreamGuard on_side(side);
      g->graph.capture_begin();
      err = body(ctx);
      try {
        g->graph.capture_end();
      } catch (const std::exception &e) {
        if (err == nullptr) err = kd_ffi::error_message(e.what());
      }
    }
    c10::Event done(c10::DeviceType::CUDA);
    done.record(side);
    done.block(current);
    if (err != nullptr) return err;
    *out = g.release();
  })
#else
  (void)device;
  (void)body;
  (void)ctx;
  (void)out;
  return kd_ffi::error_message(
      "this kd was built without the CUDA runtime headers: CUDA graphs are not available");
#endif
}

// Launches the captured work again on the device's current stream.
char *kd_cuda_graph_replay(void *graph) {
#ifdef KD_CUDA
  KD_PROTECT({ static_cast<KdGraph *>(graph)->graph.replay(); })
#else
  (void)graph;
  return kd_ffi::error_message("this kd was built without CUDA graphs");
#endif
}

void kd_cuda_graph_free(void *graph) { delete static_cast<KdGraph *>(graph); }

}  // extern "C"

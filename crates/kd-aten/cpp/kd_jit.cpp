// TorchScript modules (torch.jit.script / trace files) as networks kd
// trains: tch binds loading and forward, but not buffers, the module's
// own parameter names, or dict outputs read by name. Same error convention
// as kd_aten.cpp (cpp/kd_ffi.h).
#include <torch/script.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <fstream>

#include <string>
#include <utility>
#include <vector>

#include "kd_ffi.h"

using kd_ffi::error_message;

namespace {

using Named = std::vector<std::pair<std::string, at::Tensor>>;

void hand_out(const Named &found, char ***names, at::Tensor ***tensors, int64_t *n) {
  *n = static_cast<int64_t>(found.size());
  *names = static_cast<char **>(std::malloc(sizeof(char *) * (found.size() + 1)));
  *tensors = static_cast<at::Tensor **>(std::malloc(sizeof(at::Tensor *) * (found.size() + 1)));
  for (size_t i = 0; i < found.size(); ++i) {
    (*names)[i] = error_message(found[i].first.c_str());
    (*tensors)[i] = new at::Tensor(found[i].second);
  }
}

// A module's output: a Tensor under `single`, or a Dict[str, Tensor]
// entry by entry; anything else is an error saying what kd reads.
Named named_outputs(const c10::IValue &out, const char *single, const char *what) {
  Named found;
  if (out.isTensor()) {
    found.emplace_back(single, out.toTensor());
  } else if (out.isGenericDict()) {
    for (const auto &e : out.toGenericDict()) {
      if (!e.key().isString() || !e.value().isTensor()) {
        throw std::runtime_error("forward returned a dict with a " + std::string(e.key().tagKind()) + " key or a " +
                                 e.value().tagKind() + " value; kd reads Dict[str, Tensor]");
      }
      found.emplace_back(e.key().toStringRef(), e.value().toTensor());
    }
  } else {
    throw std::runtime_error("forward returned a " + std::string(out.tagKind()) + "; kd reads " + what +
                             " or a Dict[str, Tensor]");
  }
  return found;
}

}  // namespace

extern "C" {

char *kd_jit_load(const char *path, int cuda_index, void **out) {
  KD_PROTECT({
    c10::Device device = cuda_index < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, cuda_index);
    auto *m = new torch::jit::Module(torch::jit::load(path, device));
    *out = m;
  })
}

void kd_jit_free(void *m) { delete static_cast<torch::jit::Module *>(m); }

// The module's parameters (buffers = 0) or buffers (buffers = 1), under
// their state_dict names; the tensors are the module's own, not copies.
char *kd_jit_tensors(void *m, int buffers, char ***names, at::Tensor ***tensors, int64_t *n) {
  KD_PROTECT({
    auto *module = static_cast<torch::jit::Module *>(m);
    Named found;
    if (buffers) {
      for (const auto &b : module->named_buffers(true)) found.emplace_back(b.name, b.value);
    } else {
      for (const auto &p : module->named_parameters(true)) found.emplace_back(p.name, p.value);
    }
    hand_out(found, names, tensors, n);
  })
}

char *kd_jit_train(void *m, int on) {
  KD_PROTECT({ static_cast<torch::jit::Module *>(m)->train(on != 0); })
}

// forward(x): a Tensor is handed out as `logits`; a Dict[str, Tensor] entry
// by entry. Anything else is an error naming what forward returned.
char *kd_jit_forward(void *m, at::Tensor *x, char ***names, at::Tensor ***tensors, int64_t *n) {
  KD_PROTECT({
    auto *module = static_cast<torch::jit::Module *>(m);
    hand_out(named_outputs(module->forward({*x}), "logits", "the logits"), names, tensors, n);
  })
}

// A loss module's forward(student: Dict[str, Tensor], teacher: Dict[str,
// Tensor], target: Tensor): a Tensor is handed out as `loss`, a
// Dict[str, Tensor] of named terms entry by entry.
char *kd_jit_loss(void *m, char **s_names, at::Tensor **s, int64_t ns, char **t_names, at::Tensor **t,
                  int64_t nt, at::Tensor *target, char ***names, at::Tensor ***tensors, int64_t *n) {
  KD_PROTECT({
    auto *module = static_cast<torch::jit::Module *>(m);
    auto dict = [](char **keys, at::Tensor **ts, int64_t k) {
      c10::Dict<std::string, at::Tensor> d;
      for (int64_t i = 0; i < k; ++i) d.insert(keys[i], *ts[i]);
      return d;
    };
    c10::IValue out = module->forward({dict(s_names, s, ns), dict(t_names, t, nt), *target});
    hand_out(named_outputs(out, "loss", "the loss (a Tensor)"), names, tensors, n);
  })
}

}  // extern "C"

// Tensors crossing to kd's embedded Python (crates/kd-python) as the
// address of their TensorImpl, which Python wraps with
// torch._C._wrap_tensor_impl: the same tensor, autograd state included.
extern "C" {

void *kd_tensor_impl(at::Tensor *t) { return t->unsafeGetTensorImpl(); }

// A new reference to the TensorImpl at `impl` (from Python's
// torch._C._tensor_impl_raw_handle, while Python still holds the tensor).
at::Tensor *kd_tensor_from_impl(void *impl) {
  auto p = c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(
      static_cast<c10::TensorImpl *>(impl));
  return new at::Tensor(std::move(p));
}

}  // extern "C"

// A state_dict as torch.save writes it (torch.load reads it back as a dict
// of str -> Tensor, weights_only included): libtorch's pickler and archive
// writer, as torch::jit::pickle_save uses them, but with untagged
// aggregates: a tagged dict pickles a call to torch.jit's type restorer,
// which torch.load(weights_only=True) refuses.
extern "C" char *kd_save_state_dict(char **names, at::Tensor **tensors, int64_t n, const char *path) {
  KD_PROTECT({
    c10::Dict<std::string, at::Tensor> dict;
    for (int64_t i = 0; i < n; ++i) dict.insert(names[i], *tensors[i]);
    std::vector<char> bytes;
    torch::jit::Pickler pickler([&](const char *b, size_t k) { bytes.insert(bytes.end(), b, b + k); }, nullptr,
                                nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
    pickler.protocol();
    pickler.pushIValue(dict);
    pickler.stop();
    caffe2::serialize::PyTorchStreamWriter writer{std::string(path)};
    torch::jit::writeArchiveAndTensors("data", bytes.data(), bytes.size(), pickler.tensorData(), writer);
    writer.writeEndOfFile();
  })
}

// The error convention of kd's C++ shims (kd-aten, kd-dist): every entry
// point catches C++ exceptions and returns them as a malloc'd message
// (nullptr on success), so nothing unwinds across the FFI boundary.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace kd_ffi {

inline char *error_message(const char *what) {
  char *out = static_cast<char *>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) std::strcpy(out, what);
  return out;
}

inline std::vector<at::Tensor> gather(at::Tensor **ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace kd_ffi

// Variadic: a body with commas outside parentheses is still one argument.
#define KD_PROTECT(...)                         \
  try {                                         \
    __VA_ARGS__                                 \
  } catch (const std::exception &e) {           \
    return kd_ffi::error_message(e.what());     \
  }                                             \
  return nullptr;

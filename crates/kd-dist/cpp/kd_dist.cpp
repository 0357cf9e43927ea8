// c10d for kd: the rendezvous (TCPStore behind a PrefixStore), a Gloo or
// NCCL process group, and the four collectives the engine uses. Every
// function catches C++ exceptions and returns them as a malloc'd message
// (nullptr on success), so nothing unwinds across the FFI boundary.
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef KD_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

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

int kd_dist_has_nccl() {
#ifdef KD_NCCL
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"

// libtorch's c10d for tch-fabric: a TCPStore rendezvous, a Gloo process group, and the few
// collectives the crate needs (all-reduce, broadcast, barrier). Every entry point catches C++
// exceptions and returns the message (TF_PROTECT, protect.h).
#include "protect.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// c10d's Gloo backend is built into libtorch_cpu.so; its header needs Gloo's own headers, which
// the wheels do not ship. build_gloo.rs finds them (Debian's libgloo-dev), checks with
// csrc/gloo_probe.cpp that they give ProcessGroupGloo this libtorch's layout, and defines
// TF_HAVE_GLOO; without them the crate builds without multi-process support.
#ifdef TF_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef TF_HAVE_NCCL
// Under the `cuda` feature: NCCL groups for CUDA tensors, from the wheel's own header.
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <c10/cuda/CUDAFunctions.h>
#endif
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <ATen/native/TensorFactories.h>

#include <atomic>
#include <limits>
#include <unordered_map>

namespace {

using tch_fabric_shim::deref;

void wait(const c10::intrusive_ptr<c10d::Work> &work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("collective did not complete within " +
                             std::to_string(timeout.count()) + " ms");
  }
}


// Which collective each rank reached, recorded in the rendezvous store, so that a failed one
// can name the ranks that never came. Shared by the group and its Reducers' hooks.
struct Arrivals {
  Arrivals(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size)
      : store(std::move(store)), rank(rank), world_size(world_size) {}
  c10::intrusive_ptr<c10d::Store> store;
  int rank;
  int world_size;
  // Collectives this rank has entered. Every rank runs the same collectives in the same order,
  // so equal counts mean the same collective.
  std::atomic<std::uint64_t> seq{0};
};

struct ProcessGroup {
  // First, so that it goes last: the rendezvous store, this rank, the group's size.
  std::shared_ptr<Arrivals> arrivals;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // The c10d::ProcessGroup over `backend` that DDP's Reducer talks to (for CPU and CUDA
  // tensors), and the bucket all-reduces its hooks issued.
  c10::intrusive_ptr<c10d::ProcessGroup> wrapper;
  std::shared_ptr<std::atomic<std::uint64_t>> bucket_all_reduces =
      std::make_shared<std::atomic<std::uint64_t>>(0);
};

std::string arrival_key(int rank) { return "tch_fabric/arrived/" + std::to_string(rank); }

// Records in the store that this rank entered its next collective: one key per rank,
// overwritten each time (the store never grows), sent without waiting for a reply.
void arrive(Arrivals &g) {
  const auto seq = ++g.seq;
  g.store->set(arrival_key(g.rank), std::to_string(seq));
}

// After a collective failed: which ranks never entered it, read from their arrival keys.
// Empty when every rank did, or when the store cannot tell (rank 0, which serves it, is gone).
std::string missing_ranks(Arrivals &g) {
  const std::uint64_t seq = g.seq;
  std::string missing;
  int count = 0;
  try {
    for (int r = 0; r < g.world_size; ++r) {
      if (r == g.rank) continue;
      const auto key = arrival_key(r);
      std::uint64_t reached = 0;
      if (g.store->check({key})) reached = std::stoull(g.store->get_to_str(key));
      if (reached >= seq) continue;
      missing += (count++ == 0 ? "" : ", ") + std::to_string(r) + " (last at collective " +
                 (reached == 0 ? std::string("none") : "#" + std::to_string(reached)) + ")";
    }
  } catch (const std::exception &) {
    return "";
  }
  if (count == 0) return "";
  return std::string(count == 1 ? "rank " : "ranks ") + missing + " did not arrive at collective #" +
         std::to_string(seq) + " of rank " + std::to_string(g.rank);
}

// DDP's default communication (the Reducer's own when no hook is registered: gradients
// multiplied by 1/world_size while copied into the bucket, then summed), counted. The Reducer
// copies gradients into the bucket unscaled when a hook is registered, so the multiplication
// happens here, with the same wrapped-number scalar and the same rounding.
class CountingAllReduce : public c10d::CommHookInterface {
 public:
  CountingAllReduce(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                    std::shared_ptr<std::atomic<std::uint64_t>> count,
                    std::shared_ptr<Arrivals> arrivals)
      : pg_(std::move(pg)), count_(std::move(count)), arrivals_(std::move(arrivals)) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket &bucket) override {
    auto &buffer = bucket.getBufferRef();
    buffer.mul_(at::native::wrapped_scalar_tensor(1.0 / pg_->getSize()));
    std::vector<at::Tensor> tensors{buffer};
    ++*count_;
    try {
      arrive(*arrivals_);
    } catch (const std::exception &) {
      // As in collective(): the record only explains a failure.
    }
    return pg_->allreduce(tensors)->getFuture();
  }

  at::Tensor parseHookResult(const c10::IValue &result) override {
    return c10d::detail::parseCppCommHookResult(result);
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::shared_ptr<std::atomic<std::uint64_t>> count_;
  std::shared_ptr<Arrivals> arrivals_;
};

struct Reducer {
  std::unique_ptr<c10d::Reducer> reducer;
};

// Runs one collective: announces the arrival, waits at most the group's timeout, and on
// failure names the ranks that never came (a hung or stopped rank) in the error.
template <typename Start>
void collective(ProcessGroup &g, const char *name, Start start) {
  try {
    arrive(*g.arrivals);
  } catch (const std::exception &) {
    // The record only explains a failure; a store that is gone (rank 0 died) must not keep the
    // collective from reporting its own error.
  }
  try {
    wait(start(), g.timeout);
  } catch (const std::exception &e) {
    const std::string missing = missing_ranks(*g.arrivals);
    std::string msg = std::string(name) + " failed after at most " +
                      std::to_string(g.timeout.count()) + " ms";
    if (!missing.empty()) msg += ": " + missing;
    throw std::runtime_error(msg + " (" + tch_fabric_shim::message_of(e) + ")");
  }
}

ProcessGroup &pg_ref(tf_process_group pg) {
  if (pg == nullptr) throw std::invalid_argument("tch-fabric shim: null process group");
  return *static_cast<ProcessGroup *>(pg);
}

bool is_loopback(const std::string &addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

#ifdef TF_HAVE_GLOO
// The Gloo transport device: GLOO_SOCKET_IFNAME as in PyTorch; the loopback interface when the
// master is on this machine's loopback (every rank is local then); else the address this
// host's name resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string &master_addr) {
  if (const char *ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
    if (*ifname != '\0') return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  }
  if (is_loopback(master_addr)) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

#endif

}  // namespace


extern "C" {

char *tf_pg_new(const char *backend, const char *master_addr, int32_t master_port, int32_t rank,
                int32_t world_size, int64_t rendezvous_timeout_ms, int64_t timeout_ms,
                int32_t listen_fd, int64_t agent_store_attempt, tf_process_group *out) {
  // The socket is ours until the store takes it: closed on every error before that.
  struct Fd {
    int fd;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  } owned{rank == 0 ? listen_fd : -1};
  TF_PROTECT({
    const std::string name = backend == nullptr ? "" : backend;
    const std::string addr = master_addr == nullptr ? "" : master_addr;
    if (world_size < 1 || rank < 0 || rank >= world_size) {
      throw std::invalid_argument("rank " + std::to_string(rank) + " is outside world size " +
                                  std::to_string(world_size));
    }
    if (master_port < 1 || master_port > 65535) {
      throw std::invalid_argument("MASTER_PORT " + std::to_string(master_port) +
                                  " is not a TCP port (1..65535)");
    }
    if (name == "nccl") {
#ifdef TF_HAVE_NCCL
      // Before the rendezvous, so that the other ranks are not left waiting for this one.
      if (c10::cuda::device_count() == 0) {
        throw std::invalid_argument(
            "the NCCL backend needs a CUDA GPU and this process sees none; use the gloo "
            "backend on CPUs");
      }
#else
      throw std::invalid_argument(
          "the NCCL backend is not available in this build of tch-fabric (build it with the "
          "`cuda` feature); use the gloo backend, which also handles CUDA tensors");
#endif
    } else if (name != "gloo") {
      throw std::invalid_argument("unknown process group backend '" + name +
                                  "': must be 'gloo' or 'nccl'");
    }
    const auto rendezvous = std::chrono::milliseconds(rendezvous_timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(master_port);
    // torchrun's agent serves the store itself (TORCHELASTIC_USE_AGENT_STORE): every rank,
    // rank 0 included, joins it as a client, as PyTorch's env:// rendezvous does.
    const bool agent_store = agent_store_attempt >= 0;
    opts.isServer = rank == 0 && !agent_store;
    opts.numWorkers = static_cast<std::size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = rendezvous;
    // Rank 0 serves on the socket the caller bound to MASTER_ADDR (c10d alone would listen on
    // every interface).
    if (owned.fd >= 0) {
      opts.masterListenFd = owned.fd;
      owned.fd = -1;
    }
    c10::intrusive_ptr<c10d::Store> store;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(addr, opts);
      if (agent_store) {
        // PyTorch's keys for this attempt of the job, apart from the agent's own.
        store = c10::make_intrusive<c10d::PrefixStore>(
            "/worker/attempt_" + std::to_string(agent_store_attempt), store);
      }
    } catch (const std::exception &e) {
      throw std::runtime_error(
          std::string(opts.isServer ? "rank 0 could not serve" : "could not join") +
          " the rendezvous at " + addr + ":" + std::to_string(master_port) + " (world size " +
          std::to_string(world_size) + ", timeout " + std::to_string(rendezvous.count()) +
          " ms): " + tch_fabric_shim::message_of(e));
    }
    c10::intrusive_ptr<c10d::Backend> group;
    auto backend_type = c10d::ProcessGroup::BackendType::GLOO;
#ifdef TF_HAVE_NCCL
    if (name == "nccl") {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = std::chrono::milliseconds(timeout_ms);
      try {
        group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
      } catch (const std::exception &e) {
        throw std::runtime_error("NCCL could not set up rank " + std::to_string(rank) + " of " +
                                 std::to_string(world_size) + ": " +
                                 tch_fabric_shim::message_of(e));
      }
      backend_type = c10d::ProcessGroup::BackendType::NCCL;
    }
#endif
    if (!group) {
#ifdef TF_HAVE_GLOO
      auto options = c10d::ProcessGroupGloo::Options::create(rendezvous);
      options->devices.push_back(gloo_device(addr));
      try {
        group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
      } catch (const std::exception &e) {
        throw std::runtime_error("Gloo could not connect the " + std::to_string(world_size) +
                                 " ranks (this is rank " + std::to_string(rank) + ", timeout " +
                                 std::to_string(rendezvous.count()) +
                                 " ms; do all ranks agree on WORLD_SIZE?): " +
                                 tch_fabric_shim::message_of(e));
      }
#else
      throw std::runtime_error(
          "this build of tch-fabric has no Gloo process group: it was compiled without Gloo's "
          "headers. Install them (Debian/Ubuntu: apt-get install libgloo-dev) or set "
          "GLOO_INCLUDE_DIR, then rebuild");
#endif
    }
    // Collectives pass their own, longer timeout (a rank may be busy writing a checkpoint).
    auto *g = new ProcessGroup{std::make_shared<Arrivals>(store, rank, world_size), group,
                               std::chrono::milliseconds(timeout_ms)};
    // The Reducer's all-reduces run with the backend's own timeout: the collectives' one.
    group->setTimeout(std::chrono::milliseconds(timeout_ms));
    g->wrapper = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world_size);
    // Gloo takes CPU and CUDA tensors; NCCL only CUDA ones.
    if (backend_type == c10d::ProcessGroup::BackendType::GLOO) {
      g->wrapper->setBackend(c10::DeviceType::CPU, backend_type, group);
    }
    g->wrapper->setBackend(c10::DeviceType::CUDA, backend_type, group);
    g->wrapper->setDefaultBackend(backend_type);
    *out = g;
  })
}

void tf_pg_free(tf_process_group pg) {
  try {
    delete static_cast<ProcessGroup *>(pg);
  } catch (...) {
    // A destructor that throws while tearing down sockets must not reach Rust's Drop.
  }
}

char *tf_pg_all_reduce(tf_process_group pg, tf_tensor tensor, int32_t op) {
  TF_PROTECT({
    auto &g = pg_ref(pg);
    c10d::AllreduceOptions opts;
    switch (op) {
      case 0:
        opts.reduceOp = c10d::ReduceOp::SUM;
        break;
      case 1:
        opts.reduceOp = c10d::ReduceOp::MAX;
        break;
      default:
        throw std::invalid_argument("tch-fabric shim: unknown reduce op " + std::to_string(op));
    }
    opts.timeout = g.timeout;
    std::vector<at::Tensor> list{deref(tensor)};
    collective(g, "all_reduce", [&] { return g.backend->allreduce(list, opts); });
  })
}

char *tf_pg_broadcast(tf_process_group pg, tf_tensor tensor, int32_t root) {
  TF_PROTECT({
    auto &g = pg_ref(pg);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g.timeout;
    std::vector<at::Tensor> list{deref(tensor)};
    collective(g, "broadcast", [&] { return g.backend->broadcast(list, opts); });
  })
}

char *tf_pg_barrier(tf_process_group pg) {
  TF_PROTECT({
    auto &g = pg_ref(pg);
    c10d::BarrierOptions opts;
    opts.timeout = g.timeout;
    collective(g, "barrier", [&] { return g.backend->barrier(opts); });
  })
}

char *tf_pg_missing_ranks(tf_process_group pg, char **out) {
  TF_PROTECT({
    *out = nullptr;
    const std::string missing = missing_ranks(*pg_ref(pg).arrivals);
    *out = ::tch_fabric_shim::dup_message(missing.c_str());
  })
}

uint64_t tf_pg_bucket_all_reduces(tf_process_group pg) {
  return pg == nullptr ? 0 : static_cast<ProcessGroup *>(pg)->bucket_all_reduces->load();
}

char *tf_reducer_new(tf_process_group pg, const tf_tensor *params, size_t n,
                     const char *const *names, int64_t bucket_bytes, int32_t find_unused,
                     tf_reducer *out) {
  TF_PROTECT({
    *out = nullptr;
    auto &g = pg_ref(pg);
    std::vector<at::Tensor> tensors;
    std::unordered_map<size_t, std::string> param_names;
    for (size_t i = 0; i < n; ++i) {
      tensors.push_back(deref(params[i]));
      param_names[i] = names[i];
    }
    // PyTorch 2.13's DDP: without find_unused_parameters every parameter starts in one bucket
    // and the Reducer rebuilds the buckets by size in the order gradients became ready, after
    // the first backward; with it, buckets by size from the start (a 1 MiB first bucket).
    const size_t cap = static_cast<size_t>(bucket_bytes);
    std::vector<size_t> limits;
    if (!find_unused) {
      limits = {std::numeric_limits<size_t>::max()};
    } else if (static_cast<size_t>(c10d::kDefaultFirstBucketBytes) < cap) {
      limits = {static_cast<size_t>(c10d::kDefaultFirstBucketBytes), cap};
    } else {
      limits = {cap};
    }
    std::vector<bool> sparse(n, false);
    auto assignment = c10d::compute_bucket_assignment_by_size(tensors, limits, sparse);
    auto buckets = std::get<0>(assignment);
    // Reversed: gradients come in roughly the reverse of the forward order.
    std::reverse(buckets.begin(), buckets.end());
    auto reducer = std::make_unique<c10d::Reducer>(
        tensors, std::move(buckets), g.wrapper, sparse, bucket_bytes, find_unused != 0,
        /*gradient_as_bucket_view=*/false, std::move(param_names),
        c10d::kDefaultFirstBucketBytes, /*skip_all_reduce_unused_params=*/false,
        /*use_python_reducer=*/false, /*bucket_bytes_cap_list=*/std::vector<int64_t>{});
    reducer->register_comm_hook(
        std::make_unique<CountingAllReduce>(g.wrapper, g.bucket_all_reduces, g.arrivals));
    *out = new Reducer{std::move(reducer)};
  })
}

char *tf_reducer_prepare(tf_reducer r, const tf_tensor *outputs, size_t n) {
  TF_PROTECT({
    if (r == nullptr) throw std::invalid_argument("tch-fabric shim: null reducer");
    auto &reducer = *static_cast<Reducer *>(r)->reducer;
    std::vector<at::Tensor> list;
    for (size_t i = 0; i < n; ++i) list.push_back(deref(outputs[i]));
    // As DDP's forward: buckets rebuilt once gradients were seen in order (a collective the
    // first time), then the hooks armed for this backward.
    reducer.rebuild_buckets();
    reducer.prepare_for_backward(list);
  })
}

void tf_reducer_free(tf_reducer r) {
  try {
    delete static_cast<Reducer *>(r);
  } catch (...) {
    // ~Reducer may throw (noexcept(false)); nothing can be done with it here.
  }
}

}  // extern "C"

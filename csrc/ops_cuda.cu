// CUDA kernel of tch_fabric::unscale_sumsq_ (schema and CPU kernel in ops.cpp; same semantics).
//
// Design, and why:
// - No host synchronisation, so the op can sit between backward and a fused optimizer step in
//   a CUDA graph: inv_scale is read by the kernel from device memory, found_inf is written by
//   the kernel, the sum of squares stays on the device.
// - Tensor pointers travel as kernel arguments (the way PyTorch's multi_tensor_apply does), up
//   to kMaxTensors per launch; every launch is captured by value in a CUDA graph.
// - Each block owns one fixed chunk of one tensor and writes its partial sum to its own slot;
//   a second kernel adds the slots in index order. The chunking depends only on the tensor
//   sizes, never on the device or timing, so the result has the same bits run to run (and on
//   any GPU of the same architecture), with no float atomics.
// - 16-byte vector loads/stores, several in flight per thread, keep the pass at the memory
//   bandwidth; the dtype is a per-tensor value read once per block, so float32, float16 and
//   bfloat16 gradients share one launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 512;
// Elements per block: a multiple of every vector width, so chunks keep the tensor's alignment.
constexpr int64_t kChunk = 32768;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
constexpr int kReduceThreads = 1024;
// Kernel arguments are limited to 4 KiB on older toolkits; the metadata stays below that.
constexpr int kMaxTensors = 96;

enum Dtype : uint8_t { kF32, kF16, kBF16 };

struct Meta {
  void *ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_end[kMaxTensors];  // cumulative chunk counts within this launch
  uint8_t dtype[kMaxTensors];
  uint8_t aligned[kMaxTensors];  // 16-byte aligned data: vector path
  int count;
};
static_assert(sizeof(Meta) < 4096, "kernel arguments must stay below 4 KiB");

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One element: the finiteness check on the original value (as the native kernel does, before
// the multiply), then the stored value's square (unscale) or the unrounded float32 product's.
template <typename T, bool kUnscale>
__device__ __forceinline__ float visit(T &x, float inv, bool &bad) {
  const float v = static_cast<float>(x);
  bad |= !isfinite(v);
  if (kUnscale) {
    // The native kernel's expression: float32 math, rounded once to the storage dtype.
    x = static_cast<T>(inv == 1.f ? v : v * inv);
    const float u = static_cast<float>(x);
    return u * u;
  }
  const float u = v * inv;
  return u * u;
}

template <typename T, bool kUnscale>
__device__ __forceinline__ float chunk_sumsq(T *p, int64_t n, bool aligned, float inv, bool &bad) {
  constexpr int N = 16 / sizeof(T);
  using P = Pack<T, N>;
  float acc = 0.f;
  if (aligned && n == kChunk) {
    // The common case, a whole aligned chunk: a fixed trip count with no bounds checks, all
    // kUnroll loads issued before the first use.
    constexpr int kSteps = kChunk / N / (kThreads * kUnroll);
    static_assert(kSteps * N * kThreads * kUnroll == kChunk, "chunk must split evenly");
    P *q = reinterpret_cast<P *>(p) + threadIdx.x;
#pragma unroll 1
    for (int s = 0; s < kSteps; ++s, q += kThreads * kUnroll) {
      P pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u] = q[u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < N; ++j) acc += visit<T, kUnscale>(pk[u].v[j], inv, bad);
        if (kUnscale) q[u * kThreads] = pk[u];
      }
    }
    return acc;
  }
  // A tensor's last chunk, or unaligned data (a view with an odd storage offset).
  int64_t done = 0;
  if (aligned) {
    P *q = reinterpret_cast<P *>(p);
    const int64_t nv = n / N;
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      P pk = q[i];
#pragma unroll
      for (int j = 0; j < N; ++j) acc += visit<T, kUnscale>(pk.v[j], inv, bad);
      if (kUnscale) q[i] = pk;
    }
    done = nv * N;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    T x = p[i];
    acc += visit<T, kUnscale>(x, inv, bad);
    if (kUnscale) p[i] = x;
  }
  return acc;
}

// A fixed reduction tree (shuffles, then one warp over the warp sums): same bits every run.
// The result is valid in thread 0.
template <typename A, int kBlock>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlock / 32 ? warp_sums[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <bool kUnscale>
__global__ void __launch_bounds__(kThreads)
    unscale_sumsq_kernel(const Meta meta, const float *inv_scale, float *found_inf, float *partials) {
  const int64_t k = blockIdx.x;
  // The tensor that owns chunk k: the first with chunk_end > k (uniform across the block).
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (meta.chunk_end[mid] > k) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int t = lo;
  const int64_t start = (k - (t == 0 ? 0 : meta.chunk_end[t - 1])) * kChunk;
  const int64_t n = min(kChunk, meta.numel[t] - start);
  const bool aligned = meta.aligned[t] != 0;
  const float inv = *inv_scale;
  bool bad = false;
  float acc = 0.f;
  switch (meta.dtype[t]) {
    case kF32:
      acc = chunk_sumsq<float, kUnscale>(static_cast<float *>(meta.ptr[t]) + start, n, aligned, inv, bad);
      break;
    case kF16:
      acc = chunk_sumsq<c10::Half, kUnscale>(static_cast<c10::Half *>(meta.ptr[t]) + start, n, aligned, inv,
                                             bad);
      break;
    default:
      acc = chunk_sumsq<c10::BFloat16, kUnscale>(static_cast<c10::BFloat16 *>(meta.ptr[t]) + start, n,
                                                 aligned, inv, bad);
      break;
  }
  // Every writer stores the same 1.0 (as the native kernel does): no atomics, never a reset.
  if (bad) *found_inf = 1.f;
  acc = block_sum<float, kThreads>(acc);
  if (threadIdx.x == 0) partials[k] = acc;
}

// The partial sums in index order, accumulated in double and rounded once to float32.
__global__ void __launch_bounds__(kReduceThreads) finish_kernel(const float *partials, int64_t n, float *out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) acc += partials[i];
  acc = block_sum<double, kReduceThreads>(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(acc);
}

void launch(bool unscale, const Meta &meta, int64_t chunks, const float *inv, float *found, float *partials,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(chunks));
  if (unscale) {
    unscale_sumsq_kernel<true><<<grid, kThreads, 0, stream>>>(meta, inv, found, partials);
  } else {
    unscale_sumsq_kernel<false><<<grid, kThreads, 0, stream>>>(meta, inv, found, partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Dtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "unscale_sumsq_: gradients must be float32, float16 or bfloat16 on CUDA, got ", t);
  }
}

at::Tensor unscale_sumsq_cuda(at::TensorList grads, at::Tensor &found_inf, const at::Tensor &inv_scale,
                              bool unscale) {
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "found_inf must be a 1-element float32 tensor");
  TORCH_CHECK(inv_scale.numel() == 1 && inv_scale.scalar_type() == at::kFloat,
              "inv_scale must be a 1-element float32 tensor");
  TORCH_CHECK(found_inf.is_cuda() && inv_scale.device() == found_inf.device(),
              "unscale_sumsq_: found_inf and inv_scale must be on the gradients' CUDA device, got ",
              found_inf.device(), " and ", inv_scale.device());
  const c10::cuda::CUDAGuard guard(found_inf.device());
  const auto opts = found_inf.options();

  // Non-contiguous gradients go through a contiguous copy (copied back after the pass when
  // unscaling), all on the stream: no synchronisation.
  std::vector<at::Tensor> work;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  int64_t total_chunks = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor &g = grads[i];
    TORCH_CHECK(g.device() == found_inf.device(), "unscale_sumsq_: gradient ", i, " is on ", g.device(),
                ", found_inf on ", found_inf.device());
    TORCH_CHECK(g.layout() == at::kStrided, "unscale_sumsq_: gradient ", i, " is not a dense tensor");
    dtype_code(g.scalar_type());
    if (g.numel() == 0) continue;
    at::Tensor c = g.is_contiguous() ? g : g.contiguous();
    if (unscale && !g.is_contiguous()) copy_back.emplace_back(g, c);
    total_chunks += (c.numel() + kChunk - 1) / kChunk;
    work.push_back(std::move(c));
  }

  at::Tensor out = at::empty({}, opts);
  at::Tensor partials = at::empty({total_chunks}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float *inv = inv_scale.const_data_ptr<float>();
  float *found = found_inf.mutable_data_ptr<float>();
  float *slots = partials.mutable_data_ptr<float>();

  Meta meta{};
  int64_t chunks = 0, base = 0;
  auto flush = [&] {
    if (meta.count == 0) return;
    launch(unscale, meta, chunks, inv, found, slots + base, stream);
    base += chunks;
    chunks = 0;
    meta.count = 0;
  };
  for (const at::Tensor &c : work) {
    const int64_t n = c.numel(), nchunks = (n + kChunk - 1) / kChunk;
    if (meta.count == kMaxTensors || chunks + nchunks > INT_MAX) flush();
    const int t = meta.count++;
    meta.ptr[t] = c.data_ptr();
    meta.numel[t] = n;
    chunks += nchunks;
    meta.chunk_end[t] = chunks;
    meta.dtype[t] = dtype_code(c.scalar_type());
    meta.aligned[t] = reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
  }
  flush();
  finish_kernel<<<1, kReduceThreads, 0, stream>>>(slots, total_chunks, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  for (auto &[g, c] : copy_back) g.copy_(c);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tch_fabric, CUDA, m) {
  m.impl("unscale_sumsq_", &unscale_sumsq_cuda);
}

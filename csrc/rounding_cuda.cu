// CUDA kernels of tch_fabric::adamw_rounded_, sgd_rounded_ and stochastic_round (schemas, CPU
// kernels and semantics in rounding.cpp; the element arithmetic and the random bits in
// rounding.h, shared with the CPU, so both devices draw the same bits for an element).
//
// - No host synchronisation: the step counts, grad_scale and found_inf are read by the kernels
//   from device memory, so a step can be captured in a CUDA graph.
// - One thread per Philox block of kBlock (8) elements: one generator call gives the thread all
//   its random bits. One launch per parameter tensor, on the current stream.
#include "rounding.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using namespace tf_rounding;

constexpr int kThreads = 256;

struct Tensors {
  uint16_t *p, *g, *buf1, *buf2, *buf3, *comp;  // Adam: m, v, max_v; SGD: momentum in buf1
  const float *step;                            // null where the step needs none
  int64_t n;
  uint32_t position;
};

struct Shared {
  double lr, beta1, beta2, weight_decay, eps, momentum, dampening;
  bool maximize, nesterov, first;
  int64_t mode;
  uint64_t seed;
  const float *grad_scale, *found_inf;  // null when not given
};

// The step count as the generator's counter word: float32 counts are whole and below 2^24 in
// practice; the CPU kernel refuses what does not fit, here it is clamped (kernels cannot fail).
__device__ __forceinline__ uint32_t step_word(const float *step) {
  const float s = *step;
  return s <= 0.f ? 0u : (s >= 4294967040.f ? 4294967040u : static_cast<uint32_t>(s));
}

__device__ __forceinline__ float unscaled(uint16_t *g, float divisor) {
  if (divisor == 1.f) return bf16_to_f32(*g);
  const float v = bf16_to_f32(*g) / divisor;
  *g = bf16_nearest(v);
  return v;
}

template <bool kAdam>
__global__ void __launch_bounds__(kThreads) step_kernel(Tensors t, Shared s) {
  if (s.found_inf && *s.found_inf != 0.f) return;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = block * kBlock;
  if (begin >= t.n) return;
  const int64_t end = begin + kBlock < t.n ? begin + kBlock : t.n;
  const uint32_t step = t.step ? step_word(t.step) : 0u;
  const Philox bits = block_bits(s.seed, t.position, step, static_cast<uint64_t>(block));
  const float divisor = s.grad_scale ? *s.grad_scale : 1.f;
  if (kAdam) {
    // The per-tensor scalars in double, as the CPU kernel computes them.
    const AdamScalars k =
        adam_scalars(s.lr, s.beta1, s.beta2, s.weight_decay, s.eps, s.maximize, step);
    for (int64_t i = begin; i < end; ++i) {
      adamw_element(t.p + i, unscaled(t.g + i, divisor), t.buf1 + i, t.buf2 + i,
                    t.buf3 ? t.buf3 + i : nullptr, t.comp ? t.comp + i : nullptr, k, s.mode,
                    bits.bits16(static_cast<int>(i - begin)));
    }
  } else {
    const SgdScalars k = sgd_scalars(s.lr, s.weight_decay, s.momentum, s.dampening, s.nesterov,
                                     s.maximize, s.first);
    for (int64_t i = begin; i < end; ++i) {
      sgd_element(t.p + i, unscaled(t.g + i, divisor), t.buf1 ? t.buf1 + i : nullptr,
                  t.comp ? t.comp + i : nullptr, k, s.mode,
                  bits.bits16(static_cast<int>(i - begin)));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    round_kernel(const float *x, uint16_t *out, int64_t n, uint64_t seed, uint32_t position,
                 uint32_t step) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = block * kBlock;
  if (begin >= n) return;
  const int64_t end = begin + kBlock < n ? begin + kBlock : n;
  const Philox bits = block_bits(seed, position, step, static_cast<uint64_t>(block));
  for (int64_t i = begin; i < end; ++i) {
    out[i] = bf16_stochastic(x[i], bits.bits16(static_cast<int>(i - begin)));
  }
}

uint16_t *bf16(const at::Tensor &t) {
  return reinterpret_cast<uint16_t *>(t.data_ptr<at::BFloat16>());
}

void check_like(const char *op, const at::Tensor &t, const at::Tensor &param) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
                  t.device() == param.device() && t.numel() == param.numel(),
              op, ": every tensor must be a contiguous bfloat16 tensor of its parameter's size "
                  "on its device");
}

const float *scalar_ptr(const char *op, const std::optional<at::Tensor> &t,
                        const at::Tensor &param) {
  if (!t) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == param.device(),
              op, ": grad_scale, found_inf and the step counts must be 1-element float32 tensors "
                  "on the parameters' device");
  return t->const_data_ptr<float>();
}

template <bool kAdam>
void launch_all(const char *op, at::TensorList params, at::TensorList grads, at::TensorList b1,
                at::TensorList b2, at::TensorList b3, at::TensorList comps, at::TensorList steps,
                at::IntArrayRef positions, Shared s, const std::optional<at::Tensor> &grad_scale,
                const std::optional<at::Tensor> &found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(s.mode == kNearest || s.mode == kStochastic || s.mode == kKahan, op,
              ": mode must be 0, 1 or 2, not ", s.mode);
  TORCH_CHECK(grads.size() == n && positions.size() == n &&
                  comps.size() == (s.mode == kKahan ? n : 0) &&
                  (steps.empty() || steps.size() == n) && (b1.empty() || b1.size() == n) &&
                  (b2.empty() || b2.size() == n) && (b3.empty() || b3.size() == n),
              op, ": tensor lists of different lengths");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  s.grad_scale = scalar_ptr(op, grad_scale, params[0]);
  s.found_inf = scalar_ptr(op, found_inf, params[0]);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i];
    TORCH_CHECK(p.is_cuda() && p.device() == params[0].device(), op,
                ": this is the CUDA kernel, for parameters on one device");
    check_like(op, p, p);
    check_like(op, grads[i], p);
    for (at::TensorList l : {b1, b2, b3, comps}) {
      if (!l.empty()) check_like(op, l[i], p);
    }
    TORCH_CHECK(positions[i] >= 0 && positions[i] <= UINT32_MAX, op,
                ": positions must be in [0, 2^32)");
    Tensors t{bf16(p),
              bf16(grads[i]),
              b1.empty() ? nullptr : bf16(b1[i]),
              b2.empty() ? nullptr : bf16(b2[i]),
              b3.empty() ? nullptr : bf16(b3[i]),
              comps.empty() ? nullptr : bf16(comps[i]),
              steps.empty() ? nullptr : scalar_ptr(op, steps[i], p),
              p.numel(),
              static_cast<uint32_t>(positions[i])};
    if (t.n == 0) continue;
    const int64_t blocks = (t.n + kBlock - 1) / kBlock;
    const int64_t grid = (blocks + kThreads - 1) / kThreads;
    TORCH_CHECK(grid <= INT32_MAX, op, ": tensor too large");
    step_kernel<kAdam><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(t, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adamw_rounded_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList kahan_comps, at::TensorList state_steps,
                        at::IntArrayRef positions, double lr, double beta1, double beta2,
                        double weight_decay, double eps, bool maximize, int64_t mode,
                        int64_t seed, const std::optional<at::Tensor> &grad_scale,
                        const std::optional<at::Tensor> &found_inf) {
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
                  state_steps.size() == params.size(),
              "adamw_rounded_: one exp_avg, exp_avg_sq and step per parameter");
  Shared s{lr, beta1, beta2, weight_decay, eps, 0.0, 0.0, maximize, false, false, mode,
           static_cast<uint64_t>(seed), nullptr, nullptr};
  launch_all<true>("adamw_rounded_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                   kahan_comps, state_steps, positions, s, grad_scale, found_inf);
}

void sgd_rounded_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      at::TensorList kahan_comps, at::TensorList state_steps,
                      at::IntArrayRef positions, double lr, double weight_decay, double momentum,
                      double dampening, bool nesterov, bool maximize, bool is_first_step,
                      int64_t mode, int64_t seed, const std::optional<at::Tensor> &grad_scale,
                      const std::optional<at::Tensor> &found_inf) {
  TORCH_CHECK(momentum_buffers.size() == (momentum != 0.0 ? params.size() : 0),
              "sgd_rounded_: one momentum buffer per parameter with momentum, none without");
  TORCH_CHECK(state_steps.size() == (mode == kStochastic ? params.size() : 0),
              "sgd_rounded_: one state step per parameter with stochastic rounding, none without");
  Shared s{lr, 0.0, 0.0, weight_decay, 0.0, momentum, dampening, maximize, nesterov,
           is_first_step, mode, static_cast<uint64_t>(seed), nullptr, nullptr};
  launch_all<false>("sgd_rounded_", params, grads, momentum_buffers, {}, {}, kahan_comps,
                    state_steps, positions, s, grad_scale, found_inf);
}

at::Tensor stochastic_round_cuda(const at::Tensor &x, int64_t seed, int64_t position,
                                 int64_t step) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "stochastic_round: x must be float32");
  TORCH_CHECK(position >= 0 && position <= UINT32_MAX && step >= 0 && step <= UINT32_MAX,
              "stochastic_round: position and step must be in [0, 2^32)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
  const int64_t n = src.numel();
  if (n == 0) return out;
  const int64_t grid = ((n + kBlock - 1) / kBlock + kThreads - 1) / kThreads;
  TORCH_CHECK(grid <= INT32_MAX, "stochastic_round: tensor too large");
  round_kernel<<<static_cast<unsigned>(grid), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.const_data_ptr<float>(), bf16(out), n, static_cast<uint64_t>(seed),
      static_cast<uint32_t>(position), static_cast<uint32_t>(step));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tch_fabric, CUDA, m) {
  m.impl("adamw_rounded_", &adamw_rounded_cuda);
  m.impl("sgd_rounded_", &sgd_rounded_cuda);
  m.impl("stochastic_round", &stochastic_round_cuda);
}

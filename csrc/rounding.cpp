// tch_fabric's rounded optimizer steps: AdamW and SGD for bfloat16 parameters whose new value
// is computed in float32 and written back by stochastic rounding or with a Kahan compensation
// buffer, instead of libtorch's round to nearest (which drops every update under half a
// bfloat16 ulp of the weight). The element arithmetic and the random bits are in rounding.h,
// shared with the CUDA kernels (rounding_cuda.cu).
//
// tch_fabric::adamw_rounded_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
//     kahan_comps, state_steps, positions, lr, beta1, beta2, weight_decay, eps, maximize, mode,
//     seed, grad_scale?, found_inf?)
// tch_fabric::sgd_rounded_(params, grads, momentum_buffers, kahan_comps, state_steps,
//     positions, lr, weight_decay, momentum, dampening, nesterov, maximize, is_first_step, mode,
//     seed, grad_scale?, found_inf?)
//   Every tensor a contiguous bfloat16 tensor of its parameter's size (max_exp_avg_sqs empty
//   without AMSGrad, momentum_buffers without momentum, kahan_comps unless mode is Kahan), on
//   the parameters' device; state_steps 0-dim float32 on that device already counting this step
//   (SGD's only with stochastic rounding: the step keys the random bits). positions[i] is the
//   parameter's index in its optimizer, so two parameters never share random bits. With
//   grad_scale the gradients are divided by it and written back (as PyTorch's fused kernels
//   do); a non-zero found_inf skips the whole step. mode: 0 nearest, 1 stochastic, 2 Kahan.
//
// tch_fabric::stochastic_round(x, seed, position, step) -> bfloat16
//   The rounding the steps use, for a float32 tensor: element i gets the random bits of element
//   i of parameter `position` at `step`.
#include "rounding.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

// Every float operation rounded on its own, as the CUDA kernels compute (rounding.h): no
// multiply-adds contracted by the compiler in any of the ISA clones below.
#pragma GCC optimize("fp-contract=off")

namespace {

using namespace tf_rounding;

#define TF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// The tile loops of the two options, one function each so that the mode is a constant and the
// element function (inlined) vectorises; `div` divides the gradients (1 without a scale).
TF_CLONES void adamw_tile_stochastic(uint16_t *__restrict p, const uint16_t *__restrict g,
                                     uint16_t *__restrict m, uint16_t *__restrict v,
                                     const uint32_t *__restrict r, int64_t n, AdamScalars k,
                                     float div) {
  for (int64_t i = 0; i < n; ++i) {
    adamw_element(p + i, bf16_to_f32(g[i]) / div, m + i, v + i, nullptr, nullptr, k,
                  kStochastic, r[i]);
  }
}

TF_CLONES void adamw_tile_kahan(uint16_t *__restrict p, const uint16_t *__restrict g,
                                uint16_t *__restrict m, uint16_t *__restrict v,
                                uint16_t *__restrict c, int64_t n, AdamScalars k, float div) {
  for (int64_t i = 0; i < n; ++i) {
    adamw_element(p + i, bf16_to_f32(g[i]) / div, m + i, v + i, nullptr, c + i, k, kKahan, 0);
  }
}

// SGD's tile loop, with the option and whether there is momentum as constants.
template <int64_t kMode, bool kMomentum>
inline __attribute__((always_inline)) void sgd_tile(uint16_t *__restrict p,
                                                    const uint16_t *__restrict g,
                                                    uint16_t *__restrict b, uint16_t *__restrict c,
                                                    const uint32_t *__restrict r, int64_t n,
                                                    const SgdScalars &k, float div) {
  for (int64_t i = 0; i < n; ++i) {
    sgd_element(p + i, bf16_to_f32(g[i]) / div, kMomentum ? b + i : nullptr,
                kMode == kKahan ? c + i : nullptr, k, kMode, kMode == kStochastic ? r[i] : 0);
  }
}

TF_CLONES void sgd_tile_stochastic(uint16_t *__restrict p, const uint16_t *__restrict g,
                                   uint16_t *__restrict b, const uint32_t *__restrict r,
                                   int64_t n, SgdScalars k, float div) {
  if (b) {
    sgd_tile<kStochastic, true>(p, g, b, nullptr, r, n, k, div);
  } else {
    sgd_tile<kStochastic, false>(p, g, nullptr, nullptr, r, n, k, div);
  }
}

TF_CLONES void sgd_tile_kahan(uint16_t *__restrict p, const uint16_t *__restrict g,
                              uint16_t *__restrict b, uint16_t *__restrict c, int64_t n,
                              SgdScalars k, float div) {
  if (b) {
    sgd_tile<kKahan, true>(p, g, b, c, nullptr, n, k, div);
  } else {
    sgd_tile<kKahan, false>(p, g, nullptr, c, nullptr, n, k, div);
  }
}

// Writes the divided gradients back, after the step read them (PyTorch's fused kernels leave
// them unscaled).
void write_unscaled(uint16_t *g, int64_t n, float div) {
  if (div == 1.f) return;
  for (int64_t i = 0; i < n; ++i) g[i] = bf16_nearest(bf16_to_f32(g[i]) / div);
}

// Philox blocks per tile: the tile's generators run as 8-wide vector code (the rounds are
// written lane by lane over arrays so the compiler vectorises them).
constexpr int64_t kTileBlocks = 8;
constexpr int64_t kTile = kTileBlocks * kBlock;
// Tiles per parallel chunk: the chunking never changes the bits (each element's random bits
// depend on its index only), it only sets how work is shared between threads.
constexpr int64_t kGrainTiles = 256;

struct Key {
  uint64_t seed;
  uint32_t position, step;
};

// The 16 random bits of every element of tile `tile`: rounding.h's generator (the CUDA kernels'
// too), inlined, its 10 rounds unrolled so that the loop over the tile's blocks vectorises.
TF_CLONES void tile_bits(const Key &key, int64_t tile, uint32_t *__restrict out) {
  uint32_t v[4][kTileBlocks];
  for (int64_t b = 0; b < kTileBlocks; ++b) {
    const Philox ph = block_bits(key.seed, key.position, key.step,
                                 static_cast<uint64_t>(tile * kTileBlocks + b));
    for (int w = 0; w < 4; ++w) v[w][b] = ph.v[w];
  }
  for (int64_t b = 0; b < kTileBlocks; ++b) {
    for (int j = 0; j < kBlock; ++j) out[b * kBlock + j] = (v[j >> 1][b] >> ((j & 1) * 16)) & 0xFFFFu;
  }
}

// The element range [begin, end) of one tensor, whole tiles apart from the ends.
template <typename Body>
void for_tiles(int64_t n, const Key &key, bool random, Body body) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    uint32_t bits[kTile] = {};
    for (int64_t t = t0; t < t1; ++t) {
      if (random) tile_bits(key, t, bits);
      const int64_t begin = t * kTile, end = std::min(n, begin + kTile);
      body(begin, end, bits);
    }
  });
}

uint16_t *bf16_ptr(const at::Tensor &t) {
  return reinterpret_cast<uint16_t *>(t.data_ptr<at::BFloat16>());
}

void check_like(const char *op, const char *what, const at::Tensor &t, const at::Tensor &param) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
                  t.device() == param.device() && t.numel() == param.numel(),
              op, ": every ", what,
              " must be a contiguous bfloat16 tensor of its parameter's size on its device");
}

void check_scalar(const char *op, const char *what, const at::Tensor &t, const at::Tensor &param) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == param.device(),
              op, ": ", what, " must be a 1-element float32 tensor on the parameters' device");
}

// Checks shared by both ops; returns the divisor of the gradients (1 without grad_scale), or
// nullopt when found_inf says to skip the step.
std::optional<float> check_common(const char *op, at::TensorList params, at::TensorList grads,
                                  at::TensorList comps, at::TensorList steps,
                                  at::IntArrayRef positions, int64_t mode, bool steps_needed,
                                  const std::optional<at::Tensor> &grad_scale,
                                  const std::optional<at::Tensor> &found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(mode == kNearest || mode == kStochastic || mode == kKahan, op,
              ": mode must be 0 (nearest), 1 (stochastic) or 2 (Kahan), not ", mode);
  TORCH_CHECK(grads.size() == n && positions.size() == n, op,
              ": params, grads and positions must have the same length");
  TORCH_CHECK(comps.size() == (mode == kKahan ? n : 0), op,
              ": one Kahan buffer per parameter in mode 2, none otherwise");
  TORCH_CHECK(steps.size() == (steps_needed ? n : 0), op,
              ": one state step per parameter where the step needs it, none otherwise");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), op, ": this is the CPU kernel");
    check_like(op, "parameter", params[i], params[i]);
    check_like(op, "gradient", grads[i], params[i]);
    if (mode == kKahan) check_like(op, "Kahan buffer", comps[i], params[i]);
    if (steps_needed) check_scalar(op, "every state step", steps[i], params[i]);
    TORCH_CHECK(positions[i] >= 0 && positions[i] <= UINT32_MAX, op,
                ": positions must be in [0, 2^32)");
  }
  if (found_inf) {
    TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat &&
                    found_inf->device().is_cpu(),
                op, ": found_inf must be a 1-element float32 CPU tensor");
    if (*found_inf->const_data_ptr<float>() != 0.f) return std::nullopt;
  }
  if (grad_scale) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat &&
                    grad_scale->device().is_cpu(),
                op, ": grad_scale must be a 1-element float32 CPU tensor");
    return *grad_scale->const_data_ptr<float>();
  }
  return 1.f;
}

// The step count as the generator's counter word (checked to fit: a float32 count is exact to
// 2^24 anyway).
uint32_t step_word(const char *op, const at::Tensor &step) {
  const float s = *step.const_data_ptr<float>();
  TORCH_CHECK(s >= 0.f && s < 4294967296.f, op, ": the step count must be in [0, 2^32), not ", s);
  return static_cast<uint32_t>(s);
}

void adamw_rounded_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                       at::TensorList kahan_comps, at::TensorList state_steps,
                       at::IntArrayRef positions, double lr, double beta1, double beta2,
                       double weight_decay, double eps, bool maximize, int64_t mode, int64_t seed,
                       const std::optional<at::Tensor> &grad_scale,
                       const std::optional<at::Tensor> &found_inf) {
  const char *op = "adamw_rounded_";
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
              ": one exp_avg and exp_avg_sq per parameter");
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, op,
              ": max_exp_avg_sqs: one per parameter with AMSGrad, none without");
  for (size_t i = 0; i < n; ++i) {
    check_like(op, "exp_avg", exp_avgs[i], params[i]);
    check_like(op, "exp_avg_sq", exp_avg_sqs[i], params[i]);
    if (!max_exp_avg_sqs.empty()) check_like(op, "max_exp_avg_sq", max_exp_avg_sqs[i], params[i]);
  }
  const auto divisor = check_common(op, params, grads, kahan_comps, state_steps, positions, mode,
                                    true, grad_scale, found_inf);
  if (!divisor) return;
  for (size_t t = 0; t < n; ++t) {
    const uint32_t step = step_word(op, state_steps[t]);
    const AdamScalars k = adam_scalars(lr, beta1, beta2, weight_decay, eps, maximize, step);
    uint16_t *p = bf16_ptr(params[t]), *g = bf16_ptr(grads[t]), *m = bf16_ptr(exp_avgs[t]),
             *v = bf16_ptr(exp_avg_sqs[t]);
    uint16_t *mv = max_exp_avg_sqs.empty() ? nullptr : bf16_ptr(max_exp_avg_sqs[t]);
    uint16_t *c = mode == kKahan ? bf16_ptr(kahan_comps[t]) : nullptr;
    const Key key{static_cast<uint64_t>(seed), static_cast<uint32_t>(positions[t]), step};
    const float div = *divisor;
    for_tiles(params[t].numel(), key, mode == kStochastic,
              [&](int64_t begin, int64_t end, const uint32_t *bits) {
                const int64_t len = end - begin;
                if (mode == kStochastic && !mv) {
                  adamw_tile_stochastic(p + begin, g + begin, m + begin, v + begin, bits, len, k,
                                        div);
                } else if (mode == kKahan && !mv) {
                  adamw_tile_kahan(p + begin, g + begin, m + begin, v + begin, c + begin, len, k,
                                   div);
                } else {  // AMSGrad, or round to nearest (the op's mode 0, for tests)
                  for (int64_t i = begin; i < end; ++i) {
                    adamw_element(p + i, bf16_to_f32(g[i]) / div, m + i, v + i,
                                  mv ? mv + i : nullptr, c ? c + i : nullptr, k, mode,
                                  bits[i - begin]);
                  }
                }
                write_unscaled(g + begin, len, div);
              });
  }
}

void sgd_rounded_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList kahan_comps, at::TensorList state_steps,
                     at::IntArrayRef positions, double lr, double weight_decay, double momentum,
                     double dampening, bool nesterov, bool maximize, bool is_first_step,
                     int64_t mode, int64_t seed, const std::optional<at::Tensor> &grad_scale,
                     const std::optional<at::Tensor> &found_inf) {
  const char *op = "sgd_rounded_";
  const size_t n = params.size();
  TORCH_CHECK(momentum_buffers.size() == (momentum != 0.0 ? n : 0), op,
              ": one momentum buffer per parameter with momentum, none without");
  for (size_t i = 0; i < momentum_buffers.size(); ++i) {
    check_like(op, "momentum buffer", momentum_buffers[i], params[i]);
  }
  const auto divisor = check_common(op, params, grads, kahan_comps, state_steps, positions, mode,
                                    mode == kStochastic, grad_scale, found_inf);
  if (!divisor) return;
  const SgdScalars k =
      sgd_scalars(lr, weight_decay, momentum, dampening, nesterov, maximize, is_first_step);
  for (size_t t = 0; t < n; ++t) {
    const uint32_t step = mode == kStochastic ? step_word(op, state_steps[t]) : 0;
    uint16_t *p = bf16_ptr(params[t]), *g = bf16_ptr(grads[t]);
    uint16_t *b = momentum_buffers.empty() ? nullptr : bf16_ptr(momentum_buffers[t]);
    uint16_t *c = mode == kKahan ? bf16_ptr(kahan_comps[t]) : nullptr;
    const Key key{static_cast<uint64_t>(seed), static_cast<uint32_t>(positions[t]), step};
    const float div = *divisor;
    for_tiles(params[t].numel(), key, mode == kStochastic,
              [&](int64_t begin, int64_t end, const uint32_t *bits) {
                const int64_t len = end - begin;
                uint16_t *bb = b ? b + begin : nullptr;
                if (mode == kStochastic) {
                  sgd_tile_stochastic(p + begin, g + begin, bb, bits, len, k, div);
                } else if (mode == kKahan) {
                  sgd_tile_kahan(p + begin, g + begin, bb, c + begin, len, k, div);
                } else {  // round to nearest (the op's mode 0, for tests)
                  for (int64_t i = begin; i < end; ++i) {
                    sgd_element(p + i, bf16_to_f32(g[i]) / div, b ? b + i : nullptr, nullptr, k,
                                mode, 0);
                  }
                }
                write_unscaled(g + begin, len, div);
              });
  }
}

at::Tensor stochastic_round_cpu(const at::Tensor &x, int64_t seed, int64_t position,
                                int64_t step) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "stochastic_round: x must be float32");
  TORCH_CHECK(position >= 0 && position <= UINT32_MAX && step >= 0 && step <= UINT32_MAX,
              "stochastic_round: position and step must be in [0, 2^32)");
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
  const float *in = src.const_data_ptr<float>();
  uint16_t *o = bf16_ptr(out);
  const Key key{static_cast<uint64_t>(seed), static_cast<uint32_t>(position),
                static_cast<uint32_t>(step)};
  for_tiles(src.numel(), key, true, [&](int64_t begin, int64_t end, const uint32_t *bits) {
    for (int64_t i = begin; i < end; ++i) o[i] = bf16_stochastic(in[i], bits[i - begin]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tch_fabric, m) {
  m.def(
      "adamw_rounded_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] kahan_comps, "
      "Tensor[] state_steps, int[] positions, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool maximize, int mode, int seed, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  m.def(
      "sgd_rounded_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] kahan_comps, Tensor[] state_steps, int[] positions, float lr, "
      "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool is_first_step, int mode, int seed, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("stochastic_round(Tensor x, int seed, int position, int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(tch_fabric, CPU, m) {
  m.impl("adamw_rounded_", &adamw_rounded_cpu);
  m.impl("sgd_rounded_", &sgd_rounded_cpu);
  m.impl("stochastic_round", &stochastic_round_cpu);
}

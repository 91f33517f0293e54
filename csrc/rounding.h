// The arithmetic that the rounded optimizer steps share between their CPU kernels
// (csrc/rounding.cpp) and CUDA kernels (csrc/rounding_cuda.cu): one definition, so both
// devices compute the same bits.
//
// - Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
//   generator PyTorch's CUDA RNG uses): a counter-based generator, so the random bits of an
//   element are a pure function of (seed, parameter position, step, element index), the same
//   for any thread count or launch shape and again after a resume.
// - float32 -> bfloat16 rounding: to nearest even (c10's rule, NaN -> 0x7FC0) and stochastic
//   (round away from zero with probability equal to the dropped fraction of a bfloat16 ulp).
// - One element of AdamW and of SGD in float32, written back in the parameter's storage with
//   the chosen rounding, optionally with a Kahan compensation buffer.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernel's tile loops vectorise only with the element function inside.
#define TF_HD inline __attribute__((always_inline))
#endif

namespace tf_rounding {

// Float arithmetic that no compiler fuses into multiply-adds, so that both devices round every
// operation alike: nvcc contracts a * b + c by default (its intrinsics below are never
// contracted); rounding.cpp is compiled with contraction off.
#if defined(__CUDA_ARCH__)
TF_HD float mul(float a, float b) { return __fmul_rn(a, b); }
TF_HD float add(float a, float b) { return __fadd_rn(a, b); }
TF_HD float sub(float a, float b) { return __fsub_rn(a, b); }
#else
TF_HD float mul(float a, float b) { return a * b; }
TF_HD float add(float a, float b) { return a + b; }
TF_HD float sub(float a, float b) { return a - b; }
#endif

// How a parameter's new float32 value is written back to bfloat16 (the `mode` argument of the
// ops).
enum Mode : int64_t { kNearest = 0, kStochastic = 1, kKahan = 2 };

// Elements that share one Philox call: 4 x 32 random bits, 16 per element.
constexpr int64_t kBlock = 8;

TF_HD constexpr uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox 4x32 with 10 rounds, as Random123 defines it; its known-answer vectors are checked at
// compile time below, by both compilers.
struct Philox {
  uint32_t v[4] = {0, 0, 0, 0};
  TF_HD constexpr Philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    uint32_t c[4] = {c0, c1, c2, c3};
#if defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
    for (int round = 0; round < 10; ++round) {
      uint32_t hi0 = 0, hi1 = 0;
      const uint32_t lo0 = mulhilo(0xD2511F53u, c[0], &hi0);
      const uint32_t lo1 = mulhilo(0xCD9E8D57u, c[2], &hi1);
      const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
      c[0] = n0;
      c[1] = lo1;
      c[2] = n2;
      c[3] = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int i = 0; i < 4; ++i) v[i] = c[i];
  }
  // The 16 random bits of element j (0..7) of the block.
  TF_HD uint32_t bits16(int j) const { return (v[j >> 1] >> ((j & 1) * 16)) & 0xFFFFu; }
};

static_assert(Philox(0, 0, 0, 0, 0, 0).v[0] == 0x6627e8d5u &&
                  Philox(0, 0, 0, 0, 0, 0).v[3] == 0x9b00dbd8u,
              "Philox 4x32-10 known-answer vector (zero counter and key)");
static_assert(Philox(~0u, ~0u, ~0u, ~0u, ~0u, ~0u).v[1] == 0x41c83b0eu &&
                  Philox(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u,
                         0x299f31d0u)
                          .v[2] == 0x5001e420u,
              "Philox 4x32-10 known-answer vectors (all-ones; the digits of pi)");

// The generator of one block of kBlock elements: counter (block index low, high, step,
// parameter position), key (seed low, high).
TF_HD Philox block_bits(uint64_t seed, uint32_t position, uint32_t step, uint64_t block) {
  return Philox(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), step, position,
                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

TF_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

TF_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

TF_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

TF_HD bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// c10::BFloat16's conversion: round to nearest, ties to even; every NaN becomes 0x7FC0.
TF_HD uint16_t bf16_nearest(float f) {
  const uint32_t u = f32_bits(f);
  if (is_nan_bits(u)) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Stochastic rounding with 16 random bits r: adding r below the kept bits carries into them
// with probability (dropped bits) / 2^16, so the result is the bfloat16 value below x in
// magnitude or the one above it, unbiased. Exact bfloat16 values (zeros, infinities included)
// never move; a value past the largest finite bfloat16 rounds to it or to infinity, as round to
// nearest would for its upper half; NaN stays NaN (0x7FC0, as bf16_nearest).
TF_HD uint16_t bf16_stochastic(float f, uint32_t r) {
  const uint32_t u = f32_bits(f);
  if (is_nan_bits(u)) return 0x7FC0u;
  return static_cast<uint16_t>((u + r) >> 16);
}

// The scalars of one parameter's AdamW step, computed once per tensor in double as PyTorch's
// fused kernel does, then used in float32.
struct AdamScalars {
  float decay;  // 1 - lr * weight_decay
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps, sign;  // sign: -1 with maximize
};

// AdamW's scalars for one parameter at `step` (counting this step).
TF_HD AdamScalars adam_scalars(double lr, double beta1, double beta2, double weight_decay,
                               double eps, bool maximize, double step) {
  AdamScalars k;
  k.decay = static_cast<float>(1.0 - lr * weight_decay);
  k.beta1 = static_cast<float>(beta1);
  k.beta2 = static_cast<float>(beta2);
  k.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  k.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  k.step_size = static_cast<float>(lr / (1.0 - ::pow(beta1, step)));
  k.bc2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(beta2, step)));
  k.eps = static_cast<float>(eps);
  k.sign = maximize ? -1.f : 1.f;
  return k;
}

// Writes `target` (the parameter's new float32 value) back to bfloat16 storage `*p`, whose old
// value is `old`. Kahan: the compensation `*c` holds what earlier roundings dropped; it is added
// to this update and what this rounding drops is kept in it again.
TF_HD void write_back(uint16_t *p, uint16_t *c, float old, float target, int64_t mode,
                      uint32_t r) {
  if (mode == kStochastic) {
    *p = bf16_stochastic(target, r);
  } else if (mode == kKahan) {
    const float y = add(sub(target, old), bf16_to_f32(*c));
    const uint16_t t = bf16_nearest(add(old, y));
    *c = bf16_nearest(sub(y, sub(bf16_to_f32(t), old)));
    *p = t;
  } else {
    *p = bf16_nearest(target);
  }
}

// One element of AdamW in float32 (the formula of tch_fabric's adamw_folded_ and PyTorch's
// fused CPU kernel); moments stored to nearest even in bfloat16, the parameter by `mode`.
// `max_v` is null without AMSGrad.
TF_HD void adamw_element(uint16_t *p, float g, uint16_t *m, uint16_t *v, uint16_t *max_v,
                         uint16_t *c, const AdamScalars &k, int64_t mode, uint32_t r) {
  g = mul(g, k.sign);
  const float old = bf16_to_f32(*p);
  const float decayed = mul(old, k.decay);
  const float mi = add(mul(bf16_to_f32(*m), k.beta1), mul(g, k.one_minus_beta1));
  const float vi = add(mul(bf16_to_f32(*v), k.beta2), mul(mul(g, g), k.one_minus_beta2));
  float vd = vi;
  if (max_v) {
    const float mv = bf16_to_f32(*max_v);
    vd = mv > vi ? mv : vi;
    *max_v = bf16_nearest(vd);
  }
  const float denom = add(std::sqrt(vd) / k.bc2_sqrt, k.eps);
  write_back(p, c, old, sub(decayed, mul(k.step_size, mi) / denom), mode, r);
  *m = bf16_nearest(mi);
  *v = bf16_nearest(vi);
}

struct SgdScalars {
  float lr, weight_decay, momentum, one_minus_dampening, sign;
  bool nesterov, first;
};

TF_HD SgdScalars sgd_scalars(double lr, double weight_decay, double momentum, double dampening,
                             bool nesterov, bool maximize, bool first) {
  SgdScalars k;
  k.lr = static_cast<float>(lr);
  k.weight_decay = static_cast<float>(weight_decay);
  k.momentum = static_cast<float>(momentum);
  k.one_minus_dampening = static_cast<float>(1.0 - dampening);
  k.sign = maximize ? -1.f : 1.f;
  k.nesterov = nesterov;
  k.first = first;
  return k;
}

// One element of SGD in float32 (PyTorch's fused SGD formula); the momentum buffer stored to
// nearest even in bfloat16, the parameter by `mode`. `buf` is null without momentum.
TF_HD void sgd_element(uint16_t *p, float g, uint16_t *buf, uint16_t *c, const SgdScalars &k,
                       int64_t mode, uint32_t r) {
  g = mul(g, k.sign);
  const float old = bf16_to_f32(*p);
  if (k.weight_decay != 0.f) g = add(g, mul(old, k.weight_decay));
  if (buf) {
    const float b =
        k.first ? g : add(mul(bf16_to_f32(*buf), k.momentum), mul(k.one_minus_dampening, g));
    *buf = bf16_nearest(b);
    g = k.nesterov ? add(g, mul(b, k.momentum)) : b;
  }
  write_back(p, c, old, sub(old, mul(k.lr, g)), mode, r);
}

}  // namespace tf_rounding

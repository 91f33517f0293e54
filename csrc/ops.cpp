// tch-fabric's custom op, registered with libtorch's dispatcher under the `tch_fabric`
// namespace. The same objects are linked into the Rust crate (a whole-archive static library,
// so the registration runs in every binary that links it) and into a shared library that Python
// loads with torch.ops.load_library (build.rs).
//
// tch_fabric::unscale_sumsq_(grads, found_inf, inv_scale, unscale) -> sumsq
//   One read pass over a list of gradients (float32, float16, bfloat16, mixed):
//   - found_inf is set to 1 if any element is inf/NaN (checked on the original value, before
//     the multiply, as _amp_foreach_non_finite_check_and_unscale_ does); never reset to 0;
//   - with unscale, each element becomes (inv_scale == 1 ? v : v * inv_scale) computed in
//     float32 and rounded to the storage dtype (to nearest even): the native kernel's exact
//     bits, subnormals included. NaNs stay NaNs; their bits are those of the native kernel's
//     vectorised loop (float16 and float32 keep sign and payload; bfloat16 NaNs become 0xFFFF,
//     as the native vectorised loop writes them; its scalar tail writes 0x7FC0 instead);
//   - returns the float32 sum of squares: with unscale, of the stored (rounded) values; without
//     it, the gradients are left alone and the sum is over the unscaled values
//     float(v) * inv_scale in float32, not rounded to the storage dtype, so a fused optimiser can
//     divide by scale / clip_coef later without an in-place unscale pass.
//   The sum is deterministic, run to run and whatever the thread count: each fixed chunk of
//   kChunk elements is summed in 32 float32 lanes (element i of the chunk into lane i % 32, with
//   a fused multiply-add) reduced by a fixed tree, and the chunks are added in order in double.
//   The scalar, AVX2 and AVX-512 paths give the same bits, so the sum does not depend on the
//   x86 CPU either. TCH_FABRIC_OPS_ISA=scalar|avx2|avx512 forces a path (for tests).
//   The SIMD paths (raw intrinsics in functions compiled for their target, picked at run time)
//   mostly check for inf/NaN through the chunk sums: see pick(). at::parallel_for needs the
//   file compiled with -fopenmp (build.rs), else it runs on one thread.
//
// tch_fabric::clip_divisor(sumsq, scale, max_norm) -> (norm, divisor)
//   The global norm sqrt(sumsq), and PyTorch's clip coefficient from it folded with the loss
//   scale into one divisor that stays on the device: scale / min(max_norm / (norm + 1e-6), 1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define TCH_FABRIC_X86 1
#include <immintrin.h>
#endif

namespace {

// Elements per partial sum. A multiple of kLanes; the chunking never depends on the threads.
constexpr int64_t kChunk = 1 << 14;
constexpr int kLanes = 32;

enum class Dtype : uint8_t { F32, BF16, F16, F64 };
enum class Isa { Scalar, Avx2, Avx512 };

struct ChunkResult {
  float sum;
  bool bad;
};

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The fixed reduction of the 32 lanes: L[j] += L[j + w] for w = 16, 8, 4, 2, 1.
inline float reduce_lanes(float *l) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) l[j] = l[j] + l[j + w];
  return l[0];
}

// ---------------------------------------------------------------------------------------------
// Scalar path (any CPU): the reference the SIMD paths reproduce bit for bit.

// float16 <-> float32 as the F16C instructions (and the native vectorised loop) do them: exact
// for every finite value, round to nearest even; NaNs keep sign and payload (quietened).
inline float half_to_float(uint16_t h) {
  if ((h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0)
    return u2f((uint32_t(h & 0x8000) << 16) | 0x7FC00000u | (uint32_t(h & 0x03FF) << 13));
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}
inline uint16_t float_to_half(float f) {
  if (std::isnan(f)) {
    const uint32_t u = f2u(f);
    return uint16_t(((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF));
  }
  return c10::Half(f).x;
}
// bfloat16: c10::BFloat16's round to nearest even; NaN becomes 0xFFFF like the native loop.
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0xFFFF;
  const uint32_t u = f2u(f);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

template <Dtype D>
struct Scalar;
template <>
struct Scalar<Dtype::F32> {
  using T = float;
  static bool bad(float v) { return (f2u(v) & 0x7FFFFFFFu) >= 0x7F800000u; }
  static float load(float v) { return v; }
  static float round(float u, float *out) { return *out = u; }
};
template <>
struct Scalar<Dtype::BF16> {
  using T = uint16_t;
  static bool bad(uint16_t b) { return (b & 0x7FFF) >= 0x7F80; }
  static float load(uint16_t b) { return u2f(uint32_t(b) << 16); }
  static float round(float u, uint16_t *out) {
    *out = float_to_bf16(u);
    return u2f(uint32_t(*out) << 16);
  }
};
template <>
struct Scalar<Dtype::F16> {
  using T = uint16_t;
  static bool bad(uint16_t h) { return (h & 0x7FFF) >= 0x7C00; }
  static float load(uint16_t h) { return half_to_float(h); }
  static float round(float u, uint16_t *out) {
    *out = float_to_half(u);
    return half_to_float(*out);
  }
};

template <Dtype D, bool Store, bool Mul>
ChunkResult chunk_scalar(void *data, int64_t n, float inv) {
  using S = Scalar<D>;
  auto *p = static_cast<typename S::T *>(data);
  float lanes[kLanes] = {};
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= S::bad(p[i]);
    const float v = S::load(p[i]);
    float u = Mul ? v * inv : v;
    if (Store) u = S::round(u, &p[i]);
    lanes[i % kLanes] = std::fma(u, u, lanes[i % kLanes]);
  }
  return {reduce_lanes(lanes), bad};
}

// float64 gradients (not a mixed-precision dtype; kept for completeness): the native kernel's
// double arithmetic, squares summed in float32 like the rest.
template <bool Store, bool Mul>
ChunkResult chunk_f64(void *data, int64_t n, float inv) {
  auto *p = static_cast<double *>(data);
  float lanes[kLanes] = {};
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= !std::isfinite(p[i]);
    double u = Mul ? p[i] * double(inv) : p[i];
    if (Store) p[i] = u;
    const float f = static_cast<float>(u);
    lanes[i % kLanes] = std::fma(f, f, lanes[i % kLanes]);
  }
  return {reduce_lanes(lanes), bad};
}

// Whether any of n elements is inf/NaN. The SIMD paths skip the per-element check where they can
// (see pick) and call this only for a chunk whose sum of squares is not finite, which it must be
// when an element is inf/NaN: with a finite inv_scale, an inf/NaN element gives an inf/NaN
// value squared into the sum.
template <Dtype D>
bool scan_bad(const void *data, int64_t n) {
  using S = Scalar<D>;
  const auto *p = static_cast<const typename S::T *>(data);
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= S::bad(p[i]);
  return bad;
}

#ifdef TCH_FABRIC_X86
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: 32 elements per step in four 8-lane accumulators (elements 0-7, 8-15,
// 16-23, 24-31), so lane j of the 32 is the same as in the scalar path.
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

struct Avx2State {
  __m256 acc[4];
  __m256i mx;  // running max of |bits|, for the inf/NaN check
};

AVX2_INLINE float avx2_reduce(const Avx2State &s) {
  const __m256 b0 = _mm256_add_ps(s.acc[0], s.acc[2]);  // L[j] + L[j+16], j < 8
  const __m256 b1 = _mm256_add_ps(s.acc[1], s.acc[3]);  // L[8+j] + L[24+j]
  const __m256 c = _mm256_add_ps(b0, b1);               // w = 8
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));  // w = 4
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                          // w = 2
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));                                      // w = 1
  return _mm_cvtss_f32(x);
}

// bfloat16 round to nearest even of 8 floats: the 16 bits are the high half of each 32-bit
// result (the low half is garbage). NaN becomes 0xFFFF.
AVX2_INLINE __m256i avx2_bf16_round(__m256 u) {
  const __m256i b = _mm256_castps_si256(u);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256 nan = _mm256_cmp_ps(u, u, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(-1), _mm256_castps_si256(nan));
}

template <Dtype D, bool Store, bool Mul, bool Track>
AVX2_INLINE void avx2_step(void *q, Avx2State &s, __m256 vinv) {
  __m256 u[4];
  if constexpr (D == Dtype::F32) {
    float *p = static_cast<float *>(q);
    const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF);
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(p + 8 * k);
      if (Track) s.mx = _mm256_max_epu32(s.mx, _mm256_and_si256(_mm256_castps_si256(v), abs));
      u[k] = Mul ? _mm256_mul_ps(v, vinv) : v;
      if (Store) _mm256_storeu_ps(p + 8 * k, u[k]);
    }
  } else {
    uint16_t *p = static_cast<uint16_t *>(q);
    const __m256i abs = _mm256_set1_epi16(0x7FFF);
    const __m256i raw[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 16))};
    for (int k = 0; k < 2; ++k) {
      if (Track) s.mx = _mm256_max_epu16(s.mx, _mm256_and_si256(raw[k], abs));
      const __m128i h[2] = {_mm256_castsi256_si128(raw[k]), _mm256_extracti128_si256(raw[k], 1)};
      for (int j = 0; j < 2; ++j) {
        __m256 v;
        if constexpr (D == Dtype::BF16)
          v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h[j]), 16));
        else
          v = _mm256_cvtph_ps(h[j]);
        u[2 * k + j] = Mul ? _mm256_mul_ps(v, vinv) : v;
      }
      if (Store) {
        if constexpr (D == Dtype::BF16) {
          const __m256i r0 = avx2_bf16_round(u[2 * k]);
          const __m256i r1 = avx2_bf16_round(u[2 * k + 1]);
          const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
          u[2 * k] = _mm256_castsi256_ps(_mm256_and_si256(r0, hi));
          u[2 * k + 1] = _mm256_castsi256_ps(_mm256_and_si256(r1, hi));
          const __m256i packed = _mm256_permute4x64_epi64(
              _mm256_packus_epi32(_mm256_srli_epi32(r0, 16), _mm256_srli_epi32(r1, 16)), 0xD8);
          _mm256_storeu_si256(reinterpret_cast<__m256i *>(p + 16 * k), packed);
        } else {
          const __m128i o0 = _mm256_cvtps_ph(u[2 * k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m128i o1 =
              _mm256_cvtps_ph(u[2 * k + 1], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          u[2 * k] = _mm256_cvtph_ps(o0);
          u[2 * k + 1] = _mm256_cvtph_ps(o1);
          _mm256_storeu_si256(reinterpret_cast<__m256i *>(p + 16 * k), _mm256_set_m128i(o1, o0));
        }
      }
    }
  }
  for (int k = 0; k < 4; ++k) s.acc[k] = _mm256_fmadd_ps(u[k], u[k], s.acc[k]);
}

template <Dtype D, bool Store, bool Mul, bool Track>
AVX2_TARGET ChunkResult chunk_avx2(void *data, int64_t n, float inv) {
  constexpr int64_t esz = D == Dtype::F32 ? 4 : 2;
  char *p = static_cast<char *>(data);
  Avx2State s;
  for (auto &a : s.acc) a = _mm256_setzero_ps();
  s.mx = _mm256_setzero_si256();
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) avx2_step<D, Store, Mul, Track>(p + i * esz, s, vinv);
  if (i < n) {  // the tail, zero-padded: zeros add nothing to the lanes
    alignas(32) char buf[kLanes * 4] = {};
    std::memcpy(buf, p + i * esz, (n - i) * esz);
    avx2_step<D, Store, Mul, Track>(buf, s, vinv);
    if (Store) std::memcpy(p + i * esz, buf, (n - i) * esz);
  }
  const float sum = avx2_reduce(s);
  if (!Track) return {sum, std::isfinite(sum) ? false : scan_bad<D>(data, n)};
  bool bad;
  if constexpr (D == Dtype::F32) {
    // max < 0x7F800000 <=> max(max, 0x7F7FFFFF) == 0x7F7FFFFF
    const __m256i lim = _mm256_set1_epi32(0x7F7FFFFF);
    bad = _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(s.mx, lim), lim)) != -1;
  } else {
    const __m256i lim = _mm256_set1_epi16(D == Dtype::BF16 ? 0x7F7F : 0x7BFF);
    bad = _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_max_epu16(s.mx, lim), lim)) != -1;
  }
  return {sum, bad};
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL): 32 elements per step in two 16-lane accumulators, same lanes again.
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), always_inline)) inline

struct Avx512State {
  __m512 acc[2];
  __m512i mx;
};

AVX512_INLINE float avx512_reduce(const Avx512State &s) {
  const __m512 a = _mm512_add_ps(s.acc[0], s.acc[1]);  // w = 16
  const __m256 c = _mm256_add_ps(_mm512_castps512_ps256(a),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// As avx2_bf16_round: the bfloat16 bits in the high half of each 32-bit lane.
AVX512_INLINE __m512i avx512_bf16_round(__m512 u) {
  const __m512i b = _mm512_castps_si512(u);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(-1));
}

template <Dtype D, bool Store, bool Mul, bool Track>
AVX512_INLINE void avx512_step(void *q, Avx512State &s, __m512 vinv) {
  __m512 u[2];
  if constexpr (D == Dtype::F32) {
    float *p = static_cast<float *>(q);
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF);
    for (int k = 0; k < 2; ++k) {
      const __m512 v = _mm512_loadu_ps(p + 16 * k);
      if (Track) s.mx = _mm512_max_epu32(s.mx, _mm512_and_si512(_mm512_castps_si512(v), abs));
      u[k] = Mul ? _mm512_mul_ps(v, vinv) : v;
      if (Store) _mm512_storeu_ps(p + 16 * k, u[k]);
    }
  } else {
    uint16_t *p = static_cast<uint16_t *>(q);
    __m256i h[2];
    if (Track) {
      const __m512i raw = _mm512_loadu_si512(p);
      s.mx = _mm512_max_epu16(s.mx, _mm512_and_si512(raw, _mm512_set1_epi16(0x7FFF)));
      h[0] = _mm512_castsi512_si256(raw);
      h[1] = _mm512_extracti64x4_epi64(raw, 1);
    } else {
      h[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
      h[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 16));
    }
    for (int k = 0; k < 2; ++k) {
      __m512 v;
      if constexpr (D == Dtype::BF16)
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h[k]), 16));
      else
        v = _mm512_cvtph_ps(h[k]);
      u[k] = Mul ? _mm512_mul_ps(v, vinv) : v;
    }
    if (Store) {
      if constexpr (D == Dtype::BF16) {
        const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
        const __m512i r0 = avx512_bf16_round(u[0]), r1 = avx512_bf16_round(u[1]);
        u[0] = _mm512_castsi512_ps(_mm512_and_si512(r0, hi));
        u[1] = _mm512_castsi512_ps(_mm512_and_si512(r1, hi));
        // The high 16 bits of the 32 lanes of r0 then r1: words 1, 3, ..., 63.
        const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                             31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        _mm512_storeu_si512(p, _mm512_permutex2var_epi16(r0, odd, r1));
      } else {
        for (int k = 0; k < 2; ++k) {
          const __m256i o = _mm512_cvtps_ph(u[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          u[k] = _mm512_cvtph_ps(o);
          _mm256_storeu_si256(reinterpret_cast<__m256i *>(p + 16 * k), o);
        }
      }
    }
  }
  for (int k = 0; k < 2; ++k) s.acc[k] = _mm512_fmadd_ps(u[k], u[k], s.acc[k]);
}

template <Dtype D, bool Store, bool Mul, bool Track>
AVX512_TARGET ChunkResult chunk_avx512(void *data, int64_t n, float inv) {
  constexpr int64_t esz = D == Dtype::F32 ? 4 : 2;
  char *p = static_cast<char *>(data);
  Avx512State s;
  for (auto &a : s.acc) a = _mm512_setzero_ps();
  s.mx = _mm512_setzero_si512();
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) avx512_step<D, Store, Mul, Track>(p + i * esz, s, vinv);
  if (i < n) {
    alignas(64) char buf[kLanes * 4] = {};
    std::memcpy(buf, p + i * esz, (n - i) * esz);
    avx512_step<D, Store, Mul, Track>(buf, s, vinv);
    if (Store) std::memcpy(p + i * esz, buf, (n - i) * esz);
  }
  const float sum = avx512_reduce(s);
  if (!Track) return {sum, std::isfinite(sum) ? false : scan_bad<D>(data, n)};
  bool bad;
  if constexpr (D == Dtype::F32)
    bad = _mm512_cmpge_epu32_mask(s.mx, _mm512_set1_epi32(0x7F800000)) != 0;
  else
    bad = _mm512_cmpge_epu16_mask(s.mx, _mm512_set1_epi16(D == Dtype::BF16 ? 0x7F80 : 0x7C00)) != 0;
  return {sum, bad};
}
#endif  // TCH_FABRIC_X86

// ---------------------------------------------------------------------------------------------
// Dispatch.

using ChunkFn = ChunkResult (*)(void *, int64_t, float);

Isa supported_isa() {
#ifdef TCH_FABRIC_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::Avx2;
    return Isa::Scalar;
  }();
  return best;
#else
  return Isa::Scalar;
#endif
}

// The best path the CPU has, or a lesser one forced by TCH_FABRIC_OPS_ISA (all give the same
// bits; the variable is for tests).
Isa chosen_isa() {
  Isa isa = supported_isa();
  if (const char *e = std::getenv("TCH_FABRIC_OPS_ISA")) {
    Isa want = isa;
    if (std::strcmp(e, "scalar") == 0) want = Isa::Scalar;
    else if (std::strcmp(e, "avx2") == 0) want = Isa::Avx2;
    else if (std::strcmp(e, "avx512") == 0) want = Isa::Avx512;
    if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
  }
  return isa;
}

template <Dtype D, bool Store, bool Mul>
ChunkFn pick3(Isa isa, bool track) {
  if constexpr (D == Dtype::F64) {
    return &chunk_f64<Store, Mul>;
  } else {
#ifdef TCH_FABRIC_X86
    if (isa == Isa::Avx512)
      return track ? &chunk_avx512<D, Store, Mul, true> : &chunk_avx512<D, Store, Mul, false>;
    if (isa == Isa::Avx2)
      return track ? &chunk_avx2<D, Store, Mul, true> : &chunk_avx2<D, Store, Mul, false>;
#endif
    return &chunk_scalar<D, Store, Mul>;
  }
}

template <Dtype D>
ChunkFn pick2(Isa isa, bool store, bool mul, bool track) {
  if (store) return mul ? pick3<D, true, true>(isa, track) : pick3<D, true, false>(isa, track);
  return mul ? pick3<D, false, true>(isa, track) : pick3<D, false, false>(isa, track);
}

ChunkFn pick(Dtype d, Isa isa, bool store, float inv) {
  // A non-finite inv_scale (a degenerate input) takes the scalar path: the SIMD bfloat16
  // rounding relies on NaNs coming from NaN/inf elements only.
  if (!std::isfinite(inv)) isa = Isa::Scalar;
  const bool mul = inv != 1.f;
  // The SIMD paths check for inf/NaN elements per element only where they must ("track"):
  // elsewhere a finite chunk sum proves there are none, and a chunk with a non-finite sum is
  // scanned again (scan_bad). That scan reads the values as stored, which are inf/NaN exactly
  // when the original ones were as long as |inv_scale| <= 1 (nothing finite overflows); with
  // |inv_scale| > 1 an in-place unscale tracks them as it goes.
  const bool track = store && !(std::fabs(inv) <= 1.f);
  switch (d) {
    case Dtype::F32: return pick2<Dtype::F32>(isa, store, mul, track);
    case Dtype::BF16: return pick2<Dtype::BF16>(isa, store, mul, track);
    case Dtype::F16: return pick2<Dtype::F16>(isa, store, mul, track);
    case Dtype::F64: return pick2<Dtype::F64>(isa, store, mul, track);
  }
  return nullptr;
}

struct Job {
  char *data;
  int64_t n;
  int64_t esz;
  ChunkFn fn;
  int64_t first_chunk;  // index of its first chunk among all chunks
};

at::Tensor unscale_sumsq_cpu(at::TensorList grads, at::Tensor &found_inf, const at::Tensor &inv_scale,
                             bool unscale) {
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "found_inf must be a 1-element float32 tensor");
  TORCH_CHECK(inv_scale.numel() == 1 && inv_scale.scalar_type() == at::kFloat,
              "inv_scale must be a 1-element float32 tensor");
  // A CPU kernel reads its CPU scalar directly (item() would dispatch two more ops).
  const float inv = inv_scale.device().is_cpu() ? *inv_scale.const_data_ptr<float>()
                                                : inv_scale.item<float>();
  const Isa isa = chosen_isa();

  // Contiguous working tensors (copies of the non-contiguous gradients, written back after).
  std::vector<at::Tensor> work;
  std::vector<Job> jobs;
  int64_t chunks = 0;
  for (const at::Tensor &g0 : grads) {
    TORCH_CHECK(g0.device().is_cpu(), "unscale_sumsq_: every gradient must be on the CPU");
    if (g0.numel() == 0) continue;
    Dtype d;
    switch (g0.scalar_type()) {
      case at::kFloat: d = Dtype::F32; break;
      case at::kBFloat16: d = Dtype::BF16; break;
      case at::kHalf: d = Dtype::F16; break;
      case at::kDouble: d = Dtype::F64; break;
      default: TORCH_CHECK(false, "unscale_sumsq_: unsupported gradient dtype ", g0.scalar_type());
    }
    work.push_back(g0.is_contiguous() ? g0 : g0.contiguous());
    const at::Tensor &g = work.back();
    jobs.push_back({static_cast<char *>(g.data_ptr()), g.numel(), static_cast<int64_t>(g.element_size()),
                    pick(d, isa, unscale, inv), chunks});
    chunks += (g.numel() + kChunk - 1) / kChunk;
  }

  std::vector<float> partials(chunks);
  std::atomic<bool> any_bad{false};
  // Two chunks (32 K elements) at least per thread, like the native kernel's grain.
  at::parallel_for(0, chunks, 2, [&](int64_t begin, int64_t end) {
    bool bad = false;
    // The job holding chunk `begin`: the last one whose first chunk is <= begin.
    size_t j = std::upper_bound(jobs.begin(), jobs.end(), begin,
                                [](int64_t c, const Job &job) { return c < job.first_chunk; }) -
               jobs.begin() - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (j + 1 < jobs.size() && jobs[j + 1].first_chunk <= c) ++j;
      const Job &job = jobs[j];
      const int64_t lo = (c - job.first_chunk) * kChunk;
      const int64_t len = std::min(kChunk, job.n - lo);
      const ChunkResult r = job.fn(job.data + lo * job.esz, len, inv);
      partials[c] = r.sum;
      bad |= r.bad;
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });

  if (unscale) {
    size_t w = 0;
    for (const at::Tensor &g0 : grads) {
      if (g0.numel() == 0) continue;
      if (!g0.is_contiguous()) g0.copy_(work[w]);
      ++w;
    }
  }
  double total = 0.0;
  for (const float p : partials) total += p;
  if (any_bad.load()) found_inf.fill_(1.0);
  return at::full({}, static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> clip_divisor(const at::Tensor &sumsq, const at::Tensor &scale,
                                                 double max_norm) {
  at::Tensor total = sumsq.sqrt();
  at::Tensor coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
  return {total, scale / coef};
}

}  // namespace


// tch_fabric::adamw_folded_: AdamW (decoupled weight decay) for float32 CPU tensors whose
// gradients are still multiplied by `divisor` (loss scale / clip coefficient). PyTorch's
// _fused_adamw_ given grad_scale divides the gradients and writes them back, one more pass over
// memory than the step needs; this kernel reads them and writes only param, exp_avg and
// exp_avg_sq. Skips everything (including the step count) when found_inf is non-zero. The
// state_steps are 0-dim float32 tensors already counting this step (FusedAdamW adds 1 first).
// Same formula as PyTorch's CPU kernel; the rounding of the division differs at float32's last
// bit, as anywhere the gradients are divided instead of unscaled and multiplied.
namespace {

struct AdamwScalars {
  float decay;        // 1 - lr * weight_decay
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float step_size;    // lr / (1 - beta1^step)
  float bc2_sqrt;     // sqrt(1 - beta2^step)
  float eps, inv_divisor_sign;  // -1 with maximize
  float divisor;
};

// Vectorised by the compiler for each ISA; sqrt vectorises because the library is built with
// -fno-math-errno (build.rs, scripts/gpu/prepare.sh).
__attribute__((target_clones("avx512f", "avx2", "default"))) void adamw_folded_range(
    float *__restrict param, const float *__restrict grad, float *__restrict m,
    float *__restrict v, int64_t n, AdamwScalars k) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = (grad[i] / k.divisor) * k.inv_divisor_sign;
    const float p = param[i] * k.decay;
    const float mi = m[i] * k.beta1 + g * k.one_minus_beta1;
    const float vi = v[i] * k.beta2 + g * g * k.one_minus_beta2;
    const float denom = std::sqrt(vi) / k.bc2_sqrt + k.eps;
    param[i] = p - k.step_size * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
}

void adamw_folded_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                      double beta1, double beta2, double weight_decay, double eps, bool maximize,
                      const at::Tensor &divisor, const at::Tensor &found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n,
              "adamw_folded_: tensor lists of different lengths");
  TORCH_CHECK(divisor.numel() == 1 && divisor.scalar_type() == at::kFloat && divisor.device().is_cpu(),
              "adamw_folded_: divisor must be a 1-element float32 CPU tensor");
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat &&
                  found_inf.device().is_cpu(),
              "adamw_folded_: found_inf must be a 1-element float32 CPU tensor");
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK(state_steps[t].numel() == 1 && state_steps[t].scalar_type() == at::kFloat &&
                    state_steps[t].device().is_cpu(),
                "adamw_folded_: every state step must be a 1-element float32 CPU tensor");
    for (const at::Tensor *x : {&params[t], &grads[t], &exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->is_contiguous() &&
                      x->numel() == params[t].numel(),
                  "adamw_folded_: every tensor must be a contiguous float32 CPU tensor of its "
                  "parameter's size");
    }
  }
  // CPU scalars are read directly: item() would dispatch two more ops per tensor.
  if (*found_inf.const_data_ptr<float>() != 0.f) return;
  const float div = *divisor.const_data_ptr<float>();
  for (size_t t = 0; t < n; ++t) {
    const double step = *state_steps[t].const_data_ptr<float>();
    AdamwScalars k;
    k.decay = static_cast<float>(1.0 - lr * weight_decay);
    k.beta1 = static_cast<float>(beta1);
    k.beta2 = static_cast<float>(beta2);
    k.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    k.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    k.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    k.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
    k.eps = static_cast<float>(eps);
    k.inv_divisor_sign = maximize ? -1.f : 1.f;
    k.divisor = div;
    float *p = params[t].data_ptr<float>();
    const float *g = grads[t].const_data_ptr<float>();
    float *m = exp_avgs[t].data_ptr<float>();
    float *v = exp_avg_sqs[t].data_ptr<float>();
    at::parallel_for(0, params[t].numel(), kChunk, [&](int64_t begin, int64_t end) {
      adamw_folded_range(p + begin, g + begin, m + begin, v + begin, end - begin, k);
    });
  }
}

}  // namespace

TORCH_LIBRARY(tch_fabric, m) {
  m.def("unscale_sumsq_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, bool unscale) -> Tensor");
  m.def("clip_divisor(Tensor sumsq, Tensor scale, float max_norm) -> (Tensor norm, Tensor divisor)");
  m.def(
      "adamw_folded_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] "
      "exp_avg_sqs, Tensor[] state_steps, float lr, float beta1, float beta2, float weight_decay, "
      "float eps, bool maximize, Tensor divisor, Tensor found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(tch_fabric, CPU, m) {
  m.impl("unscale_sumsq_", &unscale_sumsq_cpu);
  m.impl("adamw_folded_", &adamw_folded_cpu);
}

TORCH_LIBRARY_IMPL(tch_fabric, CompositeExplicitAutograd, m) {
  m.impl("clip_divisor", &clip_divisor);
}

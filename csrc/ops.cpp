// tch-fabric's custom op, registered with libtorch's dispatcher under the `tch_fabric`
// namespace. The same file is linked into the Rust crate (whole-archive, so the registration
// runs) and built as a shared library that Python loads with torch.ops.load_library.
//
// tch_fabric::unscale_sumsq_(grads, found_inf, inv_scale, unscale) -> sumsq
//   One read pass over a list of gradients (float32, float16, bfloat16, mixed):
//   - found_inf is set to 1 if any element is inf/NaN (checked before the multiply, as
//     _amp_foreach_non_finite_check_and_unscale_ does);
//   - with unscale, each element becomes (inv_scale == 1 ? v : v * inv_scale) computed in
//     float32 and rounded to the storage dtype: the native kernel's exact bits;
//   - returns the float32 sum of squares of the (unscaled, stored) values, for the global norm.
//   The sum is deterministic: fixed-size chunks are summed in order, whatever the thread count.
//
// tch_fabric::clip_divisor(found_inf, sumsq, scale, max_norm) -> divisor
//   PyTorch's clip coefficient from the norm, folded with the loss scale into one divisor that
//   stays on the device: scale / min(max_norm / (sqrt(sumsq) + 1e-6), 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

template <typename scalar_t>
void unscale_one(scalar_t *data, int64_t n, float inv, bool unscale, float *partials,
                 uint8_t *bad) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      float acc = 0.f;
      bool nonfinite = false;
      for (int64_t i = lo; i < hi; ++i) {
        const float v = static_cast<float>(data[i]);
        nonfinite |= !std::isfinite(v);
        float u = v;
        if (unscale) {
          const scalar_t stored = static_cast<scalar_t>(inv == 1.f ? v : v * inv);
          data[i] = stored;
          u = static_cast<float>(stored);
        }
        acc += u * u;
      }
      partials[c] = acc;
      bad[c] = nonfinite ? 1 : 0;
    }
  });
}

at::Tensor unscale_sumsq_cpu(at::TensorList grads, at::Tensor &found_inf, const at::Tensor &inv_scale,
                             bool unscale) {
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "found_inf must be a 1-element float32 tensor");
  TORCH_CHECK(inv_scale.numel() == 1 && inv_scale.scalar_type() == at::kFloat,
              "inv_scale must be a 1-element float32 tensor");
  const float inv = inv_scale.item<float>();
  double total = 0.0;
  bool any_bad = false;
  for (const at::Tensor &g0 : grads) {
    if (g0.numel() == 0) continue;
    TORCH_CHECK(g0.device().is_cpu(), "unscale_sumsq_: every gradient must be on the CPU");
    at::Tensor g = g0.is_contiguous() ? g0 : g0.contiguous();
    const int64_t n = g.numel();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<float> partials(chunks);
    std::vector<uint8_t> bad(chunks);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "unscale_sumsq_", [&] {
      unscale_one<scalar_t>(g.data_ptr<scalar_t>(), n, inv, unscale, partials.data(), bad.data());
    });
    if (unscale && !g0.is_contiguous()) g0.copy_(g);
    float sum = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += partials[c];
      any_bad |= bad[c] != 0;
    }
    total += sum;
  }
  if (any_bad) found_inf.fill_(1.0);
  return at::full({}, static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor clip_divisor(const at::Tensor &found_inf, const at::Tensor &sumsq, const at::Tensor &scale,
                        double max_norm) {
  (void)found_inf;  // the divisor is only used by a step that found_inf already skips
  at::Tensor total = sumsq.sqrt();
  at::Tensor coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
  return scale / coef;
}

}  // namespace

TORCH_LIBRARY(tch_fabric, m) {
  m.def("unscale_sumsq_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, bool unscale) -> Tensor");
  m.def("clip_divisor(Tensor found_inf, Tensor sumsq, Tensor scale, float max_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(tch_fabric, CPU, m) {
  m.impl("unscale_sumsq_", &unscale_sumsq_cpu);
}

TORCH_LIBRARY_IMPL(tch_fabric, CompositeExplicitAutograd, m) {
  m.impl("clip_divisor", &clip_divisor);
}

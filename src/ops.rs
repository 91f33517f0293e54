//! The `tch_fabric` custom ops (csrc/ops.cpp), registered with libtorch's dispatcher: the
//! AMP bookkeeping in one read pass over the gradients.
//!
//! The same compiled library is loadable from Python (`torch.ops.load_library`), so PyTorch
//! tests drive the very op this crate calls. CPU kernel, plus a CUDA kernel (csrc/ops_cuda.cu)
//! with the `cuda` feature.
use crate::error::Result;
use crate::ffi;
use tch::Tensor;

/// The path of the compiled ops library, for `torch.ops.load_library` in Python.
pub const OPS_LIBRARY: &str = env!("TCH_FABRIC_OPS_LIB");

/// One pass over `grads`: sets `found_inf` to 1 when any element is inf/NaN (checked before
/// the multiply; never reset to 0) and returns a float32 sum of squares, deterministic run to
/// run and whatever the thread count. float32, float16 and bfloat16 may be mixed.
///
/// With `unscale`, the gradients are unscaled in place by `inv_scale`, bit-identical to
/// `_amp_foreach_non_finite_check_and_unscale_`, and the sum is over the stored values. Without
/// it, nothing is written and the sum is over the unscaled values `float(v) * inv_scale` in
/// float32 (not rounded to the storage dtype), so that an optimizer can divide by
/// `scale / clip_coef` later instead of unscaling in place.
///
/// # Errors
///
/// [`crate::Error::Native`] if the ops library is not loaded in this process or libtorch
/// refuses the inputs (`found_inf` and `inv_scale` must be 1-element float32 tensors).
pub fn unscale_sumsq(
    grads: &[Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
    unscale: bool,
) -> Result<Tensor> {
    let refs: Vec<&Tensor> = grads.iter().collect();
    ffi::unscale_sumsq(&refs, found_inf, inv_scale, unscale)
}

/// PyTorch's clip coefficient from the sum of squares folded with the loss scale into one
/// divisor on the device: `scale / min(max_norm / (sqrt(sumsq) + 1e-6), 1)`.
///
/// # Errors
///
/// As [`unscale_sumsq`].
pub fn clip_divisor(
    found_inf: &Tensor,
    sumsq: &Tensor,
    scale: &Tensor,
    max_norm: f64,
) -> Result<Tensor> {
    ffi::clip_divisor(found_inf, sumsq, scale, max_norm)
}

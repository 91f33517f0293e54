//! The `tch_fabric` custom ops (csrc/ops.cpp), registered with libtorch's dispatcher: the AMP
//! bookkeeping in one read pass over the gradients.
//!
//! The ops are linked into every binary that depends on this crate (a whole-archive static
//! library: nothing to add to a dependent's build script), and the same objects are built as a
//! shared library that Python loads (`torch.ops.load_library(OPS_LIBRARY)`), so PyTorch tests
//! drive the very op this crate calls. CPU kernels, plus a CUDA kernel of `unscale_sumsq_`
//! (csrc/ops_cuda.cu) with the `cuda` feature.
use crate::error::Result;
use crate::native;
use std::sync::OnceLock;
use tch::{Device, Tensor};

/// The path of the ops built as a shared library, for `torch.ops.load_library` in Python. Never
/// load it into a Rust process of this crate: the ops are already registered there, and a
/// second `TORCH_LIBRARY(tch_fabric)` is an error.
pub const OPS_LIBRARY: &str = env!("TCH_FABRIC_OPS_LIB");

/// Whether `tch_fabric::unscale_sumsq_` has a kernel for `device`'s type in this process (CPU
/// always; CUDA when built with the `cuda` feature; no other device). The dispatcher is asked
/// once per device type: the kernels register when the library loads and never change.
///
/// ```
/// assert!(tch_fabric::ops::has_kernel(tch::Device::Cpu)?);
/// assert_eq!(tch_fabric::ops::has_kernel(tch::Device::Cuda(0))?, cfg!(feature = "cuda"));
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`crate::Error::Native`] if the dispatcher cannot be asked.
pub fn has_kernel(device: Device) -> Result<bool> {
    static CPU: OnceLock<bool> = OnceLock::new();
    static CUDA: OnceLock<bool> = OnceLock::new();
    let known = match device {
        Device::Cpu => &CPU,
        Device::Cuda(_) => &CUDA,
        _ => return Ok(false),
    };
    if let Some(&has) = known.get() {
        return Ok(has);
    }
    let has = native::op_has_kernel("tch_fabric::unscale_sumsq_", device)?;
    Ok(*known.get_or_init(|| has))
}

/// One pass over `grads`: sets `found_inf` to 1 when any element is inf/NaN (checked before
/// the multiply; never reset to 0) and returns a float32 sum of squares, deterministic run to
/// run and whatever the thread count. float32, float16 and bfloat16 may be mixed.
///
/// With `unscale`, the gradients are unscaled in place by `inv_scale`, bit-identical to
/// `_amp_foreach_non_finite_check_and_unscale_`, and the sum is over the stored values (the
/// GradScaler's `unscale` uses this: one call for every dtype of a device). Without it, nothing
/// is written and the sum is over the unscaled values `float(v) * inv_scale` in float32 (not
/// rounded to the storage dtype), so that an optimizer can divide by `scale / clip_coef` later
/// instead of unscaling in place (folded clipping).
///
/// # Errors
///
/// [`crate::Error::Native`] if libtorch refuses the inputs (`found_inf` and `inv_scale` must
/// be 1-element float32 tensors; gradients on a device without a kernel).
pub fn unscale_sumsq(
    grads: &[Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
    unscale: bool,
) -> Result<Tensor> {
    let refs: Vec<&Tensor> = grads.iter().collect();
    native::unscale_sumsq(&refs, found_inf, inv_scale, unscale)
}

/// The global 2-norm `sqrt(sumsq)` and PyTorch's clip coefficient from it folded with the loss
/// scale into one divisor, both on the device: `(norm, scale / min(max_norm / (norm + 1e-6),
/// 1))`.
///
/// # Errors
///
/// As [`unscale_sumsq`].
pub fn clip_divisor(sumsq: &Tensor, scale: &Tensor, max_norm: f64) -> Result<(Tensor, Tensor)> {
    native::clip_divisor(sumsq, scale, max_norm)
}

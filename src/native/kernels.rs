//! The passes over gradient lists: PyTorch's AMP unscale and total norm, the `_foreach_*` ops
//! the optimizers and clipping use, and the `tch_fabric::` custom ops.
use super::tensor::device_type;
use super::{call, owned, ptr, ptrs};
use crate::error::{Error, Result};
use crate::ffi::{self, CTensor};
use std::ffi::CString;
use tch::{Device, Tensor};

/// `torch._amp_foreach_non_finite_check_and_unscale_` over `grads`.
pub(crate) fn amp_unscale(grads: &[&Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let p = ptrs(grads.iter().copied());
    // SAFETY: `p` holds `p.len()` live tensors; the flags are live tensors.
    call("_amp_foreach_non_finite_check_and_unscale_", || unsafe {
        ffi::tf_amp_foreach_non_finite_check_and_unscale(
            p.as_ptr(),
            p.len(),
            ptr(found_inf),
            ptr(inv_scale),
        )
    })
}

/// PyTorch's total norm over gradients grouped by (device, dtype), one `_foreach_norm` per group.
pub(crate) fn grad_total_norm(groups: &[Vec<&Tensor>], norm_type: f64) -> Result<Tensor> {
    let p = ptrs(groups.iter().flatten().copied());
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    let mut out: CTensor = std::ptr::null_mut();
    // SAFETY: `p` holds the sum of `sizes` tensors, `sizes` has `sizes.len()` entries.
    call("get_total_norm", || unsafe {
        ffi::tf_grad_total_norm(p.as_ptr(), sizes.as_ptr(), sizes.len(), norm_type, &mut out)
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`.
    unsafe { owned("get_total_norm", out) }
}

/// `torch._foreach_add_(tensors, value)`.
pub(crate) fn foreach_add_scalar(tensors: &[&Tensor], value: f64) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    // SAFETY: `p` holds `p.len()` live tensors.
    call("_foreach_add_", || unsafe {
        ffi::tf_foreach_add_scalar(p.as_ptr(), p.len(), value)
    })
}

/// `torch._foreach_sub_(tensors, other)` with a one-element tensor.
pub(crate) fn foreach_sub_tensor(tensors: &[&Tensor], other: &Tensor) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    // SAFETY: `p` holds `p.len()` live tensors.
    call("_foreach_sub_", || unsafe {
        ffi::tf_foreach_sub_tensor(p.as_ptr(), p.len(), ptr(other))
    })
}

/// `torch._foreach_mul_(tensors, other)` with a one-element tensor.
pub(crate) fn foreach_mul_tensor(tensors: &[&Tensor], other: &Tensor) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    // SAFETY: `p` holds `p.len()` live tensors.
    call("_foreach_mul_", || unsafe {
        ffi::tf_foreach_mul_tensor(p.as_ptr(), p.len(), ptr(other))
    })
}

/// `torch._foreach_clamp_min_` then `_max_`, as `clip_grad_value_`.
pub(crate) fn foreach_clamp(tensors: &[&Tensor], min: f64, max: f64) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    // SAFETY: `p` holds `p.len()` live tensors.
    call("_foreach_clamp_", || unsafe {
        ffi::tf_foreach_clamp(p.as_ptr(), p.len(), min, max)
    })
}

/// Whether the dispatcher has a kernel of `op` for the device type of `device`.
pub(crate) fn op_has_kernel(op: &str, device: Device) -> Result<bool> {
    let name = CString::new(op).map_err(|_| Error::native("op_has_kernel", "NUL in op name"))?;
    let device_type = device_type("op_has_kernel", device)?;
    let mut out = 0;
    // SAFETY: `name` is a NUL-terminated string alive for the call.
    call("op_has_kernel", || unsafe {
        ffi::tf_op_has_kernel(name.as_ptr(), device_type, &mut out)
    })?;
    Ok(out != 0)
}

/// `tch_fabric::unscale_sumsq_` (see [`crate::ops::unscale_sumsq`]).
pub(crate) fn unscale_sumsq(
    grads: &[&Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
    unscale: bool,
) -> Result<Tensor> {
    let p = ptrs(grads.iter().copied());
    let mut out: CTensor = std::ptr::null_mut();
    // SAFETY: `p` holds `p.len()` live tensors; the flags are live tensors.
    call("tch_fabric::unscale_sumsq_", || unsafe {
        ffi::tf_unscale_sumsq(
            p.as_ptr(),
            p.len(),
            ptr(found_inf),
            ptr(inv_scale),
            i32::from(unscale),
            &mut out,
        )
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`.
    unsafe { owned("tch_fabric::unscale_sumsq_", out) }
}

/// `tch_fabric::clip_divisor`: (the norm, `scale / clip_coef`).
pub(crate) fn clip_divisor(
    sumsq: &Tensor,
    scale: &Tensor,
    max_norm: f64,
) -> Result<(Tensor, Tensor)> {
    let mut norm: CTensor = std::ptr::null_mut();
    let mut divisor: CTensor = std::ptr::null_mut();
    // SAFETY: both inputs are live tensors; the outputs are written on success only.
    call("tch_fabric::clip_divisor", || unsafe {
        ffi::tf_clip_divisor(ptr(sumsq), ptr(scale), max_norm, &mut norm, &mut divisor)
    })?;
    // SAFETY: on success the shim stored two fresh tensors.
    unsafe {
        Ok((
            owned("tch_fabric::clip_divisor", norm)?,
            owned("tch_fabric::clip_divisor", divisor)?,
        ))
    }
}

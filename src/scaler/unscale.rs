//! The scaler's passes over the gradients: the in-place unscale with PyTorch's bits, the
//! read-only inf check, and the names of the non-finite gradients for a diagnosed skip.
use super::stage::Flag;
use crate::device::on_device;
use crate::error::{Error, Op, Result};
use crate::native;
use crate::ops;
use crate::params::{GradBatch, Params};
use tch::{Device, Kind, Tensor};

/// PyTorch's refusal of float16 gradients outside the fused path.
pub(crate) fn check_fp16(grads: &GradBatch, allow_fp16: bool) -> Result<()> {
    if grads.has_sparse() {
        return Err(Error::Usage(
            "sparse gradients are not supported by tch-fabric's GradScaler".into(),
        ));
    }
    if !allow_fp16 && grads.groups().iter().any(|g| g.kind == Kind::Half) {
        return Err(Error::Usage("Attempting to unscale FP16 gradients.".into()));
    }
    Ok(())
}

/// Unscales `grads` in place by `inv_scale` (which lives on `at`) and returns one found_inf flag
/// per device, after checking every group (nothing is written when a check fails). Each (device, dtype) group
/// takes one native `_amp_foreach_non_finite_check_and_unscale_`, bit for bit PyTorch's.
/// bfloat16 on CUDA, which that kernel lacks, takes tch-fabric's op (`unscale=true`, the same
/// bits) where it has a CUDA kernel, else an equivalent composition; `force_composite` routes
/// every group through the composition (for tests).
pub(crate) fn unscale_batch(
    grads: &GradBatch,
    inv_scale: &Tensor,
    at: Device,
    allow_fp16: bool,
    force_composite: bool,
) -> Result<Vec<Flag>> {
    check_fp16(grads, allow_fp16)?;
    let mut found_per_device: Vec<Flag> = Vec::new();
    for &device in grads.devices() {
        let found = Tensor::f_zeros([], (Kind::Float, device)).op("zeros")?;
        let inv = on_device(inv_scale, at, device)?;
        for group in grads.groups().iter().filter(|g| g.device == device) {
            let list = grads.tensors(group);
            if force_composite {
                unscale_composite(&list, &found, &inv)?;
            } else if group.kind == Kind::BFloat16 && device.is_cuda() {
                if ops::has_kernel(device)? {
                    let _sumsq = native::unscale_sumsq(&list, &found, &inv, true)?;
                } else {
                    unscale_composite(&list, &found, &inv)?;
                }
            } else {
                native::amp_unscale(&list, &found, &inv)?;
            }
        }
        found_per_device.push(Flag {
            tensor: found,
            device,
        });
    }
    Ok(found_per_device)
}

/// The device on which `tch_fabric::unscale_sumsq_` can take all of `grads` in one call: one
/// device the op has a kernel for, float32, float16 or bfloat16 gradients. `None` when it
/// cannot (or there are no gradients); PyTorch's FP16 error where float16 is not allowed.
pub(crate) fn op_device(grads: &GradBatch, allow_fp16: bool) -> Result<Option<Device>> {
    check_fp16(grads, allow_fp16)?;
    let [device] = grads.devices() else {
        return Ok(None);
    };
    let kinds_ok = grads
        .groups()
        .iter()
        .all(|g| matches!(g.kind, Kind::Float | Kind::Half | Kind::BFloat16));
    if !kinds_ok || !ops::has_kernel(*device)? {
        return Ok(None);
    }
    Ok(Some(*device))
}

/// The fused path's inf check (the optimizer unscales by itself): tch-fabric's read pass where
/// it applies (nothing written), else PyTorch's unscale by 1. PyTorch accepts float16 here.
pub(crate) fn check_inf(grads: &GradBatch, scale_device: Device) -> Result<Vec<Flag>> {
    match op_device(grads, true)? {
        Some(device) => {
            let found = Tensor::f_zeros([], (Kind::Float, device)).op("zeros")?;
            let one = Tensor::f_ones([], (Kind::Float, device)).op("ones")?;
            let all: Vec<&Tensor> = grads.defined().map(|(_, g)| g).collect();
            let _sumsq = native::unscale_sumsq(&all, &found, &one, false)?;
            Ok(vec![Flag {
                tensor: found,
                device,
            }])
        }
        None => {
            let one = Tensor::f_ones([], (Kind::Float, scale_device)).op("ones")?;
            unscale_batch(grads, &one, scale_device, true, false)
        }
    }
}

/// Divides every gradient by `divisor` (which lives on `at`) in place: folded clipping turned
/// into unscaled, clipped gradients (for a second clip, or an unscale after a folded clip).
pub(crate) fn divide(grads: &GradBatch, divisor: &Tensor, at: Device) -> Result<()> {
    for group in grads.groups() {
        let d = on_device(divisor, at, group.device)?;
        for g in grads.tensors(group) {
            let _ = g.shallow_clone().f_div_(&d).op("div_")?;
        }
    }
    Ok(())
}

/// The kernel's math from ordinary ops, bit-identical to it: the finiteness check on the
/// original values, then `val * inv_scale` computed in float32 and rounded to the storage
/// dtype (the kernel's opmath is float32 for half types too).
fn unscale_composite(grads: &[&Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let mut found = found_inf.shallow_clone();
    for g in grads {
        if g.numel() == 0 {
            continue;
        }
        let bad = g
            .f_isfinite()
            .and_then(|t| t.f_all())
            .and_then(|t| t.f_logical_not())
            .and_then(|t| t.f_to_kind(Kind::Float))
            .op("isfinite")?;
        let merged = found.f_maximum(&bad).op("maximum")?;
        found.f_copy_(&merged).op("copy_")?;
        let product = g
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_mul(inv_scale))
            .op("mul")?;
        g.shallow_clone().f_copy_(&product).op("copy_")?;
    }
    Ok(())
}

/// Names of the gradients that hold inf/NaN.
pub(crate) fn nonfinite_names(params: &Params, grads: &GradBatch) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, g) in grads.defined() {
        let finite = g
            .f_isfinite()
            .and_then(|t| t.f_all())
            .and_then(|t| t.f_int64_value(&[]))
            .op("isfinite")?;
        if finite == 0 {
            out.push(params.names()[i].clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_f32(v: &[f32]) -> Tensor {
        let raw: Vec<i32> = v.iter().map(|x| x.to_bits() as i32).collect();
        Tensor::from_slice(&raw).view_dtype(Kind::Float)
    }

    /// The composite path (used for bf16 on CUDA) gives the native kernel's bits.
    #[test]
    fn composite_unscale_matches_native_bits() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -3.5,
            1e-40,
            -1e-45,
            3.0e38,
            -3.3e38,
            65504.0,
            1.1754944e-38,
            0.1,
            7.0e-3,
        ];
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for scale in [65536.0f64, 1000.0, 3.0, 1.0e-3, 1.0] {
                let s = Tensor::full([], scale, (Kind::Float, Device::Cpu));
                let inv = s.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
                let base = bits_f32(&specials).to_kind(kind);
                let native = base.copy();
                let composite = base.copy();
                let b1 = GradBatch::from_tensors(std::slice::from_ref(&native)).unwrap();
                let b2 = GradBatch::from_tensors(std::slice::from_ref(&composite)).unwrap();
                assert_eq!(b1.groups().len(), 1);
                let f1 = unscale_batch(&b1, &inv, Device::Cpu, true, false).unwrap();
                let f2 = unscale_batch(&b2, &inv, Device::Cpu, true, true).unwrap();
                let ik = if kind == Kind::Float {
                    Kind::Int
                } else {
                    Kind::Int16
                };
                assert!(
                    native.view_dtype(ik).equal(&composite.view_dtype(ik)),
                    "{kind:?} scale {scale}"
                );
                assert_eq!(
                    f1[0].tensor.double_value(&[]),
                    f2[0].tensor.double_value(&[])
                );
            }
        }
        let bad = bits_f32(&[1.0, f32::NAN]).to_kind(Kind::BFloat16);
        let inv = Tensor::full([], 0.5, (Kind::Float, Device::Cpu));
        let b = GradBatch::from_tensors(std::slice::from_ref(&bad)).unwrap();
        let f = unscale_batch(&b, &inv, Device::Cpu, false, true).unwrap();
        assert_eq!(f[0].tensor.double_value(&[]), 1.0);
    }
}

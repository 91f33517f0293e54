//! Gradient clipping with `torch.nn.utils.clip_grad_norm_` / `clip_grad_value_` numerics.
use crate::error::{Error, Result};
use crate::ffi;
use tch::Tensor;

/// How [`crate::Fabric::clip_gradients`] clips.
///
/// ```
/// use tch_fabric::Clip;
/// assert_eq!(Clip::norm(1.0), Clip::Norm { max_norm: 1.0, norm_type: 2.0 });
/// let by_value = Clip::Value(0.5); // clamp every gradient element into [-0.5, 0.5]
/// # let _ = by_value;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    /// Scale all gradients together so that their global norm of order `norm_type` is at
    /// most `max_norm` (`clip_grad_norm_`).
    Norm {
        /// The largest allowed global norm (finite, >= 0).
        max_norm: f64,
        /// The order of the norm (2.0 for the Euclidean norm, `f64::INFINITY` for max-abs).
        norm_type: f64,
    },
    /// Clamp every gradient element into `[-v, v]` (`clip_grad_value_`).
    Value(f64),
}

impl Clip {
    /// `Clip::Norm` with the Euclidean norm, Lightning's default `norm_type`.
    pub fn norm(max_norm: f64) -> Self {
        Clip::Norm {
            max_norm,
            norm_type: 2.0,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Clip::Norm {
                max_norm,
                norm_type,
            } => {
                if !(max_norm.is_finite() && max_norm >= 0.0) {
                    return Err(Error::InvalidConfig {
                        field: "max_norm",
                        value: max_norm.to_string(),
                        allowed: "finite and >= 0",
                    });
                }
                if norm_type.is_nan() {
                    return Err(Error::InvalidConfig {
                        field: "norm_type",
                        value: norm_type.to_string(),
                        allowed: "a number or infinity",
                    });
                }
            }
            Clip::Value(v) => {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::InvalidConfig {
                        field: "clip value",
                        value: v.to_string(),
                        allowed: "finite and >= 0",
                    });
                }
            }
        }
        Ok(())
    }
}

/// The global norm of `grads` as `torch.nn.utils.get_total_norm`: a 0-dim tensor on the first
/// gradient's device (no host sync).
///
/// # Errors
///
/// [`Error::Native`] if libtorch refuses the gradients.
pub fn total_norm(grads: &[Tensor], norm_type: f64) -> Result<Tensor> {
    let refs: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
    ffi::grad_total_norm(&refs, norm_type)
}

/// Clips `grads` in place as `torch.nn.utils.clip_grad_norm_` and returns the global norm
/// before clipping (a 0-dim tensor; no host sync unless `error_if_nonfinite`).
///
/// The coefficient is computed exactly as PyTorch does, `(total + 1e-6).reciprocal() *
/// max_norm` clamped at 1, so the clipped gradients have PyTorch's bits.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let grads = vec![Tensor::full([4], 3.0, (Kind::Float, Device::Cpu))]; // norm 6
/// let total = tch_fabric::clip_grad_norm(&grads, 1.0, 2.0, false)?;
/// assert_eq!(total.double_value(&[]), 6.0);
/// let after = tch_fabric::total_norm(&grads, 2.0)?.double_value(&[]);
/// assert!((after - 1.0).abs() < 1e-5);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a bad `max_norm` / `norm_type`; with `error_if_nonfinite`,
/// PyTorch's error for an inf/NaN norm (gradients untouched then).
pub fn clip_grad_norm(
    grads: &[Tensor],
    max_norm: f64,
    norm_type: f64,
    error_if_nonfinite: bool,
) -> Result<Tensor> {
    Clip::Norm {
        max_norm,
        norm_type,
    }
    .validate()?;
    let total = total_norm(grads, norm_type)?;
    if error_if_nonfinite && !total.f_double_value(&[])?.is_finite() {
        return Err(Error::Usage(format!(
            "The total norm of order {norm_type:?} for gradients from `parameters` is non-finite, \
             so it cannot be clipped. To disable this error and scale the gradients by the \
             non-finite norm anyway, set `error_if_nonfinite=False`"
        )));
    }
    // `max_norm / (total + 1e-6)` in Python is Tensor.__rtruediv__: reciprocal, then multiply.
    let coef = total
        .f_add_scalar(1e-6)?
        .f_reciprocal()?
        .f_mul_scalar(max_norm)?
        .f_clamp_max(1.0)?;
    for g in grads.iter().filter(|g| g.defined()) {
        let c = coef.f_to_device(g.device())?;
        let _ = g.shallow_clone().f_mul_(&c)?;
    }
    Ok(total)
}

/// Clamps every element of `grads` into `[-clip_value, clip_value]` in place, as
/// `torch.nn.utils.clip_grad_value_`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a negative or non-finite `clip_value`.
pub fn clip_grad_value(grads: &[Tensor], clip_value: f64) -> Result<()> {
    Clip::Value(clip_value).validate()?;
    for g in grads.iter().filter(|g| g.defined()) {
        let _ = g.shallow_clone().f_clamp_(-clip_value, clip_value)?;
    }
    Ok(())
}

pub(crate) fn apply(clip: Clip, grads: &[Tensor], error_if_nonfinite: bool) -> Result<Tensor> {
    clip.validate()?;
    match clip {
        Clip::Norm {
            max_norm,
            norm_type,
        } => clip_grad_norm(grads, max_norm, norm_type, error_if_nonfinite),
        Clip::Value(v) => {
            let norm = total_norm(grads, 2.0)?;
            clip_grad_value(grads, v)?;
            Ok(norm)
        }
    }
}

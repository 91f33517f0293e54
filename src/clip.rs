//! Gradient clipping with `torch.nn.utils.clip_grad_norm_` / `clip_grad_value_` numerics.
use crate::error::{Error, Op, Result};
use crate::native;
use crate::params::GradBatch;
use tch::Tensor;

/// How [`crate::Fabric::clip_gradients`] clips: by the global norm or by value, and whether a
/// non-finite norm is an error.
///
/// ```
/// use tch_fabric::{Clip, clip::ClipMethod};
/// let clip = Clip::norm(1.0); // the Euclidean norm, Lightning's default norm_type
/// assert_eq!(clip.method(), ClipMethod::Norm { max_norm: 1.0, norm_type: 2.0 });
/// let max_abs = Clip::norm(1.0).norm_type(f64::INFINITY);
/// let by_value = Clip::value(0.5); // clamp every gradient element into [-0.5, 0.5]
/// let strict = Clip::norm(1.0).error_if_nonfinite(true); // Lightning's default
/// # let _ = (max_abs, by_value, strict);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    method: ClipMethod,
    error_if_nonfinite: bool,
    model_order: bool,
}

/// What [`Clip`] does to the gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipMethod {
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
    /// Norm clipping to `max_norm` with the Euclidean norm.
    pub fn norm(max_norm: f64) -> Self {
        Clip {
            method: ClipMethod::Norm {
                max_norm,
                norm_type: 2.0,
            },
            error_if_nonfinite: false,
            model_order: false,
        }
    }

    /// Clamping every element into `[-clip_value, clip_value]`.
    pub fn value(clip_value: f64) -> Self {
        Clip {
            method: ClipMethod::Value(clip_value),
            error_if_nonfinite: false,
            model_order: false,
        }
    }

    /// The order of the norm for norm clipping (2.0 by default; `f64::INFINITY` for the
    /// largest absolute value). Value clipping has no norm order: setting one is refused when
    /// the clip is used.
    pub fn norm_type(mut self, norm_type: f64) -> Self {
        self.method = match self.method {
            ClipMethod::Norm { max_norm, .. } => ClipMethod::Norm {
                max_norm,
                norm_type,
            },
            // Kept visible to validate(): a NaN marks "a norm type given to value clipping".
            ClipMethod::Value(_) => ClipMethod::Value(f64::NAN),
        };
        self
    }

    /// Whether a non-finite norm is PyTorch's error, with the gradients left as they were
    /// (Lightning's default, `error_if_nonfinite=True`). Off by default here: under `16-mixed`
    /// an overflow step has a non-finite norm, and the step that follows is skipped anyway.
    /// Needs the norm on the host, so it waits for the device.
    pub fn error_if_nonfinite(mut self, error: bool) -> Self {
        self.error_if_nonfinite = error;
        self
    }

    /// Whether the global norm adds up the per-parameter norms in the model's parameter order
    /// (a plain PyTorch script's `clip_grad_norm_(model.parameters(), ...)`, nanoGPT's) rather
    /// than the optimizer's (Lightning's `fabric.clip_gradients`, over its param groups one
    /// after the other; the default). The two differ only for an optimizer with param groups,
    /// and then only in the last bits of the norm: choose the one of the script you match.
    pub fn model_order(mut self, model_order: bool) -> Self {
        self.model_order = model_order;
        self
    }

    /// What the clip does.
    pub fn method(&self) -> ClipMethod {
        self.method
    }

    /// Whether a non-finite norm is an error.
    pub fn is_strict(&self) -> bool {
        self.error_if_nonfinite
    }

    /// Checks the values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field and the allowed range.
    pub fn validate(&self) -> Result<()> {
        match self.method {
            ClipMethod::Norm {
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
            ClipMethod::Value(v) => {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::InvalidConfig {
                        field: "clip value",
                        value: v.to_string(),
                        allowed: "finite and >= 0 (and no norm_type: that is for norm clipping)",
                    });
                }
            }
        }
        Ok(())
    }
}

/// The global gradient norm a clip measured before clipping: a 0-dim tensor on the device,
/// not read by the host until [`GradNorm::value`] (it derefs to the [`Tensor`]).
#[derive(Debug)]
pub struct GradNorm(Tensor);

impl GradNorm {
    pub(crate) fn new(t: Tensor) -> GradNorm {
        GradNorm(t)
    }

    /// The norm on the host: waits for the device.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if it cannot be read.
    pub fn value(&self) -> Result<f64> {
        self.0.f_double_value(&[]).op("item")
    }

    /// The tensor.
    pub fn into_tensor(self) -> Tensor {
        self.0
    }
}

impl std::ops::Deref for GradNorm {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
}

/// The global norm of `grads` as `torch.nn.utils.get_total_norm`: a 0-dim tensor on the first
/// gradient's device (no host sync).
///
/// # Errors
///
/// [`Error::Native`] if libtorch refuses the gradients.
pub fn total_norm(grads: &[Tensor], norm_type: f64) -> Result<Tensor> {
    batch_norm(&GradBatch::from_tensors(grads)?, norm_type, None)
}

/// Clips `grads` in place as `torch.nn.utils.clip_grad_norm_` and returns the global norm
/// before clipping (a 0-dim tensor; no host sync unless `error_if_nonfinite`).
///
/// The coefficient is computed exactly as PyTorch does, `(total + 1e-6).reciprocal() *
/// max_norm` clamped at 1, and applied with one `_foreach_mul_` per (device, dtype), so the
/// clipped gradients have PyTorch's bits.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let grads = vec![Tensor::full([4], 3.0, (Kind::Float, Device::Cpu))]; // norm 6
/// let total = tch_fabric::clip::clip_grad_norm(&grads, 1.0, 2.0, false)?;
/// assert_eq!(total.double_value(&[]), 6.0);
/// let after = tch_fabric::clip::total_norm(&grads, 2.0)?.double_value(&[]);
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
    let clip = Clip::norm(max_norm)
        .norm_type(norm_type)
        .error_if_nonfinite(error_if_nonfinite);
    clip_batch(&GradBatch::from_tensors(grads)?, &clip, None)
}

/// Clamps every element of `grads` into `[-clip_value, clip_value]` in place, as
/// `torch.nn.utils.clip_grad_value_`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a negative or non-finite `clip_value`.
pub fn clip_grad_value(grads: &[Tensor], clip_value: f64) -> Result<()> {
    Clip::value(clip_value).validate()?;
    clamp_batch(&GradBatch::from_tensors(grads)?, clip_value)
}

fn batch_norm(batch: &GradBatch, norm_type: f64, order: Option<&[usize]>) -> Result<Tensor> {
    match order {
        Some(order) => native::grad_total_norm(&batch.grouped_in(order), norm_type),
        None => native::grad_total_norm(&batch.grouped(), norm_type),
    }
}

fn clamp_batch(batch: &GradBatch, v: f64) -> Result<()> {
    for group in batch.grouped() {
        native::foreach_clamp(&group, -v, v)?;
    }
    Ok(())
}

fn check_finite(total: &Tensor, norm_type: f64) -> Result<()> {
    if total.f_double_value(&[]).op("item")?.is_finite() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "The total norm of order {norm_type:?} for gradients from `parameters` is non-finite, \
         so it cannot be clipped. To disable this error and scale the gradients by the \
         non-finite norm anyway, set `error_if_nonfinite=False`"
    )))
}

/// Clips the batch in place and returns the norm before clipping (of order `norm_type` for
/// norm clipping, the 2-norm for value clipping); `model_order` is the batch's parameters'
/// model order, which [`Clip::model_order`] sums the norms in.
pub(crate) fn clip_batch(
    batch: &GradBatch,
    clip: &Clip,
    model_order: Option<&[usize]>,
) -> Result<Tensor> {
    clip.validate()?;
    let order = model_order.filter(|_| clip.model_order);
    match clip.method {
        ClipMethod::Norm {
            max_norm,
            norm_type,
        } => {
            let total = batch_norm(batch, norm_type, order)?;
            if clip.error_if_nonfinite {
                check_finite(&total, norm_type)?;
            }
            // `max_norm / (total + 1e-6)` in Python is Tensor.__rtruediv__: reciprocal, then
            // multiply.
            let coef = total
                .f_add_scalar(1e-6)
                .and_then(|t| t.f_reciprocal())
                .and_then(|t| t.f_mul_scalar(max_norm))
                .and_then(|t| t.f_clamp_max(1.0))
                .op("clip coefficient")?;
            for group in batch.groups() {
                let c = coef.f_to_device(group.device).op("to")?;
                native::foreach_mul_tensor(&batch.tensors(group), &c)?;
            }
            Ok(total)
        }
        ClipMethod::Value(v) => {
            let total = batch_norm(batch, 2.0, order)?;
            if clip.error_if_nonfinite {
                check_finite(&total, 2.0)?;
            }
            clamp_batch(batch, v)?;
            Ok(total)
        }
    }
}

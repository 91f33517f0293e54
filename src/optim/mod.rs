//! Optimizers: the one [`Optimizer`] trait the [`crate::GradScaler`] and [`crate::Fabric`]
//! drive, implemented by [`FusedAdamW`] and [`FusedSgd`] (over libtorch's fused kernels), by
//! [`AdamW`], [`Adam`] and [`Sgd`] (PyTorch's default for-loop implementations), all with
//! their state owned here, and by [`TchOptimizer`] (tch's own optimizers, over libtorch's C++
//! ones).
mod adam;
mod fused;
mod fused_adamw;
mod fused_sgd;
mod param_group;
mod sgd;
mod slots;
mod tch_adapter;

pub use adam::{Adam, AdamW};
pub use fused_adamw::FusedAdamW;
pub use fused_sgd::FusedSgd;
pub use param_group::ParamGroup;
pub use sgd::Sgd;
pub use tch_adapter::TchOptimizer;

use crate::error::{Error, Op, Result};
use crate::native;
use crate::params::{GradBatch, Params};
use std::ops::Deref;
use tch::{Device, Tensor};

/// What the loss scaler asks of one optimizer step (decided by [`crate::GradScaler::step`]).
#[derive(Debug, Clone, Copy)]
pub enum Amp<'a> {
    /// Step on the gradients as they are (no scaler, or a scaler that unscaled them, found
    /// them finite and lets the step happen).
    None,
    /// PyTorch's fused AMP step (`_step_supports_amp_scaling`): divide the gradients by
    /// `grad_scale` when given, and change nothing at all where `found_inf` is non-zero,
    /// without the host reading either.
    Scaled {
        /// The loss scale; `None` when the gradients were already unscaled.
        grad_scale: Option<&'a Tensor>,
        /// 1-element float32, non-zero when a gradient held inf/NaN.
        found_inf: &'a Tensor,
    },
    /// After folded norm clipping: the gradients are still multiplied by `divisor` (`scale /
    /// clip_coef`) and nothing needs them unscaled afterwards, so the step may leave them as
    /// they are; skipped where `found_inf` is non-zero.
    Folded {
        /// `scale / clip_coef`, 1-element float32.
        divisor: &'a Tensor,
        /// 1-element float32, non-zero when a gradient held inf/NaN.
        found_inf: &'a Tensor,
    },
}

/// An optimizer [`crate::GradScaler`] and [`crate::Fabric`] can drive. Implement it to plug in
/// another optimizer: [`Optimizer::params`] and [`Optimizer::step_with`] are the core; the
/// rest has defaults.
pub trait Optimizer: std::fmt::Debug {
    /// The parameters it updates, in PyTorch's order.
    fn params(&self) -> &Params;

    /// One step over `grads`, the gradients of [`Optimizer::params`] fetched for this step, as
    /// `amp` says. On error nothing may have changed: the scaler then keeps its state and the
    /// step can be retried.
    ///
    /// # Errors
    ///
    /// The optimizer's error; [`Error::Usage`] for an [`Amp`] it does not support.
    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()>;

    /// One step on the gradients as they are (no scaler).
    ///
    /// # Errors
    ///
    /// As [`Optimizer::step_with`].
    fn step(&mut self) -> Result<()> {
        let grads = self.params().grads()?;
        self.step_with(&grads, Amp::None)
    }

    /// Whether [`Optimizer::step_with`] takes [`Amp::Scaled`] and [`Amp::Folded`] (PyTorch's
    /// `_step_supports_amp_scaling`, true for fused optimizers): the scaler then never waits
    /// for the device.
    fn supports_amp_scaling(&self) -> bool {
        false
    }

    /// The learning rate.
    fn lr(&self) -> f64;

    /// Sets the learning rate (of every parameter group).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a rate the optimizer refuses (nothing changes then).
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// The momentum a schedule may cycle ([`crate::lr_scheduler::OneCycleLR`]): SGD's
    /// `momentum`, the Adam family's `beta1`; `None` (the default) for an optimizer without
    /// one.
    fn momentum(&self) -> Option<f64> {
        None
    }

    /// Sets what [`Optimizer::momentum`] reads.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for an optimizer without one (the default).
    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        Err(Error::Usage(format!(
            "{self:?} has no momentum or beta1 to set to {momentum}"
        )))
    }

    /// Drops the gradients (`zero_grad(set_to_none=True)`).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch refuses.
    fn zero_grad(&mut self) -> Result<()> {
        self.params().zero_grad()
    }

    /// Checks the hyper-parameters.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first bad value and the allowed range.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// The state to save with a checkpoint, as named tensors (none by default).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch cannot hand a tensor out.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Checks state for [`Optimizer::load_state`] without applying it (the dry run that lets
    /// a checkpoint be refused before anything changes).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] naming the tensor that does not fit. By default any state is
    /// refused: an optimizer without state would silently drop it.
    fn check_state(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        match tensors.first() {
            None => Ok(()),
            Some((name, _)) => Err(Error::InvalidState(format!(
                "{self:?} keeps no state in checkpoints, but the state has '{name}'"
            ))),
        }
    }

    /// Restores state saved by [`Optimizer::state_tensors`].
    ///
    /// # Errors
    ///
    /// As [`Optimizer::check_state`]; nothing changes then.
    fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.check_state(tensors)
    }

    /// PyTorch's `param_groups[0]` of this optimizer without `params` (`lr`, `betas`, ...,
    /// as `torch.optim` writes them), for torch.save-format checkpoints; `None` (the default)
    /// for an optimizer without a `torch.optim` twin, which such checkpoints cannot hold.
    fn param_group(&self) -> Option<ParamGroup> {
        None
    }

    /// Checks a param group read from a torch.save checkpoint for
    /// [`Optimizer::load_param_group`], changing nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for a group of another optimizer type or with other structural
    /// options (AMSGrad, zero vs non-zero momentum), or a bad value, naming the key. By
    /// default every group is refused.
    fn check_param_group(&self, group: &ParamGroup) -> Result<()> {
        let _ = group;
        Err(Error::InvalidState(format!(
            "{self:?} has no torch.optim twin: a torch.save checkpoint's optimizer state cannot \
             be loaded into it"
        )))
    }

    /// Applies a param group read from a torch.save checkpoint: the learning rate and the
    /// hyper-parameters, as PyTorch's `load_state_dict` restores them.
    ///
    /// # Errors
    ///
    /// As [`Optimizer::check_param_group`]; nothing changes then.
    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        self.check_param_group(group)
    }
}

/// A tensor on the device a kernel needs: the caller's own when it is there already, else a
/// copy.
#[derive(Debug)]
pub(crate) enum OnDevice<'a> {
    Borrowed(&'a Tensor),
    Owned(Tensor),
}

impl Deref for OnDevice<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        match self {
            OnDevice::Borrowed(t) => t,
            OnDevice::Owned(t) => t,
        }
    }
}

impl OnDevice<'_> {
    /// An owned handle (shallow for a borrowed tensor).
    pub(crate) fn into_owned(self) -> Tensor {
        match self {
            OnDevice::Borrowed(t) => t.shallow_clone(),
            OnDevice::Owned(t) => t,
        }
    }
}

/// `t` on `device`: borrowed when it is there already (no dispatcher call), else copied.
pub(crate) fn on_device(t: &Tensor, device: Device) -> Result<OnDevice<'_>> {
    match native::meta(t)? {
        Some(m) if m.device == device => Ok(OnDevice::Borrowed(t)),
        _ => Ok(OnDevice::Owned(t.f_to_device(device).op("to")?)),
    }
}

/// The AMP tensors of a fused step moved to one group's device: (grad_scale or divisor,
/// found_inf).
pub(crate) fn amp_on<'a>(
    amp: &Amp<'a>,
    device: Device,
) -> Result<(Option<OnDevice<'a>>, Option<OnDevice<'a>>)> {
    Ok(match *amp {
        Amp::None => (None, None),
        Amp::Scaled {
            grad_scale,
            found_inf,
        } => (
            grad_scale.map(|s| on_device(s, device)).transpose()?,
            Some(on_device(found_inf, device)?),
        ),
        Amp::Folded { divisor, found_inf } => (
            Some(on_device(divisor, device)?),
            Some(on_device(found_inf, device)?),
        ),
    })
}

/// A finite, non-negative hyper-parameter, or PyTorch's error for it.
pub(crate) fn non_negative(field: &'static str, v: f64, allowed: &'static str) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            value: v.to_string(),
            allowed,
        })
    }
}

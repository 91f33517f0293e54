//! Optimizers: the [`Optimizer`] trait that [`crate::GradScaler`] and [`crate::Fabric`] drive,
//! the [`OptimizerState`] trait checkpoints save and load through, and the implementations.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod` | the two traits, and [`Amp`]: what the loss scaler asks of one step |
//! | `stepper` | what every optimizer whose state tch-fabric owns shares: parameters, state, one checked step calling a kernel per (device, dtype) |
//! | `slots` | the per-parameter state tensors, created at a parameter's first step |
//! | `group` | [`Group`]: PyTorch's param groups, by name or predicate, with their own options |
//! | `adam` | the Adam family: [`FusedAdamW`], [`AdamW`], [`Adam`] (one kernel: fused, for-loop or foreach) |
//! | `sgd` | SGD: [`FusedSgd`], [`Sgd`] (one kernel: fused, for-loop or foreach) |
//! | `param_group` | PyTorch's `param_groups` entries, for torch.save checkpoints |
//! | `rounding` | how the fused optimizers write bfloat16 parameters back: stochastic rounding, Kahan summation; [`stochastic_round`] |
//! | `tch_adapter` | [`TchOptimizer`]: tch's own optimizers behind the trait |
//!
//! [`Params`] (an optimizer's parameters in PyTorch's order) and [`GradBatch`] (their
//! gradients, fetched and grouped once per step) are what the traits speak in.
mod adam;
mod group;
mod param_group;
mod rounding;
mod sgd;
mod slots;
mod stepper;
mod tch_adapter;

pub use crate::params::{GradBatch, GradGroup, Params};
pub use adam::{Adam, AdamFamily, AdamW, FusedAdamW};
pub use group::Group;
pub use param_group::ParamGroup;
pub use rounding::stochastic_round;
pub use sgd::{FusedSgd, Sgd, SgdFamily};
pub use tch_adapter::TchOptimizer;

use crate::error::{Error, Result};
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
        /// Where `grad_scale` and `found_inf` live.
        device: Device,
    },
    /// After folded norm clipping: the gradients are still multiplied by `divisor` (`scale /
    /// clip_coef`) and nothing needs them unscaled afterwards, so the step may leave them as
    /// they are; skipped where `found_inf` is non-zero.
    Folded {
        /// `scale / clip_coef`, 1-element float32.
        divisor: &'a Tensor,
        /// 1-element float32, non-zero when a gradient held inf/NaN.
        found_inf: &'a Tensor,
        /// Where `divisor` and `found_inf` live.
        device: Device,
    },
}

/// An optimizer [`crate::GradScaler`] and [`crate::Fabric`] can step. Implement it (with
/// [`OptimizerState`], whose methods all have defaults) to plug in another optimizer:
/// [`Optimizer::params`], [`Optimizer::step_with`], [`Optimizer::lr`] and
/// [`Optimizer::set_lr`] are required, the rest has defaults.
pub trait Optimizer: OptimizerState + std::fmt::Debug {
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

    /// The learning rate (of the first param group, PyTorch's `param_groups[0]["lr"]`).
    fn lr(&self) -> f64;

    /// Sets the learning rate of every param group.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a rate the optimizer refuses (nothing changes then).
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// Each param group's learning rate (one group by default).
    fn group_lrs(&self) -> Vec<f64> {
        vec![self.lr()]
    }

    /// Sets the learning rate of param group `group` (PyTorch's
    /// `param_groups[group]["lr"] = lr`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a group that does not exist or a rate the optimizer
    /// refuses (nothing changes then).
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        if group == 0 {
            self.set_lr(lr)
        } else {
            Err(stepper::no_group(group, 1))
        }
    }

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
}

/// What a checkpoint saves of an optimizer and restores: its per-parameter state tensors and
/// PyTorch's `param_groups`, each half with a dry-run check, so that a checkpoint can be
/// refused before anything changes. Every method has a default: an optimizer without state
/// (`impl OptimizerState for Mine {}`) saves nothing and refuses to load state, which it would
/// otherwise silently drop.
pub trait OptimizerState: std::fmt::Debug {
    /// The state to save with a checkpoint, as `<param>.<field>` tensors (none by default).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch cannot hand a tensor out.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Checks state for [`OptimizerState::load_state`] without applying it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] naming the tensor that does not fit. By default any state is
    /// refused.
    fn check_state(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        match tensors.first() {
            None => Ok(()),
            Some((name, _)) => Err(Error::InvalidState(format!(
                "{self:?} keeps no state in checkpoints, but the state has '{name}'"
            ))),
        }
    }

    /// Restores state saved by [`OptimizerState::state_tensors`].
    ///
    /// # Errors
    ///
    /// As [`OptimizerState::check_state`]; nothing changes then.
    fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.check_state(tensors)
    }

    /// PyTorch's `param_groups` of this optimizer (`lr`, `betas`, ..., as `torch.optim` writes
    /// them), each with `params`: the positions of its parameters in [`Optimizer::params`],
    /// for torch.save-format checkpoints; `None` (the default) for an optimizer without a
    /// `torch.optim` twin, which such checkpoints cannot hold.
    fn param_groups(&self) -> Option<Vec<ParamGroup>> {
        None
    }

    /// Checks param groups read from a torch.save checkpoint for
    /// [`OptimizerState::load_param_groups`], changing nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for another number of groups, a group over other parameters,
    /// of another optimizer type or with other structural options (AMSGrad, zero vs non-zero
    /// momentum), or a bad value, naming the key. By default every group is refused.
    fn check_param_groups(&self, groups: &[ParamGroup]) -> Result<()> {
        let _ = groups;
        Err(Error::InvalidState(format!(
            "{self:?} has no torch.optim twin: a torch.save checkpoint's optimizer state cannot \
             be loaded into it"
        )))
    }

    /// Applies param groups read from a torch.save checkpoint: each group's learning rate and
    /// hyper-parameters, as PyTorch's `load_state_dict` restores them.
    ///
    /// # Errors
    ///
    /// As [`OptimizerState::check_param_groups`]; nothing changes then.
    fn load_param_groups(&mut self, groups: &[ParamGroup]) -> Result<()> {
        self.check_param_groups(groups)
    }
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

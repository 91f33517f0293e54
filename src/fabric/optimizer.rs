//! [`FabricOptimizer`]: an optimizer set up with a [`super::Fabric`], stepping through its
//! scaler.
use super::{Shared, BACKWARD_MESSAGE};
use crate::checkpoint::SharedOptimizer;
use crate::error::{Error, Result};
use crate::scaler::StepOutcome;
use std::rc::Rc;
use tch::Tensor;

/// An optimizer set up by [`crate::Fabric::setup`] or [`crate::Fabric::setup_optimizers`].
/// `step` unscales, skips on inf/NaN and updates the loss scale under `16-mixed`, and says what
/// it did.
#[derive(Debug)]
pub struct FabricOptimizer {
    opt: SharedOptimizer,
    id: u64,
    shared: Rc<Shared>,
    /// `fabric.backward` calls seen at this optimizer's last step.
    seen_backward: u64,
    /// PyTorch's `param_group["initial_lr"]` of each group, set by the first learning-rate
    /// scheduler.
    initial_lrs: Vec<Option<f64>>,
}

impl FabricOptimizer {
    pub(crate) fn new(
        opt: SharedOptimizer,
        id: u64,
        shared: Rc<Shared>,
        seen_backward: u64,
    ) -> Self {
        FabricOptimizer {
            opt,
            id,
            shared,
            seen_backward,
            initial_lrs: Vec::new(),
        }
    }

    /// The Fabric it was set up with.
    pub(crate) fn shared(&self) -> &Rc<Shared> {
        &self.shared
    }

    /// The optimizer itself.
    pub(crate) fn optimizer(&self) -> &SharedOptimizer {
        &self.opt
    }

    /// One optimizer step. Under `16-mixed` a step whose gradients hold inf/NaN is skipped
    /// (and reported), and the loss scale is updated once every optimizer of the Fabric has
    /// stepped (see [`crate::Fabric::update_scale`]).
    ///
    /// # Errors
    ///
    /// Lightning's "requires you to call `fabric.backward(loss)`" under a mixed precision when
    /// no `fabric.backward` ran since this optimizer's last step (a plain `loss.backward()`
    /// would otherwise train on scaled gradients); [`crate::Error::Usage`] when this optimizer already
    /// stepped since the last scale update; the scaler's and the optimizer's errors, after
    /// which nothing has changed.
    pub fn step(&mut self) -> Result<StepOutcome> {
        let mut state = self.shared.state.borrow_mut();
        let st = &mut *state;
        if self.shared.precision().is_mixed() && st.backward_count == self.seen_backward {
            return Err(Error::Usage(BACKWARD_MESSAGE.to_string()));
        }
        let outcome = st.scaler.step(&mut **self.opt.borrow_mut()).map_err(|e| {
            if !st.scaler.has_stepped(self.id) {
                return e;
            }
            Error::Usage(
                "this optimizer already stepped since the last loss-scale update. The scale \
                     updates once every optimizer set up with this Fabric has stepped; a loop \
                     that does not step all of them in every iteration calls \
                     `fabric.update_scale()` at the end of each iteration"
                    .into(),
            )
        })?;
        let all_stepped = st
            .optimizers
            .iter()
            .all(|o| st.scaler.has_stepped(o.borrow().params().id()));
        if all_stepped {
            st.scaler.update()?;
        }
        self.seen_backward = st.backward_count;
        st.step_count += 1;
        Ok(outcome)
    }

    /// Drops the gradients (`zero_grad(set_to_none=True)`), and what this iteration knew of
    /// them.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if libtorch refuses.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.shared.state.borrow_mut().scaler.forget_grads(self.id);
        self.opt.borrow_mut().zero_grad()
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.opt.borrow().lr()
    }

    /// Sets the learning rate of every param group.
    ///
    /// # Errors
    ///
    /// The optimizer's error for a rate it refuses (nothing changes then).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.opt.borrow_mut().set_lr(lr)
    }

    /// Each param group's learning rate.
    pub fn group_lrs(&self) -> Vec<f64> {
        self.opt.borrow().group_lrs()
    }

    /// Sets param group `group`'s learning rate (`param_groups[group]["lr"] = lr`).
    ///
    /// # Errors
    ///
    /// The optimizer's error for a group it lacks or a rate it refuses (nothing changes then).
    pub fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.opt.borrow_mut().set_group_lr(group, lr)
    }

    /// PyTorch's `param_group["initial_lr"]` of each group: the rate when the first
    /// learning-rate scheduler was built on this optimizer (`None` before), the base rate of
    /// the later ones.
    pub fn initial_lrs(&self) -> Vec<Option<f64>> {
        let groups = self.opt.borrow().group_lrs().len();
        (0..groups)
            .map(|g| self.initial_lrs.get(g).copied().flatten())
            .collect()
    }

    /// Sets what [`FabricOptimizer::initial_lrs`] reads for param group `group` (schedulers do
    /// this).
    pub fn set_initial_lr(&mut self, group: usize, lr: f64) {
        if self.initial_lrs.len() <= group {
            self.initial_lrs.resize(group + 1, None);
        }
        self.initial_lrs[group] = Some(lr);
    }

    /// The optimizer's momentum (SGD's `momentum`, the Adam family's `beta1`), if it has one.
    pub fn momentum(&self) -> Option<f64> {
        self.opt.borrow().momentum()
    }

    /// Sets the momentum (as [`crate::lr_scheduler::OneCycleLR`] does).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Usage`] for an optimizer without one.
    pub fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.opt.borrow_mut().set_momentum(momentum)
    }

    /// The parameters' current gradients, with their names (parameters without one are left
    /// out).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if libtorch cannot hand them out.
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        let opt = self.opt.borrow();
        let grads = opt.params().grads()?;
        Ok(grads
            .defined()
            .map(|(i, g)| (opt.params().names()[i].clone(), g.shallow_clone()))
            .collect())
    }

    /// The optimizer's own state as named tensors (empty for tch's optimizers).
    ///
    /// # Errors
    ///
    /// As [`crate::optim::OptimizerState::state_tensors`].
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.opt.borrow().state_tensors()
    }
}

//! The training step's calls: `backward` (scaled, and averaged across processes by the
//! Reducers), `no_backward_sync`, `clip_gradients`, and the loss scale's accessors.
use super::{Fabric, FabricModule, FabricOptimizer, Shared};
use crate::clip::{Clip, GradNorm};
use crate::error::{Error, Op, Result};
use crate::scaler::GradScalerState;
use std::rc::Rc;
use tch::Tensor;

impl Fabric {
    /// `loss.backward()`, scaled under `16-mixed` (`scaler.scale(loss).backward()`).
    ///
    /// Under DDP the gradients of every model set up (its trainable variables at setup) are
    /// averaged across processes by libtorch's `c10d::Reducer`, as PyTorch's
    /// `DistributedDataParallel` does: in buckets of at most
    /// [`crate::FabricBuilder::bucket_cap_mb`], each all-reduced during the backward as soon as its
    /// gradients are ready, so every rank steps on the same gradient. Every rank must call it;
    /// every parameter must get a gradient (else the next backward fails naming the ones that
    /// did not) unless [`crate::FabricBuilder::find_unused_parameters`].
    ///
    /// On the CPU, before the gradients are exchanged, the ranks check that they are at the
    /// same point of the loop (optimizer steps, backward calls, which models are under
    /// [`Fabric::no_backward_sync`]): one all-reduce of 48 bytes. A rank that skipped or
    /// repeated a backward, or paused the sync alone, then fails on every rank instead of
    /// averaging another step's gradients. (On CUDA the check is not made: reading its result
    /// would wait for the GPU at every backward.)
    ///
    /// # Errors
    ///
    /// libtorch's error if `loss` does not require gradients; c10d's error when a process is
    /// gone; [`crate::Error::Distributed`] when the ranks are at different points of the loop.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        let mut st = self.shared.state.borrow_mut();
        if self.device() == tch::Device::Cpu && st.model_sync.iter().any(|s| s.reducer.is_some()) {
            let synced = st
                .model_sync
                .iter()
                .enumerate()
                .filter(|(_, s)| s.paused == 0)
                .fold(0u64, |mask, (i, _)| mask | (1u64 << (i % 64)));
            let here = crate::dist::LoopPoint {
                steps: st.step_count,
                backwards: st.backward_count,
                synced,
            };
            crate::dist::same_loop_point(&self.shared.group, here, self.device())?;
        }
        let scaled = st.scaler.scale(loss)?;
        // DDP: each model's Reducer is armed unless a NoBackwardSync guard pauses it (then its
        // gradients accumulate locally until the next synced backward); armed, it averages the
        // gradients bucket by bucket while the backward runs.
        for sync in st.model_sync.iter().filter(|s| s.paused == 0) {
            if let Some(r) = &sync.reducer {
                r.prepare(&[&scaled])?;
            }
        }
        if let Err(e) = scaled.f_backward().op("backward") {
            // A Reducer's all-reduce failed inside the backward: name the ranks that never came.
            let missing = self.shared.group.missing_ranks();
            return Err(match e {
                Error::Native { op, message } if !missing.is_empty() => Error::Native {
                    op,
                    message: format!("{missing}: {message}"),
                },
                other => other,
            });
        }
        st.backward_count += 1;
        Ok(())
    }

    /// Lightning's `fabric.no_backward_sync(module, enabled)`: while the guard lives (and
    /// `enabled` is true), [`Fabric::backward`] does not average `module`'s gradients across
    /// processes; they accumulate locally, and the first `backward` after the guard is dropped
    /// averages what accumulated. Use it on every micro-batch of a gradient-accumulation loop
    /// but the last:
    ///
    /// ```
    /// # use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
    /// # use tch_fabric::{Fabric, FusedAdamW};
    /// let fabric = Fabric::new("32-true")?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let layer = nn::linear(vs.root() / "fc", 4, 1, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-2)?;
    /// let (model, mut opt) = fabric.setup(layer, &mut vs, opt)?;
    /// let micro = 4;
    /// for k in 0..micro {
    ///     let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    ///     let _sync = fabric.no_backward_sync(&model, k + 1 < micro)?;
    ///     let loss = model.forward(&x).sum(Kind::Float) / micro as f64;
    ///     fabric.backward(&loss)?;
    /// }
    /// opt.step()?;
    /// opt.zero_grad()?;
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// In one process there is nothing to synchronise and the guard changes nothing (as
    /// Lightning's single-device strategy). Under `16-mixed` every micro-batch's loss is
    /// scaled by `backward`; the unscale, clip, step and scale update happen once, at the
    /// optimizer step.
    ///
    /// # Errors
    ///
    /// Lightning's "You need to set up the model first" for a module this Fabric did not set
    /// up.
    pub fn no_backward_sync<M>(
        &self,
        module: &FabricModule<M>,
        enabled: bool,
    ) -> Result<NoBackwardSync> {
        let (id, index) = module.origin();
        if id != self.shared.id {
            return Err(Error::Usage(
                "You need to set up the model first before you can call \
                 `fabric.no_backward_sync()`: `model = fabric.setup(model, ...)` (this module \
                 was set up by another Fabric)"
                    .into(),
            ));
        }
        if enabled {
            if let Some(sync) = self.shared.state.borrow_mut().model_sync.get_mut(index) {
                sync.paused += 1;
            }
        }
        Ok(NoBackwardSync {
            shared: Rc::clone(&self.shared),
            model: enabled.then_some(index),
        })
    }

    /// Clips the gradients of `optimizer`'s parameters and returns their global norm before
    /// clipping (of order `norm_type` for norm clipping, the 2-norm for value clipping) as a
    /// 0-dim tensor on the device: nothing waits for the device unless
    /// [`Clip::error_if_nonfinite`] asks for the check (read it with [`GradNorm::value`] when
    /// you need the number).
    ///
    /// Under `16-mixed` the gradients are unscaled first (once per iteration, however often
    /// this is called). On an overflow step the norm is inf/NaN: it is returned, not raised
    /// (Lightning raises by default; [`Clip::error_if_nonfinite`] restores that), and the step
    /// that follows is skipped. With a fused optimizer ([`crate::FusedAdamW`],
    /// [`crate::FusedSgd`]) the 2-norm costs one read pass over the gradients and the optimizer
    /// applies unscale and clip together (see [`crate::GradScalerConfig::fold_clipping`]).
    ///
    /// Under DDP the gradients were averaged by [`Fabric::backward`], so the norm is that of
    /// the global gradient and identical on every rank: every rank clips alike.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Usage`] for an optimizer set up by another Fabric; [`crate::Error::InvalidConfig`] for
    /// a bad clip value; the scaler's unscale errors; with `error_if_nonfinite`, PyTorch's
    /// error for a non-finite norm.
    pub fn clip_gradients(&self, optimizer: &mut FabricOptimizer, clip: Clip) -> Result<GradNorm> {
        if !Rc::ptr_eq(optimizer.shared(), &self.shared) {
            return Err(Error::Usage(
                "clip_gradients got an optimizer set up by another Fabric: its gradients are \
                 scaled (or not) by that Fabric's precision"
                    .into(),
            ));
        }
        let mut st = self.shared.state.borrow_mut();
        let mut opt = optimizer.optimizer().borrow_mut();
        st.scaler.clip(&mut **opt, &clip).map(GradNorm::new)
    }

    /// Updates the loss scale from the steps since the last update, if there were any (one
    /// `torch.amp.GradScaler.update()`); without a scaler, or right after an update, it does
    /// nothing.
    ///
    /// The scale updates by itself once per iteration: right after the step of the last
    /// optimizer set up with this Fabric to step since the previous update, i.e. once every
    /// optimizer has stepped (one optimizer: after each step). A loop that does not step every
    /// optimizer every iteration calls this at the end of each iteration; without it, an
    /// optimizer that steps a second time before the update is refused with an error saying so.
    /// [`Fabric::save`] also updates first.
    ///
    /// # Errors
    ///
    /// The policy's "already at minimum" error ([`crate::scaler::AtMinScale::Error`]).
    pub fn update_scale(&self) -> Result<()> {
        let mut st = self.shared.state.borrow_mut();
        if st.scaler.has_pending_checks() {
            st.scaler.update()?;
        }
        Ok(())
    }

    /// The current loss scale (1.0 without a scaler).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if it cannot be read from the device.
    pub fn loss_scale(&self) -> Result<f64> {
        self.shared.state.borrow().scaler.get_scale()
    }

    /// The GradScaler's state with PyTorch's keys (empty without a scaler).
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn scaler_state(&self) -> Result<GradScalerState> {
        self.shared.state.borrow().scaler.state_dict()
    }

    /// Optimizer steps skipped because of inf/NaN gradients so far (reads the device after
    /// sync-free steps).
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn skipped_steps(&self) -> Result<u64> {
        self.shared.state.borrow().scaler.steps_skipped()
    }

    /// Steps skipped in a row up to now (0 after a taken step), so a loop can stop a run that
    /// makes no progress; the scaler also warns after
    /// [`crate::GradScalerConfig::warn_after_skips`] of them.
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn consecutive_skipped_steps(&self) -> Result<u64> {
        self.shared.state.borrow().scaler.consecutive_skips()
    }
}

/// The guard of [`Fabric::no_backward_sync`]: the module's gradients are synchronised again
/// once it is dropped.
#[must_use = "the synchronisation resumes as soon as the guard is dropped"]
#[derive(Debug)]
pub struct NoBackwardSync {
    shared: Rc<Shared>,
    /// The model whose synchronisation it pauses (`None` when not enabled).
    model: Option<usize>,
}

impl Drop for NoBackwardSync {
    fn drop(&mut self) {
        // The state is never borrowed while user code runs, where guards are dropped.
        if let (Some(i), Ok(mut st)) = (self.model, self.shared.state.try_borrow_mut()) {
            if let Some(sync) = st.model_sync.get_mut(i) {
                sync.paused = sync.paused.saturating_sub(1);
            }
        }
    }
}

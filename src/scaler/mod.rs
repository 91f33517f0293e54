//! [`GradScaler`]: dynamic loss scaling with PyTorch's exact numerics.
//!
//! The default behaviour is `torch.amp.GradScaler`'s, bit for bit: the same lazily created
//! float32 scale and int32 growth tracker, the same `inv_scale` rounding, one native
//! `_amp_foreach_non_finite_check_and_unscale_` call per (device, dtype) group, one native
//! `_amp_update_scale_` per iteration, the same errors. What PyTorch lacks is opt-in: a
//! [`ScalePolicy`] with bounds and hysteresis, a [`StepOutcome`] that says when a step was
//! skipped and why, counters, and bfloat16 gradients on CUDA.
//!
//! A disabled scaler (`GradScalerConfig::enabled(false)`, what a [`crate::Fabric`] holds where
//! its precision needs no scaling) passes everything through, and still remembers the
//! gradients a clip fetched so that the step does not fetch them again.
//!
//! Per optimizer the scaler keeps a `Stage` that carries its own data; a stage
//! changes only after the operation that moves it succeeded, so a failed step (an optimizer
//! error, an allocation failure) leaves the scaler as it was.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod` | [`GradScaler`] and its public calls |
//! | `step` | the step (fused, unscaled, disabled) and clipping, folded or not: the one place that decides |
//! | `stage` | what the scaler knows of one optimizer within an iteration, and its overflow flags |
//! | `scale` | the scale and growth tracker, `inv_scale`, the update |
//! | `skips` | counts of taken and skipped steps |
//! | `unscale` | the passes over the gradients: unscale, inf check, divide, names of bad gradients |
//! | `config`, `policy`, `state`, `outcome` | [`GradScalerConfig`], [`ScalePolicy`], [`GradScalerState`], [`StepOutcome`] |
mod config;
mod outcome;
mod policy;
mod scale;
mod skips;
mod stage;
mod state;
mod step;
mod unscale;

pub use config::GradScalerConfig;
pub use outcome::StepOutcome;
pub use policy::{AtMinScale, ScalePolicy};
pub use state::GradScalerState;

use crate::device::on_device;
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::Optimizer;
use crate::params::GradBatch;
use config::{
    check_backoff_factor, check_growth_factor, check_growth_interval, check_init_scale, invalid,
};
use scale::LossScale;
use skips::Skips;
use stage::{combine, Flag, Stage};
use std::collections::HashMap;
use std::rc::Rc;
use tch::Tensor;

/// Combines a freshly computed found_inf flag across processes in place (an all-reduce with
/// max), so that every rank of a data-parallel run skips the same steps.
#[derive(Clone)]
pub(crate) struct FoundInfSync(pub(crate) Rc<SyncFn>);

type SyncFn = dyn Fn(&Tensor) -> Result<()>;

impl std::fmt::Debug for FoundInfSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FoundInfSync")
    }
}

/// Dynamic loss scaling for float16 training, with `torch.amp.GradScaler`'s numerics.
///
/// The usual loop: `scaler.scale(&loss)?.backward()`, then `scaler.step(&mut opt)?` (which
/// unscales, checks for inf/NaN and skips the step on overflow), then `scaler.update()?` once
/// per iteration, after every optimizer stepped.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::{GradScaler, GradScalerConfig, Optimizer, TchOptimizer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root(), 4, 1, Default::default());
/// let mut opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1)?;
/// let mut scaler = GradScaler::new(GradScalerConfig::default())?;
///
/// let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// opt.zero_grad()?;
/// let loss = model.forward(&x).pow_tensor_scalar(2).mean(None);
/// scaler.scale(&loss)?.backward();
/// let outcome = scaler.step(&mut opt)?;
/// scaler.update()?;
/// assert!(!outcome.is_skipped());
/// assert_eq!(scaler.get_scale()?, 65536.0);
/// assert_eq!(scaler.growth_tracker()?, 1);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    /// The scale, `None` when disabled.
    loss_scale: Option<LossScale>,
    /// What each optimizer did this iteration, by its parameters' id.
    stages: HashMap<u64, Stage>,
    /// found_inf flags of `unscale_grads` calls (no optimizer) in this iteration.
    tensor_found_infs: Vec<Flag>,
    skips: Skips,
    found_inf_sync: Option<FoundInfSync>,
    /// `scale` calls so far: gradients a stage fetched are used by the step only while no
    /// backward has run since.
    backwards: u64,
}

const NO_SCALE: &str = "but _scale is None.  This may indicate your script did not use \
                        scaler.scale(loss or outputs) earlier in the iteration.";

fn no_scale(what: &str) -> Error {
    Error::Usage(format!("Attempted {what} {NO_SCALE}"))
}

impl GradScaler {
    /// A scaler with `config`; its tensors are created by the first [`GradScaler::scale`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range value.
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(GradScaler {
            loss_scale: config.enabled.then(|| LossScale::new(&config)),
            config,
            stages: HashMap::new(),
            tensor_found_infs: Vec::new(),
            skips: Skips::new(),
            found_inf_sync: None,
            backwards: 0,
        })
    }

    /// Every found_inf flag this scaler computes goes through `sync` before anything reads it.
    pub(crate) fn set_found_inf_sync(&mut self, sync: FoundInfSync) {
        self.found_inf_sync = Some(sync);
    }

    /// The configuration.
    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// Whether scaling is on.
    pub fn is_enabled(&self) -> bool {
        self.loss_scale.is_some()
    }

    /// The current scale (1.0 when disabled; the initial scale before the first `scale`).
    /// Reading it synchronises with the device.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if the device cannot be read.
    pub fn get_scale(&self) -> Result<f64> {
        self.loss_scale.as_ref().map_or(Ok(1.0), LossScale::value)
    }

    /// Clean steps since the last growth or back-off (0 when disabled).
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn growth_tracker(&self) -> Result<i64> {
        self.loss_scale
            .as_ref()
            .map_or(Ok(0), LossScale::tracker_value)
    }

    /// The scale tensor (0-dim float32 on the device of the first scaled loss), once created.
    pub fn scale_tensor(&self) -> Option<&Tensor> {
        Some(&self.loss_scale.as_ref()?.tensors.as_ref()?.scale)
    }

    /// Optimizer steps taken through [`GradScaler::step`] while scaling (0 when disabled).
    /// Counting queued steps reads one number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn steps_taken(&self) -> Result<u64> {
        self.skips.taken()
    }

    /// Optimizer steps skipped because gradients held inf/NaN. Counting queued steps reads one
    /// number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn steps_skipped(&self) -> Result<u64> {
        self.skips.skipped()
    }

    /// Steps skipped in a row up to now (0 after a taken step). After queued steps this reads
    /// one number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn consecutive_skips(&self) -> Result<u64> {
        self.skips.consecutive()
    }

    /// `loss * scale`. The first call creates the scale and growth tracker on `loss`'s device.
    /// Disabled, the loss itself.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch refuses the multiplication.
    pub fn scale(&mut self, loss: &Tensor) -> Result<Tensor> {
        self.backwards += 1;
        let Some(ls) = &mut self.loss_scale else {
            return Ok(loss.shallow_clone());
        };
        let device = native::meta(loss)?
            .ok_or_else(|| Error::Usage("scale() got an undefined tensor".into()))?
            .device;
        let t = ls.lazy_init(device)?;
        let scale = on_device(&t.scale, t.device, device)?;
        loss.f_mul(&scale).op("mul")
    }

    /// Unscales `grads` in place and records whether any held inf/NaN for this iteration's
    /// [`GradScaler::update`]. No optimizer is needed: this is the tensor-level form, for
    /// custom update rules. Read the result with [`GradScaler::found_inf`].
    ///
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// use tch_fabric::{GradScaler, GradScalerConfig};
    /// let mut scaler = GradScaler::new(GradScalerConfig::default().init_scale(4.0))?;
    /// let _ = scaler.scale(&Tensor::ones([], (Kind::Float, Device::Cpu)))?;
    /// let grads = [Tensor::full([3], 2.0, (Kind::Float, Device::Cpu))];
    /// scaler.unscale_grads(&grads)?;                 // one native call for the whole list
    /// assert_eq!(grads[0].double_value(&[0]), 0.5);
    /// assert!(!scaler.found_inf()?);
    /// scaler.update()?;                              // a clean step: the tracker counts it
    /// assert_eq!(scaler.growth_tracker()?, 1);
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// PyTorch's error when `scale` was never called; "Attempting to unscale FP16 gradients."
    /// unless allowed; [`Error::Native`] from libtorch.
    pub fn unscale_grads(&mut self, grads: &[Tensor]) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let batch = GradBatch::from_tensors(grads)?;
        if let Some(flag) = self.unscale_batch(&batch, "unscale_grads")? {
            self.tensor_found_infs.push(flag);
        }
        Ok(())
    }

    /// Whether anything unscaled since the last update held inf/NaN (synchronises).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if a flag cannot be read.
    pub fn found_inf(&self) -> Result<bool> {
        for f in self.flags() {
            if f.tensor.f_double_value(&[]).op("item")? != 0.0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Unscales the optimizer's gradients in place (`scaler.unscale_(optimizer)`), e.g. before
    /// clipping. At most once per optimizer per iteration.
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "unscale_() has already been called on this optimizer since the last
    /// update().", "unscale_() is being called after step().", no `scale` yet, FP16 gradients.
    pub fn unscale<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let id = opt.params().id();
        match self.stages.get(&id) {
            Some(Stage::Unscaled { .. } | Stage::Folded { .. }) => {
                return Err(Error::Usage(
                    "unscale_() has already been called on this optimizer since the last update()."
                        .into(),
                ))
            }
            Some(Stage::Stepped { .. }) => {
                return Err(Error::Usage(
                    "unscale_() is being called after step().".into(),
                ))
            }
            None => {}
        }
        let grads = opt.params().grads()?;
        self.unscale_into_stage(id, grads)
    }

    /// Updates the scale once for the iteration from every overflow flag recorded since the
    /// last update (all optimizers, all devices, `unscale_grads` calls): one native
    /// `_amp_update_scale_` for the default policy. Every optimizer is ready again afterwards.
    ///
    /// # Errors
    ///
    /// PyTorch's "No inf checks were recorded prior to update."; the policy's "already at
    /// minimum" error (nothing changes then).
    pub fn update(&mut self) -> Result<()> {
        let Some(ls) = &self.loss_scale else {
            return Ok(());
        };
        let device = ls
            .tensors
            .as_ref()
            .ok_or_else(|| no_scale("update"))?
            .device;
        let flags: Vec<Flag> = self.flags().map(Flag::shallow).collect();
        let combined = combine(flags, device)?
            .ok_or_else(|| Error::Usage("No inf checks were recorded prior to update.".into()))?;
        if let Some(ls) = &mut self.loss_scale {
            ls.update(&self.config, &combined)?;
        }
        self.reset_iteration();
        Ok(())
    }

    /// Sets the scale to `new_scale` instead of updating it (`scaler.update(new_scale)`); the
    /// growth tracker is left as is, as in PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a scale that is not finite and > 0; no `scale` yet.
    pub fn update_to(&mut self, new_scale: f64) -> Result<()> {
        let Some(ls) = &self.loss_scale else {
            return Ok(());
        };
        check_init_scale(new_scale)
            .map_err(|_| invalid("new_scale", new_scale, "finite and > 0"))?;
        if ls.tensors.is_none() {
            return Err(no_scale("update"));
        }
        ls.fill(new_scale, None)?;
        self.reset_iteration();
        Ok(())
    }

    /// The state with PyTorch's keys (empty when disabled, as PyTorch).
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn state_dict(&self) -> Result<GradScalerState> {
        let Some(ls) = &self.loss_scale else {
            return Ok(GradScalerState::default());
        };
        Ok(GradScalerState {
            scale: Some(ls.value()?),
            growth_factor: Some(self.config.growth_factor),
            backoff_factor: Some(self.config.backoff_factor),
            growth_interval: Some(self.config.growth_interval),
            growth_tracker: Some(ls.tracker_value()?),
        })
    }

    /// Checks a state for [`GradScaler::load_state_dict`] without applying it.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::load_state_dict`].
    pub fn check_state_dict(&self, state: &GradScalerState) -> Result<()> {
        checked_state(state).map(|_| ())
    }

    /// Loads a state written by [`GradScaler::state_dict`] or by PyTorch. Loading before the
    /// first `scale` sets the values the lazy initialisation will use, as PyTorch.
    ///
    /// # Errors
    ///
    /// PyTorch's error for an empty state; [`Error::InvalidState`] for a missing key or a value
    /// the configuration would refuse. Nothing is changed on error.
    pub fn load_state_dict(&mut self, state: &GradScalerState) -> Result<()> {
        let Some(ls) = &mut self.loss_scale else {
            return Ok(());
        };
        let (scale, growth_factor, backoff_factor, growth_interval, tracker) =
            checked_state(state)?;
        ls.fill(scale, Some(tracker))?;
        ls.init_scale = scale;
        ls.init_growth_tracker = tracker;
        ls.hysteresis_left = self.config.policy.hysteresis;
        self.config.growth_factor = growth_factor;
        self.config.backoff_factor = backoff_factor;
        self.config.growth_interval = growth_interval;
        Ok(())
    }

    /// Whether [`GradScaler::update`] has flags to consume.
    pub(crate) fn has_pending_checks(&self) -> bool {
        self.flags().next().is_some()
    }

    /// Forgets this iteration's stages and flags without updating (after loading a
    /// checkpoint, or an update).
    pub(crate) fn reset_iteration(&mut self) {
        self.stages.clear();
        self.tensor_found_infs.clear();
    }

    /// Whether the optimizer with parameters `id` stepped since the last update (only
    /// recorded while scaling: without a scaler there is no update to wait for).
    pub(crate) fn has_stepped(&self, id: u64) -> bool {
        matches!(self.stages.get(&id), Some(Stage::Stepped { .. }))
    }

    /// Forgets what this iteration knew of an optimizer's gradients (they were dropped or
    /// replaced): the next clip or step reads them afresh. A step already taken stays
    /// recorded.
    pub(crate) fn forget_grads(&mut self, id: u64) {
        if !matches!(self.stages.get(&id), Some(Stage::Stepped { .. }) | None) {
            self.stages.remove(&id);
        }
    }

    /// Every overflow flag recorded since the last update.
    fn flags(&self) -> impl Iterator<Item = &Flag> {
        self.stages
            .values()
            .filter_map(Stage::found_inf)
            .chain(self.tensor_found_infs.iter())
    }

    /// Unscales `grads` in place by `1 / scale` and returns their overflow flag, combined on
    /// the scale's device and synchronised across processes (`None` without gradients).
    fn unscale_batch(&self, grads: &GradBatch, what: &str) -> Result<Option<Flag>> {
        let t = self
            .loss_scale
            .as_ref()
            .and_then(|ls| ls.tensors.as_ref())
            .ok_or_else(|| no_scale(what))?;
        let inv_scale = LossScale::inv_scale(t)?;
        let flags = unscale::unscale_batch(
            grads,
            &inv_scale,
            t.device,
            self.config.allow_fp16_grads,
            false,
        )?;
        self.record_flags(flags, t.device)
    }

    /// Several devices' flags as one on `device`, synchronised across processes before anything
    /// reads it.
    fn record_flags(&self, flags: Vec<Flag>, device: tch::Device) -> Result<Option<Flag>> {
        let flag = combine(flags, device)?;
        if let (Some(f), Some(sync)) = (&flag, &self.found_inf_sync) {
            (sync.0)(&f.tensor)?;
        }
        Ok(flag)
    }

    /// Unscales gradients fetched for optimizer `id` and records them as its stage.
    fn unscale_into_stage(&mut self, id: u64, grads: GradBatch) -> Result<()> {
        let found_inf = self.unscale_batch(&grads, "unscale_")?;
        self.stages.insert(
            id,
            Stage::Unscaled {
                found_inf,
                grads,
                backward: self.backwards,
            },
        );
        Ok(())
    }
}

/// A state's values, every one checked: (scale, growth factor, backoff factor, growth
/// interval, growth tracker).
fn checked_state(state: &GradScalerState) -> Result<(f64, f64, f64, i64, i64)> {
    if state.is_empty() {
        return Err(Error::InvalidState(
            "The source state dict is empty, possibly because it was saved from a disabled \
             instance of GradScaler."
                .into(),
        ));
    }
    let missing = |key: &str| Error::InvalidState(format!("missing key '{key}'"));
    let scale = state.scale.ok_or_else(|| missing("scale"))?;
    let growth_factor = state
        .growth_factor
        .ok_or_else(|| missing("growth_factor"))?;
    let backoff_factor = state
        .backoff_factor
        .ok_or_else(|| missing("backoff_factor"))?;
    let growth_interval = state
        .growth_interval
        .ok_or_else(|| missing("growth_interval"))?;
    let tracker = state
        .growth_tracker
        .ok_or_else(|| missing("_growth_tracker"))?;
    let bad = |e: Error| Error::InvalidState(e.to_string());
    check_init_scale(scale).map_err(|_| bad(invalid("scale", scale, "finite and > 0")))?;
    check_growth_factor(growth_factor).map_err(bad)?;
    check_backoff_factor(backoff_factor).map_err(bad)?;
    check_growth_interval(growth_interval).map_err(bad)?;
    if !(0..=i64::from(i32::MAX)).contains(&tracker) {
        return Err(bad(invalid(
            "_growth_tracker",
            tracker,
            "in 0..=2147483647",
        )));
    }
    Ok((
        scale,
        growth_factor,
        backoff_factor,
        growth_interval,
        tracker,
    ))
}

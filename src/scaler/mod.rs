//! [`GradScaler`]: dynamic loss scaling with PyTorch's exact numerics.
//!
//! The default behaviour is `torch.amp.GradScaler`'s, bit for bit: the same lazily created
//! float32 scale and int32 growth tracker, the same `inv_scale` rounding, one native
//! `_amp_foreach_non_finite_check_and_unscale_` call per (device, dtype) group, one native
//! `_amp_update_scale_` per iteration, the same errors. What PyTorch lacks is opt-in: a
//! [`ScalePolicy`] with bounds and hysteresis, a [`StepOutcome`] that says when a step was
//! skipped and why, counters, and bfloat16 gradients on CUDA.
//!
//! Per optimizer the scaler keeps a [`Stage`] that carries its own data; a stage changes only
//! after the operation that moves it succeeded, so a failed step (an optimizer error, an
//! allocation failure) leaves the scaler as it was.
mod config;
mod policy;
mod state;
mod unscale;

pub use config::GradScalerConfig;
pub use policy::{AtMinScale, ScalePolicy};
pub use state::GradScalerState;

use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::{on_device, Amp, Optimizer};
use crate::params::GradBatch;
use config::{
    check_backoff_factor, check_growth_factor, check_growth_interval, check_init_scale, invalid,
};
use policy::{next_scale, ScaleState};
use std::collections::HashMap;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// What [`GradScaler::step`] did.
///
/// ```
/// # use tch_fabric::StepOutcome;
/// # let outcome = StepOutcome::Skipped { scale_before: 65536.0, scale_after: 32768.0, consecutive: 1, nonfinite: vec![] };
/// match outcome {
///     StepOutcome::Stepped => {}
///     StepOutcome::Skipped { scale_before, scale_after, consecutive, .. } => {
///         println!("overflow: skipped ({consecutive} in a row), scale {scale_before} -> {scale_after}")
///     }
///     StepOutcome::Queued => {} // decided on the device; see GradScaler::steps_skipped
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The optimizer stepped.
    Stepped,
    /// Gradients held inf/NaN: the optimizer did not step and no parameter changed.
    Skipped {
        /// The scale this iteration used.
        scale_before: f64,
        /// The scale the next [`GradScaler::update`] will set.
        scale_after: f64,
        /// Steps skipped in a row, this one included (see
        /// [`GradScalerConfig::warn_after_skips`]).
        consecutive: u64,
        /// Parameters whose gradients were not finite, when
        /// [`GradScalerConfig::diagnose_skips`] is on (empty otherwise).
        nonfinite: Vec<String>,
    },
    /// A fused optimizer's step was queued on the device together with its skip decision
    /// (see [`GradScalerConfig::sync_free`]): nothing was read back to the host, so whether
    /// it was skipped is not known yet. [`GradScaler::steps_skipped`] counts it when read.
    Queued,
}

impl StepOutcome {
    /// Whether the step is known to have been skipped ([`StepOutcome::Queued`] is not).
    pub fn is_skipped(&self) -> bool {
        matches!(self, StepOutcome::Skipped { .. })
    }
}

/// Where one optimizer is in the iteration; absent from the map means ready. Each stage holds
/// what the next operation needs, so the two can never disagree.
#[derive(Debug)]
enum Stage {
    /// The gradients were unscaled in place (by `unscale` or an ordinary clip).
    Unscaled {
        found_inf: Vec<Tensor>,
        grads: GradBatch,
    },
    /// 2-norm clipping was folded into `divisor` (`scale / clip_coef`); the gradients are still
    /// scaled.
    Folded {
        found_inf: Tensor,
        divisor: Tensor,
        grads: GradBatch,
    },
    /// The optimizer stepped, or skipped, in this iteration.
    Stepped { found_inf: Vec<Tensor> },
}

impl Stage {
    fn found_infs(&self) -> &[Tensor] {
        match self {
            Stage::Unscaled { found_inf, .. } | Stage::Stepped { found_inf } => found_inf,
            Stage::Folded { found_inf, .. } => std::slice::from_ref(found_inf),
        }
    }
}

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

/// How many steps in a row were skipped: known on the host, or counted on the device by
/// queued (sync-free) steps.
#[derive(Debug)]
enum Consecutive {
    Host(u64),
    Device(Tensor),
}

/// The state of an enabled scaler.
#[derive(Debug)]
struct Active {
    /// 0-dim float32 and int32, created by the first `scale` on the loss's device.
    scale: Option<(Tensor, Tensor)>,
    /// Values the lazy initialisation uses (changed by loading a state before the first scale).
    init_scale: f64,
    init_growth_tracker: i64,
    hysteresis_left: u32,
    stages: HashMap<u64, Stage>,
    /// found_inf flags of `unscale_grads` calls (no optimizer) in this iteration.
    tensor_found_infs: Vec<Tensor>,
    steps_taken: u64,
    steps_skipped: u64,
    /// Steps returned as [`StepOutcome::Queued`], and how many of them skipped (a float32
    /// count on the device, read only when asked for).
    steps_queued: u64,
    skipped_on_device: Option<Tensor>,
    consecutive: Consecutive,
    found_inf_sync: Option<FoundInfSync>,
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
    /// `None` when disabled: every method is then a pass-through.
    active: Option<Active>,
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
        let active = config.enabled.then(|| Active {
            scale: None,
            init_scale: config.init_scale,
            init_growth_tracker: 0,
            hysteresis_left: config.policy.hysteresis,
            stages: HashMap::new(),
            tensor_found_infs: Vec::new(),
            steps_taken: 0,
            steps_skipped: 0,
            steps_queued: 0,
            skipped_on_device: None,
            consecutive: Consecutive::Host(0),
            found_inf_sync: None,
        });
        Ok(GradScaler { config, active })
    }

    /// Every found_inf flag this scaler computes goes through `sync` before anything reads it.
    pub(crate) fn set_found_inf_sync(&mut self, sync: FoundInfSync) {
        if let Some(a) = &mut self.active {
            a.found_inf_sync = Some(sync);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// Whether scaling is on.
    pub fn is_enabled(&self) -> bool {
        self.active.is_some()
    }

    /// The current scale (1.0 when disabled; the initial scale before the first `scale`).
    /// Reading it synchronises with the device.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if the device cannot be read.
    pub fn get_scale(&self) -> Result<f64> {
        match &self.active {
            None => Ok(1.0),
            Some(a) => a.scale_value(),
        }
    }

    /// Clean steps since the last growth or back-off (0 when disabled).
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn growth_tracker(&self) -> Result<i64> {
        match &self.active {
            None => Ok(0),
            Some(a) => a.tracker_value(),
        }
    }

    /// The scale tensor (0-dim float32 on the device of the first scaled loss), once created.
    pub fn scale_tensor(&self) -> Option<&Tensor> {
        self.active.as_ref()?.scale.as_ref().map(|(s, _)| s)
    }

    /// Optimizer steps taken through [`GradScaler::step`]. Counting queued steps reads one
    /// number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn steps_taken(&self) -> Result<u64> {
        match &self.active {
            None => Ok(0),
            Some(a) => Ok(a.steps_taken + a.steps_queued - a.queued_skips()?),
        }
    }

    /// Optimizer steps skipped because gradients held inf/NaN. Counting queued steps reads one
    /// number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn steps_skipped(&self) -> Result<u64> {
        match &self.active {
            None => Ok(0),
            Some(a) => Ok(a.steps_skipped + a.queued_skips()?),
        }
    }

    /// Steps skipped in a row up to now (0 after a taken step). After queued steps this reads
    /// one number from the device.
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn consecutive_skips(&self) -> Result<u64> {
        match &self.active {
            None => Ok(0),
            Some(a) => a.consecutive_value(),
        }
    }

    /// `loss * scale`. The first call creates the scale and growth tracker on `loss`'s device.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch refuses the multiplication.
    pub fn scale(&mut self, loss: &Tensor) -> Result<Tensor> {
        let Some(a) = &mut self.active else {
            return Ok(loss.shallow_clone());
        };
        let device = native::meta(loss)?
            .ok_or_else(|| Error::Usage("scale() got an undefined tensor".into()))?
            .device;
        let scale = a.lazy_init(device)?;
        let scale = on_device(scale, device)?;
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
        let allow_fp16 = self.config.allow_fp16_grads;
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        let inv_scale = a.inv_scale("unscale_grads")?;
        let batch = GradBatch::from_tensors(grads)?;
        let found = unscale::unscale_batch(&batch, &inv_scale, allow_fp16, false)?;
        a.sync_found(&found)?;
        a.tensor_found_infs.extend(found);
        Ok(())
    }

    /// Whether anything unscaled since the last update held inf/NaN (synchronises).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if a flag cannot be read.
    pub fn found_inf(&self) -> Result<bool> {
        let Some(a) = &self.active else {
            return Ok(false);
        };
        let mut total = 0.0;
        for f in a.all_found_infs() {
            total += f.f_double_value(&[]).op("item")?;
        }
        Ok(total != 0.0)
    }

    /// Unscales the optimizer's gradients in place (`scaler.unscale_(optimizer)`), e.g. before
    /// clipping. At most once per optimizer per iteration.
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "unscale_() has already been called on this optimizer since the last
    /// update().", "unscale_() is being called after step().", no `scale` yet, FP16 gradients.
    pub fn unscale<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<()> {
        let allow_fp16 = self.config.allow_fp16_grads;
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        a.unscale(opt, allow_fp16)
    }

    /// The optimizer's gradients unscaled, unscaling them unless this iteration already did
    /// (for clipping after a user's own `unscale`, or clipping twice): the idempotent form
    /// PyTorch lacks. `None` when the scaler is disabled.
    pub(crate) fn ensure_unscaled<O: Optimizer + ?Sized>(
        &mut self,
        opt: &mut O,
    ) -> Result<Option<&GradBatch>> {
        let allow_fp16 = self.config.allow_fp16_grads;
        let Some(a) = &mut self.active else {
            return Ok(None);
        };
        let id = opt.params().id();
        match a.stages.remove(&id) {
            None => a.unscale(opt, allow_fp16)?,
            Some(Stage::Folded {
                found_inf,
                divisor,
                grads,
            }) => {
                let divided = unscale::divide(&grads, &divisor);
                let stage = match divided {
                    Ok(()) => Stage::Unscaled {
                        found_inf: vec![found_inf],
                        grads,
                    },
                    Err(_) => Stage::Folded {
                        found_inf,
                        divisor,
                        grads,
                    },
                };
                a.stages.insert(id, stage);
                divided?;
            }
            Some(stage) => {
                a.stages.insert(id, stage);
            }
        }
        match a.stages.get(&id) {
            Some(Stage::Unscaled { grads, .. }) => Ok(Some(grads)),
            _ => Err(Error::Usage(
                "unscale_() is being called after step().".into(),
            )),
        }
    }

    /// Norm clipping folded into the step, for an optimizer that unscales by itself: one read
    /// pass over the scaled gradients (`tch_fabric::unscale_sumsq_`, which also finds inf/NaN)
    /// and `scale / clip_coef` computed on the device; the optimizer then divides by that
    /// single number. Nothing is written to the gradients and nothing is read back to the
    /// host. Returns the global 2-norm of the unscaled gradients (a 0-dim device tensor), or
    /// `None` where this path does not apply (scaler off, folding off, an optimizer without
    /// AMP support, gradients already unscaled, on several devices, or of a dtype or device the
    /// op lacks): the caller then clips the ordinary way (where this fetched the gradients, it
    /// unscaled them already, so that they are fetched once).
    pub(crate) fn clip_norm_folded<O: Optimizer + ?Sized>(
        &mut self,
        opt: &mut O,
        max_norm: f64,
    ) -> Result<Option<Tensor>> {
        let allow_fp16 = self.config.allow_fp16_grads;
        let Some(a) = &mut self.active else {
            return Ok(None);
        };
        let id = opt.params().id();
        if !self.config.fold_clipping || !opt.supports_amp_scaling() || a.stages.contains_key(&id) {
            return Ok(None);
        }
        let grads = opt.params().grads()?;
        let Some(device) = unscale::op_device(&grads, allow_fp16)? else {
            a.unscale_batch(id, grads, allow_fp16)?;
            return Ok(None);
        };
        let inv_scale = a.inv_scale("unscale_")?;
        let inv_scale = on_device(&inv_scale, device)?;
        let (scale, _) = a.scale.as_ref().ok_or_else(|| no_scale("unscale_"))?;
        let scale = on_device(scale, device)?;
        let found_inf = Tensor::f_zeros([], (Kind::Float, device)).op("zeros")?;
        let all: Vec<&Tensor> = grads.defined().map(|(_, g)| g).collect();
        let sumsq = native::unscale_sumsq(&all, &found_inf, &inv_scale, false)?;
        a.sync_found(std::slice::from_ref(&found_inf))?;
        let (norm, divisor) = native::clip_divisor(&sumsq, &scale, max_norm)?;
        a.stages.insert(
            id,
            Stage::Folded {
                found_inf,
                divisor,
                grads,
            },
        );
        Ok(Some(norm))
    }

    /// Whether [`GradScaler::update`] has flags to consume.
    pub(crate) fn has_pending_checks(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.all_found_infs().next().is_some())
    }

    /// Forgets this iteration's stages and flags without updating (after loading a
    /// checkpoint).
    pub(crate) fn reset_iteration(&mut self) {
        if let Some(a) = &mut self.active {
            a.reset_iteration();
        }
    }

    /// Whether `opt` stepped since the last update.
    pub(crate) fn has_stepped(&self, id: u64) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| matches!(a.stages.get(&id), Some(Stage::Stepped { .. })))
    }

    /// Forgets what this iteration knew of `opt`'s gradients (they were dropped or replaced):
    /// the next clip or step reads them afresh. A step already taken stays recorded.
    pub(crate) fn forget_grads(&mut self, id: u64) {
        if let Some(a) = &mut self.active {
            if !matches!(a.stages.get(&id), Some(Stage::Stepped { .. }) | None) {
                a.stages.remove(&id);
            }
        }
    }

    /// Unscales (unless [`GradScaler::unscale`] already did), then steps the optimizer unless
    /// a gradient held inf/NaN. Reads the overflow flag (one sync, as PyTorch) unless the
    /// optimizer unscales by itself and the step is sync-free.
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "step() has already been called since the last update().", "No inf
    /// checks were recorded for this optimizer." (no gradients), the errors of `unscale`; the
    /// optimizer's error, which leaves the scaler as it was.
    pub fn step<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        let config = &self.config;
        let Some(a) = &mut self.active else {
            let grads = opt.params().grads()?;
            opt.step_with(&grads, Amp::None)?;
            return Ok(StepOutcome::Stepped);
        };
        if a.scale.is_none() {
            return Err(no_scale("step"));
        }
        let id = opt.params().id();
        if let Some(Stage::Stepped { .. }) = a.stages.get(&id) {
            return Err(Error::Usage(
                "step() has already been called since the last update().".into(),
            ));
        }
        if opt.supports_amp_scaling() {
            return a.step_fused(config, opt);
        }
        if !a.stages.contains_key(&id) {
            a.unscale(opt, config.allow_fp16_grads)?;
        }
        let Some(Stage::Unscaled { found_inf, grads }) = a.stages.remove(&id) else {
            return Err(Error::Usage(
                "a folded clip needs an optimizer that supports AMP scaling".into(),
            ));
        };
        let restore = |a: &mut Active, found_inf, grads| {
            a.stages.insert(id, Stage::Unscaled { found_inf, grads });
        };
        if found_inf.is_empty() {
            restore(a, found_inf, grads);
            return Err(Error::Usage(
                "No inf checks were recorded for this optimizer.".into(),
            ));
        }
        let mut total = 0.0;
        for f in &found_inf {
            match f.f_double_value(&[]).op("item") {
                Ok(v) => total += v,
                Err(e) => {
                    restore(a, found_inf, grads);
                    return Err(e);
                }
            }
        }
        let outcome = if total == 0.0 {
            if let Err(e) = opt.step_with(&grads, Amp::None) {
                restore(a, found_inf, grads);
                return Err(e);
            }
            a.record_taken();
            StepOutcome::Stepped
        } else {
            match a.skipped(config, opt, &grads) {
                Ok(outcome) => outcome,
                Err(e) => {
                    restore(a, found_inf, grads);
                    return Err(e);
                }
            }
        };
        a.stages.insert(id, Stage::Stepped { found_inf });
        Ok(outcome)
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
        let config = &self.config;
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        let (scale, tracker) = a.scale.as_ref().ok_or_else(|| no_scale("update"))?;
        let device = native::meta(scale)?.map_or(Device::Cpu, |m| m.device);
        let flags: Vec<&Tensor> = a.all_found_infs().collect();
        let combined = match flags.as_slice() {
            [] => {
                return Err(Error::Usage(
                    "No inf checks were recorded prior to update.".into(),
                ))
            }
            [one] => on_device(one, device)?.into_owned(),
            several => {
                let mut sum = on_device(several[0], device)?.into_owned();
                for f in &several[1..] {
                    sum = sum.f_add(&*on_device(f, device)?).op("add")?;
                }
                sum
            }
        };
        if config.policy.is_pytorch() {
            let mut scale = scale.shallow_clone();
            let _ = scale
                .f_internal_amp_update_scale_(
                    tracker,
                    &combined,
                    config.growth_factor,
                    config.backoff_factor,
                    config.growth_interval,
                )
                .op("_amp_update_scale_")?;
        } else {
            let found_inf = combined.f_double_value(&[]).op("item")? != 0.0;
            let next = next_scale(config, a.current_state()?, found_inf)?;
            let _ = scale
                .shallow_clone()
                .f_fill_(f64::from(next.scale))
                .op("fill_")?;
            let _ = tracker
                .shallow_clone()
                .f_fill_(i64::from(next.tracker))
                .op("fill_")?;
            a.hysteresis_left = next.hysteresis_left;
        }
        a.reset_iteration();
        Ok(())
    }

    /// Sets the scale to `new_scale` instead of updating it (`scaler.update(new_scale)`); the
    /// growth tracker is left as is, as in PyTorch.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a scale that is not finite and > 0; no `scale` yet.
    pub fn update_to(&mut self, new_scale: f64) -> Result<()> {
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        check_init_scale(new_scale)
            .map_err(|_| invalid("new_scale", new_scale, "finite and > 0"))?;
        let (scale, _) = a.scale.as_ref().ok_or_else(|| no_scale("update"))?;
        let _ = scale.shallow_clone().f_fill_(new_scale).op("fill_")?;
        a.reset_iteration();
        Ok(())
    }

    /// The state with PyTorch's keys (empty when disabled, as PyTorch).
    ///
    /// # Errors
    ///
    /// As [`GradScaler::get_scale`].
    pub fn state_dict(&self) -> Result<GradScalerState> {
        let Some(a) = &self.active else {
            return Ok(GradScalerState::default());
        };
        Ok(GradScalerState {
            scale: Some(a.scale_value()?),
            growth_factor: Some(self.config.growth_factor),
            backoff_factor: Some(self.config.backoff_factor),
            growth_interval: Some(self.config.growth_interval),
            growth_tracker: Some(a.tracker_value()?),
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
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        let (scale, growth_factor, backoff_factor, growth_interval, tracker) =
            checked_state(state)?;
        if let Some((s, t)) = &a.scale {
            let _ = s.shallow_clone().f_fill_(scale).op("fill_")?;
            let _ = t.shallow_clone().f_fill_(tracker).op("fill_")?;
        }
        a.init_scale = scale;
        a.init_growth_tracker = tracker;
        a.hysteresis_left = self.config.policy.hysteresis;
        self.config.growth_factor = growth_factor;
        self.config.backoff_factor = backoff_factor;
        self.config.growth_interval = growth_interval;
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

impl Active {
    fn sync_found(&self, found: &[Tensor]) -> Result<()> {
        if let Some(sync) = &self.found_inf_sync {
            for f in found {
                (sync.0)(f)?;
            }
        }
        Ok(())
    }

    fn lazy_init(&mut self, device: Device) -> Result<&Tensor> {
        if self.scale.is_none() {
            let scale = Tensor::f_full([], self.init_scale, (Kind::Float, device)).op("full")?;
            let tracker =
                Tensor::f_full([], self.init_growth_tracker, (Kind::Int, device)).op("full")?;
            self.scale = Some((scale, tracker));
        }
        match &self.scale {
            Some((s, _)) => Ok(s),
            None => Err(no_scale("scale")),
        }
    }

    fn scale_value(&self) -> Result<f64> {
        match &self.scale {
            Some((s, _)) => s.f_double_value(&[]).op("item"),
            None => Ok(self.init_scale),
        }
    }

    fn tracker_value(&self) -> Result<i64> {
        match &self.scale {
            Some((_, t)) => t.f_int64_value(&[]).op("item"),
            None => Ok(self.init_growth_tracker),
        }
    }

    fn current_state(&self) -> Result<ScaleState> {
        Ok(ScaleState {
            scale: self.scale_value()? as f32,
            tracker: self.tracker_value()? as i32,
            hysteresis_left: self.hysteresis_left,
        })
    }

    fn queued_skips(&self) -> Result<u64> {
        match &self.skipped_on_device {
            Some(t) => Ok(t.f_double_value(&[]).op("item")? as u64),
            None => Ok(0),
        }
    }

    fn consecutive_value(&self) -> Result<u64> {
        match &self.consecutive {
            Consecutive::Host(n) => Ok(*n),
            Consecutive::Device(t) => Ok(t.f_double_value(&[]).op("item")? as u64),
        }
    }

    /// `inv_scale = scale.double().reciprocal().float()`: the reciprocal in float64, rounded
    /// to float32, exactly as PyTorch (on CPU this equals a correctly rounded float32
    /// reciprocal; keeping PyTorch's form keeps every backend on the same value).
    fn inv_scale(&self, what: &str) -> Result<Tensor> {
        let (scale, _) = self.scale.as_ref().ok_or_else(|| no_scale(what))?;
        scale
            .f_to_kind(Kind::Double)
            .and_then(|t| t.f_reciprocal())
            .and_then(|t| t.f_to_kind(Kind::Float))
            .op("inv_scale")
    }

    fn all_found_infs(&self) -> impl Iterator<Item = &Tensor> {
        self.stages
            .values()
            .flat_map(Stage::found_infs)
            .chain(self.tensor_found_infs.iter())
    }

    fn reset_iteration(&mut self) {
        self.stages.clear();
        self.tensor_found_infs.clear();
    }

    fn unscale<O: Optimizer + ?Sized>(&mut self, opt: &mut O, allow_fp16: bool) -> Result<()> {
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
        self.unscale_batch(id, opt.params().grads()?, allow_fp16)
    }

    /// Unscales gradients fetched for optimizer `id` and records them as its stage.
    fn unscale_batch(&mut self, id: u64, grads: GradBatch, allow_fp16: bool) -> Result<()> {
        let inv_scale = self.inv_scale("unscale_")?;
        let found_inf = unscale::unscale_batch(&grads, &inv_scale, allow_fp16, false)?;
        self.sync_found(&found_inf)?;
        self.stages.insert(id, Stage::Unscaled { found_inf, grads });
        Ok(())
    }

    fn record_taken(&mut self) {
        self.steps_taken += 1;
        self.consecutive = Consecutive::Host(0);
    }

    /// The outcome of a skipped step known on the host; warns after a run of them.
    fn skipped<O: Optimizer + ?Sized>(
        &mut self,
        config: &GradScalerConfig,
        opt: &O,
        grads: &GradBatch,
    ) -> Result<StepOutcome> {
        let before = self.current_state()?;
        let after = next_scale(config, before, true).map_or(before.scale, |s| s.scale);
        let nonfinite = if config.diagnose_skips {
            unscale::nonfinite_names(opt.params(), grads)?
        } else {
            Vec::new()
        };
        let consecutive = self.consecutive_value()? + 1;
        self.steps_skipped += 1;
        self.consecutive = Consecutive::Host(consecutive);
        let every = config.warn_after_skips;
        if every > 0 && consecutive % every == 0 {
            log::warn!(
                "{consecutive} optimizer steps in a row were skipped because the gradients held \
                 inf/NaN; the loss scale is now {after}. Training makes no progress while this \
                 lasts: look for a diverging loss, or lower the learning rate or init_scale."
            );
        }
        Ok(StepOutcome::Skipped {
            scale_before: f64::from(before.scale),
            scale_after: f64::from(after),
            consecutive,
            nonfinite,
        })
    }

    /// PyTorch's fused path: the inf check (unless the gradients were already unscaled, or
    /// clipping was folded), then the optimizer's own step given `grad_scale` and `found_inf`.
    /// The inf check is tch-fabric's one read pass (`tch_fabric::unscale_sumsq_`, which writes
    /// nothing) where it applies, else a native unscale by 1 as PyTorch. With
    /// [`GradScalerConfig::sync_free`] nothing is read back: the outcome is
    /// [`StepOutcome::Queued`] and the skip is counted on the device.
    fn step_fused<O: Optimizer + ?Sized>(
        &mut self,
        config: &GradScalerConfig,
        opt: &mut O,
    ) -> Result<StepOutcome> {
        let id = opt.params().id();
        let (scale, _) = self.scale.as_ref().ok_or_else(|| no_scale("step"))?;
        let scale = scale.shallow_clone();
        let scale_device = native::meta(&scale)?.map_or(Device::Cpu, |m| m.device);
        let stage = self.stages.remove(&id);
        let (found_inf, combined, fetched) =
            match self.fused_step_once(opt, &scale, scale_device, stage.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    if let Some(stage) = stage {
                        self.stages.insert(id, stage);
                    }
                    return Err(e);
                }
            };
        let grads = match (fetched, stage) {
            (Some(g), _) => g,
            (None, Some(Stage::Unscaled { grads, .. } | Stage::Folded { grads, .. })) => grads,
            (None, _) => GradBatch::from_tensors(&[])?,
        };
        self.stages.insert(id, Stage::Stepped { found_inf });
        if config.sync_free_on(scale_device) {
            self.count_queued(&combined)?;
            return Ok(StepOutcome::Queued);
        }
        if combined.f_double_value(&[]).op("item")? == 0.0 {
            self.record_taken();
            return Ok(StepOutcome::Stepped);
        }
        self.skipped(config, opt, &grads)
    }

    /// The fused step itself, changing nothing of the scaler: (the flags, their combination on
    /// the scale's device, the gradients when fetched here).
    fn fused_step_once<O: Optimizer + ?Sized>(
        &self,
        opt: &mut O,
        scale: &Tensor,
        scale_device: Device,
        stage: Option<&Stage>,
    ) -> Result<(Vec<Tensor>, Tensor, Option<GradBatch>)> {
        let fetched = match stage {
            None => {
                let grads = opt.params().grads()?;
                let found = unscale::check_inf(&grads, scale_device)?;
                self.sync_found(&found)?;
                Some((found, grads))
            }
            Some(_) => None,
        };
        let (found_inf, grads, divisor, unscaled): (&[Tensor], &GradBatch, Option<&Tensor>, bool) =
            match (stage, &fetched) {
                (_, Some((found, grads))) => (found, grads, None, false),
                (Some(Stage::Unscaled { found_inf, grads }), None) => {
                    (found_inf, grads, None, true)
                }
                (
                    Some(Stage::Folded {
                        found_inf,
                        divisor,
                        grads,
                    }),
                    None,
                ) => (std::slice::from_ref(found_inf), grads, Some(divisor), false),
                _ => {
                    return Err(Error::Usage(
                        "step() has already been called since the last update().".into(),
                    ))
                }
            };
        if found_inf.is_empty() {
            return Err(Error::Usage(
                "No inf checks were recorded for this optimizer.".into(),
            ));
        }
        let combined = match found_inf {
            [one] => on_device(one, scale_device)?.into_owned(),
            several => {
                let mut sum = on_device(&several[0], scale_device)?.into_owned();
                for f in &several[1..] {
                    sum = sum.f_add(&*on_device(f, scale_device)?).op("add")?;
                }
                // Several devices' flags add up past 1; the skip counts want 0 or 1.
                sum.f_clamp_max(1.0).op("clamp_max")?
            }
        };
        let amp = match divisor {
            Some(divisor) => Amp::Folded {
                divisor,
                found_inf: &combined,
            },
            None => Amp::Scaled {
                grad_scale: (!unscaled).then_some(scale),
                found_inf: &combined,
            },
        };
        opt.step_with(grads, amp)?;
        let found_inf = found_inf.iter().map(Tensor::shallow_clone).collect();
        Ok((found_inf, combined, fetched.map(|(_, g)| g)))
    }

    /// Counts a queued step's skip on the device: no host read.
    fn count_queued(&mut self, found_inf: &Tensor) -> Result<()> {
        self.skipped_on_device = Some(match self.skipped_on_device.take() {
            Some(count) => count.f_add(found_inf).op("add")?,
            None => found_inf.f_detach_copy().op("copy")?,
        });
        let device = native::meta(found_inf)?.map_or(Device::Cpu, |m| m.device);
        let run = match std::mem::replace(&mut self.consecutive, Consecutive::Host(0)) {
            Consecutive::Host(n) => {
                Tensor::f_full([], n as f64, (Kind::Float, device)).op("full")?
            }
            Consecutive::Device(t) => t,
        };
        // (run + 1) * found: one more on a skip, back to 0 on a taken step.
        let run = run
            .f_add_scalar(1.0)
            .and_then(|t| t.f_mul(found_inf))
            .op("count skips")?;
        self.consecutive = Consecutive::Device(run);
        self.steps_queued += 1;
        Ok(())
    }
}

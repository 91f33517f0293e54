//! [`GradScaler`]: dynamic loss scaling with PyTorch's exact numerics.
//!
//! The default behaviour is `torch.amp.GradScaler`'s, bit for bit: the same lazily created
//! float32 scale and int32 growth tracker, the same `inv_scale` rounding, one native
//! `_amp_foreach_non_finite_check_and_unscale_` call per (device, dtype) group, one native
//! `_amp_update_scale_` per iteration, the same errors. What PyTorch lacks is opt-in: a
//! [`ScalePolicy`] with bounds and hysteresis, a [`StepOutcome`] that says when a step was
//! skipped and why, counters, and bfloat16 gradients on CUDA.
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{nn, Device, Kind, Tensor};

/// Configuration of a [`GradScaler`], with PyTorch's defaults and builder-style setters.
///
/// Values are checked by [`GradScaler::new`] (or [`GradScalerConfig::validate`]).
///
/// ```
/// use tch_fabric::{GradScaler, GradScalerConfig};
/// let scaler = GradScaler::new(GradScalerConfig::default().init_scale(1024.0).growth_interval(100))?;
/// assert_eq!(scaler.get_scale(), 1024.0);
/// assert!(GradScaler::new(GradScalerConfig::default().growth_factor(1.0)).is_err());
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GradScalerConfig {
    init_scale: f64,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
    enabled: bool,
    allow_fp16_grads: bool,
    diagnose_skips: bool,
    policy: ScalePolicy,
    sync_free: Option<bool>,
    fold_clipping: bool,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            enabled: true,
            allow_fp16_grads: false,
            diagnose_skips: false,
            policy: ScalePolicy::default(),
            sync_free: None,
            fold_clipping: true,
        }
    }
}

impl GradScalerConfig {
    /// PyTorch's defaults: `init_scale` 65536, `growth_factor` 2, `backoff_factor` 0.5,
    /// `growth_interval` 2000, enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// The scale before the first update (finite, > 0).
    pub fn init_scale(mut self, v: f64) -> Self {
        self.init_scale = v;
        self
    }

    /// The factor the scale grows by after `growth_interval` clean steps (finite, > 1).
    pub fn growth_factor(mut self, v: f64) -> Self {
        self.growth_factor = v;
        self
    }

    /// The factor the scale shrinks by after an overflow (in (0, 1)).
    pub fn backoff_factor(mut self, v: f64) -> Self {
        self.backoff_factor = v;
        self
    }

    /// Clean steps between two growths (> 0, fits in int32 like PyTorch's tracker).
    pub fn growth_interval(mut self, v: i64) -> Self {
        self.growth_interval = v;
        self
    }

    /// `false` makes every method a pass-through, as `GradScaler(enabled=False)`.
    pub fn enabled(mut self, v: bool) -> Self {
        self.enabled = v;
        self
    }

    /// Accept float16 gradients (PyTorch refuses them with "Attempting to unscale FP16
    /// gradients." because float16 parameters lose small updates; allow only when you know).
    pub fn allow_fp16_grads(mut self, v: bool) -> Self {
        self.allow_fp16_grads = v;
        self
    }

    /// On a skipped step, name the parameters whose gradients held inf/NaN in
    /// [`StepOutcome::Skipped`]. Costs one extra pass, and only on skipped steps.
    pub fn diagnose_skips(mut self, v: bool) -> Self {
        self.diagnose_skips = v;
        self
    }

    /// Whether a step of a fused optimizer ([`ScalerOptimizer::supports_amp_scaling`]) leaves
    /// the skip decision on the device and returns [`StepOutcome::Queued`] instead of reading
    /// the overflow flag. Default: on for CUDA (reading would stall the host until the step has
    /// run), off on CPU (where reading costs nothing). [`GradScalerConfig::diagnose_skips`]
    /// needs the flag and turns it off.
    pub fn sync_free(mut self, v: bool) -> Self {
        self.sync_free = Some(v);
        self
    }

    /// Whether [`crate::Fabric::clip_gradients`] folds 2-norm clipping into the step of a fused
    /// optimizer (default: on). Folded, clipping reads the gradients once and writes nothing;
    /// the optimizer divides by `scale / clip_coef`. PyTorch instead unscales in place, computes
    /// the norm and multiplies by the coefficient, which rounds differently in the last bits:
    /// turn folding off to reproduce PyTorch's gradients bit for bit.
    pub fn fold_clipping(mut self, v: bool) -> Self {
        self.fold_clipping = v;
        self
    }

    /// How the scale moves (default: PyTorch's rule, bit for bit).
    pub fn policy(mut self, policy: ScalePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first field out of range and the allowed range.
    pub fn validate(&self) -> Result<()> {
        check_init_scale(self.init_scale)?;
        check_growth_factor(self.growth_factor)?;
        check_backoff_factor(self.backoff_factor)?;
        check_growth_interval(self.growth_interval)?;
        self.policy.validate()
    }
}

fn invalid(field: &'static str, value: impl ToString, allowed: &'static str) -> Error {
    Error::InvalidConfig {
        field,
        value: value.to_string(),
        allowed,
    }
}

fn check_init_scale(v: f64) -> Result<()> {
    // The scale lives in a float32 tensor: a value that rounds to inf or 0 there is refused too.
    if v.is_finite() && v > 0.0 && (v as f32).is_finite() && (v as f32) > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            "init_scale",
            v,
            "finite and > 0 (and representable in float32)",
        ))
    }
}

fn check_growth_factor(v: f64) -> Result<()> {
    if v.is_finite() && v > 1.0 {
        Ok(())
    } else {
        Err(invalid("growth_factor", v, "finite and > 1.0"))
    }
}

fn check_backoff_factor(v: f64) -> Result<()> {
    if v > 0.0 && v < 1.0 {
        Ok(())
    } else {
        Err(invalid("backoff_factor", v, "in (0.0, 1.0)"))
    }
}

fn check_growth_interval(v: i64) -> Result<()> {
    if v > 0 && v <= i64::from(i32::MAX) {
        Ok(())
    } else {
        Err(invalid("growth_interval", v, "in 1..=2147483647"))
    }
}

/// What a [`ScalePolicy`] with a `min_scale` does on an overflow when the scale is already at
/// the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtMinScale {
    /// Keep the minimum scale and go on (the step is still skipped).
    #[default]
    Continue,
    /// Fail [`GradScaler::update`] with DeepSpeed's "already at minimum" error.
    Error,
}

/// How the loss scale moves. The default is PyTorch's rule, run by its native kernel; any other
/// setting is applied on the host after reading the overflow flag (one small sync per update).
///
/// PyTorch's rule has two quirks this policy can guard against:
/// - the scale can decay to 0 after enough overflows (then `inv_scale` is inf and zero
///   gradients become NaN after the finiteness check passed): set `min_scale`;
/// - a growth tracker loaded at or above `growth_interval` never reaches equality, so the
///   scale never grows until an overflow resets it: any non-default policy grows on `>=`.
///
/// ```
/// use tch_fabric::{AtMinScale, GradScalerConfig, ScalePolicy};
/// let policy = ScalePolicy::default()
///     .min_scale(1.0)
///     .max_scale(2f64.powi(24))
///     .hysteresis(2)
///     .at_min(AtMinScale::Error);
/// let config = GradScalerConfig::default().policy(policy);
/// # config.validate()?;
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalePolicy {
    min_scale: Option<f64>,
    max_scale: Option<f64>,
    hysteresis: u32,
    at_min: AtMinScale,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        ScalePolicy {
            min_scale: None,
            max_scale: None,
            hysteresis: 1,
            at_min: AtMinScale::Continue,
        }
    }
}

impl ScalePolicy {
    /// PyTorch's rule (the default).
    pub fn pytorch() -> Self {
        Self::default()
    }

    /// The scale never backs off below this value.
    pub fn min_scale(mut self, v: f64) -> Self {
        self.min_scale = Some(v);
        self
    }

    /// The scale never grows above this value.
    pub fn max_scale(mut self, v: f64) -> Self {
        self.max_scale = Some(v);
        self
    }

    /// Back off only after this many consecutive overflows (Apex / DeepSpeed hysteresis;
    /// 1 = back off at every overflow, as PyTorch). Reset by every clean step.
    pub fn hysteresis(mut self, n: u32) -> Self {
        self.hysteresis = n;
        self
    }

    /// What to do on an overflow at `min_scale`.
    pub fn at_min(mut self, at_min: AtMinScale) -> Self {
        self.at_min = at_min;
        self
    }

    fn is_pytorch(&self) -> bool {
        *self == ScalePolicy::default()
    }

    fn validate(&self) -> Result<()> {
        if let Some(min) = self.min_scale {
            if !(min.is_finite() && min > 0.0) {
                return Err(invalid("min_scale", min, "finite and > 0"));
            }
        }
        if let Some(max) = self.max_scale {
            if !(max.is_finite() && max > 0.0) {
                return Err(invalid("max_scale", max, "finite and > 0"));
            }
            if let Some(min) = self.min_scale {
                if max < min {
                    return Err(invalid("max_scale", max, ">= min_scale"));
                }
            }
        }
        if self.hysteresis == 0 {
            return Err(invalid("hysteresis", 0, ">= 1"));
        }
        Ok(())
    }
}

/// The scale update as a pure function of (scale, tracker, overflow): PyTorch's
/// `_amp_update_scale_` kernel for the default policy, Apex/DeepSpeed semantics otherwise.
/// Used to predict [`StepOutcome::Skipped::scale_after`] and to run non-default policies.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ScaleState {
    scale: f32,
    tracker: i32,
    /// Overflows left before a back-off (non-default policies only).
    hysteresis_left: u32,
}

fn next_scale(cfg: &GradScalerConfig, s: ScaleState, found_inf: bool) -> Result<ScaleState> {
    let p = &cfg.policy;
    if p.is_pytorch() {
        // Mirrors aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp: float * double is computed
        // in double and stored as float; growth past float max is dropped; equality, not >=.
        return Ok(if found_inf {
            ScaleState {
                scale: (f64::from(s.scale) * cfg.backoff_factor) as f32,
                tracker: 0,
                ..s
            }
        } else {
            let successful = s.tracker.wrapping_add(1);
            if i64::from(successful) == cfg.growth_interval {
                let grown = (f64::from(s.scale) * cfg.growth_factor) as f32;
                ScaleState {
                    scale: if grown.is_finite() { grown } else { s.scale },
                    tracker: 0,
                    ..s
                }
            } else {
                ScaleState {
                    tracker: successful,
                    ..s
                }
            }
        });
    }
    if found_inf {
        let hysteresis_left = s.hysteresis_left.saturating_sub(1);
        let mut scale = s.scale;
        if hysteresis_left == 0 {
            let backed = (f64::from(s.scale) * cfg.backoff_factor) as f32;
            scale = match p.min_scale {
                Some(min) if f64::from(s.scale) <= min => match p.at_min {
                    AtMinScale::Error => {
                        return Err(Error::Usage(format!(
                            "Current loss scale already at minimum ({min}) - cannot decrease scale anymore."
                        )))
                    }
                    AtMinScale::Continue => s.scale,
                },
                Some(min) => backed.max(min as f32),
                None => backed,
            };
        }
        Ok(ScaleState {
            scale,
            tracker: 0,
            hysteresis_left,
        })
    } else {
        let successful = s.tracker.saturating_add(1);
        let mut next = ScaleState {
            scale: s.scale,
            tracker: successful,
            hysteresis_left: p.hysteresis,
        };
        if i64::from(successful) >= cfg.growth_interval {
            let mut grown = (f64::from(s.scale) * cfg.growth_factor) as f32;
            if let Some(max) = p.max_scale {
                grown = grown.min(max as f32);
            }
            if grown.is_finite() {
                next.scale = grown;
            }
            next.tracker = 0;
        }
        Ok(next)
    }
}

/// What [`GradScaler::step`] did.
///
/// ```
/// # use tch_fabric::StepOutcome;
/// # let outcome = StepOutcome::Skipped { scale_before: 65536.0, scale_after: 32768.0, nonfinite: vec![] };
/// match outcome {
///     StepOutcome::Stepped => {}
///     StepOutcome::Skipped { scale_before, scale_after, .. } => {
///         println!("overflow: skipped, scale {scale_before} -> {scale_after}")
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

/// An optimizer a [`GradScaler`] can unscale and step. Implemented by [`AmpOptimizer`] (tch's
/// optimizers); the fused optimizers implement it too.
pub trait ScalerOptimizer {
    /// A process-unique identity, the key of the scaler's per-optimizer state (PyTorch keys
    /// it by `id(optimizer)`).
    fn scaler_id(&self) -> u64;
    /// The defined gradients of the parameters this optimizer updates, with their names.
    fn named_gradients(&self) -> Vec<(String, Tensor)>;
    /// One optimizer step on the (already unscaled) gradients.
    ///
    /// # Errors
    ///
    /// Whatever the optimizer reports.
    fn step_unscaled(&mut self) -> Result<()>;

    /// Whether the optimizer unscales and skips by itself given `grad_scale` and `found_inf`
    /// (PyTorch's `_step_supports_amp_scaling`, true for fused optimizers): the scaler then
    /// calls [`ScalerOptimizer::step_scaled`] and never waits for the device.
    fn supports_amp_scaling(&self) -> bool {
        false
    }

    /// A step that divides the gradients by `grad_scale` (when given) and changes nothing
    /// where `found_inf` is non-zero, entirely on the device.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] unless [`ScalerOptimizer::supports_amp_scaling`].
    fn step_scaled(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor) -> Result<()> {
        let _ = (grad_scale, found_inf);
        Err(Error::Usage(
            "this optimizer does not support AMP scaling; use step_unscaled".into(),
        ))
    }

    /// The step after folded clipping: the gradients are still multiplied by `divisor`
    /// (`scale / clip_coef`) and nothing needs them unscaled afterwards, so an optimizer may
    /// skip writing them back. Defaults to [`ScalerOptimizer::step_scaled`].
    ///
    /// # Errors
    ///
    /// As [`ScalerOptimizer::step_scaled`].
    fn step_folded(&mut self, divisor: &Tensor, found_inf: &Tensor) -> Result<()> {
        self.step_scaled(Some(divisor), found_inf)
    }
}

/// The trainable variables of `vs` with their names, in creation order with each module's weight
/// before its bias: the order PyTorch gives the same module's parameters, which fixes the
/// summation order of global norms (so clipping rounds as in PyTorch). Names are matched to
/// tensors by storage; variables without storage (empty tensors) follow, sorted by name.
pub(crate) fn trainable_in_order(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(named.len());
    for t in vs.trainable_variables() {
        let ptr = t.data_ptr();
        if ptr.is_null() {
            continue;
        }
        if let Some(i) = named.iter().position(|(_, n)| n.data_ptr() == ptr) {
            out.push(named.remove(i));
        }
    }
    out.extend(named);
    // tch's `nn::linear` creates `bias` before `weight`; PyTorch registers `weight` first. Put a
    // module's weight before its bias so the order is PyTorch's.
    for i in 1..out.len() {
        let (prev, cur) = (&out[i - 1].0, &out[i].0);
        if let (Some(p), Some(c)) = (prev.strip_suffix("bias"), cur.strip_suffix("weight")) {
            if p == c {
                out.swap(i - 1, i);
            }
        }
    }
    out
}

/// The defined gradients of named parameters (parameters that took no part in the last
/// backward have none).
pub(crate) fn defined_gradients<'a>(
    params: impl Iterator<Item = (&'a str, &'a Tensor)>,
) -> Vec<(String, Tensor)> {
    params
        .map(|(n, p)| (n.to_string(), p.grad()))
        .filter(|(_, g)| g.defined())
        .collect()
}

/// A fresh identity for a [`ScalerOptimizer`].
pub fn next_optimizer_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A tch optimizer together with the parameters it updates, so that a [`GradScaler`] can reach
/// the gradients (tch's `nn::Optimizer` does not expose them).
///
/// The parameters are the VarStore's trainable variables at construction time.
///
/// ```
/// use tch::{nn, nn::OptimizerConfig, Device};
/// use tch_fabric::AmpOptimizer;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
/// let opt = AmpOptimizer::new(nn::Sgd::default().build(&vs, 0.1)?, &vs);
/// // PyTorch's order: a module's weight, then its bias.
/// assert_eq!(opt.parameter_names(), vec!["fc.weight", "fc.bias"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AmpOptimizer {
    inner: nn::Optimizer,
    params: Vec<(String, Tensor)>,
    id: u64,
}

impl std::fmt::Debug for AmpOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmpOptimizer")
            .field("id", &self.id)
            .field("parameters", &self.parameter_names())
            .finish()
    }
}

impl AmpOptimizer {
    /// Pairs `optimizer` with the trainable variables of `vs` (the store it was built from).
    pub fn new(optimizer: nn::Optimizer, vs: &nn::VarStore) -> Self {
        AmpOptimizer {
            inner: optimizer,
            params: trainable_in_order(vs),
            id: next_optimizer_id(),
        }
    }

    /// The names of the parameters, in creation order.
    pub fn parameter_names(&self) -> Vec<&str> {
        self.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The parameters (shallow handles sharing storage with the VarStore's), in creation order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Zeroes the gradients.
    pub fn zero_grad(&mut self) {
        self.inner.zero_grad();
    }

    /// The wrapped tch optimizer (to set the learning rate, ...).
    pub fn optimizer_mut(&mut self) -> &mut nn::Optimizer {
        &mut self.inner
    }
}

impl ScalerOptimizer for AmpOptimizer {
    fn scaler_id(&self) -> u64 {
        self.id
    }

    fn named_gradients(&self) -> Vec<(String, Tensor)> {
        defined_gradients(self.params.iter().map(|(n, p)| (n.as_str(), p)))
    }

    fn step_unscaled(&mut self) -> Result<()> {
        // tch's step panics on a libtorch error; keep it inside the crate's error type.
        catch_unwind(AssertUnwindSafe(|| self.inner.step())).map_err(|e| Error::Native {
            op: "optimizer step",
            message: panic_message(&e),
        })
    }
}

fn panic_message(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ready,
    Unscaled,
    /// Norm clipping was folded into `divisor`; the gradients are still scaled.
    Folded,
    Stepped,
}

#[derive(Debug)]
struct OptimizerRecord {
    stage: Stage,
    found_inf_per_device: Vec<Tensor>,
    /// `scale / clip_coef` on the device, for [`Stage::Folded`].
    divisor: Option<Tensor>,
}

impl Default for OptimizerRecord {
    fn default() -> Self {
        OptimizerRecord {
            stage: Stage::Ready,
            found_inf_per_device: Vec::new(),
            divisor: None,
        }
    }
}

/// The scaler's state with PyTorch's keys, for checkpoints.
///
/// ```
/// use tch_fabric::{GradScaler, GradScalerConfig, GradScalerState};
/// // A state written by Python: json.dumps(torch.amp.GradScaler().state_dict())
/// let json = r#"{"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
///                "growth_interval": 2000, "_growth_tracker": 17}"#;
/// let mut scaler = GradScaler::new(GradScalerConfig::default())?;
/// scaler.load_state_dict(&GradScalerState::from_json(json)?)?;
/// assert_eq!((scaler.get_scale(), scaler.growth_tracker()), (32768.0, 17));
/// assert!(scaler.state_dict().to_json().contains("\"_growth_tracker\":17"));
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// Serialised to JSON it is exactly what `torch.amp.GradScaler().state_dict()` holds, so
/// `scaler.load_state_dict(json.load(f))` in Python accepts it, and a state written by Python
/// loads here. Fields are optional because PyTorch's state can be empty (a disabled scaler) or
/// come from a file with keys missing; [`GradScaler::load_state_dict`] refuses both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
// Only a JSON object is a state dict: serde's derive alone would also take a bare list.
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct GradScalerState {
    /// The current scale.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scale: Option<f64>,
    /// `growth_factor`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub growth_factor: Option<f64>,
    /// `backoff_factor`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backoff_factor: Option<f64>,
    /// `growth_interval`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub growth_interval: Option<i64>,
    /// The number of clean steps since the last growth or back-off (`_growth_tracker`).
    #[serde(
        rename = "_growth_tracker",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub growth_tracker: Option<i64>,
}

/// The derived field-by-field form, reached only through a JSON object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    scale: Option<f64>,
    growth_factor: Option<f64>,
    backoff_factor: Option<f64>,
    growth_interval: Option<i64>,
    #[serde(rename = "_growth_tracker")]
    growth_tracker: Option<i64>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for GradScalerState {
    type Error = serde_json::Error;

    fn try_from(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let raw: RawState = serde_json::from_value(serde_json::Value::Object(map))?;
        Ok(GradScalerState {
            scale: raw.scale,
            growth_factor: raw.growth_factor,
            backoff_factor: raw.backoff_factor,
            growth_interval: raw.growth_interval,
            growth_tracker: raw.growth_tracker,
        })
    }
}

impl GradScalerState {
    /// Whether no key is set (a disabled scaler's state).
    pub fn is_empty(&self) -> bool {
        *self == GradScalerState::default()
    }

    /// Parses PyTorch's JSON form.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] for malformed JSON, wrong-typed values or unknown keys.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// PyTorch's JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of numbers always serialises")
    }
}

/// Dynamic loss scaling for float16 training, with `torch.amp.GradScaler`'s numerics.
///
/// The usual loop: `scaler.scale(&loss)?.backward()`, then `scaler.step(&mut opt)?` (which
/// unscales, checks for inf/NaN and skips the step on overflow), then `scaler.update()?` once
/// per iteration, after every optimizer stepped.
///
/// ```
/// use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
/// use tch_fabric::{AmpOptimizer, GradScaler, GradScalerConfig};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root(), 4, 1, Default::default());
/// let mut opt = AmpOptimizer::new(nn::Sgd::default().build(&vs, 0.1)?, &vs);
/// let mut scaler = GradScaler::new(GradScalerConfig::default())?;
///
/// let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
/// opt.zero_grad();
/// let loss = model.forward(&x).pow_tensor_scalar(2).mean(None);
/// scaler.scale(&loss)?.backward();
/// let outcome = scaler.step(&mut opt)?;
/// scaler.update()?;
/// assert!(!outcome.is_skipped());
/// assert_eq!(scaler.get_scale(), 65536.0);
/// assert_eq!(scaler.growth_tracker(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct GradScaler {
    config: GradScalerConfig,
    /// 0-dim float32, created by the first `scale` on the loss's device.
    scale: Option<Tensor>,
    /// 0-dim int32, next to `scale`.
    growth_tracker: Option<Tensor>,
    /// Values the lazy initialisation uses (changed by loading a state before the first scale).
    init_scale: f64,
    init_growth_tracker: i64,
    hysteresis_left: u32,
    per_optimizer: HashMap<u64, OptimizerRecord>,
    /// found_inf flags of `unscale_grads` calls (no optimizer) in this iteration.
    tensor_found_infs: Vec<Tensor>,
    steps_taken: u64,
    steps_skipped: u64,
    /// Steps returned as [`StepOutcome::Queued`], and how many of them skipped (a float32
    /// count on the device, read only when asked for).
    steps_queued: u64,
    skipped_on_device: Option<Tensor>,
    found_inf_sync: Option<FoundInfSync>,
}

/// Combines a freshly computed found_inf flag across processes in place (an all-reduce with
/// max), so that every rank of a data-parallel run skips the same steps.
#[derive(Clone)]
pub(crate) struct FoundInfSync(pub(crate) std::rc::Rc<SyncFn>);

type SyncFn = dyn Fn(&Tensor) -> Result<()>;

impl std::fmt::Debug for FoundInfSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FoundInfSync")
    }
}

const NO_SCALE: &str = "but _scale is None.  This may indicate your script did not use \
                        scaler.scale(loss or outputs) earlier in the iteration.";

impl GradScaler {
    /// A scaler with `config`; its tensors are created by the first [`GradScaler::scale`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an out-of-range value.
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(GradScaler {
            init_scale: config.init_scale,
            init_growth_tracker: 0,
            hysteresis_left: config.policy.hysteresis,
            config,
            scale: None,
            growth_tracker: None,
            per_optimizer: HashMap::new(),
            tensor_found_infs: Vec::new(),
            steps_taken: 0,
            steps_skipped: 0,
            steps_queued: 0,
            skipped_on_device: None,
            found_inf_sync: None,
        })
    }

    /// Every found_inf flag this scaler computes goes through `sync` before anything reads it.
    pub(crate) fn set_found_inf_sync(&mut self, sync: FoundInfSync) {
        self.found_inf_sync = Some(sync);
    }

    fn sync_found(&self, found: &[Tensor]) -> Result<()> {
        if let Some(sync) = &self.found_inf_sync {
            for f in found {
                (sync.0)(f)?;
            }
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// Whether scaling is on.
    pub fn is_enabled(&self) -> bool {
        self.config.enabled
    }

    /// The current scale (1.0 when disabled; the initial scale before the first `scale`).
    /// Reading it synchronises with the device.
    pub fn get_scale(&self) -> f64 {
        if !self.config.enabled {
            return 1.0;
        }
        match &self.scale {
            Some(s) => s.double_value(&[]),
            None => self.init_scale,
        }
    }

    /// Clean steps since the last growth or back-off.
    pub fn growth_tracker(&self) -> i64 {
        match &self.growth_tracker {
            Some(t) => t.int64_value(&[]),
            None => self.init_growth_tracker,
        }
    }

    /// The scale tensor (0-dim float32 on the device of the first scaled loss), once created.
    pub fn scale_tensor(&self) -> Option<&Tensor> {
        self.scale.as_ref()
    }

    /// Optimizer steps taken through [`GradScaler::step`]. Counting queued steps reads one
    /// number from the device.
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken + self.steps_queued - self.queued_skips()
    }

    /// Optimizer steps skipped because gradients held inf/NaN. Counting queued steps reads one
    /// number from the device.
    pub fn steps_skipped(&self) -> u64 {
        self.steps_skipped + self.queued_skips()
    }

    fn queued_skips(&self) -> u64 {
        // A 0-dim float32 count that this scaler created; reading it cannot fail short of a
        // broken device, which the next step reports anyway.
        self.skipped_on_device
            .as_ref()
            .and_then(|t| t.f_double_value(&[]).ok())
            .map_or(0, |v| v as u64)
    }

    /// `loss * scale`. The first call creates the scale and growth tracker on `loss`'s device.
    ///
    /// # Errors
    ///
    /// [`Error::Tch`] if libtorch refuses the multiplication.
    pub fn scale(&mut self, loss: &Tensor) -> Result<Tensor> {
        if !self.config.enabled {
            return Ok(loss.shallow_clone());
        }
        let scale = self.lazy_init(loss.device())?;
        let scale = scale.f_to_device(loss.device())?;
        Ok(loss.f_mul(&scale)?)
    }

    fn lazy_init(&mut self, device: Device) -> Result<&Tensor> {
        if self.scale.is_none() {
            let scale = Tensor::f_full([], self.init_scale, (Kind::Float, device))?;
            let tracker = Tensor::f_full([], self.init_growth_tracker, (Kind::Int, device))?;
            self.scale = Some(scale);
            self.growth_tracker = Some(tracker);
        }
        Ok(self.scale.as_ref().expect("just created"))
    }

    fn require_scale(&self, what: &str) -> Result<&Tensor> {
        self.scale
            .as_ref()
            .ok_or_else(|| Error::Usage(format!("Attempted {what} {NO_SCALE}")))
    }

    /// `inv_scale = scale.double().reciprocal().float()`: the reciprocal in float64, rounded
    /// to float32, exactly as PyTorch (on CPU this equals a correctly rounded float32 reciprocal;
    /// keeping PyTorch's form keeps every backend on the same value).
    fn inv_scale(&self, what: &str) -> Result<Tensor> {
        let scale = self.require_scale(what)?;
        Ok(scale
            .f_to_kind(Kind::Double)?
            .f_reciprocal()?
            .f_to_kind(Kind::Float)?)
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
    /// assert_eq!(scaler.growth_tracker(), 1);
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// PyTorch's error when `scale` was never called; "Attempting to unscale FP16 gradients."
    /// unless allowed; [`Error::Native`] from libtorch (e.g. gradients on mixed devices).
    pub fn unscale_grads(&mut self, grads: &[Tensor]) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let inv_scale = self.inv_scale("unscale_grads")?;
        let refs: Vec<&Tensor> = grads.iter().collect();
        let found = unscale_grouped(&refs, &inv_scale, self.config.allow_fp16_grads, false)?;
        self.sync_found(&found)?;
        self.tensor_found_infs.extend(found);
        Ok(())
    }

    /// Whether anything unscaled since the last update held inf/NaN (synchronises).
    ///
    /// # Errors
    ///
    /// [`Error::Tch`] if a flag cannot be read.
    pub fn found_inf(&self) -> Result<bool> {
        let mut total = 0.0;
        for f in self.all_found_infs() {
            total += f.f_double_value(&[])?;
        }
        Ok(total != 0.0)
    }

    fn all_found_infs(&self) -> impl Iterator<Item = &Tensor> {
        self.per_optimizer
            .values()
            .flat_map(|r| r.found_inf_per_device.iter())
            .chain(self.tensor_found_infs.iter())
    }

    /// Unscales the optimizer's gradients in place (`scaler.unscale_(optimizer)`), e.g. before
    /// clipping. At most once per optimizer per iteration.
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "unscale_() has already been called on this optimizer since the last
    /// update().", "unscale_() is being called after step().", no `scale` yet, FP16 gradients.
    pub fn unscale<O: ScalerOptimizer + ?Sized>(&mut self, opt: &mut O) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let inv_scale = self.inv_scale("unscale_")?;
        match self.record(opt.scaler_id()).stage {
            Stage::Unscaled | Stage::Folded => {
                return Err(Error::Usage(
                    "unscale_() has already been called on this optimizer since the last update()."
                        .into(),
                ))
            }
            Stage::Stepped => {
                return Err(Error::Usage(
                    "unscale_() is being called after step().".into(),
                ))
            }
            Stage::Ready => {}
        }
        let named = opt.named_gradients();
        let grads: Vec<&Tensor> = named.iter().map(|(_, g)| g).collect();
        let found = unscale_grouped(&grads, &inv_scale, self.config.allow_fp16_grads, false)?;
        self.sync_found(&found)?;
        let rec = self.record(opt.scaler_id());
        rec.found_inf_per_device = found;
        rec.stage = Stage::Unscaled;
        Ok(())
    }

    /// Unscales unless this iteration already did (for clipping after a user's own `unscale`,
    /// or clipping twice): the idempotent form PyTorch lacks.
    pub(crate) fn ensure_unscaled<O: ScalerOptimizer + ?Sized>(
        &mut self,
        opt: &mut O,
    ) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        match self.per_optimizer.get(&opt.scaler_id()).map(|r| r.stage) {
            Some(Stage::Unscaled) => Ok(()),
            Some(Stage::Folded) => self.materialize_folded(opt),
            _ => self.unscale(opt),
        }
    }

    /// Norm clipping folded into the step, for an optimizer that unscales by itself: one read
    /// pass over the scaled gradients (`tch_fabric::unscale_sumsq_`, which also finds inf/NaN)
    /// and `scale / clip_coef` computed on the device; the optimizer then divides by that
    /// single number. Nothing is written to the gradients and nothing is read back to the
    /// host. Returns the global 2-norm of the unscaled gradients (a 0-dim device tensor), or
    /// `None` where this path does not apply (scaler off, an optimizer without AMP support,
    /// gradients already unscaled, on several devices, or of a dtype or device the op lacks):
    /// the caller then clips the ordinary way.
    pub(crate) fn clip_norm_folded<O: ScalerOptimizer + ?Sized>(
        &mut self,
        opt: &mut O,
        max_norm: f64,
    ) -> Result<Option<Tensor>> {
        if !self.config.enabled || !self.config.fold_clipping || !opt.supports_amp_scaling() {
            return Ok(None);
        }
        if let Some(rec) = self.per_optimizer.get(&opt.scaler_id()) {
            if rec.stage != Stage::Ready {
                return Ok(None);
            }
        }
        let named = opt.named_gradients();
        let grads: Vec<Tensor> = named.into_iter().map(|(_, g)| g).collect();
        let Some(device) = op_device(&grads, self.config.allow_fp16_grads)? else {
            return Ok(None);
        };
        let inv_scale = self.inv_scale("unscale_")?.f_to_device(device)?;
        let scale = self.require_scale("unscale_")?.f_to_device(device)?;
        let found = Tensor::f_zeros([], (Kind::Float, device))?;
        let sumsq = ops::unscale_sumsq(&grads, &found, &inv_scale, false)?;
        self.sync_found(std::slice::from_ref(&found))?;
        let divisor = ops::clip_divisor(&found, &sumsq, &scale, max_norm)?;
        let norm = sumsq.f_sqrt()?;
        let rec = self.record(opt.scaler_id());
        rec.stage = Stage::Folded;
        rec.found_inf_per_device = vec![found];
        rec.divisor = Some(divisor);
        Ok(Some(norm))
    }

    /// Turns a folded clip into unscaled, clipped gradients (for a second clip or another use
    /// of the gradients before the step): divides them by the divisor in place.
    fn materialize_folded<O: ScalerOptimizer + ?Sized>(&mut self, opt: &mut O) -> Result<()> {
        let rec = self.record(opt.scaler_id());
        let divisor = rec.divisor.take().expect("a folded record has a divisor");
        rec.stage = Stage::Unscaled;
        for (_, g) in opt.named_gradients() {
            let d = divisor.f_to_device(g.device())?;
            let _ = g.shallow_clone().f_div_(&d)?;
        }
        Ok(())
    }

    /// Whether [`GradScaler::update`] has flags to consume.
    pub(crate) fn has_pending_checks(&self) -> bool {
        self.all_found_infs().next().is_some()
    }

    fn record(&mut self, id: u64) -> &mut OptimizerRecord {
        self.per_optimizer.entry(id).or_default()
    }

    /// Unscales (unless [`GradScaler::unscale`] already did), then steps the optimizer unless
    /// a gradient held inf/NaN. Reads the overflow flag (one sync, as PyTorch).
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "step() has already been called since the last update().", "No inf
    /// checks were recorded for this optimizer." (no gradients), the errors of `unscale`.
    pub fn step<O: ScalerOptimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        if !self.config.enabled {
            opt.step_unscaled()?;
            self.steps_taken += 1;
            return Ok(StepOutcome::Stepped);
        }
        self.require_scale("step")?;
        let id = opt.scaler_id();
        match self.record(id).stage {
            Stage::Stepped => {
                return Err(Error::Usage(
                    "step() has already been called since the last update().".into(),
                ))
            }
            Stage::Ready if !opt.supports_amp_scaling() => self.unscale(opt)?,
            _ => {}
        }
        if opt.supports_amp_scaling() {
            return self.step_fused(opt);
        }
        let rec = self.record(id);
        if rec.found_inf_per_device.is_empty() {
            return Err(Error::Usage(
                "No inf checks were recorded for this optimizer.".into(),
            ));
        }
        let mut total = 0.0;
        for f in &rec.found_inf_per_device {
            total += f.f_double_value(&[])?;
        }
        let outcome = if total == 0.0 {
            opt.step_unscaled()?;
            self.steps_taken += 1;
            StepOutcome::Stepped
        } else {
            self.steps_skipped += 1;
            let now = self.current_state();
            let after = next_scale(&self.config, now, true).map_or(now.scale, |s| s.scale);
            let nonfinite = if self.config.diagnose_skips {
                nonfinite_names(&opt.named_gradients())?
            } else {
                Vec::new()
            };
            StepOutcome::Skipped {
                scale_before: f64::from(now.scale),
                scale_after: f64::from(after),
                nonfinite,
            }
        };
        self.record(id).stage = Stage::Stepped;
        Ok(outcome)
    }

    /// PyTorch's fused path: the inf check (unless the user already unscaled, or clipping was
    /// folded), then the optimizer's own step given `grad_scale` and `found_inf`. The inf check
    /// is tch-fabric's one read pass (`tch_fabric::unscale_sumsq_`, which writes nothing) where
    /// it applies, else a native unscale by 1 as PyTorch. With [`GradScalerConfig::sync_free`]
    /// nothing is read back: the outcome is [`StepOutcome::Queued`] and the skip is counted on
    /// the device.
    fn step_fused<O: ScalerOptimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        let id = opt.scaler_id();
        let scale = self.require_scale("step")?.shallow_clone();
        let stage = self.record(id).stage;
        if stage == Stage::Ready {
            let named = opt.named_gradients();
            let grads: Vec<Tensor> = named.into_iter().map(|(_, g)| g).collect();
            // PyTorch's inf check for fused optimizers accepts float16 gradients (the
            // optimizer unscales them itself, in float32).
            let found = match op_device(&grads, true)? {
                Some(device) => {
                    let found = Tensor::f_zeros([], (Kind::Float, device))?;
                    let one = Tensor::f_ones([], (Kind::Float, device))?;
                    let _ = ops::unscale_sumsq(&grads, &found, &one, false)?;
                    vec![found]
                }
                None => {
                    let refs: Vec<&Tensor> = grads.iter().collect();
                    let one = Tensor::f_ones([], (Kind::Float, scale.device()))?;
                    unscale_grouped(&refs, &one, true, false)?
                }
            };
            self.sync_found(&found)?;
            self.record(id).found_inf_per_device = found;
        }
        let rec = self.record(id);
        if rec.found_inf_per_device.is_empty() {
            return Err(Error::Usage(
                "No inf checks were recorded for this optimizer.".into(),
            ));
        }
        let found_inf = match rec.found_inf_per_device.as_slice() {
            [one] if one.device() == scale.device() => one.shallow_clone(),
            several => {
                let mut sum = Tensor::f_zeros([], (Kind::Float, scale.device()))?;
                for f in several {
                    sum = sum.f_add(&f.f_to_device(scale.device())?)?;
                }
                sum
            }
        };
        match stage {
            Stage::Folded => {
                let divisor = rec.divisor.take().expect("a folded record has a divisor");
                opt.step_folded(&divisor, &found_inf)?;
            }
            Stage::Unscaled => opt.step_scaled(None, &found_inf)?,
            _ => opt.step_scaled(Some(&scale.f_mul_scalar(1)?), &found_inf)?,
        }
        self.record(id).stage = Stage::Stepped;
        let sync_free = self
            .config
            .sync_free
            .unwrap_or_else(|| scale.device().is_cuda())
            && !self.config.diagnose_skips;
        if sync_free {
            let skipped = found_inf.f_gt(0.0)?.f_to_kind(Kind::Float)?;
            self.skipped_on_device = Some(match self.skipped_on_device.take() {
                Some(count) => count.f_add(&skipped)?,
                None => skipped,
            });
            self.steps_queued += 1;
            return Ok(StepOutcome::Queued);
        }
        if found_inf.f_double_value(&[])? == 0.0 {
            self.steps_taken += 1;
            Ok(StepOutcome::Stepped)
        } else {
            self.steps_skipped += 1;
            let before = self.current_state();
            let after = next_scale(&self.config, before, true).map_or(before.scale, |s| s.scale);
            let nonfinite = if self.config.diagnose_skips {
                nonfinite_names(&opt.named_gradients())?
            } else {
                Vec::new()
            };
            Ok(StepOutcome::Skipped {
                scale_before: f64::from(before.scale),
                scale_after: f64::from(after),
                nonfinite,
            })
        }
    }

    fn current_state(&self) -> ScaleState {
        ScaleState {
            scale: self.get_scale() as f32,
            tracker: self.growth_tracker() as i32,
            hysteresis_left: self.hysteresis_left,
        }
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
        if !self.config.enabled {
            return Ok(());
        }
        let scale = self.require_scale("update")?.shallow_clone();
        if self.all_found_infs().next().is_none() {
            return Err(Error::Usage(
                "No inf checks were recorded prior to update.".into(),
            ));
        }
        let mut combined = Tensor::f_zeros([], (Kind::Float, scale.device()))?;
        for f in self.all_found_infs() {
            combined = combined.f_add(&f.f_to_device(scale.device())?)?;
        }
        let tracker = self
            .growth_tracker
            .as_ref()
            .expect("created with the scale")
            .shallow_clone();
        if self.config.policy.is_pytorch() {
            let mut scale = scale;
            let _ = scale.f_internal_amp_update_scale_(
                &tracker,
                &combined,
                self.config.growth_factor,
                self.config.backoff_factor,
                self.config.growth_interval,
            )?;
        } else {
            let found_inf = combined.f_double_value(&[])? != 0.0;
            let next = next_scale(&self.config, self.current_state(), found_inf)?;
            let mut scale = scale;
            let mut tracker = tracker;
            let _ = scale.f_fill_(f64::from(next.scale))?;
            let _ = tracker.f_fill_(i64::from(next.tracker))?;
            self.hysteresis_left = next.hysteresis_left;
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
        if !self.config.enabled {
            return Ok(());
        }
        check_init_scale(new_scale)
            .map_err(|_| invalid("new_scale", new_scale, "finite and > 0"))?;
        let mut scale = self.require_scale("update")?.shallow_clone();
        let _ = scale.f_fill_(new_scale)?;
        self.reset_iteration();
        Ok(())
    }

    fn reset_iteration(&mut self) {
        self.per_optimizer.clear();
        self.tensor_found_infs.clear();
    }

    /// The state with PyTorch's keys (empty when disabled, as PyTorch).
    pub fn state_dict(&self) -> GradScalerState {
        if !self.config.enabled {
            return GradScalerState::default();
        }
        GradScalerState {
            scale: Some(self.get_scale()),
            growth_factor: Some(self.config.growth_factor),
            backoff_factor: Some(self.config.backoff_factor),
            growth_interval: Some(self.config.growth_interval),
            growth_tracker: Some(self.growth_tracker()),
        }
    }

    /// Loads a state written by [`GradScaler::state_dict`] or by PyTorch. Loading before the
    /// first `scale` sets the values the lazy initialisation will use, as PyTorch.
    ///
    /// # Errors
    ///
    /// PyTorch's error for an empty state; [`Error::InvalidState`] for a missing key or a value
    /// the configuration would refuse. Nothing is changed on error.
    pub fn load_state_dict(&mut self, state: &GradScalerState) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
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
        // Everything is valid: apply it all.
        if let (Some(s), Some(t)) = (&self.scale, &self.growth_tracker) {
            let (mut s, mut t) = (s.shallow_clone(), t.shallow_clone());
            let _ = s.f_fill_(scale)?;
            let _ = t.f_fill_(tracker)?;
        }
        self.init_scale = scale;
        self.init_growth_tracker = tracker;
        self.config.growth_factor = growth_factor;
        self.config.backoff_factor = backoff_factor;
        self.config.growth_interval = growth_interval;
        self.hysteresis_left = self.config.policy.hysteresis;
        Ok(())
    }
}

/// The device on which `tch_fabric::unscale_sumsq_` can take all of `grads` in one call: the
/// gradients share one device that the op has a kernel for (CPU; CUDA when built with the
/// `cuda` feature) and are float32, float16 or bfloat16. `None` when it cannot (or there are no
/// gradients), and PyTorch's FP16 error where float16 gradients are not allowed.
fn op_device(grads: &[Tensor], allow_fp16: bool) -> Result<Option<Device>> {
    let mut device = None;
    for g in grads {
        if g.kind() == Kind::Half && !allow_fp16 {
            return Err(Error::Usage("Attempting to unscale FP16 gradients.".into()));
        }
        if g.is_sparse() || !matches!(g.kind(), Kind::Float | Kind::Half | Kind::BFloat16) {
            return Ok(None);
        }
        match device {
            None => device = Some(g.device()),
            Some(d) if d != g.device() => return Ok(None),
            Some(_) => {}
        }
    }
    Ok(device.filter(|d| *d == Device::Cpu || (cfg!(feature = "cuda") && d.is_cuda())))
}

/// Names of the gradients that hold inf/NaN.
fn nonfinite_names(named: &[(String, Tensor)]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, g) in named {
        if g.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            out.push(name.clone());
        }
    }
    Ok(out)
}

/// Unscales `grads` in place, grouped per (device, dtype) with one native call per group, and
/// returns one found_inf flag per device. bfloat16 gradients on CUDA (which PyTorch's kernel
/// does not take) go through an equivalent composition; `force_composite` routes every group
/// there (for tests).
fn unscale_grouped(
    grads: &[&Tensor],
    inv_scale: &Tensor,
    allow_fp16: bool,
    force_composite: bool,
) -> Result<Vec<Tensor>> {
    let mut groups: Vec<((Device, Kind), Vec<&Tensor>)> = Vec::new();
    for g in grads {
        if !g.defined() {
            continue;
        }
        if g.is_sparse() {
            return Err(Error::Usage(
                "sparse gradients are not supported by tch-fabric's GradScaler".into(),
            ));
        }
        let key = (g.device(), g.kind());
        if key.1 == Kind::Half && !allow_fp16 {
            return Err(Error::Usage("Attempting to unscale FP16 gradients.".into()));
        }
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push(g),
            None => groups.push((key, vec![g])),
        }
    }
    let mut found_per_device: Vec<(Device, Tensor)> = Vec::new();
    for ((device, kind), list) in groups {
        let idx = match found_per_device.iter().position(|(d, _)| *d == device) {
            Some(i) => i,
            None => {
                let f = Tensor::f_zeros([], (Kind::Float, device))?;
                found_per_device.push((device, f));
                found_per_device.len() - 1
            }
        };
        let found = &found_per_device[idx].1;
        let inv = inv_scale.f_to_device(device)?;
        if force_composite || (kind == Kind::BFloat16 && device.is_cuda()) {
            unscale_composite(&list, found, &inv)?;
        } else {
            ffi::amp_foreach_non_finite_check_and_unscale(&list, found, &inv)?;
        }
    }
    Ok(found_per_device.into_iter().map(|(_, f)| f).collect())
}

/// The unscale kernel's math from ordinary ops, bit-identical to it: the finiteness check on
/// the original values, then `val * inv_scale` computed in float32 and rounded to the storage
/// dtype (the kernel's opmath is float32 for half types too).
fn unscale_composite(grads: &[&Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let mut found = found_inf.shallow_clone();
    for g in grads {
        if g.numel() == 0 {
            continue;
        }
        let bad = g
            .f_isfinite()?
            .f_all()?
            .f_logical_not()?
            .f_to_kind(Kind::Float)?;
        let merged = found.f_maximum(&bad)?;
        found.f_copy_(&merged)?;
        let product = g.f_to_kind(Kind::Float)?.f_mul(inv_scale)?;
        let mut g = g.shallow_clone();
        g.f_copy_(&product)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GradScalerConfig {
        GradScalerConfig::default().growth_interval(3)
    }

    fn st(scale: f32, tracker: i32) -> ScaleState {
        ScaleState {
            scale,
            tracker,
            hysteresis_left: 1,
        }
    }

    #[test]
    fn pytorch_rule_grows_on_equality_and_backs_off() {
        let c = cfg();
        assert_eq!(next_scale(&c, st(8.0, 0), false).unwrap(), st(8.0, 1));
        assert_eq!(next_scale(&c, st(8.0, 2), false).unwrap(), st(16.0, 0));
        assert_eq!(next_scale(&c, st(8.0, 2), true).unwrap(), st(4.0, 0));
        // A tracker past the interval never grows (PyTorch's quirk).
        assert_eq!(next_scale(&c, st(8.0, 5), false).unwrap(), st(8.0, 6));
        // Growth past float max is dropped, the tracker still resets.
        assert_eq!(next_scale(&c, st(3.0e38, 2), false).unwrap(), st(3.0e38, 0));
    }

    #[test]
    fn policy_bounds_and_hysteresis() {
        let p = ScalePolicy::default()
            .min_scale(2.0)
            .max_scale(32.0)
            .hysteresis(2);
        let c = cfg().policy(p);
        let s = ScaleState {
            scale: 4.0,
            tracker: 1,
            hysteresis_left: 2,
        };
        let s = next_scale(&c, s, true).unwrap();
        assert_eq!((s.scale, s.tracker, s.hysteresis_left), (4.0, 0, 1));
        let s = next_scale(&c, s, true).unwrap();
        assert_eq!((s.scale, s.hysteresis_left), (2.0, 0));
        let s = next_scale(&c, s, true).unwrap();
        assert_eq!(s.scale, 2.0, "never below min_scale");
        let s = next_scale(&c, s, false).unwrap();
        assert_eq!(
            (s.tracker, s.hysteresis_left),
            (1, 2),
            "clean step resets hysteresis"
        );
        let big = ScaleState {
            scale: 32.0,
            tracker: 9,
            hysteresis_left: 2,
        };
        let s = next_scale(&c, big, false).unwrap();
        assert_eq!(
            (s.scale, s.tracker),
            (32.0, 0),
            ">= interval grows, capped at max"
        );
        let c = cfg().policy(
            ScalePolicy::default()
                .min_scale(2.0)
                .at_min(AtMinScale::Error),
        );
        assert!(next_scale(&c, st(2.0, 0), true)
            .unwrap_err()
            .to_string()
            .contains("already at minimum"));
    }

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
                let f1 = unscale_grouped(&[&native], &inv, true, false).unwrap();
                let f2 = unscale_grouped(&[&composite], &inv, true, true).unwrap();
                let ik = if kind == Kind::Float {
                    Kind::Int
                } else {
                    Kind::Int16
                };
                assert!(
                    native.view_dtype(ik).equal(&composite.view_dtype(ik)),
                    "{kind:?} scale {scale}"
                );
                assert_eq!(f1[0].double_value(&[]), f2[0].double_value(&[]));
            }
        }
        let bad = bits_f32(&[1.0, f32::NAN]).to_kind(Kind::BFloat16);
        let inv = Tensor::full([], 0.5, (Kind::Float, Device::Cpu));
        let f = unscale_grouped(&[&bad], &inv, false, true).unwrap();
        assert_eq!(f[0].double_value(&[]), 1.0);
    }
}

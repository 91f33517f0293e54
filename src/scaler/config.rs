//! [`GradScalerConfig`]: the scaler's settings, PyTorch's defaults, and their checks.
use super::policy::ScalePolicy;
use crate::error::{Error, Result};

/// Configuration of a [`GradScaler`](crate::GradScaler), with PyTorch's defaults and
/// builder-style setters.
///
/// Values are checked by [`GradScaler::new`](crate::GradScaler::new) (or
/// [`GradScalerConfig::validate`]).
///
/// ```
/// use tch_fabric::{GradScaler, GradScalerConfig};
/// let scaler = GradScaler::new(GradScalerConfig::default().init_scale(1024.0).growth_interval(100))?;
/// assert_eq!(scaler.get_scale()?, 1024.0);
/// assert!(GradScaler::new(GradScalerConfig::default().growth_factor(1.0)).is_err());
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GradScalerConfig {
    pub(crate) init_scale: f64,
    pub(crate) growth_factor: f64,
    pub(crate) backoff_factor: f64,
    pub(crate) growth_interval: i64,
    pub(crate) enabled: bool,
    pub(crate) allow_fp16_grads: bool,
    pub(crate) diagnose_skips: bool,
    pub(crate) policy: ScalePolicy,
    pub(crate) sync_free: Option<bool>,
    pub(crate) fold_clipping: bool,
    pub(crate) warn_after_skips: u64,
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
            warn_after_skips: 10,
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

    /// `false` makes every method a pass-through, as `GradScaler(enabled=False)`. (A
    /// [`crate::Fabric`] simply has no scaler where its precision needs none.)
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
    /// [`StepOutcome::Skipped`](crate::StepOutcome::Skipped). Costs one extra pass, and only on skipped steps.
    pub fn diagnose_skips(mut self, v: bool) -> Self {
        self.diagnose_skips = v;
        self
    }

    /// Whether a step of a fused optimizer ([`crate::Optimizer::supports_amp_scaling`]) leaves
    /// the skip decision on the device and returns [`StepOutcome::Queued`](crate::StepOutcome::Queued) instead of reading
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

    /// After this many skipped steps in a row, log a warning through the `log` crate (and again
    /// after each further such run); 0 never warns. Default 10. Whatever the setting,
    /// [`StepOutcome::Skipped`](crate::StepOutcome::Skipped) and
    /// [`GradScaler::consecutive_skips`](crate::GradScaler::consecutive_skips) tell a loop how
    /// many steps in a row were skipped, so it can stop.
    pub fn warn_after_skips(mut self, n: u64) -> Self {
        self.warn_after_skips = n;
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

    pub(crate) fn sync_free_on(&self, device: tch::Device) -> bool {
        self.sync_free.unwrap_or_else(|| device.is_cuda()) && !self.diagnose_skips
    }
}

pub(crate) fn invalid(field: &'static str, value: impl ToString, allowed: &'static str) -> Error {
    Error::InvalidConfig {
        field,
        value: value.to_string(),
        allowed,
    }
}

pub(crate) fn check_init_scale(v: f64) -> Result<()> {
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

pub(crate) fn check_growth_factor(v: f64) -> Result<()> {
    if v.is_finite() && v > 1.0 {
        Ok(())
    } else {
        Err(invalid("growth_factor", v, "finite and > 1.0"))
    }
}

pub(crate) fn check_backoff_factor(v: f64) -> Result<()> {
    if v > 0.0 && v < 1.0 {
        Ok(())
    } else {
        Err(invalid("backoff_factor", v, "in (0.0, 1.0)"))
    }
}

pub(crate) fn check_growth_interval(v: i64) -> Result<()> {
    if v > 0 && v <= i64::from(i32::MAX) {
        Ok(())
    } else {
        Err(invalid("growth_interval", v, "in 1..=2147483647"))
    }
}

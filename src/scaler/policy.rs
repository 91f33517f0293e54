//! How the loss scale moves: [`ScalePolicy`] (PyTorch's rule by default, opt-in bounds and
//! hysteresis) and the update as a pure function of (scale, tracker, overflow).
use super::config::{invalid, GradScalerConfig};
use crate::error::{Error, Result};

/// What a [`ScalePolicy`] with a `min_scale` does on an overflow when the scale is already at
/// the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtMinScale {
    /// Keep the minimum scale and go on (the step is still skipped).
    #[default]
    Continue,
    /// Fail [`GradScaler::update`](crate::GradScaler::update) with DeepSpeed's "already at
    /// minimum" error.
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
/// use tch_fabric::{GradScalerConfig, scaler::{AtMinScale, ScalePolicy}};
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
    pub(crate) min_scale: Option<f64>,
    pub(crate) max_scale: Option<f64>,
    pub(crate) hysteresis: u32,
    pub(crate) at_min: AtMinScale,
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

    pub(crate) fn is_pytorch(&self) -> bool {
        *self == ScalePolicy::default()
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
/// Used to predict the `scale_after` of [`crate::StepOutcome::Skipped`] and to run
/// non-default policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ScaleState {
    pub scale: f32,
    pub tracker: i32,
    /// Overflows left before a back-off (non-default policies only).
    pub hysteresis_left: u32,
}

pub(crate) fn next_scale(
    cfg: &GradScalerConfig,
    s: ScaleState,
    found_inf: bool,
) -> Result<ScaleState> {
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
}

//! The loss scale itself: PyTorch's lazily created float32 scale and int32 growth tracker, the
//! values a lazy initialisation will use, `inv_scale` with PyTorch's rounding, and the
//! once-per-iteration update (PyTorch's kernel, or the [`super::ScalePolicy`] on the host).
use super::config::GradScalerConfig;
use super::policy::{next_scale, ScaleState};
use super::stage::Flag;
use crate::error::{Op, Result};
use tch::{Device, Kind, Tensor};

/// The scale and growth tracker once created: 0-dim float32 and int32 on `device`, the device
/// of the first scaled loss.
#[derive(Debug)]
pub(super) struct ScaleTensors {
    pub scale: Tensor,
    pub tracker: Tensor,
    pub device: Device,
}

/// The loss scale of an enabled scaler.
#[derive(Debug)]
pub(super) struct LossScale {
    /// Created by the first `scale`.
    pub tensors: Option<ScaleTensors>,
    /// What the lazy initialisation uses (changed by loading a state before the first scale).
    pub init_scale: f64,
    pub init_growth_tracker: i64,
    pub hysteresis_left: u32,
}

impl LossScale {
    pub(super) fn new(config: &GradScalerConfig) -> LossScale {
        LossScale {
            tensors: None,
            init_scale: config.init_scale,
            init_growth_tracker: 0,
            hysteresis_left: config.policy.hysteresis,
        }
    }

    /// The tensors, creating them on `device` the first time.
    pub(super) fn lazy_init(&mut self, device: Device) -> Result<&ScaleTensors> {
        let tensors = match self.tensors.take() {
            Some(t) => t,
            None => ScaleTensors {
                scale: Tensor::f_full([], self.init_scale, (Kind::Float, device)).op("full")?,
                tracker: Tensor::f_full([], self.init_growth_tracker, (Kind::Int, device))
                    .op("full")?,
                device,
            },
        };
        Ok(self.tensors.insert(tensors))
    }

    /// The scale on the host (the initial one before the first `scale`).
    pub(super) fn value(&self) -> Result<f64> {
        match &self.tensors {
            Some(t) => t.scale.f_double_value(&[]).op("item"),
            None => Ok(self.init_scale),
        }
    }

    /// The growth tracker on the host.
    pub(super) fn tracker_value(&self) -> Result<i64> {
        match &self.tensors {
            Some(t) => t.tracker.f_int64_value(&[]).op("item"),
            None => Ok(self.init_growth_tracker),
        }
    }

    /// Scale, tracker and hysteresis as the policy sees them.
    pub(super) fn current(&self) -> Result<ScaleState> {
        Ok(ScaleState {
            scale: self.value()? as f32,
            tracker: self.tracker_value()? as i32,
            hysteresis_left: self.hysteresis_left,
        })
    }

    /// `inv_scale = scale.double().reciprocal().float()`: the reciprocal in float64, rounded
    /// to float32, exactly as PyTorch (on CPU this equals a correctly rounded float32
    /// reciprocal; keeping PyTorch's form keeps every backend on the same value).
    pub(super) fn inv_scale(t: &ScaleTensors) -> Result<Tensor> {
        t.scale
            .f_to_kind(Kind::Double)
            .and_then(|t| t.f_reciprocal())
            .and_then(|t| t.f_to_kind(Kind::Float))
            .op("inv_scale")
    }

    /// One iteration's update from `found_inf` (on the scale's device): one native
    /// `_amp_update_scale_` for PyTorch's rule, else the policy on the host (one read).
    pub(super) fn update(&mut self, config: &GradScalerConfig, found_inf: &Flag) -> Result<()> {
        let Some(t) = &self.tensors else {
            return Ok(());
        };
        if config.policy.is_pytorch() {
            let mut scale = t.scale.shallow_clone();
            let _ = scale
                .f_internal_amp_update_scale_(
                    &t.tracker,
                    &found_inf.tensor,
                    config.growth_factor,
                    config.backoff_factor,
                    config.growth_interval,
                )
                .op("_amp_update_scale_")?;
            return Ok(());
        }
        let overflow = found_inf.tensor.f_double_value(&[]).op("item")? != 0.0;
        let next = next_scale(config, self.current()?, overflow)?;
        self.fill(f64::from(next.scale), Some(i64::from(next.tracker)))?;
        self.hysteresis_left = next.hysteresis_left;
        Ok(())
    }

    /// Sets the scale (and the tracker, when given) in place.
    pub(super) fn fill(&self, scale: f64, tracker: Option<i64>) -> Result<()> {
        if let Some(t) = &self.tensors {
            let _ = t.scale.shallow_clone().f_fill_(scale).op("fill_")?;
            if let Some(tracker) = tracker {
                let _ = t.tracker.shallow_clone().f_fill_(tracker).op("fill_")?;
            }
        }
        Ok(())
    }
}

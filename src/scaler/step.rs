//! The scaler's part of an optimizer step and of clipping: the one place that decides how a
//! step runs (PyTorch's fused AMP step, its unscale-then-step path, or a plain step without
//! scaling) and whether 2-norm clipping is folded into the step.
use super::policy::next_scale;
use super::scale::LossScale;
use super::stage::{Flag, Stage};
use super::{no_scale, unscale, GradScaler, StepOutcome};
use crate::clip::{self, Clip, ClipMethod};
use crate::device::on_device;
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::{Amp, Optimizer};
use crate::params::GradBatch;
use tch::{Device, Kind, Tensor};

const ALREADY_STEPPED: &str = "step() has already been called since the last update().";
const NO_INF_CHECKS: &str = "No inf checks were recorded for this optimizer.";

impl GradScaler {
    /// Unscales (unless [`GradScaler::unscale`] already did), then steps the optimizer unless
    /// a gradient held inf/NaN. Reads the overflow flag (one sync, as PyTorch) unless the
    /// optimizer unscales by itself and the step is sync-free. Disabled, it steps on the
    /// gradients as they are (those a clip fetched, when no backward ran since).
    ///
    /// # Errors
    ///
    /// PyTorch's errors: "step() has already been called since the last update().", "No inf
    /// checks were recorded for this optimizer." (no gradients), the errors of `unscale`; the
    /// optimizer's error, which leaves the scaler as it was.
    pub fn step<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        let id = opt.params().id();
        let Some(ls) = &self.loss_scale else {
            let grads = match self.stages.remove(&id) {
                Some(Stage::Unscaled {
                    grads, backward, ..
                }) if backward == self.backwards => grads,
                _ => opt.params().grads()?,
            };
            opt.step_with(&grads, Amp::None)?;
            return Ok(StepOutcome::Stepped);
        };
        if ls.tensors.is_none() {
            return Err(no_scale("step"));
        }
        if let Some(Stage::Stepped { .. }) = self.stages.get(&id) {
            return Err(Error::Usage(ALREADY_STEPPED.into()));
        }
        if opt.supports_amp_scaling() {
            self.step_fused(opt)
        } else {
            self.step_unscaled(opt)
        }
    }

    /// Clips the optimizer's gradients and returns their global norm before clipping, as
    /// [`crate::Fabric::clip_gradients`] promises: unscaled first (once per iteration however
    /// often this is called), or, where it applies, 2-norm clipping folded into the step.
    pub(crate) fn clip<O: Optimizer + ?Sized>(
        &mut self,
        opt: &mut O,
        clip: &Clip,
    ) -> Result<Tensor> {
        clip.validate()?;
        if let Some(norm) = self.clip_folded(opt, clip)? {
            return Ok(norm);
        }
        let grads = self.unscaled_grads(opt)?;
        clip::clip_batch(grads, clip, Some(opt.params().model_order()))
    }

    /// Norm clipping folded into the step, for an optimizer that unscales by itself: one read
    /// pass over the scaled gradients (`tch_fabric::unscale_sumsq_`, which also finds inf/NaN)
    /// and `scale / clip_coef` computed on the device; the optimizer then divides by that
    /// single number. Nothing is written to the gradients and nothing is read back to the
    /// host. Returns the global 2-norm of the unscaled gradients (a 0-dim device tensor), or
    /// `None` where this path does not apply: scaling off or not started, folding off, another
    /// norm or value clipping, the strict form (which needs the norm on the host before
    /// anything changes), an optimizer without AMP support, gradients already unscaled, on
    /// several devices, or of a dtype or device the op lacks. The caller then clips the
    /// ordinary way (where this fetched the gradients, it unscaled them already, so that they
    /// are fetched once).
    fn clip_folded<O: Optimizer + ?Sized>(
        &mut self,
        opt: &mut O,
        clip: &Clip,
    ) -> Result<Option<Tensor>> {
        let ClipMethod::Norm {
            max_norm,
            norm_type,
        } = clip.method()
        else {
            return Ok(None);
        };
        let id = opt.params().id();
        let Some(t) = self.loss_scale.as_ref().and_then(|ls| ls.tensors.as_ref()) else {
            return Ok(None);
        };
        if norm_type != 2.0
            || clip.is_strict()
            || !self.config.fold_clipping
            || !opt.supports_amp_scaling()
            || self.stages.contains_key(&id)
        {
            return Ok(None);
        }
        let grads = opt.params().grads()?;
        let Some(device) = unscale::op_device(&grads, self.config.allow_fp16_grads)? else {
            self.unscale_into_stage(id, grads)?;
            return Ok(None);
        };
        let scale_device = t.device;
        let inv_scale = LossScale::inv_scale(t)?;
        let inv_scale = on_device(&inv_scale, scale_device, device)?;
        let scale = on_device(&t.scale, scale_device, device)?;
        let found = Tensor::f_zeros([], (Kind::Float, device)).op("zeros")?;
        let all: Vec<&Tensor> = grads.defined().map(|(_, g)| g).collect();
        let sumsq = native::unscale_sumsq(&all, &found, &inv_scale, false)?;
        let flag = Flag {
            tensor: found,
            device,
        };
        let found_inf = self
            .record_flags(vec![flag], scale_device)?
            .ok_or_else(|| Error::native("clip", "no overflow flag"))?;
        let (norm, divisor) = native::clip_divisor(&sumsq, &scale, max_norm)?;
        // The divisor joins the flag on the scale's device, where the step reads both.
        let divisor = on_device(&divisor, device, scale_device)?.into_owned();
        self.stages.insert(
            id,
            Stage::Folded {
                found_inf,
                divisor,
                grads,
                backward: self.backwards,
            },
        );
        Ok(Some(norm))
    }

    /// The optimizer's gradients unscaled (with scaling off: as they are), fetching and
    /// unscaling them unless this iteration already did (for clipping after a user's own
    /// `unscale`, or clipping twice): the idempotent form PyTorch lacks.
    fn unscaled_grads<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<&GradBatch> {
        let id = opt.params().id();
        match self.stages.remove(&id) {
            None if self.is_enabled() => {
                let grads = opt.params().grads()?;
                self.unscale_into_stage(id, grads)?;
            }
            None => {
                let stage = Stage::Unscaled {
                    found_inf: None,
                    grads: opt.params().grads()?,
                    backward: self.backwards,
                };
                self.stages.insert(id, stage);
            }
            Some(Stage::Folded {
                found_inf,
                divisor,
                grads,
                backward,
            }) => {
                let divided = unscale::divide(&grads, &divisor, found_inf.device);
                let stage = match divided {
                    Ok(()) => Stage::Unscaled {
                        found_inf: Some(found_inf),
                        grads,
                        backward,
                    },
                    Err(_) => Stage::Folded {
                        found_inf,
                        divisor,
                        grads,
                        backward,
                    },
                };
                self.stages.insert(id, stage);
                divided?;
            }
            Some(stage) => {
                self.stages.insert(id, stage);
            }
        }
        match self.stages.get(&id) {
            Some(Stage::Unscaled { grads, .. }) => Ok(grads),
            _ => Err(Error::Usage(
                "unscale_() is being called after step().".into(),
            )),
        }
    }

    /// The gradients fetched again when a backward ran since a stage fetched them at backward
    /// `backward` (their tensors may have been replaced); `None` when the stage's still hold.
    fn refetch<O: Optimizer + ?Sized>(&self, opt: &O, backward: u64) -> Result<Option<GradBatch>> {
        if backward == self.backwards {
            Ok(None)
        } else {
            opt.params().grads().map(Some)
        }
    }

    /// PyTorch's path for an optimizer without AMP support: unscale (unless done), read the
    /// flag, step or skip.
    fn step_unscaled<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        let id = opt.params().id();
        if !self.stages.contains_key(&id) {
            let grads = opt.params().grads()?;
            self.unscale_into_stage(id, grads)?;
        }
        let (found_inf, grads, backward) = match self.stages.remove(&id) {
            Some(Stage::Unscaled {
                found_inf,
                grads,
                backward,
            }) => (found_inf, grads, backward),
            Some(other) => {
                self.stages.insert(id, other);
                return Err(Error::Usage(
                    "a folded clip needs an optimizer that supports AMP scaling".into(),
                ));
            }
            None => return Err(Error::native("step", "the unscaled gradients were lost")),
        };
        let outcome = match &found_inf {
            Some(flag) => self.unscaled_once(opt, flag, &grads, backward),
            None => Err(Error::Usage(NO_INF_CHECKS.into())),
        };
        match (outcome, found_inf) {
            (Ok(outcome), Some(found_inf)) => {
                self.stages.insert(id, Stage::Stepped { found_inf });
                Ok(outcome)
            }
            (result, found_inf) => {
                let stage = Stage::Unscaled {
                    found_inf,
                    grads,
                    backward,
                };
                self.stages.insert(id, stage);
                result.and(Err(Error::Usage(NO_INF_CHECKS.into())))
            }
        }
    }

    /// The unscaled step itself, changing nothing of the stages.
    fn unscaled_once<O: Optimizer + ?Sized>(
        &mut self,
        opt: &mut O,
        found_inf: &Flag,
        grads: &GradBatch,
        backward: u64,
    ) -> Result<StepOutcome> {
        let refetched = self.refetch(opt, backward)?;
        let grads = refetched.as_ref().unwrap_or(grads);
        if found_inf.tensor.f_double_value(&[]).op("item")? != 0.0 {
            return self.skipped(opt, grads);
        }
        opt.step_with(grads, Amp::None)?;
        self.skips.record_taken();
        Ok(StepOutcome::Stepped)
    }

    /// PyTorch's fused path: the inf check (unless the gradients were already unscaled, or
    /// clipping was folded), then the optimizer's own step given `grad_scale` and `found_inf`.
    /// The inf check is tch-fabric's one read pass (`tch_fabric::unscale_sumsq_`, which writes
    /// nothing) where it applies, else a native unscale by 1 as PyTorch. With
    /// [`super::GradScalerConfig::sync_free`] nothing is read back: the outcome is
    /// [`StepOutcome::Queued`] and the skip is counted on the device.
    fn step_fused<O: Optimizer + ?Sized>(&mut self, opt: &mut O) -> Result<StepOutcome> {
        let id = opt.params().id();
        let Some(t) = self.loss_scale.as_ref().and_then(|ls| ls.tensors.as_ref()) else {
            return Err(no_scale("step"));
        };
        let (scale, device) = (t.scale.shallow_clone(), t.device);
        let stage = self.stages.remove(&id);
        let (found_inf, fetched) = match self.fused_once(opt, &scale, device, stage.as_ref()) {
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
        self.stages.insert(
            id,
            Stage::Stepped {
                found_inf: found_inf.shallow(),
            },
        );
        if self.config.sync_free_on(device) {
            self.skips.record_queued(&found_inf)?;
            return Ok(StepOutcome::Queued);
        }
        if found_inf.tensor.f_double_value(&[]).op("item")? == 0.0 {
            self.skips.record_taken();
            return Ok(StepOutcome::Stepped);
        }
        self.skipped(opt, &grads)
    }

    /// The fused step itself, changing nothing of the scaler's stages: (the flag on the scale's
    /// device, the gradients when fetched here).
    fn fused_once<O: Optimizer + ?Sized>(
        &self,
        opt: &mut O,
        scale: &Tensor,
        device: Device,
        stage: Option<&Stage>,
    ) -> Result<(Flag, Option<GradBatch>)> {
        let no_checks = || Error::Usage(NO_INF_CHECKS.into());
        match stage {
            None => {
                let grads = opt.params().grads()?;
                let flags = unscale::check_inf(&grads, device)?;
                let found_inf = self.record_flags(flags, device)?.ok_or_else(no_checks)?;
                let amp = Amp::Scaled {
                    grad_scale: Some(scale),
                    found_inf: &found_inf.tensor,
                    device,
                };
                opt.step_with(&grads, amp)?;
                Ok((found_inf, Some(grads)))
            }
            Some(Stage::Unscaled {
                found_inf,
                grads,
                backward,
            }) => {
                let found_inf = found_inf.as_ref().ok_or_else(no_checks)?;
                let refetched = self.refetch(opt, *backward)?;
                let amp = Amp::Scaled {
                    grad_scale: None,
                    found_inf: &found_inf.tensor,
                    device,
                };
                opt.step_with(refetched.as_ref().unwrap_or(grads), amp)?;
                Ok((found_inf.shallow(), refetched))
            }
            Some(Stage::Folded {
                found_inf,
                divisor,
                grads,
                backward,
            }) => {
                let refetched = self.refetch(opt, *backward)?;
                let amp = Amp::Folded {
                    divisor,
                    found_inf: &found_inf.tensor,
                    device,
                };
                opt.step_with(refetched.as_ref().unwrap_or(grads), amp)?;
                Ok((found_inf.shallow(), refetched))
            }
            Some(Stage::Stepped { .. }) => Err(Error::Usage(ALREADY_STEPPED.into())),
        }
    }

    /// The outcome of a skipped step known on the host; warns after a run of them.
    fn skipped<O: Optimizer + ?Sized>(
        &mut self,
        opt: &O,
        grads: &GradBatch,
    ) -> Result<StepOutcome> {
        let config = &self.config;
        let ls = self.loss_scale.as_ref().ok_or_else(|| no_scale("step"))?;
        let before = ls.current()?;
        let after = next_scale(config, before, true).map_or(before.scale, |s| s.scale);
        let nonfinite = if config.diagnose_skips {
            unscale::nonfinite_names(opt.params(), grads)?
        } else {
            Vec::new()
        };
        let every = config.warn_after_skips;
        let consecutive = self.skips.record_skipped()?;
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
}

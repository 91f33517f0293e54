//! PyTorch's schedules that multiply the rate by a factor per epoch: each `get_lr` is PyTorch's
//! recurrence on the optimizer's current rate, written with the same operations in the same
//! order (Python floats are f64, `**` is libm's `pow`, `math.cos` libm's `cos`), so the rates
//! are the same bits.
use super::{config, start, LrTarget, Scheduler, SchedulerBase};
use crate::error::Result;
use std::f64::consts::PI;

/// Implements the [`Scheduler`] accessors for a struct with a `base: SchedulerBase` field.
macro_rules! accessors {
    ($kind:literal) => {
        fn kind(&self) -> &'static str {
            $kind
        }
        fn base(&self) -> &SchedulerBase {
            &self.base
        }
        fn base_mut(&mut self) -> &mut SchedulerBase {
            &mut self.base
        }
    };
}
pub(crate) use accessors;

/// `torch.optim.lr_scheduler.LambdaLR`: the base rate times `lr_lambda(last_epoch)`.
pub struct LambdaLR<F: FnMut(i64) -> f64> {
    base: SchedulerBase,
    lr_lambda: F,
}

impl<F: FnMut(i64) -> f64> std::fmt::Debug for LambdaLR<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LambdaLR")
            .field("base", &self.base)
            .finish()
    }
}

impl<F: FnMut(i64) -> f64> LambdaLR<F> {
    /// `LambdaLR(optimizer, lr_lambda)`; sets the rate for the first step.
    ///
    /// # Errors
    ///
    /// The optimizer's refusal of the first rate.
    pub fn new(opt: &mut dyn LrTarget, lr_lambda: F) -> Result<Self> {
        let base = SchedulerBase::attach(opt);
        start(LambdaLR { base, lr_lambda }, opt)
    }
}

impl<F: FnMut(i64) -> f64> Scheduler for LambdaLR<F> {
    accessors!("LambdaLR");
    fn get_lr(&mut self, group: usize, _lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        Ok(self.base.base_lr(group)? * (self.lr_lambda)(self.base.last_epoch))
    }
}

/// `torch.optim.lr_scheduler.StepLR`: the rate times `gamma` every `step_size` epochs.
#[derive(Debug)]
pub struct StepLR {
    base: SchedulerBase,
    step_size: i64,
    gamma: f64,
}

impl StepLR {
    /// `StepLR(optimizer, step_size, gamma)` (PyTorch's default gamma is 0.1).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for `step_size < 1` or a non-finite `gamma`; the
    /// optimizer's refusal of the first rate.
    pub fn new(opt: &mut dyn LrTarget, step_size: i64, gamma: f64) -> Result<Self> {
        config(step_size >= 1, "step_size", step_size as f64, ">= 1")?;
        config(gamma.is_finite(), "gamma", gamma, "finite")?;
        let base = SchedulerBase::attach(opt);
        start(
            StepLR {
                base,
                step_size,
                gamma,
            },
            opt,
        )
    }
}

impl Scheduler for StepLR {
    accessors!("StepLR");
    fn get_lr(&mut self, _group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        let e = self.base.last_epoch;
        Ok(if e == 0 || e.rem_euclid(self.step_size) != 0 {
            lr
        } else {
            lr * self.gamma
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        let n = self.base.last_epoch.div_euclid(self.step_size);
        Some(self.base.base_lrs.get(group)? * self.gamma.powf(n as f64))
    }
}

/// `torch.optim.lr_scheduler.MultiStepLR`: the rate times `gamma` at each milestone (a
/// milestone given twice applies twice).
#[derive(Debug)]
pub struct MultiStepLR {
    base: SchedulerBase,
    milestones: Vec<i64>,
    gamma: f64,
}

impl MultiStepLR {
    /// `MultiStepLR(optimizer, milestones, gamma)` (PyTorch's default gamma is 0.1).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a non-finite `gamma`; the optimizer's refusal of
    /// the first rate.
    pub fn new(opt: &mut dyn LrTarget, milestones: Vec<i64>, gamma: f64) -> Result<Self> {
        config(gamma.is_finite(), "gamma", gamma, "finite")?;
        let mut milestones = milestones;
        milestones.sort_unstable();
        let base = SchedulerBase::attach(opt);
        start(
            MultiStepLR {
                base,
                milestones,
                gamma,
            },
            opt,
        )
    }
}

impl Scheduler for MultiStepLR {
    accessors!("MultiStepLR");
    fn get_lr(&mut self, _group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        let e = self.base.last_epoch;
        let n = self.milestones.iter().filter(|&&m| m == e).count();
        Ok(if n == 0 {
            lr
        } else {
            lr * self.gamma.powf(n as f64)
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        // bisect_right over the sorted milestones.
        let e = self.base.last_epoch;
        let n = self.milestones.partition_point(|&m| m <= e);
        Some(self.base.base_lrs.get(group)? * self.gamma.powf(n as f64))
    }
}

/// `torch.optim.lr_scheduler.ConstantLR`: the rate times `factor` until `total_iters`.
#[derive(Debug)]
pub struct ConstantLR {
    base: SchedulerBase,
    factor: f64,
    total_iters: i64,
}

impl ConstantLR {
    /// `ConstantLR(optimizer, factor, total_iters)` (PyTorch's defaults: 1/3, 5).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a `factor` outside [0, 1] (PyTorch's "Constant
    /// multiplicative factor expected to be between 0 and 1") or negative `total_iters`; the
    /// optimizer's refusal of the first rate.
    pub fn new(opt: &mut dyn LrTarget, factor: f64, total_iters: i64) -> Result<Self> {
        config(
            (0.0..=1.0).contains(&factor),
            "factor",
            factor,
            "between 0 and 1 (Constant multiplicative factor)",
        )?;
        config(total_iters >= 0, "total_iters", total_iters as f64, ">= 0")?;
        let base = SchedulerBase::attach(opt);
        start(
            ConstantLR {
                base,
                factor,
                total_iters,
            },
            opt,
        )
    }
}

impl Scheduler for ConstantLR {
    accessors!("ConstantLR");
    fn get_lr(&mut self, _group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        let e = self.base.last_epoch;
        Ok(if e == 0 {
            lr * self.factor
        } else if e != self.total_iters {
            lr
        } else {
            lr * (1.0 / self.factor)
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        let reached = if self.base.last_epoch >= self.total_iters {
            1.0 - self.factor
        } else {
            0.0
        };
        Some(self.base.base_lrs.get(group)? * (self.factor + reached))
    }
}

/// `torch.optim.lr_scheduler.LinearLR`: the factor moves linearly from `start_factor` to
/// `end_factor` over `total_iters` epochs (a warm-up).
#[derive(Debug)]
pub struct LinearLR {
    base: SchedulerBase,
    start_factor: f64,
    end_factor: f64,
    total_iters: i64,
}

impl LinearLR {
    /// `LinearLR(optimizer, start_factor, end_factor, total_iters)` (PyTorch's defaults:
    /// 1/3, 1.0, 5).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for `start_factor` outside (0, 1], `end_factor`
    /// outside [0, 1] (PyTorch's checks) or `total_iters < 1`; the optimizer's refusal of the
    /// first rate.
    pub fn new(
        opt: &mut dyn LrTarget,
        start_factor: f64,
        end_factor: f64,
        total_iters: i64,
    ) -> Result<Self> {
        config(
            start_factor > 0.0 && start_factor <= 1.0,
            "start_factor",
            start_factor,
            "greater than 0 and less or equal to 1 (Starting multiplicative factor)",
        )?;
        config(
            (0.0..=1.0).contains(&end_factor),
            "end_factor",
            end_factor,
            "between 0 and 1 (Ending multiplicative factor)",
        )?;
        config(total_iters >= 1, "total_iters", total_iters as f64, ">= 1")?;
        let base = SchedulerBase::attach(opt);
        start(
            LinearLR {
                base,
                start_factor,
                end_factor,
                total_iters,
            },
            opt,
        )
    }
}

impl Scheduler for LinearLR {
    accessors!("LinearLR");
    fn get_lr(&mut self, _group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        let e = self.base.last_epoch;
        let (s, f) = (self.start_factor, self.end_factor);
        Ok(if e == 0 {
            lr * s
        } else if self.base.is_initial || e > self.total_iters {
            lr
        } else {
            lr * (1.0 + (f - s) / (self.total_iters as f64 * s + (e - 1) as f64 * (f - s)))
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        let (s, f) = (self.start_factor, self.end_factor);
        let done = self.total_iters.min(self.base.last_epoch) as f64;
        Some(self.base.base_lrs.get(group)? * (s + (f - s) * done / self.total_iters as f64))
    }
}

/// `torch.optim.lr_scheduler.ExponentialLR`: the rate times `gamma` every epoch.
#[derive(Debug)]
pub struct ExponentialLR {
    base: SchedulerBase,
    gamma: f64,
}

impl ExponentialLR {
    /// `ExponentialLR(optimizer, gamma)`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a non-finite `gamma`; the optimizer's refusal of
    /// the first rate.
    pub fn new(opt: &mut dyn LrTarget, gamma: f64) -> Result<Self> {
        config(gamma.is_finite(), "gamma", gamma, "finite")?;
        let base = SchedulerBase::attach(opt);
        start(ExponentialLR { base, gamma }, opt)
    }
}

impl Scheduler for ExponentialLR {
    accessors!("ExponentialLR");
    fn get_lr(&mut self, _group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        Ok(if self.base.is_initial {
            lr
        } else {
            lr * self.gamma
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        Some(self.base.base_lrs.get(group)? * self.gamma.powf(self.base.last_epoch as f64))
    }
}

/// `torch.optim.lr_scheduler.CosineAnnealingLR`: cosine annealing from the base rate to
/// `eta_min` over `t_max` epochs (and back up after, as PyTorch's recurrence does).
#[derive(Debug)]
pub struct CosineAnnealingLR {
    base: SchedulerBase,
    t_max: i64,
    eta_min: f64,
}

impl CosineAnnealingLR {
    /// `CosineAnnealingLR(optimizer, T_max, eta_min)` (PyTorch's default eta_min is 0).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for `t_max < 1` or a negative or non-finite
    /// `eta_min`; the optimizer's refusal of the first rate.
    pub fn new(opt: &mut dyn LrTarget, t_max: i64, eta_min: f64) -> Result<Self> {
        config(t_max >= 1, "T_max", t_max as f64, ">= 1")?;
        config(
            eta_min.is_finite() && eta_min >= 0.0,
            "eta_min",
            eta_min,
            "finite and >= 0",
        )?;
        let base = SchedulerBase::attach(opt);
        start(
            CosineAnnealingLR {
                base,
                t_max,
                eta_min,
            },
            opt,
        )
    }
}

impl Scheduler for CosineAnnealingLR {
    accessors!("CosineAnnealingLR");
    fn get_lr(&mut self, group: usize, lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        let (c, t, eta) = (&self.base, self.t_max as f64, self.eta_min);
        let (e, base_lr) = (c.last_epoch, c.base_lr(group)?);
        Ok(if c.is_initial {
            lr
        } else if c.step_count == 1 && e > 0 {
            eta + (base_lr - eta) * (1.0 + (e as f64 * PI / t).cos()) / 2.0
        } else if (e - 1 - self.t_max).rem_euclid(2 * self.t_max) == 0 {
            lr + (base_lr - eta) * (1.0 - (PI / t).cos()) / 2.0
        } else {
            (1.0 + (PI * e as f64 / t).cos()) / (1.0 + (PI * (e - 1) as f64 / t).cos()) * (lr - eta)
                + eta
        })
    }
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        let (c, t, eta) = (&self.base, self.t_max as f64, self.eta_min);
        let base_lr = *c.base_lrs.get(group)?;
        Some(eta + (base_lr - eta) * (1.0 + (PI * c.last_epoch as f64 / t).cos()) / 2.0)
    }
}

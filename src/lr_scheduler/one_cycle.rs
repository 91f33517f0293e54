//! [`OneCycleLR`]: PyTorch's 1cycle policy, its rates and momenta computed as PyTorch computes
//! them.
use super::schedules::accessors;
use super::{config, start, LrTarget, Scheduler, SchedulerBase};
use crate::error::{Error, Result};
use std::f64::consts::PI;

/// How [`OneCycleLR`] moves between two values (PyTorch's `anneal_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anneal {
    /// `"cos"`, PyTorch's default.
    #[default]
    Cos,
    /// `"linear"`.
    Linear,
}

impl Anneal {
    fn apply(self, start: f64, end: f64, pct: f64) -> f64 {
        match self {
            Anneal::Cos => {
                let cos_out = (PI * pct).cos() + 1.0;
                end + (start - end) / 2.0 * cos_out
            }
            Anneal::Linear => (end - start) * pct + start,
        }
    }
}

/// The options of [`OneCycleLR`], with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OneCycle {
    /// `max_lr`: the peak rate.
    pub max_lr: f64,
    /// `total_steps`.
    pub total_steps: i64,
    /// `pct_start`: the share of the steps spent rising (0.3).
    pub pct_start: f64,
    /// `anneal_strategy` ([`Anneal::Cos`]).
    pub anneal_strategy: Anneal,
    /// `cycle_momentum` (true): the momentum (or Adam's `beta1`) moves inversely to the rate.
    pub cycle_momentum: bool,
    /// `base_momentum` (0.85).
    pub base_momentum: f64,
    /// `max_momentum` (0.95).
    pub max_momentum: f64,
    /// `div_factor` (25): the first rate is `max_lr / div_factor`.
    pub div_factor: f64,
    /// `final_div_factor` (1e4): the last rate is the first divided by this.
    pub final_div_factor: f64,
    /// `three_phase` (false): fall back to the first rate before annealing to the last.
    pub three_phase: bool,
}

impl OneCycle {
    /// PyTorch's defaults for `max_lr` over `total_steps` steps.
    pub fn new(max_lr: f64, total_steps: i64) -> OneCycle {
        OneCycle {
            max_lr,
            total_steps,
            pct_start: 0.3,
            anneal_strategy: Anneal::Cos,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
        }
    }
}

/// One phase: where it ends and which values it moves between (PyTorch's `_schedule_phases`).
#[derive(Debug, Clone, Copy)]
struct Phase {
    end_step: f64,
    lr: (f64, f64),
    momentum: (f64, f64),
}

/// `torch.optim.lr_scheduler.OneCycleLR`.
///
/// ```
/// use tch::{nn, Device};
/// use tch_fabric::lr_scheduler::{OneCycle, OneCycleLR, Scheduler};
/// use tch_fabric::{Fabric, FusedSgd, StepOutcome};
/// let fabric = Fabric::new("32-true")?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
/// let opt = FusedSgd::new(&vs, 0.1)?.momentum(0.9);
/// let (_model, mut opt) = fabric.setup(layer, &mut vs, opt)?;
/// let mut sched = OneCycleLR::new(&mut opt, OneCycle::new(1.0, 10))?;
/// // max_lr / div_factor, up to the rounding of PyTorch's cosine at 0
/// assert!((opt.lr() - 1.0 / 25.0).abs() < 1e-12 && opt.momentum() == Some(0.95));
/// for _ in 0..10 {
///     sched.step(&StepOutcome::Stepped, &mut opt)?;
/// }
/// assert!(sched.step(&StepOutcome::Stepped, &mut opt).is_err()); // past total_steps
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct OneCycleLR {
    base: SchedulerBase,
    total_steps: i64,
    phases: Vec<Phase>,
    anneal: Anneal,
    cycle_momentum: bool,
}

impl OneCycleLR {
    /// `OneCycleLR(optimizer, ...)`: sets the optimizer's `initial_lr` to
    /// `max_lr / div_factor`, its momentum to `max_momentum` (when cycling) and its rate for
    /// the first step.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad option (PyTorch's checks, and positive finite rates
    /// and factors); "optimizer must support momentum or beta1" when cycling the momentum of
    /// an optimizer without one; the optimizer's refusal of the first rate.
    pub fn new(opt: &mut dyn LrTarget, c: OneCycle) -> Result<Self> {
        config(
            c.total_steps > 0,
            "total_steps",
            c.total_steps as f64,
            "a positive integer",
        )?;
        config(
            (0.0..=1.0).contains(&c.pct_start),
            "pct_start",
            c.pct_start,
            "a float between 0 and 1",
        )?;
        for (field, v) in [
            ("max_lr", c.max_lr),
            ("div_factor", c.div_factor),
            ("final_div_factor", c.final_div_factor),
        ] {
            config(v.is_finite() && v > 0.0, field, v, "finite and > 0")?;
        }
        for (field, v) in [
            ("base_momentum", c.base_momentum),
            ("max_momentum", c.max_momentum),
        ] {
            config(v.is_finite(), field, v, "finite")?;
        }
        if c.cycle_momentum && opt.momentum().is_none() {
            return Err(Error::Usage(
                "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
                    .into(),
            ));
        }
        let initial = c.max_lr / c.div_factor;
        let min = initial / c.final_div_factor;
        let total = c.total_steps as f64;
        let (top, base) = (c.max_momentum, c.base_momentum);
        let rise = c.pct_start * total - 1.0;
        let phases = if c.three_phase {
            vec![
                Phase {
                    end_step: rise,
                    lr: (initial, c.max_lr),
                    momentum: (top, base),
                },
                Phase {
                    end_step: 2.0 * c.pct_start * total - 2.0,
                    lr: (c.max_lr, initial),
                    momentum: (base, top),
                },
                Phase {
                    end_step: total - 1.0,
                    lr: (initial, min),
                    momentum: (top, top),
                },
            ]
        } else {
            vec![
                Phase {
                    end_step: rise,
                    lr: (initial, c.max_lr),
                    momentum: (top, base),
                },
                Phase {
                    end_step: total - 1.0,
                    lr: (c.max_lr, min),
                    momentum: (base, top),
                },
            ]
        };
        // The first step's rate, before anything is changed: a schedule PyTorch would divide
        // by zero in (pct_start * total_steps = 1) is refused with the optimizer untouched.
        rate_at(&phases, c.anneal_strategy, 0.0)?;
        if c.cycle_momentum {
            opt.set_momentum(top)?;
        }
        let groups = opt.group_lrs().len();
        for g in 0..groups {
            opt.set_initial_lr(g, initial);
        }
        let mut base = SchedulerBase::attach(opt);
        base.base_lrs = vec![initial; groups];
        start(
            OneCycleLR {
                base,
                total_steps: c.total_steps,
                phases,
                anneal: c.anneal_strategy,
                cycle_momentum: c.cycle_momentum,
            },
            opt,
        )
    }
}

impl Scheduler for OneCycleLR {
    accessors!("OneCycleLR");
    /// The same rate for every group (one `max_lr`), and every group's momentum set with it.
    fn get_lr(&mut self, _group: usize, _lr: f64, opt: &mut dyn LrTarget) -> Result<f64> {
        let step = self.base.last_epoch;
        if step > self.total_steps {
            return Err(Error::Usage(format!(
                "Tried to step {step} times. The specified number of total steps is {}",
                self.total_steps
            )));
        }
        let (lr, momentum) = rate_at(&self.phases, self.anneal, step as f64)?;
        if self.cycle_momentum {
            opt.set_momentum(momentum)?;
        }
        Ok(lr)
    }
}

/// The rate and momentum at `step`, as PyTorch's `get_lr` computes them; an error where its
/// division by a phase of no steps would give NaN (Python raises ZeroDivisionError).
fn rate_at(phases: &[Phase], anneal: Anneal, step: f64) -> Result<(f64, f64)> {
    let last = phases.len().saturating_sub(1);
    let mut start_step = 0.0;
    for (i, p) in phases.iter().enumerate() {
        if step <= p.end_step || i == last {
            let pct = (step - start_step) / (p.end_step - start_step);
            let lr = anneal.apply(p.lr.0, p.lr.1, pct);
            let momentum = anneal.apply(p.momentum.0, p.momentum.1, pct);
            if !(lr.is_finite() && momentum.is_finite()) {
                return Err(Error::InvalidConfig {
                    field: "pct_start",
                    value: format!("one that makes a phase of no steps (at step {step})"),
                    allowed: "one that gives each phase a step (PyTorch divides by zero there)",
                });
            }
            return Ok((lr, momentum));
        }
        start_step = p.end_step;
    }
    // Not reached: the last phase matches every step.
    Err(Error::Usage("OneCycleLR has no phases".into()))
}

//! Learning-rate schedules: PyTorch's `torch.optim.lr_scheduler` classes with their names and
//! their own recurrences, so the rates are bit-identical to PyTorch's ([`LambdaLR`], [`StepLR`],
//! [`MultiStepLR`], [`ConstantLR`], [`LinearLR`], [`ExponentialLR`], [`CosineAnnealingLR`],
//! [`OneCycleLR`], [`SequentialLR`]), and [`ClosureLR`], a schedule given as a closure.
//!
//! Every scheduler implements [`Scheduler`]. As in PyTorch, building one sets the optimizer's
//! rate for the first step, and [`Scheduler::step`] goes after the optimizer's step. Unlike
//! PyTorch, a step that the GradScaler skipped (`16-mixed`) does not advance the schedule:
//! [`Scheduler::step`] takes the [`StepOutcome`]. Their state ([`SchedulerState`], serde) goes
//! into a checkpoint with the user's own state.
//!
//! ```
//! use tch::{nn, Device};
//! use tch_fabric::lr_scheduler::{CosineAnnealingLR, LinearLR, Scheduler, SequentialLR};
//! use tch_fabric::{Fabric, FusedAdamW, StepOutcome};
//! let fabric = Fabric::new("32-true")?;
//! let mut vs = nn::VarStore::new(Device::Cpu);
//! let layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
//! let opt = FusedAdamW::new(&vs, 0.1)?;
//! let (_model, mut opt) = fabric.setup(layer, &mut vs, opt)?;
//! // Warm up for 5 steps, then cosine over 95: PyTorch's SequentialLR.
//! let warmup = LinearLR::new(&mut opt, 0.01, 1.0, 5)?;
//! let cosine = CosineAnnealingLR::new(&mut opt, 95, 0.0)?;
//! let mut sched = SequentialLR::new(&mut opt, vec![Box::new(warmup), Box::new(cosine)], vec![5])?;
//! assert_eq!(opt.lr(), 0.1 * 0.01);
//! sched.step(&StepOutcome::Stepped, &mut opt)?;
//! assert!(opt.lr() > 0.001);
//! # Ok::<(), tch_fabric::Error>(())
//! ```
mod closure;
mod one_cycle;
mod schedules;
mod sequential;

pub use closure::ClosureLR;
pub use one_cycle::{Anneal, OneCycle, OneCycleLR};
pub use schedules::{
    ConstantLR, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR, MultiStepLR, StepLR,
};
pub use sequential::SequentialLR;

use crate::error::{Error, Result};
use crate::fabric::FabricOptimizer;
use crate::scaler::StepOutcome;
use serde::{Deserialize, Serialize};

/// What a scheduler drives: an optimizer's learning rate per param group (PyTorch's
/// `param_group["lr"]`), the rate the first scheduler found (`param_group["initial_lr"]`), and
/// the momentum that [`OneCycleLR`] cycles (`momentum`, or `betas[0]` of the Adam family).
pub trait LrTarget {
    /// Each param group's learning rate.
    fn group_lrs(&self) -> Vec<f64>;

    /// Sets param group `group`'s learning rate.
    ///
    /// # Errors
    ///
    /// The optimizer's error for a group it lacks or a rate it refuses (nothing changes then).
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()>;

    /// PyTorch's `initial_lr` of each param group: set by the first scheduler built on this
    /// optimizer, read by the later ones as their base rates.
    fn initial_lrs(&self) -> Vec<Option<f64>>;

    /// Sets param group `group`'s `initial_lr`.
    fn set_initial_lr(&mut self, group: usize, lr: f64);

    /// The momentum (`momentum`, or `beta1` of the Adam family); `None` for an optimizer
    /// without one.
    fn momentum(&self) -> Option<f64>;

    /// Sets every group's momentum.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for an optimizer without one, [`Error::InvalidConfig`] for a value
    /// it refuses.
    fn set_momentum(&mut self, momentum: f64) -> Result<()>;
}

impl LrTarget for FabricOptimizer {
    fn group_lrs(&self) -> Vec<f64> {
        FabricOptimizer::group_lrs(self)
    }
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        FabricOptimizer::set_group_lr(self, group, lr)
    }
    fn initial_lrs(&self) -> Vec<Option<f64>> {
        FabricOptimizer::initial_lrs(self)
    }
    fn set_initial_lr(&mut self, group: usize, lr: f64) {
        FabricOptimizer::set_initial_lr(self, group, lr)
    }
    fn momentum(&self) -> Option<f64> {
        FabricOptimizer::momentum(self)
    }
    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        FabricOptimizer::set_momentum(self, momentum)
    }
}

/// What every scheduler keeps: PyTorch's `LRScheduler` attributes, with one rate per param
/// group.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerBase {
    /// `base_lrs`: each group's `initial_lr` when the scheduler was built.
    pub base_lrs: Vec<f64>,
    /// `last_epoch`: steps taken (`-1` before the first, internal step).
    pub last_epoch: i64,
    /// `_step_count`: calls of `step`, the one made while building included.
    pub step_count: u64,
    /// `_last_lr`: the rates this scheduler set last.
    pub last_lrs: Vec<f64>,
    /// `_is_initial`: true during the step made while building.
    pub is_initial: bool,
}

impl SchedulerBase {
    /// Param group `group`'s base rate.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for a group the scheduler was not built with.
    pub fn base_lr(&self, group: usize) -> Result<f64> {
        self.base_lrs.get(group).copied().ok_or_else(|| {
            Error::Usage(format!(
                "param group {group}: the scheduler was built on {} groups",
                self.base_lrs.len()
            ))
        })
    }

    /// A scheduler's starting point on `opt`: each group's `initial_lr` set to its current rate
    /// unless an earlier scheduler set it, and taken as its base rate (PyTorch's
    /// `last_epoch=-1`).
    pub fn attach(opt: &mut dyn LrTarget) -> SchedulerBase {
        let lrs = opt.group_lrs();
        let initial = opt.initial_lrs();
        let base_lrs = lrs
            .iter()
            .enumerate()
            .map(|(g, &lr)| match initial.get(g).copied().flatten() {
                Some(initial) => initial,
                None => {
                    opt.set_initial_lr(g, lr);
                    lr
                }
            })
            .collect();
        SchedulerBase {
            base_lrs,
            last_epoch: -1,
            step_count: 0,
            last_lrs: lrs,
            is_initial: false,
        }
    }
}

/// A scheduler's state for a checkpoint: PyTorch's `state_dict()` without the
/// hyper-parameters (which come from building the scheduler, as `LambdaLR`'s functions do).
///
/// Its serde form is PyTorch's own (`base_lrs`, `last_epoch`, `_step_count`, `_last_lr`,
/// SequentialLR's `_schedulers`, LambdaLR's `lr_lambdas: [None, ...]`, plus `kind`), so the
/// `state_dict()` of a `torch.optim.lr_scheduler` scheduler in a torch.save checkpoint
/// deserialises into it, and what it serialises to loads with PyTorch's `load_state_dict`. A
/// state without `kind` (one from Python) loads into any scheduler of the same shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "StateWire", try_from = "StateWire")]
pub struct SchedulerState {
    /// The scheduler's PyTorch name (`StepLR`, ...): a state loads only into the same kind;
    /// empty for a state from Python, which does not record it.
    pub kind: String,
    /// `base_lrs`, one per param group.
    pub base_lrs: Vec<f64>,
    /// `last_epoch`.
    pub last_epoch: i64,
    /// `_step_count`.
    pub step_count: u64,
    /// `_last_lr`, one per param group.
    pub last_lrs: Vec<f64>,
    /// The states of [`SequentialLR`]'s schedulers, in order (empty for the others).
    pub schedulers: Vec<SchedulerState>,
}

/// [`SchedulerState`] under PyTorch's names.
#[derive(Serialize, Deserialize)]
struct StateWire {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    kind: String,
    /// SequentialLR's PyTorch state has no `base_lrs` and no `_step_count`.
    #[serde(default)]
    base_lrs: Vec<f64>,
    last_epoch: i64,
    #[serde(rename = "_step_count", default)]
    step_count: u64,
    #[serde(rename = "_is_initial", default)]
    is_initial: bool,
    #[serde(rename = "_get_lr_called_within_step", default)]
    get_lr_called_within_step: bool,
    #[serde(rename = "_last_lr")]
    last_lr: Vec<f64>,
    #[serde(rename = "_schedulers", default, skip_serializing_if = "Vec::is_empty")]
    schedulers: Vec<SchedulerState>,
    /// LambdaLR's `load_state_dict` pops it: one None per parameter group (a plain function
    /// is not saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lr_lambdas: Option<Vec<()>>,
}

impl From<SchedulerState> for StateWire {
    fn from(s: SchedulerState) -> Self {
        StateWire {
            lr_lambdas: (s.kind == "LambdaLR").then(|| vec![(); s.base_lrs.len()]),
            // Written for SequentialLR too (PyTorch's has none; its load only sets an
            // attribute it never reads), so that a state reads back equal.
            base_lrs: s.base_lrs,
            kind: s.kind,
            last_epoch: s.last_epoch,
            step_count: s.step_count,
            is_initial: false,
            get_lr_called_within_step: false,
            last_lr: s.last_lrs,
            schedulers: s.schedulers,
        }
    }
}

impl TryFrom<StateWire> for SchedulerState {
    type Error = String;
    fn try_from(w: StateWire) -> std::result::Result<Self, String> {
        if w.last_lr.is_empty() {
            return Err("'_last_lr' holds no rate: a scheduler drives at least one group".into());
        }
        let base_lrs = if w.base_lrs.is_empty() {
            w.last_lr.clone()
        } else if w.base_lrs.len() == w.last_lr.len() {
            w.base_lrs
        } else {
            return Err(format!(
                "'base_lrs' holds {} rates and '_last_lr' {}: one per param group in both",
                w.base_lrs.len(),
                w.last_lr.len()
            ));
        };
        Ok(SchedulerState {
            kind: w.kind,
            base_lrs,
            last_epoch: w.last_epoch,
            step_count: w.step_count,
            last_lrs: w.last_lr,
            schedulers: w.schedulers,
        })
    }
}

/// A learning-rate scheduler. Implement [`Scheduler::get_lr`] (PyTorch's `get_lr`, the
/// recurrence, for one param group) and the accessors to add one; the stepping is shared.
pub trait Scheduler: std::fmt::Debug {
    /// PyTorch's class name.
    fn kind(&self) -> &'static str;

    /// The shared state.
    fn base(&self) -> &SchedulerBase;

    /// The shared state, mutably.
    fn base_mut(&mut self) -> &mut SchedulerBase;

    /// The rate of param group `group` for `base().last_epoch`, given its current rate `lr`
    /// (PyTorch's `get_lr`, which reads `group["lr"]`).
    ///
    /// # Errors
    ///
    /// A schedule that has run out ([`OneCycleLR`] past its total steps).
    fn get_lr(&mut self, group: usize, lr: f64, opt: &mut dyn LrTarget) -> Result<f64>;

    /// PyTorch's `_get_closed_form_lr` for param group `group`, where the class has one: used
    /// when a [`SequentialLR`] restarts this scheduler at a milestone.
    fn closed_form_lr(&self, group: usize) -> Option<f64> {
        let _ = group;
        None
    }

    /// One step of the schedule after a taken optimizer step; a skipped one
    /// ([`StepOutcome::is_skipped`]) leaves everything as it is. The rates for the next step
    /// are then [`Scheduler::get_last_lr`].
    ///
    /// # Errors
    ///
    /// As [`Scheduler::advance`].
    fn step(&mut self, outcome: &StepOutcome, opt: &mut dyn LrTarget) -> Result<()> {
        if outcome.is_skipped() {
            return Ok(());
        }
        self.advance(opt)
    }

    /// PyTorch's `scheduler.step()`: one step whatever happened to the optimizer step.
    ///
    /// # Errors
    ///
    /// The schedule's error ([`OneCycleLR`] past its total steps) or the optimizer's refusal
    /// of a rate; the scheduler and the rates are unchanged then.
    fn advance(&mut self, opt: &mut dyn LrTarget) -> Result<()> {
        let before = self.base().clone();
        self.base_mut().step_count = self.base().step_count.saturating_add(1);
        self.update_lr(None, opt)
            .inspect_err(|_| *self.base_mut() = before)
    }

    /// PyTorch's `_update_lr(epoch)`: moves to `epoch` (closed form where there is one) or to
    /// the next epoch, and sets every group's rate.
    ///
    /// # Errors
    ///
    /// As [`Scheduler::advance`]; the scheduler and the rates are unchanged then.
    fn update_lr(&mut self, epoch: Option<i64>, opt: &mut dyn LrTarget) -> Result<()> {
        let before = self.base().clone();
        let old = opt.group_lrs();
        let lrs = match self.next_lrs(epoch, opt) {
            Ok(lrs) => lrs,
            Err(e) => {
                *self.base_mut() = before;
                return Err(e);
            }
        };
        for (g, &lr) in lrs.iter().enumerate() {
            if let Err(e) = opt.set_group_lr(g, lr) {
                // Put back the rates already set: they were accepted, so they are again.
                for (k, &lr) in old.iter().enumerate().take(g) {
                    opt.set_group_lr(k, lr)?;
                }
                *self.base_mut() = before;
                return Err(e);
            }
        }
        self.base_mut().last_lrs = lrs;
        Ok(())
    }

    /// The epoch move and rates of [`Scheduler::update_lr`], before the rates are set: every
    /// group's computed from the rates as they are, as PyTorch's `get_lr` does.
    ///
    /// # Errors
    ///
    /// As [`Scheduler::get_lr`]; [`Error::Usage`] when the optimizer's param groups are not
    /// the ones the scheduler was built on.
    fn next_lrs(&mut self, epoch: Option<i64>, opt: &mut dyn LrTarget) -> Result<Vec<f64>> {
        let lrs = opt.group_lrs();
        if lrs.len() != self.base().base_lrs.len() {
            return Err(Error::Usage(format!(
                "{} was built on an optimizer with {} param groups; this one has {}",
                self.kind(),
                self.base().base_lrs.len(),
                lrs.len()
            )));
        }
        self.base_mut().last_epoch = match epoch {
            None => next_epoch(self.base().last_epoch)?,
            Some(e) => e,
        };
        (0..lrs.len())
            .map(|g| match epoch.and_then(|_| self.closed_form_lr(g)) {
                Some(lr) => Ok(lr),
                None => self.get_lr(g, lrs[g], opt),
            })
            .collect()
    }

    /// PyTorch's `_initial_step`: the step every scheduler makes when built.
    ///
    /// # Errors
    ///
    /// As [`Scheduler::advance`].
    fn initial_step(&mut self, opt: &mut dyn LrTarget) -> Result<()> {
        let before = self.base().clone();
        let base = self.base_mut();
        base.step_count = 1;
        base.is_initial = true;
        let r = self.update_lr(None, opt);
        self.base_mut().is_initial = false;
        r.inspect_err(|_| *self.base_mut() = before)
    }

    /// What [`SequentialLR`] does to each scheduler it takes (`recursive_undo`): one epoch
    /// back.
    fn undo(&mut self) {
        self.base_mut().last_epoch -= 1;
    }

    /// PyTorch's `get_last_lr()`: the rate of each param group this scheduler set last.
    fn get_last_lr(&self) -> &[f64] {
        &self.base().last_lrs
    }

    /// PyTorch's `last_epoch`.
    fn last_epoch(&self) -> i64 {
        self.base().last_epoch
    }

    /// The state to save in a checkpoint.
    fn state_dict(&self) -> SchedulerState {
        SchedulerState::of(self.kind(), self.base(), Vec::new())
    }

    /// Restores a state from [`Scheduler::state_dict`]. The optimizer's rates are restored
    /// with the optimizer, not here (as in PyTorch).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for another kind of scheduler, another number of param groups or
    /// impossible values; nothing changes then.
    fn load_state_dict(&mut self, state: &SchedulerState) -> Result<()> {
        let base = check_state(self.kind(), state, 0, self.base().base_lrs.len())?;
        *self.base_mut() = base;
        Ok(())
    }
}

impl SchedulerState {
    /// The state of a scheduler of `kind` with `base` and nested `schedulers`.
    pub(crate) fn of(
        kind: &str,
        c: &SchedulerBase,
        schedulers: Vec<SchedulerState>,
    ) -> SchedulerState {
        SchedulerState {
            kind: kind.to_string(),
            base_lrs: c.base_lrs.clone(),
            last_epoch: c.last_epoch,
            step_count: c.step_count,
            last_lrs: c.last_lrs.clone(),
            schedulers,
        }
    }
}

/// The [`SchedulerBase`] a state describes, after checking that it is one for `kind` with
/// `children` nested states, `groups` param groups and possible values.
pub(crate) fn check_state(
    kind: &str,
    state: &SchedulerState,
    children: usize,
    groups: usize,
) -> Result<SchedulerBase> {
    let refuse = |what: String| Err(Error::InvalidState(format!("{kind} state: {what}")));
    if !state.kind.is_empty() && state.kind != kind {
        return refuse(format!("it is the state of a {}", state.kind));
    }
    if state.schedulers.len() != children {
        return refuse(format!(
            "it holds {} scheduler states, this scheduler has {children}",
            state.schedulers.len()
        ));
    }
    if state.base_lrs.len() != groups || state.last_lrs.len() != groups {
        return refuse(format!(
            "it holds rates for {} param groups, the optimizer has {groups}",
            state.last_lrs.len()
        ));
    }
    for (name, rates) in [("base_lr", &state.base_lrs), ("last_lr", &state.last_lrs)] {
        if let Some(v) = rates.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return refuse(format!("{name} = {v}: a learning rate is finite and >= 0"));
        }
    }
    if state.last_epoch < -1 {
        return refuse(format!("last_epoch = {}: must be >= -1", state.last_epoch));
    }
    Ok(SchedulerBase {
        base_lrs: state.base_lrs.clone(),
        last_epoch: state.last_epoch,
        step_count: state.step_count,
        last_lrs: state.last_lrs.clone(),
        is_initial: false,
    })
}

/// Refuses a hyper-parameter outside its range, in PyTorch's words.
pub(crate) fn config(
    ok: bool,
    field: &'static str,
    value: f64,
    allowed: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            value: value.to_string(),
            allowed,
        })
    }
}

/// Builds a scheduler on `opt` and makes its first step (the constructor of PyTorch's classes).
pub(crate) fn start<S: Scheduler>(mut s: S, opt: &mut dyn LrTarget) -> Result<S> {
    s.initial_step(opt)?;
    Ok(s)
}

/// The epoch after `last_epoch`, refused at `i64::MAX` (where it would wrap to the most
/// negative epoch).
pub(crate) fn next_epoch(last_epoch: i64) -> Result<i64> {
    last_epoch.checked_add(1).ok_or_else(|| {
        Error::Usage(format!(
            "the scheduler is at epoch {last_epoch}, the last an i64 holds: it cannot step further"
        ))
    })
}

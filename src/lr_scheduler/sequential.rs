//! [`SequentialLR`]: schedulers one after the other, switching at milestones (a warm-up, then
//! the main schedule), as PyTorch chains them.
use super::{check_state, LrTarget, Scheduler, SchedulerBase, SchedulerState};
use crate::error::{Error, Result};

/// `torch.optim.lr_scheduler.SequentialLR`: `schedulers[i]` runs from `milestones[i - 1]`
/// on; at a milestone the next one restarts at epoch 0 (its closed form where it has one).
/// The schedulers must have been built on the same optimizer, as in PyTorch.
#[derive(Debug)]
pub struct SequentialLR {
    base: SchedulerBase,
    schedulers: Vec<Box<dyn Scheduler>>,
    milestones: Vec<i64>,
}

impl SequentialLR {
    /// `SequentialLR(optimizer, schedulers, milestones)`: resets the rate to the optimizer's
    /// `initial_lr`, takes every scheduler one epoch back and restarts the first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for no scheduler or a milestone count other than one fewer
    /// than the schedulers (PyTorch's messages), or milestones that do not increase; the
    /// optimizer's refusal of the rate.
    pub fn new(
        opt: &mut dyn LrTarget,
        schedulers: Vec<Box<dyn Scheduler>>,
        milestones: Vec<i64>,
    ) -> Result<Self> {
        if schedulers.is_empty() {
            return Err(Error::InvalidConfig {
                field: "schedulers",
                value: "[]".into(),
                allowed: "at least one scheduler (SequentialLR expects at least one scheduler)",
            });
        }
        if milestones.len() + 1 != schedulers.len() {
            return Err(Error::InvalidConfig {
                field: "milestones",
                value: format!("{milestones:?} for {} schedulers", schedulers.len()),
                allowed: "one fewer than the schedulers (Sequential Schedulers expects number \
                          of schedulers provided to be one more than the number of milestone \
                          points)",
            });
        }
        if milestones.windows(2).any(|w| w[0] >= w[1]) || milestones.first().is_some_and(|&m| m < 0)
        {
            return Err(Error::InvalidConfig {
                field: "milestones",
                value: format!("{milestones:?}"),
                allowed: "non-negative and increasing",
            });
        }
        let lrs = opt.group_lrs();
        let initial: Vec<f64> = opt
            .initial_lrs()
            .into_iter()
            .zip(&lrs)
            .map(|(initial, &lr)| initial.unwrap_or(lr))
            .collect();
        for (g, &lr) in initial.iter().enumerate() {
            if let Err(e) = opt.set_group_lr(g, lr) {
                for (k, &lr) in lrs.iter().enumerate().take(g) {
                    opt.set_group_lr(k, lr)?;
                }
                return Err(e);
            }
        }
        let mut s = SequentialLR {
            base: SchedulerBase {
                base_lrs: initial.clone(),
                last_epoch: 0,
                step_count: 0,
                last_lrs: initial,
                is_initial: false,
            },
            schedulers,
            milestones,
        };
        for child in &mut s.schedulers {
            child.undo();
        }
        let idx = s.index(0);
        s.schedulers[idx].initial_step(opt)?;
        s.base.last_lrs = s.schedulers[idx].get_last_lr().to_vec();
        Ok(s)
    }

    /// `bisect_right(milestones, epoch)`: the scheduler in charge at `epoch`.
    fn index(&self, epoch: i64) -> usize {
        self.milestones.partition_point(|&m| m <= epoch)
    }

    /// The schedulers, in order.
    pub fn schedulers(&self) -> &[Box<dyn Scheduler>] {
        &self.schedulers
    }
}

impl Scheduler for SequentialLR {
    fn kind(&self) -> &'static str {
        "SequentialLR"
    }
    fn base(&self) -> &SchedulerBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut SchedulerBase {
        &mut self.base
    }

    /// PyTorch's SequentialLR has no `get_lr` of its own: it cannot be restarted at a
    /// milestone of another SequentialLR.
    fn get_lr(&mut self, _group: usize, _lr: f64, _opt: &mut dyn LrTarget) -> Result<f64> {
        Err(Error::Usage(
            "SequentialLR cannot be restarted inside another SequentialLR".into(),
        ))
    }

    /// PyTorch's `SequentialLR.step`: the scheduler in charge steps, or restarts at epoch 0
    /// on its milestone.
    fn advance(&mut self, opt: &mut dyn LrTarget) -> Result<()> {
        let epoch = super::next_epoch(self.base.last_epoch)?;
        let idx = self.index(epoch);
        let child = &mut self.schedulers[idx];
        if idx > 0 && self.milestones[idx - 1] == epoch {
            child.update_lr(Some(0), opt)?;
        } else {
            child.advance(opt)?;
        }
        self.base.last_epoch = epoch;
        self.base.last_lrs = child.get_last_lr().to_vec();
        Ok(())
    }

    fn undo(&mut self) {
        for child in &mut self.schedulers {
            child.undo();
        }
    }

    fn state_dict(&self) -> SchedulerState {
        let children = self.schedulers.iter().map(|s| s.state_dict()).collect();
        SchedulerState::of(self.kind(), &self.base, children)
    }

    fn load_state_dict(&mut self, state: &SchedulerState) -> Result<()> {
        let base = check_state(
            self.kind(),
            state,
            self.schedulers.len(),
            self.base.base_lrs.len(),
        )?;
        // Check every child before changing any: restore all on the first refusal.
        let saved: Vec<SchedulerState> = self.schedulers.iter().map(|s| s.state_dict()).collect();
        for (k, (child, st)) in self
            .schedulers
            .iter_mut()
            .zip(&state.schedulers)
            .enumerate()
        {
            if let Err(e) = child.load_state_dict(st) {
                for (c, old) in self.schedulers.iter_mut().zip(&saved).take(k) {
                    c.load_state_dict(old)?;
                }
                return Err(e);
            }
        }
        self.base = base;
        Ok(())
    }
}

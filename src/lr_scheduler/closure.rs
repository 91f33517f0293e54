//! [`ClosureLR`]: a learning-rate schedule given as a closure, driven by step outcomes.
use crate::error::Result;
use crate::fabric::FabricOptimizer;
use crate::scaler::StepOutcome;

/// A learning-rate schedule that only advances on steps that were taken, so a skipped
/// `16-mixed` step does not move the schedule (PyTorch's and Lightning's schedulers advance
/// anyway and warn). A [`StepOutcome::Queued`] step (sync-free, the skip decided on the device)
/// counts as taken, as in PyTorch.
///
/// ```
/// use tch_fabric::lr_scheduler::ClosureLR;
/// use tch_fabric::StepOutcome;
/// let mut sched = ClosureLR::new(|step| 0.1 * 0.5f64.powi(step as i32));
/// assert_eq!(sched.lr(), 0.1);
/// sched.advance(&StepOutcome::Stepped);
/// let skipped = StepOutcome::Skipped { scale_before: 2.0, scale_after: 1.0, consecutive: 1, nonfinite: vec![] };
/// sched.advance(&skipped);
/// assert_eq!((sched.steps(), sched.lr()), (1, 0.05));
/// ```
pub struct ClosureLR<F: FnMut(u64) -> f64> {
    schedule: F,
    steps: u64,
    lr: f64,
}

impl<F: FnMut(u64) -> f64> ClosureLR<F> {
    /// `schedule(n)` is the learning rate after `n` taken steps.
    pub fn new(mut schedule: F) -> Self {
        let lr = schedule(0);
        ClosureLR {
            schedule,
            steps: 0,
            lr,
        }
    }

    /// Advances past a taken step (a skipped one leaves the schedule where it is) and
    /// returns the learning rate for the next step.
    pub fn advance(&mut self, outcome: &StepOutcome) -> f64 {
        if !outcome.is_skipped() {
            self.steps = self.steps.saturating_add(1);
            self.lr = (self.schedule)(self.steps);
        }
        self.lr
    }

    /// [`ClosureLR::advance`], then sets the rate on `optimizer`.
    ///
    /// # Errors
    ///
    /// As [`FabricOptimizer::set_lr`].
    pub fn step(&mut self, outcome: &StepOutcome, optimizer: &mut FabricOptimizer) -> Result<f64> {
        let lr = self.advance(outcome);
        optimizer.set_lr(lr)?;
        Ok(lr)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }
}

//! The scaler's counts of taken and skipped steps: known on the host after an ordinary step,
//! counted on the device by queued (sync-free) steps and read only when asked for.
use super::stage::Flag;
use crate::error::{Op, Result};
use tch::{Kind, Tensor};

/// How many steps in a row were skipped: known on the host, or counted on the device by
/// queued steps.
#[derive(Debug)]
enum Consecutive {
    Host(u64),
    Device(Tensor),
}

/// Taken, skipped and queued steps.
#[derive(Debug)]
pub(super) struct Skips {
    taken: u64,
    skipped: u64,
    /// Steps returned as [`super::StepOutcome::Queued`], and how many of them skipped (a
    /// float32 count on the device).
    queued: u64,
    skipped_on_device: Option<Tensor>,
    consecutive: Consecutive,
}

impl Skips {
    pub(super) fn new() -> Skips {
        Skips {
            taken: 0,
            skipped: 0,
            queued: 0,
            skipped_on_device: None,
            consecutive: Consecutive::Host(0),
        }
    }

    fn queued_skips(&self) -> Result<u64> {
        match &self.skipped_on_device {
            Some(t) => Ok(t.f_double_value(&[]).op("item")? as u64),
            None => Ok(0),
        }
    }

    /// Steps taken (queued ones that did not skip included: one read of the device).
    pub(super) fn taken(&self) -> Result<u64> {
        Ok(self.taken + self.queued - self.queued_skips()?)
    }

    /// Steps skipped (queued ones included: one read of the device).
    pub(super) fn skipped(&self) -> Result<u64> {
        Ok(self.skipped + self.queued_skips()?)
    }

    /// Steps skipped in a row up to now.
    pub(super) fn consecutive(&self) -> Result<u64> {
        match &self.consecutive {
            Consecutive::Host(n) => Ok(*n),
            Consecutive::Device(t) => Ok(t.f_double_value(&[]).op("item")? as u64),
        }
    }

    pub(super) fn record_taken(&mut self) {
        self.taken += 1;
        self.consecutive = Consecutive::Host(0);
    }

    /// Records a skip known on the host; returns how many in a row, this one included.
    pub(super) fn record_skipped(&mut self) -> Result<u64> {
        let consecutive = self.consecutive()? + 1;
        self.skipped += 1;
        self.consecutive = Consecutive::Host(consecutive);
        Ok(consecutive)
    }

    /// Counts a queued step's skip on the device (`found_inf` is 0 or 1): no host read. Both
    /// counts are computed before either is replaced, so a failure changes nothing.
    pub(super) fn record_queued(&mut self, found_inf: &Flag) -> Result<()> {
        let found = &found_inf.tensor;
        let skipped = match &self.skipped_on_device {
            Some(count) => count.f_add(found),
            None => found.f_detach_copy(),
        }
        .op("count skips")?;
        let run = match &self.consecutive {
            Consecutive::Host(n) => {
                Tensor::f_full([], *n as f64, (Kind::Float, found_inf.device)).op("full")?
            }
            Consecutive::Device(t) => t.shallow_clone(),
        };
        // (run + 1) * found: one more on a skip, back to 0 on a taken step.
        let run = run
            .f_add_scalar(1.0)
            .and_then(|t| t.f_mul(found))
            .op("count skips")?;
        self.skipped_on_device = Some(skipped);
        self.consecutive = Consecutive::Device(run);
        self.queued += 1;
        Ok(())
    }
}

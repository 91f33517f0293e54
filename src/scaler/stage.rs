//! What the scaler knows of one optimizer within an iteration ([`Stage`]), and the overflow
//! flags it keeps ([`Flag`]).
use crate::device::on_device;
use crate::error::{Op, Result};
use crate::params::GradBatch;
use tch::{Device, Tensor};

/// An overflow flag: a 1-element float32 tensor, non-zero when a gradient held inf/NaN, with
/// the device it lives on.
#[derive(Debug)]
pub(super) struct Flag {
    pub tensor: Tensor,
    pub device: Device,
}

impl Flag {
    /// Another handle to the same flag.
    pub(super) fn shallow(&self) -> Flag {
        Flag {
            tensor: self.tensor.shallow_clone(),
            device: self.device,
        }
    }
}

/// The flags of several devices as one flag on `device` (`None` for no flags): one flag is
/// moved (or kept) as it is, several are added up and clamped to 1, since PyTorch's fused
/// kernels skip only on exactly 1 and the skip counts want 0 or 1.
pub(super) fn combine(flags: Vec<Flag>, device: Device) -> Result<Option<Flag>> {
    let mut sum: Option<Tensor> = None;
    let several = flags.len() > 1;
    for f in flags {
        let here = on_device(&f.tensor, f.device, device)?.into_owned();
        sum = Some(match sum {
            None => here,
            Some(s) => s.f_add(&here).op("add")?,
        });
    }
    let Some(sum) = sum else { return Ok(None) };
    let tensor = if several {
        sum.f_clamp_max(1.0).op("clamp_max")?
    } else {
        sum
    };
    Ok(Some(Flag { tensor, device }))
}

/// Where one optimizer is in the iteration; absent means ready. Each stage holds what the next
/// operation needs, so the two can never disagree. Flags live on the loss scale's device.
#[derive(Debug)]
pub(super) enum Stage {
    /// The gradients were fetched (and, with scaling on, unscaled in place, by `unscale` or an
    /// ordinary clip); `found_inf` is `None` where nothing was checked (scaling off, or no
    /// gradients). `backward` is the backward count they were fetched at.
    Unscaled {
        found_inf: Option<Flag>,
        grads: GradBatch,
        backward: u64,
    },
    /// 2-norm clipping was folded into `divisor` (`scale / clip_coef`, on the flag's device);
    /// the gradients are still scaled.
    Folded {
        found_inf: Flag,
        divisor: Tensor,
        grads: GradBatch,
        backward: u64,
    },
    /// The optimizer stepped, or skipped, in this iteration.
    Stepped { found_inf: Flag },
}

impl Stage {
    /// The stage's overflow flag, if it checked one.
    pub(super) fn found_inf(&self) -> Option<&Flag> {
        match self {
            Stage::Unscaled { found_inf, .. } => found_inf.as_ref(),
            Stage::Folded { found_inf, .. } | Stage::Stepped { found_inf } => Some(found_inf),
        }
    }
}

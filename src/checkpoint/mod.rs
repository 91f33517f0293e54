//! Checkpoints: what [`crate::Fabric::save`] writes and [`crate::Fabric::load`] checks and
//! restores.
//!
//! - The file: one safetensors file holding the tensors (readable by Python's `safetensors`),
//!   with the precision, the GradScaler state (PyTorch's keys), the user's own state as JSON
//!   and CRC-32 checksums of the header and of every tensor in the header's metadata. Written
//!   atomically: a temporary file in the target's folder, synced, read back and checked, then
//!   renamed over the target (through symbolic links: the link stays, its target is
//!   replaced). Temporary files of saves killed mid-way are removed by the next save there.
//! - Reading: only regular files (a FIFO or a device is refused without blocking), never more
//!   than the header declares and the file holds, every checksum verified; a damaged file is
//!   an [`Error::Checkpoint`] naming what does not match.
//! - The key layout: a model's variables under their VarStore names (`fc.weight`), prefixed
//!   with the model's setup name when it has one (`generator.fc.weight`); optimizer `i`'s state
//!   as `optimizer.<i>.<param>.<field>`.
//! - Loading: every check runs before anything changes (`plan_load`), then `apply`.
//!
//! | file | what it holds |
//! |---|---|
//! | `layout` | the keys of models and optimizer state |
//! | `plan` | the checks before a load, and applying a load that passed them |
//! | `safetensors` | tch-fabric's own format: the file, its checksums, reading and writing |
//! | `torch` (with `pickle`) | `torch.save`'s format, as Lightning writes and reads it |
//! | `atomic` | crash-safe writes and careful opens, for both formats |
//! | `inspect` | what a checkpoint holds, read without a model ([`inspect`]) |
mod archive;
mod atomic;
mod inspect;
mod layout;
mod pickle;
mod plan;
mod safetensors;
mod state;
pub(crate) mod torch;

pub use inspect::{inspect, CheckpointFormat, CheckpointInfo, TensorInfo};
pub use plan::LoadReport;

pub(crate) use layout::{check_new_model, collect, Model, SharedOptimizer};
pub(crate) use plan::{apply, plan_load, Rules};
pub(crate) use safetensors::{read, write};
pub(crate) use state::check_round_trip;

use crate::error::Error;
use crate::optim::ParamGroup;
use crate::precision::Precision;
use crate::scaler::GradScalerState;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// What a checkpoint file holds.
#[derive(Debug)]
pub(crate) struct Contents {
    pub tensors: HashMap<String, Tensor>,
    pub precision: Precision,
    pub scaler: Option<GradScalerState>,
    pub state_json: String,
    /// PyTorch's param groups by optimizer index (torch.save files only), without `params`.
    pub param_groups: HashMap<usize, Vec<ParamGroup>>,
    /// Entries a non-strict read found missing (`optimizer_1`, ...).
    pub missing: Vec<String>,
    /// How many optimizers the saving Fabric had, where the file says (tch-fabric's format
    /// since the third wave).
    pub optimizers: Option<usize>,
}

pub(super) fn fail(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

//! Data-parallel training across processes on libtorch's c10d.
//!
//! | file | what it holds |
//! |---|---|
//! | `env` | [`DistEnv`]: the rendezvous torchrun, `fabric run` and SLURM's `srun` set |
//! | `group` | [`ProcessGroup`] (c10d, Gloo or NCCL) with the collectives DDP needs, and the process's default group |
//! | `bucket` | packing many tensors into a few collectives |
//! | `reducer` | libtorch's DDP `Reducer` over one model's parameters |
//! | `sampler` | [`DistributedSampler`] |
mod agreement;
mod bucket;
mod env;
mod group;
mod reducer;
mod sampler;

pub use env::DistEnv;
pub use group::{ProcessGroup, ProcessGroupOptions};
pub use sampler::DistributedSampler;

pub(crate) use agreement::{same_loop_point, same_parameters, LoopPoint};
pub(crate) use env::env_var;
pub(crate) use group::default_group;
pub(crate) use reducer::Reducer;

use crate::native::RawReduceOp;
use std::time::Duration;

/// How long ranks wait for each other to join before the rendezvous is an error.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one collective may wait for the other ranks: 30 minutes, PyTorch's default for
/// Gloo and Lightning's `default_pg_timeout`. A rank that hangs (or stops without exiting) is
/// noticed after this long, with an error naming the ranks that did not arrive; set
/// [`crate::FabricBuilder::timeout`] shorter where no rank ever legitimately waits that long
/// for the others (rank 0 writing a large checkpoint or evaluating alone counts as waiting).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Element-wise mean: the sum divided by the world size (floating tensors only).
    Mean,
}

impl From<ReduceOp> for RawReduceOp {
    fn from(op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => RawReduceOp::Sum,
            ReduceOp::Max => RawReduceOp::Max,
        }
    }
}

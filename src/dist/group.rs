//! [`ProcessGroup`]: a group of processes joined through c10d, with the collectives DDP needs,
//! and the process's default group (`torch.distributed`'s), joined once.
use super::bucket::for_each_bucket;
use super::{DistEnv, ReduceOp, Reducer, DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_TIMEOUT};
use crate::error::{Error, Op, Result};
use crate::native::{PgConfig, RawProcessGroup};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tch::Tensor;

/// Options of [`ProcessGroup::init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroupOptions {
    /// `"gloo"` (CPU, and CUDA tensors through host memory) or `"nccl"` (CUDA tensors only;
    /// built with the `cuda` feature, and needs a GPU: otherwise asking for it is an error
    /// saying which is missing).
    pub backend: String,
    /// How long ranks wait for each other to join.
    pub rendezvous_timeout: Duration,
    /// How long one collective may wait.
    pub timeout: Duration,
}

impl Default for ProcessGroupOptions {
    fn default() -> Self {
        ProcessGroupOptions {
            backend: "gloo".into(),
            rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A group of processes joined through c10d (`torch.distributed`'s default group): a TCPStore
/// rendezvous served by rank 0 on `MASTER_ADDR` only (a loopback address stays loopback) and
/// a Gloo backend. Collectives block until every rank took part, and fail (never hang) after
/// the group's timeout, naming the ranks that did not arrive.
///
/// A group of one process needs no rendezvous: every collective is then a no-op.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: Option<RawProcessGroup>,
    rank: usize,
    local_rank: usize,
    world_size: usize,
    /// All-reduce collectives issued so far ([`ProcessGroup::all_reduce_calls`]).
    all_reduces: std::cell::Cell<u64>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl ProcessGroup {
    /// The group of this process alone (rank 0 of 1).
    pub fn single() -> Self {
        ProcessGroup {
            raw: None,
            rank: 0,
            local_rank: 0,
            world_size: 1,
            all_reduces: std::cell::Cell::new(0),
        }
    }

    /// Joins the group described by `env`: rank 0 serves the rendezvous and waits for the
    /// others, every rank connects to every other.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] with c10d's message, in bounded time, when the port is taken, a rank
    /// does not come (for instance `WORLD_SIZE` larger than the ranks started) or the ranks
    /// disagree; [`Error::InvalidConfig`] for an unknown backend; NCCL without the `cuda`
    /// feature or without a GPU is refused before the rendezvous.
    pub fn init(env: &DistEnv, options: &ProcessGroupOptions) -> Result<Self> {
        if env.world_size == 1 {
            return Ok(ProcessGroup::single());
        }
        if !matches!(options.backend.as_str(), "gloo" | "nccl") {
            return Err(Error::InvalidConfig {
                field: "process group backend",
                value: format!("'{}'", options.backend),
                allowed: "'gloo' or 'nccl'",
            });
        }
        // Rank 0 binds the rendezvous to MASTER_ADDR itself: c10d's store would listen on
        // every interface, so a loopback rendezvous would be reachable from the network.
        let listener = if env.rank == 0 && options.backend == "gloo" && env.agent_store.is_none() {
            Some(
                std::net::TcpListener::bind((env.master_addr.as_str(), env.master_port)).map_err(
                    |e| {
                        Error::native(
                            "c10d process group",
                            &format!(
                                "rank 0 could not serve the rendezvous at {}:{} (world size {}): \
                                 {e}",
                                env.master_addr, env.master_port, env.world_size
                            ),
                        )
                    },
                )?,
            )
        } else {
            None
        };
        let raw = RawProcessGroup::new(PgConfig {
            backend: &options.backend,
            master_addr: &env.master_addr,
            master_port: env.master_port,
            rank: env.rank,
            world_size: env.world_size,
            rendezvous_timeout_ms: millis(options.rendezvous_timeout),
            timeout_ms: millis(options.timeout),
            listener,
            agent_store: env.agent_store,
        })?;
        Ok(ProcessGroup {
            raw: Some(raw),
            rank: env.rank,
            local_rank: env.local_rank,
            world_size: env.world_size,
            all_reduces: std::cell::Cell::new(0),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This process's rank on its machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// All-reduces `tensor` in place (a dense tensor; every rank passes the same shape and
    /// dtype).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] from c10d (a rank gone, a timeout, mismatched shapes). After a
    /// timeout the message names the ranks that never entered this collective (`rank 1 did
    /// not arrive at collective #17 ...`): every rank records each collective it enters in the
    /// rendezvous store.
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        let Some(raw) = &self.raw else {
            return Ok(());
        };
        raw.all_reduce(tensor, op.into())?;
        self.all_reduces.set(self.all_reduces.get() + 1);
        if op == ReduceOp::Mean {
            let _ = tch::no_grad(|| tensor.shallow_clone().f_div_scalar_(self.world_size as f64))
                .op("div_")?;
        }
        Ok(())
    }

    /// How many all-reduce collectives this process issued in this group (none in a
    /// one-process group): what a loop costs in communication, e.g. one bucket set per
    /// optimizer step under [`crate::Fabric::no_backward_sync`].
    pub fn all_reduce_calls(&self) -> u64 {
        let buckets = self.raw.as_ref().map_or(0, |r| r.bucket_all_reduces());
        self.all_reduces.get() + buckets
    }

    /// MAX all-reduce of the agreement checks ([`crate::dist::same_parameters`],
    /// [`crate::dist::same_loop_point`]): small, and not in [`ProcessGroup::all_reduce_calls`],
    /// which counts what the training itself exchanges.
    pub(crate) fn agreement_max(&self, tensor: &Tensor) -> Result<()> {
        match &self.raw {
            Some(raw) => raw.all_reduce(tensor, ReduceOp::Max.into()),
            None => Ok(()),
        }
    }

    /// After a failed collective (a Reducer's, inside a backward): the ranks that never entered
    /// it, as `rank 1 (last at collective #7) did not arrive at collective #8 of rank 0`, or ""
    /// when every rank did.
    pub(crate) fn missing_ranks(&self) -> String {
        self.raw
            .as_ref()
            .map_or_else(String::new, |r| r.missing_ranks())
    }

    /// libtorch's DDP engine (`c10d::Reducer`) over the named parameters of one model:
    /// gradients averaged as PyTorch's `DistributedDataParallel` does, in buckets of at most
    /// `bucket_bytes` whose all-reduce starts during backward as soon as their gradients are
    /// ready. `None` in a group of one.
    pub(crate) fn reducer(
        &self,
        params: Vec<(String, Tensor)>,
        bucket_bytes: usize,
        find_unused: bool,
    ) -> Result<Option<Reducer>> {
        let Some(raw) = &self.raw else {
            return Ok(None);
        };
        if params.is_empty() {
            return Ok(None);
        }
        let reducer = raw.reducer(&params, bucket_bytes, find_unused)?;
        Ok(Some(Reducer {
            raw: reducer,
            names: params.into_iter().map(|(n, _)| n).collect(),
        }))
    }

    /// Replaces `tensor` on every rank with rank `root`'s.
    ///
    /// # Errors
    ///
    /// As [`ProcessGroup::all_reduce`]; [`Error::InvalidConfig`] for a root outside the group.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::InvalidConfig {
                field: "broadcast root",
                value: root.to_string(),
                allowed: "a rank of the group (0..world_size)",
            });
        }
        match &self.raw {
            Some(raw) => raw.broadcast(tensor, root),
            None => Ok(()),
        }
    }

    /// Waits until every rank reached this point.
    ///
    /// # Errors
    ///
    /// As [`ProcessGroup::all_reduce`].
    pub fn barrier(&self) -> Result<()> {
        match &self.raw {
            Some(raw) => raw.barrier(),
            None => Ok(()),
        }
    }

    /// All-reduces many tensors with one collective per bucket: tensors are grouped by dtype
    /// and device, packed into contiguous buffers of at most 25 MiB (PyTorch DDP's default bucket), reduced, and
    /// copied back. DDP averages gradients with [`ReduceOp::Mean`].
    ///
    /// # Errors
    ///
    /// As [`ProcessGroup::all_reduce`].
    pub fn all_reduce_coalesced(&self, tensors: &[Tensor], op: ReduceOp) -> Result<()> {
        if self.raw.is_none() {
            return Ok(());
        }
        for_each_bucket(tensors, |flat| self.all_reduce(flat, op))
    }

    /// Broadcasts many tensors from `root` with one collective per bucket (as
    /// [`ProcessGroup::all_reduce_coalesced`] packs them).
    ///
    /// # Errors
    ///
    /// As [`ProcessGroup::broadcast`].
    pub fn broadcast_coalesced(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if self.raw.is_none() {
            return Ok(());
        }
        for_each_bucket(tensors, |flat| self.broadcast(flat, root))
    }
}

thread_local! {
    /// The group this process joined, with the rendezvous it joined by (`torch.distributed`'s
    /// default group): joining twice would serve the rendezvous port twice.
    static DEFAULT_GROUP: RefCell<Option<(DistEnv, Rc<ProcessGroup>)>> = const { RefCell::new(None) };
}

/// The process's default group: joined by the first call, shared by every later call with the
/// same rendezvous (a second `Fabric` in the same process), as `torch.distributed` keeps one
/// default group per process.
pub(crate) fn default_group(
    env: &DistEnv,
    options: &ProcessGroupOptions,
) -> Result<Rc<ProcessGroup>> {
    DEFAULT_GROUP.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some((joined, group)) = slot.as_ref() {
            if joined == env {
                return Ok(Rc::clone(group));
            }
            return Err(Error::Distributed(format!(
                "this process already joined a process group as rank {} of {} at {}:{}; it cannot \
                 join another as rank {} of {} at {}:{}",
                joined.rank,
                joined.world_size,
                joined.master_addr,
                joined.master_port,
                env.rank,
                env.world_size,
                env.master_addr,
                env.master_port
            )));
        }
        let group = Rc::new(ProcessGroup::init(env, options)?);
        *slot = Some((env.clone(), Rc::clone(&group)));
        Ok(group)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn nccl_is_a_clear_error_without_cuda() {
        let env = DistEnv {
            rank: 0,
            local_rank: 0,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            agent_store: None,
        };
        let options = ProcessGroupOptions {
            backend: "nccl".into(),
            ..Default::default()
        };
        let err = ProcessGroup::init(&env, &options).unwrap_err().to_string();
        // Without the `cuda` feature it is not built; with it, this GPU-less machine has none.
        assert!(
            err.contains("NCCL backend is not available") || err.contains("needs a CUDA GPU"),
            "{err}"
        );
        let options = ProcessGroupOptions {
            backend: "mpi".into(),
            ..Default::default()
        };
        let err = ProcessGroup::init(&env, &options).unwrap_err().to_string();
        assert!(err.contains("'gloo' or 'nccl'"), "{err}");
    }

    #[test]
    fn single_process_collectives_are_no_ops() {
        let pg = ProcessGroup::single();
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        pg.all_reduce_coalesced(std::slice::from_ref(&t), ReduceOp::Mean)
            .unwrap();
        pg.barrier().unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert!(pg.broadcast(&t, 1).is_err());
    }
}

//! Data-parallel training across processes on libtorch's c10d: the rendezvous read from the
//! environment (as torchrun and `fabric run` set it), a [`ProcessGroup`] with the collectives
//! DDP needs, coalesced gradient buckets, and a [`DistributedSampler`].
use crate::error::{Error, Op, Result};
use crate::native::{self, PgConfig, RawProcessGroup, RawReduceOp};
use crate::params::group_by;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tch::Tensor;

/// The size of one coalesced bucket (PyTorch DDP's default `bucket_cap_mb`).
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

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

/// The rendezvous variables torchrun and `fabric run --devices N` set for every rank.
///
/// ```
/// use tch_fabric::DistEnv;
/// let env = DistEnv::from_vars(|k| match k {
///     "RANK" => Some("1".into()),
///     "WORLD_SIZE" => Some("2".into()),
///     "MASTER_PORT" => Some("29500".into()),
///     _ => None,
/// })?
/// .expect("a rank of a group");
/// assert_eq!((env.rank, env.local_rank, env.world_size), (1, 1, 2));
/// assert_eq!(env.master_addr, "127.0.0.1");
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process's index among all processes.
    pub rank: usize,
    /// `LOCAL_RANK`: its index on this machine (the CUDA device it uses); `RANK` when unset.
    pub local_rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `MASTER_ADDR`: where rank 0 serves the rendezvous (default `127.0.0.1`).
    pub master_addr: String,
    /// `MASTER_PORT`: the rendezvous port.
    pub master_port: u16,
}

impl DistEnv {
    /// Reads the variables from the process environment; `Ok(None)` when not launched as a
    /// group. Two launchers are understood:
    ///
    /// - torchrun and `fabric run` (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    ///   `MASTER_PORT`), used whenever `WORLD_SIZE` is set;
    /// - SLURM's `srun` otherwise, as Lightning's `SLURMEnvironment` reads it: `SLURM_NTASKS`
    ///   set and `SLURM_JOB_NAME` not `bash` or `interactive`; rank `SLURM_PROCID`, local rank
    ///   `SLURM_LOCALID`, world size `SLURM_NTASKS`; `MASTER_ADDR`, else the first host of
    ///   `SLURM_NODELIST`; `MASTER_PORT`, else 15000 plus the last four digits of
    ///   `SLURM_JOB_ID` (12910 without one). Lightning checks SLURM first; here the explicit
    ///   `WORLD_SIZE` wins, so `fabric run` or torchrun inside an `sbatch` script (which sets
    ///   `SLURM_NTASKS` for the whole job) still gives each process its own rank.
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`] when a variable is set but malformed or missing.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any source of variables (for tests and custom launchers).
    ///
    /// # Errors
    ///
    /// As [`DistEnv::from_env`].
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Self::from_slurm(&get);
        };
        let num = |name: &str, v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                Error::Distributed(format!("{name}={v:?} is not a non-negative integer"))
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::Distributed(
                "WORLD_SIZE=0: must be at least 1".into(),
            ));
        }
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None => {
                return Err(Error::Distributed(
                    "WORLD_SIZE is set but RANK is not: launch with `fabric run --devices N` \
                     or torchrun, which set both"
                        .into(),
                ))
            }
        };
        if rank >= world_size {
            return Err(Error::Distributed(format!(
                "RANK={rank} is outside WORLD_SIZE={world_size} (ranks are 0..{world_size})"
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let master_port = match get("MASTER_PORT") {
            Some(v) => port(&v)?,
            None if world_size == 1 => 0,
            None => {
                return Err(Error::Distributed(
                    "MASTER_PORT is not set: every rank needs the rendezvous port".into(),
                ))
            }
        };
        Ok(Some(DistEnv {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
        }))
    }
}

impl DistEnv {
    /// The SLURM half of [`DistEnv::from_vars`].
    fn from_slurm(get: &impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(ntasks) = get("SLURM_NTASKS") else {
            return Ok(None);
        };
        if matches!(
            get("SLURM_JOB_NAME").as_deref(),
            Some("bash" | "interactive")
        ) {
            // An interactive allocation: not launched by srun (Lightning's
            // `_is_slurm_interactive_mode`).
            return Ok(None);
        }
        let num = |name: &str| -> Result<usize> {
            let v = get(name).ok_or_else(|| {
                Error::Distributed(format!(
                    "SLURM_NTASKS is set but {name} is not: start every task with srun"
                ))
            })?;
            v.trim().parse::<usize>().map_err(|_| {
                Error::Distributed(format!("{name}={v:?} is not a non-negative integer"))
            })
        };
        let world_size = ntasks
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::Distributed(format!("SLURM_NTASKS={ntasks:?} is not a positive integer"))
            })?;
        if world_size > 1 && get("SLURM_NTASKS_PER_NODE").is_none() {
            return Err(Error::Distributed(format!(
                "You set `--ntasks={world_size}` in your SLURM bash script, but this variable \
                 is not supported. HINT: Use `--ntasks-per-node={world_size}` instead."
            )));
        }
        let rank = num("SLURM_PROCID")?;
        let local_rank = num("SLURM_LOCALID")?;
        if rank >= world_size {
            return Err(Error::Distributed(format!(
                "SLURM_PROCID={rank} is outside SLURM_NTASKS={world_size}"
            )));
        }
        let master_addr = match get("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            Some(a) => a,
            None => {
                let list = get("SLURM_NODELIST").unwrap_or_else(|| "127.0.0.1".into());
                let root = root_node(&list);
                if root.trim().is_empty() {
                    return Err(Error::Distributed(format!(
                        "SLURM_NODELIST={list:?} names no host: set MASTER_ADDR"
                    )));
                }
                root
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => port(&v)?,
            None => match get("SLURM_JOB_ID") {
                Some(id) => {
                    // Python's `job_id[-4:]`, by characters.
                    let n = id.chars().count();
                    let tail: String = id.chars().skip(n.saturating_sub(4)).collect();
                    let n: u16 = tail
                        .trim()
                        .parse()
                        .ok()
                        .filter(|&n: &u16| n < 10_000)
                        .ok_or_else(|| {
                            Error::Distributed(format!(
                                "SLURM_JOB_ID={id:?} does not end in digits"
                            ))
                        })?;
                    15000 + n
                }
                None => 12910,
            },
        };
        Ok(Some(DistEnv {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
        }))
    }
}

/// A `MASTER_PORT` value.
fn port(v: &str) -> Result<u16> {
    v.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            Error::Distributed(format!("MASTER_PORT={v:?} is not a TCP port (1..65535)"))
        })
}

/// The first host of a SLURM node list (`node[03-05,07],gpu1` is `node03`), by Lightning's
/// `resolve_root_node_address`, rule for rule.
fn root_node(nodes: &str) -> String {
    use std::sync::OnceLock;
    static RANGE: OnceLock<Option<regex::Regex>> = OnceLock::new();
    static SINGLE: OnceLock<Option<regex::Regex>> = OnceLock::new();
    let range = RANGE.get_or_init(|| regex::Regex::new(r"\[(.*?)[,-].*\]").ok());
    let single = SINGLE.get_or_init(|| regex::Regex::new(r"\[(.*?)\]").ok());
    let mut s = nodes.to_string();
    if let Some(re) = range {
        s = re.replace_all(&s, "$1").into_owned();
    }
    if let Some(re) = single {
        s = re.replace_all(&s, "$1").into_owned();
    }
    let first = s.split(' ').next().unwrap_or("");
    first.split(',').next().unwrap_or("").to_string()
}

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
        let listener = if env.rank == 0 && options.backend == "gloo" {
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
    /// and device, packed into contiguous buffers of at most [`BUCKET_BYTES`], reduced, and
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

/// One model's [`ProcessGroup::reducer`].
#[derive(Debug)]
pub(crate) struct Reducer {
    raw: crate::native::RawReducer,
    /// The parameters' names, by the Reducer's indices.
    names: Vec<String>,
}

impl Reducer {
    /// Arms the Reducer for the next backward: this backward's gradients are then averaged
    /// across the group while it runs. `outputs` (the loss) are searched for unused
    /// parameters when the reducer finds them.
    pub(crate) fn prepare(&self, outputs: &[&Tensor]) -> Result<()> {
        self.raw.prepare(outputs).map_err(|e| self.name_unused(e))
    }

    /// c10d names the parameters that got no gradient by index only (unless
    /// TORCH_DISTRIBUTED_DEBUG=DETAIL, a process-wide setting): adds their names.
    fn name_unused(&self, e: Error) -> Error {
        let Error::Native { op, message } = e else {
            return e;
        };
        const MARK: &str = "did not receive grad for rank ";
        let names: Vec<&str> = message
            .lines()
            .find_map(|l| l.split_once(MARK))
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(_, list)| {
                list.split_whitespace()
                    .filter_map(|i| i.trim_matches(',').parse::<usize>().ok())
                    .filter_map(|i| self.names.get(i).map(String::as_str))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            return Error::Native { op, message };
        }
        Error::Native {
            op,
            message: format!(
                "{message}\nParameters without a gradient in the last backward: {}. Build the \
                 Fabric with FabricBuilder::find_unused_parameters(true) if the model leaves \
                 them unused on purpose.",
                names.join(", ")
            ),
        }
    }
}

/// Packs `tensors` into buckets (same dtype and device, at most [`BUCKET_BYTES`] unless one
/// tensor alone is larger), runs `f` on each flat buffer and copies the result back.
fn for_each_bucket(tensors: &[Tensor], mut f: impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    let metas = native::metas(tensors)?;
    let groups = group_by(metas.iter().map(|m| m.map(|m| (m.kind, m.device))));
    tch::no_grad(|| {
        for ((kind, _), group) in groups {
            let mut bucket: Vec<&Tensor> = Vec::new();
            let mut bytes = 0usize;
            for i in group {
                let numel = metas[i].map_or(0, |m| usize::try_from(m.numel).unwrap_or(0));
                let size = numel * kind.elt_size_in_bytes();
                if !bucket.is_empty() && bytes + size > BUCKET_BYTES {
                    run_bucket(&bucket, &mut f)?;
                    bucket.clear();
                    bytes = 0;
                }
                bucket.push(&tensors[i]);
                bytes += size;
            }
            if !bucket.is_empty() {
                run_bucket(&bucket, &mut f)?;
            }
        }
        Ok(())
    })
}

fn run_bucket(bucket: &[&Tensor], f: &mut impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    let views: Vec<Tensor> = bucket
        .iter()
        .map(|t| t.f_reshape([-1]))
        .collect::<Result<_, _>>()
        .op("reshape")?;
    let flat = Tensor::f_cat(&views, 0).op("cat")?;
    f(&flat)?;
    let mut offset = 0i64;
    for (t, v) in bucket.iter().zip(&views) {
        let n = native::shape(v)?.first().copied().unwrap_or(0);
        let part = flat
            .f_narrow(0, offset, n)
            .and_then(|p| p.f_view_as(t))
            .op("narrow")?;
        t.shallow_clone().f_copy_(&part).op("copy_")?;
        offset += n;
    }
    Ok(())
}

/// Splits a dataset's indices across ranks as `torch.utils.data.DistributedSampler`: each rank
/// gets `ceil(len / world_size)` indices (`floor` with `drop_last`), taken with stride
/// `world_size` from one permutation that every rank computes alike, padded by repeating the
/// first indices so the ranks stay in step.
///
/// ```
/// use tch_fabric::DistributedSampler;
/// let rank0 = DistributedSampler::new(10, 4, 0)?.shuffle(false).indices();
/// let rank3 = DistributedSampler::new(10, 4, 3)?.shuffle(false).indices();
/// assert_eq!(rank0, vec![0, 4, 8]);
/// assert_eq!(rank3, vec![3, 7, 1]); // padded with the first indices
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// The shuffle is a seeded Fisher-Yates (SplitMix64), identical on every rank and machine but
/// not PyTorch's `randperm` sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    world_size: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    drop_last: bool,
}

impl DistributedSampler {
    /// A sampler over `len` items for `rank` of `world_size` (shuffled, seed 0, epoch 0).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a zero world size or a rank outside it.
    pub fn new(len: usize, world_size: usize, rank: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidConfig {
                field: "rank",
                value: format!("{rank} of {world_size}"),
                allowed: "0 <= rank < world_size",
            });
        }
        Ok(DistributedSampler {
            len,
            world_size,
            rank,
            shuffle: true,
            seed: 0,
            epoch: 0,
            drop_last: false,
        })
    }

    /// Whether to permute the indices (default true).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The seed of the permutation, the same on every rank (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drop the tail instead of padding (default false).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets the epoch, so that each epoch has its own permutation (`sampler.set_epoch`).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The number of indices each rank gets.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.len / self.world_size
        } else {
            self.len.div_ceil(self.world_size)
        }
    }

    /// This rank's indices for the current epoch.
    pub fn indices(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut state = self
                .seed
                .wrapping_add(self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..all.len()).rev() {
                let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
                all.swap(i, j);
            }
        }
        let total = self.num_samples() * self.world_size;
        if total <= all.len() {
            all.truncate(total);
        } else if !all.is_empty() {
            let mut k = 0;
            while all.len() < total {
                all.push(all[k]);
                k += 1;
            }
        }
        all.into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .collect()
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_covers_every_index_once_across_ranks() {
        for (len, world) in [(10, 3), (12, 4), (7, 2), (1, 3)] {
            let mut seen: Vec<usize> = (0..world)
                .flat_map(|r| {
                    DistributedSampler::new(len, world, r)
                        .unwrap()
                        .seed(5)
                        .indices()
                })
                .collect();
            assert_eq!(seen.len(), len.div_ceil(world) * world);
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..len).collect::<Vec<_>>());
        }
        let s = DistributedSampler::new(10, 3, 1).unwrap().drop_last(true);
        assert_eq!(s.indices().len(), 3);
        let mut a = DistributedSampler::new(100, 2, 0).unwrap();
        let first = a.indices();
        a.set_epoch(1);
        assert_ne!(first, a.indices());
        assert!(DistributedSampler::new(5, 2, 2).is_err());
    }

    #[test]
    fn env_is_validated() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        let err = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("outside WORLD_SIZE=2"), "{err}");
        let err = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT is not set"), "{err}");
        let err = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "70000"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a TCP port"), "{err}");
    }

    #[test]
    fn buckets_group_by_dtype_and_cap_their_size() {
        use tch::Kind;
        let small = |k: Kind| Tensor::ones([4], (k, tch::Device::Cpu));
        let big = Tensor::zeros([BUCKET_BYTES as i64 / 4], (Kind::Float, tch::Device::Cpu));
        let tensors = vec![
            small(Kind::Float),
            small(Kind::Double),
            small(Kind::Float),
            big,
            small(Kind::Float),
        ];
        let mut sizes = Vec::new();
        for_each_bucket(&tensors, |flat| {
            sizes.push((flat.kind(), flat.numel()));
            let _ = flat.shallow_clone().f_add_scalar_(1.0).op("add_")?;
            Ok(())
        })
        .unwrap();
        // float32: the two small ones, then the 25 MB one alone, then the last small one.
        let cap = BUCKET_BYTES / 4;
        assert_eq!(
            sizes,
            vec![
                (Kind::Float, 8),
                (Kind::Float, cap),
                (Kind::Float, 4),
                (Kind::Double, 4)
            ]
        );
        // Results are copied back into every tensor.
        assert_eq!(tensors[1].double_value(&[0]), 2.0);
        assert_eq!(tensors[3].double_value(&[7]), 1.0);
    }

    #[test]
    fn nccl_is_a_clear_error_without_cuda() {
        let env = DistEnv {
            rank: 0,
            local_rank: 0,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
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

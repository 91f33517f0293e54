//! [`FabricBuilder`]: the options of a [`Fabric`], and how they are resolved against the
//! environment (`fabric run`'s `LT_*` variables, torchrun's rendezvous), the world of processes
//! and the device.
use super::{Fabric, Settings, Shared};
use crate::dist::{DistEnv, ProcessGroup, ProcessGroupOptions};
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::scaler::{GradScaler, GradScalerConfig};
use std::rc::Rc;
use std::time::Duration;
use tch::Device;

/// A precision as Lightning accepts it: a [`Precision`], a string (`"bf16-mixed"`, `"16"`,
/// ...) or an integer (`16`, `32`, `64`). Implemented for exactly those types.
pub trait IntoPrecision: sealed::Sealed {}

impl<T: sealed::Sealed> IntoPrecision for T {}

mod sealed {
    use crate::precision::Precision;

    /// A precision value as given by the user, kept as given for error messages and the CLI
    /// conflict check, parsed at build time.
    #[derive(Debug, Clone, PartialEq)]
    pub enum PrecisionArg {
        /// Already parsed.
        Parsed(Precision),
        /// A string.
        Str(String),
        /// An integer.
        Int(i64),
    }

    /// The conversion behind [`super::IntoPrecision`], out of users' reach.
    pub trait Sealed {
        fn into_arg(self) -> PrecisionArg;
    }

    impl Sealed for Precision {
        fn into_arg(self) -> PrecisionArg {
            PrecisionArg::Parsed(self)
        }
    }
    impl Sealed for &str {
        fn into_arg(self) -> PrecisionArg {
            PrecisionArg::Str(self.to_string())
        }
    }
    impl Sealed for String {
        fn into_arg(self) -> PrecisionArg {
            PrecisionArg::Str(self)
        }
    }
    impl Sealed for i64 {
        fn into_arg(self) -> PrecisionArg {
            PrecisionArg::Int(self)
        }
    }
    impl Sealed for i32 {
        fn into_arg(self) -> PrecisionArg {
            PrecisionArg::Int(i64::from(self))
        }
    }
}

use sealed::PrecisionArg;

impl PrecisionArg {
    /// Python's `str()` of the value (what Lightning compares with the environment).
    fn as_str(&self) -> String {
        match self {
            PrecisionArg::Parsed(p) => p.to_string(),
            PrecisionArg::Str(s) => s.clone(),
            PrecisionArg::Int(i) => i.to_string(),
        }
    }

    /// Python's `repr()` of the value (what Lightning prints).
    fn repr(&self) -> String {
        match self {
            PrecisionArg::Int(i) => i.to_string(),
            other => format!("'{}'", other.as_str()),
        }
    }

    fn parse(&self) -> Result<Precision> {
        match self {
            PrecisionArg::Parsed(p) => Ok(*p),
            PrecisionArg::Str(s) => s.parse(),
            PrecisionArg::Int(i) => Precision::try_from(*i),
        }
    }
}

/// Options for a [`Fabric`], as the keyword arguments of Lightning's `Fabric(...)`.
///
/// The `LT_PRECISION`, `LT_ACCELERATOR`, `LT_DEVICES`, `LT_STRATEGY` and `LT_NUM_NODES`
/// environment variables (set by `fabric run`) override the values given here, as in
/// Lightning; when `LT_CLI_USED=1` and the code passes a different value explicitly,
/// [`FabricBuilder::build`] fails with Lightning's message.
///
/// Several devices mean one process per device (DDP): `fabric run --devices N -- PROGRAM`
/// starts them with the rendezvous variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
/// `MASTER_PORT`, `LOCAL_RANK`), which `build` reads to join the process group.
///
/// ```
/// use tch_fabric::Fabric;
/// let fabric = Fabric::builder().precision("bf16-mixed").accelerator("cpu").seed(42).build()?;
/// assert_eq!(fabric.precision().to_string(), "bf16-mixed");
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct FabricBuilder {
    precision: Option<PrecisionArg>,
    accelerator: Option<String>,
    devices: Option<usize>,
    strategy: Option<String>,
    num_nodes: Option<usize>,
    seed: Option<u64>,
    cpu_fp16: bool,
    scaler: Option<GradScalerConfig>,
    rendezvous_timeout: Option<Duration>,
    timeout: Option<Duration>,
    process_wide_default_dtype: bool,
    allow_load_overflow: bool,
    bucket_cap_mb: Option<f64>,
    find_unused_parameters: bool,
}

impl FabricBuilder {
    /// The precision: a [`Precision`], a string or an integer (default `"32-true"`).
    pub fn precision(mut self, precision: impl IntoPrecision) -> Self {
        self.precision = Some(precision.into_arg());
        self
    }

    /// `"cpu"`, `"cuda"` (or `"gpu"`), or `"auto"` (CUDA when available; the default).
    pub fn accelerator(mut self, accelerator: &str) -> Self {
        self.accelerator = Some(accelerator.to_string());
        self
    }

    /// The number of devices (processes) per machine. More than one needs one process per
    /// device, started by `fabric run --devices N` (or torchrun).
    pub fn devices(mut self, devices: usize) -> Self {
        self.devices = Some(devices);
        self
    }

    /// `"auto"` (the default: DDP when launched as several processes), `"ddp"` or
    /// `"single_device"`.
    pub fn strategy(mut self, strategy: &str) -> Self {
        self.strategy = Some(strategy.to_string());
        self
    }

    /// The number of machines (default 1); the world size is `devices * num_nodes`.
    pub fn num_nodes(mut self, num_nodes: usize) -> Self {
        self.num_nodes = Some(num_nodes);
        self
    }

    /// How long the processes wait for each other to join (default
    /// [`crate::dist::DEFAULT_RENDEZVOUS_TIMEOUT`]); a missing rank or a taken port is an error after
    /// at most this long.
    pub fn rendezvous_timeout(mut self, timeout: Duration) -> Self {
        self.rendezvous_timeout = Some(timeout);
        self
    }

    /// How long one collective (gradient all-reduce, barrier, ...) may wait for the other
    /// processes, as Lightning's `DDPStrategy(timeout=...)`. Default
    /// [`crate::dist::DEFAULT_TIMEOUT`]: 30 minutes, PyTorch's and Lightning's default, so a hung
    /// rank is noticed only after that long; the error then names the ranks that did not
    /// arrive. Choose it longer than any wait your ranks have for each other (rank 0 saving a
    /// large checkpoint, an evaluation on one rank).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Seeds libtorch's generators at build time ([`Fabric::seed_everything`]).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Run `16-mixed` on CPU as real float16 autocast with a GradScaler (PyTorch 2.13 supports
    /// it). Off by default: like Lightning, `16-mixed` on CPU then warns and uses `bf16-mixed`.
    pub fn cpu_fp16_autocast(mut self, enabled: bool) -> Self {
        self.cpu_fp16 = enabled;
        self
    }

    /// The GradScaler configuration used under `16-mixed` (default: PyTorch's). Other
    /// precisions have no scaler and ignore it.
    pub fn grad_scaler(mut self, config: GradScalerConfig) -> Self {
        self.scaler = Some(config);
        self
    }

    /// Switch libtorch's default floating dtype to the parameter dtype around every forward
    /// and [`Fabric::autocast`] scope of `-true` and `64-true`, as Lightning does, so that
    /// tensors created there without a dtype get the precision's. Off by default: the default
    /// dtype is **process-wide**, so while one thread is inside such a scope every other thread
    /// (another Fabric, a test running beside it) computes with it too. tch passes explicit
    /// dtypes almost everywhere, so models rarely need it.
    pub fn process_wide_default_dtype(mut self, enabled: bool) -> Self {
        self.process_wide_default_dtype = enabled;
        self
    }

    /// Let [`Fabric::load`] convert a checkpoint's weights into this precision even where a
    /// finite value becomes inf (a float64 weight of 1e6 loaded under `16-true`: float16's
    /// largest value is 65504). Off by default: such a load is an
    /// [`Error::Checkpoint`](crate::Error::Checkpoint) naming the parameter, and nothing
    /// changes. Optimizer state must stay finite either way.
    pub fn allow_load_overflow(mut self, allow: bool) -> Self {
        self.allow_load_overflow = allow;
        self
    }

    /// DDP's `bucket_cap_mb` (Lightning: `DDPStrategy(bucket_cap_mb=...)`): the most
    /// gradient bytes, in MiB, one all-reduce carries; 25 by default, as PyTorch's. Smaller
    /// buckets start communicating earlier in the backward, at more calls.
    pub fn bucket_cap_mb(mut self, mb: f64) -> Self {
        self.bucket_cap_mb = Some(mb);
        self
    }

    /// DDP's `find_unused_parameters`: search each backward's graph for parameters the loss
    /// does not use, so that they do not hold up the all-reduce (off by default, as in
    /// PyTorch, where such a parameter makes the next backward fail with an error naming it).
    pub fn find_unused_parameters(mut self, find: bool) -> Self {
        self.find_unused_parameters = find;
        self
    }

    /// Builds the Fabric.
    ///
    /// # Errors
    ///
    /// Lightning's errors for a bad precision or a CLI conflict; [`Error::InvalidConfig`] for
    /// an unknown accelerator or strategy, or CUDA without a device; [`Error::Distributed`]
    /// for several devices without a launcher, or a world size that does not match `devices`;
    /// [`Error::Native`] when the process group cannot form (taken port, missing rank; after
    /// at most the rendezvous timeout).
    pub fn build(self) -> Result<Fabric> {
        let mb = self.bucket_cap_mb.unwrap_or(25.0);
        if !(mb.is_finite() && mb > 0.0 && mb * 1048576.0 <= i64::MAX as f64) {
            return Err(Error::InvalidConfig {
                field: "bucket_cap_mb",
                value: mb.to_string(),
                allowed: "a positive number of MiB",
            });
        }
        let bucket_bytes = ((mb * 1048576.0) as usize).max(1);
        let cli = crate::dist::env_var("LT_CLI_USED")?
            .and_then(|v| v.trim().parse::<i64>().ok())
            .is_some_and(|v| v != 0);

        let precision_arg = from_env(
            "precision",
            self.precision.as_ref().map(|p| (p.as_str(), p.repr())),
            None,
            cli,
        )?
        .map(PrecisionArg::Str)
        .or(self.precision)
        .unwrap_or(PrecisionArg::Parsed(Precision::F32True));
        let accelerator = from_env(
            "accelerator",
            self.accelerator
                .as_ref()
                .map(|a| (a.clone(), format!("'{a}'"))),
            Some("auto"),
            cli,
        )?
        .or(self.accelerator)
        .unwrap_or_else(|| "auto".to_string());
        let devices = match from_env(
            "devices",
            self.devices.map(|d| (d.to_string(), d.to_string())),
            Some("auto"),
            cli,
        )? {
            Some(v) if v == "auto" => None,
            Some(v) => Some(positive("devices", &v)?),
            None => self.devices,
        };
        let strategy = from_env(
            "strategy",
            self.strategy
                .as_ref()
                .map(|s| (s.clone(), format!("'{s}'"))),
            Some("auto"),
            cli,
        )?
        .or(self.strategy)
        .unwrap_or_else(|| "auto".to_string());
        if !matches!(strategy.as_str(), "auto" | "ddp" | "single_device") {
            return Err(Error::InvalidConfig {
                field: "strategy",
                value: format!("'{strategy}'"),
                allowed: "one of 'auto', 'ddp', 'single_device'",
            });
        }
        let num_nodes = match from_env(
            "num_nodes",
            self.num_nodes.map(|n| (n.to_string(), n.to_string())),
            Some("1"),
            cli,
        )? {
            Some(v) => positive("num_nodes", &v)?,
            None => self.num_nodes.unwrap_or(1),
        };
        let dist_env = resolve_world(devices, num_nodes, &strategy, DistEnv::from_env()?)?;

        let requested = precision_arg.parse()?;
        let local_rank = dist_env.as_ref().map_or(0, |e| e.local_rank);
        let device = device_for(&accelerator, local_rank)?;
        let precision = if requested == Precision::F16Mixed
            && device == Device::Cpu
            && !self.cpu_fp16
        {
            log::warn!(
                "You passed `Fabric(accelerator='cpu', precision='16-mixed')` but AMP with fp16 is not supported on CPU. \
                 Using `precision='bf16-mixed'` instead."
            );
            Precision::Bf16Mixed
        } else {
            requested
        };
        let scaler = if precision.needs_grad_scaler() {
            let config = self.scaler.unwrap_or_default();
            if !config.enabled {
                return Err(Error::InvalidConfig {
                    field: "grad_scaler",
                    value: "enabled(false)".into(),
                    allowed: "enabled under 16-mixed: float16 gradients underflow without it",
                });
            }
            GradScaler::new(config)?
        } else {
            // The other precisions scale nothing: a disabled scaler passes everything through.
            GradScaler::new(GradScalerConfig::default().enabled(false))?
        };
        let group = match &dist_env {
            Some(env) => crate::dist::default_group(
                env,
                &ProcessGroupOptions {
                    // PyTorch's choice: NCCL for CUDA devices (in a `cuda` build), else Gloo.
                    backend: if cfg!(feature = "cuda") && device.is_cuda() {
                        "nccl".into()
                    } else {
                        "gloo".into()
                    },
                    rendezvous_timeout: self
                        .rendezvous_timeout
                        .unwrap_or(crate::dist::DEFAULT_RENDEZVOUS_TIMEOUT),
                    timeout: self.timeout.unwrap_or(crate::dist::DEFAULT_TIMEOUT),
                },
            )?,
            None => Rc::new(ProcessGroup::single()),
        };
        if device == Device::Cpu {
            // A Fabric reports tensor memory on the CPU as on CUDA (`memory_stats`,
            // `memory_report`): counting starts before its first model exists.
            crate::memory::count_cpu_tensor_memory()?;
        }
        if let Some(seed) = self.seed {
            tch::manual_seed(seed as i64);
        }
        Ok(Fabric::from_shared(Shared::new(
            Settings {
                requested,
                precision,
                device,
                default_dtype_scope: self.process_wide_default_dtype,
                allow_load_overflow: self.allow_load_overflow,
                bucket_bytes,
                find_unused_parameters: self.find_unused_parameters,
            },
            group,
            scaler,
        )))
    }
}

/// Lightning's `_argument_from_env`: the environment's value, refusing a conflicting explicit
/// value when the CLI set it. Passing Lightning's own default (`default`, e.g. `"auto"`) is
/// never a conflict.
fn from_env(
    name: &str,
    given: Option<(String, String)>,
    default: Option<&str>,
    cli: bool,
) -> Result<Option<String>> {
    let Some(env) = crate::dist::env_var(&format!("LT_{}", name.to_uppercase()))? else {
        return Ok(None);
    };
    if let Some((as_str, repr)) = given {
        if cli && env != as_str && Some(as_str.as_str()) != default {
            return Err(Error::Usage(format!(
                "Your code has `Fabric({name}={repr}, ...)` but it conflicts with the value `--{name}={env}` \
                 set through the CLI.  Remove it either from the CLI or from the Lightning Fabric object."
            )));
        }
    }
    Ok(Some(env))
}

fn positive(field: &'static str, v: &str) -> Result<usize> {
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::InvalidConfig {
            field,
            value: v.to_string(),
            allowed: "a positive integer or 'auto'",
        })
}

/// Decides whether this process is one rank of a group, and checks that the group the
/// launcher made is the one the program asked for.
fn resolve_world(
    devices: Option<usize>,
    num_nodes: usize,
    strategy: &str,
    env: Option<DistEnv>,
) -> Result<Option<DistEnv>> {
    if strategy == "single_device" {
        if let Some(d) = devices.filter(|d| *d > 1) {
            return Err(Error::Distributed(format!(
                "strategy 'single_device' runs one process on one device, but devices={d}"
            )));
        }
        return Ok(None);
    }
    // A product that does not fit is no world any launcher can start.
    let expected = match devices.map(|d| d.checked_mul(num_nodes)) {
        Some(None) => {
            return Err(Error::InvalidConfig {
                field: "devices x num_nodes",
                value: format!("{} x {num_nodes}", devices.unwrap_or(1)),
                allowed: "a product that fits in usize",
            })
        }
        Some(Some(n)) => Some(n),
        None => None,
    };
    match (env, expected) {
        (None, Some(n)) if n > 1 => Err(Error::Distributed(format!(
            "devices={} x num_nodes={num_nodes} needs {n} processes, one per device, but this one \
             was started alone (no WORLD_SIZE/RANK): launch it with \
             `fabric run --devices {} -- PROGRAM`",
            devices.unwrap_or(1),
            devices.unwrap_or(1)
        ))),
        (None, _) => Ok(None),
        (Some(env), Some(n)) if env.world_size != n => Err(Error::Distributed(format!(
            "world size mismatch: WORLD_SIZE={} processes were launched, but devices={} x \
             num_nodes={num_nodes} = {n}",
            env.world_size,
            devices.unwrap_or(1)
        ))),
        (Some(env), _) if env.world_size == 1 && strategy != "ddp" => Ok(None),
        (Some(env), _) => Ok(Some(env)),
    }
}

fn device_for(accelerator: &str, local_rank: usize) -> Result<Device> {
    if matches!(accelerator, "auto" | "cuda" | "gpu") {
        // A dependent's binary, linked with --as-needed, may not have loaded libtorch_cuda: load
        // it so that CUDA is seen where there is a GPU. Without one this changes nothing.
        crate::native::load_cuda()?;
    }
    // Under DDP rank LOCAL_RANK of this machine drives cuda:LOCAL_RANK.
    let cuda = || {
        let count = tch::Cuda::device_count().max(0) as usize;
        if local_rank < count {
            Ok(Device::Cuda(local_rank))
        } else {
            Err(Error::Distributed(format!(
                "LOCAL_RANK={local_rank} needs CUDA device {local_rank}, but this machine has \
                 {count}: start at most {count} processes per machine"
            )))
        }
    };
    match accelerator {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" if tch::Cuda::is_available() => cuda(),
        "cuda" | "gpu" => Err(Error::InvalidConfig {
            field: "accelerator",
            value: accelerator.to_string(),
            allowed: "'cpu' or 'auto' on this machine: no CUDA device is available",
        }),
        "auto" if tch::Cuda::is_available() => cuda(),
        "auto" => Ok(Device::Cpu),
        other => Err(Error::InvalidConfig {
            field: "accelerator",
            value: format!("'{other}'"),
            allowed: "one of 'cpu', 'cuda', 'gpu', 'auto'",
        }),
    }
}

//! [`Fabric`]: Lightning Fabric's training-loop facade for tch.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod` | [`Fabric`] and what its parts share; the precision, device and process-group accessors |
//! | `builder` | [`FabricBuilder`]: options resolved against the environment, the world and the device |
//! | `setup` | setting models and optimizers up: conversions, DDP's broadcast and Reducers |
//! | `owners` | which Fabric converted which VarStore |
//! | `training` | `backward`, `no_backward_sync`, `clip_gradients`, the loss scale |
//! | `checkpointing` | `save` and `load` |
//! | `memory` | models built in the precision (`init_module`, `init_tensor`); `memory_stats`, `memory_report` |
//! | `description` | [`Description`]: what a Fabric decided |
//! | `module`, `optimizer` | [`FabricModule`], [`FabricOptimizer`] |
mod builder;
mod checkpointing;
mod description;
mod memory;
mod module;
mod optimizer;
mod owners;
mod setup;
mod training;

pub use builder::{FabricBuilder, IntoPrecision};
pub use description::Description;
pub use module::{Convert, FabricModule};
pub use optimizer::FabricOptimizer;
pub use training::NoBackwardSync;

use crate::autocast::AutocastGuard;
use crate::checkpoint::{Model, SharedOptimizer};
use crate::dist::{ProcessGroup, ReduceOp, Reducer};
use crate::error::{Op, Result};
use crate::precision::Precision;
use crate::scaler::{FoundInfSync, GradScaler};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Tensor};

/// Lightning's message when a mixed-precision step sees no `fabric.backward` call.
pub(crate) const BACKWARD_MESSAGE: &str = "The current strategy and precision selection requires you to call `fabric.backward(loss)` instead of `loss.backward()`.";

/// What a Fabric decided at build time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub requested: Precision,
    pub precision: Precision,
    pub device: Device,
    pub default_dtype_scope: bool,
    /// [`crate::FabricBuilder::allow_load_overflow`].
    pub allow_load_overflow: bool,
    /// [`crate::FabricBuilder::bucket_cap_mb`], in bytes.
    pub bucket_bytes: usize,
    /// [`crate::FabricBuilder::find_unused_parameters`].
    pub find_unused_parameters: bool,
}

/// The part of a Fabric its modules and optimizers share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Unique in the process: which VarStores this Fabric converted (`owners`).
    id: u64,
    settings: Settings,
    group: Rc<ProcessGroup>,
    state: RefCell<State>,
}

/// One model's gradient synchronisation under DDP.
#[derive(Debug)]
struct ModelSync {
    /// libtorch's DDP Reducer over its trainable variables (`None` in a group of one).
    reducer: Option<Reducer>,
    /// How many [`NoBackwardSync`] guards pause it.
    paused: u32,
}

/// What changes while training.
#[derive(Debug)]
struct State {
    /// The precision's GradScaler: disabled where the precision needs no loss scaling, which
    /// makes it a pass-through.
    scaler: GradScaler,
    /// Every model set up, in order.
    models: Vec<Model>,
    /// Every optimizer set up, in order (checkpoints key their state by this index).
    optimizers: Vec<SharedOptimizer>,
    /// Per model, in setup order: its gradient synchronisation.
    model_sync: Vec<ModelSync>,
    /// `fabric.backward` calls so far.
    backward_count: u64,
    /// Optimizer steps taken so far (skipped ones included: every rank skips the same).
    step_count: u64,
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        group: Rc<ProcessGroup>,
        mut scaler: GradScaler,
    ) -> Shared {
        if scaler.is_enabled() && group.world_size() > 1 {
            let g = Rc::clone(&group);
            scaler.set_found_inf_sync(FoundInfSync(Rc::new(move |found: &Tensor| {
                g.all_reduce(found, ReduceOp::Max)
            })));
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Shared {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            settings,
            group,
            state: RefCell::new(State {
                scaler,
                models: Vec::new(),
                optimizers: Vec::new(),
                model_sync: Vec::new(),
                backward_count: 0,
                step_count: 0,
            }),
        }
    }

    pub(crate) fn precision(&self) -> Precision {
        self.settings.precision
    }

    pub(crate) fn device(&self) -> Device {
        self.settings.device
    }

    pub(crate) fn default_dtype_scope(&self) -> bool {
        self.settings.default_dtype_scope
    }
}

/// Lightning Fabric for tch: pick a precision with one string, set up a model and its
/// optimizer, and write the training loop as in Lightning.
///
/// ```
/// use tch::{nn, Device, Kind, Reduction, Tensor};
/// use tch_fabric::{Clip, Fabric, TchOptimizer};
///
/// let fabric = Fabric::builder().precision("bf16-mixed").accelerator("cpu").build()?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 8, 1, Default::default());
/// let opt = TchOptimizer::new(&vs, nn::AdamW::default(), 1e-3)?;
/// let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
///
/// let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
/// let y = Tensor::randn([16, 1], (Kind::Float, Device::Cpu));
/// for _ in 0..3 {
///     opt.zero_grad()?;
///     let out = x.apply(&model);                   // bf16 compute, float32 output
///     let loss = {
///         let _ac = fabric.autocast()?;            // with fabric.autocast():
///         out.mse_loss(&y, Reduction::Mean)
///     };
///     fabric.backward(&loss)?;
///     let norm = fabric.clip_gradients(&mut opt, Clip::norm(1.0))?; // on the device
///     opt.step()?;
///     assert!(norm.value()?.is_finite());                            // read when needed
/// }
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct Fabric {
    shared: Rc<Shared>,
}

impl Fabric {
    /// A Fabric with `precision` and defaults for everything else (`Fabric(precision=...)`).
    ///
    /// # Errors
    ///
    /// As [`crate::FabricBuilder::build`].
    pub fn new(precision: impl IntoPrecision) -> Result<Fabric> {
        Fabric::builder().precision(precision).build()
    }

    /// Options beyond the precision.
    pub fn builder() -> FabricBuilder {
        FabricBuilder::default()
    }

    pub(crate) fn from_shared(shared: Shared) -> Fabric {
        Fabric {
            shared: Rc::new(shared),
        }
    }

    /// The device training runs on.
    pub fn device(&self) -> Device {
        self.shared.device()
    }

    /// The precision in effect (after the CPU `16-mixed` fallback, if it applied).
    pub fn precision(&self) -> Precision {
        self.shared.precision()
    }

    /// This process's rank among all processes (0 without DDP).
    pub fn global_rank(&self) -> usize {
        self.shared.group.rank()
    }

    /// This process's rank on its machine (0 without DDP).
    pub fn local_rank(&self) -> usize {
        self.shared.group.local_rank()
    }

    /// The number of processes training together (1 without DDP).
    pub fn world_size(&self) -> usize {
        self.shared.group.world_size()
    }

    /// Whether this is rank 0, the process that writes checkpoints and logs.
    pub fn is_global_zero(&self) -> bool {
        self.shared.group.rank() == 0
    }

    /// The process group (a group of one without DDP).
    pub fn process_group(&self) -> &ProcessGroup {
        &self.shared.group
    }

    /// Reduces `tensor` across all processes, in place, as Lightning's `fabric.all_reduce`
    /// does with a contiguous tensor (a group of one leaves it as it is). Every process must
    /// call it.
    ///
    /// # Errors
    ///
    /// c10d's error ([`crate::Error::Native`]) when a process is gone or the timeout passed.
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.shared.group.all_reduce(tensor, op)
    }

    /// Replaces `tensor` with rank `src`'s, in place (`fabric.broadcast`). Every process must
    /// call it with a tensor of the same shape and dtype.
    ///
    /// # Errors
    ///
    /// As [`Fabric::all_reduce`]; [`crate::Error::InvalidConfig`] for a `src` outside the group.
    pub fn broadcast(&self, tensor: &Tensor, src: usize) -> Result<()> {
        self.shared.group.broadcast(tensor, src)
    }

    /// Waits until every process reached this point (`fabric.barrier()`).
    ///
    /// # Errors
    ///
    /// As [`Fabric::all_reduce`].
    pub fn barrier(&self) -> Result<()> {
        self.shared.group.barrier()
    }

    /// `tensor` on the Fabric's device.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if libtorch cannot copy it there.
    pub fn to_device(&self, tensor: &Tensor) -> Result<Tensor> {
        tensor.f_to_device(self.device()).op("to_device")
    }

    /// Seeds libtorch's CPU and CUDA generators (process-wide, as Lightning's
    /// `seed_everything`) and returns the seed.
    pub fn seed_everything(&self, seed: u64) -> u64 {
        tch::manual_seed(seed as i64);
        seed
    }

    /// The precision's scope for code outside the model, such as the loss (`with
    /// fabric.autocast():`): autocast for mixed precisions, nothing for the others (unless
    /// [`crate::FabricBuilder::process_wide_default_dtype`]).
    ///
    /// # Errors
    ///
    /// Only if libtorch refuses the scope, which the Fabric's validation rules out.
    pub fn autocast(&self) -> Result<AutocastGuard> {
        AutocastGuard::for_precision(
            self.precision(),
            self.device(),
            self.shared.default_dtype_scope(),
        )
    }
}

//! [`Fabric`]: Lightning Fabric's training-loop facade for tch.
mod builder;
mod module;
mod optimizer;

pub use builder::{FabricBuilder, IntoPrecision, PrecisionArg};
pub use module::{Convert, FabricModule};
pub use optimizer::FabricOptimizer;

use crate::autocast::AutocastGuard;
use crate::checkpoint::{self, LoadReport, Model, SharedOptimizer};
use crate::clip::{self, Clip, ClipMethod, GradNorm};
use crate::dist::{ProcessGroup, ReduceOp, Reducer};
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::Optimizer;
use crate::params::lock_vars;
use crate::precision::Precision;
use crate::scaler::{FoundInfSync, GradScaler, GradScalerState};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tch::{nn, Device, Kind, Tensor};

/// Lightning's message when a mixed-precision step sees no `fabric.backward` call.
pub const BACKWARD_MESSAGE: &str = "The current strategy and precision selection requires you to call `fabric.backward(loss)` instead of `loss.backward()`.";

/// What a Fabric decided at build time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub requested: Precision,
    pub precision: Precision,
    pub device: Device,
    pub default_dtype_scope: bool,
    /// [`FabricBuilder::allow_load_overflow`].
    pub allow_load_overflow: bool,
    /// [`FabricBuilder::bucket_cap_mb`], in bytes.
    pub bucket_bytes: usize,
    /// [`FabricBuilder::find_unused_parameters`].
    pub find_unused_parameters: bool,
}

/// The part of a Fabric its modules and optimizers share.
#[derive(Debug)]
pub(crate) struct Core {
    /// Unique in the process: which VarStores this Fabric converted ([`claim`]).
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
    /// `None` where the precision needs no loss scaling.
    scaler: Option<GradScaler>,
    /// Every model set up, in order.
    models: Vec<Model>,
    /// Every optimizer set up, in order (checkpoints key their state by this index).
    optimizers: Vec<SharedOptimizer>,
    /// Per model, in setup order: its gradient synchronisation.
    model_sync: Vec<ModelSync>,
    /// `fabric.backward` calls so far.
    backward_count: u64,
}

impl Core {
    pub(crate) fn new(
        settings: Settings,
        group: Rc<ProcessGroup>,
        scaler: Option<GradScaler>,
    ) -> Core {
        let mut scaler = scaler;
        if let Some(s) = &mut scaler {
            if group.world_size() > 1 {
                let g = Rc::clone(&group);
                s.set_found_inf_sync(FoundInfSync(Rc::new(move |found: &Tensor| {
                    g.all_reduce(found, ReduceOp::Max)
                })));
            }
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Core {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            settings,
            group,
            state: RefCell::new(State {
                scaler,
                models: Vec::new(),
                optimizers: Vec::new(),
                model_sync: Vec::new(),
                backward_count: 0,
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
    core: Rc<Core>,
}

/// What a [`Fabric`] decided, as [`Fabric::describe`] returns it and its `Display` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// The precision as asked for (code, or `fabric run --precision`).
    pub requested: Precision,
    /// The precision that runs (different for `16-mixed` on CPU, which runs `bf16-mixed`
    /// unless [`FabricBuilder::cpu_fp16_autocast`]).
    pub precision: Precision,
    /// The device training runs on.
    pub device: Device,
    /// The dtype the forward computes in under autocast (`None`: no autocast).
    pub autocast: Option<Kind>,
    /// The dtype parameters are kept in.
    pub param_dtype: Kind,
    /// Whether a GradScaler scales the loss, with its current scale.
    pub loss_scale: Option<f64>,
    /// Whether the process-wide default dtype switches around forwards
    /// ([`FabricBuilder::process_wide_default_dtype`]).
    pub process_wide_default_dtype: bool,
    /// This process's rank, and the number of processes.
    pub rank: (usize, usize),
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "precision {}", self.precision)?;
        if self.requested != self.precision {
            write!(
                f,
                " (requested {}: Lightning runs it as {} on this device; \
                 `cpu_fp16_autocast(true)` gives real float16)",
                self.requested, self.precision
            )?;
        }
        write!(
            f,
            ", device {:?}, parameters {:?}",
            self.device, self.param_dtype
        )?;
        match self.autocast {
            Some(k) => write!(f, ", autocast {k:?}")?,
            None => write!(f, ", no autocast")?,
        }
        match self.loss_scale {
            Some(s) => write!(f, ", GradScaler on (scale {s})")?,
            None => write!(f, ", no GradScaler")?,
        }
        if self.process_wide_default_dtype {
            write!(f, ", default dtype switched process-wide")?;
        }
        if self.rank.1 > 1 {
            write!(f, ", rank {} of {}", self.rank.0, self.rank.1)?;
        }
        Ok(())
    }
}

impl fmt::Display for Fabric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.describe() {
            Ok(d) => d.fmt(f),
            Err(e) => write!(f, "precision {} ({e})", self.precision()),
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // The VarStores this Fabric converted may be set up by another Fabric now.
        if let Ok(mut owners) = OWNERS.lock() {
            owners.retain(|(w, id)| *id != self.id && w.strong_count() > 0);
        }
    }
}

type Variables = Mutex<nn::Variables>;

/// Which Fabric set up which VarStore (by its variables' shared list): a VarStore converted for
/// one Fabric's precision and device is refused by another, whose conversions and checkpoints
/// would silently disagree with the first's.
static OWNERS: Mutex<Vec<(Weak<Variables>, u64)>> = Mutex::new(Vec::new());

/// Records `vars` as set up by Fabric `fabric` (true when it was not yet), or refuses it if
/// another Fabric did.
fn claim(vars: &Arc<Variables>, fabric: u64) -> Result<bool> {
    let mut owners = OWNERS
        .lock()
        .map_err(|_| Error::Usage("the VarStore registry's lock is poisoned".into()))?;
    owners.retain(|(w, _)| w.strong_count() > 0);
    let owner = owners
        .iter()
        .find(|(w, _)| w.upgrade().is_some_and(|a| Arc::ptr_eq(&a, vars)))
        .map(|(_, id)| *id);
    match owner {
        Some(id) if id != fabric => Err(Error::Usage(
            "this VarStore was set up by another Fabric, which converted it for its own precision \
             and device: give each Fabric its own VarStore"
                .into(),
        )),
        Some(_) => Ok(false),
        None => {
            owners.push((Arc::downgrade(vars), fabric));
            Ok(true)
        }
    }
}

/// Forgets a claim whose setup failed.
fn release(vars: &Arc<Variables>) {
    if let Ok(mut owners) = OWNERS.lock() {
        owners.retain(|(w, _)| !w.upgrade().is_some_and(|a| Arc::ptr_eq(&a, vars)));
    }
}

/// The dtype `-true` and `64-true` convert parameters to (`None`: they stay as they are).
fn param_kind(precision: Precision) -> Option<Kind> {
    match precision {
        Precision::F64True => Some(Kind::Double),
        Precision::F16True => Some(Kind::Half),
        Precision::Bf16True => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Moves every variable of `vs` to `device` and converts the floating ones to `kind`, all
/// conversions made before the first variable changes (so a failure changes nothing).
fn prepare_var_store(vs: &mut nn::VarStore, device: Device, kind: Option<Kind>) -> Result<()> {
    let vars = lock_vars(&vs.variables_)?;
    let tensors: Vec<&Tensor> = vars.named_variables.values().collect();
    let mut converted = Vec::new();
    for (t, m) in tensors.iter().zip(native::metas(tensors.iter().copied())?) {
        let Some(m) = m else { continue };
        let floating = matches!(
            m.kind,
            Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
        );
        let target = kind.filter(|_| floating).unwrap_or(m.kind);
        if m.device != device || m.kind != target {
            let new = t
                .f_to_device_(device, target, false, false)
                .op("convert a parameter")?;
            converted.push((t.shallow_clone(), new));
        }
    }
    drop(vars);
    for (mut t, new) in converted {
        t.f_set_data(&new).op("set_data")?;
    }
    if vs.device() != device {
        // Every variable is on `device` already: tch only records it (for new variables).
        vs.set_device(device);
    }
    Ok(())
}

impl Fabric {
    /// A Fabric with `precision` and defaults for everything else (`Fabric(precision=...)`).
    ///
    /// # Errors
    ///
    /// As [`FabricBuilder::build`].
    pub fn new(precision: impl IntoPrecision) -> Result<Fabric> {
        Fabric::builder().precision(precision).build()
    }

    /// Options beyond the precision.
    pub fn builder() -> FabricBuilder {
        FabricBuilder::default()
    }

    pub(crate) fn from_core(core: Core) -> Fabric {
        Fabric {
            core: Rc::new(core),
        }
    }

    /// The device training runs on.
    pub fn device(&self) -> Device {
        self.core.device()
    }

    /// The precision in effect (after the CPU `16-mixed` fallback, if it applied).
    pub fn precision(&self) -> Precision {
        self.core.precision()
    }

    /// What this Fabric decided: the precision as requested and as run, the device, the
    /// autocast dtype, whether a GradScaler runs (and its scale). `Display` prints the same.
    ///
    /// ```
    /// let fabric = tch_fabric::Fabric::builder().precision("16-mixed").accelerator("cpu").build()?;
    /// let d = fabric.describe()?;
    /// assert_eq!((d.requested.as_str(), d.precision.as_str()), ("16-mixed", "bf16-mixed"));
    /// assert!(fabric.to_string().contains("requested 16-mixed"));
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if the loss scale cannot be read from the device.
    pub fn describe(&self) -> Result<Description> {
        let s = &self.core.settings;
        Ok(Description {
            requested: s.requested,
            precision: s.precision,
            device: s.device,
            autocast: s.precision.autocast_dtype(),
            param_dtype: s.precision.param_dtype(),
            loss_scale: self.loss_scale_if_scaling()?,
            process_wide_default_dtype: s.default_dtype_scope,
            rank: (self.global_rank(), self.world_size()),
        })
    }

    /// This process's rank among all processes (0 without DDP).
    pub fn global_rank(&self) -> usize {
        self.core.group.rank()
    }

    /// This process's rank on its machine (0 without DDP).
    pub fn local_rank(&self) -> usize {
        self.core.group.local_rank()
    }

    /// The number of processes training together (1 without DDP).
    pub fn world_size(&self) -> usize {
        self.core.group.world_size()
    }

    /// Whether this is rank 0, the process that writes checkpoints and logs.
    pub fn is_global_zero(&self) -> bool {
        self.core.group.rank() == 0
    }

    /// The process group (a group of one without DDP).
    pub fn process_group(&self) -> &ProcessGroup {
        &self.core.group
    }

    /// Reduces `tensor` across all processes, in place, as Lightning's `fabric.all_reduce`
    /// does with a contiguous tensor (a group of one leaves it as it is). Every process must
    /// call it.
    ///
    /// # Errors
    ///
    /// c10d's error ([`Error::Native`]) when a process is gone or the timeout passed.
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.core.group.all_reduce(tensor, op)
    }

    /// Replaces `tensor` with rank `src`'s, in place (`fabric.broadcast`). Every process must
    /// call it with a tensor of the same shape and dtype.
    ///
    /// # Errors
    ///
    /// As [`Fabric::all_reduce`]; [`Error::InvalidConfig`] for a `src` outside the group.
    pub fn broadcast(&self, tensor: &Tensor, src: usize) -> Result<()> {
        self.core.group.broadcast(tensor, src)
    }

    /// Waits until every process reached this point (`fabric.barrier()`).
    ///
    /// # Errors
    ///
    /// As [`Fabric::all_reduce`].
    pub fn barrier(&self) -> Result<()> {
        self.core.group.barrier()
    }

    /// `tensor` on the Fabric's device.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch cannot copy it there.
    pub fn to_device(&self, tensor: &Tensor) -> Result<Tensor> {
        tensor.f_to_device(self.device()).op("to_device")
    }

    /// Seeds libtorch's CPU and CUDA generators (process-wide, as Lightning's
    /// `seed_everything`) and returns the seed.
    pub fn seed_everything(&self, seed: u64) -> u64 {
        tch::manual_seed(seed as i64);
        seed
    }

    /// [`Fabric::setup_module`] and [`Fabric::setup_optimizers`] at once, as Lightning's
    /// `fabric.setup(model, optimizer)`. `optimizer` is a [`crate::FusedAdamW`],
    /// [`crate::FusedSgd`], [`crate::TchOptimizer`] or any [`Optimizer`] over `var_store`'s
    /// parameters (built before or after this call: its parameters share storage with the
    /// VarStore's).
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module`] and [`Fabric::setup_optimizers`]; nothing is set up then.
    pub fn setup<M, O: Optimizer + 'static>(
        &self,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        self.setup_impl(None, model, var_store, optimizer)
    }

    /// [`Fabric::setup`] under a name: the model's checkpoint keys become `<name>.<variable>`,
    /// so two models whose variables share names (a GAN's generator and discriminator) can be
    /// set up and saved together. The name is part of the checkpoint layout: keep it stable.
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module_named`].
    pub fn setup_named<M, O: Optimizer + 'static>(
        &self,
        name: &str,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        self.setup_impl(Some(name), model, var_store, optimizer)
    }

    fn setup_impl<M, O: Optimizer + 'static>(
        &self,
        name: Option<&str>,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        optimizer.validate()?;
        self.check_parameters(&optimizer, Some(var_store))?;
        let module = self.module_impl(name, model, var_store)?;
        let optimizer = self.register(optimizer);
        Ok((module, optimizer))
    }

    /// Prepares a model for the precision without an optimizer (for inference, or to set up
    /// optimizers later, as Lightning's `setup_module`): moves the VarStore's variables to the
    /// device, converts them for `-true` / `64-true` (mixed precisions keep float32), and under
    /// DDP gives every rank rank 0's weights. The returned module converts inputs and outputs
    /// and runs the precision's scope; `var_store` stays usable. Checkpoints save the
    /// VarStore's variables under their names.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] when a variable name was already set up by an earlier call (use
    /// [`Fabric::setup_module_named`]) or starts with `optimizer.`, or when another Fabric set
    /// up this VarStore; [`Error::Native`] if a conversion fails (nothing changed then) or,
    /// under DDP, the broadcast fails.
    pub fn setup_module<M>(
        &self,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        self.module_impl(None, model, var_store)
    }

    /// [`Fabric::setup_module`] under a name (see [`Fabric::setup_named`]).
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module`]; [`Error::InvalidConfig`] for an empty name, one with a
    /// `.`, or `optimizer`.
    pub fn setup_module_named<M>(
        &self,
        name: &str,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        self.module_impl(Some(name), model, var_store)
    }

    fn module_impl<M>(
        &self,
        name: Option<&str>,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        let entry = Model {
            name: name.map(str::to_string),
            vars: var_store.variables_.clone(),
        };
        checkpoint::check_new_model(&self.core.state.borrow().models, &entry)?;
        let fresh_claim = claim(&var_store.variables_, self.core.id)?;
        if let Err(e) = prepare_var_store(var_store, self.device(), param_kind(self.precision())) {
            if fresh_claim {
                release(&var_store.variables_);
            }
            return Err(e);
        }
        // DDP: every rank starts from rank 0's weights, whatever its own initialisation.
        let named = entry.entries()?;
        let tensors: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        tch::no_grad(|| self.core.group.broadcast_coalesced(&tensors, 0))?;
        // Then gradients are averaged by libtorch's DDP engine, over the trainable variables.
        let trainable: Vec<(String, Tensor)> = named
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let reducer = self.core.group.reducer(
            trainable,
            self.core.settings.bucket_bytes,
            self.core.settings.find_unused_parameters,
        )?;
        let mut st = self.core.state.borrow_mut();
        let index = st.models.len();
        st.models.push(entry);
        st.model_sync.push(ModelSync { reducer, paused: 0 });
        Ok(FabricModule::new(
            model,
            self.core.settings,
            (self.core.id, index),
        ))
    }

    /// Registers an optimizer over the parameters of a model set up with this Fabric
    /// (Lightning's `setup_optimizers`): its steps then scale, skip and update under
    /// `16-mixed`, and checkpoints save its state.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for hyper-parameters the optimizer refuses; [`Error::Usage`]
    /// when a parameter belongs to no model set up with this Fabric (set the model up first).
    pub fn setup_optimizers<O: Optimizer + 'static>(
        &self,
        optimizer: O,
    ) -> Result<FabricOptimizer> {
        optimizer.validate()?;
        self.check_parameters(&optimizer, None)?;
        Ok(self.register(optimizer))
    }

    /// Every parameter of `optimizer` is a variable of a model set up here, or of `pending`
    /// (the VarStore being set up with it).
    fn check_parameters(
        &self,
        optimizer: &dyn Optimizer,
        pending: Option<&nn::VarStore>,
    ) -> Result<()> {
        let st = self.core.state.borrow();
        let mut known: HashSet<usize> = HashSet::new();
        let mut add = |tensors: Vec<Tensor>| -> Result<()> {
            for m in native::metas(&tensors)?.into_iter().flatten() {
                known.insert(m.id);
            }
            Ok(())
        };
        for model in &st.models {
            add(model.entries()?.into_iter().map(|(_, t)| t).collect())?;
        }
        if let Some(vs) = pending {
            let vars = lock_vars(&vs.variables_)?;
            let tensors = vars
                .named_variables
                .values()
                .map(Tensor::shallow_clone)
                .collect();
            drop(vars);
            add(tensors)?;
        }
        let params = optimizer.params();
        for (name, m) in params.names().iter().zip(native::metas(params.tensors())?) {
            if !m.is_some_and(|m| known.contains(&m.id)) {
                return Err(Error::Usage(format!(
                    "the optimizer's parameter '{name}' is not a variable of a model set up with \
                     this Fabric: set the model up first (setup_module), with the VarStore the \
                     optimizer was built from"
                )));
            }
        }
        Ok(())
    }

    fn register<O: Optimizer + 'static>(&self, optimizer: O) -> FabricOptimizer {
        let id = optimizer.params().id();
        let opt: SharedOptimizer = Rc::new(RefCell::new(Box::new(optimizer)));
        let mut st = self.core.state.borrow_mut();
        st.optimizers.push(Rc::clone(&opt));
        FabricOptimizer::new(opt, id, Rc::clone(&self.core), st.backward_count)
    }

    /// The precision's scope for code outside the model, such as the loss (`with
    /// fabric.autocast():`): autocast for mixed precisions, nothing for the others (unless
    /// [`FabricBuilder::process_wide_default_dtype`]).
    ///
    /// # Errors
    ///
    /// Only if libtorch refuses the scope, which the Fabric's validation rules out.
    pub fn autocast(&self) -> Result<AutocastGuard> {
        AutocastGuard::for_precision(
            self.precision(),
            self.device(),
            self.core.default_dtype_scope(),
        )
    }

    /// `loss.backward()`, scaled under `16-mixed` (`scaler.scale(loss).backward()`).
    ///
    /// Under DDP the gradients of every model set up (its trainable variables at setup) are
    /// averaged across processes by libtorch's `c10d::Reducer`, as PyTorch's
    /// `DistributedDataParallel` does: in buckets of at most
    /// [`FabricBuilder::bucket_cap_mb`], each all-reduced during the backward as soon as its
    /// gradients are ready, so every rank steps on the same gradient. Every rank must call it;
    /// every parameter must get a gradient (else the next backward fails naming the ones that
    /// did not) unless [`FabricBuilder::find_unused_parameters`].
    ///
    /// # Errors
    ///
    /// libtorch's error if `loss` does not require gradients; c10d's error when a process is
    /// gone.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        let mut st = self.core.state.borrow_mut();
        let scaled = match &mut st.scaler {
            Some(s) => s.scale(loss)?,
            None => loss.shallow_clone(),
        };
        // DDP: each model's Reducer is armed unless a NoBackwardSync guard pauses it (then its
        // gradients accumulate locally until the next synced backward); armed, it averages the
        // gradients bucket by bucket while the backward runs.
        for sync in st.model_sync.iter().filter(|s| s.paused == 0) {
            if let Some(r) = &sync.reducer {
                r.prepare(&[&scaled])?;
            }
        }
        if let Err(e) = scaled.f_backward().op("backward") {
            // A Reducer's all-reduce failed inside the backward: name the ranks that never came.
            let missing = self.core.group.missing_ranks();
            return Err(match e {
                Error::Native { op, message } if !missing.is_empty() => Error::Native {
                    op,
                    message: format!("{missing}: {message}"),
                },
                other => other,
            });
        }
        st.backward_count += 1;
        Ok(())
    }

    /// Lightning's `fabric.no_backward_sync(module, enabled)`: while the guard lives (and
    /// `enabled` is true), [`Fabric::backward`] does not average `module`'s gradients across
    /// processes; they accumulate locally, and the first `backward` after the guard is dropped
    /// averages what accumulated. Use it on every micro-batch of a gradient-accumulation loop
    /// but the last:
    ///
    /// ```
    /// # use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
    /// # use tch_fabric::{Fabric, FusedAdamW};
    /// let fabric = Fabric::new("32-true")?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let layer = nn::linear(vs.root() / "fc", 4, 1, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-2)?;
    /// let (model, mut opt) = fabric.setup(layer, &mut vs, opt)?;
    /// let micro = 4;
    /// for k in 0..micro {
    ///     let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    ///     let _sync = fabric.no_backward_sync(&model, k + 1 < micro)?;
    ///     let loss = model.forward(&x).sum(Kind::Float) / micro as f64;
    ///     fabric.backward(&loss)?;
    /// }
    /// opt.step()?;
    /// opt.zero_grad()?;
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// In one process there is nothing to synchronise and the guard changes nothing (as
    /// Lightning's single-device strategy). Under `16-mixed` every micro-batch's loss is
    /// scaled by `backward`; the unscale, clip, step and scale update happen once, at the
    /// optimizer step.
    ///
    /// # Errors
    ///
    /// Lightning's "You need to set up the model first" for a module this Fabric did not set
    /// up.
    pub fn no_backward_sync<M>(
        &self,
        module: &FabricModule<M>,
        enabled: bool,
    ) -> Result<NoBackwardSync> {
        let (id, index) = module.origin();
        if id != self.core.id {
            return Err(Error::Usage(
                "You need to set up the model first before you can call \
                 `fabric.no_backward_sync()`: `model = fabric.setup(model, ...)` (this module \
                 was set up by another Fabric)"
                    .into(),
            ));
        }
        if enabled {
            if let Some(sync) = self.core.state.borrow_mut().model_sync.get_mut(index) {
                sync.paused += 1;
            }
        }
        Ok(NoBackwardSync {
            core: Rc::clone(&self.core),
            model: enabled.then_some(index),
        })
    }

    /// Clips the gradients of `optimizer`'s parameters and returns their global norm before
    /// clipping (of order `norm_type` for norm clipping, the 2-norm for value clipping) as a
    /// 0-dim tensor on the device: nothing waits for the device unless
    /// [`Clip::error_if_nonfinite`] asks for the check (read it with [`GradNorm::value`] when
    /// you need the number).
    ///
    /// Under `16-mixed` the gradients are unscaled first (once per iteration, however often
    /// this is called). On an overflow step the norm is inf/NaN: it is returned, not raised
    /// (Lightning raises by default; [`Clip::error_if_nonfinite`] restores that), and the step
    /// that follows is skipped. With a fused optimizer ([`crate::FusedAdamW`],
    /// [`crate::FusedSgd`]) the 2-norm costs one read pass over the gradients and the optimizer
    /// applies unscale and clip together (see [`crate::GradScalerConfig::fold_clipping`]).
    ///
    /// Under DDP the gradients were averaged by [`Fabric::backward`], so the norm is that of
    /// the global gradient and identical on every rank: every rank clips alike.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for an optimizer set up by another Fabric; [`Error::InvalidConfig`] for
    /// a bad clip value; the scaler's unscale errors; with `error_if_nonfinite`, PyTorch's
    /// error for a non-finite norm.
    pub fn clip_gradients(&self, optimizer: &mut FabricOptimizer, clip: Clip) -> Result<GradNorm> {
        if !Rc::ptr_eq(optimizer.core(), &self.core) {
            return Err(Error::Usage(
                "clip_gradients got an optimizer set up by another Fabric: its gradients are \
                 scaled (or not) by that Fabric's precision"
                    .into(),
            ));
        }
        clip.validate()?;
        let mut st = self.core.state.borrow_mut();
        let Some(scaler) = &mut st.scaler else {
            drop(st);
            return optimizer.clip_unscaled(&clip).map(GradNorm::new);
        };
        let mut opt = optimizer.shared().borrow_mut();
        // The one-pass path: 2-norm clipping folded into a fused optimizer's scaled step. The
        // strict form needs the norm on the host before anything changes, so it clips the
        // ordinary way.
        if let ClipMethod::Norm {
            max_norm,
            norm_type,
        } = clip.method()
        {
            if norm_type == 2.0 && !clip.is_strict() {
                if let Some(norm) = scaler.clip_norm_folded(&mut **opt, max_norm)? {
                    return Ok(GradNorm::new(norm));
                }
            }
        }
        match scaler.ensure_unscaled(&mut **opt)? {
            Some(grads) => clip::clip_batch(grads, &clip).map(GradNorm::new),
            None => Err(Error::Usage("the GradScaler is disabled".into())),
        }
    }

    /// Updates the loss scale from the steps since the last update, if there were any (one
    /// `torch.amp.GradScaler.update()`); without a scaler, or right after an update, it does
    /// nothing.
    ///
    /// The scale updates by itself once per iteration: right after the step of the last
    /// optimizer set up with this Fabric to step since the previous update, i.e. once every
    /// optimizer has stepped (one optimizer: after each step). A loop that does not step every
    /// optimizer every iteration calls this at the end of each iteration; without it, an
    /// optimizer that steps a second time before the update is refused with an error saying so.
    /// [`Fabric::save`] also updates first.
    ///
    /// # Errors
    ///
    /// The policy's "already at minimum" error ([`crate::AtMinScale::Error`]).
    pub fn update_scale(&self) -> Result<()> {
        let mut st = self.core.state.borrow_mut();
        match &mut st.scaler {
            Some(s) if s.has_pending_checks() => s.update(),
            _ => Ok(()),
        }
    }

    /// Current and peak memory of the Fabric's device: on CPU the process's resident set, on
    /// CUDA libtorch's caching allocator (allocated and reserved bytes).
    ///
    /// # Errors
    ///
    /// As [`crate::memory_stats`].
    pub fn memory_stats(&self) -> Result<crate::MemoryStats> {
        crate::memory_stats(self.device())
    }

    fn loss_scale_if_scaling(&self) -> Result<Option<f64>> {
        self.core
            .state
            .borrow()
            .scaler
            .as_ref()
            .map(GradScaler::get_scale)
            .transpose()
    }

    /// The current loss scale (1.0 without a scaler).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if it cannot be read from the device.
    pub fn loss_scale(&self) -> Result<f64> {
        Ok(self.loss_scale_if_scaling()?.unwrap_or(1.0))
    }

    /// The GradScaler's state with PyTorch's keys (empty without a scaler).
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn scaler_state(&self) -> Result<GradScalerState> {
        match &self.core.state.borrow().scaler {
            Some(s) => s.state_dict(),
            None => Ok(GradScalerState::default()),
        }
    }

    /// Optimizer steps skipped because of inf/NaN gradients so far (reads the device after
    /// sync-free steps).
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn skipped_steps(&self) -> Result<u64> {
        match &self.core.state.borrow().scaler {
            Some(s) => s.steps_skipped(),
            None => Ok(0),
        }
    }

    /// Steps skipped in a row up to now (0 after a taken step), so a loop can stop a run that
    /// makes no progress; the scaler also warns after
    /// [`crate::GradScalerConfig::warn_after_skips`] of them.
    ///
    /// # Errors
    ///
    /// As [`Fabric::loss_scale`].
    pub fn consecutive_skipped_steps(&self) -> Result<u64> {
        match &self.core.state.borrow().scaler {
            Some(s) => s.consecutive_skips(),
            None => Ok(0),
        }
    }

    /// Saves a checkpoint: the variables of every model set up (safetensors, readable by
    /// Python), the state of every optimizer that keeps one, the precision, the GradScaler
    /// state, and `state` (any serde value: step, epoch, ...). The write is atomic: a crash
    /// leaves the previous file intact, and the new file is read back (header, sizes, CRC-32
    /// checksums, which [`Fabric::load`] verifies too) before it replaces the old one; a
    /// symbolic link keeps pointing at the replaced file. A scale update still pending (see
    /// [`Fabric::update_scale`]) happens first.
    ///
    /// Under DDP only rank 0 writes, and every rank waits for the write to finish (a barrier),
    /// so a [`Fabric::load`] right after sees the new file on every rank. Every rank must call
    /// it.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use tch_fabric::{Fabric, FusedAdamW};
    /// let path = std::env::temp_dir().join(format!("doc-ckpt-{}.safetensors", std::process::id()));
    /// let fabric = Fabric::builder().accelerator("cpu").build()?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let model = nn::linear(vs.root() / "fc", 2, 2, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-3)?;
    /// let (_model, _opt) = fabric.setup(model, &mut vs, opt)?;
    /// fabric.save(&path, &("epoch", 3))?;
    /// let (_, epoch): (String, u32) = fabric.load(&path)?;
    /// assert_eq!(epoch, 3);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// A path ending in `.pt`, `.pth` or `.ckpt` gets `torch.save`'s format instead, laid out as
    /// Lightning's `fabric.save(path, {"model": model, "optimizer": optimizer, **state})`:
    /// the model's `state_dict` under `"model"` (a named model under its name), each
    /// optimizer's `state_dict` (PyTorch's `state` by parameter index and `param_groups`) under
    /// `"optimizer"`, `"optimizer_1"`, ..., the GradScaler's under `"scaler"`, and the entries
    /// of `state` (which must serialise to a map) beside them. `torch.load(path,
    /// weights_only=True)` and Lightning's `fabric.load` read it; written by libtorch's own
    /// pickler, atomically and read back as above (no checksums: the format has none).
    ///
    /// The state of a [`crate::FusedAdamW`] or [`crate::FusedSgd`] is saved too (as
    /// `optimizer.<i>.<param>.exp_avg`, ...), so resuming is exact. The moments of tch's own
    /// optimizers ([`crate::TchOptimizer`]) live in C++ and cannot be exported: resuming with
    /// them restarts those moments.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `state` cannot be serialised (nothing is written then);
    /// [`Error::Io`] / [`Error::Checkpoint`] if the file cannot be written, or a torch.save
    /// file is asked of an optimizer without a `torch.optim` twin ([`crate::TchOptimizer`]);
    /// [`Error::Usage`] for a torch.save state that is not a map or whose entry collides with
    /// the model or optimizer entries.
    pub fn save<S: Serialize + ?Sized>(&self, path: impl AsRef<Path>, state: &S) -> Result<()> {
        let path = path.as_ref();
        let torch_format = checkpoint::torch::is_torch_path(path);
        let state_json = serde_json::to_value(state)?;
        self.update_scale()?;
        let st = self.core.state.borrow();
        let scaler = st.scaler.as_ref().map(GradScaler::state_dict).transpose()?;
        let written = if !self.is_global_zero() {
            Ok(())
        } else if torch_format {
            checkpoint::torch::write(
                path,
                &st.models,
                &st.optimizers,
                scaler.as_ref(),
                &state_json,
            )
        } else {
            checkpoint::collect(&st.models, &st.optimizers).and_then(|tensors| {
                checkpoint::write(
                    path,
                    &tensors,
                    self.precision(),
                    scaler.as_ref(),
                    &state_json.to_string(),
                )
            })
        };
        drop(st);
        // Reached even when rank 0 failed to write, so the others do not wait for it forever.
        self.core.group.barrier()?;
        written
    }

    /// Loads a checkpoint written by [`Fabric::save`]: restores the weights (converted to the
    /// current parameter dtype when the checkpoint came from another precision), the optimizer
    /// states and the GradScaler state, and returns the user state.
    ///
    /// The format is recognised by content: a zip archive is a `torch.save` file, such as
    /// Lightning's `fabric.save(path, {"model": model, "optimizer": optimizer, "step": n})`
    /// writes (layout as in [`Fabric::save`]). Its model weights load by name (name the
    /// VarStore paths as the PyTorch modules: `"0.weight"`), the optimizer state from
    /// PyTorch's parameter indices (the order of the model's entries, which is
    /// `model.parameters()`'s), the learning rate and hyper-parameters from `param_groups`
    /// (a group of another optimizer type is refused), a `"scaler"` GradScaler state, and the
    /// other entries go to serde as one JSON object (a `torch.optim.lr_scheduler` state
    /// deserialises into [`crate::lr_scheduler::SchedulerState`]). Python objects that
    /// `torch.load(weights_only=True)` refuses are refused too, and so are tensors outside the
    /// model and optimizer entries.
    ///
    /// Everything is checked before anything changes: a missing, truncated, damaged (checksum)
    /// or foreign file, a variable missing from the file or of another shape, an unexpected
    /// tensor, an optimizer state that does not fit or holds impossible values (NaN, a
    /// negative second moment), a weight that overflows in this precision (a finite value
    /// becoming inf, unless [`FabricBuilder::allow_load_overflow`]), or a user state of the
    /// wrong shape is an error and leaves the models, optimizers and scaler as they were.
    ///
    /// # Errors
    ///
    /// [`Error::Io`], [`Error::Checkpoint`], [`Error::Json`], [`Error::InvalidState`].
    pub fn load<S: DeserializeOwned>(&self, path: impl AsRef<Path>) -> Result<S> {
        self.load_checked(path.as_ref(), true)
            .map(|(state, _)| state)
    }

    /// [`Fabric::load`] with Lightning's `strict=False` (PyTorch's
    /// `load_state_dict(strict=False)`): a model variable the checkpoint does not hold keeps its
    /// value and a checkpoint tensor that matches nothing is ignored, both reported instead of
    /// refused (a torch.save file without the model's entry reports all its variables). Every
    /// other check is as strict as [`Fabric::load`]: shapes, optimizer states, the user state.
    ///
    /// # Errors
    ///
    /// As [`Fabric::load`].
    pub fn load_non_strict<S: DeserializeOwned>(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<(S, LoadReport)> {
        self.load_checked(path.as_ref(), false)
    }

    fn load_checked<S: DeserializeOwned>(
        &self,
        path: &Path,
        strict: bool,
    ) -> Result<(S, LoadReport)> {
        let mut st = self.core.state.borrow_mut();
        let contents = if checkpoint::torch::is_torch_file(path)? {
            checkpoint::torch::read(path, &st.models, &st.optimizers, self.precision(), strict)?
        } else {
            checkpoint::read(path)?
        };
        let state: S = serde_json::from_str(&contents.state_json)?;
        let mut plan = checkpoint::plan_load(
            path,
            &contents,
            &st.models,
            &st.optimizers,
            st.scaler.as_ref(),
            checkpoint::Rules {
                precision: self.precision(),
                allow_overflow: self.core.settings.allow_load_overflow,
                strict,
            },
        )?;
        let report = std::mem::take(&mut plan.report);
        let st = &mut *st;
        checkpoint::apply(plan, &st.optimizers, st.scaler.as_mut())?;
        if let Some(s) = &mut st.scaler {
            s.reset_iteration();
        }
        Ok((state, report))
    }
}

/// The guard of [`Fabric::no_backward_sync`]: the module's gradients are synchronised again
/// once it is dropped.
#[must_use = "the synchronisation resumes as soon as the guard is dropped"]
#[derive(Debug)]
pub struct NoBackwardSync {
    core: Rc<Core>,
    /// The model whose synchronisation it pauses (`None` when not enabled).
    model: Option<usize>,
}

impl Drop for NoBackwardSync {
    fn drop(&mut self) {
        // The state is never borrowed while user code runs, where guards are dropped.
        if let (Some(i), Ok(mut st)) = (self.model, self.core.state.try_borrow_mut()) {
            if let Some(sync) = st.model_sync.get_mut(i) {
                sync.paused = sync.paused.saturating_sub(1);
            }
        }
    }
}

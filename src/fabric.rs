//! [`Fabric`]: Lightning Fabric's training-loop facade for tch.
use crate::autocast::AutocastGuard;
use crate::checkpoint;
use crate::clip::{self, Clip};
use crate::error::{Error, Result};
use crate::module::FabricModule;
use crate::optim::{IntoTrainOptimizer, TrainOptimizer};
use crate::precision::Precision;
use crate::scaler::{GradScaler, GradScalerConfig, GradScalerState, StepOutcome};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use tch::{nn, Device, Tensor};

/// The checkpoint key prefix of optimizer state: `optimizer.<index>.<param>.<what>`.
const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Lightning's message when a mixed-precision step sees no `fabric.backward` call.
pub const BACKWARD_MESSAGE: &str = "The current strategy and precision selection requires you to call `fabric.backward(loss)` instead of `loss.backward()`.";

/// A precision as Lightning accepts it: a [`Precision`], a string (`"bf16-mixed"`, `"16"`,
/// ...) or an integer (`16`, `32`, `64`).
pub trait IntoPrecision {
    /// The value as given, for error messages and the CLI conflict check.
    #[doc(hidden)]
    fn into_arg(self) -> PrecisionArg;
}

/// A precision value as given by the user (see [`IntoPrecision`]).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum PrecisionArg {
    /// Already parsed.
    Parsed(Precision),
    /// A string, parsed at build time.
    Str(String),
    /// An integer, parsed at build time.
    Int(i64),
}

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

impl IntoPrecision for Precision {
    fn into_arg(self) -> PrecisionArg {
        PrecisionArg::Parsed(self)
    }
}
impl IntoPrecision for &str {
    fn into_arg(self) -> PrecisionArg {
        PrecisionArg::Str(self.to_string())
    }
}
impl IntoPrecision for String {
    fn into_arg(self) -> PrecisionArg {
        PrecisionArg::Str(self)
    }
}
impl IntoPrecision for i64 {
    fn into_arg(self) -> PrecisionArg {
        PrecisionArg::Int(self)
    }
}
impl IntoPrecision for i32 {
    fn into_arg(self) -> PrecisionArg {
        PrecisionArg::Int(i64::from(self))
    }
}

/// Options for a [`Fabric`], as the keyword arguments of Lightning's `Fabric(...)`.
///
/// The `LT_PRECISION`, `LT_ACCELERATOR` and `LT_DEVICES` environment variables (set by
/// `fabric run`) override the values given here, as in Lightning; when `LT_CLI_USED=1` and the
/// code passes a different value explicitly, [`FabricBuilder::build`] fails with Lightning's
/// message.
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
    seed: Option<u64>,
    cpu_fp16: bool,
    scaler: Option<GradScalerConfig>,
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

    /// The number of devices; only 1 is supported by a single process.
    pub fn devices(mut self, devices: usize) -> Self {
        self.devices = Some(devices);
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

    /// The GradScaler configuration used under `16-mixed` (default: PyTorch's).
    pub fn grad_scaler(mut self, config: GradScalerConfig) -> Self {
        self.scaler = Some(config);
        self
    }

    /// Builds the Fabric.
    ///
    /// # Errors
    ///
    /// Lightning's errors for a bad precision or a CLI conflict; [`Error::InvalidConfig`] for
    /// an unknown accelerator, CUDA without a device, or more than one device.
    pub fn build(self) -> Result<Fabric> {
        let cli = std::env::var("LT_CLI_USED")
            .ok()
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
            Some(v) if v == "auto" => 1,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| Error::InvalidConfig {
                    field: "devices",
                    value: v.clone(),
                    allowed: "a positive integer or 'auto'",
                })?,
            None => self.devices.unwrap_or(1),
        };

        let mut precision = precision_arg.parse()?;
        let device = device_for(&accelerator)?;
        if devices != 1 {
            return Err(Error::InvalidConfig {
                field: "devices",
                value: devices.to_string(),
                allowed: "1 (several devices need multi-process training, which tch-fabric does not support yet)",
            });
        }
        if precision == Precision::F16Mixed && device == Device::Cpu && !self.cpu_fp16 {
            log::warn!(
                "You passed `Fabric(accelerator='cpu', precision='16-mixed')` but AMP with fp16 is not supported on CPU. \
                 Using `precision='bf16-mixed'` instead."
            );
            precision = Precision::Bf16Mixed;
        }
        let config = self
            .scaler
            .unwrap_or_default()
            .enabled(precision.needs_grad_scaler());
        let scaler = GradScaler::new(config)?;
        if let Some(seed) = self.seed {
            tch::manual_seed(seed as i64);
        }
        Ok(Fabric {
            precision,
            device,
            shared: Rc::new(RefCell::new(Shared {
                precision,
                scaler,
                optimizers: Vec::new(),
                stepped: Vec::new(),
                backward_count: 0,
                params: Vec::new(),
            })),
        })
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
    let Ok(env) = std::env::var(format!("LT_{}", name.to_uppercase())) else {
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

fn device_for(accelerator: &str) -> Result<Device> {
    match accelerator {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::InvalidConfig {
                    field: "accelerator",
                    value: accelerator.to_string(),
                    allowed: "'cpu' or 'auto' on this machine: no CUDA device is available",
                })
            }
        }
        "auto" => Ok(Device::cuda_if_available()),
        other => Err(Error::InvalidConfig {
            field: "accelerator",
            value: format!("'{other}'"),
            allowed: "one of 'cpu', 'cuda', 'gpu', 'auto'",
        }),
    }
}

type SharedOptimizer = Rc<RefCell<Box<dyn TrainOptimizer>>>;

/// State the Fabric shares with the optimizers it set up.
#[derive(Debug)]
struct Shared {
    precision: Precision,
    scaler: GradScaler,
    /// Every optimizer set up, in order (checkpoints key their state by this index).
    optimizers: Vec<SharedOptimizer>,
    /// Optimizers that stepped since the last scale update.
    stepped: Vec<u64>,
    /// `fabric.backward` calls so far.
    backward_count: u64,
    /// Every parameter set up, for checkpoints.
    params: Vec<(String, Tensor)>,
}

impl Shared {
    /// One scale update for the iteration, once every optimizer stepped or when the next
    /// iteration starts (PyTorch's documented rule, not Lightning's update per optimizer).
    fn flush_update(&mut self) -> Result<()> {
        if self.scaler.is_enabled() && self.scaler.has_pending_checks() {
            self.scaler.update()?;
        }
        self.stepped.clear();
        Ok(())
    }
}

/// Lightning Fabric for tch: pick a precision with one string, set up a model and its
/// optimizer, and write the training loop as in Lightning.
///
/// ```
/// use tch::{nn, nn::OptimizerConfig, Device, Kind, Reduction, Tensor};
/// use tch_fabric::{Clip, Fabric};
///
/// let fabric = Fabric::builder().precision("bf16-mixed").accelerator("cpu").build()?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 8, 1, Default::default());
/// let opt = nn::AdamW::default().build(&vs, 1e-3)?;
/// let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
///
/// let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
/// let y = Tensor::randn([16, 1], (Kind::Float, Device::Cpu));
/// for _ in 0..3 {
///     opt.zero_grad();
///     let out = model.forward(&x);                 // bf16 compute, float32 output
///     let loss = {
///         let _ac = fabric.autocast()?;            // with fabric.autocast():
///         out.mse_loss(&y, Reduction::Mean)
///     };
///     fabric.backward(&loss)?;
///     let norm = fabric.clip_gradients(&mut opt, Clip::norm(1.0))?;
///     assert!(norm.is_finite());
///     opt.step()?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Fabric {
    precision: Precision,
    device: Device,
    shared: Rc<RefCell<Shared>>,
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

    /// The device training runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The precision in effect (after the CPU `16-mixed` fallback, if it applied).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `tensor` on the Fabric's device.
    pub fn to_device(&self, tensor: &Tensor) -> Tensor {
        tensor.to_device(self.device)
    }

    /// Seeds libtorch's CPU and CUDA generators and returns the seed.
    pub fn seed_everything(&self, seed: u64) -> u64 {
        tch::manual_seed(seed as i64);
        seed
    }

    /// Prepares a model and its optimizer for the precision: moves the VarStore to the device,
    /// converts the parameters for `-true` / `64-true` (mixed precisions keep float32), and
    /// wraps both. `optimizer` is a tch `nn::Optimizer` built from `var_store`, or a
    /// [`crate::FusedAdamW`] (whose state checkpoints save); `var_store` stays usable.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] when a parameter name was already set up by an earlier call (give the
    /// models distinct VarStore paths: checkpoints key weights by name).
    pub fn setup<M: nn::ModuleT, O: IntoTrainOptimizer>(
        &self,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        let names: Vec<String> = var_store.variables().into_keys().collect();
        {
            let sh = self.shared.borrow();
            if let Some(dup) = names
                .iter()
                .find(|n| sh.params.iter().any(|(p, _)| p == *n))
            {
                return Err(Error::Usage(format!(
                    "parameter '{dup}' was already set up with this Fabric; give each model its own VarStore path"
                )));
            }
        }
        if var_store.device() != self.device {
            var_store.set_device(self.device);
        }
        match self.precision {
            Precision::F64True => var_store.double(),
            Precision::F16True => var_store.half(),
            Precision::Bf16True => var_store.bfloat16(),
            _ => {}
        }
        let opt: SharedOptimizer = Rc::new(RefCell::new(optimizer.into_train_optimizer(var_store)));
        let mut sh = self.shared.borrow_mut();
        let mut vars: Vec<(String, Tensor)> = var_store.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        sh.params.extend(vars);
        sh.optimizers.push(Rc::clone(&opt));
        let module = FabricModule::new(model, self.precision, self.device);
        let id = opt.borrow().scaler_id();
        let fopt = FabricOptimizer {
            id,
            opt,
            shared: Rc::clone(&self.shared),
            seen_backward: sh.backward_count,
        };
        Ok((module, fopt))
    }

    /// The precision's scope for code outside the model, such as the loss (`with
    /// fabric.autocast():`): autocast for mixed precisions, the default dtype switched for
    /// `-true` and `64-true`, nothing for `32-true`.
    ///
    /// # Errors
    ///
    /// Only if libtorch refuses the scope, which the Fabric's validation rules out.
    pub fn autocast(&self) -> Result<AutocastGuard> {
        AutocastGuard::for_precision(self.precision, self.device)
    }

    /// `loss.backward()`, scaled under `16-mixed` (`scaler.scale(loss).backward()`).
    ///
    /// # Errors
    ///
    /// libtorch's error if `loss` does not require gradients, or the scaler's update error.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        let mut sh = self.shared.borrow_mut();
        if !sh.stepped.is_empty() {
            sh.flush_update()?;
        }
        let scaled = sh.scaler.scale(loss)?;
        scaled.f_backward()?;
        sh.backward_count += 1;
        Ok(())
    }

    /// Clips the gradients of `optimizer`'s parameters and returns their global norm before
    /// clipping (of order `norm_type` for [`Clip::Norm`], the 2-norm for [`Clip::Value`]).
    ///
    /// Under `16-mixed` the gradients are unscaled first (once per iteration, however often
    /// this is called). On an overflow step the norm is inf/NaN: it is returned, not raised
    /// (Lightning raises by default), and the step that follows is skipped. Use
    /// [`Fabric::clip_gradients_strict`] for Lightning's error.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad clip value; the scaler's unscale errors.
    pub fn clip_gradients(&self, optimizer: &mut FabricOptimizer, clip: Clip) -> Result<f64> {
        Ok(self
            .clip_impl(optimizer, clip, false)?
            .f_double_value(&[])?)
    }

    /// [`Fabric::clip_gradients`] without reading the norm: it comes back as a 0-dim tensor on
    /// the device (Lightning's return value), so on CUDA the host does not wait for the
    /// gradients. With a fused optimizer ([`crate::FusedAdamW`], [`crate::FusedSgd`]) under
    /// `16-mixed`, norm clipping costs one read pass over the gradients and the optimizer
    /// applies unscale and clip together; nothing is synchronised from backward to the step.
    ///
    /// ```
    /// use tch::{nn, nn::Module, Device, Kind, Tensor};
    /// use tch_fabric::{Clip, Fabric, FusedAdamW};
    /// let fabric = Fabric::new("32-true")?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-3);
    /// let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    /// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
    /// fabric.backward(&loss)?;
    /// let norm: Tensor = fabric.clip_gradients_on_device(&mut opt, Clip::norm(1.0))?;
    /// opt.step()?;
    /// assert!(norm.double_value(&[]) > 0.0);
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Fabric::clip_gradients`].
    pub fn clip_gradients_on_device(
        &self,
        optimizer: &mut FabricOptimizer,
        clip: Clip,
    ) -> Result<Tensor> {
        self.clip_impl(optimizer, clip, false)
    }

    /// [`Fabric::clip_gradients`] with Lightning's default `error_if_nonfinite=True`: a
    /// non-finite norm is PyTorch's error and the gradients are left as they were.
    ///
    /// # Errors
    ///
    /// As [`Fabric::clip_gradients`], plus the non-finite norm error.
    pub fn clip_gradients_strict(
        &self,
        optimizer: &mut FabricOptimizer,
        clip: Clip,
    ) -> Result<f64> {
        Ok(self.clip_impl(optimizer, clip, true)?.f_double_value(&[])?)
    }

    fn clip_impl(
        &self,
        optimizer: &mut FabricOptimizer,
        clip: Clip,
        error_if_nonfinite: bool,
    ) -> Result<Tensor> {
        clip.validate()?;
        let mut opt = optimizer.opt.borrow_mut();
        let mut sh = self.shared.borrow_mut();
        // The one-pass path: 2-norm clipping folded into a fused optimizer's scaled step. The
        // strict form needs the norm on the host before anything changes, so it clips the
        // ordinary way.
        if let Clip::Norm {
            max_norm,
            norm_type,
        } = clip
        {
            if norm_type == 2.0 && !error_if_nonfinite {
                if let Some(norm) = sh.scaler.clip_norm_folded(&mut **opt, max_norm)? {
                    return Ok(norm);
                }
            }
        }
        sh.scaler.ensure_unscaled(&mut **opt)?;
        let grads: Vec<Tensor> = opt.named_gradients().into_iter().map(|(_, g)| g).collect();
        clip::apply(clip, &grads, error_if_nonfinite)
    }

    /// Current and peak memory of the Fabric's device (on CPU: the process's resident set).
    ///
    /// # Errors
    ///
    /// As [`crate::memory_stats`].
    pub fn memory_stats(&self) -> Result<crate::MemoryStats> {
        crate::memory_stats(self.device)
    }

    /// The current loss scale (1.0 without a scaler).
    pub fn loss_scale(&self) -> f64 {
        self.shared.borrow().scaler.get_scale()
    }

    /// The GradScaler's state with PyTorch's keys (empty without a scaler).
    pub fn scaler_state(&self) -> GradScalerState {
        self.shared.borrow().scaler.state_dict()
    }

    /// Optimizer steps skipped because of inf/NaN gradients so far.
    pub fn skipped_steps(&self) -> u64 {
        self.shared.borrow().scaler.steps_skipped()
    }

    /// Saves a checkpoint: the weights of every model set up (safetensors, readable by
    /// Python), the precision, the GradScaler state, and `state` (any serde value: step,
    /// epoch, ...). The write is atomic: a crash leaves the previous file intact.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use tch_fabric::{Fabric, FusedAdamW};
    /// let path = std::env::temp_dir().join(format!("doc-ckpt-{}.safetensors", std::process::id()));
    /// let fabric = Fabric::builder().accelerator("cpu").build()?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let model = nn::linear(vs.root() / "fc", 2, 2, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-3);
    /// let (_model, _opt) = fabric.setup(model, &mut vs, opt)?;
    /// fabric.save(&path, &("epoch", 3))?;
    /// let (_, epoch): (String, u32) = fabric.load(&path)?;
    /// assert_eq!(epoch, 3);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// The state of a [`crate::FusedAdamW`] is saved too (as `optimizer.<i>.<param>.exp_avg`,
    /// ...), so resuming is exact. The moments of tch's own optimizers (Adam, ...) live in C++
    /// and cannot be exported: resuming with them restarts those moments.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `state` cannot be serialised (nothing is written then);
    /// [`Error::Io`] / [`Error::Checkpoint`] if the file cannot be written.
    pub fn save<S: Serialize + ?Sized>(&self, path: impl AsRef<Path>, state: &S) -> Result<()> {
        let state_json = serde_json::to_string(state)?;
        let mut sh = self.shared.borrow_mut();
        if !sh.stepped.is_empty() {
            sh.flush_update()?;
        }
        let scaler = sh.scaler.is_enabled().then(|| sh.scaler.state_dict());
        let mut tensors: Vec<(String, Tensor)> = sh
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        for (i, opt) in sh.optimizers.iter().enumerate() {
            for (name, t) in opt.borrow().state_tensors() {
                tensors.push((format!("{OPTIMIZER_PREFIX}{i}.{name}"), t));
            }
        }
        checkpoint::write(
            path.as_ref(),
            &tensors,
            self.precision,
            scaler.as_ref(),
            &state_json,
        )
    }

    /// Loads a checkpoint written by [`Fabric::save`]: restores the weights (converted to the
    /// current parameter dtype when the checkpoint came from another precision) and the
    /// GradScaler state, and returns the user state.
    ///
    /// Everything is checked before anything changes: a missing, truncated or foreign file, a
    /// parameter missing from the file or of another shape, an unexpected tensor, or a user
    /// state of the wrong shape is an error and leaves the model and the scaler as they were.
    ///
    /// # Errors
    ///
    /// [`Error::Io`], [`Error::Checkpoint`], [`Error::Json`], [`Error::InvalidState`].
    pub fn load<S: DeserializeOwned>(&self, path: impl AsRef<Path>) -> Result<S> {
        let path = path.as_ref();
        let contents = checkpoint::read(path)?;
        let state: S = serde_json::from_str(&contents.state_json)?;
        let mut sh = self.shared.borrow_mut();
        let fail = |reason: String| Error::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        for (name, p) in &sh.params {
            let t = contents
                .tensors
                .get(name)
                .ok_or_else(|| fail(format!("parameter '{name}' is not in the checkpoint")))?;
            if t.size() != p.size() {
                return Err(fail(format!(
                    "parameter '{name}' has shape {:?} in the checkpoint but {:?} in the model",
                    t.size(),
                    p.size()
                )));
            }
        }
        let mut opt_states: Vec<Vec<(String, Tensor)>> =
            sh.optimizers.iter().map(|_| Vec::new()).collect();
        for (key, t) in &contents.tensors {
            if sh.params.iter().any(|(n, _)| n == key) {
                continue;
            }
            let slot = key.strip_prefix(OPTIMIZER_PREFIX).and_then(|rest| {
                let (i, name) = rest.split_once('.')?;
                Some((i.parse::<usize>().ok()?, name))
            });
            match slot {
                Some((i, name)) if i < opt_states.len() => {
                    opt_states[i].push((name.to_string(), t.shallow_clone()))
                }
                _ => {
                    return Err(fail(format!(
                        "tensor '{key}' in the checkpoint matches no parameter or optimizer of this Fabric"
                    )))
                }
            }
        }
        for (opt, st) in sh.optimizers.iter().zip(&opt_states) {
            opt.borrow()
                .check_state_tensors(st)
                .map_err(|e| fail(e.to_string()))?;
        }
        let scaler_state = match (&contents.scaler, sh.scaler.is_enabled()) {
            (Some(s), true) => {
                // Dry run on a scratch scaler so a bad state is refused before weights change.
                GradScaler::new(sh.scaler.config().clone())?.load_state_dict(s)?;
                Some(s.clone())
            }
            (None, true) => {
                log::info!(
                    "checkpoint {} has no GradScaler state ({}): keeping the current scale",
                    path.display(),
                    contents.precision
                );
                None
            }
            (Some(_), false) => {
                log::info!(
                    "checkpoint {} holds a GradScaler state that {} does not use",
                    path.display(),
                    self.precision
                );
                None
            }
            (None, false) => None,
        };
        if contents.precision != self.precision {
            log::info!(
                "checkpoint {} was saved with {}; converting its weights to {}",
                path.display(),
                contents.precision,
                self.precision
            );
        }
        tch::no_grad(|| -> Result<()> {
            for (name, p) in &sh.params {
                let src = &contents.tensors[name];
                p.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })?;
        for (opt, st) in sh.optimizers.iter().zip(&opt_states) {
            opt.borrow_mut().load_state_tensors(st)?;
        }
        if let Some(s) = scaler_state {
            sh.scaler.load_state_dict(&s)?;
        }
        sh.stepped.clear();
        Ok(state)
    }
}

/// An optimizer set up by [`Fabric::setup`]. `step` unscales, skips on inf/NaN and updates
/// the loss scale under `16-mixed`, and says what it did.
#[derive(Debug)]
pub struct FabricOptimizer {
    opt: SharedOptimizer,
    id: u64,
    shared: Rc<RefCell<Shared>>,
    seen_backward: u64,
}

impl FabricOptimizer {
    /// One optimizer step. Under `16-mixed` a step whose gradients hold inf/NaN is skipped
    /// (and reported), and the loss scale is updated once all optimizers of the Fabric have
    /// stepped in this iteration.
    ///
    /// # Errors
    ///
    /// Lightning's "requires you to call `fabric.backward(loss)`" under a mixed precision when
    /// no `fabric.backward` ran since this optimizer's last step (a plain `loss.backward()`
    /// would otherwise train on scaled gradients); the scaler's and the optimizer's errors.
    pub fn step(&mut self) -> Result<StepOutcome> {
        let mut sh = self.shared.borrow_mut();
        if sh.precision.is_mixed() && sh.backward_count == self.seen_backward {
            return Err(Error::Usage(BACKWARD_MESSAGE.to_string()));
        }
        let outcome = sh.scaler.step(&mut **self.opt.borrow_mut())?;
        self.seen_backward = sh.backward_count;
        if !sh.stepped.contains(&self.id) {
            sh.stepped.push(self.id);
        }
        let all = sh
            .optimizers
            .iter()
            .all(|o| sh.stepped.contains(&o.borrow().scaler_id()));
        if all {
            sh.flush_update()?;
        }
        Ok(outcome)
    }

    /// Zeroes the gradients.
    pub fn zero_grad(&mut self) {
        self.opt.borrow_mut().zero_grad();
    }

    /// Sets the learning rate of every parameter group.
    ///
    /// # Errors
    ///
    /// The optimizer's error.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.opt.borrow_mut().set_lr(lr)
    }

    /// The defined gradients of the parameters this optimizer updates, with their names.
    pub fn gradients(&self) -> Vec<(String, Tensor)> {
        self.opt.borrow().named_gradients()
    }

    /// The optimizer's own state as named tensors (empty for tch's optimizers).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.opt.borrow().state_tensors()
    }
}

/// A learning-rate schedule that only advances on steps that were taken, so a skipped
/// `16-mixed` step does not move the schedule (PyTorch's and Lightning's schedulers advance
/// anyway and warn). A [`StepOutcome::Queued`] step (sync-free, the skip decided on the device)
/// counts as taken, as in PyTorch.
///
/// ```
/// use tch_fabric::{LrScheduler, StepOutcome};
/// let mut sched = LrScheduler::new(|step| 0.1 * 0.5f64.powi(step as i32));
/// assert_eq!(sched.lr(), 0.1);
/// sched.advance(&StepOutcome::Stepped);
/// let skipped = StepOutcome::Skipped { scale_before: 2.0, scale_after: 1.0, nonfinite: vec![] };
/// sched.advance(&skipped);
/// assert_eq!((sched.steps(), sched.lr()), (1, 0.05));
/// ```
pub struct LrScheduler<F: FnMut(u64) -> f64> {
    schedule: F,
    steps: u64,
    lr: f64,
}

impl<F: FnMut(u64) -> f64> LrScheduler<F> {
    /// `schedule(n)` is the learning rate after `n` taken steps.
    pub fn new(mut schedule: F) -> Self {
        let lr = schedule(0);
        LrScheduler {
            schedule,
            steps: 0,
            lr,
        }
    }

    /// Advances past a taken step (a skipped one leaves the schedule where it is) and
    /// returns the learning rate for the next step.
    pub fn advance(&mut self, outcome: &StepOutcome) -> f64 {
        if !outcome.is_skipped() {
            self.steps += 1;
            self.lr = (self.schedule)(self.steps);
        }
        self.lr
    }

    /// [`LrScheduler::advance`], then sets the rate on `optimizer`.
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

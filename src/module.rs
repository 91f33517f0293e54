//! [`FabricModule`]: a model whose forward runs the way Lightning Fabric's `_FabricModule` runs
//! it: inputs converted, forward inside the precision's scope, outputs converted back.
use crate::autocast::AutocastGuard;
use crate::error::Result;
use crate::precision::Precision;
use std::cell::Cell;
use tch::{nn::ModuleT, Device, Kind, Tensor};

/// A model set up by [`crate::Fabric::setup`]. Its forward does what Lightning's does:
///
/// 1. floating inputs are converted to the precision's input dtype (bfloat16 for `bf16-mixed`,
///    float16 for `16-mixed` and `16-true`, float64 for `64-true`; `32-true` leaves them);
/// 2. the forward runs inside the precision's scope (autocast for mixed precisions, the
///    default dtype switched for `-true` and `64-true`);
/// 3. floating outputs are converted back to float32 (except under `32-true`).
///
/// Because of step 1, a Fabric loop under a mixed precision is not bit-identical to a raw
/// autocast loop, where the first layer sees float32 inputs: the inputs are rounded to the low
/// dtype first. [`FabricModule::convert_inputs`] turns that off.
///
/// ```
/// use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
/// let fabric = tch_fabric::Fabric::builder().precision("bf16-true").accelerator("cpu").build()?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 3, 2, Default::default());
/// let opt = nn::Sgd::default().build(&vs, 0.1)?;
/// let (model, _opt) = fabric.setup(model, &mut vs, opt)?;
/// let y = model.forward(&Tensor::ones([1, 3], (Kind::Float, Device::Cpu)));
/// assert_eq!(vs.variables()["fc.weight"].kind(), Kind::BFloat16); // parameters converted
/// assert_eq!(y.kind(), Kind::Float);                            // outputs back to float32
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Like a PyTorch module it has a training mode ([`FabricModule::train`] /
/// [`FabricModule::eval`], training by default) that `forward` passes to the model's
/// `forward_t`.
#[derive(Debug)]
pub struct FabricModule<M> {
    inner: M,
    precision: Precision,
    device: Device,
    convert_inputs: bool,
    training: Cell<bool>,
}

impl<M: ModuleT> FabricModule<M> {
    pub(crate) fn new(inner: M, precision: Precision, device: Device) -> Self {
        FabricModule {
            inner,
            precision,
            device,
            convert_inputs: true,
            training: Cell::new(true),
        }
    }

    /// Whether floating inputs are converted to the precision's input dtype (default: yes, as
    /// Lightning). Turn it off to match a raw autocast loop bit for bit.
    pub fn convert_inputs(mut self, convert: bool) -> Self {
        self.convert_inputs = convert;
        self
    }

    /// Training mode for `forward` (the default).
    pub fn train(&self) {
        self.training.set(true);
    }

    /// Evaluation mode for `forward`.
    pub fn eval(&self) {
        self.training.set(false);
    }

    /// Whether `forward` runs in training mode.
    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// The wrapped model.
    pub fn module(&self) -> &M {
        &self.inner
    }

    /// Forward in the current mode; see the type's docs for what is converted.
    ///
    /// # Errors
    ///
    /// [`crate::Error`] if the precision scope cannot be entered (not for a Fabric-validated
    /// precision and device) or a conversion fails.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.try_forward_t(xs, self.training.get())
    }

    /// Forward with an explicit training flag.
    ///
    /// # Errors
    ///
    /// As [`FabricModule::try_forward`].
    pub fn try_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = if self.convert_inputs
            && self.precision != Precision::F32True
            && xs.is_floating_point()
        {
            xs.f_to_kind(self.precision.input_dtype())?
        } else {
            xs.shallow_clone()
        };
        let out = {
            let _scope = AutocastGuard::for_precision(self.precision, self.device)?;
            self.inner.forward_t(&xs, train)
        };
        if self.precision != Precision::F32True && out.is_floating_point() {
            Ok(out.f_to_kind(Kind::Float)?)
        } else {
            Ok(out)
        }
    }

    /// Forward in the current mode.
    ///
    /// # Panics
    ///
    /// Only where [`FabricModule::try_forward`] would fail, which Fabric's own validation of
    /// the precision and device rules out; use `try_forward` to handle it as an error.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.try_forward(xs)
            .unwrap_or_else(|e| panic!("FabricModule::forward: {e}"))
    }
}

impl<M: ModuleT> ModuleT for FabricModule<M> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.try_forward_t(xs, train)
            .unwrap_or_else(|e| panic!("FabricModule::forward_t: {e}"))
    }
}

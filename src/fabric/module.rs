//! [`FabricModule`]: a model whose calls run the way Lightning Fabric's `_FabricModule` runs
//! them: inputs converted, the call inside the precision's scope, outputs converted back.
use super::Settings;
use crate::autocast::AutocastGuard;
use crate::error::{Error, Op, Result};
use crate::precision::Precision;
use std::cell::Cell;
use tch::{nn, Kind, Tensor};

/// A model set up by [`crate::Fabric::setup`] or [`crate::Fabric::setup_module`]. Its forward
/// does what Lightning's does:
///
/// 1. floating inputs are converted to the precision's input dtype (bfloat16 for `bf16-mixed`,
///    float16 for `16-mixed` and `16-true`, float64 for `64-true`; `32-true` leaves them);
/// 2. the forward runs inside the precision's scope (autocast for mixed precisions);
/// 3. floating outputs are converted back to float32 (except under `32-true`).
///
/// [`FabricModule::run`] does the same for any method and any number of inputs and outputs
/// (Lightning's `mark_forward_method`); the module is also a tch [`nn::Module`], so
/// `xs.apply(&model)` works.
///
/// Because of step 1, a Fabric loop under a mixed precision is not bit-identical to a raw
/// autocast loop, where the first layer sees float32 inputs: the inputs are rounded to the low
/// dtype first. [`FabricModule::convert_inputs`] turns that off.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// let fabric = tch_fabric::Fabric::builder().precision("bf16-true").accelerator("cpu").build()?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 3, 2, Default::default());
/// let model = fabric.setup_module(model, &mut vs)?;
/// let y = model.try_forward(&Tensor::ones([1, 3], (Kind::Float, Device::Cpu)))?;
/// assert_eq!(vs.variables()["fc.weight"].kind(), Kind::BFloat16); // parameters converted
/// assert_eq!(y.kind(), Kind::Float);                            // outputs back to float32
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// Like a PyTorch module it has a training mode ([`FabricModule::train`] /
/// [`FabricModule::eval`], training by default) that the forward passes to the model's
/// `forward_t`. tch's `ModuleT` comes from its `Module` impl and ignores the flag given to
/// `forward_t`/`apply_t`: the mode is the module's own.
#[derive(Debug)]
pub struct FabricModule<M> {
    inner: M,
    /// The Fabric's decisions (a copy: a module is `Send`, as tch's `Module` requires).
    settings: Settings,
    convert_inputs: bool,
    training: Cell<bool>,
    /// Which Fabric set it up, and its index among that Fabric's models (for
    /// [`crate::Fabric::no_backward_sync`]).
    origin: (u64, usize),
}

impl<M> FabricModule<M> {
    pub(crate) fn new(inner: M, settings: Settings, origin: (u64, usize)) -> Self {
        FabricModule {
            inner,
            settings,
            convert_inputs: true,
            training: Cell::new(true),
            origin,
        }
    }

    /// (the Fabric's id, the model's index there).
    pub(crate) fn origin(&self) -> (u64, usize) {
        self.origin
    }

    /// Whether floating inputs are converted to the precision's input dtype (default: yes, as
    /// Lightning). Turn it off to match a raw autocast loop bit for bit.
    pub fn convert_inputs(mut self, convert: bool) -> Self {
        self.convert_inputs = convert;
        self
    }

    /// Training mode for the forward (the default).
    pub fn train(&self) {
        self.training.set(true);
    }

    /// Evaluation mode for the forward.
    pub fn eval(&self) {
        self.training.set(false);
    }

    /// Whether the forward runs in training mode.
    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// The wrapped model.
    pub fn module(&self) -> &M {
        &self.inner
    }

    /// Runs `f` on the model the way the forward runs: every floating tensor in `inputs` is
    /// converted to the precision's input dtype, `f` runs inside the precision's scope, and
    /// every floating tensor it returns comes back as float32. For models with several inputs
    /// or outputs, or methods other than the forward (Lightning's `mark_forward_method`).
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// struct Vae { enc: nn::Linear, dec: nn::Linear }
    /// impl Vae {
    ///     fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
    ///         let h = x.apply(&self.enc);
    ///         (h.narrow(1, 0, 2), h.narrow(1, 2, 2))
    ///     }
    ///     fn decode(&self, z: &Tensor) -> Tensor { z.apply(&self.dec) }
    /// }
    /// let fabric = tch_fabric::Fabric::builder().precision("bf16-mixed").accelerator("cpu").build()?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let vae = Vae { enc: nn::linear(vs.root() / "enc", 8, 4, Default::default()),
    ///                 dec: nn::linear(vs.root() / "dec", 2, 8, Default::default()) };
    /// let vae = fabric.setup_module(vae, &mut vs)?;
    /// let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
    /// let (mu, logvar) = vae.run(&x, |m, x| m.encode(&x))?;        // two outputs
    /// let recon = vae.run(&mu, |m, z| m.decode(&z))?;               // another method
    /// assert_eq!((mu.kind(), logvar.kind(), recon.kind()), (Kind::Float, Kind::Float, Kind::Float));
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if a conversion fails, or the precision's scope cannot be
    /// entered (not for a Fabric-validated precision and device).
    pub fn run<I: Convert, O: Convert>(
        &self,
        inputs: I,
        f: impl FnOnce(&M, I::Output) -> O,
    ) -> Result<O::Output> {
        let precision = self.settings.precision;
        let input_kind = (self.convert_inputs && precision != Precision::F32True)
            .then(|| precision.input_dtype());
        let inputs = inputs.convert(&mut |t| {
            if !t.defined() {
                return Err(Error::Usage(
                    "FabricModule got an undefined tensor as input".into(),
                ));
            }
            match input_kind {
                Some(kind) if t.f_is_floating_point().op("is_floating_point")? => {
                    t.f_to_kind(kind).op("to_kind")
                }
                _ => Ok(t.shallow_clone()),
            }
        })?;
        let out = {
            let _scope = AutocastGuard::for_precision(
                precision,
                self.settings.device,
                self.settings.default_dtype_scope,
            )?;
            f(&self.inner, inputs)
        };
        out.convert(&mut |t| {
            if precision != Precision::F32True
                && t.defined()
                && t.f_is_floating_point().op("is_floating_point")?
            {
                t.f_to_kind(Kind::Float).op("to_kind")
            } else {
                Ok(t.shallow_clone())
            }
        })
    }
}

impl<M> FabricModule<M> {
    /// [`FabricModule::run`] with the module's mode: `f` gets `true` in training mode
    /// ([`FabricModule::train`], the default) and `false` after [`FabricModule::eval`], as
    /// tch's `forward_t` takes it (dropout, batch norm).
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let fabric = tch_fabric::Fabric::new("bf16-mixed")?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let fc = nn::linear(vs.root() / "fc", 4, 4, Default::default());
    /// let model = fabric.setup_module(fc, &mut vs)?;
    /// let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    /// let run = |m: &nn::Linear, x: Tensor, train: bool| x.apply(m).dropout(0.5, train);
    /// let _y = model.run_t(&x, run)?;         // dropout on
    /// model.eval();
    /// let (a, b) = (model.run_t(&x, run)?, model.run_t(&x, run)?);
    /// assert!(a.equal(&b));                    // dropout off
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`FabricModule::run`].
    pub fn run_t<I: Convert, O: Convert>(
        &self,
        inputs: I,
        f: impl FnOnce(&M, I::Output, bool) -> O,
    ) -> Result<O::Output> {
        let train = self.training.get();
        self.run(inputs, |m, xs| f(m, xs, train))
    }
}

impl<M: nn::ModuleT> FabricModule<M> {
    /// The forward in the current mode ([`FabricModule::train`] / [`FabricModule::eval`]).
    ///
    /// Everything this crate does on the way (input checks, conversions, the precision's
    /// scope) returns errors. The model's own `forward_t` is the model's: tch's layers call
    /// libtorch through panicking methods, so an input a layer cannot take (an integer tensor
    /// for `nn::Linear`, a wrong width) panics inside it. `try_forward` catches that panic at
    /// this one boundary and returns it as an error, with the autocast state restored (what
    /// the model itself changed before panicking, a batch norm's running statistics, stays
    /// changed). Rust's panic hook still runs (by default it prints the panic's message to
    /// stderr); a panic that aborts (`panic = "abort"`) cannot be caught.
    ///
    /// # Errors
    ///
    /// As [`FabricModule::run`], and [`crate::Error::Native`] (op `forward`) with the panic's
    /// message when the model's `forward_t` panics.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut panicked = None;
        let out = self.run_t(xs, |m, xs, train| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.forward_t(&xs, train)))
                .unwrap_or_else(|payload| {
                    panicked = Some(panic_message(payload.as_ref()));
                    // Undefined: passed through the output conversion untouched.
                    Tensor::new()
                })
        })?;
        match panicked {
            Some(message) => Err(Error::native("forward", &message)),
            None => Ok(out),
        }
    }
}

/// The message a panic carried (`panic!`'s text, or tch's `unwrap` of a libtorch error).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("the model's forward panicked");
    format!("the model's forward panicked: {text}")
}

impl<M: nn::ModuleT> nn::Module for FabricModule<M> {
    /// [`FabricModule::try_forward`], as tch's trait wants it.
    ///
    /// # Panics
    ///
    /// Where `try_forward` fails, which a Fabric-validated precision and device rule out (tch's
    /// `Module` has no way to return an error: call `try_forward` to handle it).
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.try_forward(xs) {
            Ok(t) => t,
            Err(e) => panic!("FabricModule::forward: {e}"),
        }
    }
}

/// A value whose tensors [`FabricModule::run`] converts: a tensor (owned or borrowed), a
/// tuple, `Vec`, slice or `Option` of them, and plain numbers and strings passed through.
pub trait Convert {
    /// The value with converted tensors (borrowed tensors become owned ones).
    type Output;

    /// Applies `f` to every tensor.
    ///
    /// # Errors
    ///
    /// The first error of `f`.
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Self::Output>;
}

impl Convert for Tensor {
    type Output = Tensor;
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        f(&self)
    }
}

impl Convert for &Tensor {
    type Output = Tensor;
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        f(self)
    }
}

impl Convert for &[Tensor] {
    type Output = Vec<Tensor>;
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
        self.iter().map(f).collect()
    }
}

impl<T: Convert> Convert for Vec<T> {
    type Output = Vec<T::Output>;
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Self::Output> {
        self.into_iter().map(|t| t.convert(f)).collect()
    }
}

impl<T: Convert> Convert for Option<T> {
    type Output = Option<T::Output>;
    fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Self::Output> {
        self.map(|t| t.convert(f)).transpose()
    }
}

macro_rules! convert_passthrough {
    ($($t:ty),*) => {$(
        impl Convert for $t {
            type Output = $t;
            fn convert(self, _f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<$t> {
                Ok(self)
            }
        }
    )*};
}

convert_passthrough!((), bool, i32, i64, u32, u64, usize, f32, f64, String);

macro_rules! convert_tuple {
    ($($name:ident),+) => {
        impl<$($name: Convert),+> Convert for ($($name,)+) {
            type Output = ($($name::Output,)+);
            #[allow(non_snake_case)]
            fn convert(self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Self::Output> {
                let ($($name,)+) = self;
                Ok(($($name.convert(f)?,)+))
            }
        }
    };
}

convert_tuple!(A);
convert_tuple!(A, B);
convert_tuple!(A, B, C);
convert_tuple!(A, B, C, D);
convert_tuple!(A, B, C, D, E);
convert_tuple!(A, B, C, D, E, F);

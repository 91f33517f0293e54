//! # tch-fabric
//!
//! Lightning Fabric's mixed-precision training for Rust programs built on [`tch`]: the same
//! precision values, a real autocast on CPU and CUDA, and PyTorch's own numerics, through
//! libtorch's native kernels.
//!
//! ## Quick start
//!
//! Pick a [`Precision`] with Lightning's spelling, and run the forward under its autocast scope:
//!
//! ```
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//! use tch_fabric::{autocast, Precision};
//!
//! let precision: Precision = "bf16-mixed".parse()?;
//! let device = Device::Cpu;
//! let vs = nn::VarStore::new(device);
//! let model = nn::linear(vs.root(), 8, 4, Default::default());
//! let x = Tensor::randn([16, 8], (Kind::Float, device));
//!
//! let y = {
//!     let _guard = autocast(device, precision.autocast_dtype().unwrap())?;
//!     model.forward(&x) // the matmul runs in bfloat16, as under torch.autocast("cpu")
//! };
//! assert_eq!(y.kind(), Kind::BFloat16);
//! assert_eq!(model.forward(&x).kind(), Kind::Float); // the scope has ended
//! # Ok::<(), tch_fabric::Error>(())
//! ```
//!
//! ## What is here
//!
//! - [`Precision`]: `"64-true"`, `"32-true"`, `"16-mixed"`, `"bf16-mixed"`, `"16-true"`,
//!   `"bf16-true"` and Lightning's legacy spellings, with the dtypes each implies.
//! - [`autocast`], [`Autocast`], [`AutocastGuard`]: `torch.autocast` for CPU and CUDA, nesting
//!   and panic-safe.
//! - [`DefaultDtypeGuard`]: `torch.set_default_dtype` as a scope.
//! - [`GradScaler`]: `torch.amp.GradScaler` with the same bits, plus opt-in safety
//!   ([`ScalePolicy`], [`StepOutcome`], skip counters, bfloat16 gradients on CUDA).
//!
//! Errors are one enum, [`Error`]; nothing here panics on bad input.

mod autocast;
mod checkpoint;
mod clip;
mod default_dtype;
mod error;
mod fabric;
mod ffi;
mod module;
mod optim;
mod precision;
mod scaler;

pub use autocast::{autocast, autocast_state, Autocast, AutocastGuard, AutocastState};
pub use clip::{clip_grad_norm, clip_grad_value, total_norm, Clip};
pub use default_dtype::{default_dtype, set_default_dtype, DefaultDtypeGuard};
pub use error::{Error, Result};
pub use fabric::{
    Fabric, FabricBuilder, FabricOptimizer, IntoPrecision, LrScheduler, PrecisionArg,
    BACKWARD_MESSAGE,
};
pub use module::FabricModule;
pub use optim::FusedAdamW;
pub use precision::Precision;
pub use scaler::{
    next_optimizer_id, AmpOptimizer, AtMinScale, GradScaler, GradScalerConfig, GradScalerState,
    ScalePolicy, ScalerOptimizer, StepOutcome,
};

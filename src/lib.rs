//! # tch-fabric
//!
//! Lightning Fabric's mixed-precision training for Rust programs built on [`tch`]: the same
//! precision values, a real autocast on CPU and CUDA, and PyTorch's own numerics, through
//! libtorch's native kernels.
//!
//! ## Quick start
//!
//! The Lightning Fabric loop, line for line: pick a precision with Lightning's spelling, set up
//! the model and optimizer, and train.
//!
//! ```
//! use tch::{nn, Device, Kind, Reduction, Tensor};
//! use tch_fabric::{Clip, Fabric, FusedAdamW};
//!
//! let fabric = Fabric::builder().precision("bf16-mixed").accelerator("cpu").build()?;
//! let mut vs = nn::VarStore::new(fabric.device());
//! let model = nn::linear(vs.root() / "fc", 8, 4, Default::default());
//! let optimizer = FusedAdamW::new(&vs, 1e-3)?;              // torch.optim.AdamW(fused=True)
//! let (model, mut optimizer) = fabric.setup(model, &mut vs, optimizer)?;
//!
//! let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
//! let y = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
//! for _ in 0..3 {
//!     optimizer.zero_grad()?;
//!     let out = x.apply(&model);                    // bfloat16 compute, float32 output
//!     let loss = {
//!         let _autocast = fabric.autocast()?;       // with fabric.autocast():
//!         out.mse_loss(&y, Reduction::Mean)
//!     };
//!     fabric.backward(&loss)?;
//!     fabric.clip_gradients(&mut optimizer, Clip::norm(1.0))?;
//!     let outcome = optimizer.step()?;              // Stepped, or Skipped { .. } under 16-mixed
//!     assert!(!outcome.is_skipped());
//! }
//! fabric.save(std::env::temp_dir().join("quickstart.safetensors"), &3u32)?;
//! # Ok::<(), tch_fabric::Error>(())
//! ```
//!
//! The building blocks work on their own: [`autocast`] is `torch.autocast` (CPU and CUDA),
//! [`GradScaler`] is `torch.amp.GradScaler`, bit for bit.
//!
//! ## What is where
//!
//! One module per concept; each uses only those listed before it.
//!
//! | module | what it holds |
//! |---|---|
//! | `error` | [`Error`], the crate's one error type |
//! | `ffi`, `native` | the C++ shim's declarations (the only `extern "C"`), and safe wrappers over them |
//! | `precision` | [`Precision`]: Lightning's values, parsed and queried |
//! | `default_dtype`, `autocast` | the process-wide default dtype ([`DefaultDtypeGuard`]); [`autocast`] scopes |
//! | [`ops`], `profile` | the `tch_fabric::` custom ops; [`count_ops`] |
//! | `params` | [`Params`] (an optimizer's parameters in PyTorch's order) and [`GradBatch`] (their gradients, fetched and grouped once per step) |
//! | `clip` | [`Clip`] and PyTorch's clipping functions |
//! | `optim` | the [`Optimizer`] trait, [`FusedAdamW`], [`FusedSgd`], PyTorch's default [`AdamW`], [`Adam`], [`Sgd`], [`TchOptimizer`] |
//! | `scaler` | [`GradScaler`]: its config, scale policy, state, and the passes over gradients |
//! | `checkpoint` | the checkpoint file, its key layout, and the checks before a load |
//! | `dist` | [`ProcessGroup`] (c10d), [`DistEnv`], [`DistributedSampler`] |
//! | `fabric` | the facade on top: [`Fabric`]; [`FabricModule`] (the precision's conversions around a model) and [`FabricOptimizer`]; [`FabricBuilder`] resolves options, environment and device |
//! | [`lr_scheduler`], `memory` | PyTorch's learning-rate schedulers and [`LrScheduler`]; [`memory_stats`], [`reset_peak_memory_stats`] |
//!
//! An AMP step goes one way: [`Params::grads`] fetches the gradients once; clipping, the
//! [`GradScaler`] and the [`Optimizer`] all work on that [`GradBatch`].
//!
//! Errors are one enum, [`Error`]; nothing here panics on bad input or a libtorch failure
//! (the one exception is tch's `Module::forward`, which cannot return an error: use
//! [`FabricModule::try_forward`]). No call changes process-wide libtorch state except those
//! named so ([`set_default_dtype`], [`DefaultDtypeGuard`],
//! [`FabricBuilder::process_wide_default_dtype`], seeding).

mod autocast;
mod checkpoint;
mod clip;
mod default_dtype;
mod dist;
mod error;
mod fabric;
mod ffi;
pub mod lr_scheduler;
mod memory;
mod native;
pub mod ops;
mod optim;
mod params;
mod precision;
mod profile;
mod scaler;

pub use autocast::{autocast, autocast_state, Autocast, AutocastGuard, AutocastState};
pub use checkpoint::LoadReport;
pub use clip::{clip_grad_norm, clip_grad_value, total_norm, Clip, ClipMethod, GradNorm};
pub use default_dtype::{default_dtype, set_default_dtype, DefaultDtypeGuard};
pub use dist::{
    DistEnv, DistributedSampler, ProcessGroup, ProcessGroupOptions, ReduceOp, BUCKET_BYTES,
    DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_TIMEOUT,
};
pub use error::{Error, Result};
pub use fabric::{
    Convert, Description, Fabric, FabricBuilder, FabricModule, FabricOptimizer, IntoPrecision,
    NoBackwardSync, PrecisionArg, BACKWARD_MESSAGE,
};
pub use lr_scheduler::LrScheduler;
pub use memory::{memory_stats, reset_peak_memory_stats, MemorySource, MemoryStats};
pub use optim::{Adam, AdamW, Amp, FusedAdamW, FusedSgd, Optimizer, ParamGroup, Sgd, TchOptimizer};
pub use params::{GradBatch, GradGroup, Params};
pub use precision::Precision;
pub use profile::{count_ops, OpCounts};
pub use scaler::{
    AtMinScale, GradScaler, GradScalerConfig, GradScalerState, ScalePolicy, StepOutcome,
};

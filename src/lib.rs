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
//! The building blocks work on their own: [`autocast()`] is `torch.autocast` (CPU and CUDA),
//! [`GradScaler`] is `torch.amp.GradScaler`, bit for bit.
//!
//! ## What is where
//!
//! The crate root holds what a training loop names: the [`Fabric`] with its builder, module and
//! optimizer, [`Precision`], [`Clip`], [`StepOutcome`], the optimizers, [`autocast()`], the
//! [`GradScaler`] and its config, [`memory_stats`], [`Error`]. Everything else is in a public
//! module named after its concept. Modules are listed in dependency order: each uses only
//! those above it.
//!
//! | module | what it holds |
//! |---|---|
//! | `error` | [`Error`], the crate's one error type |
//! | `dtype` | the one table of dtypes: tch's, c10's, safetensors', their names |
//! | `ffi`, `native/` | the C++ shim's declarations (the only `extern "C"`), and the safe wrappers over them, one file per subsystem: every `unsafe` of the crate is there |
//! | `device` | a tensor on the device a kernel needs |
//! | `precision` | [`Precision`]: Lightning's values, parsed and queried |
//! | [`default_dtype`], [`autocast`](mod@autocast) | the process-wide default dtype; autocast scopes |
//! | [`ops`], [`profile`] | the `tch_fabric::` custom ops; [`profile::count_ops`] |
//! | `params` | an optimizer's parameters in PyTorch's order, and their gradients fetched and grouped once per step (public in [`optim`]) |
//! | [`clip`] | [`Clip`] and PyTorch's clipping functions |
//! | [`optim`] | the [`Optimizer`] and [`optim::OptimizerState`] traits, [`FusedAdamW`], [`AdamW`], [`Adam`], [`FusedSgd`], [`Sgd`], [`TchOptimizer`] |
//! | [`scaler`] | [`GradScaler`]: its config, scale policy, state, and the passes over gradients |
//! | [`checkpoint`] | both checkpoint formats, their key layout, and the checks before a load |
//! | [`dist`] | [`dist::ProcessGroup`] (c10d), [`dist::DistEnv`], [`dist::DistributedSampler`] |
//! | [`memory`] | tensor bytes on the CPU and CUDA ([`memory_stats`]), the resident set, [`memory::MemoryReport`] |
//! | [`fabric`] | the facade on top: [`Fabric`], [`FabricBuilder`], [`FabricModule`], [`FabricOptimizer`] |
//! | [`lr_scheduler`] | PyTorch's learning-rate schedulers |
//!
//! An AMP step goes one way: the gradients are fetched once ([`optim::Params::grads`]) with
//! what the step needs to know of them; the [`GradScaler`] decides how the step runs (clipping
//! folded into it or not) and hands the [`optim::GradBatch`] to the [`Optimizer`].
//!
//! Errors are one enum, [`Error`]; nothing here panics on bad input or a libtorch failure
//! (the one exception is tch's `Module::forward`, which cannot return an error: use
//! [`FabricModule::try_forward`]). No call changes process-wide libtorch state except those
//! named so ([`default_dtype::set_default_dtype`], [`default_dtype::DefaultDtypeGuard`],
//! [`FabricBuilder::process_wide_default_dtype`], seeding, and the counting of CPU tensor
//! memory: [`memory::count_cpu_tensor_memory`], which a [`Fabric`] on the CPU switches on).

mod device;
mod dtype;
mod error;
mod ffi;
mod native;
mod params;
mod precision;

pub mod autocast;
pub mod checkpoint;
pub mod clip;
pub mod default_dtype;
pub mod dist;
pub mod fabric;
pub mod lr_scheduler;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod scaler;

pub use autocast::{autocast, Autocast, AutocastGuard};
pub use clip::Clip;
pub use error::{Error, Result};
pub use fabric::{Fabric, FabricBuilder, FabricModule, FabricOptimizer};
pub use memory::{memory_stats, reset_peak_memory_stats};
pub use optim::{Adam, AdamW, FusedAdamW, FusedSgd, Optimizer, Sgd, TchOptimizer};
pub use precision::Precision;
pub use scaler::{GradScaler, GradScalerConfig, StepOutcome};

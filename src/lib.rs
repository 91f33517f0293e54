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
//! let optimizer = FusedAdamW::new(&vs, 1e-3);               // torch.optim.AdamW(fused=True)
//! let (model, mut optimizer) = fabric.setup(model, &mut vs, optimizer)?;
//!
//! let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
//! let y = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
//! for _ in 0..3 {
//!     optimizer.zero_grad();
//!     let out = model.forward(&x);                  // bfloat16 compute, float32 output
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
//! ## What is here
//!
//! - [`Precision`]: `"64-true"`, `"32-true"`, `"16-mixed"`, `"bf16-mixed"`, `"16-true"`,
//!   `"bf16-true"` and Lightning's legacy spellings, with the dtypes each implies.
//! - [`Fabric`], [`FabricModule`], [`FabricOptimizer`]: Lightning Fabric's facade (setup,
//!   forward conversions, `autocast`, `backward`, `clip_gradients`, checkpoints).
//! - [`autocast`], [`Autocast`], [`AutocastGuard`]: `torch.autocast` for CPU and CUDA, nesting
//!   and panic-safe.
//! - [`DefaultDtypeGuard`]: `torch.set_default_dtype` as a scope.
//! - [`GradScaler`]: `torch.amp.GradScaler` with the same bits, plus opt-in safety
//!   ([`ScalePolicy`], [`StepOutcome`], skip counters, bfloat16 gradients on CUDA).
//! - [`FusedAdamW`]: `torch.optim.AdamW(fused=True)`, AMP-aware, state saved in checkpoints.
//! - [`FusedSgd`]: `torch.optim.SGD(fused=True)`, likewise.
//! - [`clip_grad_norm`], [`clip_grad_value`]: PyTorch's clipping with PyTorch's rounding.
//! - [`LrScheduler`]: a schedule that does not advance on skipped steps.
//! - Data-parallel training on several processes (DDP) over libtorch's c10d: `fabric run
//!   --devices N` starts the ranks, [`Fabric`] joins their [`ProcessGroup`] (Gloo), broadcasts
//!   the weights, averages gradients in coalesced buckets and keeps every rank's loss scale
//!   equal; [`DistributedSampler`] splits the data.
//!
//! Errors are one enum, [`Error`]; nothing here panics on bad input.

mod autocast;
mod checkpoint;
mod clip;
mod default_dtype;
mod dist;
mod error;
mod fabric;
mod ffi;
mod memory;
mod module;
pub mod ops;
mod optim;
mod precision;
mod profile;
mod scaler;

pub use autocast::{autocast, autocast_state, Autocast, AutocastGuard, AutocastState};
pub use clip::{clip_grad_norm, clip_grad_value, total_norm, Clip};
pub use default_dtype::{default_dtype, set_default_dtype, DefaultDtypeGuard};
pub use dist::{
    DistEnv, DistributedSampler, ProcessGroup, ProcessGroupOptions, ReduceOp, BUCKET_BYTES,
    DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_TIMEOUT,
};
pub use error::{Error, Result};
pub use fabric::{
    Fabric, FabricBuilder, FabricOptimizer, IntoPrecision, LrScheduler, PrecisionArg,
    BACKWARD_MESSAGE,
};
pub use memory::{memory_stats, MemorySource, MemoryStats};
pub use module::FabricModule;
pub use optim::{FusedAdamW, FusedSgd, IntoTrainOptimizer, TrainOptimizer};
pub use precision::Precision;
pub use profile::{count_ops, OpCounts};
pub use scaler::{
    next_optimizer_id, AmpOptimizer, AtMinScale, GradScaler, GradScalerConfig, GradScalerState,
    ScalePolicy, ScalerOptimizer, StepOutcome,
};

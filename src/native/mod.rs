//! Safe wrappers over the C++ shim (`ffi.rs`), one file per subsystem: tensor lists become
//! pointer arrays, results become tch tensors, and every failure is an [`Error::Native`]
//! naming the operation. Nothing else in the crate calls into `ffi` or holds `unsafe` code.
//!
//! | file | what it wraps |
//! |---|---|
//! | `tensor` | tensor metadata in one call, gradients fetched and dropped |
//! | `kernels` | the gradient passes: AMP unscale, total norm, `_foreach_*`, the `tch_fabric::` ops |
//! | `optim` | the optimizer kernels (`_fused_adamw_`, `_fused_sgd_`, PyTorch's for-loop steps) |
//! | `autocast` | autocast scopes and the process-wide default dtype |
//! | `device` | loading CUDA, the CUDA caching allocator's statistics |
//! | `profile` | counting the ops a piece of code calls |
//! | `dist` | c10d process groups and DDP Reducers |
//! | `ivalue` | torch.save archives and the values libtorch's pickler reads and writes |
//! | `process` | asking the OS whether a process is alive |
//!
//! Every shim call goes through [`call`], which counts it per thread ([`calls`]), so that
//! [`crate::profile::count_ops`] can say how often a step crosses into C++.
mod autocast;
mod device;
mod dist;
mod ivalue;
mod kernels;
mod optim;
mod process;
mod profile;
mod tensor;

pub(crate) use autocast::{
    autocast_available, autocast_enter, autocast_exit, autocast_get, default_dtype_get,
    default_dtype_set, SavedAutocast,
};
pub(crate) use device::{
    cpu_counting_enable, cpu_counting_reset_peak, cpu_counting_stats, cuda_memory_stats,
    cuda_reset_peak_memory_stats, load_cuda,
};
pub(crate) use dist::{PgConfig, RawProcessGroup, RawReduceOp, RawReducer};
pub(crate) use ivalue::{torch_load, torch_save, PyValue};
pub(crate) use kernels::{
    amp_unscale, clip_divisor, foreach_add_scalar, foreach_clamp, foreach_mul_tensor,
    foreach_sub_tensor, grad_total_norm, op_has_kernel, unscale_sumsq,
};
pub(crate) use optim::{
    adam_for_loop, adamw_folded, adamw_rounded, fused_adamw, fused_sgd, sgd_for_loop, sgd_rounded,
    stochastic_round, AdamHyper, AdamLists, RoundMode, Rounded, SgdHyper,
};
pub(crate) use process::may_be_alive;
pub(crate) use profile::{op_count_begin, op_count_end};
pub(crate) use tensor::{collect_grads, grads_set_to_none, meta, metas, shape, Meta};

use crate::error::Result;
use crate::ffi;
use std::cell::Cell;
use std::ffi::c_char;
use tch::Tensor;

thread_local! {
    /// Shim calls made by this thread.
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Shim calls made by the calling thread so far.
pub(crate) fn calls() -> u64 {
    CALLS.with(Cell::get)
}

/// Counts one shim call and turns what it returned into a `Result`: `f` makes the call (in an
/// `unsafe` block at the call site, which states why it is sound).
fn call(op: &'static str, f: impl FnOnce() -> *mut c_char) -> Result<()> {
    CALLS.with(|c| c.set(c.get() + 1));
    ffi::check(op, f())
}

/// The `at::Tensor*` of a tch tensor.
fn ptr(t: &Tensor) -> ffi::CTensor {
    // The shim only reads through this pointer or mutates the tensor's storage, never the
    // `at::Tensor` handle itself, which is what tch's `&Tensor` promises.
    t.as_ptr() as ffi::CTensor
}

/// The `at::Tensor*` of every tensor in `list`, for the shim's list arguments.
fn ptrs<'a>(list: impl IntoIterator<Item = &'a Tensor>) -> Vec<ffi::CTensor> {
    list.into_iter().map(ptr).collect()
}

/// Wraps a tensor the shim allocated with `new at::Tensor`.
///
/// # Safety
///
/// `t` is null or a fresh `at::Tensor*` nobody else owns.
unsafe fn owned(op: &'static str, t: ffi::CTensor) -> Result<Tensor> {
    if t.is_null() {
        return Err(crate::error::Error::native(
            op,
            "the shim returned no tensor",
        ));
    }
    Ok(Tensor::from_ptr(t))
}

//! The only place with `extern "C"`: the declarations of the C++ shim in `csrc/tch_fabric.h`,
//! the structs it shares with Rust (their layout checked against the C++ compiler's by a test),
//! and the check that turns its error strings into [`Error::Native`]. The safe wrappers are in
//! `native/`.
use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr};

/// The `at::Tensor*` that a tch `Tensor` wraps.
pub(crate) type CTensor = *mut torch_sys::C_tensor;

/// Mirror of `tf_autocast_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AutocastState {
    pub enabled: i32,
    pub dtype: i32,
    pub cache_enabled: i32,
}

/// Mirror of `tf_ivalue_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct IValueInfo {
    pub tag: i32,
    pub int_value: i64,
    pub double_value: f64,
    pub len: usize,
}

/// The `c10::IValue*` of the shim's torch.save functions.
pub(crate) type CIValue = *mut c_void;

/// `TF_IV_*`: the kinds of value a torch.save file holds.
pub(crate) mod iv_tag {
    pub const NONE: i32 = 0;
    pub const BOOL: i32 = 1;
    pub const INT: i32 = 2;
    pub const DOUBLE: i32 = 3;
    pub const STRING: i32 = 4;
    pub const TENSOR: i32 = 5;
    pub const LIST: i32 = 6;
    pub const TUPLE: i32 = 7;
    pub const DICT: i32 = 8;
}

/// Mirror of `tf_tensor_meta`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorMeta {
    pub defined: i32,
    pub device_type: i32,
    pub device_index: i32,
    pub dtype: i32,
    pub sparse: i32,
    pub contiguous: i32,
    pub numel: i64,
    pub impl_: usize,
    pub data: usize,
}

extern "C" {
    pub(crate) fn tf_free_error(err: *mut c_char);
    pub(crate) fn tf_tensor_meta_list(
        tensors: *const CTensor,
        n: usize,
        out: *mut TensorMeta,
    ) -> *mut c_char;
    pub(crate) fn tf_collect_grads(
        params: *const CTensor,
        n: usize,
        grads: *mut CTensor,
        meta: *mut TensorMeta,
        param_meta: *mut TensorMeta,
    ) -> *mut c_char;
    #[cfg(test)]
    pub(crate) fn tf_struct_layouts(out: *mut usize, n: usize) -> *mut c_char;
    pub(crate) fn tf_load_cuda(loaded: *mut i32) -> *mut c_char;
    pub(crate) fn tf_op_has_kernel(
        name: *const c_char,
        device_type: i32,
        out: *mut i32,
    ) -> *mut c_char;
    pub(crate) fn tf_cuda_memory_stats(device_index: i32, out: *mut i64) -> *mut c_char;
    pub(crate) fn tf_cuda_reset_peak_memory_stats(device_index: i32) -> *mut c_char;
    pub(crate) fn tf_cpu_counting_enable() -> *mut c_char;
    pub(crate) fn tf_cpu_counting_stats(out: *mut i64) -> *mut c_char;
    pub(crate) fn tf_cpu_counting_reset_peak() -> *mut c_char;
    pub(crate) fn tf_autocast_available(device_type: i32, out: *mut i32) -> *mut c_char;
    pub(crate) fn tf_autocast_get(device_type: i32, out: *mut AutocastState) -> *mut c_char;
    pub(crate) fn tf_autocast_enter(
        device_type: i32,
        dtype: i32,
        enabled: i32,
        cache_enabled: i32,
        saved: *mut AutocastState,
    ) -> *mut c_char;
    pub(crate) fn tf_autocast_exit(device_type: i32, saved: *const AutocastState) -> *mut c_char;
    pub(crate) fn tf_default_dtype_get(dtype: *mut i32) -> *mut c_char;
    pub(crate) fn tf_default_dtype_set(dtype: i32) -> *mut c_char;
    pub(crate) fn tf_amp_foreach_non_finite_check_and_unscale(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_grad_total_norm(
        grads: *const CTensor,
        group_sizes: *const usize,
        n_groups: usize,
        norm_type: f64,
        out: *mut CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_fused_adamw(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        max_exp_avg_sqs: *const CTensor,
        state_steps: *const CTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: i32,
        maximize: i32,
        grad_scale: CTensor,
        found_inf: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_fused_sgd(
        params: *const CTensor,
        grads: *const CTensor,
        momentum_buffers: *const CTensor,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        dampening: f64,
        nesterov: i32,
        maximize: i32,
        is_first_step: i32,
        grad_scale: CTensor,
        found_inf: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_adam_for_loop(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        max_exp_avg_sqs: *const CTensor,
        state_steps: *const CTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: i32,
        maximize: i32,
        decoupled: i32,
        foreach: i32,
    ) -> *mut c_char;
    pub(crate) fn tf_sgd_for_loop(
        params: *const CTensor,
        grads: *const CTensor,
        momentum_buffers: *const CTensor,
        fresh: *const i32,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        dampening: f64,
        nesterov: i32,
        maximize: i32,
        foreach: i32,
    ) -> *mut c_char;
    pub(crate) fn tf_foreach_add_scalar(
        tensors: *const CTensor,
        n: usize,
        value: f64,
    ) -> *mut c_char;
    pub(crate) fn tf_foreach_sub_tensor(
        tensors: *const CTensor,
        n: usize,
        other: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_foreach_mul_tensor(
        tensors: *const CTensor,
        n: usize,
        other: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_foreach_clamp(
        tensors: *const CTensor,
        n: usize,
        min: f64,
        max: f64,
    ) -> *mut c_char;
    pub(crate) fn tf_grads_set_to_none(params: *const CTensor, n: usize) -> *mut c_char;
    pub(crate) fn tf_unscale_sumsq(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
        unscale: i32,
        out: *mut CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_adamw_folded(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        state_steps: *const CTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        maximize: i32,
        divisor: CTensor,
        found_inf: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_adamw_rounded(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        max_exp_avg_sqs: *const CTensor,
        n_max: usize,
        kahan_comps: *const CTensor,
        n_comps: usize,
        state_steps: *const CTensor,
        positions: *const i64,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        maximize: i32,
        mode: i64,
        seed: u64,
        grad_scale: CTensor,
        found_inf: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_sgd_rounded(
        params: *const CTensor,
        grads: *const CTensor,
        momentum_buffers: *const CTensor,
        n_buffers: usize,
        kahan_comps: *const CTensor,
        n_comps: usize,
        state_steps: *const CTensor,
        n_steps: usize,
        positions: *const i64,
        n: usize,
        lr: f64,
        weight_decay: f64,
        momentum: f64,
        dampening: f64,
        nesterov: i32,
        maximize: i32,
        is_first_step: i32,
        mode: i64,
        seed: u64,
        grad_scale: CTensor,
        found_inf: CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_stochastic_round(
        x: CTensor,
        seed: u64,
        position: u32,
        step: u32,
        out: *mut CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_clip_divisor(
        sumsq: CTensor,
        scale: CTensor,
        max_norm: f64,
        norm: *mut CTensor,
        divisor: *mut CTensor,
    ) -> *mut c_char;
    pub(crate) fn tf_op_count_begin() -> *mut c_char;
    pub(crate) fn tf_op_count_end(report: *mut *mut c_char) -> *mut c_char;
    pub(crate) fn tf_pg_new(
        backend: *const c_char,
        master_addr: *const c_char,
        master_port: i32,
        rank: i32,
        world_size: i32,
        rendezvous_timeout_ms: i64,
        timeout_ms: i64,
        listen_fd: i32,
        agent_store_attempt: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn tf_pg_free(pg: *mut c_void);
    pub(crate) fn tf_pg_all_reduce(pg: *mut c_void, tensor: CTensor, op: i32) -> *mut c_char;
    pub(crate) fn tf_pg_broadcast(pg: *mut c_void, tensor: CTensor, root: i32) -> *mut c_char;
    pub(crate) fn tf_pg_barrier(pg: *mut c_void) -> *mut c_char;
    pub(crate) fn tf_pg_bucket_all_reduces(pg: *mut c_void) -> u64;
    pub(crate) fn tf_pg_missing_ranks(pg: *mut c_void, out: *mut *mut c_char) -> *mut c_char;
    pub(crate) fn tf_reducer_new(
        pg: *mut c_void,
        params: *const CTensor,
        n: usize,
        names: *const *const c_char,
        bucket_bytes: i64,
        find_unused: i32,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn tf_reducer_prepare(
        reducer: *mut c_void,
        outputs: *const CTensor,
        n: usize,
    ) -> *mut c_char;
    pub(crate) fn tf_reducer_free(reducer: *mut c_void);
    pub(crate) fn tf_ivalue_free(v: CIValue);
    pub(crate) fn tf_free_buffer(data: *mut c_char);
    pub(crate) fn tf_torch_load(
        path: *const c_char,
        pickle: *const c_char,
        len: usize,
        out: *mut CIValue,
        records: *mut *mut c_char,
        records_len: *mut usize,
    ) -> *mut c_char;
    pub(crate) fn tf_torch_save(value: CIValue, path: *const c_char) -> *mut c_char;
    pub(crate) fn tf_ivalue_inspect(value: CIValue, out: *mut IValueInfo) -> *mut c_char;
    pub(crate) fn tf_ivalue_string(value: CIValue, data: *mut *const c_char) -> *mut c_char;
    pub(crate) fn tf_ivalue_tensor(value: CIValue, out: *mut CTensor) -> *mut c_char;
    pub(crate) fn tf_ivalue_item(value: CIValue, i: usize, out: *mut CIValue) -> *mut c_char;
    pub(crate) fn tf_ivalue_entry(
        value: CIValue,
        i: usize,
        key: *mut CIValue,
        item: *mut CIValue,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tf_ivalue_new(
        tag: i32,
        int_value: i64,
        double_value: f64,
        text: *const c_char,
        len: usize,
        tensor: CTensor,
        items: *const CIValue,
        n: usize,
        out: *mut CIValue,
    ) -> *mut c_char;
}

/// Turns the shim's return value into a `Result`, freeing the message.
pub(crate) fn check(op: &'static str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from strdup that we own.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { tf_free_error(err) };
    Err(Error::native(op, &message))
}

/// Takes ownership of a string the shim returned through an out-parameter.
///
/// # Safety
///
/// `s` is null or a NUL-terminated string from strdup that nobody else frees.
pub(crate) unsafe fn take_string(s: *mut c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    let text = CStr::from_ptr(s).to_string_lossy().into_owned();
    tf_free_error(s);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The `#[repr(C)]` mirrors have the C++ compiler's layout of the shim's structs: sizes and
    /// field offsets, as `tf_struct_layouts` reports them from `sizeof`/`offsetof`.
    #[test]
    fn mirrors_match_the_header() {
        let ours = [
            size_of::<AutocastState>(),
            offset_of!(AutocastState, enabled),
            offset_of!(AutocastState, dtype),
            offset_of!(AutocastState, cache_enabled),
            size_of::<TensorMeta>(),
            offset_of!(TensorMeta, defined),
            offset_of!(TensorMeta, device_type),
            offset_of!(TensorMeta, device_index),
            offset_of!(TensorMeta, dtype),
            offset_of!(TensorMeta, sparse),
            offset_of!(TensorMeta, contiguous),
            offset_of!(TensorMeta, numel),
            offset_of!(TensorMeta, impl_),
            offset_of!(TensorMeta, data),
            size_of::<IValueInfo>(),
            offset_of!(IValueInfo, tag),
            offset_of!(IValueInfo, int_value),
            offset_of!(IValueInfo, double_value),
            offset_of!(IValueInfo, len),
        ];
        let mut theirs = [usize::MAX; 19];
        check("layouts", unsafe {
            tf_struct_layouts(theirs.as_mut_ptr(), theirs.len())
        })
        .unwrap();
        assert_eq!(ours, theirs);
        // Asking for more entries than the shim knows is refused, not read past.
        let mut more = [0usize; 20];
        assert!(check("layouts", unsafe {
            tf_struct_layouts(more.as_mut_ptr(), more.len())
        })
        .is_err());
    }
}

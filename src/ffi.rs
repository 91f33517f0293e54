//! The only place with `extern "C"`: declarations of the C++ shim in `csrc/tch_fabric.h`, and
//! the helper that turns its error strings into [`Error::Native`].
use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use tch::Tensor;

/// The `at::Tensor*` that a tch [`Tensor`] wraps.
pub(crate) type CTensor = *mut torch_sys::C_tensor;

/// Mirror of `tf_autocast_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AutocastState {
    pub enabled: i32,
    pub dtype: i32,
    pub cache_enabled: i32,
}

extern "C" {
    fn tf_free_error(err: *mut c_char);
    fn tf_autocast_available(device_type: i32, out: *mut i32) -> *mut c_char;
    fn tf_autocast_get(device_type: i32, out: *mut AutocastState) -> *mut c_char;
    fn tf_autocast_enter(
        device_type: i32,
        dtype: i32,
        enabled: i32,
        cache_enabled: i32,
        saved: *mut AutocastState,
    ) -> *mut c_char;
    fn tf_autocast_exit(device_type: i32, saved: *const AutocastState) -> *mut c_char;
    fn tf_default_dtype_get(dtype: *mut i32) -> *mut c_char;
    fn tf_default_dtype_set(dtype: i32) -> *mut c_char;
    fn tf_amp_foreach_non_finite_check_and_unscale(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
    ) -> *mut c_char;
    fn tf_fused_adamw(
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
    fn tf_fused_sgd(
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
    fn tf_foreach_add_scalar(tensors: *const CTensor, n: usize, value: f64) -> *mut c_char;
    fn tf_foreach_sub_tensor(tensors: *const CTensor, n: usize, other: CTensor) -> *mut c_char;
    fn tf_grads_set_to_none(params: *const CTensor, n: usize) -> *mut c_char;
    fn tf_unscale_sumsq(
        grads: *const CTensor,
        n: usize,
        found_inf: CTensor,
        inv_scale: CTensor,
        unscale: i32,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn tf_adamw_folded(
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
    fn tf_clip_divisor(
        found_inf: CTensor,
        sumsq: CTensor,
        scale: CTensor,
        max_norm: f64,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn tf_grad_total_norm(
        grads: *const CTensor,
        n: usize,
        norm_type: f64,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn tf_op_count_begin() -> *mut c_char;
    fn tf_op_count_end(report: *mut *mut c_char) -> *mut c_char;
    fn tf_pg_new(
        backend: *const c_char,
        master_addr: *const c_char,
        master_port: i32,
        rank: i32,
        world_size: i32,
        rendezvous_timeout_ms: i64,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn tf_pg_free(pg: *mut c_void);
    fn tf_pg_all_reduce(pg: *mut c_void, tensor: CTensor, op: i32) -> *mut c_char;
    fn tf_pg_broadcast(pg: *mut c_void, tensor: CTensor, root: i32) -> *mut c_char;
    fn tf_pg_barrier(pg: *mut c_void) -> *mut c_char;
}

/// Turns the shim's return value into a `Result`, freeing the message.
fn check(op: &'static str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from strdup that we own.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { tf_free_error(err) };
    Err(Error::Native { op, message })
}

fn ptr(t: &Tensor) -> CTensor {
    // The shim only reads through this pointer or mutates the tensor's storage, never the
    // `at::Tensor` handle itself, which is what tch's `&Tensor` promises.
    t.as_ptr() as CTensor
}

pub(crate) fn autocast_available(device_type: i32) -> Result<bool> {
    let mut out = 0;
    check("autocast_available", unsafe {
        tf_autocast_available(device_type, &mut out)
    })?;
    Ok(out != 0)
}

pub(crate) fn autocast_get(device_type: i32) -> Result<AutocastState> {
    let mut out = AutocastState::default();
    check("autocast_get", unsafe {
        tf_autocast_get(device_type, &mut out)
    })?;
    Ok(out)
}

pub(crate) fn autocast_enter(
    device_type: i32,
    dtype: i32,
    enabled: bool,
    cache_enabled: bool,
) -> Result<AutocastState> {
    let mut saved = AutocastState::default();
    check("autocast_enter", unsafe {
        tf_autocast_enter(
            device_type,
            dtype,
            i32::from(enabled),
            i32::from(cache_enabled),
            &mut saved,
        )
    })?;
    Ok(saved)
}

pub(crate) fn autocast_exit(device_type: i32, saved: &AutocastState) -> Result<()> {
    check("autocast_exit", unsafe {
        tf_autocast_exit(device_type, saved)
    })
}

pub(crate) fn default_dtype_get() -> Result<i32> {
    let mut out = 0;
    check("default_dtype_get", unsafe {
        tf_default_dtype_get(&mut out)
    })?;
    Ok(out)
}

pub(crate) fn default_dtype_set(dtype: i32) -> Result<()> {
    check("default_dtype_set", unsafe { tf_default_dtype_set(dtype) })
}

pub(crate) fn amp_foreach_non_finite_check_and_unscale(
    grads: &[&Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
) -> Result<()> {
    let ptrs: Vec<CTensor> = grads.iter().map(|t| ptr(t)).collect();
    check("_amp_foreach_non_finite_check_and_unscale_", unsafe {
        tf_amp_foreach_non_finite_check_and_unscale(
            ptrs.as_ptr(),
            ptrs.len(),
            ptr(found_inf),
            ptr(inv_scale),
        )
    })
}

pub(crate) fn grad_total_norm(grads: &[&Tensor], norm_type: f64) -> Result<Tensor> {
    let ptrs: Vec<CTensor> = grads.iter().map(|t| ptr(t)).collect();
    let mut out: CTensor = std::ptr::null_mut();
    check("get_total_norm", unsafe {
        tf_grad_total_norm(ptrs.as_ptr(), ptrs.len(), norm_type, &mut out)
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`, which tch now owns.
    Ok(unsafe { Tensor::from_ptr(out) })
}

fn ptrs(list: &[&Tensor]) -> Vec<CTensor> {
    list.iter().map(|t| ptr(t)).collect()
}

/// The lists of one `_fused_adamw_` call; all of length n (`max_exp_avg_sqs` only read with
/// amsgrad).
pub(crate) struct AdamLists<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<&'a Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
    pub max_exp_avg_sqs: Vec<&'a Tensor>,
    pub steps: Vec<&'a Tensor>,
}

impl AdamLists<'_> {
    /// Every list has one entry per parameter (`max_exp_avg_sqs` only when `with_max`).
    fn check_lengths(&self, op: &'static str, with_max: bool) -> Result<()> {
        let n = self.params.len();
        let lens = [
            self.grads.len(),
            self.exp_avgs.len(),
            self.exp_avg_sqs.len(),
            self.steps.len(),
        ];
        if lens.iter().any(|&k| k != n) || (with_max && self.max_exp_avg_sqs.len() != n) {
            return Err(Error::Native {
                op,
                message: "tensor lists of different lengths".into(),
            });
        }
        Ok(())
    }
}

/// Hyper-parameters of one `_fused_adamw_` call.
#[derive(Debug, Clone)]
pub(crate) struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub maximize: bool,
}

pub(crate) fn fused_adamw(
    l: &AdamLists<'_>,
    h: &AdamHyper,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = l.params.len();
    l.check_lengths("_fused_adamw_", h.amsgrad)?;
    let (p, g, m, v, vm, s) = (
        ptrs(&l.params),
        ptrs(&l.grads),
        ptrs(&l.exp_avgs),
        ptrs(&l.exp_avg_sqs),
        ptrs(&l.max_exp_avg_sqs),
        ptrs(&l.steps),
    );
    check("_fused_adamw_", unsafe {
        tf_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            vm.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            i32::from(h.amsgrad),
            i32::from(h.maximize),
            grad_scale.map_or(std::ptr::null_mut(), ptr),
            found_inf.map_or(std::ptr::null_mut(), ptr),
        )
    })
}

/// Hyper-parameters of one `_fused_sgd_` call.
#[derive(Debug, Clone)]
pub(crate) struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

/// `torch._fused_sgd_`; `buffers` has one entry per parameter when momentum is non-zero.
pub(crate) fn fused_sgd(
    params: &[&Tensor],
    grads: &[&Tensor],
    buffers: &[&Tensor],
    h: &SgdHyper,
    is_first_step: bool,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || (h.momentum != 0.0 && buffers.len() != n) {
        return Err(Error::Native {
            op: "_fused_sgd_",
            message: "tensor lists of different lengths".into(),
        });
    }
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(buffers));
    check("_fused_sgd_", unsafe {
        tf_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n,
            h.weight_decay,
            h.momentum,
            h.lr,
            h.dampening,
            i32::from(h.nesterov),
            i32::from(h.maximize),
            i32::from(is_first_step),
            grad_scale.map_or(std::ptr::null_mut(), ptr),
            found_inf.map_or(std::ptr::null_mut(), ptr),
        )
    })
}

pub(crate) fn unscale_sumsq(
    grads: &[&Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
    unscale: bool,
) -> Result<Tensor> {
    let p = ptrs(grads);
    let mut out: CTensor = std::ptr::null_mut();
    check("tch_fabric::unscale_sumsq_", unsafe {
        tf_unscale_sumsq(
            p.as_ptr(),
            p.len(),
            ptr(found_inf),
            ptr(inv_scale),
            i32::from(unscale),
            &mut out,
        )
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`, which tch now owns.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `tch_fabric::adamw_folded_` (float32 CPU, no AMSGrad): AdamW on gradients still
/// multiplied by `divisor`, writing only the parameters and moments.
pub(crate) fn adamw_folded(
    l: &AdamLists<'_>,
    h: &AdamHyper,
    divisor: &Tensor,
    found_inf: &Tensor,
) -> Result<()> {
    let n = l.params.len();
    l.check_lengths("tch_fabric::adamw_folded_", false)?;
    if h.amsgrad {
        return Err(Error::Native {
            op: "tch_fabric::adamw_folded_",
            message: "AMSGrad is not supported by this kernel".into(),
        });
    }
    let (p, g, m, v, s) = (
        ptrs(&l.params),
        ptrs(&l.grads),
        ptrs(&l.exp_avgs),
        ptrs(&l.exp_avg_sqs),
        ptrs(&l.steps),
    );
    check("tch_fabric::adamw_folded_", unsafe {
        tf_adamw_folded(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            i32::from(h.maximize),
            ptr(divisor),
            ptr(found_inf),
        )
    })
}

pub(crate) fn clip_divisor(
    found_inf: &Tensor,
    sumsq: &Tensor,
    scale: &Tensor,
    max_norm: f64,
) -> Result<Tensor> {
    let mut out: CTensor = std::ptr::null_mut();
    check("tch_fabric::clip_divisor", unsafe {
        tf_clip_divisor(ptr(found_inf), ptr(sumsq), ptr(scale), max_norm, &mut out)
    })?;
    // SAFETY: as above.
    Ok(unsafe { Tensor::from_ptr(out) })
}

pub(crate) fn grads_set_to_none(params: &[&Tensor]) -> Result<()> {
    let p = ptrs(params);
    check("zero_grad", unsafe {
        tf_grads_set_to_none(p.as_ptr(), p.len())
    })
}

pub(crate) fn foreach_add_scalar(tensors: &[&Tensor], value: f64) -> Result<()> {
    let p = ptrs(tensors);
    check("_foreach_add_", unsafe {
        tf_foreach_add_scalar(p.as_ptr(), p.len(), value)
    })
}

pub(crate) fn foreach_sub_tensor(tensors: &[&Tensor], other: &Tensor) -> Result<()> {
    let p = ptrs(tensors);
    check("_foreach_sub_", unsafe {
        tf_foreach_sub_tensor(p.as_ptr(), p.len(), ptr(other))
    })
}

pub(crate) fn op_count_begin() -> Result<()> {
    check("op_count_begin", unsafe { tf_op_count_begin() })
}

/// The report of `tf_op_count_end`: "name\tall\ttop_level" lines.
pub(crate) fn op_count_end() -> Result<String> {
    let mut report: *mut c_char = std::ptr::null_mut();
    check("op_count_end", unsafe { tf_op_count_end(&mut report) })?;
    // SAFETY: on success the shim stored a strdup'ed string that we own.
    let text = unsafe { CStr::from_ptr(report) }
        .to_string_lossy()
        .into_owned();
    unsafe { tf_free_error(report) };
    Ok(text)
}

/// c10's `ScalarType` number of a tch [`tch::Kind`] (tch keeps its own conversion private).
pub(crate) fn c10_scalar_type(kind: tch::Kind) -> i32 {
    use tch::Kind::*;
    match kind {
        Uint8 => 0,
        Int8 => 1,
        Int16 => 2,
        Int => 3,
        Int64 => 4,
        Half => 5,
        Float => 6,
        Double => 7,
        ComplexHalf => 8,
        ComplexFloat => 9,
        ComplexDouble => 10,
        Bool => 11,
        QInt8 => 12,
        QUInt8 => 13,
        QInt32 => 14,
        BFloat16 => 15,
        // Kinds the shim never receives (float8 and friends) map to an invalid number, which
        // the shim rejects with a message instead of misreading.
        _ => -1,
    }
}

/// The tch [`tch::Kind`] of a c10 `ScalarType` number, for the floating types the shim returns.
pub(crate) fn kind_from_c10(scalar_type: i32) -> Option<tch::Kind> {
    use tch::Kind::*;
    Some(match scalar_type {
        5 => Half,
        6 => Float,
        7 => Double,
        15 => BFloat16,
        _ => return None,
    })
}

/// c10 `DeviceType` numbers used by the shim.
pub(crate) const DEVICE_TYPE_CPU: i32 = 0;
/// c10 `DeviceType` number of CUDA.
pub(crate) const DEVICE_TYPE_CUDA: i32 = 1;

/// How the shim's all-reduce combines values (`tf_pg_all_reduce`'s `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawReduceOp {
    Sum = 0,
    Max = 1,
}

/// The rendezvous and timeouts of one [`RawProcessGroup::new`].
#[derive(Debug, Clone)]
pub(crate) struct PgConfig<'a> {
    pub backend: &'a str,
    pub master_addr: &'a str,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous_timeout_ms: i64,
    pub timeout_ms: i64,
}

/// An owned c10d process group from the shim (`tf_process_group`), freed on drop.
#[derive(Debug)]
pub(crate) struct RawProcessGroup(*mut c_void);

impl RawProcessGroup {
    pub(crate) fn new(c: &PgConfig<'_>) -> Result<Self> {
        let cstr = |what: &str, v: &str| {
            CString::new(v).map_err(|_| Error::InvalidConfig {
                field: if what == "backend" {
                    "backend"
                } else {
                    "MASTER_ADDR"
                },
                value: v.escape_debug().to_string(),
                allowed: "a string without NUL bytes",
            })
        };
        let backend = cstr("backend", c.backend)?;
        let addr = cstr("addr", c.master_addr)?;
        let int = |field: &'static str, v: usize| {
            i32::try_from(v).map_err(|_| Error::InvalidConfig {
                field,
                value: v.to_string(),
                allowed: "at most 2147483647",
            })
        };
        let mut out: *mut c_void = std::ptr::null_mut();
        check("c10d process group", unsafe {
            tf_pg_new(
                backend.as_ptr(),
                addr.as_ptr(),
                i32::from(c.master_port),
                int("RANK", c.rank)?,
                int("WORLD_SIZE", c.world_size)?,
                c.rendezvous_timeout_ms,
                c.timeout_ms,
                &mut out,
            )
        })?;
        Ok(RawProcessGroup(out))
    }

    pub(crate) fn all_reduce(&self, t: &Tensor, op: RawReduceOp) -> Result<()> {
        check("all_reduce", unsafe {
            tf_pg_all_reduce(self.0, ptr(t), op as i32)
        })
    }

    pub(crate) fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let root = i32::try_from(root).map_err(|_| Error::InvalidConfig {
            field: "broadcast root",
            value: root.to_string(),
            allowed: "a rank of the group",
        })?;
        check("broadcast", unsafe {
            tf_pg_broadcast(self.0, ptr(t), root)
        })
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        check("barrier", unsafe { tf_pg_barrier(self.0) })
    }
}

impl Drop for RawProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tf_pg_new and is freed exactly once; the shim swallows
        // any exception thrown while closing sockets.
        unsafe { tf_pg_free(self.0) }
    }
}

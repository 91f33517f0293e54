//! Safe wrappers over the C++ shim (`ffi.rs`): tensor lists become pointer arrays, results
//! become tch tensors, and every failure is an [`Error::Native`] naming the operation. Nothing
//! else in the crate calls into `ffi`.
use crate::error::{Error, Result};
use crate::ffi::{self, check, CTensor, TensorMeta};
use std::ffi::{c_char, c_void, CString};
use tch::{Device, Kind, Tensor};

fn ptr(t: &Tensor) -> CTensor {
    // The shim only reads through this pointer or mutates the tensor's storage, never the
    // `at::Tensor` handle itself, which is what tch's `&Tensor` promises.
    t.as_ptr() as CTensor
}

fn ptrs<'a>(list: impl IntoIterator<Item = &'a Tensor>) -> Vec<CTensor> {
    list.into_iter().map(ptr).collect()
}

/// Wraps a tensor the shim allocated with `new at::Tensor`.
///
/// # Safety
///
/// `t` is null or a fresh `at::Tensor*` nobody else owns.
unsafe fn owned(op: &'static str, t: CTensor) -> Result<Tensor> {
    if t.is_null() {
        return Err(Error::native(op, "the shim returned no tensor"));
    }
    Ok(Tensor::from_ptr(t))
}

/// c10's `ScalarType` number of a tch [`Kind`] (tch keeps its own conversion private).
pub(crate) fn c10_scalar_type(kind: Kind) -> i32 {
    use Kind::*;
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

/// The tch [`Kind`] of a c10 `ScalarType` number.
pub(crate) fn kind_from_c10(scalar_type: i32) -> Option<Kind> {
    use Kind::*;
    Some(match scalar_type {
        0 => Uint8,
        1 => Int8,
        2 => Int16,
        3 => Int,
        4 => Int64,
        5 => Half,
        6 => Float,
        7 => Double,
        8 => ComplexHalf,
        9 => ComplexFloat,
        10 => ComplexDouble,
        11 => Bool,
        12 => QInt8,
        13 => QUInt8,
        14 => QInt32,
        15 => BFloat16,
        _ => return None,
    })
}

/// c10 `DeviceType` numbers used by the shim.
pub(crate) const DEVICE_TYPE_CPU: i32 = 0;
/// c10 `DeviceType` number of CUDA.
pub(crate) const DEVICE_TYPE_CUDA: i32 = 1;
const DEVICE_TYPE_MPS: i32 = 13;

/// What Rust needs to know about a defined tensor, read in one shim call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub device: Device,
    pub kind: Kind,
    pub sparse: bool,
    pub contiguous: bool,
    pub numel: i64,
    /// The TensorImpl: shallow copies of one tensor share it.
    pub id: usize,
}

impl Meta {
    fn from_raw(op: &'static str, m: &TensorMeta) -> Result<Option<Meta>> {
        if m.defined == 0 {
            return Ok(None);
        }
        let device = match (m.device_type, usize::try_from(m.device_index)) {
            (DEVICE_TYPE_CPU, _) => Device::Cpu,
            (DEVICE_TYPE_CUDA, Ok(i)) => Device::Cuda(i),
            (DEVICE_TYPE_MPS, _) => Device::Mps,
            (t, _) => {
                return Err(Error::native(
                    op,
                    &format!("a tensor on c10 device type {t}, which tch-fabric does not support"),
                ))
            }
        };
        let kind = kind_from_c10(m.dtype).ok_or_else(|| {
            Error::native(op, &format!("a tensor of c10 scalar type {}", m.dtype))
        })?;
        Ok(Some(Meta {
            device,
            kind,
            sparse: m.sparse != 0,
            contiguous: m.contiguous != 0,
            numel: m.numel,
            id: m.impl_,
        }))
    }
}

/// The metadata of each tensor (`None` for an undefined one), in one call.
pub(crate) fn metas<'a>(
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> Result<Vec<Option<Meta>>> {
    let p = ptrs(tensors);
    let mut raw = vec![TensorMeta::default(); p.len()];
    check("tensor metadata", unsafe {
        ffi::tf_tensor_meta_list(p.as_ptr(), p.len(), raw.as_mut_ptr())
    })?;
    raw.iter()
        .map(|m| Meta::from_raw("tensor metadata", m))
        .collect()
}

/// The metadata of one tensor.
pub(crate) fn meta(t: &Tensor) -> Result<Option<Meta>> {
    Ok(metas([t])?.pop().flatten())
}

/// The shape of a tensor (tch's `size` panics on an undefined one).
pub(crate) fn shape(t: &Tensor) -> Result<Vec<i64>> {
    match meta(t)? {
        Some(_) => Ok(t.size()),
        None => Err(Error::native("size", "undefined tensor")),
    }
}

/// The gradient of each parameter with its metadata (`None` where it has none), in one call.
pub(crate) fn collect_grads(params: &[Tensor]) -> Result<Vec<Option<(Tensor, Meta)>>> {
    let p = ptrs(params);
    let mut grads: Vec<CTensor> = vec![std::ptr::null_mut(); p.len()];
    let mut raw = vec![TensorMeta::default(); p.len()];
    check("grad", unsafe {
        ffi::tf_collect_grads(p.as_ptr(), p.len(), grads.as_mut_ptr(), raw.as_mut_ptr())
    })?;
    // Own every returned handle first, so that none leaks if a metadata entry is refused.
    let owned: Vec<Option<Tensor>> = grads
        .into_iter()
        // SAFETY: each non-null entry is a fresh `new at::Tensor` from the shim.
        .map(|g| (!g.is_null()).then(|| unsafe { Tensor::from_ptr(g) }))
        .collect();
    owned
        .into_iter()
        .zip(&raw)
        .map(|(g, m)| Ok(g.zip(Meta::from_raw("grad", m)?)))
        .collect()
}

/// Loads libtorch_cuda (registering CUDA) if this libtorch has it; whether it is loaded.
pub(crate) fn load_cuda() -> Result<bool> {
    let mut loaded = 0;
    check("load libtorch_cuda", unsafe {
        ffi::tf_load_cuda(&mut loaded)
    })?;
    Ok(loaded != 0)
}

/// The CUDA caching allocator's byte counts for device `index`: allocated now, peak allocated,
/// reserved now, peak reserved.
pub(crate) fn cuda_memory_stats(index: usize) -> Result<[u64; 4]> {
    let index = i32::try_from(index)
        .map_err(|_| Error::native("cuda_memory_stats", "device index out of range"))?;
    let mut out = [0i64; 4];
    check("cuda_memory_stats", unsafe {
        ffi::tf_cuda_memory_stats(index, out.as_mut_ptr())
    })?;
    // Byte counts are never negative; a negative one would be an allocator bug, shown as 0.
    Ok(out.map(|v| u64::try_from(v).unwrap_or(0)))
}

/// Resets the CUDA caching allocator's peak statistics of device `index`.
pub(crate) fn cuda_reset_peak_memory_stats(index: usize) -> Result<()> {
    let index = i32::try_from(index)
        .map_err(|_| Error::native("cuda_reset_peak_memory_stats", "device index out of range"))?;
    check("cuda_reset_peak_memory_stats", unsafe {
        ffi::tf_cuda_reset_peak_memory_stats(index)
    })
}

/// Whether the dispatcher has a kernel of `op` for the device type of `device`.
pub(crate) fn op_has_kernel(op: &str, device: Device) -> Result<bool> {
    let name = CString::new(op).map_err(|_| Error::native("op_has_kernel", "NUL in op name"))?;
    let device_type = if device.is_cuda() {
        DEVICE_TYPE_CUDA
    } else {
        DEVICE_TYPE_CPU
    };
    let mut out = 0;
    check("op_has_kernel", unsafe {
        ffi::tf_op_has_kernel(name.as_ptr(), device_type, &mut out)
    })?;
    Ok(out != 0)
}

pub(crate) fn autocast_available(device_type: i32) -> Result<bool> {
    let mut out = 0;
    check("autocast_available", unsafe {
        ffi::tf_autocast_available(device_type, &mut out)
    })?;
    Ok(out != 0)
}

pub(crate) fn autocast_get(device_type: i32) -> Result<ffi::AutocastState> {
    let mut out = ffi::AutocastState::default();
    check("autocast_get", unsafe {
        ffi::tf_autocast_get(device_type, &mut out)
    })?;
    Ok(out)
}

pub(crate) fn autocast_enter(
    device_type: i32,
    dtype: i32,
    enabled: bool,
    cache_enabled: bool,
) -> Result<ffi::AutocastState> {
    let mut saved = ffi::AutocastState::default();
    check("autocast_enter", unsafe {
        ffi::tf_autocast_enter(
            device_type,
            dtype,
            i32::from(enabled),
            i32::from(cache_enabled),
            &mut saved,
        )
    })?;
    Ok(saved)
}

pub(crate) fn autocast_exit(device_type: i32, saved: &ffi::AutocastState) -> Result<()> {
    check("autocast_exit", unsafe {
        ffi::tf_autocast_exit(device_type, saved)
    })
}

pub(crate) fn default_dtype_get() -> Result<i32> {
    let mut out = 0;
    check("default_dtype_get", unsafe {
        ffi::tf_default_dtype_get(&mut out)
    })?;
    Ok(out)
}

pub(crate) fn default_dtype_set(dtype: i32) -> Result<()> {
    check("default_dtype_set", unsafe {
        ffi::tf_default_dtype_set(dtype)
    })
}

pub(crate) fn amp_unscale(grads: &[&Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let p = ptrs(grads.iter().copied());
    check("_amp_foreach_non_finite_check_and_unscale_", unsafe {
        ffi::tf_amp_foreach_non_finite_check_and_unscale(
            p.as_ptr(),
            p.len(),
            ptr(found_inf),
            ptr(inv_scale),
        )
    })
}

/// PyTorch's total norm over gradients grouped by (device, dtype), one `_foreach_norm` per group.
pub(crate) fn grad_total_norm(groups: &[Vec<&Tensor>], norm_type: f64) -> Result<Tensor> {
    let p = ptrs(groups.iter().flatten().copied());
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    let mut out: CTensor = std::ptr::null_mut();
    check("get_total_norm", unsafe {
        ffi::tf_grad_total_norm(p.as_ptr(), sizes.as_ptr(), sizes.len(), norm_type, &mut out)
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`.
    unsafe { owned("get_total_norm", out) }
}

/// The lists of one `_fused_adamw_` / `adamw_folded_` call, all of one length
/// (`max_exp_avg_sqs` only read with AMSGrad).
pub(crate) struct AdamLists<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<&'a Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
    pub max_exp_avg_sqs: Vec<&'a Tensor>,
    pub steps: Vec<&'a Tensor>,
}

/// The pointer arrays of [`AdamLists`], in the order the kernels take them.
struct AdamPtrs {
    params: Vec<CTensor>,
    grads: Vec<CTensor>,
    exp_avgs: Vec<CTensor>,
    exp_avg_sqs: Vec<CTensor>,
    max_exp_avg_sqs: Vec<CTensor>,
    steps: Vec<CTensor>,
}

impl AdamLists<'_> {
    /// The lists as pointer arrays, after checking their lengths.
    fn ptrs(&self, op: &'static str, with_max: bool) -> Result<AdamPtrs> {
        self.check_lengths(op, with_max)?;
        Ok(AdamPtrs {
            params: ptrs(self.params.iter().copied()),
            grads: ptrs(self.grads.iter().copied()),
            exp_avgs: ptrs(self.exp_avgs.iter().copied()),
            exp_avg_sqs: ptrs(self.exp_avg_sqs.iter().copied()),
            max_exp_avg_sqs: ptrs(self.max_exp_avg_sqs.iter().copied()),
            steps: ptrs(self.steps.iter().copied()),
        })
    }

    fn check_lengths(&self, op: &'static str, with_max: bool) -> Result<()> {
        let n = self.params.len();
        let lens = [
            self.grads.len(),
            self.exp_avgs.len(),
            self.exp_avg_sqs.len(),
            self.steps.len(),
        ];
        if lens.iter().any(|&k| k != n) || (with_max && self.max_exp_avg_sqs.len() != n) {
            return Err(Error::native(op, "tensor lists of different lengths"));
        }
        Ok(())
    }
}

/// Hyper-parameters of one AdamW call (the learning rate is given apart).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub maximize: bool,
}

pub(crate) fn fused_adamw(
    l: &AdamLists<'_>,
    lr: f64,
    h: &AdamHyper,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let a = l.ptrs("_fused_adamw_", h.amsgrad)?;
    check("_fused_adamw_", unsafe {
        ffi::tf_fused_adamw(
            a.params.as_ptr(),
            a.grads.as_ptr(),
            a.exp_avgs.as_ptr(),
            a.exp_avg_sqs.as_ptr(),
            a.max_exp_avg_sqs.as_ptr(),
            a.steps.as_ptr(),
            a.params.len(),
            lr,
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

/// PyTorch's Adam step without `fused=True` (`_multi_tensor_adam` when `foreach`, else
/// `_single_tensor_adam`): AdamW's decoupled decay when `decoupled`.
pub(crate) fn adam_for_loop(
    l: &AdamLists<'_>,
    lr: f64,
    h: &AdamHyper,
    decoupled: bool,
    foreach: bool,
) -> Result<()> {
    let op = if foreach {
        "_multi_tensor_adam"
    } else {
        "_single_tensor_adam"
    };
    let a = l.ptrs(op, h.amsgrad)?;
    check(op, unsafe {
        ffi::tf_adam_for_loop(
            a.params.as_ptr(),
            a.grads.as_ptr(),
            a.exp_avgs.as_ptr(),
            a.exp_avg_sqs.as_ptr(),
            a.max_exp_avg_sqs.as_ptr(),
            a.steps.as_ptr(),
            a.params.len(),
            lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            i32::from(h.amsgrad),
            i32::from(h.maximize),
            i32::from(decoupled),
            i32::from(foreach),
        )
    })
}

/// `tch_fabric::adamw_folded_` (float32 CPU, no AMSGrad): AdamW on gradients still multiplied
/// by `divisor`, writing only the parameters and moments.
pub(crate) fn adamw_folded(
    l: &AdamLists<'_>,
    lr: f64,
    h: &AdamHyper,
    divisor: &Tensor,
    found_inf: &Tensor,
) -> Result<()> {
    let a = l.ptrs("tch_fabric::adamw_folded_", false)?;
    check("tch_fabric::adamw_folded_", unsafe {
        ffi::tf_adamw_folded(
            a.params.as_ptr(),
            a.grads.as_ptr(),
            a.exp_avgs.as_ptr(),
            a.exp_avg_sqs.as_ptr(),
            a.steps.as_ptr(),
            a.params.len(),
            lr,
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

/// Hyper-parameters of one `_fused_sgd_` call (the learning rate is given apart).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SgdHyper {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

/// `torch._fused_sgd_`; `buffers` has one entry per parameter when momentum is non-zero.
/// PyTorch's SGD step without `fused=True` (`_multi_tensor_sgd` when `foreach`, else
/// `_single_tensor_sgd`); `fresh[i]` marks a momentum buffer made for this step.
pub(crate) fn sgd_for_loop(
    params: &[&Tensor],
    grads: &[&Tensor],
    buffers: &[&Tensor],
    fresh: &[bool],
    lr: f64,
    h: &SgdHyper,
    foreach: bool,
) -> Result<()> {
    let n = params.len();
    let op = if foreach {
        "_multi_tensor_sgd"
    } else {
        "_single_tensor_sgd"
    };
    if grads.len() != n || (h.momentum != 0.0 && (buffers.len() != n || fresh.len() != n)) {
        return Err(Error::native(op, "tensor lists of different lengths"));
    }
    let (p, g, b) = (
        ptrs(params.iter().copied()),
        ptrs(grads.iter().copied()),
        ptrs(buffers.iter().copied()),
    );
    let fresh: Vec<i32> = fresh.iter().map(|&f| i32::from(f)).collect();
    check(op, unsafe {
        ffi::tf_sgd_for_loop(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            fresh.as_ptr(),
            n,
            h.weight_decay,
            h.momentum,
            lr,
            h.dampening,
            i32::from(h.nesterov),
            i32::from(h.maximize),
            i32::from(foreach),
        )
    })
}

#[allow(clippy::too_many_arguments)] // the kernel's own argument list
pub(crate) fn fused_sgd(
    params: &[&Tensor],
    grads: &[&Tensor],
    buffers: &[&Tensor],
    lr: f64,
    h: &SgdHyper,
    is_first_step: bool,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || (h.momentum != 0.0 && buffers.len() != n) {
        return Err(Error::native(
            "_fused_sgd_",
            "tensor lists of different lengths",
        ));
    }
    let (p, g, b) = (
        ptrs(params.iter().copied()),
        ptrs(grads.iter().copied()),
        ptrs(buffers.iter().copied()),
    );
    check("_fused_sgd_", unsafe {
        ffi::tf_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n,
            h.weight_decay,
            h.momentum,
            lr,
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
    let p = ptrs(grads.iter().copied());
    let mut out: CTensor = std::ptr::null_mut();
    check("tch_fabric::unscale_sumsq_", unsafe {
        ffi::tf_unscale_sumsq(
            p.as_ptr(),
            p.len(),
            ptr(found_inf),
            ptr(inv_scale),
            i32::from(unscale),
            &mut out,
        )
    })?;
    // SAFETY: on success the shim stored a fresh `new at::Tensor`.
    unsafe { owned("tch_fabric::unscale_sumsq_", out) }
}

/// `tch_fabric::clip_divisor`: (the norm, `scale / clip_coef`).
pub(crate) fn clip_divisor(
    sumsq: &Tensor,
    scale: &Tensor,
    max_norm: f64,
) -> Result<(Tensor, Tensor)> {
    let mut norm: CTensor = std::ptr::null_mut();
    let mut divisor: CTensor = std::ptr::null_mut();
    check("tch_fabric::clip_divisor", unsafe {
        ffi::tf_clip_divisor(ptr(sumsq), ptr(scale), max_norm, &mut norm, &mut divisor)
    })?;
    // SAFETY: on success the shim stored two fresh tensors.
    unsafe {
        Ok((
            owned("tch_fabric::clip_divisor", norm)?,
            owned("tch_fabric::clip_divisor", divisor)?,
        ))
    }
}

pub(crate) fn grads_set_to_none(params: &[Tensor]) -> Result<()> {
    let p = ptrs(params);
    check("zero_grad", unsafe {
        ffi::tf_grads_set_to_none(p.as_ptr(), p.len())
    })
}

pub(crate) fn foreach_add_scalar(tensors: &[&Tensor], value: f64) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    check("_foreach_add_", unsafe {
        ffi::tf_foreach_add_scalar(p.as_ptr(), p.len(), value)
    })
}

pub(crate) fn foreach_sub_tensor(tensors: &[&Tensor], other: &Tensor) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    check("_foreach_sub_", unsafe {
        ffi::tf_foreach_sub_tensor(p.as_ptr(), p.len(), ptr(other))
    })
}

pub(crate) fn foreach_mul_tensor(tensors: &[&Tensor], other: &Tensor) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    check("_foreach_mul_", unsafe {
        ffi::tf_foreach_mul_tensor(p.as_ptr(), p.len(), ptr(other))
    })
}

pub(crate) fn foreach_clamp(tensors: &[&Tensor], min: f64, max: f64) -> Result<()> {
    let p = ptrs(tensors.iter().copied());
    check("_foreach_clamp_", unsafe {
        ffi::tf_foreach_clamp(p.as_ptr(), p.len(), min, max)
    })
}

pub(crate) fn op_count_begin() -> Result<()> {
    check("op_count_begin", unsafe { ffi::tf_op_count_begin() })
}

/// The report of `tf_op_count_end`: "name\tall\ttop_level\tself_ns" lines.
pub(crate) fn op_count_end() -> Result<String> {
    let mut report: *mut c_char = std::ptr::null_mut();
    check("op_count_end", unsafe { ffi::tf_op_count_end(&mut report) })?;
    // SAFETY: on success the shim stored a strdup'ed string that we own.
    Ok(unsafe { ffi::take_string(report) })
}

/// How the shim's all-reduce combines values (`tf_pg_all_reduce`'s `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawReduceOp {
    Sum = 0,
    Max = 1,
}

/// The rendezvous and timeouts of one [`RawProcessGroup::new`].
#[derive(Debug)]
pub(crate) struct PgConfig<'a> {
    pub backend: &'a str,
    pub master_addr: &'a str,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous_timeout_ms: i64,
    pub timeout_ms: i64,
    /// On rank 0, a listening socket bound to the master address, handed to the store (which
    /// then owns it); `None` lets c10d bind the port itself, on every interface.
    pub listener: Option<std::net::TcpListener>,
}

/// An owned c10d process group from the shim (`tf_process_group`), freed on drop.
#[derive(Debug)]
pub(crate) struct RawProcessGroup(*mut c_void);

impl RawProcessGroup {
    pub(crate) fn new(c: PgConfig<'_>) -> Result<Self> {
        let cstr = |field: &'static str, v: &str| {
            CString::new(v).map_err(|_| Error::InvalidConfig {
                field,
                value: v.escape_debug().to_string(),
                allowed: "a string without NUL bytes",
            })
        };
        let backend = cstr("backend", c.backend)?;
        let addr = cstr("MASTER_ADDR", c.master_addr)?;
        let int = |field: &'static str, v: usize| {
            i32::try_from(v).map_err(|_| Error::InvalidConfig {
                field,
                value: v.to_string(),
                allowed: "at most 2147483647",
            })
        };
        let (rank, world_size) = (int("RANK", c.rank)?, int("WORLD_SIZE", c.world_size)?);
        // From here the shim owns the socket: it gives it to the store or closes it.
        let listen_fd = c.listener.map_or(-1, std::os::fd::IntoRawFd::into_raw_fd);
        let mut out: *mut c_void = std::ptr::null_mut();
        check("c10d process group", unsafe {
            ffi::tf_pg_new(
                backend.as_ptr(),
                addr.as_ptr(),
                i32::from(c.master_port),
                rank,
                world_size,
                c.rendezvous_timeout_ms,
                c.timeout_ms,
                listen_fd,
                &mut out,
            )
        })?;
        Ok(RawProcessGroup(out))
    }

    pub(crate) fn all_reduce(&self, t: &Tensor, op: RawReduceOp) -> Result<()> {
        check("all_reduce", unsafe {
            ffi::tf_pg_all_reduce(self.0, ptr(t), op as i32)
        })
    }

    pub(crate) fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let root = i32::try_from(root).map_err(|_| Error::InvalidConfig {
            field: "broadcast root",
            value: root.to_string(),
            allowed: "a rank of the group",
        })?;
        check("broadcast", unsafe {
            ffi::tf_pg_broadcast(self.0, ptr(t), root)
        })
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        check("barrier", unsafe { ffi::tf_pg_barrier(self.0) })
    }

    /// After a failed collective: the ranks that never entered it ("" when every rank did or
    /// the store cannot tell).
    pub(crate) fn missing_ranks(&self) -> String {
        let mut out: *mut c_char = std::ptr::null_mut();
        match check("missing ranks", unsafe {
            ffi::tf_pg_missing_ranks(self.0, &mut out)
        }) {
            // SAFETY: a strdup'ed string the shim handed over.
            Ok(()) => unsafe { ffi::take_string(out) },
            Err(_) => String::new(),
        }
    }

    /// The bucket all-reduces this group's Reducers issued.
    pub(crate) fn bucket_all_reduces(&self) -> u64 {
        unsafe { ffi::tf_pg_bucket_all_reduces(self.0) }
    }

    /// libtorch's DDP Reducer over `params` in this group.
    pub(crate) fn reducer(
        &self,
        params: &[(String, Tensor)],
        bucket_bytes: usize,
        find_unused: bool,
    ) -> Result<RawReducer> {
        let names = params
            .iter()
            .map(|(n, _)| {
                CString::new(n.as_str()).map_err(|_| Error::native("Reducer", "NUL in a name"))
            })
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let tensors = ptrs(params.iter().map(|(_, t)| t));
        let bytes = i64::try_from(bucket_bytes).unwrap_or(i64::MAX);
        let mut out: *mut c_void = std::ptr::null_mut();
        check("Reducer", unsafe {
            ffi::tf_reducer_new(
                self.0,
                tensors.as_ptr(),
                tensors.len(),
                name_ptrs.as_ptr(),
                bytes,
                i32::from(find_unused),
                &mut out,
            )
        })?;
        if out.is_null() {
            return Err(Error::native("Reducer", "the shim returned no reducer"));
        }
        Ok(RawReducer(out))
    }
}

/// A `c10d::Reducer` the shim owns.
#[derive(Debug)]
pub(crate) struct RawReducer(*mut c_void);

impl RawReducer {
    /// Arms the hooks for the next backward (`outputs` are searched for unused parameters
    /// when the reducer was built to find them).
    pub(crate) fn prepare(&self, outputs: &[&Tensor]) -> Result<()> {
        let p = ptrs(outputs.iter().copied());
        check("DDP Reducer", unsafe {
            ffi::tf_reducer_prepare(self.0, p.as_ptr(), p.len())
        })
    }
}

impl Drop for RawReducer {
    fn drop(&mut self) {
        // SAFETY: from tf_reducer_new, freed once; the shim swallows a throwing destructor.
        unsafe { ffi::tf_reducer_free(self.0) }
    }
}

impl Drop for RawProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tf_pg_new and is freed exactly once; the shim swallows
        // any exception thrown while closing sockets.
        unsafe { ffi::tf_pg_free(self.0) }
    }
}

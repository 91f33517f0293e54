//! The optimizer kernels: libtorch's `_fused_adamw_` and `_fused_sgd_`, PyTorch's for-loop and
//! foreach Adam and SGD steps (op for op in the shim), and tch-fabric's folded AdamW.
use super::{call, owned, ptr, ptrs};
use crate::error::{Error, Result};
use crate::ffi::{self, CTensor};
use tch::Tensor;

/// The lists of one Adam kernel call, all of one length (`max_exp_avg_sqs` only read with
/// AMSGrad).
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
    /// The lists as pointer arrays, after checking their lengths (every kernel reads `n`
    /// entries of each array, so a shorter one would be read past its end).
    fn ptrs(&self, op: &'static str, with_max: bool) -> Result<AdamPtrs> {
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
        Ok(AdamPtrs {
            params: ptrs(self.params.iter().copied()),
            grads: ptrs(self.grads.iter().copied()),
            exp_avgs: ptrs(self.exp_avgs.iter().copied()),
            exp_avg_sqs: ptrs(self.exp_avg_sqs.iter().copied()),
            max_exp_avg_sqs: ptrs(self.max_exp_avg_sqs.iter().copied()),
            steps: ptrs(self.steps.iter().copied()),
        })
    }
}

/// Hyper-parameters of one Adam call (the learning rate is given apart).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub maximize: bool,
}

/// `torch._fused_adamw_`; `grad_scale` and `found_inf` as PyTorch's AMP step passes them.
pub(crate) fn fused_adamw(
    l: &AdamLists<'_>,
    lr: f64,
    h: &AdamHyper,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let a = l.ptrs("_fused_adamw_", h.amsgrad)?;
    // SAFETY: every array holds `a.params.len()` live tensors (checked by `ptrs`).
    call("_fused_adamw_", || unsafe {
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
    // SAFETY: every array holds `a.params.len()` live tensors (checked by `ptrs`).
    call(op, || unsafe {
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
    // SAFETY: every array holds `a.params.len()` live tensors (checked by `ptrs`).
    call("tch_fabric::adamw_folded_", || unsafe {
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

/// Hyper-parameters of one SGD call (the learning rate is given apart).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SgdHyper {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

/// PyTorch's SGD step without `fused=True` (`_multi_tensor_sgd` when `foreach`, else
/// `_single_tensor_sgd`); `buffers` has one entry per parameter when momentum is non-zero,
/// `fresh[i]` marks a momentum buffer made for this step.
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
    // SAFETY: `p` and `g` hold `n` live tensors, `b` and `fresh` too when the kernel reads them
    // (momentum != 0), as checked above.
    call(op, || unsafe {
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

/// `torch._fused_sgd_`; `buffers` has one entry per parameter when momentum is non-zero.
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
    // SAFETY: `p` and `g` hold `n` live tensors, `b` too when the kernel reads it (momentum
    // != 0), as checked above.
    call("_fused_sgd_", || unsafe {
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

/// How a rounded step writes a parameter's new float32 value back to bfloat16 (the `mode` of
/// `csrc/rounding.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoundMode {
    /// Random bits keyed by this seed, the parameter's position and the step.
    Stochastic { seed: u64 },
    /// A compensation buffer per parameter.
    Kahan,
}

impl RoundMode {
    fn code(self) -> (i64, u64) {
        match self {
            RoundMode::Stochastic { seed } => (1, seed),
            RoundMode::Kahan => (2, 0),
        }
    }
}

/// The extra lists of a rounded step: each parameter's position in its optimizer and, with
/// Kahan summation, its compensation buffer.
pub(crate) struct Rounded<'a> {
    pub mode: RoundMode,
    pub positions: Vec<i64>,
    pub comps: Vec<&'a Tensor>,
}

impl Rounded<'_> {
    fn check(&self, op: &'static str, n: usize) -> Result<()> {
        let comps = if self.mode == RoundMode::Kahan { n } else { 0 };
        if self.positions.len() != n || self.comps.len() != comps {
            return Err(Error::native(op, "tensor lists of different lengths"));
        }
        Ok(())
    }
}

/// tch-fabric's `adamw_rounded_`: AdamW on bfloat16 parameters computed in float32 and written
/// back by `r.mode`.
pub(crate) fn adamw_rounded(
    l: &AdamLists<'_>,
    r: &Rounded<'_>,
    lr: f64,
    h: &AdamHyper,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "tch_fabric::adamw_rounded_";
    let a = l.ptrs(OP, h.amsgrad)?;
    r.check(OP, a.params.len())?;
    let comps = ptrs(r.comps.iter().copied());
    let (mode, seed) = r.mode.code();
    let n_max = if h.amsgrad { a.params.len() } else { 0 };
    // SAFETY: `ptrs` and `check` made every array as long as the count passed beside it (n for
    // the unnamed ones).
    call(OP, || unsafe {
        ffi::tf_adamw_rounded(
            a.params.as_ptr(),
            a.grads.as_ptr(),
            a.exp_avgs.as_ptr(),
            a.exp_avg_sqs.as_ptr(),
            a.max_exp_avg_sqs.as_ptr(),
            n_max,
            comps.as_ptr(),
            comps.len(),
            a.steps.as_ptr(),
            r.positions.as_ptr(),
            a.params.len(),
            lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            i32::from(h.maximize),
            mode,
            seed,
            grad_scale.map_or(std::ptr::null_mut(), ptr),
            found_inf.map_or(std::ptr::null_mut(), ptr),
        )
    })
}

/// tch-fabric's `sgd_rounded_`: SGD on bfloat16 parameters computed in float32 and written back
/// by `r.mode`; `steps` (one per parameter) only with stochastic rounding.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_rounded(
    params: &[&Tensor],
    grads: &[&Tensor],
    buffers: &[&Tensor],
    steps: &[&Tensor],
    r: &Rounded<'_>,
    lr: f64,
    h: &SgdHyper,
    is_first_step: bool,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "tch_fabric::sgd_rounded_";
    let n = params.len();
    let stochastic = matches!(r.mode, RoundMode::Stochastic { .. });
    if grads.len() != n
        || (h.momentum != 0.0 && buffers.len() != n)
        || steps.len() != if stochastic { n } else { 0 }
    {
        return Err(Error::native(OP, "tensor lists of different lengths"));
    }
    r.check(OP, n)?;
    let (p, g, b, s, c) = (
        ptrs(params.iter().copied()),
        ptrs(grads.iter().copied()),
        ptrs(buffers.iter().copied()),
        ptrs(steps.iter().copied()),
        ptrs(r.comps.iter().copied()),
    );
    let (mode, seed) = r.mode.code();
    // SAFETY: every array is as long as the count passed beside it (checked above).
    call(OP, || unsafe {
        ffi::tf_sgd_rounded(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            b.len(),
            c.as_ptr(),
            c.len(),
            s.as_ptr(),
            s.len(),
            r.positions.as_ptr(),
            n,
            lr,
            h.weight_decay,
            h.momentum,
            h.dampening,
            i32::from(h.nesterov),
            i32::from(h.maximize),
            i32::from(is_first_step),
            mode,
            seed,
            grad_scale.map_or(std::ptr::null_mut(), ptr),
            found_inf.map_or(std::ptr::null_mut(), ptr),
        )
    })
}

/// tch-fabric's `stochastic_round`: a float32 tensor rounded to bfloat16 with the random bits
/// of parameter `position` at `step`.
pub(crate) fn stochastic_round(x: &Tensor, seed: u64, position: u32, step: u32) -> Result<Tensor> {
    const OP: &str = "tch_fabric::stochastic_round";
    let mut out: ffi::CTensor = std::ptr::null_mut();
    // SAFETY: `x` is a live tensor; the shim writes a fresh tensor (or null) to `out`.
    call(OP, || unsafe {
        ffi::tf_stochastic_round(ptr(x), seed, position, step, &mut out)
    })?;
    // SAFETY: `out` is null or the fresh tensor the shim allocated for us.
    unsafe { owned(OP, out) }
}

//! [`Sgd`]: `torch.optim.SGD()` without `fused=True` (PyTorch's `_single_tensor_sgd` and
//! `_multi_tensor_sgd`), op for op in the C++ shim.
use super::adam::unscaled_only;
use super::fused::{fused_optimizer, kernel_options, GroupStep, Kernel};
use super::fused_sgd::{sgd_fields, validate_sgd, MOMENTUM_BUFFER};
use super::param_group::{load_sgd, sgd_group, ParamGroup};
use super::slots::Field;
use super::Amp;
use crate::error::Result;
use crate::native::{self, SgdHyper};
use std::ops::{Deref, DerefMut};
use tch::Tensor;

/// The hyper-parameters of a for-loop SGD step, and PyTorch's `foreach` (`None`: its
/// default, foreach on CUDA).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SgdForLoop(SgdHyper, Option<bool>);

impl Deref for SgdForLoop {
    type Target = SgdHyper;
    fn deref(&self) -> &SgdHyper {
        &self.0
    }
}

impl DerefMut for SgdForLoop {
    fn deref_mut(&mut self) -> &mut SgdHyper {
        &mut self.0
    }
}

impl Kernel for SgdForLoop {
    const OP: &'static str = "_single_tensor_sgd";
    const AMP: bool = false;

    fn fields(&self) -> Vec<Field> {
        sgd_fields(self)
    }

    fn validate(&self) -> Result<()> {
        validate_sgd(self)
    }

    fn momentum(&self) -> f64 {
        self.momentum
    }

    fn set_momentum(&mut self, momentum: f64) {
        self.momentum = momentum;
    }

    fn param_group(&self) -> ParamGroup {
        sgd_group(self, self.1, false)
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        load_sgd(group, &mut self.0, Some(&mut self.1))
    }

    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        if !matches!(step.amp, Amp::None) {
            return Err(unscaled_only(Self::OP));
        }
        let (state, grads, group) = (step.state, step.grads, step.group);
        let bufs: Vec<&Tensor> = if self.momentum != 0.0 {
            state.all(group, &MOMENTUM_BUFFER)?
        } else {
            Vec::new()
        };
        let fresh: Vec<bool> = group.indices.iter().map(|&i| state.is_fresh(i)).collect();
        native::sgd_for_loop(
            &step.params(),
            &grads.tensors(group),
            &bufs,
            &fresh,
            step.lr,
            self,
            self.1.unwrap_or(group.device.is_cuda()),
        )
    }
}

/// `torch.optim.SGD(params, lr)` with PyTorch's defaults (no momentum, dampening, weight
/// decay or Nesterov), computed as PyTorch computes it without `fused=True`: the for-loop
/// implementation or the foreach one ([`Sgd::foreach`]), bit for bit on CPU in every
/// precision.
/// A parameter's momentum buffer starts as its first step's gradient, as in PyTorch.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::{Optimizer, Sgd};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = Sgd::new(&vs, 0.1)?.momentum(0.9).nesterov(true);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors()?.len(), 2); // one momentum buffer per parameter
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct Sgd {
    fused: super::fused::Fused<SgdForLoop>,
}

fused_optimizer!(
    Sgd,
    SgdForLoop(
        SgdHyper {
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        },
        None
    ),
    "SGD over the trainable variables of `vs` with PyTorch's defaults: no momentum, no \
     dampening, no weight decay, no Nesterov.",
    "The L2 penalty added to the gradient (>= 0)."
);

kernel_options!(Sgd {
    /// PyTorch's `foreach`: `true` runs `_multi_tensor_sgd` (libtorch's `_foreach_` ops),
    /// `false` `_single_tensor_sgd`. Unset, PyTorch's default: foreach for CUDA parameters
    /// (decided per device), the for-loop on CPU. As in PyTorch, the foreach path with
    /// Nesterov momentum adds into the gradients in place (when neither `maximize` nor weight
    /// decay copied them).
    fn foreach(foreach: bool) => h { h.1 = Some(foreach) }
    /// The momentum factor (>= 0).
    fn momentum(momentum: f64) => h { h.momentum = momentum }
    /// The dampening of the momentum (>= 0).
    fn dampening(dampening: f64) => h { h.dampening = dampening }
    /// Nesterov momentum (needs momentum > 0 and zero dampening).
    fn nesterov(nesterov: bool) => h { h.nesterov = nesterov }
});

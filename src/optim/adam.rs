//! [`AdamW`] and [`Adam`]: `torch.optim.AdamW()` and `torch.optim.Adam()` without `fused=True`
//! (PyTorch's `_single_tensor_adam` and `_multi_tensor_adam`), op for op in the C++ shim.
use super::fused::{fused_optimizer, kernel_options, GroupStep, Kernel};
use super::fused_adamw::{adam_fields, adam_lists, validate_adam};
use super::param_group::{adam_group, load_adam, ParamGroup};
use super::slots::{Field, Shape};
use super::Amp;
use crate::error::{Error, Result};
use crate::native::{self, AdamHyper};
use std::ops::{Deref, DerefMut};

/// The step count: on the CPU, as PyTorch keeps it for its for-loop optimizers.
const STEP: Field = Field {
    name: "step",
    shape: Shape::HostScalar,
};

/// The hyper-parameters of a for-loop Adam step; `decoupled` is AdamW's weight decay;
/// `foreach` PyTorch's argument (`None`: PyTorch's default, foreach on CUDA).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdamForLoop {
    hyper: AdamHyper,
    decoupled: bool,
    foreach: Option<bool>,
}

impl Deref for AdamForLoop {
    type Target = AdamHyper;
    fn deref(&self) -> &AdamHyper {
        &self.hyper
    }
}

impl DerefMut for AdamForLoop {
    fn deref_mut(&mut self) -> &mut AdamHyper {
        &mut self.hyper
    }
}

impl Kernel for AdamForLoop {
    const OP: &'static str = "_single_tensor_adam";
    const AMP: bool = false;

    fn fields(&self) -> Vec<Field> {
        adam_fields(self, STEP)
    }

    fn validate(&self) -> Result<()> {
        validate_adam(self)
    }

    fn momentum(&self) -> f64 {
        self.beta1
    }

    fn set_momentum(&mut self, momentum: f64) {
        self.beta1 = momentum;
    }

    fn param_group(&self) -> ParamGroup {
        adam_group(self, self.decoupled, self.foreach, false)
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        load_adam(
            group,
            &mut self.hyper,
            self.decoupled,
            Some(&mut self.foreach),
        )
    }

    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        if !matches!(step.amp, Amp::None) {
            return Err(unscaled_only(Self::OP));
        }
        let lists = adam_lists(self, step, &STEP)?;
        let foreach = self.foreach.unwrap_or(step.group.device.is_cuda());
        native::adam_for_loop(&lists, step.lr, self, self.decoupled, foreach)
    }
}

/// The error for a scaled step handed to a for-loop optimizer (the scaler never does this:
/// such optimizers report `supports_amp_scaling() == false`).
pub(super) fn unscaled_only(op: &str) -> Error {
    Error::Usage(format!(
        "{op} takes unscaled gradients: PyTorch's for-loop optimizers do not support AMP \
         scaling inside the step"
    ))
}

/// The builder options [`AdamW`] and [`Adam`] share.
macro_rules! adam_options {
    ($ty:ident) => {
        kernel_options!($ty {
            /// PyTorch's `foreach`: `true` runs `_multi_tensor_adam` (libtorch's `_foreach_` ops),
            /// `false` `_single_tensor_adam`. Unset, PyTorch's default: foreach for CUDA parameters
            /// (decided per device), the for-loop on CPU. On CPU in float16 and bfloat16 the two
            /// round differently, as in PyTorch.
            fn foreach(foreach: bool) => h { h.foreach = Some(foreach) }
            /// The coefficients of the running averages (each in [0, 1)).
            fn betas(beta1: f64, beta2: f64) => h { (h.beta1, h.beta2) = (beta1, beta2) }
            /// The term added to the denominator (>= 0).
            fn eps(eps: f64) => h { h.eps = eps }
            /// The AMSGrad variant.
            fn amsgrad(amsgrad: bool) => h { h.amsgrad = amsgrad }
        });
    };
}

/// `torch.optim.AdamW(params, lr)` with PyTorch's defaults, computed as PyTorch computes it
/// without `fused=True`: the for-loop implementation it picks on CPU, or the foreach one
/// ([`AdamW::foreach`]). Bit for bit with `torch.optim.AdamW` (and `foreach=True`) in every
/// precision on CPU. Under `16-mixed` the GradScaler unscales and checks the gradients
/// before the step (PyTorch's path for optimizers without AMP support).
///
/// Prefer [`crate::FusedAdamW`] for speed; this one is for matching a PyTorch run that used
/// the default.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::{AdamW, Optimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = AdamW::new(&vs, 1e-3)?.betas(0.9, 0.95).weight_decay(0.1);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors()?.len(), 6); // exp_avg, exp_avg_sq, step for 2 parameters
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct AdamW {
    fused: super::fused::Fused<AdamForLoop>,
}

fused_optimizer!(
    AdamW,
    AdamForLoop {
        hyper: AdamHyper {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 1e-2,
            eps: 1e-8,
            amsgrad: false,
            maximize: false,
        },
        decoupled: true,
        foreach: None,
    },
    "AdamW over the trainable variables of `vs` with PyTorch's defaults: betas (0.9, 0.999), \
     eps 1e-8, weight decay 0.01.",
    "The decoupled weight decay (>= 0)."
);

adam_options!(AdamW);

/// `torch.optim.Adam(params, lr)` with PyTorch's defaults (L2 weight decay added to the
/// gradient, 0 by default), computed as [`AdamW`] is: PyTorch's for-loop or foreach
/// implementation, bit for bit on CPU.
///
/// ```
/// use tch::{nn, Device};
/// use tch_fabric::{Adam, Optimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _layer = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let opt = Adam::new(&vs, 1e-3)?.amsgrad(true);
/// assert!(opt.validate().is_ok());
/// assert!(Adam::new(&vs, 1e-3)?.betas(1.0, 0.999).validate().is_err());
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct Adam {
    fused: super::fused::Fused<AdamForLoop>,
}

fused_optimizer!(
    Adam,
    AdamForLoop {
        hyper: AdamHyper {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            eps: 1e-8,
            amsgrad: false,
            maximize: false,
        },
        decoupled: false,
        foreach: None,
    },
    "Adam over the trainable variables of `vs` with PyTorch's defaults: betas (0.9, 0.999), \
     eps 1e-8, no weight decay.",
    "The L2 penalty added to the gradient (>= 0)."
);

adam_options!(Adam);

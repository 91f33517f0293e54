//! [`FusedSgd`]: `torch.optim.SGD(fused=True)` over libtorch's `_fused_sgd_`.
use super::fused::{fused_optimizer, kernel_options, Fused, GroupStep, Kernel};
use super::param_group::{load_sgd, sgd_group, ParamGroup};
use super::slots::{Field, Shape};
use super::{amp_on, non_negative};
use crate::error::{Error, Result};
use crate::native::{self, SgdHyper};
use crate::params::group_by;
use tch::Tensor;

/// SGD with momentum, dampening, Nesterov and weight decay, computed by libtorch's
/// `_fused_sgd_` exactly as `torch.optim.SGD(params, fused=True)` computes it.
///
/// The momentum buffers are created as zeros at a parameter's first step, which that step
/// overwrites with the gradient as PyTorch does. PyTorch creates them uninitialised, so a first
/// step that the GradScaler skips leaves it with garbage momentum; here the buffer stays zero and
/// the next step starts cleanly.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::{FusedSgd, Optimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = FusedSgd::new(&vs, 0.1)?.momentum(0.9).nesterov(true);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors()?.len(), 2); // one momentum buffer per parameter
/// assert!(FusedSgd::new(&vs, 0.1)?.nesterov(true).step().is_err()); // needs momentum
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct FusedSgd {
    fused: Fused<SgdHyper>,
}

pub(super) const MOMENTUM_BUFFER: Field = Field {
    name: "momentum_buffer",
    shape: Shape::LikeParam,
};

fused_optimizer!(
    FusedSgd,
    SgdHyper {
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    },
    "SGD over the trainable variables of `vs` with PyTorch's defaults: no momentum, no \
     dampening, no weight decay, no Nesterov.",
    "The L2 penalty added to the gradient (>= 0)."
);

kernel_options!(FusedSgd {
    /// The momentum factor (>= 0).
    fn momentum(momentum: f64) => h { h.momentum = momentum }
    /// The dampening of the momentum (>= 0).
    fn dampening(dampening: f64) => h { h.dampening = dampening }
    /// Nesterov momentum (needs momentum > 0 and zero dampening).
    fn nesterov(nesterov: bool) => h { h.nesterov = nesterov }
});

impl Kernel for SgdHyper {
    const OP: &'static str = "_fused_sgd_";
    const AMP: bool = true;

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
        sgd_group(self, None, true)
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        load_sgd(group, self, None)
    }

    /// Fresh and older momentum buffers go to separate kernel calls: the kernel's
    /// `is_first_step` covers a whole call.
    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        let (state, grads, group) = (step.state, step.grads, step.group);
        let (scale, inf) = amp_on(step.amp, group.device)?;
        let fresh = group_by(group.indices.iter().map(|&i| Some(state.is_fresh(i))));
        for (first, positions) in fresh {
            let indices: Vec<usize> = positions.iter().map(|&k| group.indices[k]).collect();
            let p: Vec<&Tensor> = indices.iter().map(|&i| &step.params.tensors()[i]).collect();
            let g: Vec<&Tensor> = indices.iter().filter_map(|&i| grads.get(i)).collect();
            let bufs: Vec<&Tensor> = if self.momentum != 0.0 {
                indices
                    .iter()
                    .map(|&i| state.get(i, &MOMENTUM_BUFFER))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            native::fused_sgd(
                &p,
                &g,
                &bufs,
                step.lr,
                self,
                first,
                scale.as_deref(),
                inf.as_deref(),
            )?;
        }
        Ok(())
    }
}

/// The state of an SGD parameter: a momentum buffer when there is momentum.
pub(super) fn sgd_fields(h: &SgdHyper) -> Vec<Field> {
    if h.momentum != 0.0 {
        vec![MOMENTUM_BUFFER]
    } else {
        Vec::new()
    }
}

/// PyTorch's checks of `torch.optim.SGD`, with its wording ("Invalid momentum value",
/// "Invalid weight_decay value", "Nesterov momentum requires a momentum and zero
/// dampening").
pub(super) fn validate_sgd(h: &SgdHyper) -> Result<()> {
    non_negative("momentum", h.momentum, "Invalid momentum value")?;
    non_negative("weight_decay", h.weight_decay, "Invalid weight_decay value")?;
    non_negative("dampening", h.dampening, "Invalid dampening value")?;
    if h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0) {
        return Err(Error::InvalidConfig {
            field: "nesterov",
            value: format!(
                "true with momentum {} and dampening {}",
                h.momentum, h.dampening
            ),
            allowed: "Nesterov momentum requires a momentum and zero dampening",
        });
    }
    Ok(())
}

//! [`FusedAdamW`]: `torch.optim.AdamW(fused=True)` over libtorch's `_fused_adamw_`.
use super::fused::{fused_optimizer, kernel_options, Fused, GroupStep, Kernel};
use super::param_group::{adam_group, load_adam, ParamGroup};
use super::slots::{Field, Shape};
use super::{amp_on, non_negative, Amp};
use crate::error::{Error, Result};
use crate::native::{self, AdamHyper, AdamLists};
use crate::params::{GradBatch, GradGroup, Params};
use tch::{Device, Kind};

/// AdamW with decoupled weight decay, computed by libtorch's `_fused_adamw_` exactly as
/// `torch.optim.AdamW(params, fused=True)` computes it, on CPU and CUDA.
///
/// After folded clipping under `16-mixed` (see [`crate::GradScalerConfig::fold_clipping`]),
/// float32 CPU parameters take tch-fabric's own AdamW kernel (`tch_fabric::adamw_folded_`):
/// the same formula, but it reads the still-scaled gradients without writing them back
/// unscaled as `_fused_adamw_` does, which saves a pass over memory. The gradients then keep
/// their scaled values after the step.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::{FusedAdamW, Optimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = FusedAdamW::new(&vs, 1e-2)?.weight_decay(0.0);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors()?.len(), 6); // exp_avg, exp_avg_sq, step for 2 parameters
/// assert!(FusedAdamW::new(&vs, f64::NAN).is_err());
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct FusedAdamW {
    fused: Fused<AdamHyper>,
}

pub(super) const EXP_AVG: Field = Field {
    name: "exp_avg",
    shape: Shape::LikeParam,
};
pub(super) const EXP_AVG_SQ: Field = Field {
    name: "exp_avg_sq",
    shape: Shape::LikeParam,
};
pub(super) const MAX_EXP_AVG_SQ: Field = Field {
    name: "max_exp_avg_sq",
    shape: Shape::LikeParam,
};
const STEP: Field = Field {
    name: "step",
    shape: Shape::Scalar,
};

fused_optimizer!(
    FusedAdamW,
    AdamHyper {
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 1e-2,
        eps: 1e-8,
        amsgrad: false,
        maximize: false,
    },
    "AdamW over the trainable variables of `vs` with PyTorch's defaults: betas (0.9, 0.999), \
     eps 1e-8, weight decay 0.01.",
    "The decoupled weight decay (>= 0)."
);

kernel_options!(FusedAdamW {
    /// The coefficients of the running averages (each in [0, 1)).
    fn betas(beta1: f64, beta2: f64) => h { (h.beta1, h.beta2) = (beta1, beta2) }
    /// The term added to the denominator (>= 0).
    fn eps(eps: f64) => h { h.eps = eps }
    /// The AMSGrad variant.
    fn amsgrad(amsgrad: bool) => h { h.amsgrad = amsgrad }
});

/// Whether the group's parameters and gradients are contiguous (tch-fabric's kernel needs them
/// so).
fn contiguous(params: &Params, grads: &GradBatch, group: &GradGroup) -> Result<bool> {
    let metas = native::metas(group.indices.iter().map(|&i| &params.tensors()[i]))?;
    Ok(metas.iter().all(|m| m.is_some_and(|m| m.contiguous))
        && group
            .indices
            .iter()
            .all(|&i| grads.meta(i).is_some_and(|m| m.contiguous)))
}

impl Kernel for AdamHyper {
    const OP: &'static str = "_fused_adamw_";
    const AMP: bool = true;

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
        adam_group(self, true, None, true)
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        load_adam(group, self, true, None)
    }

    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        let (grads, group) = (step.grads, step.group);
        let lists = adam_lists(self, step, &STEP)?;
        let (scale, inf) = amp_on(step.amp, group.device)?;
        let own_kernel = matches!(step.amp, Amp::Folded { .. })
            && !self.amsgrad
            && group.device == Device::Cpu
            && group.kind == Kind::Float
            && contiguous(step.params, grads, group)?;
        // PyTorch counts the step first and takes a skipped step back afterwards, on the
        // device, so a skip never advances the count and nothing waits for the host.
        native::foreach_add_scalar(&lists.steps, 1.0)?;
        let ran = match (&scale, &inf) {
            (Some(divisor), Some(found)) if own_kernel => {
                native::adamw_folded(&lists, step.lr, self, divisor, found)
            }
            _ => native::fused_adamw(&lists, step.lr, self, scale.as_deref(), inf.as_deref()),
        };
        if let Err(e) = ran {
            // Leave the step counts as they were: the failed step did not happen.
            native::foreach_add_scalar(&lists.steps, -1.0)?;
            return Err(e);
        }
        if let Some(inf) = &inf {
            native::foreach_sub_tensor(&lists.steps, inf)?;
        }
        Ok(())
    }
}

/// The state of an Adam parameter, the step count (`step`, on the device or the host) saved
/// last: a parameter has state when its `exp_avg` is there.
pub(super) fn adam_fields(h: &AdamHyper, step: Field) -> Vec<Field> {
    if h.amsgrad {
        vec![EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, step]
    } else {
        vec![EXP_AVG, EXP_AVG_SQ, step]
    }
}

/// One group's tensor lists for an Adam kernel, the step counts from `step`.
pub(super) fn adam_lists<'a>(
    h: &AdamHyper,
    step: &'a GroupStep<'a>,
    step_field: &Field,
) -> Result<AdamLists<'a>> {
    let (state, group) = (step.state, step.group);
    Ok(AdamLists {
        params: step.params(),
        grads: step.grads.tensors(group),
        exp_avgs: state.all(group, &EXP_AVG)?,
        exp_avg_sqs: state.all(group, &EXP_AVG_SQ)?,
        max_exp_avg_sqs: if h.amsgrad {
            state.all(group, &MAX_EXP_AVG_SQ)?
        } else {
            Vec::new()
        },
        steps: state.all(group, step_field)?,
    })
}

/// PyTorch's checks of `torch.optim.Adam` and `AdamW`.
pub(super) fn validate_adam(h: &AdamHyper) -> Result<()> {
    non_negative("eps", h.eps, "Invalid epsilon value: finite and >= 0")?;
    for (field, beta, allowed) in [
        (
            "beta1",
            h.beta1,
            "Invalid beta parameter at index 0: in [0, 1)",
        ),
        (
            "beta2",
            h.beta2,
            "Invalid beta parameter at index 1: in [0, 1)",
        ),
    ] {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::InvalidConfig {
                field,
                value: beta.to_string(),
                allowed,
            });
        }
    }
    non_negative(
        "weight_decay",
        h.weight_decay,
        "Invalid weight_decay value: finite and >= 0",
    )
}

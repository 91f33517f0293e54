//! [`FusedAdamW`]: `torch.optim.AdamW(fused=True)` over libtorch's `_fused_adamw_`.
use super::slots::{Field, Fresh, Shape, Slots};
use super::{amp_on, check_fused_groups, non_negative, Amp, Optimizer};
use crate::error::{Error, Result};
use crate::native::{self, AdamHyper, AdamLists};
use crate::params::{GradBatch, GradGroup, Params};
use tch::{nn, Device, Kind, Tensor};

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
    params: Params,
    slots: Slots,
    hyper: AdamHyper,
}

const EXP_AVG: Field = Field {
    name: "exp_avg",
    shape: Shape::LikeParam,
};
const EXP_AVG_SQ: Field = Field {
    name: "exp_avg_sq",
    shape: Shape::LikeParam,
};
const MAX_EXP_AVG_SQ: Field = Field {
    name: "max_exp_avg_sq",
    shape: Shape::LikeParam,
};
/// Saved last: a parameter has state when its `exp_avg` is there.
const STEP: Field = Field {
    name: "step",
    shape: Shape::Scalar,
};

fn fields(amsgrad: bool) -> Vec<Field> {
    if amsgrad {
        vec![EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP]
    } else {
        vec![EXP_AVG, EXP_AVG_SQ, STEP]
    }
}

impl FusedAdamW {
    /// AdamW over the trainable variables of `vs` with PyTorch's defaults: betas (0.9,
    /// 0.999), eps 1e-8, weight decay 0.01.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's "Invalid learning
    /// rate"); the errors of [`Params::from_var_store`].
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        Self::with_params(Params::from_var_store(vs)?, lr)
    }

    /// AdamW over an explicit parameter list.
    ///
    /// # Errors
    ///
    /// As [`FusedAdamW::new`].
    pub fn with_params(params: Params, lr: f64) -> Result<Self> {
        check_lr(lr)?;
        Ok(FusedAdamW {
            slots: Slots::new(params.len(), fields(false)),
            params,
            hyper: AdamHyper {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                weight_decay: 1e-2,
                eps: 1e-8,
                amsgrad: false,
                maximize: false,
            },
        })
    }

    /// The coefficients of the running averages (each in [0, 1)).
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.hyper.beta1 = beta1;
        self.hyper.beta2 = beta2;
        self
    }

    /// The term added to the denominator (>= 0).
    pub fn eps(mut self, eps: f64) -> Self {
        self.hyper.eps = eps;
        self
    }

    /// The decoupled weight decay (>= 0).
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.hyper.weight_decay = wd;
        self
    }

    /// The AMSGrad variant.
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.hyper.amsgrad = amsgrad;
        self.slots.set_fields(fields(amsgrad));
        self
    }

    /// Maximise the objective instead of minimising it.
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.hyper.maximize = maximize;
        self
    }

    fn group_step(
        &self,
        grads: &GradBatch,
        group: &GradGroup,
        fresh: &Fresh,
        amp: &Amp<'_>,
    ) -> Result<()> {
        let state = |i: usize| self.slots.of(fresh, i).unwrap_or(&[]);
        let field = |i: usize, f: &str| {
            self.slots
                .field(state(i), f)
                .ok_or_else(|| Error::native("_fused_adamw_", "state was not created"))
        };
        let collect = |f: &str| -> Result<Vec<&Tensor>> {
            group.indices.iter().map(|&i| field(i, f)).collect()
        };
        let lists = AdamLists {
            params: group
                .indices
                .iter()
                .map(|&i| &self.params.tensors()[i])
                .collect(),
            grads: grads.tensors(group),
            exp_avgs: collect(EXP_AVG.name)?,
            exp_avg_sqs: collect(EXP_AVG_SQ.name)?,
            max_exp_avg_sqs: if self.hyper.amsgrad {
                collect(MAX_EXP_AVG_SQ.name)?
            } else {
                Vec::new()
            },
            steps: collect(STEP.name)?,
        };
        let (scale, inf) = amp_on(amp, group.device)?;
        let own_kernel = matches!(amp, Amp::Folded { .. })
            && !self.hyper.amsgrad
            && group.device == Device::Cpu
            && group.kind == Kind::Float
            && self.contiguous(grads, group)?;
        // PyTorch counts the step first and takes a skipped step back afterwards, on the
        // device, so a skip never advances the count and nothing waits for the host.
        native::foreach_add_scalar(&lists.steps, 1.0)?;
        let ran = match (&scale, &inf) {
            (Some(divisor), Some(found)) if own_kernel => {
                native::adamw_folded(&lists, &self.hyper, divisor, found)
            }
            _ => native::fused_adamw(&lists, &self.hyper, scale.as_deref(), inf.as_deref()),
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

    /// Whether the group's parameters and gradients are contiguous (tch-fabric's kernel needs
    /// them so).
    fn contiguous(&self, grads: &GradBatch, group: &GradGroup) -> Result<bool> {
        let params = native::metas(group.indices.iter().map(|&i| &self.params.tensors()[i]))?;
        Ok(params.iter().all(|m| m.is_some_and(|m| m.contiguous))
            && group
                .indices
                .iter()
                .all(|&i| grads.meta(i).is_some_and(|m| m.contiguous)))
    }
}

fn check_lr(lr: f64) -> Result<()> {
    non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

impl Optimizer for FusedAdamW {
    fn params(&self) -> &Params {
        &self.params
    }

    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        self.validate()?;
        check_fused_groups("_fused_adamw_", grads)?;
        let fresh = self.slots.fresh(&self.params, grads)?;
        for group in grads.groups() {
            self.group_step(grads, group, &fresh, &amp)?;
        }
        self.slots.commit(fresh);
        Ok(())
    }

    fn supports_amp_scaling(&self) -> bool {
        true
    }

    fn lr(&self) -> f64 {
        self.hyper.lr
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.hyper.lr = lr;
        Ok(())
    }

    /// PyTorch's checks of `torch.optim.AdamW`.
    fn validate(&self) -> Result<()> {
        let h = &self.hyper;
        check_lr(h.lr)?;
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

    /// `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.max_exp_avg_sq` (AMSGrad) and
    /// `<param>.step` for every parameter that has stepped.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.slots.state_tensors(&self.params))
    }

    fn check_state(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.slots.prepare_load(&self.params, tensors).map(|_| ())
    }

    fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let prepared = self.slots.prepare_load(&self.params, tensors)?;
        self.slots.commit_load(prepared);
        Ok(())
    }
}

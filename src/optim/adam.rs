//! The Adam family: `torch.optim.AdamW(fused=True)` ([`FusedAdamW`]), and `torch.optim.AdamW()`
//! and `torch.optim.Adam()` without it ([`AdamW`], [`Adam`]: PyTorch's for-loop and foreach
//! paths, op for op in the shim). One kernel with a fused / for-loop / foreach switch, one
//! generic type ([`AdamFamily`]) for the three.
use super::group::{Group, GroupOptions};
use super::param_group::{adam_group, load_adam, ParamGroup};
use super::rounding::Rounding;
use super::slots::{Field, Shape};
use super::stepper::{unscaled_only, GroupStep, Impl, Kernel, Stepped, Stepper};
use super::{non_negative, Amp, Params};
use crate::error::{Error, Result};
use crate::native::{self, AdamHyper, AdamLists};
use tch::{nn, Device, Kind};

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
/// The step count of a fused optimizer: on the parameter's device.
const STEP_ON_DEVICE: Field = Field {
    name: "step",
    shape: Shape::Scalar,
};
/// The step count of PyTorch's for-loop optimizers: on the CPU, read by the host every step.
const STEP_ON_HOST: Field = Field {
    name: "step",
    shape: Shape::HostScalar,
};

/// The Adam algorithm: its hyper-parameters, AdamW's decoupled weight decay or Adam's L2
/// penalty, and which of PyTorch's implementations runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamKernel {
    hyper: AdamHyper,
    decoupled: bool,
    implementation: Impl,
    /// How bfloat16 parameters are written back (fused only).
    rounding: Rounding,
}

impl AdamKernel {
    fn step_field(&self) -> Field {
        match self.implementation {
            Impl::Fused => STEP_ON_DEVICE,
            Impl::ForLoop { .. } => STEP_ON_HOST,
        }
    }

    /// One group's tensor lists.
    fn lists<'a>(&self, step: &'a GroupStep<'a>) -> Result<AdamLists<'a>> {
        let (state, group) = (step.state, step.group);
        Ok(AdamLists {
            params: step.params(),
            grads: step.grads.tensors(group),
            exp_avgs: state.all(group, &EXP_AVG)?,
            exp_avg_sqs: state.all(group, &EXP_AVG_SQ)?,
            max_exp_avg_sqs: if self.hyper.amsgrad {
                state.all(group, &MAX_EXP_AVG_SQ)?
            } else {
                Vec::new()
            },
            steps: state.all(group, &self.step_field())?,
        })
    }

    /// `_fused_adamw_`, or after folded clipping (float32 CPU, contiguous, no AMSGrad)
    /// tch-fabric's `adamw_folded_`, which reads the still-scaled gradients without writing them
    /// back unscaled.
    fn run_fused(&self, step: &GroupStep<'_>) -> Result<()> {
        let group = step.group;
        let lists = self.lists(step)?;
        let (scale, inf) = step.amp_tensors()?;
        let folded_kernel = matches!(step.amp, Amp::Folded { .. })
            && self.decoupled
            && !self.hyper.amsgrad
            && group.device == Device::Cpu
            && group.kind == Kind::Float
            && self.contiguous(step)?;
        // PyTorch counts the step first and takes a skipped step back afterwards, on the
        // device, so a skip never advances the count and nothing waits for the host.
        let rounded = self.rounding.lists(step)?;
        native::foreach_add_scalar(&lists.steps, 1.0)?;
        let ran = match (&scale, &inf, &rounded) {
            (_, _, Some(r)) => native::adamw_rounded(
                &lists,
                r,
                step.lr,
                &self.hyper,
                scale.as_deref(),
                inf.as_deref(),
            ),
            (Some(divisor), Some(found), None) if folded_kernel => {
                native::adamw_folded(&lists, step.lr, &self.hyper, divisor, found)
            }
            _ => native::fused_adamw(
                &lists,
                step.lr,
                &self.hyper,
                scale.as_deref(),
                inf.as_deref(),
            ),
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

    /// Whether the group's parameters and gradients are contiguous (the folded kernel needs
    /// them so): known from the fetch, or asked when the gradients came from elsewhere.
    fn contiguous(&self, step: &GroupStep<'_>) -> Result<bool> {
        let indices = &step.group.indices;
        if let Some(known) = step.grads.all_contiguous(indices) {
            return Ok(known);
        }
        let params = native::metas(step.params())?;
        Ok(params.iter().all(|m| m.is_some_and(|m| m.contiguous))
            && indices
                .iter()
                .all(|&i| step.grads.meta(i).is_some_and(|m| m.contiguous)))
    }
}

impl Kernel for AdamKernel {
    fn op(&self) -> &'static str {
        match self.implementation {
            Impl::Fused => "_fused_adamw_",
            Impl::ForLoop { .. } => "_single_tensor_adam",
        }
    }

    fn supports_amp(&self) -> bool {
        self.implementation == Impl::Fused
    }

    /// The step count (`step`, on the device or the host) saved last: a parameter has state
    /// when its `exp_avg` is there.
    fn fields(&self) -> Vec<Field> {
        let mut fields = vec![EXP_AVG, EXP_AVG_SQ];
        if self.hyper.amsgrad {
            fields.push(MAX_EXP_AVG_SQ);
        }
        fields.extend(self.rounding.fields());
        fields.push(self.step_field());
        fields
    }

    /// PyTorch's checks of `torch.optim.Adam` and `AdamW`.
    fn validate(&self) -> Result<()> {
        self.rounding.validate()?;
        let h = &self.hyper;
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

    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        match self.implementation {
            Impl::Fused => self.run_fused(step),
            Impl::ForLoop { .. } => {
                if !matches!(step.amp, Amp::None) {
                    return Err(unscaled_only(self.op()));
                }
                let foreach = self.implementation.foreach_on(step.group.device);
                let lists = self.lists(step)?;
                native::adam_for_loop(&lists, step.lr, &self.hyper, self.decoupled, foreach)
            }
        }
    }

    fn momentum(&self) -> f64 {
        self.hyper.beta1
    }

    fn set_momentum(&mut self, momentum: f64) {
        self.hyper.beta1 = momentum;
    }

    fn check_kind(&self, kind: Kind) -> Result<()> {
        self.rounding.check_kind(kind)
    }

    fn param_group(&self) -> ParamGroup {
        let fused = self.implementation == Impl::Fused;
        let mut g = adam_group(
            &self.hyper,
            self.decoupled,
            self.implementation.foreach(),
            fused,
        );
        self.rounding.save(&mut g);
        g
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        let mut foreach = self.implementation.foreach();
        load_adam(group, &mut self.hyper, self.decoupled, &mut foreach)?;
        self.rounding.load(group)?;
        if let Impl::ForLoop { .. } = self.implementation {
            self.implementation = Impl::ForLoop { foreach };
        }
        Ok(())
    }

    fn apply(&mut self, o: &GroupOptions) -> Result<()> {
        let name = if self.decoupled { "AdamW" } else { "Adam" };
        o.only(
            name,
            &["weight_decay", "betas", "eps", "amsgrad", "maximize"],
        )?;
        let h = &mut self.hyper;
        h.weight_decay = o.weight_decay.unwrap_or(h.weight_decay);
        (h.beta1, h.beta2) = o.betas.unwrap_or((h.beta1, h.beta2));
        h.eps = o.eps.unwrap_or(h.eps);
        h.amsgrad = o.amsgrad.unwrap_or(h.amsgrad);
        h.maximize = o.maximize.unwrap_or(h.maximize);
        Ok(())
    }
}

/// The Adam family as PyTorch's `torch.optim` has it: `FUSED` selects `fused=True`, `DECOUPLED`
/// AdamW's weight decay. Use it through its names: [`FusedAdamW`], [`AdamW`], [`Adam`].
///
/// Builder options set the hyper-parameters; they are checked when the optimizer is set up or
/// steps (PyTorch's messages).
#[derive(Debug)]
pub struct AdamFamily<const FUSED: bool, const DECOUPLED: bool> {
    stepper: Stepper<AdamKernel>,
}

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
/// use tch_fabric::optim::OptimizerState;
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
pub type FusedAdamW = AdamFamily<true, true>;

/// `torch.optim.AdamW(params, lr)` with PyTorch's defaults, computed as PyTorch computes it
/// without `fused=True`: the for-loop implementation it picks on CPU, or the foreach one
/// ([`AdamFamily::foreach`]). Bit for bit with `torch.optim.AdamW` (and `foreach=True`) in every
/// precision on CPU. Under `16-mixed` the GradScaler unscales and checks the gradients
/// before the step (PyTorch's path for optimizers without AMP support).
///
/// Prefer [`FusedAdamW`] for speed; this one is for matching a PyTorch run that used the
/// default.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::optim::OptimizerState;
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
pub type AdamW = AdamFamily<false, true>;

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
pub type Adam = AdamFamily<false, false>;

impl<const FUSED: bool, const DECOUPLED: bool> Stepped for AdamFamily<FUSED, DECOUPLED> {
    type Kernel = AdamKernel;
    fn stepper(&self) -> &Stepper<AdamKernel> {
        &self.stepper
    }
    fn stepper_mut(&mut self) -> &mut Stepper<AdamKernel> {
        &mut self.stepper
    }
}

impl<const FUSED: bool, const DECOUPLED: bool> AdamFamily<FUSED, DECOUPLED> {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01 for AdamW and 0
    /// for Adam.
    fn build(params: Params, lr: f64) -> Result<Self> {
        let kernel = AdamKernel {
            hyper: AdamHyper {
                beta1: 0.9,
                beta2: 0.999,
                weight_decay: if DECOUPLED { 1e-2 } else { 0.0 },
                eps: 1e-8,
                amsgrad: false,
                maximize: false,
            },
            decoupled: DECOUPLED,
            implementation: if FUSED {
                Impl::Fused
            } else {
                Impl::ForLoop { foreach: None }
            },
            rounding: Rounding::default(),
        };
        Ok(AdamFamily {
            stepper: Stepper::new(params, lr, kernel)?,
        })
    }

    fn configure(mut self, change: impl FnOnce(&mut AdamKernel)) -> Self {
        self.stepper.configure(change);
        self
    }

    /// The coefficients of the running averages (each in [0, 1)).
    pub fn betas(self, beta1: f64, beta2: f64) -> Self {
        self.configure(|k| (k.hyper.beta1, k.hyper.beta2) = (beta1, beta2))
    }

    /// The term added to the denominator (>= 0).
    pub fn eps(self, eps: f64) -> Self {
        self.configure(|k| k.hyper.eps = eps)
    }

    /// The AMSGrad variant.
    pub fn amsgrad(self, amsgrad: bool) -> Self {
        self.configure(|k| k.hyper.amsgrad = amsgrad)
    }

    /// The weight decay (>= 0): decoupled for AdamW, the L2 penalty added to the gradient for
    /// Adam.
    pub fn weight_decay(self, weight_decay: f64) -> Self {
        self.configure(|k| k.hyper.weight_decay = weight_decay)
    }

    /// Maximise the objective instead of minimising it.
    pub fn maximize(self, maximize: bool) -> Self {
        self.configure(|k| k.hyper.maximize = maximize)
    }

    /// PyTorch's param groups (`AdamW([{"params": ..., "weight_decay": 0.1}, ...])`): each
    /// [`Group`] takes its parameters and sets the options it names; every other option is the
    /// optimizer's (set before or after this call). Set before the first step.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a parameter in two groups or in none, a name that is
    /// not a parameter, an option Adam does not have (`momentum`), or a refused value;
    /// [`crate::Error::Usage`] after the first step. The optimizer is unchanged then.
    pub fn param_groups(mut self, groups: impl IntoIterator<Item = Group>) -> Result<Self> {
        self.stepper.set_groups(groups.into_iter().collect())?;
        Ok(self)
    }
}

impl AdamFamily<true, true> {
    /// [`FusedAdamW`] over the trainable variables of `vs` with PyTorch's defaults: betas
    /// (0.9, 0.999), eps 1e-8, weight decay 0.01.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's "Invalid
    /// learning rate"); the errors of [`Params::from_var_store`].
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        Self::build(Params::from_var_store(vs)?, lr)
    }

    /// The same over an explicit parameter list.
    ///
    /// # Errors
    ///
    /// As [`FusedAdamW::new`].
    pub fn with_params(params: Params, lr: f64) -> Result<Self> {
        Self::build(params, lr)
    }

    /// Stochastic rounding of bfloat16 parameters: each new weight is computed in float32 and
    /// rounded to one of its two neighbouring bfloat16 values with probability proportional to
    /// the distance, so updates smaller than half a bfloat16 ulp survive in expectation and
    /// `bf16-true` trains like `32-true`. The moments stay bfloat16, rounded to nearest (as
    /// torchao's `_AdamW(bf16_stochastic_round=True)` keeps them). The random bits are keyed by
    /// (`seed`, parameter position, step, element): the same for any thread count, and resumed
    /// exactly, since checkpoints keep the seed (`stochastic_rounding_seed` in the param group)
    /// and the step counts. float32 parameters step as without it; float16 ones are refused at
    /// the step. Not together with [`FusedAdamW::kahan_summation`].
    ///
    /// ```
    /// use tch::{nn, Device, Kind};
    /// use tch_fabric::{FusedAdamW, Optimizer};
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let _layer = nn::linear(vs.root() / "fc", 4, 1, Default::default());
    /// vs.bfloat16();
    /// let opt = FusedAdamW::new(&vs, 1e-3)?.stochastic_rounding(42);
    /// assert!(opt.validate().is_ok());
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    pub fn stochastic_rounding(self, seed: u64) -> Self {
        self.configure(|k| k.rounding.stochastic = Some(seed))
    }

    /// Kahan-compensated updates of bfloat16 parameters: what rounding the new weight to
    /// bfloat16 drops is kept in a bfloat16 buffer per parameter (state field `kahan_comp`,
    /// counted as optimizer state in [`crate::Fabric::memory_report`] and saved in checkpoints)
    /// and added to the next update. Deterministic, without random bits, for 2 more bytes per
    /// parameter. float32 parameters step as without it (their buffer stays zero); float16 ones
    /// are refused at the step. Set before the first step; not together with
    /// [`FusedAdamW::stochastic_rounding`].
    pub fn kahan_summation(self, kahan: bool) -> Self {
        self.configure(|k| k.rounding.kahan = kahan)
    }
}

impl<const DECOUPLED: bool> AdamFamily<false, DECOUPLED> {
    /// [`AdamW`] or [`Adam`] over the trainable variables of `vs` with PyTorch's defaults:
    /// betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (AdamW) or none (Adam).
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's "Invalid
    /// learning rate"); the errors of [`Params::from_var_store`].
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        Self::build(Params::from_var_store(vs)?, lr)
    }

    /// The same over an explicit parameter list.
    ///
    /// # Errors
    ///
    /// As [`AdamFamily::new`].
    pub fn with_params(params: Params, lr: f64) -> Result<Self> {
        Self::build(params, lr)
    }

    /// PyTorch's `foreach`: `true` runs `_multi_tensor_adam` (libtorch's `_foreach_` ops),
    /// `false` `_single_tensor_adam`. Unset, PyTorch's default: foreach for CUDA parameters
    /// (decided per device), the for-loop on CPU. On CPU in float16 and bfloat16 the two
    /// round differently, as in PyTorch.
    pub fn foreach(self, foreach: bool) -> Self {
        self.configure(|k| {
            k.implementation = Impl::ForLoop {
                foreach: Some(foreach),
            }
        })
    }
}

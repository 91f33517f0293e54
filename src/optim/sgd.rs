//! SGD: `torch.optim.SGD(fused=True)` over libtorch's `_fused_sgd_` ([`FusedSgd`]), and
//! `torch.optim.SGD()` without it ([`Sgd`]: PyTorch's `_single_tensor_sgd` and
//! `_multi_tensor_sgd`, op for op in the shim). One kernel with a fused / for-loop / foreach
//! switch, one generic type ([`SgdFamily`]) for both.
use super::group::{Group, GroupOptions};
use super::param_group::{load_sgd, sgd_group, ParamGroup};
use super::rounding::Rounding;
use super::slots::{Field, Shape};
use super::stepper::{unscaled_only, GroupStep, Impl, Kernel, Stepped, Stepper};
use super::{non_negative, Amp, Params};
use crate::error::{Error, Result};
use crate::native::{self, Rounded, SgdHyper};
use crate::params::group_by;
use tch::{nn, Tensor};

const MOMENTUM_BUFFER: Field = Field {
    name: "momentum_buffer",
    shape: Shape::LikeParam,
};
/// The step count, kept only with stochastic rounding (its random bits are keyed by the step;
/// PyTorch's SGD counts no steps): on the parameter's device, as the fused Adam's.
const STEP: Field = Field {
    name: "step",
    shape: Shape::Scalar,
};

/// The SGD algorithm: its hyper-parameters and which of PyTorch's implementations runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SgdKernel {
    hyper: SgdHyper,
    implementation: Impl,
    /// How bfloat16 parameters are written back (fused only).
    rounding: Rounding,
}

impl SgdKernel {
    /// The momentum buffers of `indices` (none without momentum).
    fn buffers<'a>(&self, step: &'a GroupStep<'a>, indices: &[usize]) -> Result<Vec<&'a Tensor>> {
        if self.hyper.momentum == 0.0 {
            return Ok(Vec::new());
        }
        indices
            .iter()
            .map(|&i| step.state.get(i, &MOMENTUM_BUFFER))
            .collect()
    }

    /// Fresh and older momentum buffers go to separate kernel calls: the kernel's
    /// `is_first_step` covers a whole call.
    fn run_fused(&self, step: &GroupStep<'_>) -> Result<()> {
        let (state, group) = (step.state, step.group);
        let (scale, inf) = step.amp_tensors()?;
        if self.rounding.stochastic.is_none() {
            return self.run_fused_calls(step, &[], scale.as_deref(), inf.as_deref());
        }
        let steps = state.all(group, &STEP)?;
        // Counted first and taken back on a skipped step, as the fused Adam does.
        native::foreach_add_scalar(&steps, 1.0)?;
        if let Err(e) = self.run_fused_calls(step, &steps, scale.as_deref(), inf.as_deref()) {
            native::foreach_add_scalar(&steps, -1.0)?;
            return Err(e);
        }
        if let Some(inf) = &inf {
            native::foreach_sub_tensor(&steps, inf)?;
        }
        Ok(())
    }

    fn run_fused_calls(
        &self,
        step: &GroupStep<'_>,
        steps: &[&Tensor],
        scale: Option<&Tensor>,
        inf: Option<&Tensor>,
    ) -> Result<()> {
        let (state, grads, group) = (step.state, step.grads, step.group);
        let rounded = self.rounding.lists(step)?;
        let fresh = group_by(group.indices.iter().map(|&i| Some(state.is_fresh(i))));
        for (first, positions) in fresh {
            let indices: Vec<usize> = positions.iter().map(|&k| group.indices[k]).collect();
            let p: Vec<&Tensor> = indices.iter().map(|&i| &step.params.tensors()[i]).collect();
            let g: Vec<&Tensor> = indices.iter().filter_map(|&i| grads.get(i)).collect();
            let buffers = self.buffers(step, &indices)?;
            let Some(r) = &rounded else {
                native::fused_sgd(&p, &g, &buffers, step.lr, &self.hyper, first, scale, inf)?;
                continue;
            };
            // This call's share of the group's lists.
            let part = Rounded {
                mode: r.mode,
                positions: positions.iter().map(|&k| r.positions[k]).collect(),
                comps: positions
                    .iter()
                    .filter_map(|&k| r.comps.get(k).copied())
                    .collect(),
            };
            let part_steps: Vec<&Tensor> = positions
                .iter()
                .filter_map(|&k| steps.get(k).copied())
                .collect();
            native::sgd_rounded(
                &p,
                &g,
                &buffers,
                &part_steps,
                &part,
                step.lr,
                &self.hyper,
                first,
                scale,
                inf,
            )?;
        }
        Ok(())
    }
}

impl Kernel for SgdKernel {
    fn op(&self) -> &'static str {
        match self.implementation {
            Impl::Fused => "_fused_sgd_",
            Impl::ForLoop { .. } => "_single_tensor_sgd",
        }
    }

    fn supports_amp(&self) -> bool {
        self.implementation == Impl::Fused
    }

    /// A momentum buffer when there is momentum; Kahan's buffer, and the step count that keys
    /// stochastic rounding's random bits, with those options.
    fn fields(&self) -> Vec<Field> {
        let mut fields = Vec::new();
        if self.hyper.momentum != 0.0 {
            fields.push(MOMENTUM_BUFFER);
        }
        fields.extend(self.rounding.fields());
        if self.rounding.stochastic.is_some() {
            fields.push(STEP);
        }
        fields
    }

    /// PyTorch's checks of `torch.optim.SGD`, with its wording ("Invalid momentum value",
    /// "Invalid weight_decay value", "Nesterov momentum requires a momentum and zero
    /// dampening").
    fn validate(&self) -> Result<()> {
        self.rounding.validate()?;
        let h = &self.hyper;
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

    fn run_group(&self, step: &GroupStep<'_>) -> Result<()> {
        if self.implementation == Impl::Fused {
            return self.run_fused(step);
        }
        if !matches!(step.amp, Amp::None) {
            return Err(unscaled_only(self.op()));
        }
        let (state, group) = (step.state, step.group);
        let fresh: Vec<bool> = group.indices.iter().map(|&i| state.is_fresh(i)).collect();
        native::sgd_for_loop(
            &step.params(),
            &step.grads.tensors(group),
            &self.buffers(step, &group.indices)?,
            &fresh,
            step.lr,
            &self.hyper,
            self.implementation.foreach_on(group.device),
        )
    }

    fn momentum(&self) -> f64 {
        self.hyper.momentum
    }

    fn set_momentum(&mut self, momentum: f64) {
        self.hyper.momentum = momentum;
    }

    fn check_kind(&self, kind: tch::Kind) -> Result<()> {
        self.rounding.check_kind(kind)
    }

    fn param_group(&self) -> ParamGroup {
        let fused = self.implementation == Impl::Fused;
        let mut g = sgd_group(&self.hyper, self.implementation.foreach(), fused);
        self.rounding.save(&mut g);
        g
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        let mut foreach = self.implementation.foreach();
        load_sgd(group, &mut self.hyper, &mut foreach)?;
        self.rounding.load(group)?;
        if let Impl::ForLoop { .. } = self.implementation {
            self.implementation = Impl::ForLoop { foreach };
        }
        Ok(())
    }

    fn apply(&mut self, o: &GroupOptions) -> Result<()> {
        o.only(
            "SGD",
            &[
                "weight_decay",
                "momentum",
                "dampening",
                "nesterov",
                "maximize",
            ],
        )?;
        let h = &mut self.hyper;
        h.weight_decay = o.weight_decay.unwrap_or(h.weight_decay);
        h.momentum = o.momentum.unwrap_or(h.momentum);
        h.dampening = o.dampening.unwrap_or(h.dampening);
        h.nesterov = o.nesterov.unwrap_or(h.nesterov);
        h.maximize = o.maximize.unwrap_or(h.maximize);
        Ok(())
    }
}

/// SGD as PyTorch's `torch.optim.SGD` has it: `FUSED` selects `fused=True`. Use it through its
/// names: [`FusedSgd`], [`Sgd`].
///
/// A parameter's momentum buffer starts as its first step's gradient, as in PyTorch. Builder
/// options set the hyper-parameters; they are checked when the optimizer is set up or steps
/// (PyTorch's messages).
#[derive(Debug)]
pub struct SgdFamily<const FUSED: bool> {
    stepper: Stepper<SgdKernel>,
}

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
/// use tch_fabric::optim::OptimizerState;
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
pub type FusedSgd = SgdFamily<true>;

/// `torch.optim.SGD(params, lr)` with PyTorch's defaults (no momentum, dampening, weight
/// decay or Nesterov), computed as PyTorch computes it without `fused=True`: the for-loop
/// implementation or the foreach one ([`SgdFamily::foreach`]), bit for bit on CPU in every
/// precision.
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// use tch_fabric::optim::OptimizerState;
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
pub type Sgd = SgdFamily<false>;

impl<const FUSED: bool> Stepped for SgdFamily<FUSED> {
    type Kernel = SgdKernel;
    fn stepper(&self) -> &Stepper<SgdKernel> {
        &self.stepper
    }
    fn stepper_mut(&mut self) -> &mut Stepper<SgdKernel> {
        &mut self.stepper
    }
}

impl<const FUSED: bool> SgdFamily<FUSED> {
    /// SGD over the trainable variables of `vs` with PyTorch's defaults: no momentum, no
    /// dampening, no weight decay, no Nesterov.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's "Invalid
    /// learning rate"); the errors of [`Params::from_var_store`].
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        Self::with_params(Params::from_var_store(vs)?, lr)
    }

    /// The same over an explicit parameter list.
    ///
    /// # Errors
    ///
    /// As [`SgdFamily::new`].
    pub fn with_params(params: Params, lr: f64) -> Result<Self> {
        let kernel = SgdKernel {
            hyper: SgdHyper {
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
                maximize: false,
            },
            implementation: if FUSED {
                Impl::Fused
            } else {
                Impl::ForLoop { foreach: None }
            },
            rounding: Rounding::default(),
        };
        Ok(SgdFamily {
            stepper: Stepper::new(params, lr, kernel)?,
        })
    }

    fn configure(mut self, change: impl FnOnce(&mut SgdKernel)) -> Self {
        self.stepper.configure(change);
        self
    }

    /// The momentum factor (>= 0).
    pub fn momentum(self, momentum: f64) -> Self {
        self.configure(|k| k.hyper.momentum = momentum)
    }

    /// The dampening of the momentum (>= 0).
    pub fn dampening(self, dampening: f64) -> Self {
        self.configure(|k| k.hyper.dampening = dampening)
    }

    /// Nesterov momentum (needs momentum > 0 and zero dampening).
    pub fn nesterov(self, nesterov: bool) -> Self {
        self.configure(|k| k.hyper.nesterov = nesterov)
    }

    /// The L2 penalty added to the gradient (>= 0).
    pub fn weight_decay(self, weight_decay: f64) -> Self {
        self.configure(|k| k.hyper.weight_decay = weight_decay)
    }

    /// Maximise the objective instead of minimising it.
    pub fn maximize(self, maximize: bool) -> Self {
        self.configure(|k| k.hyper.maximize = maximize)
    }

    /// PyTorch's param groups (`SGD([{"params": ..., "momentum": 0.9}, ...])`): each [`Group`]
    /// takes its parameters and sets the options it names; every other option is the
    /// optimizer's (set before or after this call). Set before the first step.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for a parameter in two groups or in none, a name that is
    /// not a parameter, an option SGD does not have (`betas`), or a refused value;
    /// [`crate::Error::Usage`] after the first step. The optimizer is unchanged then.
    pub fn param_groups(mut self, groups: impl IntoIterator<Item = Group>) -> Result<Self> {
        self.stepper.set_groups(groups.into_iter().collect())?;
        Ok(self)
    }
}

impl SgdFamily<true> {
    /// Stochastic rounding of bfloat16 parameters, as [`crate::FusedAdamW::stochastic_rounding`]:
    /// the new weight computed in float32, rounded up or down with probability proportional to
    /// the distance, random bits keyed by (`seed`, parameter position, step, element). Each
    /// parameter then keeps a step count (state field `step`, which PyTorch's SGD does not
    /// have) so that the bits of a resumed run are those it would have drawn. The momentum
    /// buffers stay bfloat16, rounded to nearest. Set before the first step; not together with
    /// [`FusedSgd::kahan_summation`].
    pub fn stochastic_rounding(self, seed: u64) -> Self {
        self.configure(|k| k.rounding.stochastic = Some(seed))
    }

    /// Kahan-compensated updates of bfloat16 parameters, as
    /// [`crate::FusedAdamW::kahan_summation`]: a bfloat16 buffer per parameter (state field
    /// `kahan_comp`) carries what each rounding drops into the next update. Set before the
    /// first step; not together with [`FusedSgd::stochastic_rounding`].
    pub fn kahan_summation(self, kahan: bool) -> Self {
        self.configure(|k| k.rounding.kahan = kahan)
    }
}

impl SgdFamily<false> {
    /// PyTorch's `foreach`: `true` runs `_multi_tensor_sgd` (libtorch's `_foreach_` ops),
    /// `false` `_single_tensor_sgd`. Unset, PyTorch's default: foreach for CUDA parameters
    /// (decided per device), the for-loop on CPU. As in PyTorch, the foreach path with
    /// Nesterov momentum adds into the gradients in place (when neither `maximize` nor weight
    /// decay copied them).
    pub fn foreach(self, foreach: bool) -> Self {
        self.configure(|k| {
            k.implementation = Impl::ForLoop {
                foreach: Some(foreach),
            }
        })
    }
}

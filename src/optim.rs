//! Optimizers whose state tch-fabric owns, over libtorch's fused kernels: [`FusedAdamW`]
//! (`torch.optim.AdamW(fused=True)`, one `_fused_adamw_` call per device and dtype) and
//! [`FusedSgd`] (`torch.optim.SGD(fused=True)`, `_fused_sgd_`). Owning the state makes
//! checkpoints resume exactly, and the kernels' `grad_scale` / `found_inf` arguments make the
//! AMP step free of host synchronisation.
use crate::error::{Error, Result};
use crate::ffi::{self, AdamHyper, AdamLists, SgdHyper};
use crate::scaler::{
    defined_gradients, next_optimizer_id, trainable_in_order, AmpOptimizer, ScalerOptimizer,
};
use tch::{nn, Device, Kind, Tensor};

/// A parameter with its AdamW state (created at its first step, as PyTorch does).
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    state: Option<AdamState>,
}

#[derive(Debug)]
struct AdamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
    /// 0-dim float32 on the parameter's device, as PyTorch keeps it for fused optimizers.
    step: Tensor,
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
/// use tch_fabric::FusedAdamW;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = FusedAdamW::new(&vs, 1e-2).weight_decay(0.0);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors().len(), 6); // exp_avg, exp_avg_sq, step for 2 parameters
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct FusedAdamW {
    slots: Vec<Slot>,
    hyper: AdamHyper,
    id: u64,
}

impl FusedAdamW {
    /// AdamW over the trainable variables of `vs` with PyTorch's defaults: betas (0.9,
    /// 0.999), eps 1e-8, weight decay 0.01.
    pub fn new(vs: &nn::VarStore, lr: f64) -> Self {
        FusedAdamW {
            slots: trainable_in_order(vs)
                .into_iter()
                .map(|(name, param)| Slot {
                    name,
                    param,
                    state: None,
                })
                .collect(),
            hyper: AdamHyper {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                weight_decay: 1e-2,
                eps: 1e-8,
                amsgrad: false,
                maximize: false,
            },
            id: next_optimizer_id(),
        }
    }

    /// The coefficients of the running averages.
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.hyper.beta1 = beta1;
        self.hyper.beta2 = beta2;
        self
    }

    /// The term added to the denominator.
    pub fn eps(mut self, eps: f64) -> Self {
        self.hyper.eps = eps;
        self
    }

    /// The decoupled weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.hyper.weight_decay = wd;
        self
    }

    /// The AMSGrad variant.
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.hyper.amsgrad = amsgrad;
        self
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.hyper.lr
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.hyper.lr = lr;
    }

    /// Drops the gradients, as PyTorch's `zero_grad()` (`set_to_none=True`): their memory is
    /// free until the next backward, which lowers peak memory.
    pub fn zero_grad(&mut self) {
        drop_grads(self.slots.iter().map(|s| &s.param));
    }

    /// One step on the gradients as they are (no scaler).
    ///
    /// # Errors
    ///
    /// libtorch's error (e.g. parameters of a dtype the kernel does not take).
    pub fn step(&mut self) -> Result<()> {
        self.fused_step(None, None)
    }

    fn fused_step(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        self.fused_step_with(grad_scale, found_inf, false)
    }

    /// `folded`: `grad_scale` is a folded-clipping divisor and the gradients need not be
    /// unscaled afterwards, so float32 CPU groups take tch-fabric's kernel, which does not
    /// write them back.
    fn fused_step_with(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: Option<&Tensor>,
        folded: bool,
    ) -> Result<()> {
        let amsgrad = self.hyper.amsgrad;
        for slot in &mut self.slots {
            if slot.state.is_none() && slot.param.grad().defined() {
                let p = &slot.param;
                slot.state = Some(AdamState {
                    exp_avg: p.f_zeros_like()?,
                    exp_avg_sq: p.f_zeros_like()?,
                    max_exp_avg_sq: if amsgrad {
                        Some(p.f_zeros_like()?)
                    } else {
                        None
                    },
                    step: Tensor::f_zeros([], (Kind::Float, p.device()))?,
                });
            }
        }
        // Parameters without gradients are left out, grouped per (device, dtype) as PyTorch.
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        let groups = group_indices(
            self.slots
                .iter()
                .zip(&grads)
                .map(|(s, g)| g.defined().then(|| (s.param.device(), s.param.kind()))),
        );
        for ((device, kind), idx) in groups {
            let st = |i: usize| self.slots[i].state.as_ref().expect("created above");
            let lists = AdamLists {
                params: idx.iter().map(|&i| &self.slots[i].param).collect(),
                grads: idx.iter().map(|&i| &grads[i]).collect(),
                exp_avgs: idx.iter().map(|&i| &st(i).exp_avg).collect(),
                exp_avg_sqs: idx.iter().map(|&i| &st(i).exp_avg_sq).collect(),
                max_exp_avg_sqs: idx
                    .iter()
                    .filter_map(|&i| st(i).max_exp_avg_sq.as_ref())
                    .collect(),
                steps: idx.iter().map(|&i| &st(i).step).collect(),
            };
            let scale = grad_scale.map(|t| t.f_to_device(device)).transpose()?;
            let inf = found_inf.map(|t| t.f_to_device(device)).transpose()?;
            // PyTorch counts the step first and takes a skipped step back afterwards, on the
            // device, so a skip never advances the count and nothing waits for the host.
            ffi::foreach_add_scalar(&lists.steps, 1.0)?;
            let own_kernel = folded
                && !amsgrad
                && device == Device::Cpu
                && kind == Kind::Float
                && idx
                    .iter()
                    .all(|&i| self.slots[i].param.is_contiguous() && grads[i].is_contiguous());
            match (&scale, &inf) {
                (Some(divisor), Some(found)) if own_kernel => {
                    ffi::adamw_folded(&lists, &self.hyper, divisor, found)?
                }
                _ => ffi::fused_adamw(&lists, &self.hyper, scale.as_ref(), inf.as_ref())?,
            }
            if let Some(inf) = &inf {
                ffi::foreach_sub_tensor(&lists.steps, inf)?;
            }
        }
        Ok(())
    }

    /// The optimizer state as named tensors, for checkpoints: `<param>.exp_avg`,
    /// `<param>.exp_avg_sq`, `<param>.max_exp_avg_sq` (AMSGrad) and `<param>.step`, for every
    /// parameter that has stepped.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            if let Some(st) = &s.state {
                out.push((format!("{}.exp_avg", s.name), st.exp_avg.shallow_clone()));
                out.push((
                    format!("{}.exp_avg_sq", s.name),
                    st.exp_avg_sq.shallow_clone(),
                ));
                if let Some(m) = &st.max_exp_avg_sq {
                    out.push((format!("{}.max_exp_avg_sq", s.name), m.shallow_clone()));
                }
                out.push((format!("{}.step", s.name), st.step.shallow_clone()));
            }
        }
        out
    }

    /// Restores state written by [`FusedAdamW::state_tensors`] (copied, on each parameter's
    /// device and dtype).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for a missing tensor or a shape mismatch; nothing changes then.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let states = self.prepare_state(tensors)?;
        for (slot, st) in self.slots.iter_mut().zip(states) {
            slot.state = st;
        }
        Ok(())
    }

    /// Checks state for [`FusedAdamW::load_state_tensors`] without applying it.
    ///
    /// # Errors
    ///
    /// As [`FusedAdamW::load_state_tensors`].
    pub fn check_state_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.prepare_state(tensors).map(|_| ())
    }

    fn prepare_state(&self, tensors: &[(String, Tensor)]) -> Result<Vec<Option<AdamState>>> {
        let find = |key: String| tensors.iter().find(|(n, _)| *n == key).map(|(_, t)| t);
        let mut states = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let Some(step) = find(format!("{}.step", s.name)) else {
                states.push(None);
                continue;
            };
            let get = |what: &str| -> Result<Tensor> {
                let t = find(format!("{}.{what}", s.name)).ok_or_else(|| {
                    Error::InvalidState(format!("optimizer state lacks '{}.{what}'", s.name))
                })?;
                if t.size() != s.param.size() {
                    return Err(Error::InvalidState(format!(
                        "optimizer state '{}.{what}' has shape {:?}, the parameter {:?}",
                        s.name,
                        t.size(),
                        s.param.size()
                    )));
                }
                Ok(t.f_to_device(s.param.device())?
                    .f_to_kind(s.param.kind())?
                    .copy())
            };
            if step.numel() != 1 {
                return Err(Error::InvalidState(format!(
                    "optimizer state '{}.step' must hold one number",
                    s.name
                )));
            }
            states.push(Some(AdamState {
                exp_avg: get("exp_avg")?,
                exp_avg_sq: get("exp_avg_sq")?,
                max_exp_avg_sq: if self.hyper.amsgrad {
                    Some(get("max_exp_avg_sq")?)
                } else {
                    None
                },
                step: step
                    .f_to_device(s.param.device())?
                    .f_to_kind(Kind::Float)?
                    .f_reshape([])?
                    .copy(),
            }));
        }
        Ok(states)
    }
}

impl ScalerOptimizer for FusedAdamW {
    fn scaler_id(&self) -> u64 {
        self.id
    }

    fn named_gradients(&self) -> Vec<(String, Tensor)> {
        defined_gradients(self.slots.iter().map(|s| (s.name.as_str(), &s.param)))
    }

    fn step_unscaled(&mut self) -> Result<()> {
        self.fused_step(None, None)
    }

    fn supports_amp_scaling(&self) -> bool {
        true
    }

    fn step_scaled(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor) -> Result<()> {
        self.fused_step(grad_scale, Some(found_inf))
    }

    fn step_folded(&mut self, divisor: &Tensor, found_inf: &Tensor) -> Result<()> {
        self.fused_step_with(Some(divisor), Some(found_inf), true)
    }
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
/// use tch_fabric::FusedSgd;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = nn::linear(vs.root() / "fc", 4, 1, Default::default());
/// let mut opt = FusedSgd::new(&vs, 0.1).momentum(0.9).nesterov(true);
/// let loss = model.forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
/// loss.backward();
/// opt.step()?;
/// assert_eq!(opt.state_tensors().len(), 2); // one momentum buffer per parameter
/// assert!(FusedSgd::new(&vs, 0.1).nesterov(true).step().is_err()); // needs momentum
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct FusedSgd {
    slots: Vec<SgdSlot>,
    hyper: SgdHyper,
    id: u64,
}

#[derive(Debug)]
struct SgdSlot {
    name: String,
    param: Tensor,
    momentum_buffer: Option<Tensor>,
}

impl FusedSgd {
    /// SGD over the trainable variables of `vs` with PyTorch's defaults: no momentum, no
    /// dampening, no weight decay, no Nesterov.
    pub fn new(vs: &nn::VarStore, lr: f64) -> Self {
        FusedSgd {
            slots: trainable_in_order(vs)
                .into_iter()
                .map(|(name, param)| SgdSlot {
                    name,
                    param,
                    momentum_buffer: None,
                })
                .collect(),
            hyper: SgdHyper {
                lr,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
                maximize: false,
            },
            id: next_optimizer_id(),
        }
    }

    /// The momentum factor (>= 0).
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.hyper.momentum = momentum;
        self
    }

    /// The dampening of the momentum (>= 0).
    pub fn dampening(mut self, dampening: f64) -> Self {
        self.hyper.dampening = dampening;
        self
    }

    /// The L2 penalty added to the gradient (>= 0).
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.hyper.weight_decay = wd;
        self
    }

    /// Nesterov momentum (needs momentum > 0 and zero dampening).
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.hyper.nesterov = nesterov;
        self
    }

    /// Maximise the objective instead of minimising it.
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.hyper.maximize = maximize;
        self
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.hyper.lr
    }

    /// Sets the learning rate.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a negative or non-finite rate (nothing changes then).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_sgd("lr", lr, "Invalid learning rate")?;
        self.hyper.lr = lr;
        Ok(())
    }

    /// Checks the hyper-parameters with PyTorch's rules.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] with PyTorch's wording ("Invalid learning rate", "Invalid
    /// momentum value", "Invalid weight_decay value", "Nesterov momentum requires a momentum and
    /// zero dampening").
    pub fn validate(&self) -> Result<()> {
        let h = &self.hyper;
        check_sgd("lr", h.lr, "Invalid learning rate")?;
        check_sgd("momentum", h.momentum, "Invalid momentum value")?;
        check_sgd("weight_decay", h.weight_decay, "Invalid weight_decay value")?;
        check_sgd("dampening", h.dampening, "Invalid dampening value")?;
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

    /// Drops the gradients (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        drop_grads(self.slots.iter().map(|s| &s.param));
    }

    /// One step on the gradients as they are (no scaler).
    ///
    /// # Errors
    ///
    /// As [`FusedSgd::validate`]; libtorch's error (e.g. a dtype the kernel does not take).
    pub fn step(&mut self) -> Result<()> {
        self.fused_step(None, None)
    }

    fn fused_step(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        self.validate()?;
        let with_momentum = self.hyper.momentum != 0.0;
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        // A buffer is "fresh" at its parameter's first step; fresh and older buffers go to
        // separate kernel calls since the kernel's is_first_step flag covers a whole call.
        let mut fresh = vec![false; self.slots.len()];
        if with_momentum {
            for (i, s) in self.slots.iter_mut().enumerate() {
                if s.momentum_buffer.is_none() && grads[i].defined() {
                    s.momentum_buffer = Some(s.param.f_zeros_like()?);
                    fresh[i] = true;
                }
            }
        }
        let groups = group_indices(self.slots.iter().zip(&grads).zip(&fresh).map(
            |((s, g), &first)| {
                g.defined()
                    .then(|| (s.param.device(), s.param.kind(), first))
            },
        ));
        for ((device, _, first), idx) in groups {
            let params: Vec<&Tensor> = idx.iter().map(|&i| &self.slots[i].param).collect();
            let g: Vec<&Tensor> = idx.iter().map(|&i| &grads[i]).collect();
            let bufs: Vec<&Tensor> = idx
                .iter()
                .filter_map(|&i| self.slots[i].momentum_buffer.as_ref())
                .collect();
            let scale = grad_scale.map(|t| t.f_to_device(device)).transpose()?;
            let inf = found_inf.map(|t| t.f_to_device(device)).transpose()?;
            ffi::fused_sgd(
                &params,
                &g,
                &bufs,
                &self.hyper,
                first,
                scale.as_ref(),
                inf.as_ref(),
            )?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors, for checkpoints: `<param>.momentum_buffer` for
    /// every parameter that has a buffer.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .filter_map(|s| {
                s.momentum_buffer
                    .as_ref()
                    .map(|b| (format!("{}.momentum_buffer", s.name), b.shallow_clone()))
            })
            .collect()
    }

    /// Restores state written by [`FusedSgd::state_tensors`] (copied, on each parameter's
    /// device and dtype).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for a shape mismatch; nothing changes then.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let buffers = self.prepare_state(tensors)?;
        for (slot, b) in self.slots.iter_mut().zip(buffers) {
            slot.momentum_buffer = b;
        }
        Ok(())
    }

    /// Checks state for [`FusedSgd::load_state_tensors`] without applying it.
    ///
    /// # Errors
    ///
    /// As [`FusedSgd::load_state_tensors`].
    pub fn check_state_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.prepare_state(tensors).map(|_| ())
    }

    fn prepare_state(&self, tensors: &[(String, Tensor)]) -> Result<Vec<Option<Tensor>>> {
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let key = format!("{}.momentum_buffer", s.name);
            let Some((_, t)) = tensors.iter().find(|(n, _)| *n == key) else {
                out.push(None);
                continue;
            };
            if t.size() != s.param.size() {
                return Err(Error::InvalidState(format!(
                    "optimizer state '{key}' has shape {:?}, the parameter {:?}",
                    t.size(),
                    s.param.size()
                )));
            }
            out.push(Some(
                t.f_to_device(s.param.device())?
                    .f_to_kind(s.param.kind())?
                    .copy(),
            ));
        }
        Ok(out)
    }
}

/// Indices grouped by key in first-seen order (`None`: left out), as PyTorch groups tensors
/// per device and dtype for one fused kernel call each.
fn group_indices<K: PartialEq>(keys: impl Iterator<Item = Option<K>>) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, key) in keys.enumerate() {
        let Some(key) = key else { continue };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

/// `zero_grad(set_to_none=True)` over `params`.
fn drop_grads<'a>(params: impl Iterator<Item = &'a Tensor>) {
    let params: Vec<&Tensor> = params.collect();
    // Resetting a gradient handle cannot fail for a parameter tensor.
    if let Err(e) = ffi::grads_set_to_none(&params) {
        log::error!("zero_grad: {e}");
    }
}

fn check_sgd(field: &'static str, v: f64, allowed: &'static str) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            value: v.to_string(),
            allowed,
        })
    }
}

impl ScalerOptimizer for FusedSgd {
    fn scaler_id(&self) -> u64 {
        self.id
    }

    fn named_gradients(&self) -> Vec<(String, Tensor)> {
        defined_gradients(self.slots.iter().map(|s| (s.name.as_str(), &s.param)))
    }

    fn step_unscaled(&mut self) -> Result<()> {
        self.fused_step(None, None)
    }

    fn supports_amp_scaling(&self) -> bool {
        true
    }

    fn step_scaled(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor) -> Result<()> {
        self.fused_step(grad_scale, Some(found_inf))
    }
}

/// An optimizer [`crate::Fabric`] can drive: tch's own (through [`AmpOptimizer`]) or
/// [`FusedAdamW`]. Implement it to plug in another optimizer.
pub trait TrainOptimizer: ScalerOptimizer + std::fmt::Debug {
    /// Zeroes the gradients.
    fn zero_grad(&mut self);

    /// Sets the learning rate of every parameter group.
    ///
    /// # Errors
    ///
    /// The optimizer's error.
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// State to save with a checkpoint, as named tensors (none by default).
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Checks state for [`TrainOptimizer::load_state_tensors`] without applying it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for state that does not fit.
    fn check_state_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        let _ = tensors;
        Ok(())
    }

    /// Restores state saved by [`TrainOptimizer::state_tensors`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for state that does not fit; nothing changes then.
    fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let _ = tensors;
        Ok(())
    }
}

impl TrainOptimizer for AmpOptimizer {
    fn zero_grad(&mut self) {
        AmpOptimizer::zero_grad(self);
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        let opt = self.optimizer_mut();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| opt.set_lr(lr))).map_err(|_| {
            Error::Native {
                op: "set_lr",
                message: format!("could not set the learning rate to {lr}"),
            }
        })
    }
}

impl TrainOptimizer for FusedAdamW {
    fn zero_grad(&mut self) {
        FusedAdamW::zero_grad(self);
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        FusedAdamW::set_lr(self, lr);
        Ok(())
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        FusedAdamW::state_tensors(self)
    }

    fn check_state_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        FusedAdamW::check_state_tensors(self, tensors)
    }

    fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        FusedAdamW::load_state_tensors(self, tensors)
    }
}

/// What [`crate::Fabric::setup`] accepts as the optimizer: a tch `nn::Optimizer` (built from the
/// same VarStore), a [`FusedAdamW`] or a [`FusedSgd`].
pub trait IntoTrainOptimizer {
    /// The optimizer, paired with the parameters of `vs` where it needs them.
    fn into_train_optimizer(self, vs: &nn::VarStore) -> Box<dyn TrainOptimizer>;
}

impl IntoTrainOptimizer for nn::Optimizer {
    fn into_train_optimizer(self, vs: &nn::VarStore) -> Box<dyn TrainOptimizer> {
        Box::new(AmpOptimizer::new(self, vs))
    }
}

impl IntoTrainOptimizer for FusedAdamW {
    fn into_train_optimizer(self, _vs: &nn::VarStore) -> Box<dyn TrainOptimizer> {
        Box::new(self)
    }
}

impl TrainOptimizer for FusedSgd {
    fn zero_grad(&mut self) {
        FusedSgd::zero_grad(self);
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        FusedSgd::set_lr(self, lr)
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        FusedSgd::state_tensors(self)
    }

    fn check_state_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        FusedSgd::check_state_tensors(self, tensors)
    }

    fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        FusedSgd::load_state_tensors(self, tensors)
    }
}

impl IntoTrainOptimizer for FusedSgd {
    fn into_train_optimizer(self, _vs: &nn::VarStore) -> Box<dyn TrainOptimizer> {
        Box::new(self)
    }
}

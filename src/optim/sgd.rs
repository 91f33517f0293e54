//! [`FusedSgd`]: `torch.optim.SGD(fused=True)` over libtorch's `_fused_sgd_`.
use super::slots::{Field, Fresh, Shape, Slots};
use super::{amp_on, check_fused_groups, non_negative, Amp, Optimizer};
use crate::error::{Error, Result};
use crate::native::{self, SgdHyper};
use crate::params::{group_by, GradBatch, Params};
use tch::{nn, Tensor};

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
    params: Params,
    slots: Slots,
    hyper: SgdHyper,
}

const MOMENTUM_BUFFER: Field = Field {
    name: "momentum_buffer",
    shape: Shape::LikeParam,
};

fn fields(momentum: f64) -> Vec<Field> {
    if momentum != 0.0 {
        vec![MOMENTUM_BUFFER]
    } else {
        Vec::new()
    }
}

impl FusedSgd {
    /// SGD over the trainable variables of `vs` with PyTorch's defaults: no momentum, no
    /// dampening, no weight decay, no Nesterov.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's "Invalid learning
    /// rate"); the errors of [`Params::from_var_store`].
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        Self::with_params(Params::from_var_store(vs)?, lr)
    }

    /// SGD over an explicit parameter list.
    ///
    /// # Errors
    ///
    /// As [`FusedSgd::new`].
    pub fn with_params(params: Params, lr: f64) -> Result<Self> {
        check_lr(lr)?;
        Ok(FusedSgd {
            slots: Slots::new(params.len(), fields(0.0)),
            params,
            hyper: SgdHyper {
                lr,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
                maximize: false,
            },
        })
    }

    /// The momentum factor (>= 0).
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.hyper.momentum = momentum;
        self.slots.set_fields(fields(momentum));
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

    /// One kernel call over the parameters `indices` (one device and dtype), whose momentum
    /// buffers are all fresh or all older: the kernel's `is_first_step` covers a whole call.
    fn run(
        &self,
        grads: &GradBatch,
        indices: &[usize],
        first: bool,
        fresh: &Fresh,
        amp: &Amp<'_>,
        device: tch::Device,
    ) -> Result<()> {
        let params: Vec<&Tensor> = indices.iter().map(|&i| &self.params.tensors()[i]).collect();
        let g: Vec<&Tensor> = indices.iter().filter_map(|&i| grads.get(i)).collect();
        let bufs: Vec<&Tensor> = indices
            .iter()
            .filter_map(|&i| self.slots.of(fresh, i)?.first())
            .collect();
        let (scale, inf) = amp_on(amp, device)?;
        native::fused_sgd(
            &params,
            &g,
            &bufs,
            &self.hyper,
            first,
            scale.as_deref(),
            inf.as_deref(),
        )
    }
}

fn check_lr(lr: f64) -> Result<()> {
    non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

impl Optimizer for FusedSgd {
    fn params(&self) -> &Params {
        &self.params
    }

    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        self.validate()?;
        check_fused_groups("_fused_sgd_", grads)?;
        let fresh = self.slots.fresh(&self.params, grads)?;
        for group in grads.groups() {
            let is_fresh = |i: usize| fresh.iter().any(|(j, _)| *j == i);
            for (first, pos) in group_by(group.indices.iter().map(|&i| Some(is_fresh(i)))) {
                let indices: Vec<usize> = pos.iter().map(|&k| group.indices[k]).collect();
                self.run(grads, &indices, first, &fresh, &amp, group.device)?;
            }
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

    /// PyTorch's checks of `torch.optim.SGD`, with its wording ("Invalid learning rate",
    /// "Invalid momentum value", "Invalid weight_decay value", "Nesterov momentum requires a
    /// momentum and zero dampening").
    fn validate(&self) -> Result<()> {
        let h = &self.hyper;
        check_lr(h.lr)?;
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

    /// `<param>.momentum_buffer` for every parameter that has a buffer.
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

//! What the optimizers whose state tch-fabric owns share (the Adam family and SGD, fused or
//! PyTorch's for-loop and foreach ones): the parameters, their per-parameter state, and one step
//! that checks everything before the first kernel runs, calls one kernel per (device, dtype)
//! group, and keeps new state only once every group stepped. Each algorithm brings its
//! [`Kernel`] (hyper-parameters, state fields, the kernel call); the public optimizer types
//! hold a [`Stepper`] and get [`Optimizer`] and [`OptimizerState`] from it through [`Stepped`].
use super::param_group::ParamGroup;
use super::slots::{Field, Fresh, Slots};
use super::{non_negative, Amp, GradBatch, GradGroup, Optimizer, OptimizerState, Params};
use crate::device::{on_device, OnDevice};
use crate::dtype;
use crate::error::{Error, Result};
use tch::{Device, Tensor};

// The traits and the struct below are `pub` inside this private module: unreachable from
// outside the crate, but usable in the bounds of the public trait impls at the end.

/// One algorithm's hyper-parameters and kernel call.
pub trait Kernel: Clone + std::fmt::Debug {
    /// PyTorch's name of the kernel that runs, for errors.
    fn op(&self) -> &'static str;

    /// Whether the kernel takes [`Amp::Scaled`] and [`Amp::Folded`] (PyTorch's
    /// `_step_supports_amp_scaling`: fused kernels do, for-loop ones do not).
    fn supports_amp(&self) -> bool;

    /// The state each parameter gets at its first step, in saving order.
    fn fields(&self) -> Vec<Field>;

    /// PyTorch's checks of the hyper-parameters other than the learning rate.
    fn validate(&self) -> Result<()>;

    /// Steps the parameters of one (device, dtype) group.
    fn run_group(&self, step: &GroupStep<'_>) -> Result<()>;

    /// SGD's momentum or Adam's beta1.
    fn momentum(&self) -> f64;

    /// Sets what [`Kernel::momentum`] reads.
    fn set_momentum(&mut self, momentum: f64);

    /// PyTorch's `param_groups[0]` entries of these hyper-parameters (all but `lr`, `params`).
    fn param_group(&self) -> ParamGroup;

    /// Reads a PyTorch param group into these hyper-parameters (missing keys keep their
    /// value); refuses a group of another optimizer type or with other structural options.
    /// May leave `self` half-changed on error: [`Stepper`] calls it on a copy.
    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()>;
}

/// What a kernel needs to step one (device, dtype) group.
pub struct GroupStep<'a> {
    pub lr: f64,
    pub params: &'a Params,
    pub state: &'a State<'a>,
    pub grads: &'a GradBatch,
    pub group: &'a GradGroup,
    pub amp: &'a Amp<'a>,
}

impl GroupStep<'_> {
    /// The group's parameters.
    pub(crate) fn params(&self) -> Vec<&Tensor> {
        self.group
            .indices
            .iter()
            .map(|&i| &self.params.tensors()[i])
            .collect()
    }

    /// The AMP tensors of a fused step on this group's device: (grad_scale or divisor,
    /// found_inf).
    pub(crate) fn amp_tensors(&self) -> Result<(Option<OnDevice<'_>>, Option<OnDevice<'_>>)> {
        let here = self.group.device;
        Ok(match *self.amp {
            Amp::None => (None, None),
            Amp::Scaled {
                grad_scale,
                found_inf,
                device,
            } => (
                grad_scale.map(|s| on_device(s, device, here)).transpose()?,
                Some(on_device(found_inf, device, here)?),
            ),
            Amp::Folded {
                divisor,
                found_inf,
                device,
            } => (
                Some(on_device(divisor, device, here)?),
                Some(on_device(found_inf, device, here)?),
            ),
        })
    }
}

/// The state of every parameter during one step: what earlier steps kept, and what this step
/// creates.
pub struct State<'a> {
    slots: &'a Slots,
    fresh: &'a Fresh,
}

impl State<'_> {
    /// The tensor of `field` of parameter `i`.
    pub(crate) fn get(&self, i: usize, field: &Field) -> Result<&Tensor> {
        self.slots
            .of(self.fresh, i)
            .and_then(|s| self.slots.field(s, field.name))
            .ok_or_else(|| Error::native("optimizer step", "state was not created"))
    }

    /// `field` of every parameter of `group`.
    pub(crate) fn all(&self, group: &GradGroup, field: &Field) -> Result<Vec<&Tensor>> {
        group.indices.iter().map(|&i| self.get(i, field)).collect()
    }

    /// Whether parameter `i` steps for the first time.
    pub(crate) fn is_fresh(&self, i: usize) -> bool {
        self.fresh.iter().any(|(j, _)| *j == i)
    }
}

/// Parameters, state, learning rate and kernel of one optimizer.
#[derive(Debug)]
pub struct Stepper<K> {
    params: Params,
    slots: Slots,
    lr: f64,
    kernel: K,
}

fn check_lr(lr: f64) -> Result<()> {
    non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

impl<K: Kernel> Stepper<K> {
    /// The optimizer over `params`, with PyTorch's "Invalid learning rate" check.
    pub(crate) fn new(params: Params, lr: f64, kernel: K) -> Result<Self> {
        check_lr(lr)?;
        Ok(Stepper {
            slots: Slots::new(params.len(), kernel.fields()),
            params,
            lr,
            kernel,
        })
    }

    /// Changes the kernel (a builder option); the state fields follow it while no parameter
    /// has state.
    pub(crate) fn configure(&mut self, change: impl FnOnce(&mut K)) {
        change(&mut self.kernel);
        self.slots.set_fields(self.kernel.fields());
    }

    /// PyTorch's checks of the learning rate and the other hyper-parameters.
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        self.kernel.validate()
    }

    /// The kernel and rate a param group gives, every check made, nothing changed.
    fn with_param_group(&self, group: &ParamGroup) -> Result<(K, f64)> {
        let mut kernel = self.kernel.clone();
        kernel.load_param_group(group)?;
        kernel.validate()?;
        if kernel.fields() != self.kernel.fields() {
            return Err(Error::InvalidState(format!(
                "{}: the checkpoint's param group changes which state the optimizer keeps \
                 (e.g. momentum zero vs non-zero): build it with the checkpoint's options",
                self.kernel.op()
            )));
        }
        let lr = match group.get("lr") {
            None => self.lr,
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::InvalidState(format!("param_groups[0]['lr'] is {v}, not a number"))
            })?,
        };
        check_lr(lr)?;
        Ok((kernel, lr))
    }
}

/// The (device, dtype) groups a kernel takes: dense float tensors on CPU or CUDA.
fn check_groups(op: &'static str, grads: &GradBatch) -> Result<()> {
    if grads.has_sparse() {
        return Err(Error::Usage(format!(
            "{op}: sparse gradients are not supported"
        )));
    }
    for g in grads.groups() {
        if !dtype::is_float(g.kind) || !(g.device == Device::Cpu || g.device.is_cuda()) {
            return Err(Error::Usage(format!(
                "{op}: parameters of dtype {:?} on {:?}: it takes float32, float64, float16 \
                 or bfloat16 tensors on CPU or CUDA",
                g.kind, g.device
            )));
        }
    }
    Ok(())
}

/// A public optimizer type built on a [`Stepper`]: it gets [`Optimizer`] and
/// [`OptimizerState`] from the impls below, so each algorithm writes them once.
pub trait Stepped: std::fmt::Debug {
    /// The algorithm.
    type Kernel: Kernel;
    /// The stepper.
    fn stepper(&self) -> &Stepper<Self::Kernel>;
    /// The stepper, to change.
    fn stepper_mut(&mut self) -> &mut Stepper<Self::Kernel>;
}

impl<T: Stepped> Optimizer for T {
    fn params(&self) -> &Params {
        &self.stepper().params
    }

    /// Every check before the first kernel call (so a refused step changes nothing), one call
    /// per (device, dtype) group, new state kept once all succeeded.
    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        let s = self.stepper_mut();
        s.validate()?;
        check_groups(s.kernel.op(), grads)?;
        let fresh = s.slots.fresh(&s.params, grads)?;
        let state = State {
            slots: &s.slots,
            fresh: &fresh,
        };
        for group in grads.groups() {
            s.kernel.run_group(&GroupStep {
                lr: s.lr,
                params: &s.params,
                state: &state,
                grads,
                group,
                amp: &amp,
            })?;
        }
        s.slots.commit(fresh);
        Ok(())
    }

    fn supports_amp_scaling(&self) -> bool {
        self.stepper().kernel.supports_amp()
    }

    fn lr(&self) -> f64 {
        self.stepper().lr
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.stepper_mut().lr = lr;
        Ok(())
    }

    fn momentum(&self) -> Option<f64> {
        Some(self.stepper().kernel.momentum())
    }

    /// Sets the momentum (checked at the next step, as every hyper-parameter).
    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.stepper_mut().configure(|k| k.set_momentum(momentum));
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.stepper().validate()
    }
}

impl<T: Stepped> OptimizerState for T {
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let s = self.stepper();
        Ok(s.slots.state_tensors(&s.params))
    }

    fn check_state(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        let s = self.stepper();
        s.slots.prepare_load(&s.params, tensors).map(|_| ())
    }

    fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let s = self.stepper_mut();
        let prepared = s.slots.prepare_load(&s.params, tensors)?;
        s.slots.commit_load(prepared);
        Ok(())
    }

    /// PyTorch's `param_groups[0]` without `params`.
    fn param_group(&self) -> Option<ParamGroup> {
        let s = self.stepper();
        let mut g = ParamGroup::new();
        g.insert("lr".into(), serde_json::Value::from(s.lr));
        g.extend(s.kernel.param_group());
        Some(g)
    }

    fn check_param_group(&self, group: &ParamGroup) -> Result<()> {
        self.stepper().with_param_group(group).map(|_| ())
    }

    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()> {
        let s = self.stepper_mut();
        let (kernel, lr) = s.with_param_group(group)?;
        s.kernel = kernel;
        s.lr = lr;
        Ok(())
    }
}

/// PyTorch's for-loop and foreach kernels, or its fused one: the switch of each algorithm
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// `fused=True`: one fused kernel per (device, dtype) group, AMP scaling inside the step.
    Fused,
    /// PyTorch's default: `_single_tensor_*` ops, or `_multi_tensor_*` (`_foreach_*` ops) when
    /// `foreach` is true. Unset (`None`) it is PyTorch's default choice: foreach for CUDA
    /// parameters, the for-loop on CPU, decided per device.
    ForLoop {
        /// PyTorch's `foreach` argument.
        foreach: Option<bool>,
    },
}

impl Impl {
    /// Whether a for-loop step of a group on `device` runs the foreach ops.
    pub(crate) fn foreach_on(self, device: Device) -> bool {
        match self {
            Impl::Fused => false,
            Impl::ForLoop { foreach } => foreach.unwrap_or(device.is_cuda()),
        }
    }

    /// PyTorch's `foreach` entry of a param group (`None` for a fused optimizer).
    pub(crate) fn foreach(self) -> Option<bool> {
        match self {
            Impl::Fused => None,
            Impl::ForLoop { foreach } => foreach,
        }
    }
}

/// The error for a scaled step handed to a for-loop optimizer (the scaler never does this:
/// such optimizers report `supports_amp_scaling() == false`).
pub(crate) fn unscaled_only(op: &str) -> Error {
    Error::Usage(format!(
        "{op} takes unscaled gradients: PyTorch's for-loop optimizers do not support AMP \
         scaling inside the step"
    ))
}

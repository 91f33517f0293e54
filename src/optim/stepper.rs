//! What the optimizers whose state tch-fabric owns share (the Adam family and SGD, fused or
//! PyTorch's for-loop and foreach ones): the parameters, their per-parameter state, and one step
//! that checks everything before the first kernel runs, calls one kernel per (device, dtype)
//! group, and keeps new state only once every group stepped. Each algorithm brings its
//! [`Kernel`] (hyper-parameters, state fields, the kernel call); the public optimizer types
//! hold a [`Stepper`] and get [`Optimizer`] and [`OptimizerState`] from it through [`Stepped`].
use super::group::{self, Group, GroupOptions};
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

    /// Refuses parameters of a dtype the options do not support, checked for every group
    /// before any steps.
    fn check_kind(&self, _kind: tch::Kind) -> Result<()> {
        Ok(())
    }

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

    /// Sets what a [`Group`](super::Group) sets differently from the optimizer's options;
    /// refuses an option this algorithm does not have. May leave `self` half-changed on error:
    /// [`Stepper`] calls it on a copy.
    fn apply(&mut self, options: &GroupOptions) -> Result<()>;
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
            .and_then(|s| self.slots.field(i, s, field.name))
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

/// One param group: its parameters, learning rate and hyper-parameters (the optimizer's
/// defaults with the group's own options applied).
#[derive(Debug)]
struct GroupState<K> {
    /// Positions in the parameters, in parameter order.
    indices: Vec<usize>,
    lr: f64,
    kernel: K,
    /// What the group set itself, applied again when the defaults change.
    options: GroupOptions,
}

/// Parameters, state and param groups of one optimizer.
#[derive(Debug)]
pub struct Stepper<K> {
    params: Params,
    slots: Slots,
    /// PyTorch's `defaults`: the builder options, which every group takes unless it sets its
    /// own.
    defaults: K,
    default_lr: f64,
    groups: Vec<GroupState<K>>,
}

fn check_lr(lr: f64) -> Result<()> {
    non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

impl<K: Kernel> Stepper<K> {
    /// The optimizer over `params` in one group, with PyTorch's "Invalid learning rate" check.
    pub(crate) fn new(params: Params, lr: f64, kernel: K) -> Result<Self> {
        check_lr(lr)?;
        Ok(Stepper {
            slots: Slots::new(params.len(), kernel.fields()),
            groups: vec![GroupState {
                indices: (0..params.len()).collect(),
                lr,
                kernel: kernel.clone(),
                options: GroupOptions::default(),
            }],
            params,
            defaults: kernel,
            default_lr: lr,
        })
    }

    /// Changes the defaults (a builder option); every group takes them again, with its own
    /// options on top, and the state fields follow while no parameter has state.
    pub(crate) fn configure(&mut self, change: impl FnOnce(&mut K)) {
        change(&mut self.defaults);
        for g in &mut self.groups {
            let mut kernel = self.defaults.clone();
            // The group's options were checked when the groups were set: applying them again
            // over other defaults cannot fail.
            if kernel.apply(&g.options).is_ok() {
                g.kernel = kernel;
                self.slots.set_fields(&g.indices, &g.kernel.fields());
            }
        }
    }

    /// Splits the parameters into `groups` (PyTorch's `param_groups`), every check made
    /// before anything changes. The parameters are then in PyTorch's optimizer order: group
    /// after group, each in the order it had (what `optimizer.param_groups` lists, what
    /// checkpoints number and Lightning's clipping sums over).
    pub(crate) fn set_groups(&mut self, groups: Vec<Group>) -> Result<()> {
        if self.slots.has_state() {
            return Err(Error::Usage(
                "param groups are set when the optimizer is built, before its first step".into(),
            ));
        }
        let members = group::assign(&self.params, &groups)?;
        let mut built = Vec::with_capacity(groups.len());
        let mut next = 0;
        for (taken, g) in members.iter().zip(groups) {
            let mut kernel = self.defaults.clone();
            kernel.apply(&g.options)?;
            kernel.validate()?;
            let lr = g.options.lr.unwrap_or(self.default_lr);
            check_lr(lr)?;
            built.push(GroupState {
                indices: (next..next + taken.len()).collect(),
                lr,
                kernel,
                options: g.options,
            });
            next += taken.len();
        }
        let order: Vec<usize> = members.concat();
        self.params.reorder(&order);
        self.slots = Slots::new(self.params.len(), self.defaults.fields());
        for g in &built {
            self.slots.set_fields(&g.indices, &g.kernel.fields());
        }
        self.groups = built;
        Ok(())
    }

    /// PyTorch's checks of every group's learning rate and hyper-parameters, and that no
    /// option set after a parameter had state needs a state field it lacks (AMSGrad, momentum
    /// from zero, Kahan summation, SGD's step count for stochastic rounding).
    fn validate(&self) -> Result<()> {
        for g in &self.groups {
            check_lr(g.lr)?;
            g.kernel.validate()?;
            let fields = g.kernel.fields();
            if let Some(i) = g.indices.iter().copied().find(|&i| {
                self.slots
                    .fields_of(i)
                    .is_some_and(|have| fields.iter().any(|f| !have.contains(f)))
            }) {
                return Err(Error::Usage(format!(
                    "{}: an option set after parameter '{}' had state needs state it does not \
                     have (amsgrad, momentum from 0, kahan_summation, stochastic_rounding): set \
                     such options when the optimizer is built",
                    g.kernel.op(),
                    self.params.names()[i]
                )));
            }
        }
        Ok(())
    }

    /// The kernel and rate a param group gives group `g`, every check made, nothing changed.
    fn with_param_group(&self, g: usize, group: &ParamGroup) -> Result<(K, f64)> {
        let own = &self.groups[g];
        let mut kernel = own.kernel.clone();
        kernel.load_param_group(group)?;
        kernel.validate()?;
        if kernel.fields() != own.kernel.fields() {
            return Err(Error::InvalidState(format!(
                "{}: the checkpoint's param group {g} changes which state the optimizer keeps \
                 (e.g. momentum zero vs non-zero): build it with the checkpoint's options",
                own.kernel.op()
            )));
        }
        let lr = match group.get("lr") {
            None => own.lr,
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::InvalidState(format!("param_groups[{g}]['lr'] is {v}, not a number"))
            })?,
        };
        check_lr(lr)?;
        let members = group.get("params").map(|p| {
            p.as_array().map(|a| {
                a.iter()
                    .filter_map(serde_json::Value::as_u64)
                    .collect::<Vec<_>>()
            })
        });
        if let Some(members) = members {
            let ours: Vec<u64> = own.indices.iter().map(|&i| i as u64).collect();
            if members.as_ref() != Some(&ours) {
                return Err(Error::InvalidState(format!(
                    "param group {g} of the checkpoint holds other parameters than this \
                     optimizer's group {g} ({} of them): build the optimizer with the same \
                     param groups",
                    own.indices.len()
                )));
            }
        }
        Ok((kernel, lr))
    }

    /// Every group of `groups` checked against ours, nothing changed.
    fn with_param_groups(&self, groups: &[ParamGroup]) -> Result<Vec<(K, f64)>> {
        if groups.len() != self.groups.len() {
            return Err(Error::InvalidState(format!(
                "the checkpoint's optimizer has {} param groups, this one {}: build it with the \
                 same param groups",
                groups.len(),
                self.groups.len()
            )));
        }
        groups
            .iter()
            .enumerate()
            .map(|(g, group)| self.with_param_group(g, group))
            .collect()
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

    /// Every check before the first kernel call (so a refused step changes nothing), then per
    /// param group one call per (device, dtype), new state kept once all succeeded.
    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        let s = self.stepper_mut();
        s.validate()?;
        check_groups(s.defaults.op(), grads)?;
        for g in &s.groups {
            for on_device in grads.groups() {
                g.kernel.check_kind(on_device.kind)?;
            }
        }
        let fresh = s.slots.fresh(&s.params, grads)?;
        let state = State {
            slots: &s.slots,
            fresh: &fresh,
        };
        for g in &s.groups {
            for on_device in grads.groups() {
                // This param group's share of the (device, dtype) group, in parameter order.
                let indices: Vec<usize> = on_device
                    .indices
                    .iter()
                    .copied()
                    .filter(|i| g.indices.binary_search(i).is_ok())
                    .collect();
                if indices.is_empty() {
                    continue;
                }
                let group = GradGroup {
                    device: on_device.device,
                    kind: on_device.kind,
                    indices,
                };
                g.kernel.run_group(&GroupStep {
                    lr: g.lr,
                    params: &s.params,
                    state: &state,
                    grads,
                    group: &group,
                    amp: &amp,
                })?;
            }
        }
        s.slots.commit(fresh);
        Ok(())
    }

    fn supports_amp_scaling(&self) -> bool {
        self.stepper().defaults.supports_amp()
    }

    fn lr(&self) -> f64 {
        self.stepper().groups[0].lr
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        for g in &mut self.stepper_mut().groups {
            g.lr = lr;
        }
        Ok(())
    }

    fn group_lrs(&self) -> Vec<f64> {
        self.stepper().groups.iter().map(|g| g.lr).collect()
    }

    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        check_lr(lr)?;
        let s = self.stepper_mut();
        let count = s.groups.len();
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| no_group(group, count))?;
        g.lr = lr;
        Ok(())
    }

    fn momentum(&self) -> Option<f64> {
        Some(self.stepper().groups[0].kernel.momentum())
    }

    /// Sets every group's momentum (checked at the next step, as every hyper-parameter).
    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        let s = self.stepper_mut();
        for g in &mut s.groups {
            g.kernel.set_momentum(momentum);
            s.slots.set_fields(&g.indices, &g.kernel.fields());
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.stepper().validate()
    }
}

/// The error for a param group index past the last group.
pub(crate) fn no_group(group: usize, count: usize) -> Error {
    Error::InvalidConfig {
        field: "param group",
        value: group.to_string(),
        allowed: if count == 1 {
            "0: the optimizer has one param group"
        } else {
            "an index below the number of param groups"
        },
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

    /// PyTorch's `param_groups`, with each group's `params` as positions in
    /// [`Optimizer::params`].
    fn param_groups(&self) -> Option<Vec<ParamGroup>> {
        let groups = self.stepper().groups.iter().map(|g| {
            let mut out = ParamGroup::new();
            out.insert("lr".into(), serde_json::Value::from(g.lr));
            out.extend(g.kernel.param_group());
            out.insert("params".into(), serde_json::Value::from(g.indices.clone()));
            out
        });
        Some(groups.collect())
    }

    fn check_param_groups(&self, groups: &[ParamGroup]) -> Result<()> {
        self.stepper().with_param_groups(groups).map(|_| ())
    }

    fn load_param_groups(&mut self, groups: &[ParamGroup]) -> Result<()> {
        let s = self.stepper_mut();
        let loaded = s.with_param_groups(groups)?;
        for (g, (kernel, lr)) in s.groups.iter_mut().zip(loaded) {
            g.kernel = kernel;
            g.lr = lr;
        }
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

//! What the optimizers whose state tch-fabric owns share (the fused ones and PyTorch's
//! for-loop ones): the parameters, their per-parameter state, and one step that checks
//! everything before the first kernel runs, calls one kernel per (device, dtype) group, and
//! keeps new state only once every group stepped. Each optimizer brings its [`Kernel`]
//! (hyper-parameters, state fields, the kernel call).
use super::param_group::ParamGroup;
use super::slots::{Field, Fresh, Slots};
use super::{non_negative, Amp};
use crate::error::{Error, Result};
use crate::params::{GradBatch, GradGroup, Params};
use tch::{Device, Kind, Tensor};

/// One fused optimizer's hyper-parameters and kernel.
pub(crate) trait Kernel: std::fmt::Debug {
    /// PyTorch's name of the kernel, for errors.
    const OP: &'static str;

    /// Whether the kernel takes [`Amp::Scaled`] and [`Amp::Folded`] (PyTorch's
    /// `_step_supports_amp_scaling`: fused kernels do, for-loop ones do not).
    const AMP: bool;

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
    /// May leave `self` half-changed on error: [`Fused`] calls it on a copy.
    fn load_param_group(&mut self, group: &ParamGroup) -> Result<()>;
}

/// What a kernel needs to step one (device, dtype) group.
pub(crate) struct GroupStep<'a> {
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
}

/// The state of every parameter during one step: what earlier steps kept, and what this step
/// creates.
pub(crate) struct State<'a> {
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

/// A fused optimizer: parameters, state, learning rate, kernel.
#[derive(Debug)]
pub(crate) struct Fused<K> {
    pub params: Params,
    slots: Slots,
    pub lr: f64,
    kernel: K,
}

fn check_lr(lr: f64) -> Result<()> {
    non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

impl<K: Kernel> Fused<K> {
    /// The optimizer over `params`, with PyTorch's "Invalid learning rate" check.
    pub(crate) fn new(params: Params, lr: f64, kernel: K) -> Result<Self> {
        check_lr(lr)?;
        Ok(Fused {
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

    pub(crate) fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        self.kernel.validate()
    }

    pub(crate) fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// One step: every check before the first kernel call (so a refused step changes
    /// nothing), one call per (device, dtype) group, new state kept once all succeeded.
    pub(crate) fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        self.validate()?;
        check_groups(K::OP, grads)?;
        let fresh = self.slots.fresh(&self.params, grads)?;
        let state = State {
            slots: &self.slots,
            fresh: &fresh,
        };
        for group in grads.groups() {
            self.kernel.run_group(&GroupStep {
                lr: self.lr,
                params: &self.params,
                state: &state,
                grads,
                group,
                amp: &amp,
            })?;
        }
        self.slots.commit(fresh);
        Ok(())
    }

    pub(crate) fn supports_amp(&self) -> bool {
        K::AMP
    }

    pub(crate) fn momentum(&self) -> f64 {
        self.kernel.momentum()
    }

    /// Sets the momentum (checked at the next step, as every hyper-parameter).
    pub(crate) fn set_momentum(&mut self, momentum: f64) {
        self.configure(|k| k.set_momentum(momentum));
    }

    /// PyTorch's `param_groups[0]` without `params`.
    pub(crate) fn param_group(&self) -> ParamGroup {
        let mut g = ParamGroup::new();
        g.insert("lr".into(), serde_json::Value::from(self.lr));
        g.extend(self.kernel.param_group());
        g
    }

    /// The kernel and rate a param group gives, every check made, nothing changed.
    fn with_param_group(&self, group: &ParamGroup) -> Result<(K, f64)>
    where
        K: Clone,
    {
        let mut kernel = self.kernel.clone();
        kernel.load_param_group(group)?;
        kernel.validate()?;
        if kernel.fields() != self.kernel.fields() {
            return Err(Error::InvalidState(format!(
                "{}: the checkpoint's param group changes which state the optimizer keeps \
                 (e.g. momentum zero vs non-zero): build it with the checkpoint's options",
                K::OP
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

    pub(crate) fn check_param_group(&self, group: &ParamGroup) -> Result<()>
    where
        K: Clone,
    {
        self.with_param_group(group).map(|_| ())
    }

    pub(crate) fn load_param_group(&mut self, group: &ParamGroup) -> Result<()>
    where
        K: Clone,
    {
        let (kernel, lr) = self.with_param_group(group)?;
        self.kernel = kernel;
        self.lr = lr;
        Ok(())
    }

    pub(crate) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots.state_tensors(&self.params)
    }

    pub(crate) fn check_state(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.slots.prepare_load(&self.params, tensors).map(|_| ())
    }

    pub(crate) fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let prepared = self.slots.prepare_load(&self.params, tensors)?;
        self.slots.commit_load(prepared);
        Ok(())
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
        let float = matches!(
            g.kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        );
        if !float || !(g.device == Device::Cpu || g.device.is_cuda()) {
            return Err(Error::Usage(format!(
                "{op}: parameters of dtype {:?} on {:?}: it takes float32, float64, float16 \
                 or bfloat16 tensors on CPU or CUDA",
                g.kind, g.device
            )));
        }
    }
    Ok(())
}

/// The constructors, the options both kernels have (`weight_decay`, documented by `$wd_doc`,
/// and `maximize`) and the [`super::Optimizer`] impl of a struct holding a `fused: Fused<_>`
/// field whose kernel starts as `$defaults`: everything delegates, so the fused optimizers
/// share one implementation. `$doc` documents `new`.
macro_rules! fused_optimizer {
    ($ty:ident, $defaults:expr, $doc:literal, $wd_doc:literal) => {
        $crate::optim::fused::kernel_options!($ty {
            #[doc = $wd_doc]
            fn weight_decay(wd: f64) => h { h.weight_decay = wd }
            /// Maximise the objective instead of minimising it.
            fn maximize(maximize: bool) => h { h.maximize = maximize }
        });

        impl $ty {
            #[doc = $doc]
            ///
            /// # Errors
            ///
            /// [`crate::Error::InvalidConfig`] for a negative or non-finite `lr` (PyTorch's
            /// "Invalid learning rate"); the errors of [`crate::Params::from_var_store`].
            pub fn new(vs: &tch::nn::VarStore, lr: f64) -> $crate::error::Result<Self> {
                Self::with_params($crate::params::Params::from_var_store(vs)?, lr)
            }

            /// The same over an explicit parameter list.
            ///
            /// # Errors
            ///
            #[doc = concat!("As [`", stringify!($ty), "::new`].")]
            pub fn with_params(
                params: $crate::params::Params,
                lr: f64,
            ) -> $crate::error::Result<Self> {
                Ok($ty {
                    fused: $crate::optim::fused::Fused::new(params, lr, $defaults)?,
                })
            }
        }

        impl $crate::optim::Optimizer for $ty {
            fn params(&self) -> &$crate::params::Params {
                &self.fused.params
            }

            fn step_with(
                &mut self,
                grads: &$crate::params::GradBatch,
                amp: $crate::optim::Amp<'_>,
            ) -> $crate::error::Result<()> {
                self.fused.step_with(grads, amp)
            }

            fn supports_amp_scaling(&self) -> bool {
                self.fused.supports_amp()
            }

            fn lr(&self) -> f64 {
                self.fused.lr
            }

            fn set_lr(&mut self, lr: f64) -> $crate::error::Result<()> {
                self.fused.set_lr(lr)
            }

            fn validate(&self) -> $crate::error::Result<()> {
                self.fused.validate()
            }

            fn momentum(&self) -> Option<f64> {
                Some(self.fused.momentum())
            }

            fn set_momentum(&mut self, momentum: f64) -> $crate::error::Result<()> {
                self.fused.set_momentum(momentum);
                Ok(())
            }

            fn param_group(&self) -> Option<$crate::optim::ParamGroup> {
                Some(self.fused.param_group())
            }

            fn check_param_group(
                &self,
                group: &$crate::optim::ParamGroup,
            ) -> $crate::error::Result<()> {
                self.fused.check_param_group(group)
            }

            fn load_param_group(
                &mut self,
                group: &$crate::optim::ParamGroup,
            ) -> $crate::error::Result<()> {
                self.fused.load_param_group(group)
            }

            fn state_tensors(&self) -> $crate::error::Result<Vec<(String, tch::Tensor)>> {
                Ok(self.fused.state_tensors())
            }

            fn check_state(&self, tensors: &[(String, tch::Tensor)]) -> $crate::error::Result<()> {
                self.fused.check_state(tensors)
            }

            fn load_state(
                &mut self,
                tensors: &[(String, tch::Tensor)],
            ) -> $crate::error::Result<()> {
                self.fused.load_state(tensors)
            }
        }
    };
}

/// Builder options of a fused optimizer: each sets hyper-parameters of its kernel (`h`) and
/// returns the optimizer.
macro_rules! kernel_options {
    ($ty:ident { $( $(#[$doc:meta])* fn $name:ident($($arg:ident: $t:ty),+) => $h:ident $body:block )* }) => {
        impl $ty {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $($arg: $t),+) -> Self {
                    self.fused.configure(|$h| $body);
                    self
                }
            )*
        }
    };
}

pub(crate) use fused_optimizer;
pub(crate) use kernel_options;

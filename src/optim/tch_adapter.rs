//! [`TchOptimizer`]: tch's own optimizers (libtorch's C++ `torch::optim`) behind the crate's
//! [`Optimizer`] trait.
use super::{Amp, Optimizer, OptimizerState};
use crate::error::{Error, Op, Result};
use crate::params::{lock_vars, GradBatch, Params};
use tch::nn::{self, OptimizerConfig};

/// One of tch's optimizers (`nn::Sgd`, `nn::Adam`, `nn::AdamW`, `nn::RmsProp`: libtorch's C++
/// implementations) over the trainable variables of a VarStore, with every call fallible (tch's
/// `nn::Optimizer` panics when libtorch fails). Its moments live inside libtorch and cannot be
/// exported: checkpoints do not hold them.
///
/// ```
/// use tch::{nn, Device};
/// use tch_fabric::{Optimizer, TchOptimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
/// let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1)?;
/// assert_eq!(opt.params().names(), ["fc.weight", "fc.bias"]);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
pub struct TchOptimizer {
    params: Params,
    opt: tch::COptimizer,
    lr: f64,
}

impl std::fmt::Debug for TchOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchOptimizer")
            .field("lr", &self.lr)
            .field("parameters", &self.params.names())
            .finish()
    }
}

impl TchOptimizer {
    /// `config` (e.g. `nn::AdamW::default()`) built over the trainable variables of `vs` at
    /// this point, as `config.build(&vs, lr)` would.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a negative or non-finite `lr`; libtorch's error.
    pub fn new<C: OptimizerConfig>(vs: &nn::VarStore, config: C, lr: f64) -> Result<Self> {
        check_lr(lr)?;
        let params = Params::from_var_store(vs)?;
        let mut opt = config.build_copt(lr).op("build optimizer")?;
        let vars = lock_vars(&vs.variables_)?;
        for var in &vars.trainable_variables {
            opt.add_parameters(&var.tensor, var.group)
                .op("add_parameters")?;
        }
        drop(vars);
        Ok(TchOptimizer { params, opt, lr })
    }
}

fn check_lr(lr: f64) -> Result<()> {
    super::non_negative("lr", lr, "Invalid learning rate: finite and >= 0")
}

/// The moments of tch's optimizers live in C++ and cannot be exported: checkpoints hold none,
/// and a checkpoint's optimizer state is refused rather than dropped.
impl OptimizerState for TchOptimizer {}

impl Optimizer for TchOptimizer {
    fn params(&self) -> &Params {
        &self.params
    }

    fn step_with(&mut self, _grads: &GradBatch, amp: Amp<'_>) -> Result<()> {
        match amp {
            // libtorch's optimizer reads the gradients from the parameters itself.
            Amp::None => self.opt.step().op("optimizer step"),
            _ => Err(Error::Usage(
                "tch's optimizers do not support AMP scaling: the GradScaler unscales for them"
                    .into(),
            )),
        }
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.opt.set_learning_rate(lr).op("set_lr")?;
        self.lr = lr;
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.opt.zero_grad().op("zero_grad")
    }
}

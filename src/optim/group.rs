//! [`Group`]: PyTorch's param groups, each its own parameters (by name, by a predicate over the
//! parameters, or the rest) and the hyper-parameters it sets differently from the optimizer's.
use crate::error::{Error, Result};
use crate::params::Params;
use tch::Tensor;

/// A predicate over a parameter's name and tensor.
type Predicate = Box<dyn Fn(&str, &Tensor) -> bool>;

/// Which parameters a [`Group`] takes.
enum Select {
    Names(Vec<String>),
    Matching(Predicate),
    Rest,
}

/// The hyper-parameters a group sets itself (PyTorch's keys of one `param_groups` entry);
/// unset ones come from the optimizer's builder options, as PyTorch's `defaults`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupOptions {
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub amsgrad: Option<bool>,
    pub maximize: Option<bool>,
    pub momentum: Option<f64>,
    pub dampening: Option<f64>,
    pub nesterov: Option<bool>,
}

impl GroupOptions {
    /// Refuses the options an optimizer does not have (`betas` for SGD, ...), naming them.
    pub(crate) fn only(&self, optimizer: &str, allowed: &[&str]) -> Result<()> {
        let set = [
            ("weight_decay", self.weight_decay.is_some()),
            ("betas", self.betas.is_some()),
            ("eps", self.eps.is_some()),
            ("amsgrad", self.amsgrad.is_some()),
            ("maximize", self.maximize.is_some()),
            ("momentum", self.momentum.is_some()),
            ("dampening", self.dampening.is_some()),
            ("nesterov", self.nesterov.is_some()),
        ];
        match set.iter().find(|(k, on)| *on && !allowed.contains(k)) {
            Some((key, _)) => Err(Error::InvalidConfig {
                field: "param group option",
                value: format!("{key} (for {optimizer})"),
                allowed: "the options of the optimizer the group belongs to",
            }),
            None => Ok(()),
        }
    }
}

/// One of PyTorch's param groups, as the optimizers' `param_groups` builder option takes them:
/// which parameters (by name, by a predicate over the name and tensor, or every parameter no
/// earlier group took) and the hyper-parameters that differ from the optimizer's own.
///
/// nanoGPT's two groups, weight decay for matrices only:
///
/// ```
/// use tch::{nn, Device};
/// use tch_fabric::optim::Group;
/// use tch_fabric::{AdamW, Optimizer};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _fc = nn::linear(vs.root() / "fc", 4, 2, Default::default());
/// let opt = AdamW::new(&vs, 6e-4)?.betas(0.9, 0.95).param_groups([
///     Group::matching(|_name, t| t.dim() >= 2).weight_decay(0.1),
///     Group::rest().weight_decay(0.0),
/// ])?;
/// assert_eq!(opt.group_lrs(), [6e-4, 6e-4]);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
pub struct Group {
    select: Select,
    pub(crate) options: GroupOptions,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let select = match &self.select {
            Select::Names(n) => format!("names {n:?}"),
            Select::Matching(_) => "matching a predicate".to_string(),
            Select::Rest => "the rest".to_string(),
        };
        f.debug_struct("Group")
            .field("select", &select)
            .field("options", &self.options)
            .finish()
    }
}

impl Group {
    fn new(select: Select) -> Group {
        Group {
            select,
            options: GroupOptions::default(),
        }
    }

    /// The parameters with these names (each must be one of the optimizer's).
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Group {
        Group::new(Select::Names(names.into_iter().map(Into::into).collect()))
    }

    /// Every parameter no earlier group took for which `select(name, tensor)` is true.
    pub fn matching(select: impl Fn(&str, &Tensor) -> bool + 'static) -> Group {
        Group::new(Select::Matching(Box::new(select)))
    }

    /// Every parameter no earlier group took (the last group).
    pub fn rest() -> Group {
        Group::new(Select::Rest)
    }

    /// The group's learning rate (default: the optimizer's).
    pub fn lr(mut self, lr: f64) -> Self {
        self.options.lr = Some(lr);
        self
    }

    /// The group's weight decay.
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.options.weight_decay = Some(weight_decay);
        self
    }

    /// The group's Adam betas.
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.options.betas = Some((beta1, beta2));
        self
    }

    /// The group's Adam eps.
    pub fn eps(mut self, eps: f64) -> Self {
        self.options.eps = Some(eps);
        self
    }

    /// Whether the group uses AMSGrad (Adam).
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.options.amsgrad = Some(amsgrad);
        self
    }

    /// Whether the group maximises.
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.options.maximize = Some(maximize);
        self
    }

    /// The group's SGD momentum.
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.options.momentum = Some(momentum);
        self
    }

    /// The group's SGD dampening.
    pub fn dampening(mut self, dampening: f64) -> Self {
        self.options.dampening = Some(dampening);
        self
    }

    /// Whether the group uses Nesterov momentum (SGD).
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.options.nesterov = Some(nesterov);
        self
    }
}

/// The positions in `params` each group takes, in parameter order: names first come first
/// served, a parameter in two groups or in none is an error naming it, as PyTorch's "some
/// parameters appear in more than one parameter group".
pub(crate) fn assign(params: &Params, groups: &[Group]) -> Result<Vec<Vec<usize>>> {
    let bad = |what: String| Error::InvalidConfig {
        field: "param_groups",
        value: what,
        allowed: "groups that together take every parameter exactly once (Group::rest() last)",
    };
    if groups.is_empty() {
        return Err(bad("no groups".into()));
    }
    let names = params.names();
    let mut owner: Vec<Option<usize>> = vec![None; names.len()];
    let mut out: Vec<Vec<usize>> = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        let mut taken = Vec::new();
        match &group.select {
            Select::Names(wanted) => {
                for name in wanted {
                    let i = (0..names.len())
                        .find(|&i| params.is_named(i, name))
                        .ok_or_else(|| {
                            bad(format!(
                                "group {g} names '{name}', which is not one of the optimizer's \
                             parameters"
                            ))
                        })?;
                    if let Some(other) = owner[i] {
                        return Err(bad(format!(
                            "parameter '{name}' appears in groups {other} and {g}"
                        )));
                    }
                    owner[i] = Some(g);
                    taken.push(i);
                }
                taken.sort_unstable();
                taken.dedup();
            }
            Select::Matching(select) => {
                for (i, (name, t)) in names.iter().zip(params.tensors()).enumerate() {
                    if owner[i].is_none() && select(name, t) {
                        owner[i] = Some(g);
                        taken.push(i);
                    }
                }
            }
            Select::Rest => {
                if g + 1 != groups.len() {
                    return Err(bad(format!(
                        "group {g} is Group::rest() but not the last group"
                    )));
                }
                for (i, o) in owner.iter_mut().enumerate() {
                    if o.is_none() {
                        *o = Some(g);
                        taken.push(i);
                    }
                }
            }
        }
        out.push(taken);
    }
    let missing: Vec<&str> = names
        .iter()
        .zip(&owner)
        .filter(|(_, o)| o.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!("parameters {missing:?} are in no group")));
    }
    Ok(out)
}

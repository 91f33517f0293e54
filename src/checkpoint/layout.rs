//! The key layout of checkpoints: a model's variables under their VarStore names (`fc.weight`),
//! prefixed with the model's setup name when it has one (`generator.fc.weight`); optimizer
//! `i`'s state as `optimizer.<i>.<param>.<field>`.
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::params::lock_vars;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use tch::{nn, Tensor};

/// The key prefix of optimizer state: `optimizer.<index>.<param>.<field>`.
pub(super) const OPTIMIZER_PREFIX: &str = "optimizer.";

/// An optimizer set up with a Fabric, shared between the Fabric (checkpoints) and its
/// [`crate::FabricOptimizer`].
pub(crate) type SharedOptimizer = Rc<RefCell<Box<dyn Optimizer>>>;

/// A model set up with a Fabric, as checkpoints see it: the VarStore's variables (trainable or
/// not, read when saving or loading) under an optional setup name.
#[derive(Debug)]
pub(crate) struct Model {
    pub name: Option<String>,
    pub vars: Arc<Mutex<nn::Variables>>,
}

impl Model {
    /// The checkpoint key of one of its variables.
    pub(super) fn key(&self, var: &str) -> String {
        match &self.name {
            Some(n) => format!("{n}.{var}"),
            None => var.to_string(),
        }
    }

    /// (key, tensor) of every variable, sorted by key.
    /// The VarStore names of its variables (without the model's key).
    pub(crate) fn var_names(&self) -> Result<Vec<String>> {
        Ok(lock_vars(&self.vars)?
            .named_variables
            .keys()
            .cloned()
            .collect())
    }

    pub(crate) fn entries(&self) -> Result<Vec<(String, Tensor)>> {
        let vars = lock_vars(&self.vars)?;
        let mut out: Vec<(String, Tensor)> = vars
            .named_variables
            .iter()
            .map(|(n, t)| (self.key(n), t.shallow_clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Refuses a model whose keys would collide with a model already set up or with the optimizer
/// keys.
pub(crate) fn check_new_model(models: &[Model], new: &Model) -> Result<()> {
    if let Some(name) = &new.name {
        if name.is_empty() || name.contains('.') || format!("{name}.") == OPTIMIZER_PREFIX {
            return Err(Error::InvalidConfig {
                field: "model name",
                value: format!("'{name}'"),
                allowed: "a non-empty name without '.', other than 'optimizer'",
            });
        }
    }
    let keys = new.entries()?;
    for other in models {
        for (key, _) in other.entries()? {
            if keys.iter().any(|(k, _)| *k == key) {
                return Err(Error::Usage(format!(
                    "parameter '{key}' was already set up with this Fabric: give the model its \
                     own name (`fabric.setup_named(\"generator\", ...)`) so that its checkpoint \
                     keys stay apart, or its own VarStore path"
                )));
            }
        }
    }
    if let Some((key, _)) = keys.iter().find(|(k, _)| k.starts_with(OPTIMIZER_PREFIX)) {
        return Err(Error::Usage(format!(
            "variable '{key}' starts with '{OPTIMIZER_PREFIX}', which checkpoints reserve for \
             optimizer state: use another VarStore path or a model name"
        )));
    }
    Ok(())
}

/// Every tensor a checkpoint holds: the models' variables, then each optimizer's state.
pub(crate) fn collect(
    models: &[Model],
    optimizers: &[SharedOptimizer],
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for m in models {
        tensors.extend(m.entries()?);
    }
    for (i, opt) in optimizers.iter().enumerate() {
        for (name, t) in opt.borrow().state_tensors()? {
            tensors.push((format!("{OPTIMIZER_PREFIX}{i}.{name}"), t));
        }
    }
    Ok(tensors)
}

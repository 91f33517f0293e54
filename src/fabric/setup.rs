//! Setting models and optimizers up: a model's variables moved and converted for the
//! precision (all conversions made before the first variable changes), every rank given rank
//! 0's weights and a DDP Reducer under data parallelism, and optimizers checked against the
//! models set up.
use super::owners::{claim, release};
use super::{Fabric, FabricModule, FabricOptimizer, ModelSync};
use crate::checkpoint::{self, Model, SharedOptimizer};
use crate::dtype;
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::Optimizer;
use crate::params::lock_vars;
use crate::precision::Precision;
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// The dtype `-true` and `64-true` convert parameters to (`None`: they stay as they are).
fn param_kind(precision: Precision) -> Option<Kind> {
    match precision {
        Precision::F64True => Some(Kind::Double),
        Precision::F16True => Some(Kind::Half),
        Precision::Bf16True => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Moves every variable of `vs` to `device` and converts the floating ones to `kind`, all
/// conversions made before the first variable changes (so a failure changes nothing).
fn prepare_var_store(vs: &mut nn::VarStore, device: Device, kind: Option<Kind>) -> Result<()> {
    let vars = lock_vars(&vs.variables_)?;
    let tensors: Vec<&Tensor> = vars.named_variables.values().collect();
    let mut converted = Vec::new();
    for (t, m) in tensors.iter().zip(native::metas(tensors.iter().copied())?) {
        let Some(m) = m else { continue };
        let floating = dtype::is_float(m.kind);
        let target = kind.filter(|_| floating).unwrap_or(m.kind);
        if m.device != device || m.kind != target {
            let new = t
                .f_to_device_(device, target, false, false)
                .op("convert a parameter")?;
            converted.push((t.shallow_clone(), new));
        }
    }
    drop(vars);
    for (mut t, new) in converted {
        t.f_set_data(&new).op("set_data")?;
    }
    if vs.device() != device {
        // Every variable is on `device` already: tch only records it (for new variables).
        vs.set_device(device);
    }
    Ok(())
}

impl Fabric {
    /// [`Fabric::setup_module`] and [`Fabric::setup_optimizers`] at once, as Lightning's
    /// `fabric.setup(model, optimizer)`. `optimizer` is a [`crate::FusedAdamW`],
    /// [`crate::FusedSgd`], [`crate::TchOptimizer`] or any [`Optimizer`] over `var_store`'s
    /// parameters (built before or after this call: its parameters share storage with the
    /// VarStore's).
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module`] and [`Fabric::setup_optimizers`]; nothing is set up then.
    pub fn setup<M, O: Optimizer + 'static>(
        &self,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        self.setup_impl(None, model, var_store, optimizer)
    }

    /// [`Fabric::setup`] under a name: the model's checkpoint keys become `<name>.<variable>`,
    /// so two models whose variables share names (a GAN's generator and discriminator) can be
    /// set up and saved together. The name is part of the checkpoint layout: keep it stable.
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module_named`].
    pub fn setup_named<M, O: Optimizer + 'static>(
        &self,
        name: &str,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        self.setup_impl(Some(name), model, var_store, optimizer)
    }

    fn setup_impl<M, O: Optimizer + 'static>(
        &self,
        name: Option<&str>,
        model: M,
        var_store: &mut nn::VarStore,
        optimizer: O,
    ) -> Result<(FabricModule<M>, FabricOptimizer)> {
        optimizer.validate()?;
        self.check_parameters(&optimizer, Some(var_store))?;
        let module = self.module_impl(name, model, var_store)?;
        let optimizer = self.register(optimizer);
        Ok((module, optimizer))
    }

    /// Prepares a model for the precision without an optimizer (for inference, or to set up
    /// optimizers later, as Lightning's `setup_module`): moves the VarStore's variables to the
    /// device, converts them for `-true` / `64-true` (mixed precisions keep float32), and under
    /// DDP gives every rank rank 0's weights. The returned module converts inputs and outputs
    /// and runs the precision's scope; `var_store` stays usable. Checkpoints save the
    /// VarStore's variables under their names.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Usage`] when a variable name was already set up by an earlier call (use
    /// [`Fabric::setup_module_named`]) or starts with `optimizer.`, or when another Fabric set
    /// up this VarStore; [`crate::Error::Native`] if a conversion fails (nothing changed then) or,
    /// under DDP, the broadcast fails.
    pub fn setup_module<M>(
        &self,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        self.module_impl(None, model, var_store)
    }

    /// [`Fabric::setup_module`] under a name (see [`Fabric::setup_named`]).
    ///
    /// # Errors
    ///
    /// As [`Fabric::setup_module`]; [`crate::Error::InvalidConfig`] for an empty name, one with a
    /// `.`, or `optimizer`.
    pub fn setup_module_named<M>(
        &self,
        name: &str,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        self.module_impl(Some(name), model, var_store)
    }

    fn module_impl<M>(
        &self,
        name: Option<&str>,
        model: M,
        var_store: &mut nn::VarStore,
    ) -> Result<FabricModule<M>> {
        let entry = Model {
            name: name.map(str::to_string),
            vars: var_store.variables_.clone(),
        };
        checkpoint::check_new_model(&self.shared.state.borrow().models, &entry)?;
        let fresh_claim = claim(&var_store.variables_, self.shared.id)?;
        if let Err(e) = prepare_var_store(var_store, self.device(), param_kind(self.precision())) {
            if fresh_claim {
                release(&var_store.variables_);
            }
            return Err(e);
        }
        // DDP: every rank starts from rank 0's weights, whatever its own initialisation. A weight
        // tied under two names is one tensor: it is sent, and its gradient averaged, once.
        let mut named = entry.entries()?;
        let ids = native::metas(named.iter().map(|(_, t)| t))?;
        let mut seen = HashSet::new();
        let mut keep = ids.iter().map(|m| match m {
            Some(m) => seen.insert(m.id),
            None => true,
        });
        named.retain(|_| keep.next().unwrap_or(true));
        // Every rank must have set up the same parameters: checked before anything is sent (a
        // size mismatch would fail inside Gloo, an equal size in other shapes would average
        // mismatched layouts).
        crate::dist::same_parameters(&self.shared.group, &named, self.device())?;
        let tensors: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        tch::no_grad(|| self.shared.group.broadcast_coalesced(&tensors, 0))?;
        // Then gradients are averaged by libtorch's DDP engine, over the trainable variables.
        let trainable: Vec<(String, Tensor)> = named
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let reducer = self.shared.group.reducer(
            trainable,
            self.shared.settings.bucket_bytes,
            self.shared.settings.find_unused_parameters,
        )?;
        let mut st = self.shared.state.borrow_mut();
        let index = st.models.len();
        st.models.push(entry);
        st.model_sync.push(ModelSync { reducer, paused: 0 });
        Ok(FabricModule::new(
            model,
            self.shared.settings,
            (self.shared.id, index),
        ))
    }

    /// Registers an optimizer over the parameters of a model set up with this Fabric
    /// (Lightning's `setup_optimizers`): its steps then scale, skip and update under
    /// `16-mixed`, and checkpoints save its state.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] for hyper-parameters the optimizer refuses; [`crate::Error::Usage`]
    /// when a parameter belongs to no model set up with this Fabric (set the model up first).
    pub fn setup_optimizers<O: Optimizer + 'static>(
        &self,
        optimizer: O,
    ) -> Result<FabricOptimizer> {
        optimizer.validate()?;
        self.check_parameters(&optimizer, None)?;
        Ok(self.register(optimizer))
    }

    /// Every parameter of `optimizer` is a variable of a model set up here, or of `pending`
    /// (the VarStore being set up with it).
    fn check_parameters(
        &self,
        optimizer: &dyn Optimizer,
        pending: Option<&nn::VarStore>,
    ) -> Result<()> {
        let st = self.shared.state.borrow();
        let mut known: HashSet<usize> = HashSet::new();
        let mut add = |tensors: Vec<Tensor>| -> Result<()> {
            for m in native::metas(&tensors)?.into_iter().flatten() {
                known.insert(m.id);
            }
            Ok(())
        };
        for model in &st.models {
            add(model.entries()?.into_iter().map(|(_, t)| t).collect())?;
        }
        if let Some(vs) = pending {
            let vars = lock_vars(&vs.variables_)?;
            let tensors = vars
                .named_variables
                .values()
                .map(Tensor::shallow_clone)
                .collect();
            drop(vars);
            add(tensors)?;
        }
        let params = optimizer.params();
        for (name, m) in params.names().iter().zip(native::metas(params.tensors())?) {
            if !m.is_some_and(|m| known.contains(&m.id)) {
                return Err(Error::Usage(format!(
                    "the optimizer's parameter '{name}' is not a variable of a model set up with \
                     this Fabric: set the model up first (setup_module), with the VarStore the \
                     optimizer was built from"
                )));
            }
        }
        Ok(())
    }

    fn register<O: Optimizer + 'static>(&self, optimizer: O) -> FabricOptimizer {
        let id = optimizer.params().id();
        let opt: SharedOptimizer = Rc::new(RefCell::new(Box::new(optimizer)));
        let mut st = self.shared.state.borrow_mut();
        st.optimizers.push(Rc::clone(&opt));
        FabricOptimizer::new(opt, id, Rc::clone(&self.shared), st.backward_count)
    }
}

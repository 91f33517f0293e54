//! Models built directly in the precision ([`Fabric::init_module`], [`Fabric::init_tensor`]),
//! and the memory they and their training take ([`Fabric::memory_stats`],
//! [`Fabric::memory_report`]).
use super::{Fabric, FabricModule, FabricOptimizer};
use crate::error::{Error, Result};
use crate::memory::{distinct_bytes, MemoryReport, MemoryStats};
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

impl Fabric {
    /// A VarStore whose new variables are created directly in the precision's parameter dtype
    /// (bfloat16 for `bf16-true`, float16 for `16-true`, float64 for `64-true`, float32
    /// otherwise) on the Fabric's device: Lightning's `with fabric.init_module():`. A
    /// `16-true` or `bf16-true` model built in it never has a float32 copy, so building and
    /// setting it up takes half the memory of building it in float32 first.
    ///
    /// Only this VarStore is affected (tch's per-store kind for new variables, not libtorch's
    /// process-wide default dtype). Initialisers draw in the low dtype, so the initial weights
    /// differ from a float32 model converted afterwards (as in Lightning).
    ///
    /// Lightning's `empty_init=True` (skip the initialisers of a model about to be loaded from
    /// a checkpoint) has no counterpart: tch's layers fill their variables as they create them.
    ///
    /// ```
    /// use tch::{nn, Kind};
    /// let fabric = tch_fabric::Fabric::builder().precision("bf16-true").accelerator("cpu").build()?;
    /// let mut vs = fabric.init_module()?;
    /// let layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    /// assert_eq!(layer.ws.kind(), Kind::BFloat16);
    /// let layer = fabric.setup_module(layer, &mut vs)?;
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] once this Fabric has set a model up: a model built after the first
    /// setup would miss the precision of the models before it, and Lightning's strategies
    /// require every model to be built before setup.
    pub fn init_module(&self) -> Result<nn::VarStore> {
        if !self.shared.state.borrow().models.is_empty() {
            return Err(Error::Usage(
                "`fabric.init_module()` builds a model before `fabric.setup`: this Fabric \
                 has set up a model already; create every model's VarStore first"
                    .into(),
            ));
        }
        let mut vs = nn::VarStore::new(self.device());
        // The store is empty: this converts nothing and sets the kind of its new variables.
        vs.set_kind(self.precision().param_dtype());
        Ok(vs)
    }

    /// The dtype and device new tensors take under this precision (Lightning's
    /// `fabric.init_tensor()`): the precision's parameter dtype on the Fabric's device, as
    /// tch's tensor options.
    ///
    /// ```
    /// let fabric = tch_fabric::Fabric::builder().precision("16-true").accelerator("cpu").build()?;
    /// let t = tch::Tensor::zeros([2, 3], fabric.init_tensor());
    /// assert_eq!(t.kind(), tch::Kind::Half);
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    pub fn init_tensor(&self) -> (Kind, Device) {
        (self.precision().param_dtype(), self.device())
    }

    /// Current and peak tensor memory of the Fabric's device: on CPU the bytes CPU tensors
    /// hold (counted since the first Fabric or [`crate::memory::count_cpu_tensor_memory`]), on
    /// CUDA libtorch's caching allocator (allocated and reserved bytes).
    ///
    /// # Errors
    ///
    /// As [`crate::memory_stats`].
    pub fn memory_stats(&self) -> Result<MemoryStats> {
        crate::memory_stats(self.device())
    }

    /// Where the tensor memory of `model` and `optimizer` goes, from one call: parameters,
    /// gradients, optimizer state, and the activation peak since the last
    /// [`crate::reset_peak_memory_stats`] (see [`MemoryReport`]). Reset the peak before a
    /// step's forward and call this after its optimizer step to see one step.
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let fabric = tch_fabric::Fabric::builder().precision("bf16-true").accelerator("cpu").build()?;
    /// let mut vs = fabric.init_module()?;
    /// let layer = nn::linear(vs.root() / "fc", 64, 64, Default::default());
    /// let opt = tch_fabric::FusedAdamW::new(&vs, 1e-3)?;
    /// let (model, mut opt) = fabric.setup(layer, &mut vs, opt)?;
    /// tch_fabric::reset_peak_memory_stats(fabric.device())?;
    /// let loss = model.try_forward(&Tensor::ones([8, 64], (Kind::Float, Device::Cpu)))?.sum(None);
    /// fabric.backward(&loss)?;
    /// opt.step()?;
    /// let report = fabric.memory_report(&model, &opt)?;
    /// assert_eq!(report.parameters_bytes, (64 * 64 + 64) * 2); // bfloat16
    /// assert_eq!(report.gradients_bytes, report.parameters_bytes);
    /// assert!(report.optimizer_state_bytes >= 2 * report.parameters_bytes);
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for a model or optimizer another Fabric set up; as
    /// [`crate::memory_stats`] and [`FabricOptimizer::state_tensors`].
    pub fn memory_report<M>(
        &self,
        model: &FabricModule<M>,
        optimizer: &FabricOptimizer,
    ) -> Result<MemoryReport> {
        let (id, index) = model.origin();
        if id != self.shared.id || !Rc::ptr_eq(optimizer.shared(), &self.shared) {
            return Err(Error::Usage(
                "`fabric.memory_report` takes a model and an optimizer this Fabric set up".into(),
            ));
        }
        let variables = match self.shared.state.borrow().models.get(index) {
            Some(m) => m.entries()?,
            None => return Err(Error::Usage("the model is not among this Fabric's".into())),
        };
        let tensors: Vec<&Tensor> = variables.iter().map(|(_, t)| t).collect();
        let parameters_bytes = distinct_bytes(tensors.iter().copied())?;
        let grads: Vec<Tensor> = tensors.iter().map(|t| t.grad()).collect();
        let gradients_bytes = distinct_bytes(&grads)?;
        let state = optimizer.state_tensors()?;
        let optimizer_state_bytes = distinct_bytes(state.iter().map(|(_, t)| t))?;
        let stats = self.memory_stats()?;
        Ok(MemoryReport {
            parameters_bytes,
            gradients_bytes,
            optimizer_state_bytes,
            activations_bytes: stats.peak_bytes.saturating_sub(stats.current_bytes),
            current_bytes: stats.current_bytes,
            peak_bytes: stats.peak_bytes,
            source: stats.source,
        })
    }
}

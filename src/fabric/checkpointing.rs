//! `save` and `load`: both checkpoint formats, written by rank 0 and read by every rank, every
//! check made before anything changes.
use super::Fabric;
use crate::checkpoint::{self, LoadReport};
use crate::error::Result;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

impl Fabric {
    /// Saves a checkpoint: the variables of every model set up (safetensors, readable by
    /// Python), the state of every optimizer that keeps one, the precision, the GradScaler
    /// state, and `state` (any serde value: step, epoch, ...). The write is atomic: a crash
    /// leaves the previous file intact, and the new file is read back (header, sizes, CRC-32
    /// checksums, which [`Fabric::load`] verifies too) before it replaces the old one; a
    /// symbolic link keeps pointing at the replaced file. A scale update still pending (see
    /// [`Fabric::update_scale`]) happens first.
    ///
    /// Under DDP only rank 0 writes, and every rank waits for the write to finish (a barrier),
    /// so a [`Fabric::load`] right after sees the new file on every rank. Every rank must call
    /// it.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use tch_fabric::{Fabric, FusedAdamW};
    /// let path = std::env::temp_dir().join(format!("doc-ckpt-{}.safetensors", std::process::id()));
    /// let fabric = Fabric::builder().accelerator("cpu").build()?;
    /// let mut vs = nn::VarStore::new(Device::Cpu);
    /// let model = nn::linear(vs.root() / "fc", 2, 2, Default::default());
    /// let opt = FusedAdamW::new(&vs, 1e-3)?;
    /// let (_model, _opt) = fabric.setup(model, &mut vs, opt)?;
    /// fabric.save(&path, &("epoch", 3))?;
    /// let (_, epoch): (String, u32) = fabric.load(&path)?;
    /// assert_eq!(epoch, 3);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// A path ending in `.pt`, `.pth` or `.ckpt` gets `torch.save`'s format instead, laid out as
    /// Lightning's `fabric.save(path, {"model": model, "optimizer": optimizer, **state})`:
    /// the model's `state_dict` under `"model"` (a named model under its name), each
    /// optimizer's `state_dict` (PyTorch's `state` by parameter index and `param_groups`) under
    /// `"optimizer"`, `"optimizer_1"`, ..., the GradScaler's under `"scaler"`, and the entries
    /// of `state` (which must serialise to a map) beside them. `torch.load(path,
    /// weights_only=True)` and Lightning's `fabric.load` read it; written by libtorch's own
    /// pickler, atomically and read back as above (no checksums: the format has none).
    ///
    /// The state of a [`crate::FusedAdamW`] or [`crate::FusedSgd`] is saved too (as
    /// `optimizer.<i>.<param>.exp_avg`, ...), so resuming is exact. The moments of tch's own
    /// optimizers ([`crate::TchOptimizer`]) live in C++ and cannot be exported: resuming with
    /// them restarts those moments.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Json`] if `state` cannot be serialised (nothing is written then);
    /// [`crate::Error::Io`] / [`crate::Error::Checkpoint`] if the file cannot be written, or a torch.save
    /// file is asked of an optimizer without a `torch.optim` twin ([`crate::TchOptimizer`]);
    /// [`crate::Error::Usage`] for a torch.save state that is not a map or whose entry collides with
    /// the model or optimizer entries, and for a state the file could not give back: a NaN or
    /// infinite float (either format), an integer past `i64` (torch.save).
    pub fn save<S: Serialize + ?Sized>(&self, path: impl AsRef<Path>, state: &S) -> Result<()> {
        let path = path.as_ref();
        let torch_format = checkpoint::torch::is_torch_path(path);
        checkpoint::check_round_trip(state, torch_format)?;
        let state_json = serde_json::to_value(state)?;
        self.update_scale()?;
        let st = self.shared.state.borrow();
        let scaler = if st.scaler.is_enabled() {
            Some(st.scaler.state_dict()?)
        } else {
            None
        };
        let written = if !self.is_global_zero() {
            Ok(())
        } else if torch_format {
            checkpoint::torch::write(
                path,
                &st.models,
                &st.optimizers,
                scaler.as_ref(),
                &state_json,
            )
        } else {
            let groups: Vec<_> = st
                .optimizers
                .iter()
                .map(|o| o.borrow().param_groups())
                .collect();
            checkpoint::collect(&st.models, &st.optimizers).and_then(|tensors| {
                checkpoint::write(
                    path,
                    &tensors,
                    (self.precision(), &groups),
                    scaler.as_ref(),
                    &state_json.to_string(),
                )
            })
        };
        drop(st);
        // Reached even when rank 0 failed to write, so the others do not wait for it forever.
        self.shared.group.barrier()?;
        written
    }

    /// Loads a checkpoint written by [`Fabric::save`]: restores the weights (converted to the
    /// current parameter dtype when the checkpoint came from another precision), the optimizer
    /// states and the GradScaler state, and returns the user state.
    ///
    /// The format is recognised by content: a zip archive is a `torch.save` file, such as
    /// Lightning's `fabric.save(path, {"model": model, "optimizer": optimizer, "step": n})`
    /// writes (layout as in [`Fabric::save`]). Its model weights load by name (name the
    /// VarStore paths as the PyTorch modules: `"0.weight"`), the optimizer state from
    /// PyTorch's parameter indices (the order of the model's entries, which is
    /// `model.parameters()`'s), the learning rate and hyper-parameters from `param_groups`
    /// (a group of another optimizer type is refused), a `"scaler"` GradScaler state, and the
    /// other entries go to serde as one JSON object (a `torch.optim.lr_scheduler` state
    /// deserialises into [`crate::lr_scheduler::SchedulerState`]). Python objects that
    /// `torch.load(weights_only=True)` refuses are refused too, and so are tensors outside the
    /// model and optimizer entries.
    ///
    /// Everything is checked before anything changes: a missing, truncated, damaged (checksum)
    /// or foreign file, a variable missing from the file or of another shape, an unexpected
    /// tensor, an optimizer state that does not fit or holds impossible values (NaN, a
    /// negative second moment), a weight that overflows in this precision (a finite value
    /// becoming inf, unless [`crate::FabricBuilder::allow_load_overflow`]), or a user state of the
    /// wrong shape is an error and leaves the models, optimizers and scaler as they were.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`], [`crate::Error::Checkpoint`], [`crate::Error::Json`], [`crate::Error::InvalidState`].
    pub fn load<S: DeserializeOwned>(&self, path: impl AsRef<Path>) -> Result<S> {
        self.load_checked(path.as_ref(), true)
            .map(|(state, _)| state)
    }

    /// [`Fabric::load`] with Lightning's `strict=False` (PyTorch's
    /// `load_state_dict(strict=False)`): a model variable the checkpoint does not hold keeps its
    /// value and a checkpoint tensor that matches nothing is ignored, both reported instead of
    /// refused (a torch.save file without the model's entry reports all its variables). Every
    /// other check is as strict as [`Fabric::load`]: shapes, optimizer states, the user state.
    ///
    /// # Errors
    ///
    /// As [`Fabric::load`].
    pub fn load_non_strict<S: DeserializeOwned>(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<(S, LoadReport)> {
        self.load_checked(path.as_ref(), false)
    }

    fn load_checked<S: DeserializeOwned>(
        &self,
        path: &Path,
        strict: bool,
    ) -> Result<(S, LoadReport)> {
        let mut st = self.shared.state.borrow_mut();
        let contents = if checkpoint::torch::is_torch_file(path)? {
            checkpoint::torch::read(path, &st.models, &st.optimizers, self.precision(), strict)?
        } else {
            checkpoint::read(path)?
        };
        let state: S = serde_json::from_str(&contents.state_json)?;
        let mut plan = checkpoint::plan_load(
            path,
            &contents,
            &st.models,
            &st.optimizers,
            &st.scaler,
            checkpoint::Rules {
                precision: self.precision(),
                allow_overflow: self.shared.settings.allow_load_overflow,
                strict,
            },
        )?;
        let report = std::mem::take(&mut plan.report);
        let st = &mut *st;
        checkpoint::apply(plan, &st.optimizers, &mut st.scaler)?;
        st.scaler.reset_iteration();
        Ok((state, report))
    }
}

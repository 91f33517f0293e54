//! What a checkpoint holds, read without a model: its non-tensor entries (the user state, a
//! torch.save file's metadata such as nanoGPT's `model_args`) and the names, shapes and dtypes of
//! its tensors, so that a program can build its model from them before `Fabric::setup`.
use super::{fail, safetensors, torch};
use crate::error::Result;
use crate::precision::Precision;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;
use tch::Kind;

/// The two formats [`crate::Fabric::save`] writes and [`crate::Fabric::load`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// tch-fabric's own: one safetensors file with checksums.
    TchFabric,
    /// `torch.save`'s zip archive (Lightning's `fabric.save`, nanoGPT's `ckpt.pt`).
    TorchSave,
}

/// One tensor of a checkpoint, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its key: a safetensors name, or the dotted path of a torch.save entry
    /// (`model.transformer.wte.weight`, `optimizer.state.0.exp_avg`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its dtype.
    pub kind: Kind,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The file's format, recognised by content.
    pub format: CheckpointFormat,
    /// The precision a tch-fabric checkpoint was saved with (`None` for torch.save files).
    pub precision: Option<Precision>,
    /// The non-tensor entries: a tch-fabric checkpoint's user state as saved; a torch.save
    /// file's top-level dict with every tensor of more than one element as `null` (listed in
    /// [`CheckpointInfo::tensors`]) and 0-dim tensors as their number.
    pub state: Value,
    /// Every tensor, in file order.
    pub tensors: Vec<TensorInfo>,
}

impl CheckpointInfo {
    /// Entry `key` of [`CheckpointInfo::state`] as a `T` (nanoGPT's `model_args`).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Checkpoint`] when there is no such entry or it is not a `T`.
    pub fn get<T: DeserializeOwned>(&self, path: impl AsRef<Path>, key: &str) -> Result<T> {
        let path = path.as_ref();
        let v = self
            .state
            .get(key)
            .ok_or_else(|| fail(path, format!("no entry '{key}'")))?;
        serde_json::from_value(v.clone()).map_err(|e| fail(path, format!("entry '{key}': {e}")))
    }
}

/// What the checkpoint at `path` holds, read without a model or a Fabric: for building the
/// model from the checkpoint's own metadata before setting it up and loading it.
///
/// ```
/// use tch::{nn, Device};
/// use tch_fabric::{checkpoint, Fabric};
/// let path = std::env::temp_dir().join(format!("doc-inspect-{}.ckpt", std::process::id()));
/// let fabric = Fabric::new("32-true")?;
/// let mut vs = nn::VarStore::new(Device::Cpu);
/// let fc = nn::linear(vs.root() / "fc", 3, 2, Default::default());
/// let _fc = fabric.setup_module(fc, &mut vs)?;
/// fabric.save(&path, &serde_json::json!({"model_args": {"n_embd": 3}}))?;
///
/// let info = checkpoint::inspect(&path)?;
/// assert_eq!(info.get::<serde_json::Value>(&path, "model_args")?["n_embd"], 3);
/// let w = info.tensors.iter().find(|t| t.name == "model.fc.weight").unwrap();
/// assert_eq!(w.shape, [2, 3]);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// As [`crate::Fabric::load`] for a file that cannot be read: missing, damaged, foreign, or a
/// torch.save file with Python objects `torch.load(weights_only=True)` refuses.
pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointInfo> {
    let path = path.as_ref();
    if torch::is_torch_file(path)? {
        torch::inspect(path)
    } else {
        safetensors::inspect(path)
    }
}

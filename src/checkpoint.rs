//! Checkpoint files: one safetensors file holding the weights (readable by Python's
//! `safetensors`), with the precision, the GradScaler state (PyTorch's keys) and the user's own
//! state as JSON in the header's metadata. Written atomically: a temporary file in the same
//! folder, synced, then renamed over the target.
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::scaler::GradScalerState;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const KEY_FORMAT: &str = "tch_fabric.format";
const FORMAT: &str = "1";
const KEY_PRECISION: &str = "tch_fabric.precision";
const KEY_SCALER: &str = "tch_fabric.grad_scaler";
const KEY_STATE: &str = "tch_fabric.state";

/// What a checkpoint file holds.
#[derive(Debug)]
pub(crate) struct Contents {
    pub tensors: HashMap<String, Tensor>,
    pub precision: Precision,
    pub scaler: Option<GradScalerState>,
    pub state_json: String,
}

fn fail(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn view_of(name: &str, t: &Tensor, path: &Path) -> Result<OwnedView> {
    let kind = t.f_kind()?;
    let dtype = dtype_of(kind).ok_or_else(|| {
        fail(
            path,
            format!("tensor '{name}' has unsupported dtype {kind:?}"),
        )
    })?;
    let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    let shape = t.size().into_iter().map(|d| d as usize).collect();
    Ok(OwnedView { dtype, shape, data })
}

/// Serialises and writes a checkpoint atomically.
pub(crate) fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    precision: Precision,
    scaler: Option<&GradScalerState>,
    state_json: &str,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), view_of(n, t, path)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
    meta.insert(KEY_PRECISION.to_string(), precision.to_string());
    if let Some(s) = scaler {
        meta.insert(KEY_SCALER.to_string(), s.to_json());
    }
    meta.insert(KEY_STATE.to_string(), state_json.to_string());
    let bytes =
        safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &Some(meta))
            .map_err(|e| fail(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to a temporary sibling of `path`, syncs it and renames it over `path`, so a
/// crash at any point leaves either the old file or the new one, never a mix.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail(path, "the path names no file"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        // Make the rename itself durable; a folder that cannot be opened is no reason to fail.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and validates a checkpoint written by [`write`].
pub(crate) fn read(path: &Path) -> Result<Contents> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        fail(
            path,
            format!(
                "not a safetensors file, or truncated ({e:?}); was it written by Fabric::save?"
            ),
        )
    })?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    if meta.get(KEY_FORMAT).map(String::as_str) != Some(FORMAT) {
        return Err(fail(
            path,
            "a safetensors file, but not a tch-fabric checkpoint (no tch_fabric.format metadata)",
        ));
    }
    let precision: Precision = meta
        .get(KEY_PRECISION)
        .ok_or_else(|| fail(path, "missing tch_fabric.precision metadata"))?
        .parse()
        .map_err(|e| fail(path, format!("bad precision: {e}")))?;
    let scaler = meta
        .get(KEY_SCALER)
        .map(|s| GradScalerState::from_json(s))
        .transpose()
        .map_err(|e| fail(path, format!("bad GradScaler state: {e}")))?;
    let state_json = meta
        .get(KEY_STATE)
        .cloned()
        .ok_or_else(|| fail(path, "missing tch_fabric.state metadata"))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(path, format!("corrupt tensor data ({e:?})")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            fail(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.insert(name, t);
    }
    Ok(Contents {
        tensors,
        precision,
        scaler,
        state_json,
    })
}

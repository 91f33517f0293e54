//! tch-fabric's own checkpoint file: one safetensors file holding the tensors (readable by
//! Python's `safetensors`), with the precision, the GradScaler state (PyTorch's keys), the
//! user's own state as JSON and CRC-32 checksums of the header and of every tensor in the
//! header's metadata. Reading never takes more than the header declares and the file holds,
//! one tensor's bytes at a time, and verifies every checksum.
use super::atomic::{open_regular, write_atomic};
use super::{fail, io, Contents};
use crate::dtype;
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::ParamGroup;
use crate::precision::Precision;
use crate::scaler::GradScalerState;
use safetensors::tensor::{Dtype, Metadata, TensorInfo, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use tch::{Device, Tensor};

const KEY_FORMAT: &str = "tch_fabric.format";
/// Format 2 carries [`Checksums`]; format 1 (before them) still loads, unchecked, with a warning.
const FORMAT: &str = "2";
const FORMAT_UNCHECKED: &str = "1";
const KEY_PRECISION: &str = "tch_fabric.precision";
const KEY_SCALER: &str = "tch_fabric.grad_scaler";
const KEY_STATE: &str = "tch_fabric.state";
const KEY_CHECKSUMS: &str = "tch_fabric.checksums";
/// How many optimizers the saving Fabric had (absent in files from before the third wave).
const KEY_OPTIMIZERS: &str = "tch_fabric.optimizers";
/// Each optimizer's param groups (PyTorch's names, as torch.save files hold them), a JSON list
/// by optimizer index (null for an optimizer without them); since the third wave (earlier files
/// leave every optimizer's hyper-parameters as they are).
const KEY_PARAM_GROUPS: &str = "tch_fabric.param_groups";
/// The largest header safetensors itself reads (its `MAX_HEADER_SIZE`): a larger declared size
/// is a damaged or foreign file, refused before anything is allocated for it.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The integrity record of a format-2 checkpoint, stored as JSON under
/// `tch_fabric.checksums`. CRC-32 is the checksum Python's `zlib.crc32` computes, so any
/// reader can check a tensor's bytes; it catches damage (flipped bits, torn writes), not
/// deliberate tampering.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checksums {
    /// Always `"crc32"`.
    algorithm: String,
    /// Over the header: every other metadata entry, and every tensor's name, dtype and shape
    /// (a dtype flipped from F32 to I32 keeps the data's checksum but not this one).
    header: u32,
    /// Over each tensor's bytes, by tensor name.
    tensors: BTreeMap<String, u32>,
}

const ALGORITHM: &str = "crc32";

/// The header checksum of [`Checksums`]: metadata entries in key order, then tensors in name
/// order, each field NUL-terminated so that no two headers hash the same bytes.
fn header_crc(meta: &HashMap<String, String>, tensors: &BTreeMap<&str, (Dtype, &[usize])>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut entries: Vec<_> = meta.iter().filter(|(k, _)| *k != KEY_CHECKSUMS).collect();
    entries.sort();
    for (k, v) in entries {
        for field in [k.as_bytes(), v.as_bytes()] {
            h.update(field);
            h.update(&[0]);
        }
    }
    for (name, (dtype, shape)) in tensors {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(format!("{dtype:?}").as_bytes());
        h.update(&[0]);
        for d in *shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&[0xff]);
    }
    h.finalize()
}

/// A buffer of `len` bytes, or a typed error where the allocation would fail (a `vec!` that
/// cannot be satisfied aborts the process).
fn buffer(path: &Path, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    data.try_reserve_exact(len)
        .map_err(|_| fail(path, format!("cannot allocate {len} bytes for {what}")))?;
    // Zeroed by memcpy from a static block: `resize` writes byte by byte in unoptimised
    // builds (1.2 s for 192 MiB here, most of a debug-build save).
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while data.len() < len {
        let n = (len - data.len()).min(ZEROS.len());
        data.extend_from_slice(&ZEROS[..n]);
    }
    Ok(data)
}

/// One tensor on its way into a file: its bytes are copied to host memory only when the
/// checksum or the writer asks for them, and dropped right after, so a save holds at most one
/// tensor's copy at a time (not a copy of the whole model, nor the whole file in memory).
struct Staged<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    path: &'a Path,
    dtype: Dtype,
    shape: Vec<usize>,
    numel: usize,
    len: usize,
    /// The first error of a copy made inside [`View::data`], which cannot return one.
    failed: RefCell<Option<Error>>,
}

impl<'a> Staged<'a> {
    fn new(name: &'a str, tensor: &'a Tensor, path: &'a Path) -> Result<Self> {
        let m = native::meta(tensor)?
            .ok_or_else(|| fail(path, format!("tensor '{name}' is undefined")))?;
        let dtype = dtype::to_safetensors(m.kind).ok_or_else(|| {
            fail(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", m.kind),
            )
        })?;
        let shape = native::shape(tensor)?
            .into_iter()
            .map(usize::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| fail(path, format!("tensor '{name}' has a negative size")))?;
        let numel = usize::try_from(m.numel).unwrap_or(0);
        let len = numel
            .checked_mul(m.kind.elt_size_in_bytes())
            .ok_or_else(|| fail(path, format!("tensor '{name}' is too large")))?;
        Ok(Staged {
            name,
            tensor,
            path,
            dtype,
            shape,
            numel,
            len,
            failed: RefCell::new(None),
        })
    }

    /// The tensor's bytes in host memory, row-major.
    fn bytes(&self) -> Result<Vec<u8>> {
        let t = self
            .tensor
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .op("to cpu")?;
        let mut data = buffer(self.path, self.len, self.name)?;
        t.f_copy_data_u8(&mut data, self.numel).op("copy_data")?;
        Ok(data)
    }
}

impl View for &Staged<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.bytes() {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                // The file then comes out short; `write` reports this error and drops it.
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Owned(Vec::new())
            }
        }
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Serialises and writes a checkpoint atomically: a temporary file in the target's folder,
/// synced, read back and checked (header, sizes, every checksum), then renamed over the
/// target. At most one tensor's bytes are in memory at a time.
pub(crate) fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    (precision, param_groups): (Precision, &[Option<Vec<ParamGroup>>]),
    scaler: Option<&GradScalerState>,
    state_json: &str,
) -> Result<()> {
    let staged = tensors
        .iter()
        .map(|(n, t)| Staged::new(n, t, path))
        .collect::<Result<Vec<_>>>()?;
    let index: BTreeMap<&str, (Dtype, &[usize])> = staged
        .iter()
        .map(|s| (s.name, (s.dtype, s.shape.as_slice())))
        .collect();
    if index.len() != staged.len() {
        return Err(fail(path, "two tensors have the same name"));
    }
    let mut sums = BTreeMap::new();
    for s in &staged {
        sums.insert(s.name.to_string(), crc32fast::hash(&s.bytes()?));
    }
    let mut meta = HashMap::new();
    meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
    meta.insert(KEY_PRECISION.to_string(), precision.to_string());
    meta.insert(KEY_OPTIMIZERS.to_string(), param_groups.len().to_string());
    meta.insert(
        KEY_PARAM_GROUPS.to_string(),
        serde_json::to_string(param_groups)?,
    );
    if let Some(s) = scaler {
        meta.insert(KEY_SCALER.to_string(), s.to_json());
    }
    meta.insert(KEY_STATE.to_string(), state_json.to_string());
    let checksums = Checksums {
        algorithm: ALGORITHM.to_string(),
        header: header_crc(&meta, &index),
        tensors: sums,
    };
    meta.insert(
        KEY_CHECKSUMS.to_string(),
        serde_json::to_string(&checksums)?,
    );
    let produce = |tmp: &Path| {
        safetensors::tensor::serialize_to_file(staged.iter().map(|s| (s.name, s)), Some(meta), tmp)
            .map_err(|e| match e {
                safetensors::SafeTensorError::IoError(source) => io(path)(source),
                other => fail(path, format!("cannot serialise: {other}")),
            })?;
        match staged.iter().find_map(|s| s.failed.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    write_atomic(path, produce, |tmp| verify(path, tmp))
}

/// Reads back a file just written: header, sizes and every checksum, one tensor at a time.
fn verify(path: &Path, written: &Path) -> Result<()> {
    let check = || -> Result<()> {
        let (mut file, len) = open_regular(written)?;
        let metadata = read_header(path, &mut file, len)?;
        let checksums = check_metadata(path, &metadata)?
            .ok_or_else(|| fail(path, "no checksums were written"))?;
        for_each_tensor(path, &mut file, &metadata, Some(&checksums), |_, _, _| {
            Ok(())
        })
    };
    check()
}

/// Reads and parses the header of a file of `len` bytes, checking that the sizes it declares
/// are the file's: nothing larger than the file is ever allocated or read.
fn read_header(path: &Path, r: &mut impl Read, len: u64) -> Result<Metadata> {
    let not_safetensors = |why: String| {
        fail(
            path,
            format!(
                "not a safetensors file, or truncated ({why}); was it written by Fabric::save?"
            ),
        )
    };
    if len < 8 {
        return Err(not_safetensors(format!("{len} bytes")));
    }
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix).map_err(io(path))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Err(not_safetensors(format!(
            "the header claims {n} bytes of a {len}-byte file"
        )));
    }
    let mut header = buffer(path, n as usize, "the header")?;
    r.read_exact(&mut header).map_err(io(path))?;
    let text = std::str::from_utf8(&header)
        .map_err(|_| not_safetensors("the header is not UTF-8".into()))?;
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| not_safetensors(format!("header: {e}")))?;
    let declared = (metadata.data_len() as u64)
        .checked_add(8 + n)
        .ok_or_else(|| not_safetensors("the header declares too much data".into()))?;
    if declared != len {
        return Err(fail(
            path,
            format!(
                "the header declares {declared} bytes but the file has {len}: truncated, or \
                 something was appended"
            ),
        ));
    }
    Ok(metadata)
}

/// Checks the metadata of a tch-fabric checkpoint and returns its checksums (`None` for a
/// format-1 file, which has none).
fn check_metadata(path: &Path, metadata: &Metadata) -> Result<Option<Checksums>> {
    let meta = metadata.metadata().clone().unwrap_or_default();
    match meta.get(KEY_FORMAT).map(String::as_str) {
        Some(FORMAT) => {}
        Some(FORMAT_UNCHECKED) if !meta.contains_key(KEY_CHECKSUMS) => {
            log::warn!(
                "checkpoint {} has format 1 (written before checkpoints carried checksums): \
                 loading it unchecked; save it again to add them",
                path.display()
            );
            return Ok(None);
        }
        None => return Err(fail(
            path,
            "a safetensors file, but not a tch-fabric checkpoint (no tch_fabric.format metadata)",
        )),
        Some(other) => {
            return Err(fail(
                path,
                format!(
                    "tch_fabric.format {other:?} is not one this version reads ({FORMAT_UNCHECKED} \
                     or {FORMAT}): written by a newer tch-fabric, or damaged"
                ),
            ))
        }
    }
    let sums: Checksums = meta
        .get(KEY_CHECKSUMS)
        .ok_or_else(|| fail(path, "format 2 without tch_fabric.checksums: damaged"))
        .and_then(|s| {
            serde_json::from_str(s)
                .map_err(|e| fail(path, format!("tch_fabric.checksums is damaged: {e}")))
        })?;
    if sums.algorithm != ALGORITHM {
        return Err(fail(
            path,
            format!(
                "checksum algorithm {:?} is not {ALGORITHM:?}",
                sums.algorithm
            ),
        ));
    }
    let infos = metadata.tensors();
    let index: BTreeMap<&str, (Dtype, &[usize])> = infos
        .iter()
        .map(|(n, i)| (n.as_str(), (i.dtype, i.shape.as_slice())))
        .collect();
    if header_crc(&meta, &index) != sums.header {
        return Err(fail(
            path,
            "the header does not match its checksum (metadata, tensor names, dtypes or shapes \
             were altered or damaged)",
        ));
    }
    if let Some(name) = index.keys().find(|n| !sums.tensors.contains_key(**n)) {
        return Err(fail(path, format!("tensor '{name}' has no checksum")));
    }
    if let Some(name) = sums
        .tensors
        .keys()
        .find(|n| !index.contains_key(n.as_str()))
    {
        return Err(fail(
            path,
            format!("tensor '{name}' is missing from the file"),
        ));
    }
    Ok(Some(sums))
}

/// Reads every tensor's bytes in file order, one tensor in memory at a time, checks it against
/// its checksum and hands it to `f`.
fn for_each_tensor(
    path: &Path,
    r: &mut impl Read,
    metadata: &Metadata,
    checksums: Option<&Checksums>,
    mut f: impl FnMut(&str, &TensorInfo, &[u8]) -> Result<()>,
) -> Result<()> {
    for name in metadata.offset_keys() {
        let info = metadata
            .info(&name)
            .ok_or_else(|| fail(path, format!("tensor '{name}' has no header entry")))?;
        let (start, end) = info.data_offsets;
        let mut bytes = buffer(path, end - start, &format!("tensor '{name}'"))?;
        r.read_exact(&mut bytes).map_err(io(path))?;
        if let Some(sums) = checksums {
            let want = sums.tensors.get(&name).copied();
            let got = crc32fast::hash(&bytes);
            if want != Some(got) {
                return Err(fail(
                    path,
                    format!(
                        "tensor '{name}' does not match its checksum (crc32 {got:08x}, recorded \
                         {:08x}): the file was altered or damaged",
                        want.unwrap_or(0)
                    ),
                ));
            }
        }
        f(&name, info, &bytes)?;
    }
    Ok(())
}

/// What a tch-fabric checkpoint holds, from its header alone ([`super::inspect`]): the header
/// is checked against its checksum, the tensors' bytes are not read.
pub(super) fn inspect(path: &Path) -> Result<super::CheckpointInfo> {
    let (mut file, len) = open_regular(path)?;
    let metadata = read_header(path, &mut file, len)?;
    check_metadata(path, &metadata)?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let precision = meta
        .get(KEY_PRECISION)
        .map(|p| {
            p.parse::<Precision>()
                .map_err(|e| fail(path, format!("bad precision: {e}")))
        })
        .transpose()?;
    let state = match meta.get(KEY_STATE) {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| fail(path, format!("tch_fabric.state is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let mut tensors = Vec::new();
    for name in metadata.offset_keys() {
        let info = metadata
            .info(&name)
            .ok_or_else(|| fail(path, format!("tensor '{name}' has no header entry")))?;
        let kind = dtype::from_safetensors(info.dtype).ok_or_else(|| {
            fail(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", info.dtype),
            )
        })?;
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| fail(path, format!("tensor '{name}' has a size beyond i64")))?;
        tensors.push(super::TensorInfo { name, shape, kind });
    }
    Ok(super::CheckpointInfo {
        format: super::CheckpointFormat::TchFabric,
        precision,
        state,
        tensors,
    })
}

/// Reads and validates a checkpoint written by [`write`]: a regular file whose sizes match
/// its header, whose checksums match its header and every tensor. Reads at most the size the
/// header declares, one tensor's bytes at a time.
pub(crate) fn read(path: &Path) -> Result<Contents> {
    let (mut file, len) = open_regular(path)?;
    let metadata = read_header(path, &mut file, len)?;
    let checksums = check_metadata(path, &metadata)?;
    let meta = metadata.metadata().clone().unwrap_or_default();
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
    let optimizers = meta
        .get(KEY_OPTIMIZERS)
        .map(|n| {
            n.parse::<usize>()
                .map_err(|_| fail(path, format!("tch_fabric.optimizers is {n:?}, not a count")))
        })
        .transpose()?;
    let param_groups = match meta.get(KEY_PARAM_GROUPS) {
        None => HashMap::new(),
        Some(text) => serde_json::from_str::<Vec<Option<Vec<ParamGroup>>>>(text)
            .map_err(|e| fail(path, format!("{KEY_PARAM_GROUPS} is damaged: {e}")))?
            .into_iter()
            .enumerate()
            .filter_map(|(i, g)| Some((i, g?)))
            .collect(),
    };
    let mut tensors = HashMap::new();
    for_each_tensor(
        path,
        &mut file,
        &metadata,
        checksums.as_ref(),
        |name, info, bytes| {
            let kind = dtype::from_safetensors(info.dtype).ok_or_else(|| {
                fail(
                    path,
                    format!("tensor '{name}' has unsupported dtype {:?}", info.dtype),
                )
            })?;
            let shape = info
                .shape
                .iter()
                .map(|&d| i64::try_from(d))
                .collect::<Result<Vec<i64>, _>>()
                .map_err(|_| fail(path, format!("tensor '{name}' has a size beyond i64")))?;
            let t = Tensor::f_from_data_size(bytes, &shape, kind).op("from_data")?;
            tensors.insert(name.to_string(), t);
            Ok(())
        },
    )?;
    Ok(Contents {
        tensors,
        precision,
        scaler,
        state_json,
        param_groups,
        missing: Vec::new(),
        optimizers,
    })
}

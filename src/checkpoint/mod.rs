//! Checkpoints: what [`crate::Fabric::save`] writes and [`crate::Fabric::load`] checks and
//! restores.
//!
//! - The file: one safetensors file holding the tensors (readable by Python's `safetensors`),
//!   with the precision, the GradScaler state (PyTorch's keys), the user's own state as JSON
//!   and CRC-32 checksums of the header and of every tensor in the header's metadata. Written
//!   atomically: a temporary file in the target's folder, synced, read back and checked, then
//!   renamed over the target (through symbolic links: the link stays, its target is
//!   replaced). Temporary files of saves killed mid-way are removed by the next save there.
//! - Reading: only regular files (a FIFO or a device is refused without blocking), never more
//!   than the header declares and the file holds, every checksum verified; a damaged file is
//!   an [`Error::Checkpoint`] naming what does not match.
//! - The key layout: a model's variables under their VarStore names (`fc.weight`), prefixed
//!   with the model's setup name when it has one (`generator.fc.weight`); optimizer `i`'s state
//!   as `optimizer.<i>.<param>.<field>`.
//! - Loading: every check runs before anything changes ([`plan_load`]), then [`apply`].
mod pickle;
pub(crate) mod torch;
mod value;

use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::Optimizer;
use crate::optim::ParamGroup;
use crate::params::lock_vars;
use crate::precision::Precision;
use crate::scaler::{GradScaler, GradScalerState};
use safetensors::tensor::{Dtype, Metadata, TensorInfo, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tch::{nn, Device, Kind, Tensor};

/// The key prefix of optimizer state: `optimizer.<index>.<param>.<field>`.
const OPTIMIZER_PREFIX: &str = "optimizer.";

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
    fn key(&self, var: &str) -> String {
        match &self.name {
            Some(n) => format!("{n}.{var}"),
            None => var.to_string(),
        }
    }

    /// (key, tensor) of every variable, sorted by key.
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

/// A checked load: what [`apply`] will change.
pub(crate) struct Plan {
    /// (destination variable, source tensor) for every model variable.
    weights: Vec<(Tensor, Tensor)>,
    /// Each optimizer's state.
    optimizer_states: Vec<Vec<(String, Tensor)>>,
    /// The scaler state to load, when both sides have one.
    scaler: Option<GradScalerState>,
    /// PyTorch param groups to load, by optimizer index (torch.save files only).
    param_groups: Vec<(usize, ParamGroup)>,
    /// What a non-strict load leaves out.
    pub report: LoadReport,
}

/// What a non-strict load ([`crate::Fabric::load_non_strict`]) left out: PyTorch's
/// `load_state_dict(strict=False)` report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables of the models set up that the checkpoint does not hold (they keep their
    /// values), by checkpoint key.
    pub missing_keys: Vec<String>,
    /// Tensors of the checkpoint that match no variable or optimizer (ignored).
    pub unexpected_keys: Vec<String>,
}

/// How a load treats what does not fit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// The Fabric's precision, which the weights are converted to.
    pub precision: Precision,
    /// Whether a finite weight may become inf in that conversion.
    pub allow_overflow: bool,
    /// Whether missing and unexpected weights are refused (else reported).
    pub strict: bool,
}

/// Checks `contents` against the models, optimizers and scaler of a Fabric, changing nothing.
/// Unless `rules.strict`, missing and unexpected weights are reported in the plan instead of
/// refused. Weights saved in another floating dtype are converted here, and a finite value
/// that the conversion turns into inf is an error unless `rules.allow_overflow`.
pub(crate) fn plan_load(
    path: &Path,
    contents: &Contents,
    models: &[Model],
    optimizers: &[SharedOptimizer],
    scaler: Option<&GradScaler>,
    rules: Rules,
) -> Result<Plan> {
    let Rules {
        precision,
        allow_overflow,
        strict,
    } = rules;
    let bad = |reason: String| fail(path, reason);
    let mut weights = Vec::new();
    let mut claimed: Vec<&str> = Vec::new();
    let mut report = LoadReport::default();
    for m in models {
        for (key, p) in m.entries()? {
            let Some((k, t)) = contents.tensors.get_key_value(&key) else {
                if strict {
                    return Err(bad(format!("parameter '{key}' is not in the checkpoint")));
                }
                report.missing_keys.push(key);
                continue;
            };
            let (want, got) = (native::shape(&p)?, native::shape(t)?);
            if want != got {
                return Err(bad(format!(
                    "parameter '{key}' has shape {got:?} in the checkpoint but {want:?} in the model"
                )));
            }
            claimed.push(k);
            let src = converted(path, &key, &p, t, precision, allow_overflow)?;
            weights.push((p, src));
        }
    }
    let mut optimizer_states: Vec<Vec<(String, Tensor)>> =
        optimizers.iter().map(|_| Vec::new()).collect();
    for (key, t) in &contents.tensors {
        if claimed.contains(&key.as_str()) {
            continue;
        }
        let slot = key.strip_prefix(OPTIMIZER_PREFIX).and_then(|rest| {
            let (i, name) = rest.split_once('.')?;
            Some((i.parse::<usize>().ok()?, name))
        });
        match slot {
            Some((i, name)) if i < optimizer_states.len() => {
                optimizer_states[i].push((name.to_string(), t.shallow_clone()))
            }
            _ if !strict => report.unexpected_keys.push(key.clone()),
            _ => {
                return Err(bad(format!(
                "tensor '{key}' in the checkpoint matches no parameter or optimizer of this Fabric"
            )))
            }
        }
    }
    // The param groups first: one of another optimizer type explains a state that does not fit.
    let mut param_groups: Vec<(usize, ParamGroup)> = Vec::new();
    for (&i, group) in &contents.param_groups {
        let opt = optimizers.get(i).ok_or_else(|| {
            bad(format!(
                "a param group for optimizer {i}, which does not exist"
            ))
        })?;
        opt.borrow()
            .check_param_group(group)
            .map_err(|e| bad(format!("optimizer {i}: {e}")))?;
        param_groups.push((i, group.clone()));
    }
    for (i, (opt, st)) in optimizers.iter().zip(&optimizer_states).enumerate() {
        opt.borrow()
            .check_state(st)
            .map_err(|e| bad(format!("optimizer {i}: {e}")))?;
    }
    let scaler_state = match (&contents.scaler, scaler) {
        (Some(s), Some(scaler)) => {
            scaler.check_state_dict(s)?;
            Some(s.clone())
        }
        (None, Some(_)) => {
            log::info!(
                "checkpoint {} has no GradScaler state ({}): keeping the current scale",
                path.display(),
                contents.precision
            );
            None
        }
        (Some(_), None) => {
            log::info!(
                "checkpoint {} holds a GradScaler state that {precision} does not use",
                path.display()
            );
            None
        }
        (None, None) => None,
    };
    if contents.precision != precision {
        log::info!(
            "checkpoint {} was saved with {}; converting its weights to {precision}",
            path.display(),
            contents.precision
        );
    }
    Ok(Plan {
        weights,
        optimizer_states,
        scaler: scaler_state,
        param_groups,
        report,
    })
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        _ => "another dtype",
    }
}

/// The checkpoint tensor `src` in the dtype of the variable `dst` (a shallow handle when they
/// agree, or when either is not floating: `copy_` converts those as PyTorch does), refusing a
/// conversion that overflows unless `allow_overflow`.
fn converted(
    path: &Path,
    key: &str,
    dst: &Tensor,
    src: &Tensor,
    precision: Precision,
    allow_overflow: bool,
) -> Result<Tensor> {
    let (Some(d), Some(s)) = (native::meta(dst)?, native::meta(src)?) else {
        return Ok(src.shallow_clone());
    };
    if d.kind == s.kind || !is_float(d.kind) || !is_float(s.kind) {
        return Ok(src.shallow_clone());
    }
    let out = src.f_to_kind(d.kind).op("to_kind")?;
    if allow_overflow {
        return Ok(out);
    }
    let overflow = src
        .f_isfinite()
        .and_then(|finite| out.f_isinf().and_then(|inf| finite.f_logical_and(&inf)))
        .op("isfinite")?;
    let count = overflow
        .f_sum(Kind::Int64)
        .and_then(|n| n.f_int64_value(&[]))
        .op("sum")?;
    if count > 0 {
        let largest = src
            .f_masked_select(&overflow)
            .and_then(|v| v.f_abs())
            .and_then(|v| v.f_max())
            .and_then(|v| v.f_double_value(&[]))
            .op("max")?;
        return Err(fail(
            path,
            format!(
                "parameter '{key}' has {count} finite value(s) saved as {} (the largest of \
                 magnitude {largest:e}) that become inf in {} under {precision}: load it in a \
                 precision with a wider range, or allow it with \
                 FabricBuilder::allow_load_overflow(true)",
                dtype_name(s.kind),
                dtype_name(d.kind)
            ),
        ));
    }
    Ok(out)
}

/// Applies a checked load.
pub(crate) fn apply(
    plan: Plan,
    optimizers: &[SharedOptimizer],
    scaler: Option<&mut GradScaler>,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in &plan.weights {
            dst.shallow_clone().f_copy_(src).op("copy_")?;
        }
        Ok(())
    })?;
    for (opt, st) in optimizers.iter().zip(&plan.optimizer_states) {
        opt.borrow_mut().load_state(st)?;
    }
    for (i, group) in &plan.param_groups {
        optimizers[*i].borrow_mut().load_param_group(group)?;
    }
    if let (Some(s), Some(scaler)) = (&plan.scaler, scaler) {
        scaler.load_state_dict(s)?;
    }
    Ok(())
}

const KEY_FORMAT: &str = "tch_fabric.format";
/// Format 2 carries [`Checksums`]; format 1 (before them) still loads, unchecked, with a warning.
const FORMAT: &str = "2";
const FORMAT_UNCHECKED: &str = "1";
const KEY_PRECISION: &str = "tch_fabric.precision";
const KEY_SCALER: &str = "tch_fabric.grad_scaler";
const KEY_STATE: &str = "tch_fabric.state";
const KEY_CHECKSUMS: &str = "tch_fabric.checksums";
/// The largest header safetensors itself reads (its `MAX_HEADER_SIZE`): a larger declared size
/// is a damaged or foreign file, refused before anything is allocated for it.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What a checkpoint file holds.
#[derive(Debug)]
pub(crate) struct Contents {
    pub tensors: HashMap<String, Tensor>,
    pub precision: Precision,
    pub scaler: Option<GradScalerState>,
    pub state_json: String,
    /// PyTorch param groups by optimizer index (torch.save files only).
    pub param_groups: HashMap<usize, ParamGroup>,
}

fn fail(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

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
        let dtype = dtype_of(m.kind).ok_or_else(|| {
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
    precision: Precision,
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

/// Where a save to `path` really writes: the end of its chain of symbolic links (so the link
/// stays and its target is replaced), or `path` itself. Refuses to replace anything but a
/// regular file.
fn resolve_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    // Linux's own limit on links followed in one lookup (MAXSYMLINKS).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&p).map_err(io(path))?;
                p = match p.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            Ok(m) if m.is_file() => return Ok(p),
            Ok(m) => {
                return Err(fail(
                    path,
                    format!(
                        "{} is {}, not a regular file: refusing to replace it with a checkpoint",
                        p.display(),
                        file_kind(&m.file_type())
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(io(path)(e)),
        }
    }
    Err(fail(path, "too many levels of symbolic links"))
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Numbers the temporary files of this process, so that two threads saving to one path at
/// once never write the same temporary file.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The marker in temporary file names: `.<name>.tmp-<pid>-<n>` (`.<name>.tmp-<pid>` before).
const TMP_MARK: &str = ".tmp-";

/// The pid in the name of a temporary file this crate writes, if `name` is one.
fn tmp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(TMP_MARK)?;
    let pid = match tail.split_once('-') {
        Some((pid, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => pid,
        Some(_) => return None,
        None => tail,
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Whether process `pid` may still be running (and so may still be writing its temporary
/// file). Unsure means yes: a live save's file is never removed.
fn may_be_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists; pid > 0 addresses exactly
        // one process (never a group).
        let r = unsafe { libc::kill(pid, 0) };
        !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files that saves killed mid-way (by another process, now gone) left
/// in `dir`. Files of live processes, of this process, and anything else are left alone.
/// (Processes of another PID namespace sharing the folder look gone: their saves are not told
/// apart, so do not share a checkpoint folder across containers while both save.)
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(tmp_owner) else {
            continue;
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && pid != me && !may_be_alive(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => log::info!(
                    "removed {}, left by an interrupted save of process {pid}",
                    entry.path().display()
                ),
                Err(e) => log::debug!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Runs `produce` on a temporary sibling of the target, syncs it, reads it back
/// ([`verify`]) and renames it over the target (the end of `path`'s symbolic links), so a
/// crash at any point leaves either the old file or the new one, never a mix, and a file that
/// does not read back never replaces a good one.
fn write_atomic(
    path: &Path,
    produce: impl FnOnce(&Path) -> Result<()>,
    read_back: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let target = resolve_target(path)?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| fail(path, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    remove_stale_temps(&dir);
    let tmp = dir.join(format!(
        ".{name}{TMP_MARK}{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        produce(&tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
        read_back(&tmp).map_err(|e| not_read_back(path, e))?;
        // Keep the permissions of the file being replaced (a private checkpoint stays private).
        if let Ok(old) = std::fs::metadata(&target) {
            let _ = std::fs::set_permissions(&tmp, old.permissions());
        }
        std::fs::rename(&tmp, &target).map_err(io(path))?;
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

/// The error of a file just written that does not read back, reported for `path`.
fn not_read_back(path: &Path, e: Error) -> Error {
    match e {
        Error::Checkpoint { reason, .. } => fail(
            path,
            format!(
                "the file written does not read back ({reason}); the previous checkpoint is kept"
            ),
        ),
        Error::Io { source, .. } => io(path)(source),
        other => other,
    }
}

/// Opens `path` for reading if it is a regular file. A FIFO is opened without blocking and
/// refused like a device or a folder, so that no read waits forever or never ends.
fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io(path))?;
    let m = file.metadata().map_err(io(path))?;
    if !m.is_file() {
        return Err(fail(
            path,
            format!(
                "{} cannot be a checkpoint, which is a regular file written by Fabric::save",
                file_kind(&m.file_type())
            ),
        ));
    }
    Ok((file, m.len()))
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
    let mut tensors = HashMap::new();
    for_each_tensor(
        path,
        &mut file,
        &metadata,
        checksums.as_ref(),
        |name, info, bytes| {
            let kind = kind_of(info.dtype).ok_or_else(|| {
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
        param_groups: HashMap::new(),
    })
}

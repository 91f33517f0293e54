//! Checkpoints: what [`crate::Fabric::save`] writes and [`crate::Fabric::load`] checks and
//! restores.
//!
//! - The file: one safetensors file holding the tensors (readable by Python's `safetensors`),
//!   with the precision, the GradScaler state (PyTorch's keys) and the user's own state as JSON
//!   in the header's metadata. Written atomically: a temporary file in the same folder, synced,
//!   then renamed over the target.
//! - The key layout: a model's variables under their VarStore names (`fc.weight`), prefixed
//!   with the model's setup name when it has one (`generator.fc.weight`); optimizer `i`'s state
//!   as `optimizer.<i>.<param>.<field>`.
//! - Loading: every check runs before anything changes ([`plan_load`]), then [`apply`].
use crate::error::{Error, Op, Result};
use crate::native;
use crate::optim::Optimizer;
use crate::params::lock_vars;
use crate::precision::Precision;
use crate::scaler::{GradScaler, GradScalerState};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
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
}

/// Checks `contents` against the models, optimizers and scaler of a Fabric, changing nothing.
pub(crate) fn plan_load(
    path: &Path,
    contents: &Contents,
    models: &[Model],
    optimizers: &[SharedOptimizer],
    scaler: Option<&GradScaler>,
    precision: Precision,
) -> Result<Plan> {
    let bad = |reason: String| fail(path, reason);
    let mut weights = Vec::new();
    let mut claimed: Vec<&str> = Vec::new();
    for m in models {
        for (key, p) in m.entries()? {
            let (k, t) = contents
                .tensors
                .get_key_value(&key)
                .ok_or_else(|| bad(format!("parameter '{key}' is not in the checkpoint")))?;
            let (want, got) = (native::shape(&p)?, native::shape(t)?);
            if want != got {
                return Err(bad(format!(
                    "parameter '{key}' has shape {got:?} in the checkpoint but {want:?} in the model"
                )));
            }
            claimed.push(k);
            weights.push((p, t.shallow_clone()));
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
            _ => {
                return Err(bad(format!(
                "tensor '{key}' in the checkpoint matches no parameter or optimizer of this Fabric"
            )))
            }
        }
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
    })
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
    if let (Some(s), Some(scaler)) = (&plan.scaler, scaler) {
        scaler.load_state_dict(s)?;
    }
    Ok(())
}

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
    let m = native::meta(t)?.ok_or_else(|| fail(path, format!("tensor '{name}' is undefined")))?;
    let dtype = dtype_of(m.kind).ok_or_else(|| {
        fail(
            path,
            format!("tensor '{name}' has unsupported dtype {:?}", m.kind),
        )
    })?;
    let t = t
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .op("to cpu")?;
    let numel = usize::try_from(m.numel).unwrap_or(0);
    let mut data = vec![0u8; numel * m.kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel).op("copy_data")?;
    let shape = native::shape(&t)?.into_iter().map(|d| d as usize).collect();
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
        let t = Tensor::f_from_data_size(view.data(), &shape, kind).op("from_data")?;
        tensors.insert(name, t);
    }
    Ok(Contents {
        tensors,
        precision,
        scaler,
        state_json,
    })
}

//! Checkpoints in `torch.save`'s format, as Lightning Fabric's `fabric.save(path, {"model":
//! model, "optimizer": optimizer, ...})` writes them and `fabric.load` / `torch.load(path,
//! weights_only=True)` read them. Read and written by libtorch's own zip container and
//! pickler (through the shim); the layout:
//!
//! - `"model"`: the model's `state_dict` (a model set up with a name sits under its name);
//! - `"optimizer"` (then `"optimizer_1"`, ...): the optimizer's `state_dict`: `state` by
//!   parameter index, in the order `model.parameters()` gives (for a file from Python: the
//!   order of the model's entries), and `param_groups` with PyTorch's hyper-parameter names;
//! - `"scaler"`: a GradScaler's `state_dict`, when the precision has one;
//! - every other entry: the user's state, given to and taken from serde as a JSON object.
use super::atomic::{open_regular, write_atomic};
use super::layout::{Model, SharedOptimizer, OPTIMIZER_PREFIX};
use super::{fail, io, Contents, TensorInfo};
use crate::dtype;
use crate::error::Op;
use crate::error::{Error, Result};
use crate::native::{self, PyValue};
use crate::optim::ParamGroup;
use crate::params::lock_vars;
use crate::precision::Precision;
use crate::scaler::GradScalerState;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// The entry of the GradScaler's state.
pub(crate) const SCALER_KEY: &str = "scaler";

/// The entry of a model: its setup name, or `"model"`.
pub(crate) fn model_key(m: &Model) -> &str {
    m.name.as_deref().unwrap_or("model")
}

/// The entry of optimizer `i`: `"optimizer"`, then `"optimizer_1"`, `"optimizer_2"`, ...
pub(crate) fn optimizer_key(i: usize) -> String {
    match i {
        0 => "optimizer".to_string(),
        i => format!("optimizer_{i}"),
    }
}

/// Whether a save to `path` writes this format: its extension is `.pt`, `.pth` or `.ckpt`.
pub(crate) fn is_torch_path(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt" | "pth" | "ckpt")
    )
}

/// Whether the file at `path` is a zip archive (torch.save's format since PyTorch 1.6) rather
/// than a safetensors file: decided by content, whatever its name.
pub(crate) fn is_torch_file(path: &Path) -> Result<bool> {
    let (mut file, len) = open_regular(path)?;
    if len < 4 {
        return Ok(false);
    }
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(io(path))?;
    Ok(magic == *b"PK\x03\x04")
}

/// Reads the archive's value tree: the pickle (checked by [`super::pickle::rewrite`] for what
/// it may build), then the storages it names, each record checked for its size (by the shim,
/// before it is read) and its CRC-32 (here, after).
fn read_value(path: &Path) -> Result<PyValue> {
    let bad = |reason: String| fail(path, reason);
    let mut archive = super::archive::Archive::open(path)?;
    let pickle = archive.read("data.pkl", super::archive::MAX_PICKLE_BYTES)?;
    let (pickle, build_key) =
        super::pickle::rewrite(&pickle).map_err(|r| bad(format!("cannot be read: {r}")))?;
    let (mut value, records) = native::torch_load(path, &pickle)
        .map_err(|e| bad(format!("cannot be unpickled: {}", native_reason(&e))))?;
    for r in &records {
        archive.check_read(&r.name, r.bytes, r.crc32)?;
    }
    archive.verify_version()?;
    drop_build_states(&mut value, &build_key);
    Ok(value)
}

/// Removes the entries the rewriter made of OrderedDict BUILD states (a state_dict's
/// `_metadata`), which are under a key the file itself does not hold.
fn drop_build_states(v: &mut PyValue, key: &str) {
    match v {
        PyValue::Dict(entries) => {
            entries.retain(|(k, _)| !matches!(k, PyValue::Str(s) if s == key));
            for (_, x) in entries {
                drop_build_states(x, key);
            }
        }
        PyValue::List(items) | PyValue::Tuple(items) => {
            for x in items {
                drop_build_states(x, key);
            }
        }
        _ => {}
    }
}

fn native_reason(e: &Error) -> String {
    match e {
        Error::Native { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The dict's entries.
fn entries<'a>(path: &Path, what: &str, v: &'a PyValue) -> Result<Vec<(&'a str, &'a PyValue)>> {
    let e = v.as_str_dict().ok_or_else(|| {
        fail(
            path,
            format!("{what} is a {}, not a dict with string keys", v.type_name()),
        )
    })?;
    Ok(e)
}

/// A state tensor from an optimizer state entry: tensors as they are, numbers (PyTorch < 1.12
/// kept `step` as a float) as 0-dim float32 tensors.
fn state_tensor(path: &Path, key: &str, v: &PyValue) -> Result<Option<Tensor>> {
    match v {
        PyValue::Tensor(t) => Ok(Some(t.shallow_clone())),
        PyValue::None => Ok(None),
        other => match other.as_f64() {
            Some(x) => Ok(Some(Tensor::from(x as f32))),
            None => Err(fail(
                path,
                format!(
                    "optimizer state '{key}' is a {}, not a tensor",
                    other.type_name()
                ),
            )),
        },
    }
}

/// The positions of a param group's parameters, from its `params` entry.
fn members(group: &ParamGroup) -> Vec<usize> {
    group
        .get("params")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .filter_map(|v| usize::try_from(v).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One `param_groups` entry of a file: its hyper-parameters as JSON (without `params` and
/// `param_names`) and its parameter ids.
fn group_entry(path: &Path, what: &str, group: &PyValue) -> Result<(ParamGroup, Vec<i64>)> {
    let mut json = ParamGroup::new();
    let mut indices: Vec<i64> = Vec::new();
    for (k, v) in entries(path, what, group)? {
        if k == "params" {
            let PyValue::List(list) = v else {
                return Err(fail(path, format!("{what}: 'params' is not a list")));
            };
            for p in list {
                match p {
                    PyValue::Int(i) => indices.push(*i),
                    other => {
                        return Err(fail(
                            path,
                            format!("{what}: a parameter index is a {}", other.type_name()),
                        ))
                    }
                }
            }
        } else if k != "param_names" {
            let key = format!("{what}.{k}");
            json.insert(k.to_string(), to_json(path, &key, v, &mut Tensors::Values)?);
        }
    }
    Ok((json, indices))
}

/// What a torch.save checkpoint holds, without a model ([`super::inspect`]).
pub(super) fn inspect(path: &Path) -> Result<super::CheckpointInfo> {
    let root = read_value(path)?;
    let mut tensors = Vec::new();
    let state = to_json(path, "", &root, &mut Tensors::Describe(&mut tensors))?;
    Ok(super::CheckpointInfo {
        format: super::CheckpointFormat::TorchSave,
        precision: None,
        state,
        tensors,
    })
}

/// Reads a torch.save checkpoint into [`Contents`] for the models and optimizers of a Fabric.
pub(crate) fn read(
    path: &Path,
    models: &[Model],
    optimizers: &[SharedOptimizer],
    precision: Precision,
    strict: bool,
) -> Result<Contents> {
    let root = read_value(path)?;
    let top = entries(path, "the checkpoint", &root)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut claimed: HashSet<&str> = HashSet::new();
    // Every model variable in file order (VarStore names), for the optimizers' indices.
    let mut order: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for m in models {
        let key = model_key(m);
        let found = top.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        if found.is_none() && !strict {
            // Its variables are then reported missing by the plan.
            continue;
        }
        let entry = found.ok_or_else(|| {
            let have: Vec<&str> = top.iter().map(|(k, _)| *k).collect();
            fail(
                path,
                format!("the checkpoint has no entry '{key}' for the model (it has {have:?})"),
            )
        })?;
        claimed.insert(key);
        for (name, v) in entries(path, &format!("entry '{key}'"), entry)? {
            let PyValue::Tensor(t) = v else {
                return Err(fail(
                    path,
                    format!("'{key}.{name}' is a {}, not a tensor", v.type_name()),
                ));
            };
            tensors.insert(m.key(name), t.shallow_clone());
            // The parameter order is PyTorch's `named_parameters()`: a tied weight, saved
            // under each of its names with one storage, counts at its first name only.
            let at = native::meta(t)?.map(|m| (m.data, m.kind, m.numel));
            if at.is_some_and(|a| a.0 != 0 && !seen.insert(a)) {
                continue;
            }
            order.push(name.to_string());
        }
    }
    let mut param_groups = HashMap::new();
    let mut missing = Vec::new();
    for (i, opt) in optimizers.iter().enumerate() {
        let key = optimizer_key(i);
        let Some(&(found, entry)) = top.iter().find(|(k, _)| *k == key) else {
            // The plan refuses it in a strict load, once the weights are checked.
            missing.push(key);
            continue;
        };
        claimed.insert(found);
        let what = format!("entry '{key}'");
        let groups = match entry.get("param_groups") {
            Some(PyValue::List(g)) => g,
            _ => {
                return Err(fail(
                    path,
                    format!("{what} is not an optimizer state_dict (no 'param_groups' list)"),
                ))
            }
        };
        let opt = opt.borrow();
        let names = opt.params().names();
        // Our groups' members (one group over every parameter for an optimizer without a
        // torch.optim twin, which the plan then refuses with its own message).
        let ours: Vec<Vec<usize>> = match opt.param_groups() {
            Some(g) => g.iter().map(members).collect(),
            None => vec![(0..names.len()).collect()],
        };
        if groups.len() != ours.len() {
            return Err(fail(
                path,
                format!(
                    "{what} has {} param groups, optimizer {i} has {}: build it with the same \
                     param groups",
                    groups.len(),
                    ours.len()
                ),
            ));
        }
        let mut jsons = Vec::with_capacity(groups.len());
        let mut name_of: HashMap<i64, &String> = HashMap::new();
        for (g, (group, members)) in groups.iter().zip(&ours).enumerate() {
            let what = format!("{what} param_groups[{g}]");
            let (json, indices) = group_entry(path, &what, group)?;
            // The file's ids of group g are its parameters in the model's order; ours are
            // matched by name in the same order.
            // By any of their names (a tied weight's other name included).
            let params = opt.params();
            let mine: Vec<&String> = order
                .iter()
                .filter_map(|key| members.iter().find(|&&k| params.is_named(k, key)))
                .map(|&k| &names[k])
                .collect();
            if indices.len() != members.len() || mine.len() != members.len() {
                return Err(fail(
                    path,
                    format!(
                        "{what} has {} parameters and the models' entries name {} of this \
                         optimizer's group's {}: the optimizer must cover the same parameters",
                        indices.len(),
                        mine.len(),
                        members.len()
                    ),
                ));
            }
            name_of.extend(indices.iter().copied().zip(mine));
            jsons.push(json);
        }

        if let Some(state) = entry.get("state") {
            let PyValue::Dict(per_param) = state else {
                return Err(fail(path, format!("{what}: 'state' is not a dict")));
            };
            for (idx, fields) in per_param {
                let name = match idx {
                    PyValue::Int(i) => name_of.get(i),
                    _ => None,
                }
                .ok_or_else(|| {
                    fail(
                        path,
                        format!("{what}: state of an unknown parameter index {idx:?}"),
                    )
                })?;
                for (field, v) in entries(path, &format!("{what} state"), fields)? {
                    let full = format!("{name}.{field}");
                    if let Some(t) = state_tensor(path, &full, v)? {
                        tensors.insert(format!("{OPTIMIZER_PREFIX}{i}.{full}"), t);
                    }
                }
            }
        }
        param_groups.insert(i, jsons);
    }
    let mut scaler = None;
    let mut extra = serde_json::Map::new();
    for (k, v) in &top {
        if claimed.contains(k) {
            continue;
        }
        if *k == SCALER_KEY {
            let json = to_json(path, k, v, &mut Tensors::Values)?;
            scaler = Some(
                serde_json::from_value::<GradScalerState>(json)
                    .map_err(|e| fail(path, format!("entry '{SCALER_KEY}': {e}")))?,
            );
            continue;
        }
        extra.insert(k.to_string(), to_json(path, k, v, &mut Tensors::Values)?);
    }
    Ok(Contents {
        tensors,
        precision,
        scaler,
        state_json: Value::Object(extra).to_string(),
        param_groups,
        missing,
        optimizers: None,
    })
}

/// What a tensor in a value becomes in JSON.
pub(super) enum Tensors<'a> {
    /// Its values: a number (or bool) for a 0-dim tensor, nested arrays otherwise, so that serde
    /// reads it into a number field or a `Vec`.
    Values,
    /// `null`, with its name, shape and dtype recorded (what a checkpoint holds, read without
    /// a model).
    Describe(&'a mut Vec<TensorInfo>),
}

/// The most elements of a tensor in the user state turned into JSON values (32 MiB of f64);
/// larger tensors belong to a model.
const MAX_STATE_TENSOR: i64 = 1 << 22;

/// A user-state or hyper-parameter value as JSON: dict keys that are ints become strings;
/// tensors as `tensors` says (named by their path from `key`).
pub(super) fn to_json(
    path: &Path,
    key: &str,
    v: &PyValue,
    tensors: &mut Tensors<'_>,
) -> Result<Value> {
    Ok(match v {
        PyValue::None => Value::Null,
        PyValue::Bool(b) => Value::Bool(*b),
        PyValue::Int(i) => Value::from(*i),
        PyValue::Float(f) => number(path, key, *f)?,
        PyValue::Str(s) => Value::String(s.clone()),
        PyValue::Tensor(t) => match tensors {
            Tensors::Values => tensor_values(path, key, t)?,
            Tensors::Describe(out) => {
                let info = tensor_info(path, key, t)?;
                let scalar = info.shape.is_empty();
                out.push(info);
                match scalar {
                    // A number where JSON can hold it (an inf loss cannot).
                    true => tensor_values(path, key, t).unwrap_or(Value::Null),
                    false => Value::Null,
                }
            }
        },
        PyValue::List(items) | PyValue::Tuple(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| to_json(path, &format!("{key}[{i}]"), x, tensors))
                .collect::<Result<_>>()?,
        ),
        PyValue::Dict(items) => {
            let mut m = serde_json::Map::new();
            for (k, x) in items {
                let name = match k {
                    PyValue::Str(s) => s.clone(),
                    PyValue::Int(i) => i.to_string(),
                    other => {
                        return Err(fail(
                            path,
                            format!("'{key}' has a key of type {}", other.type_name()),
                        ))
                    }
                };
                let sub = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                m.insert(name, to_json(path, &sub, x, tensors)?);
            }
            Value::Object(m)
        }
    })
}

fn tensor_info(path: &Path, key: &str, t: &Tensor) -> Result<TensorInfo> {
    let m =
        native::meta(t)?.ok_or_else(|| fail(path, format!("'{key}' is an undefined tensor")))?;
    Ok(TensorInfo {
        name: key.to_string(),
        shape: native::shape(t)?,
        kind: m.kind,
    })
}

fn number(path: &Path, key: &str, f: f64) -> Result<Value> {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| fail(path, format!("'{key}' is {f}, which JSON cannot hold")))
}

/// A tensor's values as JSON: a number (or bool) for a 0-dim tensor (nanoGPT's
/// `best_val_loss`), nested arrays by its shape otherwise.
fn tensor_values(path: &Path, key: &str, t: &Tensor) -> Result<Value> {
    let m =
        native::meta(t)?.ok_or_else(|| fail(path, format!("'{key}' is an undefined tensor")))?;
    if m.numel > MAX_STATE_TENSOR {
        return Err(fail(
            path,
            format!(
                "'{key}' is a tensor of {} elements in the user state; tensors of more than \
                 {MAX_STATE_TENSOR} belong to a model set up with the Fabric",
                m.numel
            ),
        ));
    }
    let shape = native::shape(t)?;
    let flat = t
        .f_detach()
        .and_then(|t| t.f_to_device(tch::Device::Cpu))
        .and_then(|t| t.f_reshape([-1]))
        .op("tensor values")?;
    let leaves: Vec<Value> = if m.kind == Kind::Bool {
        let v = Vec::<bool>::try_from(&flat).op("tensor values")?;
        v.into_iter().map(Value::Bool).collect()
    } else if dtype::is_float(m.kind) {
        let v = Vec::<f64>::try_from(&flat.f_to_kind(Kind::Double).op("to_kind")?)
            .op("tensor values")?;
        v.into_iter()
            .map(|f| number(path, key, f))
            .collect::<Result<_>>()?
    } else if matches!(
        m.kind,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    ) {
        let v = Vec::<i64>::try_from(&flat.f_to_kind(Kind::Int64).op("to_kind")?)
            .op("tensor values")?;
        v.into_iter().map(Value::from).collect()
    } else {
        return Err(fail(
            path,
            format!(
                "'{key}' is a {} tensor, which has no JSON form",
                dtype::name(m.kind)
            ),
        ));
    };
    Ok(nest(&leaves, &shape))
}

/// `leaves` (row-major) as nested arrays of `shape`; a 0-dim shape is the single value.
fn nest(leaves: &[Value], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => leaves.first().cloned().unwrap_or(Value::Null),
        Some((&n, rest)) => {
            let n = usize::try_from(n).unwrap_or(0);
            let chunk = leaves.len().checked_div(n).unwrap_or(0);
            Value::Array(
                (0..n)
                    .map(|i| nest(&leaves[i * chunk..(i + 1) * chunk], rest))
                    .collect(),
            )
        }
    }
}

/// JSON as a Python value; `tuples` names the keys whose arrays PyTorch keeps as tuples.
fn from_json(v: &Value, tuples: &[&str], key: &str) -> PyValue {
    match v {
        Value::Null => PyValue::None,
        Value::Bool(b) => PyValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => PyValue::Int(i),
            None => PyValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => PyValue::Str(s.clone()),
        Value::Array(items) => {
            let items = items.iter().map(|x| from_json(x, tuples, "")).collect();
            if tuples.contains(&key) {
                PyValue::Tuple(items)
            } else {
                PyValue::List(items)
            }
        }
        Value::Object(m) => PyValue::Dict(
            m.iter()
                .map(|(k, x)| (PyValue::Str(k.clone()), from_json(x, tuples, k)))
                .collect(),
        ),
    }
}

fn str_dict(entries: Vec<(String, PyValue)>) -> PyValue {
    PyValue::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (PyValue::Str(k), v))
            .collect(),
    )
}

/// A model's entry: its variables in the optimizers' parameter order (the order their indices
/// use, and PyTorch's `model.parameters()` order), then the others by name.
fn model_entry(m: &Model, optimizers: &[SharedOptimizer]) -> Result<PyValue> {
    let vars = lock_vars(&m.vars)?;
    let mut named: HashMap<&str, Tensor> = vars
        .named_variables
        .iter()
        .map(|(n, t)| (n.as_str(), t.shallow_clone()))
        .collect();
    let mut out: Vec<(String, PyValue)> = Vec::with_capacity(named.len());
    for opt in optimizers {
        for name in opt.borrow().params().names() {
            if let Some(t) = named.remove(name.as_str()) {
                out.push((name.clone(), PyValue::Tensor(t.detach())));
            }
        }
    }
    let mut rest: Vec<(&str, Tensor)> = named.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(b.0));
    out.extend(
        rest.into_iter()
            .map(|(n, t)| (n.to_string(), PyValue::Tensor(t.detach()))),
    );
    Ok(str_dict(out))
}

/// An optimizer's entry: PyTorch's `state_dict()` layout.
fn optimizer_entry(path: &Path, i: usize, opt: &SharedOptimizer) -> Result<PyValue> {
    let opt = opt.borrow();
    let groups = opt.param_groups().ok_or_else(|| {
        fail(
            path,
            format!(
                "optimizer {i} ({opt:?}) has no torch.optim twin, so a torch.save checkpoint \
                 cannot hold its state: save to a .safetensors path, or use AdamW, Adam, Sgd, \
                 FusedAdamW or FusedSgd"
            ),
        )
    })?;
    let names = opt.params().names();
    // PyTorch numbers the parameters group after group: ids[k] is parameter k's.
    let mut ids: Vec<Option<i64>> = vec![None; names.len()];
    let mut next = 0i64;
    let mut entries: Vec<PyValue> = Vec::with_capacity(groups.len());
    for group in &groups {
        let mut group_ids = Vec::new();
        for k in members(group) {
            let slot = ids
                .get_mut(k)
                .ok_or_else(|| fail(path, format!("optimizer {i}: a group names parameter {k}")))?;
            *slot = Some(next);
            group_ids.push(PyValue::Int(next));
            next += 1;
        }
        let mut g: Vec<(String, PyValue)> = group
            .iter()
            .filter(|(k, _)| *k != "params")
            .map(|(k, v)| (k.clone(), from_json(v, &["betas"], k)))
            .collect();
        g.push(("params".to_string(), PyValue::List(group_ids)));
        entries.push(str_dict(g));
    }
    let mut per_param: Vec<Vec<(String, PyValue)>> = names.iter().map(|_| Vec::new()).collect();
    for (full, t) in opt.state_tensors()? {
        let (param, field) = full
            .rsplit_once('.')
            .ok_or_else(|| fail(path, format!("optimizer {i}: state name '{full}'")))?;
        let k = names
            .iter()
            .position(|n| n == param)
            .ok_or_else(|| fail(path, format!("optimizer {i}: state of unknown '{param}'")))?;
        per_param[k].push((field.to_string(), PyValue::Tensor(t)));
    }
    let mut state: Vec<(i64, Vec<(String, PyValue)>)> = Vec::new();
    for (k, fields) in per_param.into_iter().enumerate() {
        if fields.is_empty() {
            continue;
        }
        let id = ids[k].ok_or_else(|| {
            fail(
                path,
                format!(
                    "optimizer {i}: parameter '{}' is in no param group",
                    names[k]
                ),
            )
        })?;
        state.push((id, fields));
    }
    // PyTorch's state dict lists the state by id.
    state.sort_by_key(|(id, _)| *id);
    let state = PyValue::Dict(
        state
            .into_iter()
            .map(|(id, f)| (PyValue::Int(id), str_dict(f)))
            .collect(),
    );
    Ok(str_dict(vec![
        ("state".to_string(), state),
        ("param_groups".to_string(), PyValue::List(entries)),
    ]))
}

/// Writes a torch.save checkpoint atomically (as the safetensors one: a temporary file, read
/// back in full, renamed over the target).
pub(crate) fn write(
    path: &Path,
    models: &[Model],
    optimizers: &[SharedOptimizer],
    scaler: Option<&GradScalerState>,
    state: &Value,
) -> Result<()> {
    // A load finds each optimizer parameter among the models' variables by name: one that is
    // not there would make a file its own load refuses.
    let mut var_names = HashSet::new();
    for m in models {
        var_names.extend(m.var_names()?);
    }
    for (i, opt) in optimizers.iter().enumerate() {
        let opt = opt.borrow();
        let params = opt.params();
        for (k, name) in params.names().iter().enumerate() {
            let known = |n: &String| var_names.contains(n);
            if !known(name) && !params.aliases(k).iter().any(known) {
                return Err(Error::Usage(format!(
                    "optimizer {i}'s parameter '{name}' is not a variable of any model set up \
                     with this Fabric: a torch.save checkpoint finds optimizer state through \
                     the models' variable names, so this file could not be loaded back. Name \
                     the parameters as their VarStore does (Params::from_var_store), or save \
                     to a .safetensors path"
                )));
            }
        }
    }
    let mut top: Vec<(String, PyValue)> = Vec::new();
    for m in models {
        top.push((model_key(m).to_string(), model_entry(m, optimizers)?));
    }
    for (i, opt) in optimizers.iter().enumerate() {
        top.push((optimizer_key(i), optimizer_entry(path, i, opt)?));
    }
    if let Some(s) = scaler {
        let json: Value = serde_json::from_str(&s.to_json())?;
        top.push((SCALER_KEY.to_string(), from_json(&json, &[], "")));
    }
    let user = match state {
        Value::Object(m) => m,
        Value::Null => &serde_json::Map::new(),
        other => {
            return Err(Error::Usage(format!(
                "a torch.save checkpoint keeps the user state as entries of its top-level \
                 dict, so the state must serialise to a map (a struct or a map), not {}",
                match other {
                    Value::Array(_) => "a sequence",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "a boolean",
                }
            )))
        }
    };
    for (k, v) in user {
        if top.iter().any(|(t, _)| t == k) {
            return Err(Error::Usage(format!(
                "the user state's entry '{k}' collides with the checkpoint's own '{k}' entry \
                 (models, 'optimizer', 'optimizer_<i>', '{SCALER_KEY}'): rename it"
            )));
        }
        top.push((k.clone(), from_json(v, &[], k)));
    }
    let root = str_dict(top);
    write_atomic(
        path,
        |tmp| native::torch_save(tmp, &root),
        |written| read_value(written).map(|_| ()),
    )
}

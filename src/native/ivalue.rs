//! torch.save archives through libtorch's own zip reader/writer and pickler: the values of a
//! file as Rust sees them ([`PyValue`]), converted from and to `c10::IValue`s.
use super::call;
use crate::error::{Error, Result};
use crate::ffi::{self, iv_tag, CIValue, CTensor, IValueInfo};
use std::ffi::c_char;
use tch::Tensor;

/// A value of a `weights_only` checkpoint: what `torch.load(weights_only=True)` accepts and
/// the files of `fabric.save` hold.
#[derive(Debug)]
pub(crate) enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tensor(Tensor),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// Entries in file order (Python dicts keep insertion order, and the optimizer state's
    /// parameter indices follow the model's order).
    Dict(Vec<(PyValue, PyValue)>),
}

impl PyValue {
    /// The entries of a dict with string keys, or `None` for anything else.
    pub(crate) fn as_str_dict(&self) -> Option<Vec<(&str, &PyValue)>> {
        match self {
            PyValue::Dict(entries) => entries
                .iter()
                .map(|(k, v)| match k {
                    PyValue::Str(s) => Some((s.as_str(), v)),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// The value under `key` of a dict with string keys.
    pub(crate) fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(entries) => entries.iter().find_map(|(k, v)| match k {
                PyValue::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Python's name of the value's type, for messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Tensor(_) => "Tensor",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
        }
    }

    /// A number as f64 (Python's ints are floats where a float is expected).
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Float(v) => Some(*v),
            PyValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

/// An IValue handle the shim allocated, freed on drop.
struct Owned(CIValue);

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: a handle from the shim that nothing else frees.
        unsafe { ffi::tf_ivalue_free(self.0) }
    }
}

/// Takes a handle the shim returned through an out-parameter.
fn owned(op: &'static str, v: CIValue) -> Result<Owned> {
    if v.is_null() {
        return Err(Error::native(op, "the shim returned no value"));
    }
    Ok(Owned(v))
}

/// The deepest nesting read or written: a state_dict is 4 levels deep; a pickle nested far
/// deeper is hostile and would otherwise exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Converts a value the shim produced, with its whole tree.
fn from_ivalue(v: &Owned, depth: usize) -> Result<PyValue> {
    const OP: &str = "torch_load";
    if depth > MAX_DEPTH {
        return Err(Error::native(OP, "the pickle nests values too deeply"));
    }
    let mut info = IValueInfo::default();
    // SAFETY: live handles and strings; out-parameters are written on success only.
    call(OP, || unsafe { ffi::tf_ivalue_inspect(v.0, &mut info) })?;
    Ok(match info.tag {
        iv_tag::NONE => PyValue::None,
        iv_tag::BOOL => PyValue::Bool(info.int_value != 0),
        iv_tag::INT => PyValue::Int(info.int_value),
        iv_tag::DOUBLE => PyValue::Float(info.double_value),
        iv_tag::STRING => {
            let mut data: *const c_char = std::ptr::null();
            // SAFETY: live handles and strings; out-parameters are written on success only.
            call(OP, || unsafe { ffi::tf_ivalue_string(v.0, &mut data) })?;
            let bytes = if info.len == 0 {
                &[][..]
            } else {
                // SAFETY: the string's bytes, alive as long as `v`.
                unsafe { std::slice::from_raw_parts(data.cast::<u8>(), info.len) }
            };
            PyValue::Str(String::from_utf8_lossy(bytes).into_owned())
        }
        iv_tag::TENSOR => {
            let mut t: CTensor = std::ptr::null_mut();
            // SAFETY: live handles and strings; out-parameters are written on success only.
            call(OP, || unsafe { ffi::tf_ivalue_tensor(v.0, &mut t) })?;
            if t.is_null() {
                return Err(Error::native(OP, "the shim returned no tensor"));
            }
            // SAFETY: a fresh `at::Tensor*` nobody else owns.
            PyValue::Tensor(unsafe { Tensor::from_ptr(t) })
        }
        iv_tag::LIST | iv_tag::TUPLE => {
            let mut items = Vec::with_capacity(info.len.min(1 << 16));
            for i in 0..info.len {
                let mut item: CIValue = std::ptr::null_mut();
                // SAFETY: live handles and strings; out-parameters are written on success only.
                call(OP, || unsafe { ffi::tf_ivalue_item(v.0, i, &mut item) })?;
                items.push(from_ivalue(&owned(OP, item)?, depth + 1)?);
            }
            if info.tag == iv_tag::LIST {
                PyValue::List(items)
            } else {
                PyValue::Tuple(items)
            }
        }
        iv_tag::DICT => {
            let mut entries = Vec::with_capacity(info.len.min(1 << 16));
            for i in 0..info.len {
                let (mut k, mut item): (CIValue, CIValue) =
                    (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: live handles and strings; out-parameters are written on success only.
                call(OP, || unsafe {
                    ffi::tf_ivalue_entry(v.0, i, &mut k, &mut item)
                })?;
                let (k, item) = (owned(OP, k)?, owned(OP, item)?);
                entries.push((from_ivalue(&k, depth + 1)?, from_ivalue(&item, depth + 1)?));
            }
            PyValue::Dict(entries)
        }
        other => return Err(Error::native(OP, &format!("unknown value tag {other}"))),
    })
}

/// Builds the IValue of `v`.
fn to_ivalue(v: &PyValue, depth: usize) -> Result<Owned> {
    const OP: &str = "torch_save";
    if depth > MAX_DEPTH {
        return Err(Error::native(OP, "the state nests values too deeply"));
    }
    let (mut int, mut double, mut text, mut tensor): (i64, f64, &[u8], CTensor) =
        (0, 0.0, &[], std::ptr::null_mut());
    let mut children: Vec<Owned> = Vec::new();
    let tag = match v {
        PyValue::None => iv_tag::NONE,
        PyValue::Bool(b) => {
            int = i64::from(*b);
            iv_tag::BOOL
        }
        PyValue::Int(i) => {
            int = *i;
            iv_tag::INT
        }
        PyValue::Float(f) => {
            double = *f;
            iv_tag::DOUBLE
        }
        PyValue::Str(s) => {
            text = s.as_bytes();
            iv_tag::STRING
        }
        PyValue::Tensor(t) => {
            tensor = t.as_ptr() as CTensor;
            iv_tag::TENSOR
        }
        PyValue::List(items) | PyValue::Tuple(items) => {
            for item in items {
                children.push(to_ivalue(item, depth + 1)?);
            }
            if matches!(v, PyValue::List(_)) {
                iv_tag::LIST
            } else {
                iv_tag::TUPLE
            }
        }
        PyValue::Dict(entries) => {
            for (k, item) in entries {
                children.push(to_ivalue(k, depth + 1)?);
                children.push(to_ivalue(item, depth + 1)?);
            }
            iv_tag::DICT
        }
    };
    let handles: Vec<CIValue> = children.iter().map(|c| c.0).collect();
    let mut out: CIValue = std::ptr::null_mut();
    // SAFETY: live handles and strings; out-parameters are written on success only.
    call(OP, || unsafe {
        ffi::tf_ivalue_new(
            tag,
            int,
            double,
            text.as_ptr().cast::<c_char>(),
            text.len(),
            tensor,
            handles.as_ptr(),
            handles.len(),
            &mut out,
        )
    })?;
    owned(OP, out)
}

fn c_path(op: &'static str, path: &std::path::Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::native(op, "the path contains a NUL byte"))
}

/// A record libtorch read for a storage: its name (`data/0`), how many bytes, and their
/// CRC-32 (of the bytes as read, for the caller to check against the archive's directory).
pub(crate) struct RecordRead {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// Unpickles `pickle` (a rewritten `data.pkl`) with its tensors from the archive at `path`, and
/// the records it read. The shim refuses a storage whose record does not hold exactly the
/// bytes the pickle declares, before reading any.
pub(crate) fn torch_load(
    path: &std::path::Path,
    pickle: &[u8],
) -> Result<(PyValue, Vec<RecordRead>)> {
    const OP: &str = "torch_load";
    let p = c_path(OP, path)?;
    let mut out: CIValue = std::ptr::null_mut();
    let (mut records, mut len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
    // SAFETY: live handles and strings; out-parameters are written on success only.
    call(OP, || unsafe {
        ffi::tf_torch_load(
            p.as_ptr(),
            pickle.as_ptr().cast::<c_char>(),
            pickle.len(),
            &mut out,
            &mut records,
            &mut len,
        )
    })?;
    let pair = owned(OP, out)?;
    if records.is_null() {
        return Err(Error::native(OP, "the shim returned no record list"));
    }
    // SAFETY: `len` bytes malloc'ed by the shim, freed right after the copy.
    let listed =
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(records.cast::<u8>(), len) })
            .into_owned();
    unsafe { ffi::tf_free_buffer(records) };
    let item = |i: usize| -> Result<Owned> {
        let mut v: CIValue = std::ptr::null_mut();
        // SAFETY: live handles and strings; out-parameters are written on success only.
        call(OP, || unsafe { ffi::tf_ivalue_item(pair.0, i, &mut v) })?;
        owned(OP, v)
    };
    let value = from_ivalue(&item(0)?, 0)?;
    let PyValue::List(views) = from_ivalue(&item(1)?, 0)? else {
        return Err(Error::native(OP, "the shim returned no record bytes"));
    };
    let names: Vec<&str> = listed.lines().collect();
    if names.len() != views.len() {
        return Err(Error::native(
            OP,
            "the shim listed records it did not return",
        ));
    }
    let mut read = Vec::with_capacity(views.len());
    for (name, view) in names.into_iter().zip(&views) {
        let PyValue::Tensor(t) = view else {
            return Err(Error::native(
                OP,
                "the shim returned a record that is no tensor",
            ));
        };
        let n = t.numel();
        let crc = if n == 0 {
            crc32fast::hash(&[])
        } else {
            // SAFETY: a contiguous uint8 tensor of `n` elements over the record's storage,
            // which it keeps alive while the slice is used.
            crc32fast::hash(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) })
        };
        read.push(RecordRead {
            name: name.to_string(),
            bytes: n as u64,
            crc32: crc,
        });
    }
    Ok((value, read))
}

/// Writes `value` to `path` in torch.save's format.
pub(crate) fn torch_save(path: &std::path::Path, value: &PyValue) -> Result<()> {
    const OP: &str = "torch_save";
    let p = c_path(OP, path)?;
    let v = to_ivalue(value, 0)?;
    // SAFETY: live handles and strings; out-parameters are written on success only.
    call(OP, || unsafe { ffi::tf_torch_save(v.0, p.as_ptr()) })
}

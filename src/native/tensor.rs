//! Tensor metadata read in one shim call for a whole list (tch's accessors take one call each
//! and panic on an undefined tensor), and gradients fetched or dropped for a whole list.
use super::{call, ptrs};
use crate::dtype;
use crate::error::{Error, Result};
use crate::ffi::{self, CTensor, TensorMeta};
use tch::{Device, Kind, Tensor};

/// c10's `DeviceType` numbers the shim reports.
pub(super) const DEVICE_TYPE_CPU: i32 = 0;
pub(super) const DEVICE_TYPE_CUDA: i32 = 1;
const DEVICE_TYPE_MPS: i32 = 13;

/// c10's `DeviceType` number of a CPU or CUDA device (the two the shim takes).
pub(super) fn device_type(op: &'static str, device: Device) -> Result<i32> {
    match device {
        Device::Cpu => Ok(DEVICE_TYPE_CPU),
        Device::Cuda(_) => Ok(DEVICE_TYPE_CUDA),
        other => Err(Error::native(
            op,
            &format!("{other:?} is not a CPU or CUDA device"),
        )),
    }
}

/// What Rust needs to know about a defined tensor, read in one shim call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub device: Device,
    pub kind: Kind,
    pub sparse: bool,
    pub contiguous: bool,
    pub numel: i64,
    /// The TensorImpl: shallow copies of one tensor share it.
    pub id: usize,
    /// The address of the first element (0 without storage): tensors with the same data,
    /// shape and dtype hold the same values (a tied weight read from a file).
    pub data: usize,
}

impl Meta {
    fn from_raw(op: &'static str, m: &TensorMeta) -> Result<Option<Meta>> {
        if m.defined == 0 {
            return Ok(None);
        }
        let device = match (m.device_type, usize::try_from(m.device_index)) {
            (DEVICE_TYPE_CPU, _) => Device::Cpu,
            (DEVICE_TYPE_CUDA, Ok(i)) => Device::Cuda(i),
            (DEVICE_TYPE_MPS, _) => Device::Mps,
            (t, _) => {
                return Err(Error::native(
                    op,
                    &format!("a tensor on c10 device type {t}, which tch-fabric does not support"),
                ))
            }
        };
        let kind = dtype::from_c10(m.dtype).ok_or_else(|| {
            Error::native(op, &format!("a tensor of c10 scalar type {}", m.dtype))
        })?;
        Ok(Some(Meta {
            device,
            kind,
            sparse: m.sparse != 0,
            contiguous: m.contiguous != 0,
            numel: m.numel,
            id: m.impl_,
            data: m.data,
        }))
    }
}

/// The metadata of each tensor (`None` for an undefined one), in one call.
pub(crate) fn metas<'a>(
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> Result<Vec<Option<Meta>>> {
    let p = ptrs(tensors);
    let mut raw = vec![TensorMeta::default(); p.len()];
    // SAFETY: `p` and `raw` both hold `p.len()` entries; the shim only reads the tensors.
    call("tensor metadata", || unsafe {
        ffi::tf_tensor_meta_list(p.as_ptr(), p.len(), raw.as_mut_ptr())
    })?;
    raw.iter()
        .map(|m| Meta::from_raw("tensor metadata", m))
        .collect()
}

/// The metadata of one tensor.
pub(crate) fn meta(t: &Tensor) -> Result<Option<Meta>> {
    Ok(metas([t])?.pop().flatten())
}

/// The shape of a tensor (tch's `size` panics on an undefined one).
pub(crate) fn shape(t: &Tensor) -> Result<Vec<i64>> {
    match meta(t)? {
        Some(_) => Ok(t.size()),
        None => Err(Error::native("size", "undefined tensor")),
    }
}

/// What [`collect_grads`] returns: each parameter's gradient with its metadata (`None` where
/// it has none), and each parameter's own metadata.
pub(crate) type Collected = (Vec<Option<(Tensor, Meta)>>, Vec<Option<Meta>>);

/// The gradient of each parameter with its metadata, and the parameters' own metadata, in one
/// call.
pub(crate) fn collect_grads(params: &[Tensor]) -> Result<Collected> {
    let p = ptrs(params);
    let mut grads: Vec<CTensor> = vec![std::ptr::null_mut(); p.len()];
    let mut raw = vec![TensorMeta::default(); p.len()];
    let mut raw_params = vec![TensorMeta::default(); p.len()];
    // SAFETY: every array holds `p.len()` entries; on success each non-null `grads` entry is a
    // fresh `new at::Tensor` that is ours.
    call("grad", || unsafe {
        ffi::tf_collect_grads(
            p.as_ptr(),
            p.len(),
            grads.as_mut_ptr(),
            raw.as_mut_ptr(),
            raw_params.as_mut_ptr(),
        )
    })?;
    // Own every returned handle first, so that none leaks if a metadata entry is refused.
    let owned: Vec<Option<Tensor>> = grads
        .into_iter()
        // SAFETY: each non-null entry is a fresh `new at::Tensor` from the shim.
        .map(|g| (!g.is_null()).then(|| unsafe { Tensor::from_ptr(g) }))
        .collect();
    let grads = owned
        .into_iter()
        .zip(&raw)
        .map(|(g, m)| Ok(g.zip(Meta::from_raw("grad", m)?)))
        .collect::<Result<_>>()?;
    let params = raw_params
        .iter()
        .map(|m| Meta::from_raw("grad", m))
        .collect::<Result<_>>()?;
    Ok((grads, params))
}

/// `zero_grad(set_to_none=True)` over every parameter.
pub(crate) fn grads_set_to_none(params: &[Tensor]) -> Result<()> {
    let p = ptrs(params);
    // SAFETY: `p` holds `p.len()` live tensors.
    call("zero_grad", || unsafe {
        ffi::tf_grads_set_to_none(p.as_ptr(), p.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The c10 numbers of the dtype table are libtorch's: a tensor made by tch with each kind
    /// reads back as that kind through the shim.
    #[test]
    fn dtype_numbers_are_libtorchs() {
        for kind in [
            Kind::Uint8,
            Kind::Int8,
            Kind::Int16,
            Kind::Int,
            Kind::Int64,
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::ComplexFloat,
            Kind::ComplexDouble,
            Kind::Bool,
            Kind::BFloat16,
            Kind::Float8e5m2,
            Kind::Float8e4m3fn,
        ] {
            let t = Tensor::zeros([2], (kind, Device::Cpu));
            let m = meta(&t).unwrap().unwrap();
            assert_eq!(m.kind, kind);
            assert_eq!(dtype::c10(kind), dtype::c10(m.kind));
        }
        assert_eq!(meta(&Tensor::new()).unwrap(), None);
    }
}

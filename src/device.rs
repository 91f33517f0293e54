//! A tensor on the device a kernel needs: the caller's own when it is there already, else a
//! copy. Callers say where the tensor lives (they created it, or read it once), so moving it
//! costs no metadata query.
use crate::error::{Op, Result};
use std::ops::Deref;
use tch::{Device, Tensor};

/// The caller's tensor, or a copy of it on another device.
#[derive(Debug)]
pub(crate) enum OnDevice<'a> {
    Borrowed(&'a Tensor),
    Owned(Tensor),
}

impl Deref for OnDevice<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        match self {
            OnDevice::Borrowed(t) => t,
            OnDevice::Owned(t) => t,
        }
    }
}

impl OnDevice<'_> {
    /// An owned handle (shallow for a borrowed tensor).
    pub(crate) fn into_owned(self) -> Tensor {
        match self {
            OnDevice::Borrowed(t) => t.shallow_clone(),
            OnDevice::Owned(t) => t,
        }
    }
}

/// `t`, which lives on `at`, on `device`: borrowed when it is there already (no libtorch call),
/// else copied.
pub(crate) fn on_device(t: &Tensor, at: Device, device: Device) -> Result<OnDevice<'_>> {
    if at == device {
        Ok(OnDevice::Borrowed(t))
    } else {
        Ok(OnDevice::Owned(t.f_to_device(device).op("to")?))
    }
}

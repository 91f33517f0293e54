//! Autocast scopes (per thread, per device type) and libtorch's process-wide default dtype.
use super::call;
use super::tensor::device_type;
use crate::dtype;
use crate::error::Result;
use crate::ffi::{self, AutocastState};
use tch::{Device, Kind};

/// A thread's autocast settings for one device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawAutocast {
    pub enabled: bool,
    pub kind: Option<Kind>,
    pub cache_enabled: bool,
}

/// What leaving a scope restores (opaque outside this module).
#[derive(Debug)]
pub(crate) struct SavedAutocast(AutocastState);

/// Whether libtorch has an autocast implementation for the device's type.
pub(crate) fn autocast_available(device: Device) -> Result<bool> {
    let t = device_type("autocast_available", device)?;
    let mut out = 0;
    // SAFETY: `out` is a live i32.
    call("autocast_available", || unsafe {
        ffi::tf_autocast_available(t, &mut out)
    })?;
    Ok(out != 0)
}

/// The calling thread's autocast state for the device's type.
pub(crate) fn autocast_get(device: Device) -> Result<RawAutocast> {
    let t = device_type("autocast_get", device)?;
    let mut out = AutocastState::default();
    // SAFETY: `out` is a live struct of the shim's layout (checked by `ffi`'s layout test).
    call("autocast_get", || unsafe {
        ffi::tf_autocast_get(t, &mut out)
    })?;
    Ok(RawAutocast {
        enabled: out.enabled != 0,
        kind: dtype::from_c10(out.dtype),
        cache_enabled: out.cache_enabled != 0,
    })
}

/// Enters a scope in PyTorch's order; the returned state is what [`autocast_exit`] restores.
pub(crate) fn autocast_enter(
    device: Device,
    kind: Kind,
    enabled: bool,
    cache_enabled: bool,
) -> Result<SavedAutocast> {
    let t = device_type("autocast_enter", device)?;
    let mut saved = AutocastState::default();
    // SAFETY: `saved` is a live struct of the shim's layout.
    call("autocast_enter", || unsafe {
        ffi::tf_autocast_enter(
            t,
            dtype::c10(kind),
            i32::from(enabled),
            i32::from(cache_enabled),
            &mut saved,
        )
    })?;
    Ok(SavedAutocast(saved))
}

/// Leaves a scope entered on `device`, restoring `saved`.
pub(crate) fn autocast_exit(device: Device, saved: &SavedAutocast) -> Result<()> {
    let t = device_type("autocast_exit", device)?;
    // SAFETY: `saved.0` is a live struct the shim wrote.
    call("autocast_exit", || unsafe {
        ffi::tf_autocast_exit(t, &saved.0)
    })
}

/// libtorch's default floating dtype (`None` for a number tch does not know).
pub(crate) fn default_dtype_get() -> Result<(i32, Option<Kind>)> {
    let mut out = 0;
    // SAFETY: `out` is a live i32.
    call("default_dtype_get", || unsafe {
        ffi::tf_default_dtype_get(&mut out)
    })?;
    Ok((out, dtype::from_c10(out)))
}

/// Sets libtorch's default floating dtype (process-wide).
pub(crate) fn default_dtype_set(kind: Kind) -> Result<()> {
    let st = dtype::c10(kind);
    // SAFETY: plain integers.
    call("default_dtype_set", || unsafe {
        ffi::tf_default_dtype_set(st)
    })
}

//! Counting the ops the calling thread runs, through libtorch's `RecordFunction` observers.
use super::call;
use crate::error::Result;
use crate::ffi;
use std::ffi::c_char;

/// Starts counting on this thread (an error when it is counting already).
pub(crate) fn op_count_begin() -> Result<()> {
    // SAFETY: no arguments.
    call("op_count_begin", || unsafe { ffi::tf_op_count_begin() })
}

/// Stops counting; the report of `tf_op_count_end`: "name\tall\ttop_level\tself_ns" lines.
pub(crate) fn op_count_end() -> Result<String> {
    let mut report: *mut c_char = std::ptr::null_mut();
    // SAFETY: `report` receives a strdup'ed string on success.
    call("op_count_end", || unsafe {
        ffi::tf_op_count_end(&mut report)
    })?;
    // SAFETY: on success the shim stored a strdup'ed string that we own.
    Ok(unsafe { ffi::take_string(report) })
}

//! Loading libtorch's CUDA library, the CUDA caching allocator's statistics, and the counting
//! of CPU tensor memory.
use super::call;
use crate::error::{Error, Result};
use crate::ffi;

/// Loads libtorch_cuda (registering CUDA) if this libtorch has it; whether it is loaded.
pub(crate) fn load_cuda() -> Result<bool> {
    let mut loaded = 0;
    // SAFETY: `loaded` is a live i32.
    call("load libtorch_cuda", || unsafe {
        ffi::tf_load_cuda(&mut loaded)
    })?;
    Ok(loaded != 0)
}

fn index(op: &'static str, index: usize) -> Result<i32> {
    i32::try_from(index).map_err(|_| Error::native(op, "device index out of range"))
}

/// The CUDA caching allocator's byte counts for device `index`: allocated now, peak allocated,
/// reserved now, peak reserved.
pub(crate) fn cuda_memory_stats(device: usize) -> Result<[u64; 4]> {
    let i = index("cuda_memory_stats", device)?;
    let mut out = [0i64; 4];
    // SAFETY: `out` holds the 4 entries the shim writes.
    call("cuda_memory_stats", || unsafe {
        ffi::tf_cuda_memory_stats(i, out.as_mut_ptr())
    })?;
    // Byte counts are never negative; a negative one would be an allocator bug, shown as 0.
    Ok(out.map(|v| u64::try_from(v).unwrap_or(0)))
}

/// Resets the CUDA caching allocator's peak statistics of device `index`.
pub(crate) fn cuda_reset_peak_memory_stats(device: usize) -> Result<()> {
    let i = index("cuda_reset_peak_memory_stats", device)?;
    // SAFETY: a plain integer.
    call("cuda_reset_peak_memory_stats", || unsafe {
        ffi::tf_cuda_reset_peak_memory_stats(i)
    })
}

/// Starts counting the bytes of CPU tensors, process-wide (the CPU allocator is wrapped once).
pub(crate) fn cpu_counting_enable() -> Result<()> {
    // SAFETY: no arguments.
    call("count CPU tensor memory", || unsafe {
        ffi::tf_cpu_counting_enable()
    })
}

/// The bytes CPU tensors hold now and at the peak, `None` while not counting.
pub(crate) fn cpu_counting_stats() -> Result<Option<(u64, u64)>> {
    let mut out = [0i64; 3];
    // SAFETY: `out` holds the 3 entries the shim writes.
    call("CPU tensor memory", || unsafe {
        ffi::tf_cpu_counting_stats(out.as_mut_ptr())
    })?;
    let bytes = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok((out[0] != 0).then(|| (bytes(out[1]), bytes(out[2]))))
}

/// Starts the counted peak over from the current bytes.
pub(crate) fn cpu_counting_reset_peak() -> Result<()> {
    // SAFETY: no arguments.
    call("reset CPU tensor memory peak", || unsafe {
        ffi::tf_cpu_counting_reset_peak()
    })
}

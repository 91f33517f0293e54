//! Memory figures for the device a [`crate::Fabric`] trains on.
use crate::error::{Error, Result};
use tch::Device;

/// Where [`MemoryStats`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// The process's resident set (`VmRSS` / `VmHWM` in `/proc/self/status`): on CPU, tensors
    /// live in ordinary process memory, next to libtorch itself.
    ProcessRss,
}

/// Current and peak memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Memory in use now.
    pub current_bytes: u64,
    /// The most ever in use by this process.
    pub peak_bytes: u64,
    /// What was measured.
    pub source: MemorySource,
}

/// Memory figures for `device`.
///
/// ```
/// let m = tch_fabric::memory_stats(tch::Device::Cpu)?;
/// assert!(m.peak_bytes >= m.current_bytes);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Usage`] on CUDA (libtorch's caching-allocator statistics are not wired up yet) and
/// where `/proc/self/status` cannot be read (not Linux).
pub fn memory_stats(device: Device) -> Result<MemoryStats> {
    if device != Device::Cpu {
        return Err(Error::Usage(format!(
            "memory statistics for {device:?} are not available yet: only the CPU (process RSS) is measured"
        )));
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        path: "/proc/self/status".into(),
        source,
    })?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| Error::Usage(format!("/proc/self/status has no {name} line")))
    };
    Ok(MemoryStats {
        current_bytes: field("VmRSS:")?,
        peak_bytes: field("VmHWM:")?,
        source: MemorySource::ProcessRss,
    })
}

//! Memory figures for the device a [`crate::Fabric`] trains on: the process's resident set on
//! CPU, libtorch's caching allocator on CUDA (what `torch.cuda.memory_stats()` reads).
use crate::error::{Error, Result};
use crate::native;
use tch::Device;

/// Where [`MemoryStats`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// The process's resident set (`VmRSS` / `VmHWM` in `/proc/self/status`): on CPU, tensors
    /// live in ordinary process memory, next to libtorch itself.
    ProcessRss,
    /// libtorch's CUDA caching allocator, all memory pools together: bytes held by tensors
    /// (`allocated_bytes.all` in `torch.cuda.memory_stats()`) and bytes the allocator has
    /// taken from the driver (`reserved_bytes.all`, what `nvidia-smi` shows for the process,
    /// less the CUDA context).
    CudaCachingAllocator,
}

impl std::fmt::Display for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemorySource::ProcessRss => "process RSS",
            MemorySource::CudaCachingAllocator => "CUDA caching allocator",
        })
    }
}

/// Current and peak memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Memory in use now: the resident set on CPU, bytes held by tensors on CUDA.
    pub current_bytes: u64,
    /// The most `current_bytes` has been since the process started or the last
    /// [`reset_peak_memory_stats`].
    pub peak_bytes: u64,
    /// On CUDA, bytes the caching allocator holds from the driver (used or cached for reuse);
    /// `None` on CPU.
    pub reserved_bytes: Option<u64>,
    /// On CUDA, the most `reserved_bytes` has been; `None` on CPU.
    pub peak_reserved_bytes: Option<u64>,
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
/// [`Error::Usage`] for a CUDA device this process does not see, or for anything but the CPU
/// and CUDA; [`Error::Io`] where `/proc/self/status` cannot be read (not Linux);
/// [`Error::Native`] when libtorch's allocator refuses.
pub fn memory_stats(device: Device) -> Result<MemoryStats> {
    match device {
        Device::Cpu => process_rss(),
        Device::Cuda(index) => {
            check_cuda(index)?;
            let [allocated, peak, reserved, peak_reserved] = native::cuda_memory_stats(index)?;
            Ok(MemoryStats {
                current_bytes: allocated,
                peak_bytes: peak,
                reserved_bytes: Some(reserved),
                peak_reserved_bytes: Some(peak_reserved),
                source: MemorySource::CudaCachingAllocator,
            })
        }
        other => Err(unsupported(other)),
    }
}

/// Starts the peaks of [`memory_stats`] over from the current values: on CUDA the caching
/// allocator's (as `torch.cuda.reset_peak_memory_stats`), on CPU the process's `VmHWM`
/// (through `/proc/self/clear_refs`). Measures one phase of a run without the phases before.
///
/// ```
/// tch_fabric::reset_peak_memory_stats(tch::Device::Cpu)?;
/// let m = tch_fabric::memory_stats(tch::Device::Cpu)?;
/// assert!(m.peak_bytes >= m.current_bytes);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// As [`memory_stats`]; on CPU also where the kernel refuses the reset (not Linux, or a
/// kernel older than 4.0).
pub fn reset_peak_memory_stats(device: Device) -> Result<()> {
    match device {
        Device::Cpu => {
            // "5" resets the peak resident set size to the current one (proc(5)).
            let path = "/proc/self/clear_refs";
            std::fs::write(path, "5").map_err(|source| Error::Io {
                path: path.into(),
                source,
            })
        }
        Device::Cuda(index) => {
            check_cuda(index)?;
            native::cuda_reset_peak_memory_stats(index)
        }
        other => Err(unsupported(other)),
    }
}

fn unsupported(device: Device) -> Error {
    Error::Usage(format!(
        "memory statistics are measured for the CPU and CUDA devices, not {device:?}"
    ))
}

/// Refuses a CUDA device this process does not see, before libtorch's allocator (which would
/// say only "did you call init?") is asked.
fn check_cuda(index: usize) -> Result<()> {
    // A dependent's binary may have dropped libtorch_cuda at link time (`--as-needed`).
    native::load_cuda()?;
    let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if index >= count {
        return Err(Error::Usage(format!(
            "no CUDA device {index} for memory statistics: this process sees {count} CUDA \
             device(s)"
        )));
    }
    Ok(())
}

fn process_rss() -> Result<MemoryStats> {
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
        reserved_bytes: None,
        peak_reserved_bytes: None,
        source: MemorySource::ProcessRss,
    })
}

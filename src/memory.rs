//! Memory figures for the device a [`crate::Fabric`] trains on: the bytes libtorch's tensors
//! hold, now and at their peak, on CPU (counted by tch-fabric) as on CUDA (libtorch's caching
//! allocator, what `torch.cuda.memory_stats()` reads); the process's resident set apart; and
//! [`MemoryReport`], where those bytes go in training.
use crate::error::{Error, Result};
use crate::native;
use tch::{Device, Tensor};

/// Where [`MemoryStats`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// Bytes held by CPU tensors of the whole process (every thread), counted by tch-fabric's
    /// wrapper around libtorch's CPU allocator since counting was switched on (see
    /// [`count_cpu_tensor_memory`]): what `torch.cuda.memory_allocated` /
    /// `max_memory_allocated` are on CUDA, for the CPU.
    CpuTensors,
    /// The process's resident set (`VmRSS` / `VmHWM` in `/proc/self/status`): tensors that
    /// have been written to, next to libtorch itself, its kernels' scratch memory and
    /// everything else the process holds ([`process_rss`]).
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
            MemorySource::CpuTensors => "CPU tensor bytes",
            MemorySource::ProcessRss => "process RSS",
            MemorySource::CudaCachingAllocator => "CUDA caching allocator",
        })
    }
}

/// Current and peak memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Memory in use now: bytes held by tensors (CPU and CUDA), or the resident set
    /// ([`process_rss`]).
    pub current_bytes: u64,
    /// The most `current_bytes` has been since counting started (the process's start on CUDA
    /// and for the resident set) or the last reset ([`reset_peak_memory_stats`]).
    pub peak_bytes: u64,
    /// On CUDA, bytes the caching allocator holds from the driver (used or cached for reuse);
    /// `None` on CPU.
    pub reserved_bytes: Option<u64>,
    /// On CUDA, the most `reserved_bytes` has been; `None` on CPU.
    pub peak_reserved_bytes: Option<u64>,
    /// What was measured.
    pub source: MemorySource,
}

/// Switches on the counting of CPU tensor memory, for the whole process, from now on: the
/// process's CPU allocator (`c10::GetCPUAllocator()`) is wrapped once by one that records each
/// allocation's size in 64 bytes taken in front of it, and counts it until its deleter runs.
/// Every later CPU tensor, on any thread, counts (libtorch's own included, such as a kernel's
/// temporary outputs); tensors allocated before keep their own deleters and are never
/// counted. Calling it again does nothing.
///
/// This is a process-wide change, made only here, by [`memory_stats`] for the CPU, and by a
/// [`crate::Fabric`] on the CPU (so that its [`crate::Fabric::memory_report`] has figures). It
/// changes no tensor, dtype or result; each CPU allocation costs 64 bytes more.
///
/// ```
/// tch_fabric::memory::count_cpu_tensor_memory()?;
/// let before = tch_fabric::memory_stats(tch::Device::Cpu)?.current_bytes;
/// let t = tch::Tensor::empty([1024], (tch::Kind::Float, tch::Device::Cpu));
/// assert_eq!(tch_fabric::memory_stats(tch::Device::Cpu)?.current_bytes, before + 4096);
/// drop(t);
/// assert_eq!(tch_fabric::memory_stats(tch::Device::Cpu)?.current_bytes, before);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Native`] where libtorch's CPU allocator cannot be wrapped (one without a raw
/// deleter, or one another library set with the same priority afterwards).
pub fn count_cpu_tensor_memory() -> Result<()> {
    native::cpu_counting_enable()
}

/// Memory figures for `device`: on CPU the bytes CPU tensors hold ([`MemorySource::CpuTensors`];
/// the first call switches counting on, see [`count_cpu_tensor_memory`]), on CUDA libtorch's
/// caching allocator ([`MemorySource::CudaCachingAllocator`]). The process's resident set is
/// [`process_rss`].
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
/// and CUDA; [`Error::Native`] when libtorch's allocator refuses.
pub fn memory_stats(device: Device) -> Result<MemoryStats> {
    match device {
        Device::Cpu => cpu_tensors(),
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
/// allocator's (as `torch.cuda.reset_peak_memory_stats`), on CPU the counted tensor bytes'
/// (switching counting on if it was not). Measures one phase of a run without the phases
/// before. The resident set's peak has its own reset, [`reset_process_rss_peak`].
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
/// As [`memory_stats`].
pub fn reset_peak_memory_stats(device: Device) -> Result<()> {
    match device {
        Device::Cpu => {
            native::cpu_counting_enable()?;
            native::cpu_counting_reset_peak()
        }
        Device::Cuda(index) => {
            check_cuda(index)?;
            native::cuda_reset_peak_memory_stats(index)
        }
        other => Err(unsupported(other)),
    }
}

/// The process's resident set, now (`VmRSS`) and at its peak (`VmHWM`), as
/// [`MemorySource::ProcessRss`]: what the operating system sees, libtorch's own ~400 MiB
/// included, and tensor memory only once it has been written to.
///
/// # Errors
///
/// [`Error::Io`] where `/proc/self/status` cannot be read (not Linux); [`Error::Usage`] where
/// it has no such lines.
pub fn process_rss() -> Result<MemoryStats> {
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

/// Starts the resident set's peak (`VmHWM`) over from its current size (through
/// `/proc/self/clear_refs`).
///
/// # Errors
///
/// [`Error::Io`] where the kernel refuses the reset (not Linux, or a kernel older than 4.0).
pub fn reset_process_rss_peak() -> Result<()> {
    // "5" resets the peak resident set size to the current one (proc(5)).
    let path = "/proc/self/clear_refs";
    std::fs::write(path, "5").map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

fn cpu_tensors() -> Result<MemoryStats> {
    native::cpu_counting_enable()?;
    let (current, peak) = native::cpu_counting_stats()?.ok_or_else(|| {
        Error::Usage("CPU tensor memory is not counted although counting was switched on".into())
    })?;
    Ok(MemoryStats {
        current_bytes: current,
        peak_bytes: peak,
        reserved_bytes: None,
        peak_reserved_bytes: None,
        source: MemorySource::CpuTensors,
    })
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

/// Where a training run's tensor memory goes, in bytes ([`crate::Fabric::memory_report`]).
///
/// The lasting parts (parameters, their gradients, the optimizer's state) are summed over
/// distinct tensors (a tied weight counts once). `activations_bytes` is how far the peak rose
/// above what is held now: measured right after a step whose peak was reset before its forward
/// ([`reset_peak_memory_stats`]), it is the step's activations saved for backward plus its
/// temporaries (autocast's casted weights under a mixed precision included), the memory a
/// lower-precision forward saves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// The model's parameters and buffers.
    pub parameters_bytes: u64,
    /// Their gradients, where defined.
    pub gradients_bytes: u64,
    /// The optimizer's state (moments, momentum buffers, step counts).
    pub optimizer_state_bytes: u64,
    /// `peak_bytes - current_bytes`: the transient peak of what ran since the last reset.
    pub activations_bytes: u64,
    /// Every tensor byte on the device now (the lasting parts, data and anything else held).
    pub current_bytes: u64,
    /// The most tensor bytes on the device since the last reset.
    pub peak_bytes: u64,
    /// What `current_bytes` and `peak_bytes` measured.
    pub source: MemorySource,
}

/// The bytes `tensors` hold, each distinct tensor once (shallow copies and tied names share
/// their first element's address); undefined tensors hold none.
pub(crate) fn distinct_bytes<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<u64> {
    let tensors: Vec<&Tensor> = tensors.into_iter().collect();
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for m in native::metas(tensors.iter().copied())?
        .into_iter()
        .flatten()
    {
        let key = if m.data != 0 { m.data } else { m.id };
        if seen.insert((key, m.kind, m.numel)) {
            let bytes = u64::try_from(m.numel).unwrap_or(0) * m.kind.elt_size_in_bytes() as u64;
            total += bytes;
        }
    }
    Ok(total)
}

//! Autocast scopes on CPU and CUDA, with PyTorch's enter/exit order.
use crate::default_dtype::DefaultDtypeGuard;
use crate::error::{Error, Result};
use crate::native;
use crate::precision::Precision;
use std::marker::PhantomData;
use tch::{Device, Kind};

/// Enters an autocast scope: ops on `device` run in `kind` (float16 or bfloat16) where
/// PyTorch's autocast policy says so, until the returned guard is dropped.
///
/// This is `torch.autocast(device_type, dtype)` with `enabled=True, cache_enabled=True`; use
/// [`Autocast`] for the other options or for the closure form. Unlike `tch::autocast`, it works
/// on CPU, takes a dtype, and restores the previous state even when the scope panics.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
/// {
///     let _guard = tch_fabric::autocast(Device::Cpu, Kind::BFloat16)?;
///     assert_eq!(a.mm(&a).kind(), Kind::BFloat16);
/// }
/// assert_eq!(a.mm(&a).kind(), Kind::Float);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::UnsupportedAutocast`] for a dtype other than float16 / bfloat16, a device other
/// than CPU / CUDA, or CUDA where no such CUDA device exists.
pub fn autocast(device: Device, kind: Kind) -> Result<AutocastGuard> {
    Autocast::new(device, kind).enter()
}

/// The current thread's autocast state for a device.
///
/// ```
/// use tch::{Device, Kind};
/// let _g = tch_fabric::autocast(Device::Cpu, Kind::Half)?;
/// let s = tch_fabric::autocast::autocast_state(Device::Cpu)?;
/// assert!(s.enabled && s.dtype == Some(Kind::Half));
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::UnsupportedAutocast`] for a device other than CPU / CUDA.
pub fn autocast_state(device: Device) -> Result<AutocastState> {
    let s = native::autocast_get(check_device(device, None)?)?;
    Ok(AutocastState {
        enabled: s.enabled,
        dtype: s.kind,
        cache_enabled: s.cache_enabled,
    })
}

/// A thread's autocast settings for one device type, as [`autocast_state`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutocastState {
    /// Whether autocast is on.
    pub enabled: bool,
    /// The autocast dtype (set even while disabled; CPU defaults to bfloat16, CUDA to float16).
    pub dtype: Option<Kind>,
    /// Whether casts of weights are cached (a process-wide flag in libtorch, read per thread).
    pub cache_enabled: bool,
}

/// Options for an autocast scope, as `torch.autocast(device, dtype, enabled, cache_enabled)`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_fabric::Autocast;
/// let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
/// let k = Autocast::new(Device::Cpu, Kind::BFloat16).run(|| {
///     // An inner disabled scope, as `torch.autocast(..., enabled=False)`.
///     let inner = Autocast::new(Device::Cpu, Kind::BFloat16).enabled(false).run(|| a.mm(&a).kind())?;
///     Ok::<_, tch_fabric::Error>((a.mm(&a).kind(), inner))
/// })??;
/// assert_eq!(k, (Kind::BFloat16, Kind::Float));
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autocast {
    device: Device,
    kind: Kind,
    enabled: bool,
    cache_enabled: bool,
}

impl Autocast {
    /// A scope on `device` computing in `kind`, enabled, with the weight-cast cache on.
    pub fn new(device: Device, kind: Kind) -> Self {
        Autocast {
            device,
            kind,
            enabled: true,
            cache_enabled: true,
        }
    }

    /// Whether the scope turns autocast on (`true`) or off (`false`, e.g. for code that must
    /// run in float32 inside an autocast region).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Whether casts of float32 weights are cached inside the scope (PyTorch's default: on).
    pub fn cache_enabled(mut self, cache_enabled: bool) -> Self {
        self.cache_enabled = cache_enabled;
        self
    }

    /// Enters the scope; it lasts until the guard is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::UnsupportedAutocast`] as for [`autocast`].
    pub fn enter(self) -> Result<AutocastGuard> {
        let device = check_device(self.device, Some(self.kind))?;
        if !matches!(self.kind, Kind::Half | Kind::BFloat16) {
            return Err(unsupported(
                self.device,
                Some(self.kind),
                "autocast computes in a lower precision: use Kind::BFloat16 or Kind::Half \
                 (for float32 or float64 use a -true precision, or .enabled(false) with one of these)",
            ));
        }
        if !native::autocast_available(device)? {
            return Err(unsupported(
                self.device,
                Some(self.kind),
                "this libtorch has no autocast for the device",
            ));
        }
        let saved = native::autocast_enter(device, self.kind, self.enabled, self.cache_enabled)?;
        Ok(AutocastGuard {
            scope: Scope::Autocast { device, saved },
            _not_send: PhantomData,
        })
    }

    /// Runs `f` inside the scope; the scope ends when `f` returns or panics.
    ///
    /// # Errors
    ///
    /// [`Error::UnsupportedAutocast`] as for [`autocast`]; `f` then does not run.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> Result<T> {
        let _guard = self.enter()?;
        Ok(f())
    }
}

/// An active autocast scope. Dropping it leaves the scope: the cast cache is cleared when the
/// outermost scope of the thread ends, and the thread's previous autocast state is restored.
///
/// Bind it to a named variable (`let _guard = ...`): `let _ = ...` drops it at once. Guards
/// must be dropped in reverse order of creation, which Rust's scoping does by itself. The
/// state is per thread, so the guard cannot be sent to another thread.
///
/// As in PyTorch, the weight-cast cache itself is shared by the whole process: the end of the
/// outermost scope on any thread clears it for all threads (a cache miss, never a wrong value).
#[must_use = "the autocast scope ends when the guard is dropped; bind it with `let _guard = ...`"]
#[derive(Debug)]
pub struct AutocastGuard {
    scope: Scope,
    // Autocast state is thread-local in libtorch: leaving the scope on another thread would
    // corrupt both threads' state.
    _not_send: PhantomData<*const ()>,
}

/// What a guard undoes. [`crate::Fabric::autocast`] hands out the precision's scope, which is
/// an autocast only for mixed precisions (as Lightning's `forward_context`), and the
/// process-wide default-dtype switch only where a Fabric opted into it.
#[derive(Debug)]
enum Scope {
    Autocast {
        device: Device,
        saved: native::SavedAutocast,
    },
    DefaultDtype(#[allow(dead_code)] DefaultDtypeGuard),
    Nothing,
}

impl AutocastGuard {
    /// The precision's scope: autocast for mixed precisions, nothing otherwise. Lightning's
    /// `forward_context()` also switches the process-wide default dtype for `-true` and
    /// `64-true`; that only happens with `default_dtype_scope` (the opt-in
    /// [`crate::FabricBuilder::process_wide_default_dtype`]), since every thread of the process
    /// sees it.
    pub(crate) fn for_precision(
        precision: Precision,
        device: Device,
        default_dtype_scope: bool,
    ) -> Result<Self> {
        let scope = match (precision, precision.autocast_dtype()) {
            (_, Some(kind)) => return Autocast::new(device, kind).enter(),
            (Precision::F32True, None) => Scope::Nothing,
            (p, None) if default_dtype_scope => {
                Scope::DefaultDtype(DefaultDtypeGuard::new(p.param_dtype())?)
            }
            (_, None) => Scope::Nothing,
        };
        Ok(AutocastGuard {
            scope,
            _not_send: PhantomData,
        })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // The exit only touches thread-local flags and cannot fail for a device type that
        // entered successfully; if libtorch ever disagrees, report it rather than panic in drop.
        if let Scope::Autocast { device, saved } = &self.scope {
            if let Err(e) = native::autocast_exit(*device, saved) {
                log::error!("leaving an autocast scope failed: {e}");
            }
        }
    }
}

fn unsupported(device: Device, kind: Option<Kind>, reason: &str) -> Error {
    Error::UnsupportedAutocast {
        device: format!("{device:?}"),
        dtype: kind.map_or_else(|| "-".to_string(), |k| format!("{k:?}")),
        reason: reason.to_string(),
    }
}

/// `device` when autocast can run on it: the CPU, or a CUDA device that exists.
fn check_device(device: Device, kind: Option<Kind>) -> Result<Device> {
    match device {
        Device::Cpu => Ok(device),
        Device::Cuda(index) => {
            let count = tch::Cuda::device_count();
            if index < count as usize {
                Ok(device)
            } else if count == 0 {
                Err(unsupported(
                    device,
                    kind,
                    "no CUDA device is available (use Device::Cpu, or Device::cuda_if_available())",
                ))
            } else {
                Err(unsupported(
                    device,
                    kind,
                    &format!("CUDA device {index} does not exist ({count} available)"),
                ))
            }
        }
        _ => Err(unsupported(
            device,
            kind,
            "tch-fabric supports autocast on Device::Cpu and Device::Cuda only",
        )),
    }
}

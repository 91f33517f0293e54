//! libtorch's process-wide default floating dtype (`torch.get_default_dtype` /
//! `torch.set_default_dtype`), which tch does not bind. Lightning's `-true` and `64-true`
//! precisions switch it around the forward so that tensors created there without a dtype get
//! the precision's; a [`crate::Fabric`] does so only when asked
//! ([`crate::FabricBuilder::process_wide_default_dtype`]), because every thread of the process
//! sees the switch.
use crate::dtype;
use crate::error::{Error, Result};
use crate::native;
use tch::Kind;

/// The dtype factory functions use for floating tensors when none is given.
///
/// # Errors
///
/// [`Error::Native`] if libtorch reports a dtype tch does not know.
pub fn default_dtype() -> Result<Kind> {
    let (st, kind) = native::default_dtype_get()?;
    kind.filter(|k| dtype::is_float(*k))
        .ok_or_else(|| Error::Native {
            op: "default_dtype_get",
            message: format!("unexpected default scalar type {st}"),
        })
}

/// Sets the default floating dtype for the whole process (all threads), as
/// `torch.set_default_dtype`. Prefer [`DefaultDtypeGuard`], which restores it.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a non-floating kind.
pub fn set_default_dtype(kind: Kind) -> Result<()> {
    if !dtype::is_float(kind) {
        return Err(Error::InvalidConfig {
            field: "default dtype",
            value: format!("{kind:?}"),
            allowed: "one of Half, BFloat16, Float, Double",
        });
    }
    native::default_dtype_set(kind)
}

/// Switches the process-wide default floating dtype until dropped, then restores the previous
/// one.
///
/// The default dtype is global to the process in libtorch: every other thread sees the switch
/// while the guard lives, and two threads switching it at once see each other's values, exactly
/// as in PyTorch.
///
/// ```
/// use tch::{Kind, Tensor};
/// use tch_fabric::default_dtype::DefaultDtypeGuard;
/// {
///     let _guard = DefaultDtypeGuard::new(Kind::Double)?;
///     assert_eq!(Tensor::zeros([1], (tch_fabric::default_dtype::default_dtype()?, tch::Device::Cpu)).kind(), Kind::Double);
/// }
/// assert_eq!(tch_fabric::default_dtype::default_dtype()?, Kind::Float);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[must_use = "the default dtype is restored when the guard is dropped; bind it with `let _guard = ...`"]
#[derive(Debug)]
pub struct DefaultDtypeGuard {
    previous: Kind,
}

impl DefaultDtypeGuard {
    /// Sets `kind` as the default dtype and remembers the current one.
    ///
    /// # Errors
    ///
    /// As [`set_default_dtype`]; nothing is changed then.
    pub fn new(kind: Kind) -> Result<Self> {
        let previous = default_dtype()?;
        set_default_dtype(kind)?;
        Ok(DefaultDtypeGuard { previous })
    }
}

impl Drop for DefaultDtypeGuard {
    fn drop(&mut self) {
        if let Err(e) = set_default_dtype(self.previous) {
            log::error!("restoring the default dtype failed: {e}");
        }
    }
}

//! Counting the native (dispatcher) calls a piece of code makes: what an AMP step costs in
//! libtorch ops, independent of the machine's speed.
use crate::error::{Error, Result};
use crate::native;
use std::collections::BTreeMap;

/// How often each libtorch op (ATen or `tch_fabric::`) was called, as seen by libtorch's
/// `RecordFunction` observers on the calling thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Per op name: (every call, top-level calls). A top-level call is one made from outside
    /// any other op, i.e. a call the measured code itself asked libtorch for.
    pub by_name: BTreeMap<String, (u64, u64)>,
}

impl OpCounts {
    /// Every op call, nested ones included.
    pub fn total(&self) -> u64 {
        self.by_name.values().map(|(all, _)| all).sum()
    }

    /// The calls made from outside any other op.
    pub fn top_level(&self) -> u64 {
        self.by_name.values().map(|(_, top)| top).sum()
    }
}

/// Runs `f` and counts the libtorch ops it called on this thread (not on other threads; no
/// process-wide state is touched).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let a = Tensor::ones([4], (Kind::Float, Device::Cpu));
/// let (_, counts) = tch_fabric::count_ops(|| &a + &a)?;
/// assert_eq!(counts.by_name["aten::add"].1, 1);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Usage`] when counting is already on for this thread (nested `count_ops`).
pub fn count_ops<T>(f: impl FnOnce() -> T) -> Result<(T, OpCounts)> {
    native::op_count_begin().map_err(|e| match e {
        Error::Native { message, .. } => Error::Usage(message),
        other => other,
    })?;
    let counting = Counting;
    let out = f();
    std::mem::forget(counting);
    let report = native::op_count_end()?;
    let mut counts = OpCounts::default();
    for line in report.lines() {
        let mut parts = line.rsplitn(3, '\t');
        let (Some(top), Some(all), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(all), Ok(top)) = (all.parse(), top.parse()) else {
            continue;
        };
        counts.by_name.insert(name.to_string(), (all, top));
    }
    Ok((out, counts))
}

/// Ends the counting if `f` panics, so that the thread can count again.
struct Counting;

impl Drop for Counting {
    fn drop(&mut self) {
        let _ = native::op_count_end();
    }
}

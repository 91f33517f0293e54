//! Counting the native (dispatcher) calls a piece of code makes, and the time spent in each:
//! what an AMP step costs in libtorch ops (the counts are independent of the machine's speed).
use crate::error::{Error, Result};
use crate::native;
use std::collections::BTreeMap;
use std::time::Duration;

/// How often each libtorch op (ATen or `tch_fabric::`) was called, as seen by libtorch's
/// `RecordFunction` observers on the calling thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Per op name: (every call, top-level calls). A top-level call is one made from outside
    /// any other op, i.e. a call the measured code itself asked libtorch for.
    pub by_name: BTreeMap<String, (u64, u64)>,
    /// Per op name: the time spent in the op itself, less the ops it called (a profiler's
    /// "self CPU" time; summed over every call). The sum over all ops is the time spent in
    /// libtorch ops, each nanosecond counted once.
    pub self_time: BTreeMap<String, Duration>,
    /// Calls from Rust into tch-fabric's C++ shim on this thread (each one crosses the FFI
    /// boundary and takes a list of tensors at once; tch's own calls are not counted).
    pub shim_calls: u64,
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

    /// The time spent in libtorch ops, over all of them (the sum of [`Self::self_time`]).
    pub fn op_time(&self) -> Duration {
        self.self_time.values().sum()
    }
}

/// Runs `f` and counts the libtorch ops it called on this thread, with their self times (not
/// on other threads; no process-wide state is touched).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let a = Tensor::ones([4], (Kind::Float, Device::Cpu));
/// let (_, counts) = tch_fabric::profile::count_ops(|| &a + &a)?;
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
    let calls_before = native::calls();
    let out = f();
    let shim_calls = native::calls() - calls_before;
    std::mem::forget(counting);
    let report = native::op_count_end()?;
    let mut counts = OpCounts {
        shim_calls,
        ..OpCounts::default()
    };
    for line in report.lines() {
        // Op names may hold tabs in principle, never the three numbers after them.
        let mut parts = line.rsplitn(4, '\t');
        let (Some(ns), Some(top), Some(all), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(all), Ok(top), Ok(ns)) = (all.parse(), top.parse(), ns.parse::<i64>()) else {
            continue;
        };
        counts.by_name.insert(name.to_string(), (all, top));
        // A clock step backwards could make a difference negative: shown as zero.
        let ns = u64::try_from(ns).unwrap_or(0);
        counts
            .self_time
            .insert(name.to_string(), Duration::from_nanos(ns));
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

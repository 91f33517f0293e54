//! Ranks agreeing before they average: the same parameters at setup, and the same point of
//! the training loop before every synchronised backward. Without these checks, ranks with
//! different models average mismatched layouts (or abort inside Gloo), and a rank that skips
//! or repeats a backward pairs its gradients with another step's, silently.

use super::ProcessGroup;
use crate::error::{Error, Op, Result};
use tch::{Device, Kind, Tensor};

/// The longest text one agreement broadcast carries (a parameter list of ~10^7 entries).
const MAX_TEXT: i64 = 1 << 30;

/// All-reduces `values` with MAX, and their negations: every rank gets each value's largest
/// and smallest over the ranks. One collective, outside [`ProcessGroup::all_reduce_calls`].
fn range(group: &ProcessGroup, values: &[i64], device: Device) -> Result<Vec<(i64, i64)>> {
    let both: Vec<i64> = values
        .iter()
        .copied()
        .chain(values.iter().map(|v| -v))
        .collect();
    let t = Tensor::from_slice(&both).f_to(device).op("to")?;
    group.agreement_max(&t)?;
    let got: Vec<i64> = Vec::try_from(&t.f_to(Device::Cpu).op("to")?).op("to_vec")?;
    let n = values.len();
    Ok((0..n).map(|i| (-got[n + i], got[i])).collect())
}

/// Rank `root`'s `text` on every rank.
fn broadcast_text(group: &ProcessGroup, text: &str, root: usize, device: Device) -> Result<String> {
    let len = Tensor::from_slice(&[text.len() as i64])
        .f_to(device)
        .op("to")?;
    group.broadcast(&len, root)?;
    let n = len.f_int64_value(&[0]).op("item")?;
    if !(0..=MAX_TEXT).contains(&n) {
        return Err(Error::Distributed(format!(
            "rank {root} announced {n} bytes of parameter names"
        )));
    }
    if n == 0 {
        return Ok(String::new());
    }
    let buf = if group.rank() == root {
        Tensor::from_slice(text.as_bytes()).f_to(device).op("to")?
    } else {
        Tensor::f_zeros([n], (Kind::Uint8, device)).op("zeros")?
    };
    group.broadcast(&buf, root)?;
    let bytes: Vec<u8> = Vec::try_from(&buf.f_to(Device::Cpu).op("to")?).op("to_vec")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Checks that every rank set up the same parameters (names, shapes and dtypes, in order):
/// one small all-reduce when they agree; when they do not, a typed error on every rank naming
/// the first parameter that differs and a rank it differs on.
///
/// # Errors
///
/// [`Error::Distributed`] on a mismatch; the collectives' errors.
pub(crate) fn same_parameters(
    group: &ProcessGroup,
    params: &[(String, Tensor)],
    device: Device,
) -> Result<()> {
    if group.world_size() < 2 {
        return Ok(());
    }
    let lines: Vec<String> = params
        .iter()
        .map(|(name, t)| format!("'{name}' {:?} {:?}", t.size(), t.kind()))
        .collect();
    let text = lines.join("\n");
    let digest = [
        i64::from(crc32fast::hash(text.as_bytes())),
        text.len() as i64,
    ];
    if range(group, &digest, device)?
        .iter()
        .all(|(lo, hi)| lo == hi)
    {
        return Ok(());
    }
    // Name it: rank 0's list to every rank, then the lowest (parameter, rank) that differs
    // from it, then that rank's entry.
    let zero = broadcast_text(group, &text, 0, device)?;
    let zero: Vec<&str> = zero.lines().collect();
    let world = group.world_size() as i64;
    let first = (0..lines.len().max(zero.len()))
        .find(|&k| lines.get(k).map(String::as_str) != zero.get(k).copied())
        .map_or(i64::MAX, |k| k as i64 * world + group.rank() as i64);
    // MAX of the negation is the MIN.
    let lowest = range(group, &[first], device)?[0].0;
    if lowest == i64::MAX {
        return Err(Error::Distributed(
            "the ranks set up different models (their parameter lists differ)".into(),
        ));
    }
    let (k, r) = ((lowest / world) as usize, (lowest % world) as usize);
    let entry = |l: Option<&str>| l.unwrap_or("nothing (the list ends)").to_string();
    let theirs = broadcast_text(group, &entry(lines.get(k).map(String::as_str)), r, device)?;
    Err(Error::Distributed(format!(
        "the ranks set up different models: parameter {k} is {theirs} on rank {r} but {} on \
         rank 0; every rank must build the same model (names, shapes and dtypes)",
        entry(zero.get(k).copied())
    )))
}

/// Where a rank is in the training loop when it enters a backward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopPoint {
    /// Optimizer steps taken so far.
    pub steps: u64,
    /// Backward calls so far.
    pub backwards: u64,
    /// Per model (bit i: model i), whether this backward averages its gradients (not under
    /// `no_backward_sync`).
    pub synced: u64,
}

/// Checks, before a backward averages gradients, that every rank is at the same point of the
/// loop: the same number of optimizer steps and backwards, and the same models synchronised.
/// A rank that skipped or repeated a backward, or paused synchronisation alone, would
/// otherwise pair its buckets with another step's. One all-reduce of 48 bytes.
///
/// # Errors
///
/// [`Error::Distributed`] naming what differs and its range over the ranks, on every rank,
/// before any gradient is exchanged.
pub(crate) fn same_loop_point(group: &ProcessGroup, here: LoopPoint, device: Device) -> Result<()> {
    if group.world_size() < 2 {
        return Ok(());
    }
    let values = [here.steps as i64, here.backwards as i64, here.synced as i64];
    let r = range(group, &values, device)?;
    let what = [
        "optimizer steps",
        "backward calls",
        "synchronised models (bit mask)",
    ];
    let differ: Vec<String> = r
        .iter()
        .zip(what)
        .filter(|((lo, hi), _)| lo != hi)
        .map(|((lo, hi), w)| format!("{w} from {lo} to {hi}"))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::Distributed(format!(
        "the ranks are at different points of the training loop before a backward ({}; this \
         rank: {} steps, {} backwards): every rank must run the same backwards and steps, and \
         no_backward_sync on all or none; no gradient was exchanged",
        differ.join(", "),
        here.steps,
        here.backwards
    )))
}

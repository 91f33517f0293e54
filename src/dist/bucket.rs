//! Packing many tensors into a few collectives: grouped by (dtype, device), concatenated into
//! flat buffers of at most [`BUCKET_BYTES`], and copied back after the collective.
use crate::error::{Op, Result};
use crate::native;
use crate::params::group_by;
use tch::Tensor;

/// The size of one coalesced bucket (PyTorch DDP's default `bucket_cap_mb`).
pub(super) const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Packs `tensors` into buckets (same dtype and device, at most [`BUCKET_BYTES`] unless one
/// tensor alone is larger), runs `f` on each flat buffer and copies the result back.
pub(super) fn for_each_bucket(
    tensors: &[Tensor],
    mut f: impl FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    let metas = native::metas(tensors)?;
    let groups = group_by(metas.iter().map(|m| m.map(|m| (m.kind, m.device))));
    tch::no_grad(|| {
        for ((kind, _), group) in groups {
            let mut bucket: Vec<&Tensor> = Vec::new();
            let mut bytes = 0usize;
            for i in group {
                let numel = metas[i].map_or(0, |m| usize::try_from(m.numel).unwrap_or(0));
                let size = numel * kind.elt_size_in_bytes();
                if !bucket.is_empty() && bytes + size > BUCKET_BYTES {
                    run_bucket(&bucket, &mut f)?;
                    bucket.clear();
                    bytes = 0;
                }
                bucket.push(&tensors[i]);
                bytes += size;
            }
            if !bucket.is_empty() {
                run_bucket(&bucket, &mut f)?;
            }
        }
        Ok(())
    })
}

fn run_bucket(bucket: &[&Tensor], f: &mut impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    let views: Vec<Tensor> = bucket
        .iter()
        .map(|t| t.f_reshape([-1]))
        .collect::<Result<_, _>>()
        .op("reshape")?;
    let flat = Tensor::f_cat(&views, 0).op("cat")?;
    f(&flat)?;
    let mut offset = 0i64;
    for (t, v) in bucket.iter().zip(&views) {
        let n = native::shape(v)?.first().copied().unwrap_or(0);
        let part = flat
            .f_narrow(0, offset, n)
            .and_then(|p| p.f_view_as(t))
            .op("narrow")?;
        t.shallow_clone().f_copy_(&part).op("copy_")?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn buckets_group_by_dtype_and_cap_their_size() {
        use tch::Kind;
        let small = |k: Kind| Tensor::ones([4], (k, tch::Device::Cpu));
        let big = Tensor::zeros([BUCKET_BYTES as i64 / 4], (Kind::Float, tch::Device::Cpu));
        let tensors = vec![
            small(Kind::Float),
            small(Kind::Double),
            small(Kind::Float),
            big,
            small(Kind::Float),
        ];
        let mut sizes = Vec::new();
        for_each_bucket(&tensors, |flat| {
            sizes.push((flat.kind(), flat.numel()));
            let _ = flat.shallow_clone().f_add_scalar_(1.0).op("add_")?;
            Ok(())
        })
        .unwrap();
        // float32: the two small ones, then the 25 MB one alone, then the last small one.
        let cap = BUCKET_BYTES / 4;
        assert_eq!(
            sizes,
            vec![
                (Kind::Float, 8),
                (Kind::Float, cap),
                (Kind::Float, 4),
                (Kind::Double, 4)
            ]
        );
        // Results are copied back into every tensor.
        assert_eq!(tensors[1].double_value(&[0]), 2.0);
        assert_eq!(tensors[3].double_value(&[7]), 1.0);
    }
}

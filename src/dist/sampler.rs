//! [`DistributedSampler`]: a dataset's indices split across ranks.
use crate::error::{Error, Result};

/// Splits a dataset's indices across ranks as `torch.utils.data.DistributedSampler`: each rank
/// gets `ceil(len / world_size)` indices (`floor` with `drop_last`), taken with stride
/// `world_size` from one permutation that every rank computes alike, padded by repeating the
/// first indices so the ranks stay in step.
///
/// ```
/// use tch_fabric::dist::DistributedSampler;
/// let rank0 = DistributedSampler::new(10, 4, 0)?.shuffle(false).indices();
/// let rank3 = DistributedSampler::new(10, 4, 3)?.shuffle(false).indices();
/// assert_eq!(rank0, vec![0, 4, 8]);
/// assert_eq!(rank3, vec![3, 7, 1]); // padded with the first indices
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// The shuffle is a seeded Fisher-Yates (SplitMix64), identical on every rank and machine but
/// not PyTorch's `randperm` sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    world_size: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    drop_last: bool,
}

impl DistributedSampler {
    /// A sampler over `len` items for `rank` of `world_size` (shuffled, seed 0, epoch 0).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a zero world size or a rank outside it.
    pub fn new(len: usize, world_size: usize, rank: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidConfig {
                field: "rank",
                value: format!("{rank} of {world_size}"),
                allowed: "0 <= rank < world_size",
            });
        }
        Ok(DistributedSampler {
            len,
            world_size,
            rank,
            shuffle: true,
            seed: 0,
            epoch: 0,
            drop_last: false,
        })
    }

    /// Whether to permute the indices (default true).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The seed of the permutation, the same on every rank (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drop the tail instead of padding (default false).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets the epoch, so that each epoch has its own permutation (`sampler.set_epoch`).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The number of indices each rank gets.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.len / self.world_size
        } else {
            self.len.div_ceil(self.world_size)
        }
    }

    /// This rank's indices for the current epoch.
    pub fn indices(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut state = self
                .seed
                .wrapping_add(self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..all.len()).rev() {
                let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
                all.swap(i, j);
            }
        }
        let total = self.num_samples() * self.world_size;
        if total <= all.len() {
            all.truncate(total);
        } else if !all.is_empty() {
            let mut k = 0;
            while all.len() < total {
                all.push(all[k]);
                k += 1;
            }
        }
        all.into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .collect()
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_covers_every_index_once_across_ranks() {
        for (len, world) in [(10, 3), (12, 4), (7, 2), (1, 3)] {
            let mut seen: Vec<usize> = (0..world)
                .flat_map(|r| {
                    DistributedSampler::new(len, world, r)
                        .unwrap()
                        .seed(5)
                        .indices()
                })
                .collect();
            assert_eq!(seen.len(), len.div_ceil(world) * world);
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..len).collect::<Vec<_>>());
        }
        let s = DistributedSampler::new(10, 3, 1).unwrap().drop_last(true);
        assert_eq!(s.indices().len(), 3);
        let mut a = DistributedSampler::new(100, 2, 0).unwrap();
        let first = a.indices();
        a.set_epoch(1);
        assert_ne!(first, a.indices());
        assert!(DistributedSampler::new(5, 2, 2).is_err());
    }
}

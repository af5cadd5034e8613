//! The durations of one scope's blocks: a fixed-size log-bucketed histogram, from which the
//! quantiles of reports come. Its buckets are part of the state file's format (`state`).

/// Durations in microseconds, `1 << SUB_BITS` buckets per power of two, so a bucket is at most
/// 1/8 as wide as its lower edge. Durations of `1 << TOP_BIT` us (51 days) and over share the
/// last bucket.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const TOP_BIT: u32 = 42;
pub const BUCKETS: usize = ((TOP_BIT - SUB_BITS + 1) << SUB_BITS) as usize;

/// The bucket of a duration of `us` microseconds: below `SUB` one per microsecond, then
/// `SUB` per power of two.
pub fn bucket(us: u64) -> usize {
    let us = us.min((1 << TOP_BIT) - 1);
    if us < SUB {
        return us as usize;
    }
    let shift = 63 - us.leading_zeros() - SUB_BITS;
    ((u64::from(shift + 1) << SUB_BITS) + ((us >> shift) & (SUB - 1))) as usize
}

/// The first duration (us) past bucket `index`.
fn bucket_end(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index + 1;
    }
    let shift = (index >> SUB_BITS) - 1;
    ((SUB + (index & (SUB - 1))) << shift) + (1 << shift)
}

/// Counts per bucket of [`bucket`].
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram(Box<[u32; BUCKETS]>);

impl Histogram {
    pub fn new() -> Self {
        Self(Box::new([0; BUCKETS]))
    }

    /// Adds `count` to bucket `index` (below [`BUCKETS`]).
    pub fn add(&mut self, index: usize, count: u32) {
        if self.0[index].checked_add(count).is_none() {
            // Halving every bucket keeps the shape, and so the quantiles.
            self.0.iter_mut().for_each(|c| *c /= 2);
        }
        self.0[index] = self.0[index].saturating_add(count);
    }

    /// `(bucket, count)` of the non-empty buckets.
    pub fn non_empty(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0)
            .map(|(index, &count)| (index, count))
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|&c| u64::from(c)).sum()
    }

    /// The end (us) of the bucket that holds the `q` quantile; None when empty.
    pub fn quantile_end(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        self.0
            .iter()
            .position(|&c| {
                seen += u64::from(c);
                seen >= rank
            })
            .map(bucket_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_at_most_an_eighth_wide() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket_end(BUCKETS - 1), 1 << TOP_BIT);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let mut start = 0;
        for index in 0..BUCKETS {
            let end = bucket_end(index);
            assert_eq!(bucket(start), index);
            assert_eq!(bucket(end - 1), index);
            assert!(end - start == 1 || (end - start) * SUB <= start, "bucket {index}");
            start = end;
        }
    }

    #[test]
    fn a_full_bucket_halves_the_histogram() {
        let mut histogram = Histogram::new();
        histogram.add(3, u32::MAX);
        histogram.add(5, 10);
        histogram.add(3, 1);
        assert_eq!((histogram.0[3], histogram.0[5]), (u32::MAX / 2 + 1, 5));
    }
}

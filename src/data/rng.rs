//! A tiny deterministic random number generator for data generation and shuffling.
//!
//! The synthetic world must come out byte-identical from the same seed on any machine and with any
//! future version of the `rand` crate (whose `StdRng` is explicitly not value-stable across
//! releases), and a loader's shuffle order must be reproducible from its small saved state. So the
//! data side uses its own SplitMix64 (Steele, Lea & Flood 2014): a few lines, fully specified,
//! good enough statistically for sampling scenes and permutations.

/// SplitMix64: a 64-bit state advanced by a constant, output through a mixing function.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a bijective mixing of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derive an independent seed from a parent seed and a list of labels (split, sample index,
/// epoch, ...), so that each part of a generation can be redone on its own.
pub fn derive_seed(seed: u64, labels: &[u64]) -> u64 {
    labels.iter().fold(mix64(seed), |acc, &l| {
        mix64(acc ^ mix64(l.wrapping_add(GOLDEN_GAMMA)))
    })
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform in `0..n` (`n > 0`), by rejection so that no value is favoured.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Uniform index into a collection of length `n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in the inclusive range `lo..=hi` (`lo <= hi`).
    pub fn range_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }

    /// Pick one element of a non-empty slice.
    pub fn choose<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
}

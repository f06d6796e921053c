//! Fixed, log-spaced histograms of magnitudes: what TensorBoard's "distributions" view shows, in
//! a form that merges and compares across steps, layers and runs.
//!
//! Bin `k` (0-based) holds the values with `2^(k - 40) <= |x| < 2^(k - 39)`: [`BINS`] = 54 bins
//! of a factor of two from `2^-40` (9.1e-13) to `2^14` (16384), which covers the range 1e-12 to
//! 1e4 where gradients and update ratios live. Finite values below the range count in the first
//! bin and above it in the last; exact zeros, NaN and infinities are counted apart. A value's bin
//! is its binary exponent, read from its bits: no logarithm per element.

use serde::{Deserialize, Serialize};

/// Number of bins.
pub const BINS: usize = 54;
/// Binary exponent of the first bin's lower edge.
pub const FIRST_EXPONENT: i32 = -40;

/// Counts of `|x|` in [`BINS`] factor-of-two bins, plus zeros, NaN and infinities.
///
/// Serialised compactly: `lo` is the first non-empty bin and `counts` run from it to the last
/// non-empty one.
///
/// ```
/// use gradkit::diagnostics::Histogram;
/// let mut h = Histogram::default();
/// for v in [0.0, 1.0, 1.5, -3.0, f64::NAN, 1e-30] {
///     h.add(v);
/// }
/// assert_eq!((h.zero, h.nan, h.inf), (1, 1, 0));
/// assert_eq!(h.count(Histogram::bin_of(1.2)), 2); // 1.0 and 1.5 share [1, 2)
/// assert_eq!(h.count(0), 1); // 1e-30 is below the range: the first bin
/// assert_eq!(h.total(), 6);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "Compact", into = "Compact")]
pub struct Histogram {
    /// Per bin, the number of values.
    pub bins: Vec<u64>,
    /// Exact zeros.
    pub zero: u64,
    /// NaN values.
    pub nan: u64,
    /// Infinite values.
    pub inf: u64,
}

impl Histogram {
    /// The bin of a finite, non-zero `v` (by magnitude, clamped into the range).
    #[inline(always)]
    pub fn bin_of(v: f64) -> usize {
        let exponent = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        (exponent - FIRST_EXPONENT).clamp(0, BINS as i32 - 1) as usize
    }

    /// The lower edge of bin `k`, `2^(k - 40)`.
    pub fn lower_edge(k: usize) -> f64 {
        2f64.powi(FIRST_EXPONENT + k as i32)
    }

    /// Counts one value.
    pub fn add(&mut self, v: f64) {
        if v.is_nan() {
            self.nan += 1;
        } else if v.is_infinite() {
            self.inf += 1;
        } else if v == 0.0 {
            self.zero += 1;
        } else {
            if self.bins.len() < BINS {
                self.bins.resize(BINS, 0);
            }
            self.bins[Self::bin_of(v)] += 1;
        }
    }

    /// The count of bin `k` (0 past the stored bins).
    pub fn count(&self, k: usize) -> u64 {
        self.bins.get(k).copied().unwrap_or(0)
    }

    /// Every value counted: the bins, zeros, NaN and infinities.
    pub fn total(&self) -> u64 {
        self.bins.iter().sum::<u64>() + self.zero + self.nan + self.inf
    }

    /// Adds `other`'s counts to this one's.
    pub fn merge(&mut self, other: &Self) {
        if self.bins.len() < other.bins.len() {
            self.bins.resize(other.bins.len(), 0);
        }
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
        self.zero += other.zero;
        self.nan += other.nan;
        self.inf += other.inf;
    }

    /// A histogram from dense per-bin counts (at most [`BINS`]) and the special counts.
    pub(crate) fn from_counts(bins: &[u64], zero: u64, nan: u64, inf: u64) -> Self {
        let mut bins = bins.to_vec();
        bins.truncate(BINS);
        if bins.iter().all(|&b| b == 0) {
            bins.clear();
        }
        Self {
            bins,
            zero,
            nan,
            inf,
        }
    }
}

/// The serialised form: non-empty bin range only.
#[derive(Serialize, Deserialize)]
struct Compact {
    #[serde(default)]
    lo: usize,
    #[serde(default)]
    counts: Vec<u64>,
    #[serde(default)]
    zero: u64,
    #[serde(default)]
    nan: u64,
    #[serde(default)]
    inf: u64,
}

impl From<Histogram> for Compact {
    fn from(h: Histogram) -> Self {
        let lo = h.bins.iter().position(|&c| c > 0).unwrap_or(0);
        let hi = h.bins.iter().rposition(|&c| c > 0).map_or(lo, |i| i + 1);
        Self {
            lo,
            counts: h.bins.get(lo..hi).map(<[u64]>::to_vec).unwrap_or_default(),
            zero: h.zero,
            nan: h.nan,
            inf: h.inf,
        }
    }
}

impl From<Compact> for Histogram {
    fn from(c: Compact) -> Self {
        let mut bins = vec![0; BINS];
        for (k, v) in c.counts.into_iter().enumerate() {
            if let Some(slot) = bins.get_mut(c.lo + k) {
                *slot = v;
            }
        }
        if bins.iter().all(|&b| b == 0) {
            bins.clear();
        }
        Self {
            bins,
            zero: c.zero,
            nan: c.nan,
            inf: c.inf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_the_binary_exponent_exactly() {
        for k in 0..BINS {
            let lo = Histogram::lower_edge(k);
            assert_eq!(Histogram::bin_of(lo), k);
            assert_eq!(Histogram::bin_of(-lo * 1.999_999), k);
            if k > 0 {
                assert_eq!(Histogram::bin_of(lo * 0.999_999_9), k - 1);
            }
        }
        assert_eq!(Histogram::bin_of(5e-324), 0);
        assert_eq!(Histogram::bin_of(1e300), BINS - 1);
    }

    #[test]
    fn compact_form_round_trips() {
        let mut h = Histogram::default();
        for v in [1e-3, 2e-3, 5e2, 0.0, f64::INFINITY] {
            h.add(v);
        }
        let json = serde_json::to_string(&h).unwrap_or_default();
        assert!(json.starts_with(r#"{"lo":"#), "{json}");
        let back: Histogram = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, h);
        let empty: Histogram = serde_json::from_str("{}").unwrap_or_default();
        assert_eq!(empty, Histogram::default());
    }
}

//! Count, mean and sum of squared deviations, merged exactly across blocks of data: the one
//! moment arithmetic every gradkit statistic (batch and row norms, the monitor's) is built on.

/// The running `(count, mean, M2)` of some values, `M2` being the sum of squared deviations
/// from the mean (so the biased variance is `m2 / count`).
///
/// ```
/// use gradkit::core::cpu::Moments;
/// // [1, 2] and [3, 4, 5], merged: the moments of [1, 2, 3, 4, 5].
/// let mut m = Moments::from_shifted(1.0, 1.0, 1.0, 2.0);
/// m.merge(Moments::from_shifted(3.0, 3.0, 5.0, 3.0));
/// assert_eq!((m.count, m.mean, m.m2), (5.0, 3.0, 10.0));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    /// How many values.
    pub count: f64,
    /// Their mean.
    pub mean: f64,
    /// Their sum of squared deviations from the mean.
    pub m2: f64,
}

impl Moments {
    /// The moments of `count` values from the sums of their deviations from a first guess
    /// `shift` of the mean: `dev = sum (x - shift)`, `sq = sum (x - shift)^2`. Shifting by a value
    /// near the mean (a block's first element) keeps the one-pass sums accurate.
    #[inline(always)]
    pub fn from_shifted(shift: f64, dev: f64, sq: f64, count: f64) -> Self {
        Self {
            count,
            mean: shift + dev / count,
            m2: (sq - dev * dev / count).max(0.0),
        }
    }

    /// Adds the values `other` summarises (Chan, Golub & LeVeque's pairwise update); merging
    /// empty moments changes nothing.
    #[inline]
    pub fn merge(&mut self, other: Self) {
        if other.count == 0.0 {
            return;
        }
        let total = self.count + other.count;
        let delta = other.mean - self.mean;
        self.mean += delta * other.count / total;
        self.m2 += other.m2 + delta * delta * self.count * other.count / total;
        self.count = total;
    }
}

//! Fused statistics kernels: one read of a tensor gives its sum of squares, mean, standard
//! deviation, largest magnitude, zero count and NaN/Inf counts.
//!
//! Work is cut into `grad_core::cpu::CHUNK`-element ranges; each range takes its mean and the
//! squared deviations about it while in cache (two passes over cached data), and ranges merge in
//! order with Chan et al.'s update — stable, and independent of the thread count.
//!
//! The composed path (other devices) computes the same statistics with candle reductions on the
//! tensors' device and reads them back as one small tensor per observation.

use candle_core::{DType, Tensor};
use grad_core::cpu::sum_by;
use grad_core::cpu::{ChunkFn, map_chunks, storage_slice};
use grad_core::cpu::{Float, FloatFn, Real, dispatch};
use grad_core::device::{Path, read_back, scalar, wide_dtype};

use crate::Result;
use crate::histogram::{BINS, FIRST_EXPONENT, Histogram};

/// Moments of a tensor's elements.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    /// Sum of squares (for the L2 norm).
    pub sum_sq: f64,
    pub max_abs: f64,
    pub zeros: u64,
    pub nan: u64,
    pub inf: u64,
}

impl Moments {
    pub fn merge(self, o: Self) -> Self {
        if o.count == 0.0 {
            return self;
        }
        let mut m = grad_core::cpu::Moments {
            count: self.count,
            mean: self.mean,
            m2: self.m2,
        };
        m.merge(grad_core::cpu::Moments {
            count: o.count,
            mean: o.mean,
            m2: o.m2,
        });
        Self {
            count: m.count,
            mean: m.mean,
            m2: m.m2,
            sum_sq: self.sum_sq + o.sum_sq,
            max_abs: if self.max_abs.is_nan() || o.max_abs.is_nan() {
                f64::NAN
            } else {
                self.max_abs.max(o.max_abs)
            },
            zeros: self.zeros + o.zeros,
            nan: self.nan + o.nan,
            inf: self.inf + o.inf,
        }
    }

    /// The L2 norm.
    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }

    /// The population standard deviation.
    pub fn std(&self) -> f64 {
        if self.count == 0.0 {
            0.0
        } else {
            (self.m2 / self.count).sqrt()
        }
    }

    /// The fraction of exact zeros.
    pub fn zero_fraction(&self) -> f64 {
        if self.count == 0.0 {
            0.0
        } else {
            self.zeros as f64 / self.count
        }
    }
}

/// One chunk: a first pass (in f64 lanes) for the mean; a second, over the now-cached chunk, for
/// the squared deviations from it (f64), the largest magnitude and the zero count (exact in the
/// element's arithmetic type, which is cheaper than f64 for f32 and half types). The sum of
/// squares is `m2 + n * mean^2`, a sum of two non-negative terms, so nothing cancels.
#[inline(always)]
pub(crate) fn chunk_moments<T: Float>(xs: &[T]) -> Moments {
    const L: usize = 16;
    // Each lane counts at most 2^16 zeros per segment, exact in f32.
    const SEGMENT: usize = L << 16;
    let count = xs.len() as f64;
    let sum = sum_by(xs, |v| v);
    let mean = sum / count;
    let (zero, one) = (T::Acc::ZERO, T::Acc::ONE);
    let mut dev = [0f64; L];
    let (mut max_abs, mut zeros) = (0f64, 0u64);
    for segment in xs.chunks(SEGMENT) {
        let (mut max, mut zs) = ([zero; L], [zero; L]);
        let mut blocks = segment.chunks_exact(L);
        for block in &mut blocks {
            for k in 0..L {
                let (v, a) = (block[k].as_f64(), block[k].to_acc());
                dev[k] += (v - mean) * (v - mean);
                max[k] = max[k].max(a.abs());
                zs[k] += if a == zero { one } else { zero };
            }
        }
        for (k, x) in blocks.remainder().iter().enumerate() {
            let (v, a) = (x.as_f64(), x.to_acc());
            dev[k] += (v - mean) * (v - mean);
            max[k] = max[k].max(a.abs());
            zs[k] += if a == zero { one } else { zero };
        }
        max_abs = max.iter().map(|m| m.f64()).fold(max_abs, f64::max);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an exact count below 2^20"
        )]
        let segment_zeros = zs.iter().map(|z| z.f64()).sum::<f64>() as u64;
        zeros += segment_zeros;
    }
    let m2: f64 = dev.iter().sum();
    let sum_sq = m2 + count * mean * mean;
    let mut m = Moments {
        count,
        mean,
        m2,
        sum_sq,
        max_abs,
        zeros,
        nan: 0,
        inf: 0,
    };
    if !(sum_sq.is_finite() && sum.is_finite()) {
        // Rare path: count exactly, and let NaN show in the magnitude.
        for x in xs {
            let v = x.as_f64();
            m.nan += u64::from(v.is_nan());
            m.inf += u64::from(v.is_infinite());
        }
        if m.nan > 0 {
            m.max_abs = f64::NAN;
        } else if m.inf > 0 {
            m.max_abs = f64::INFINITY;
        }
    }
    m
}

/// Per-chunk histogram counts: the [`BINS`] magnitude bins, then zeros, infinities and NaN.
type Counts = [u32; BINS + 3];

/// The slot of each f32 exponent byte: its bin (clamped into the range), or, for the two
/// special exponents, the zero slot (0: zeros and subnormals) and the infinity slot (255:
/// infinities and NaN). [`chunk_counts`] moves subnormals and NaN where they belong afterwards.
const F32_SLOTS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut e = 1;
    while e < 255 {
        let bin = e as i32 - 127 - FIRST_EXPONENT;
        t[e] = if bin < 0 {
            0
        } else if bin >= BINS as i32 {
            (BINS - 1) as u8
        } else {
            bin as u8
        };
        e += 1;
    }
    t[0] = BINS as u8;
    t[255] = (BINS + 1) as u8;
    t
};

/// The histogram counts of one cached chunk (a third pass over data the moments just read),
/// given the chunk's exact zero, NaN and infinity counts from the moments. A value's slot is a
/// table lookup on its exponent bits; four interleaved tallies keep the increments independent.
#[inline(always)]
fn chunk_counts<T: Float>(xs: &[T], m: &Moments) -> Counts {
    let mut tallies = [[0u32; BINS + 3]; 4];
    if T::DTYPE == DType::F64 {
        for (i, x) in xs.iter().enumerate() {
            let a = x.as_f64().abs();
            let slot = if a == 0.0 {
                BINS
            } else if !a.is_finite() {
                BINS + 1
            } else {
                Histogram::bin_of(a)
            };
            tallies[i & 3][slot] += 1;
        }
    } else {
        // f16 and bf16 widen to f32 exactly.
        let mut blocks = xs.chunks_exact(4);
        for b in &mut blocks {
            for (k, x) in b.iter().enumerate() {
                let byte = (x.to_f32().to_bits() >> 23) & 0xff;
                tallies[k][usize::from(F32_SLOTS[byte as usize])] += 1;
            }
        }
        for x in blocks.remainder() {
            let byte = (x.to_f32().to_bits() >> 23) & 0xff;
            tallies[0][usize::from(F32_SLOTS[byte as usize])] += 1;
        }
    }
    let mut c = [0u32; BINS + 3];
    for t in &tallies {
        for (a, b) in c.iter_mut().zip(t) {
            *a += b;
        }
    }
    #[allow(clippy::cast_possible_truncation, reason = "chunk counts fit u32")]
    let (zeros, nan, inf) = (m.zeros as u32, m.nan as u32, m.inf as u32);
    // The zero slot also holds subnormals (below the range: bin 0); the infinity slot NaN.
    let subnormal = c[BINS].saturating_sub(zeros);
    c[0] += subnormal;
    c[BINS] = zeros;
    c[BINS + 1] = inf;
    c[BINS + 2] = nan;
    c
}

fn histogram_of_counts(parts: &[Counts]) -> Histogram {
    let mut total = [0u64; BINS + 3];
    for p in parts {
        for (t, &v) in total.iter_mut().zip(p.iter()) {
            *t += u64::from(v);
        }
    }
    Histogram::from_counts(
        &total[..BINS],
        total[BINS],
        total[BINS + 2],
        total[BINS + 1],
    )
}

/// Moments and histogram counts of the first `full` tensors, only the sum of squares (and
/// count) of the rest.
struct MomentChunks {
    full: usize,
}

impl ChunkFn for MomentChunks {
    type Output = (Moments, Option<Counts>);

    #[inline(always)]
    fn call<T: Float>(&self, tensor: usize, chunk: &[T]) -> Self::Output {
        if tensor < self.full {
            let m = chunk_moments(chunk);
            let counts = chunk_counts(chunk, &m);
            (m, Some(counts))
        } else {
            let m = Moments {
                count: chunk.len() as f64,
                sum_sq: sum_by(chunk, |v| v * v),
                ..Moments::default()
            };
            (m, None)
        }
    }
}

/// What one observation reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// The moments of each of the `tensors`.
    pub moments: Vec<Moments>,
    /// The magnitude histogram of each of the `tensors`.
    pub histograms: Vec<Histogram>,
    /// The L2 norm of each of the `others`.
    pub norms: Vec<f64>,
    /// The magnitude histogram of each of the `ratios`.
    pub ratio_histograms: Vec<Histogram>,
    /// The values of the rank-0 `extras`.
    pub extras: Vec<f64>,
}

/// What [`observe`] reads: moments and histograms of `tensors`, L2 norms of `others`,
/// histograms of `ratios` (composed path only: the fused path bins its host-side samples
/// itself) and the values of the rank-0 `extras`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wanted<'a> {
    pub tensors: &'a [Tensor],
    pub others: &'a [Tensor],
    pub ratios: &'a [Tensor],
    pub extras: &'a [Tensor],
}

/// On the fused path one parallel pass over the CPU tensors; on the composed path candle
/// reductions on the tensors' device, concatenated into one tensor and read back in one
/// transfer.
pub(crate) fn observe(wanted: Wanted<'_>, path: Path) -> Result<Observation> {
    if path == Path::Composed {
        return composed_observe(wanted);
    }
    let Wanted {
        tensors,
        others,
        ratios,
        extras,
    } = wanted;
    let all: Vec<Tensor> = tensors.iter().chain(others).cloned().collect();
    let parts = map_chunks(
        "moments",
        &all,
        &MomentChunks {
            full: tensors.len(),
        },
    )?;
    let mut moments = Vec::with_capacity(tensors.len());
    let mut histograms = Vec::with_capacity(tensors.len());
    let mut norms = Vec::with_capacity(others.len());
    for (k, parts) in parts.into_iter().enumerate() {
        let counts: Vec<Counts> = parts.iter().filter_map(|(_, c)| *c).collect();
        let m = parts
            .into_iter()
            .map(|(m, _)| m)
            .fold(Moments::default(), Moments::merge);
        if k < tensors.len() {
            moments.push(m);
            histograms.push(histogram_of_counts(&counts));
        } else {
            norms.push(m.norm());
        }
    }
    let mut ratio_histograms = Vec::with_capacity(ratios.len());
    for r in ratios {
        let mut h = Histogram::default();
        for v in read_back(r)? {
            h.add(v);
        }
        ratio_histograms.push(h);
    }
    let extras = if extras.is_empty() {
        Vec::new()
    } else {
        read_back(&Tensor::stack(extras, 0)?)?
    };
    Ok(Observation {
        moments,
        histograms,
        norms,
        ratio_histograms,
        extras,
    })
}

/// Columns of a composed moment row: count, mean, m2, sum of squares, max |x|, zeros, NaN, Inf.
const ROW: usize = 8;
/// Columns of a composed histogram row: the bins, then zeros, NaN and infinities.
const HISTOGRAM_ROW: usize = BINS + 3;

fn composed_observe(wanted: Wanted<'_>) -> Result<Observation> {
    let Wanted {
        tensors,
        others,
        ratios,
        extras,
    } = wanted;
    let Some(device) = tensors
        .iter()
        .chain(others)
        .chain(ratios)
        .chain(extras)
        .next()
        .map(Tensor::device)
    else {
        return Ok(Observation::default());
    };
    let wide = wide_dtype(device);
    let mut pieces = Vec::new();
    for t in tensors {
        pieces.push(moment_row(t)?);
        pieces.push(histogram_row(t)?);
    }
    for t in others {
        pieces.push(
            t.flatten_all()?
                .to_dtype(wide)?
                .sqr()?
                .sum_all()?
                .reshape(1)?,
        );
    }
    for r in ratios {
        pieces.push(histogram_row(r)?);
    }
    for e in extras {
        pieces.push(e.to_dtype(wide)?.reshape(1)?);
    }
    let values = read_back(&Tensor::cat(&pieces, 0)?)?;
    let mut rest = values.as_slice();
    let mut take = |n: usize| -> &[f64] {
        let (head, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        head
    };
    let mut out = Observation::default();
    for _ in tensors {
        out.moments.push(moments_of_row(take(ROW)));
        out.histograms.push(histogram_of_row(take(HISTOGRAM_ROW)));
    }
    for _ in others {
        out.norms.push(take(1)[0].sqrt());
    }
    for _ in ratios {
        out.ratio_histograms
            .push(histogram_of_row(take(HISTOGRAM_ROW)));
    }
    for _ in extras {
        out.extras.push(take(1)[0]);
    }
    Ok(out)
}

/// One tensor's magnitude histogram with candle ops on its device: the bin is
/// `floor(log2 |x|)` (nudged by 1e-9, so that an exact power of two, whose logarithm may round
/// just below the integer, lands in its own bin as its binary exponent does on the fused path),
/// counted with `index_add`; then the zeros, NaN and infinities.
pub(crate) fn histogram_row(t: &Tensor) -> Result<Tensor> {
    let device = t.device();
    let wide = wide_dtype(device);
    if t.elem_count() == 0 {
        return Ok(Tensor::zeros(HISTOGRAM_ROW, wide, device)?);
    }
    let x = t.flatten_all()?.to_dtype(wide)?;
    let a = x.abs()?;
    let counted =
        |mask: Tensor| -> Result<Tensor> { Ok(mask.to_dtype(wide)?.sum_all()?.reshape(1)?) };
    let zero = counted(a.eq(0.0)?)?;
    let nan = counted(x.ne(&x)?)?;
    let inf = counted(a.eq(f64::INFINITY)?)?;
    // Finite and non-zero: a real bin; everything else goes to a spare slot, dropped below.
    let regular = a.gt(0.0)?.mul(&a.lt(f64::INFINITY)?)?;
    let safe = regular.where_cond(&a, &a.ones_like()?)?;
    #[allow(clippy::cast_precision_loss, reason = "small integers")]
    let (lo, hi) = (
        f64::from(FIRST_EXPONENT),
        f64::from(FIRST_EXPONENT) + (BINS - 1) as f64,
    );
    let bin = safe
        .log()?
        .affine(std::f64::consts::LOG2_E, 1e-9)?
        .floor()?
        .clamp(lo, hi)?
        .affine(1.0, -lo)?;
    #[allow(clippy::cast_precision_loss, reason = "a small integer")]
    let spare = regular.where_cond(&bin, &bin.ones_like()?.affine(BINS as f64, 0.0)?)?;
    let index = spare.to_dtype(DType::U32)?;
    let counts = Tensor::zeros(BINS + 1, wide, device)?
        .index_add(&index, &a.ones_like()?, 0)?
        .narrow(0, 0, BINS)?;
    Ok(Tensor::cat(&[counts, zero, nan, inf], 0)?)
}

fn histogram_of_row(r: &[f64]) -> Histogram {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "exact counts"
    )]
    let counts: Vec<u64> = r.iter().map(|&v| v as u64).collect();
    if counts.len() < HISTOGRAM_ROW {
        return Histogram::default();
    }
    Histogram::from_counts(
        &counts[..BINS],
        counts[BINS],
        counts[BINS + 1],
        counts[BINS + 2],
    )
}

/// One tensor's `[count, mean, m2, sum of squares, max |x|, zeros, NaN, Inf]` computed with
/// candle reductions on its device, in [`wide_dtype`] (two passes: the mean, then the squared
/// deviations from it, as the fused kernel).
pub(crate) fn moment_row(t: &Tensor) -> Result<Tensor> {
    let device = t.device();
    let wide = wide_dtype(device);
    let n = t.elem_count();
    if n == 0 {
        return Ok(Tensor::zeros(ROW, wide, device)?);
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "element counts are far below 2^52"
    )]
    let count = n as f64;
    let x = t.flatten_all()?.to_dtype(wide)?;
    let abs = x.abs()?;
    let mean = x.sum_all()?.affine(1.0 / count, 0.0)?;
    let m2 = x.broadcast_sub(&mean)?.sqr()?.sum_all()?;
    let counted = |mask: Tensor| -> Result<Tensor> { Ok(mask.to_dtype(wide)?.sum_all()?) };
    let cols = [
        scalar(count, wide, device)?,
        mean,
        m2,
        x.sqr()?.sum_all()?,
        abs.max_all()?,
        counted(x.eq(0.0)?)?,
        counted(x.ne(&x)?)?,
        counted(abs.eq(f64::INFINITY)?)?,
    ];
    Ok(Tensor::stack(&cols, 0)?)
}

/// [`Moments`] from a [`moment_row`] read back; NaN and infinities show in the magnitude as on
/// the fused path.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "exact counts"
)]
pub(crate) fn moments_of_row(r: &[f64]) -> Moments {
    let (nan, inf) = (r[6] as u64, r[7] as u64);
    Moments {
        count: r[0],
        mean: r[1],
        m2: r[2],
        sum_sq: r[3],
        max_abs: if nan > 0 {
            f64::NAN
        } else if inf > 0 {
            f64::INFINITY
        } else {
            r[4]
        },
        zeros: r[5] as u64,
        nan,
        inf,
    }
}

/// The elements of `t` at the given flat positions, as f64 (a deterministic sample of a weight,
/// for update ratios), read straight from the CPU storage.
pub(crate) fn gather(t: &Tensor, positions: &[usize]) -> Result<Vec<f64>> {
    let t = t.contiguous()?;
    struct Run<'a>(&'a Tensor, &'a [usize]);
    impl FloatFn for Run<'_> {
        type Output = Vec<f64>;
        fn call<T: Float>(self) -> grad_core::Result<Vec<f64>> {
            let (storage, layout) = self.0.storage_and_layout();
            let data = storage_slice::<T>(&storage, layout)?;
            Ok(self.1.iter().map(|&p| data[p].as_f64()).collect())
        }
    }
    Ok(dispatch("gather", t.dtype(), Run(&t, positions))?)
}

/// [`gather`] on the tensor's device: the sample stays there, in [`wide_dtype`].
pub(crate) fn gather_on_device(t: &Tensor, positions: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_all()?
        .index_select(positions, 0)?
        .to_dtype(wide_dtype(t.device()))?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn fused_equals_composed() -> Result<()> {
        let t = Tensor::randn(0.5f32, 2.0, (300, 250), &Device::Cpu)?;
        // Exact powers of two, zeros and non-finite values among the ordinary ones.
        let special = Tensor::new(
            &[
                0.25f32,
                -1.0,
                1024.0,
                0.0,
                3e-20,
                f32::NAN,
                f32::INFINITY,
                1e30,
            ],
            &Device::Cpu,
        )?;
        let tensors = [t.clone(), special];
        let wanted = Wanted {
            tensors: &tensors,
            others: std::slice::from_ref(&t),
            ..Wanted::default()
        };
        let a = observe(wanted, Path::Fused)?;
        let b = observe(wanted, Path::Composed)?;
        let (ma, mb) = (a.moments[0], b.moments[0]);
        assert!((ma.mean - mb.mean).abs() < 1e-12);
        assert!((ma.std() - mb.std()).abs() < 1e-9);
        assert!((ma.norm() - mb.norm()).abs() < 1e-9 * mb.norm());
        assert_eq!(
            (ma.max_abs, ma.zeros, ma.nan),
            (mb.max_abs, mb.zeros, mb.nan)
        );
        assert_eq!(a.histograms, b.histograms);
        assert_eq!(a.histograms[0].total(), 75_000);
        let h = &a.histograms[1];
        assert_eq!((h.zero, h.nan, h.inf), (1, 1, 1));
        assert_eq!(h.count(Histogram::bin_of(0.25)), 1);
        assert_eq!(h.count(0), 1); // 3e-20 is below the range
        assert!((a.norms[0] - b.norms[0]).abs() < 1e-9 * b.norms[0]);
        Ok(())
    }
}

//! Fused statistics kernels: one read of a tensor gives its sum of squares, mean, standard
//! deviation, largest magnitude, zero count and NaN/Inf counts.
//!
//! Work is cut into `grad_core::host::CHUNK`-element ranges; each range takes its mean and the
//! squared deviations about it while in cache (two passes over cached data), and ranges merge in
//! order with Chan et al.'s update — stable, and independent of the thread count.
//!
//! The composed path (other devices) computes the same statistics with candle reductions on the
//! tensors' device and reads them back as one small tensor per observation.

use candle_core::Tensor;
use grad_core::device::{Path, read_back, scalar, wide_dtype};
use grad_core::float::{Float, FloatFn, Real, dispatch};
use grad_core::host::{ChunkFn, map_chunks, storage_slice};
use grad_core::reduce::sum_by;

use crate::Result;

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
        let count = self.count + o.count;
        let delta = o.mean - self.mean;
        Self {
            count,
            mean: self.mean + delta * o.count / count,
            m2: self.m2 + o.m2 + delta * delta * self.count * o.count / count,
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

/// Moments of the first `full` tensors, only the sum of squares (and count) of the rest.
struct MomentChunks {
    full: usize,
}

impl ChunkFn for MomentChunks {
    type Output = Moments;

    #[inline(always)]
    fn call<T: Float>(&self, tensor: usize, chunk: &[T]) -> Moments {
        if tensor < self.full {
            chunk_moments(chunk)
        } else {
            Moments {
                count: chunk.len() as f64,
                sum_sq: sum_by(chunk, |v| v * v),
                ..Moments::default()
            }
        }
    }
}

/// What one observation reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// The moments of each of the `tensors`.
    pub moments: Vec<Moments>,
    /// The L2 norm of each of the `others`.
    pub norms: Vec<f64>,
    /// The values of the rank-0 `extras`.
    pub extras: Vec<f64>,
}

/// The moments of each of `tensors`, the L2 norm of each of `others` and the values of the
/// rank-0 `extras`: on the fused path one parallel pass over the CPU tensors; on the composed
/// path candle reductions on the tensors' device, stacked into one `[k, 8]` tensor and read
/// back in one transfer.
pub(crate) fn observe(
    tensors: &[Tensor],
    others: &[Tensor],
    extras: &[Tensor],
    path: Path,
) -> Result<Observation> {
    if path == Path::Composed {
        return composed_observe(tensors, others, extras);
    }
    let all: Vec<Tensor> = tensors.iter().chain(others).cloned().collect();
    let mut merged = map_chunks(
        "moments",
        &all,
        &MomentChunks {
            full: tensors.len(),
        },
    )?
    .into_iter()
    .map(|parts| parts.into_iter().fold(Moments::default(), Moments::merge));
    let moments = merged.by_ref().take(tensors.len()).collect();
    let norms = merged.map(|m| m.norm()).collect();
    let extras = if extras.is_empty() {
        Vec::new()
    } else {
        read_back(&Tensor::stack(extras, 0)?)?
    };
    Ok(Observation {
        moments,
        norms,
        extras,
    })
}

/// Columns of a composed row: count, mean, m2, sum of squares, max |x|, zeros, NaN, Inf.
const ROW: usize = 8;

fn composed_observe(
    tensors: &[Tensor],
    others: &[Tensor],
    extras: &[Tensor],
) -> Result<Observation> {
    let Some(device) = tensors
        .iter()
        .chain(others)
        .chain(extras)
        .next()
        .map(Tensor::device)
    else {
        return Ok(Observation::default());
    };
    let wide = wide_dtype(device);
    let pad = |head: &[Tensor]| -> Result<Tensor> {
        let mut cols = head.to_vec();
        cols.resize(ROW, Tensor::zeros((), wide, device)?);
        Ok(Tensor::stack(&cols, 0)?)
    };
    let mut rows = Vec::with_capacity(tensors.len() + others.len() + extras.len());
    for t in tensors {
        rows.push(moment_row(t)?);
    }
    for t in others {
        let sum_sq = t.flatten_all()?.to_dtype(wide)?.sqr()?.sum_all()?;
        rows.push(pad(&[Tensor::zeros((), wide, device)?, sum_sq])?);
    }
    for e in extras {
        rows.push(pad(&[e.to_dtype(wide)?])?);
    }
    let values = read_back(&Tensor::stack(&rows, 0)?)?;
    let mut rows = values.chunks_exact(ROW);
    let moments = rows
        .by_ref()
        .take(tensors.len())
        .map(moments_of_row)
        .collect();
    let norms = rows
        .by_ref()
        .take(others.len())
        .map(|r| r[1].sqrt())
        .collect();
    let extras = rows.map(|r| r[0]).collect();
    Ok(Observation {
        moments,
        norms,
        extras,
    })
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
        let a = observe(std::slice::from_ref(&t), &[], &[], Path::Fused)?.moments[0];
        let b = observe(std::slice::from_ref(&t), &[], &[], Path::Composed)?.moments[0];
        assert!((a.mean - b.mean).abs() < 1e-12);
        assert!((a.std() - b.std()).abs() < 1e-9);
        assert!((a.norm() - b.norm()).abs() < 1e-9 * b.norm());
        assert_eq!((a.max_abs, a.zeros, a.nan), (b.max_abs, b.zeros, b.nan));
        Ok(())
    }
}

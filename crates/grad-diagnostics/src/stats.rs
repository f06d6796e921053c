//! Fused statistics kernels: one read of a tensor gives its sum of squares, mean, standard
//! deviation, largest magnitude, zero count and NaN/Inf counts.
//!
//! Work is cut into `grad_core::host::CHUNK`-element ranges; each range takes its mean and the
//! squared deviations about it while in cache (two passes over cached data), and ranges merge in
//! order with Chan et al.'s update — stable, and independent of the thread count.

use candle_core::{DType, Tensor};
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

/// The moments of each of `tensors` and the L2 norm of each of `others`, all read in one
/// parallel pass (CPU tensors; other devices use candle ops one tensor at a time).
pub(crate) fn moments_and_norms(
    tensors: &[Tensor],
    others: &[Tensor],
) -> Result<(Vec<Moments>, Vec<f64>)> {
    let all: Vec<Tensor> = tensors.iter().chain(others).cloned().collect();
    if all.iter().all(|t| t.device().is_cpu()) {
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
        return Ok((moments, merged.map(|m| m.norm()).collect()));
    }
    let moments = tensors.iter().map(moments).collect::<Result<_>>()?;
    let norms = others
        .iter()
        .map(|t| {
            Ok(t.to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f64>()?)
        })
        .collect::<Result<_>>()?;
    Ok((moments, norms))
}

/// The moments of every element of `t` (any layout, any float dtype, any device).
pub(crate) fn moments(t: &Tensor) -> Result<Moments> {
    if t.elem_count() == 0 {
        return Ok(Moments::default());
    }
    if !t.device().is_cpu() {
        return composed_moments(t);
    }
    Ok(moments_and_norms(std::slice::from_ref(t), &[])?.0.remove(0))
}

/// [`moments`] with candle ops, for other devices.
fn composed_moments(t: &Tensor) -> Result<Moments> {
    let x = t.to_dtype(DType::F64)?.flatten_all()?;
    let count = x.elem_count() as f64;
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_scalar::<f64>()?) };
    let mean = scalar(x.sum_all()?)? / count;
    let count_of = |mask: Tensor| -> Result<u64> {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a count"
        )]
        Ok(scalar(mask.to_dtype(DType::F64)?.sum_all()?)? as u64)
    };
    Ok(Moments {
        count,
        mean,
        m2: scalar(x.affine(1.0, -mean)?.sqr()?.sum_all()?)?,
        sum_sq: scalar(x.sqr()?.sum_all()?)?,
        max_abs: scalar(x.abs()?.max_all()?)?,
        zeros: count_of(x.eq(0.0)?)?,
        nan: count_of(x.ne(&x)?)?,
        inf: count_of(x.abs()?.eq(f64::INFINITY)?)?,
    })
}

/// The elements of `t` at the given flat positions, as f64 (a deterministic sample of a weight,
/// for update ratios), read straight from the CPU storage.
pub(crate) fn gather(t: &Tensor, positions: &[usize]) -> Result<Vec<f64>> {
    if !t.device().is_cpu() {
        let idx = Tensor::from_vec(
            positions
                .iter()
                .map(|&p| u32::try_from(p).unwrap_or(u32::MAX))
                .collect::<Vec<_>>(),
            positions.len(),
            t.device(),
        )?;
        return Ok(t
            .flatten_all()?
            .index_select(&idx, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?);
    }
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn fused_equals_composed() -> Result<()> {
        let t = Tensor::randn(0.5f32, 2.0, (300, 250), &Device::Cpu)?;
        let (a, b) = (moments(&t)?, composed_moments(&t)?);
        assert!((a.mean - b.mean).abs() < 1e-12);
        assert!((a.std() - b.std()).abs() < 1e-9);
        assert!((a.norm() - b.norm()).abs() < 1e-9 * b.norm());
        assert_eq!((a.max_abs, a.zeros, a.nan), (b.max_abs, b.zeros, b.nan));
        Ok(())
    }
}

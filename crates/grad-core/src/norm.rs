//! Fused multi-tensor norms with a finiteness check, as gradient clipping needs them.
//!
//! `torch.nn.utils.clip_grad_norm_` computes the norm of every gradient, then the norm of those
//! norms: `total = (sum_i ||g_i||_p^p)^(1/p)` (the maximum for `p = inf`), and separately checks
//! `total` for NaN/Inf. A candle user writes `g.sqr()?.sum_all()?` per tensor: two full passes and
//! a fresh allocation each. [`multi_norm`] reads every element once, accumulates in `f64` whatever
//! the dtype (a sum of 25M squares loses digits in `f32`), counts NaN and infinite values in the
//! same pass, and runs in parallel across tensors and within large ones.
//!
//! Reduction order is fixed: each tensor is cut into [`CHUNK`](crate::cpu::CHUNK)-element ranges
//! in logical order, each range is summed by [`reduce::sum_by`](crate::cpu::sum_by), and partial sums
//! are combined in index order. The result therefore does not depend on the thread count or on
//! the tensors' memory layout.
//!
//! Tensors on another device (CUDA, Metal) take a composed path of candle ops on that device,
//! exact to rounding, which reads back one small tensor (the per-tensor accumulators and counts)
//! per call.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu::{ChunkFn, map_chunks};
use crate::cpu::{Float, with_avx2};
use crate::cpu::{max_abs, sum_by};
use crate::device::{Path, read_back, wide_dtype};
use crate::validate::ensure_float;
use crate::{Error, Result};

const OP: &str = "global_norm";

/// Which vector norm to take, as `norm_type` in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum NormType {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm (the default for gradient clipping).
    L2,
    /// Largest absolute value.
    Inf,
    /// `(sum |x|^p)^(1/p)` for a finite `p > 0`.
    P(f64),
}

impl NormType {
    /// The norm for exponent `p`: `1`, `2` and `inf` map to their dedicated variants.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] when `p <= 0`, `p` is NaN or `p = -inf`.
    ///
    /// ```
    /// use gradkit::core::NormType;
    /// assert_eq!(NormType::from_p(2.0)?, NormType::L2);
    /// assert_eq!(NormType::from_p(f64::INFINITY)?, NormType::Inf);
    /// assert!(NormType::from_p(0.0).is_err());
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn from_p(p: f64) -> Result<Self> {
        let norm = match p {
            1.0 => Self::L1,
            2.0 => Self::L2,
            f64::INFINITY => Self::Inf,
            p => Self::P(p),
        };
        norm.validate()?;
        Ok(norm)
    }

    /// The exponent `p` (`inf` for [`NormType::Inf`]).
    pub fn p(self) -> f64 {
        match self {
            Self::L1 => 1.0,
            Self::L2 => 2.0,
            Self::Inf => f64::INFINITY,
            Self::P(p) => p,
        }
    }

    /// Checks that a [`NormType::P`] exponent is finite and positive.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] naming `norm_type`.
    pub fn validate(self) -> Result<()> {
        match self {
            Self::P(p) if !(p.is_finite() && p > 0.0) => Err(Error::InvalidHyperParameter {
                name: "norm_type",
                value: p,
                allowed: "p > 0 (finite), or NormType::Inf",
            }),
            _ => Ok(()),
        }
    }

    /// Combines two accumulators (sum of `|x|^p`, or the maximum for `inf`).
    fn combine(self, a: f64, b: f64) -> f64 {
        match self {
            Self::Inf => a.max(b),
            _ => a + b,
        }
    }

    /// Turns an accumulator into the norm.
    fn finish(self, acc: f64) -> f64 {
        match self {
            Self::L1 | Self::Inf => acc,
            Self::L2 => acc.sqrt(),
            Self::P(p) => acc.powf(p.recip()),
        }
    }
}

/// The norm of one tensor, with its count of non-finite elements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TensorNorm {
    /// The norm; NaN if the tensor holds a NaN, else infinite if it holds an infinity.
    pub norm: f64,
    /// Number of NaN elements.
    pub nan_count: u64,
    /// Number of infinite elements.
    pub inf_count: u64,
}

impl TensorNorm {
    /// Whether the tensor holds no NaN or infinity.
    pub fn all_finite(&self) -> bool {
        self.nan_count == 0 && self.inf_count == 0
    }
}

/// Per-tensor norms and the total norm of a set of tensors, from one read of each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiNorm {
    /// The total norm: the norm of the per-tensor norms (PyTorch's `get_total_norm`). NaN if any
    /// element is NaN, else infinite if any is infinite (or the sum overflows `f64`).
    pub total: f64,
    /// One entry per input tensor, in input order.
    pub per_tensor: Vec<TensorNorm>,
}

impl MultiNorm {
    /// Total number of NaN and infinite elements over every tensor.
    pub fn non_finite_count(&self) -> u64 {
        self.per_tensor
            .iter()
            .map(|t| t.nan_count + t.inf_count)
            .sum()
    }

    /// The index of the first tensor holding a NaN or infinity.
    pub fn first_non_finite(&self) -> Option<usize> {
        self.per_tensor.iter().position(|t| !t.all_finite())
    }
}

/// The total `p`-norm of a set of tensors, as `torch.nn.utils.get_total_norm` computes it.
///
/// # Shapes
/// Any shapes; every tensor must be a float tensor on the same device.
///
/// # Errors
/// [`Error::EmptyInput`] for an empty list, [`Error::InvalidHyperParameter`] for a bad
/// [`NormType::P`], [`Error::UnsupportedDType`] for integer tensors, [`Error::DeviceMismatch`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::{NormType, global_norm};
/// let a = Tensor::new(&[3f32, 0.0], &Device::Cpu)?;
/// let b = Tensor::new(&[[4f32]], &Device::Cpu)?;
/// assert_eq!(global_norm(&[a, b], NormType::L2)?, 5.0);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn global_norm(tensors: &[Tensor], norm_type: NormType) -> Result<f64> {
    Ok(multi_norm(tensors, norm_type)?.total)
}

/// Per-tensor norms, the total norm and non-finite counts of a set of tensors in one pass.
///
/// # Shapes
/// Any shapes; every tensor must be a float tensor on the same device.
///
/// # Errors
/// As [`global_norm`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::{NormType, multi_norm};
/// let a = Tensor::new(&[1f32, f32::NAN], &Device::Cpu)?;
/// let b = Tensor::new(&[2f32, -2.0], &Device::Cpu)?;
/// let norms = multi_norm(&[a, b], NormType::L1)?;
/// assert!(norms.total.is_nan());
/// assert_eq!(norms.per_tensor[1].norm, 4.0);
/// assert_eq!(norms.first_non_finite(), Some(0));
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn multi_norm(tensors: &[Tensor], norm_type: NormType) -> Result<MultiNorm> {
    norm_type.validate()?;
    let first = tensors.first().ok_or(Error::EmptyInput {
        op: OP,
        what: "tensor list",
    })?;
    for t in tensors {
        ensure_float(OP, "tensors", t.dtype())?;
        ensure_same_device(OP, first.device(), t.device())?;
    }
    let partials = match Path::of(first.device()) {
        Path::Fused => fused_partials(tensors, norm_type)?,
        Path::Composed => composed_partials(tensors, norm_type)?,
    };
    Ok(finish(&partials, norm_type))
}

/// The L2 norm of each dim-0 slice of a tensor ("unit-wise" norms: one per output neuron of an
/// `[out, in]` weight, one per filter of `[out, in, kh, kw]`), accumulated in f64; one norm of
/// the whole tensor for rank 0 or 1. What adaptive gradient clipping (Brock et al. 2021) needs.
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let w = Tensor::new(&[[3f32, 4.0], [0.0, 1.0]], &Device::Cpu)?;
/// assert_eq!(gradkit::core::unit_norms(&w)?, [5.0, 1.0]);
/// assert_eq!(gradkit::core::unit_norms(&w.flatten_all()?)?, [26f64.sqrt()]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn unit_norms(t: &Tensor) -> Result<Vec<f64>> {
    ensure_float("unit_norms", "tensor", t.dtype())?;
    let units = crate::inplace::unit_count(t);
    if t.elem_count() == 0 {
        return Ok(vec![0.0; units]);
    }
    if Path::of(t.device()) == Path::Composed {
        return read_back(&unit_norm_tensor(t)?);
    }
    let rows = t.reshape((units, ()))?.contiguous()?;
    struct Rows<'a>(&'a Tensor, usize);
    impl crate::cpu::FloatFn for Rows<'_> {
        type Output = Vec<f64>;
        fn call<T: Float>(self) -> Result<Vec<f64>> {
            let (storage, layout) = self.0.storage_and_layout();
            let data = crate::cpu::storage_slice::<T>(&storage, layout)?;
            let len = data.len() / self.1;
            Ok(data
                .par_chunks(len.max(1))
                .map(|row| {
                    with_avx2(
                        #[inline(always)]
                        || sum_by(row, |v| v * v).sqrt(),
                    )
                })
                .collect())
        }
    }
    crate::cpu::dispatch("unit_norms", t.dtype(), Rows(&rows, units))
}

/// [`unit_norms`] as a `[units]` tensor on `t`'s device, computed with candle ops in
/// [`wide_dtype`](crate::device::wide_dtype): what a composed path uses to keep the norms on the
/// device.
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let w = Tensor::new(&[[3f32, 4.0], [0.0, 1.0]], &Device::Cpu)?;
/// let n = gradkit::core::unit_norm_tensor(&w)?;
/// assert_eq!(n.to_vec1::<f64>()?, [5.0, 1.0]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn unit_norm_tensor(t: &Tensor) -> Result<Tensor> {
    ensure_float("unit_norms", "tensor", t.dtype())?;
    let units = crate::inplace::unit_count(t);
    let wide = wide_dtype(t.device());
    if t.elem_count() == 0 {
        return Ok(Tensor::zeros(units, wide, t.device())?);
    }
    Ok(t.reshape((units, ()))?
        .to_dtype(wide)?
        .sqr()?
        .sum(1)?
        .sqrt()?)
}

/// Checks that `other` is the same device as `first`.
///
/// # Errors
/// [`Error::DeviceMismatch`] naming `op`.
pub fn ensure_same_device(op: &'static str, first: &Device, other: &Device) -> Result<()> {
    if first.same_device(other) {
        Ok(())
    } else {
        Err(Error::DeviceMismatch {
            op,
            first: format!("{:?}", first.location()),
            other: format!("{:?}", other.location()),
        })
    }
}

/// A partial reduction: accumulator over finite elements' `|x|^p` (or max), plus counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Partial {
    acc: f64,
    nan: u64,
    inf: u64,
}

impl Partial {
    fn merge(self, other: Self, norm_type: NormType) -> Self {
        Self {
            acc: norm_type.combine(self.acc, other.acc),
            nan: self.nan + other.nan,
            inf: self.inf + other.inf,
        }
    }

    fn norm(self, norm_type: NormType) -> f64 {
        if self.nan > 0 {
            f64::NAN
        } else if self.inf > 0 {
            f64::INFINITY
        } else {
            norm_type.finish(self.acc)
        }
    }
}

fn finish(partials: &[Partial], norm_type: NormType) -> MultiNorm {
    let total = partials
        .iter()
        .fold(Partial::default(), |a, &b| a.merge(b, norm_type));
    MultiNorm {
        total: total.norm(norm_type),
        per_tensor: partials
            .iter()
            .map(|p| TensorNorm {
                norm: p.norm(norm_type),
                nan_count: p.nan,
                inf_count: p.inf,
            })
            .collect(),
    }
}

/// The per-chunk reduction, run by [`map_chunks`].
struct NormChunks(NormType);

impl ChunkFn for NormChunks {
    type Output = Partial;

    #[inline(always)]
    fn call<T: Float>(&self, _tensor: usize, chunk: &[T]) -> Partial {
        chunk_partial(chunk, self.0)
    }
}

fn fused_partials(tensors: &[Tensor], norm_type: NormType) -> Result<Vec<Partial>> {
    Ok(map_chunks(OP, tensors, &NormChunks(norm_type))?
        .into_iter()
        .map(|parts| {
            parts
                .into_iter()
                .fold(Partial::default(), |a, b| a.merge(b, norm_type))
        })
        .collect())
}

/// The partial reduction of one contiguous chunk.
#[inline(always)]
fn chunk_partial<T: Float>(xs: &[T], norm_type: NormType) -> Partial {
    let acc = match norm_type {
        NormType::L2 => sum_by(xs, |v| v * v),
        NormType::L1 => sum_by(xs, f64::abs),
        NormType::P(p) => sum_by(xs, |v| v.abs().powf(p)),
        NormType::Inf => {
            // A max ignores NaN, so poison a sum with `x * 0` (NaN for NaN and for inf).
            let poison = sum_by(xs, |v| v * 0.0);
            let max = max_abs(xs);
            if poison.is_finite() { max } else { poison }
        }
    };
    if acc.is_finite() {
        return Partial {
            acc,
            nan: 0,
            inf: 0,
        };
    }
    // Rare path: something in this chunk is NaN or infinite, or a sum overflowed. Count exactly.
    let (mut nan, mut inf) = (0, 0);
    for x in xs {
        let v = x.as_f64();
        nan += u64::from(v.is_nan());
        inf += u64::from(v.is_infinite());
    }
    Partial { acc, nan, inf }
}

/// The same reduction with candle ops on the tensors' device: each tensor's accumulator and
/// NaN/Inf counts as a 3-element tensor, stacked, and read back in one transfer.
fn composed_partials(tensors: &[Tensor], norm_type: NormType) -> Result<Vec<Partial>> {
    let rows = tensors
        .iter()
        .map(|t| composed_partial(t, norm_type))
        .collect::<Result<Vec<_>>>()?;
    let values = read_back(&Tensor::stack(&rows, 0)?)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "exact counts"
    )]
    Ok(values
        .chunks_exact(3)
        .map(|v| Partial {
            acc: v[0],
            nan: v[1] as u64,
            inf: v[2] as u64,
        })
        .collect())
}

/// One tensor's `[accumulator, NaN count, Inf count]` in the device's wide dtype.
fn composed_partial(t: &Tensor, norm_type: NormType) -> Result<Tensor> {
    let wide = wide_dtype(t.device());
    if t.elem_count() == 0 {
        return Ok(Tensor::zeros(3, wide, t.device())?);
    }
    let x = t.flatten_all()?.to_dtype(wide)?;
    let count = |mask: Tensor| -> Result<Tensor> { Ok(mask.to_dtype(wide)?.sum_all()?) };
    let abs = x.abs()?;
    let nan = count(x.ne(&x)?)?;
    let inf = count(abs.eq(f64::INFINITY)?)?;
    let acc = match norm_type {
        NormType::L1 => abs.sum_all()?,
        NormType::L2 => x.sqr()?.sum_all()?,
        NormType::Inf => abs.max_all()?,
        NormType::P(p) => abs.powf(p)?.sum_all()?,
    };
    Ok(Tensor::stack(&[acc, nan, inf], 0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn composed_path_matches_fused_path() -> Result<()> {
        let a = Tensor::randn(0f32, 3.0, (50, 70), &Device::Cpu)?;
        let b = Tensor::new(&[1f64, f64::NAN, f64::INFINITY, -2.0], &Device::Cpu)?;
        let c = Tensor::randn(0f64, 1.0, (4096 * 9 + 5,), &Device::Cpu)?;
        for norm_type in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)] {
            for set in [vec![a.clone(), c.clone()], vec![a.clone(), b.clone()]] {
                let fused = fused_partials(&set, norm_type)?;
                let composed = composed_partials(&set, norm_type)?;
                let (f, c) = (finish(&fused, norm_type), finish(&composed, norm_type));
                for (x, y) in f.per_tensor.iter().zip(&c.per_tensor) {
                    assert_eq!((x.nan_count, x.inf_count), (y.nan_count, y.inf_count));
                    let same = (x.norm.is_nan() && y.norm.is_nan())
                        || (x.norm - y.norm).abs() <= 1e-12 * y.norm.abs();
                    assert!(same, "{norm_type:?}: {} vs {}", x.norm, y.norm);
                }
            }
        }
        Ok(())
    }
}

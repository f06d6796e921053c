//! In-place gradient updates: scaling and clamping without a fresh allocation per parameter.
//!
//! On the CPU a fresh large allocation pages in at about 3 GB/s while a write into a buffer that
//! is already mapped runs at 11–14 GB/s (measured on the project machine: a memcpy into a fresh
//! 256 MiB buffer against a reused one), so `g.affine(c, 0.)` per parameter costs about four
//! times the in-place write. These functions use candle's in-place custom ops
//! ([`Tensor::inplace_op1`]) on the CPU.
//!
//! # Aliasing
//! The update writes into the tensor's storage: every clone of that [`Tensor`] (clones share
//! storage) sees the new values, as every holder of `param.grad` does in PyTorch after
//! `clip_grad_norm_`. candle's `backward()` gives each variable its own freshly computed gradient
//! storage, so updating gradients taken from a [`GradStore`](candle_core::backprop::GradStore) in
//! place affects nothing else. Do not call these on a tensor whose storage you still need
//! unchanged (a view of a parameter, say).
//!
//! On the composed path ([`Path::Composed`], what CUDA and Metal tensors take) a new tensor is
//! computed with candle ops on the tensor's device and replaces `*tensor`; the old storage is
//! left untouched. Either way, `*tensor` holds the result afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

use crate::cpu::{CHUNK, INLINE_MAX, Offsets};
use crate::cpu::{Float, with_avx2};
use crate::device::{Path, read_back_scalar};
use crate::validate::ensure_float;
use crate::{Error, Result};

/// Multiplies a float tensor by `factor`, in place on the CPU (fused path).
///
/// f16/bf16 elements are scaled in f32 and rounded once.
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor; [`Error::InvalidHyperParameter`] for a NaN
/// factor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut g = Tensor::new(&[1f32, -2.0], &Device::Cpu)?;
/// gradkit::core::scale_in_place(&mut g, 0.5)?;
/// assert_eq!(g.to_vec1::<f32>()?, [0.5, -1.0]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn scale_in_place(tensor: &mut Tensor, factor: f64) -> Result<()> {
    scale_all_in_place(std::slice::from_mut(tensor), factor)
}

/// [`scale_in_place`] on every tensor, in parallel across tensors (and within large ones): the
/// multi-tensor form a clipper uses, with no barrier between one gradient and the next.
///
/// # Errors
/// As [`scale_in_place`], for the first tensor that fails.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut gs = vec![Tensor::new(&[2f32], &Device::Cpu)?, Tensor::new(&[4f64, 6.0], &Device::Cpu)?];
/// gradkit::core::scale_all_in_place(&mut gs, 0.5)?;
/// assert_eq!(gs[1].to_vec1::<f64>()?, [2.0, 3.0]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn scale_all_in_place(tensors: &mut [Tensor], factor: f64) -> Result<()> {
    for t in tensors.iter() {
        ensure_float("scale_in_place", "tensor", t.dtype())?;
    }
    crate::validate::not_nan("factor", factor)?;
    update_all(tensors, &Update::Scale(factor)).map(|_| ())
}

/// [`clamp_in_place`] on every tensor, in parallel across tensors; true when any element was
/// outside `[min, max]` (and so changed). On the composed path that flag is one read-back for
/// the whole set.
///
/// # Errors
/// As [`clamp_in_place`], for the first tensor that fails.
pub fn clamp_all_in_place(tensors: &mut [Tensor], min: f64, max: f64) -> Result<bool> {
    for t in tensors.iter() {
        ensure_float("clamp_in_place", "tensor", t.dtype())?;
    }
    if min.is_nan() || max.is_nan() || min > max {
        return Err(crate::validate::invalid(
            "min",
            min,
            "a number <= max (neither NaN)",
        ));
    }
    update_all(
        tensors,
        &Update::Clamp(min, max, Arc::new(AtomicBool::new(false))),
    )
}

/// Applies `update` to every tensor, each by its own path (chosen here, on the calling thread,
/// so a [`with_path`](crate::device::with_path) choice holds inside the parallel loop). Returns
/// whether a clamp changed any element (false for the other updates).
fn update_all(tensors: &mut [Tensor], update: &Update) -> Result<bool> {
    let paths: Vec<Path> = tensors.iter().map(|t| Path::of(t.device())).collect();
    let flags: Vec<Option<Tensor>> = tensors
        .par_iter_mut()
        .zip(paths)
        .map(|(t, path)| update_one(t, update, path))
        .collect::<Result<_>>()?;
    let flags: Vec<Tensor> = flags.into_iter().flatten().collect();
    let composed_changed = if flags.is_empty() {
        false
    } else {
        read_back_scalar(&Tensor::stack(&flags, 0)?.max_all()?)? > 0.0
    };
    let fused_changed = match update {
        Update::Clamp(_, _, changed) => changed.load(Ordering::Relaxed),
        _ => false,
    };
    Ok(composed_changed || fused_changed)
}

/// One tensor's update: in place on the fused path, a new tensor from candle ops otherwise
/// (for a clamp, with a rank-0 "an element changed" flag left on the device).
fn update_one(tensor: &mut Tensor, update: &Update, path: Path) -> Result<Option<Tensor>> {
    if tensor.elem_count() == 0 {
        // Nothing to update (and candle reads a zero-size dim's zero stride as repeats).
        return Ok(None);
    }
    if path == Path::Fused {
        if repeats_elements(tensor) {
            // A broadcast view has no storage of its own to write: give it one first.
            *tensor = tensor.contiguous()?;
        }
        tensor.inplace_op1(update)?;
        return Ok(None);
    }
    let mut flag = None;
    *tensor = match update {
        Update::Scale(f) => tensor.affine(*f, 0.0)?,
        // candle's clamp is max(min(x, hi), lo), which keeps NaN as PyTorch does.
        Update::Clamp(lo, hi, _) => {
            if tensor.elem_count() > 0 {
                let outside = tensor.lt(*lo)?.maximum(&tensor.gt(*hi)?)?;
                flag = Some(outside.to_dtype(DType::F32)?.max_all()?);
            }
            tensor.clamp(*lo, *hi)?
        }
        Update::CenterRows(rows) => {
            let compute = crate::device::compute_dtype(tensor.dtype());
            let mean = tensor
                .to_dtype(compute)?
                .reshape((*rows, ()))?
                .mean_keepdim(1)?
                .to_dtype(tensor.dtype())?;
            let mut shape = vec![1; tensor.rank()];
            shape[0] = *rows;
            tensor.broadcast_sub(&mean.reshape(shape)?)?
        }
        Update::ScaleRows(factors) => {
            let mut shape = vec![1; tensor.rank().max(1)];
            shape[0] = factors.len();
            let f = Tensor::from_vec(factors.clone(), shape, tensor.device())?
                .to_dtype(tensor.dtype())?;
            tensor.broadcast_mul(&f)?
        }
    };
    Ok(flag)
}

/// [`unscale_in_place`] on every tensor, in parallel across tensors; true when any result holds
/// a NaN or infinity.
///
/// # Errors
/// As [`unscale_in_place`], for the first tensor that fails.
pub fn unscale_all_in_place(tensors: &mut [Tensor], factor: f64) -> Result<bool> {
    check_unscale(tensors, factor)?;
    match tensors.first().map(|t| Path::of(t.device())) {
        None => Ok(false),
        Some(Path::Fused) => tensors
            .par_iter_mut()
            .map(|t| unscale_fused(t, factor))
            .try_reduce(|| false, |a, b| Ok(a || b)),
        Some(Path::Composed) => unscale_composed(tensors, factor),
    }
}

/// Clamps a float tensor into `[min, max]`, in place on the CPU (`torch.clamp_`); true when an
/// element was outside the bounds.
///
/// NaN elements stay NaN, as in PyTorch's `clip_grad_value_` (and do not count as clamped).
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor; [`Error::InvalidHyperParameter`] when a
/// bound is NaN or `min > max`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut g = Tensor::new(&[3f64, -0.5, -7.0], &Device::Cpu)?;
/// gradkit::core::clamp_in_place(&mut g, -1.0, 1.0)?;
/// assert_eq!(g.to_vec1::<f64>()?, [1.0, -0.5, -1.0]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn clamp_in_place(tensor: &mut Tensor, min: f64, max: f64) -> Result<bool> {
    clamp_all_in_place(std::slice::from_mut(tensor), min, max)
}

/// Subtracts from each dim-0 slice ("row": one output neuron or filter of a weight's
/// gradient) its own mean, in place on the CPU: gradient centralisation's update (Yong et al.
/// 2020). The mean is taken in f64 over the row, read and written in one pass over memory. A
/// rank-0 or rank-1 tensor is left as it is (the paper centralises weights of rank ≥ 2 only).
/// A NaN in a row makes the whole row NaN (never hidden).
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut g = Tensor::new(&[[1f32, 3.0], [2.0, 6.0]], &Device::Cpu)?;
/// gradkit::core::center_rows_in_place(&mut g)?;
/// assert_eq!(g.to_vec2::<f32>()?, [[-1.0, 1.0], [-2.0, 2.0]]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn center_rows_in_place(tensor: &mut Tensor) -> Result<()> {
    ensure_float("center_rows_in_place", "tensor", tensor.dtype())?;
    if tensor.rank() < 2 {
        return Ok(());
    }
    let path = Path::of(tensor.device());
    if path == Path::Fused && !tensor.is_contiguous() {
        // Rows are contiguous runs only in a contiguous layout.
        *tensor = tensor.contiguous()?;
    }
    update_one(tensor, &Update::CenterRows(tensor.dims()[0]), path).map(|_| ())
}

/// Multiplies each dim-0 slice ("row", a unit of a weight: one output neuron or filter) of a
/// float tensor by its own factor, in place on the CPU. A rank-0 or rank-1 tensor is one row.
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer tensor; [`Error::ShapeMismatch`] when `factors`
/// does not have one entry per row; [`Error::InvalidHyperParameter`] for a NaN factor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut g = Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &Device::Cpu)?;
/// gradkit::core::scale_rows_in_place(&mut g, &[0.5, 2.0])?;
/// assert_eq!(g.to_vec2::<f32>()?, [[0.5, 0.5], [4.0, 4.0]]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn scale_rows_in_place(tensor: &mut Tensor, factors: &[f64]) -> Result<()> {
    ensure_float("scale_rows_in_place", "tensor", tensor.dtype())?;
    let rows = unit_count(tensor);
    if factors.len() != rows {
        return Err(Error::ShapeMismatch {
            op: "scale_rows_in_place",
            arg: "factors".into(),
            expected: format!("[{rows}] (one factor per dim-0 slice)"),
            got: vec![factors.len()],
        });
    }
    for &f in factors {
        crate::validate::not_nan("factors", f)?;
    }
    let path = Path::of(tensor.device());
    update_one(tensor, &Update::ScaleRows(factors.to_vec()), path).map(|_| ())
}

/// The number of dim-0 slices of a tensor as [`scale_rows_in_place`] sees them (1 for rank 0
/// and 1).
pub fn unit_count(tensor: &Tensor) -> usize {
    if tensor.rank() <= 1 {
        1
    } else {
        tensor.dims()[0]
    }
}

/// Multiplies a float tensor by `factor` in place and reports whether the result holds any NaN
/// or infinity, in one pass: what dynamic loss scaling does to every gradient
/// (`torch._amp_foreach_non_finite_check_and_unscale_`).
///
/// # Errors
/// As [`scale_in_place`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut g = Tensor::new(&[1024f32, 2048.0], &Device::Cpu)?;
/// assert!(!gradkit::core::unscale_in_place(&mut g, 1.0 / 1024.0)?);
/// assert_eq!(g.to_vec1::<f32>()?, [1.0, 2.0]);
/// let mut bad = Tensor::new(&[f32::INFINITY], &Device::Cpu)?;
/// assert!(gradkit::core::unscale_in_place(&mut bad, 0.5)?);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn unscale_in_place(tensor: &mut Tensor, factor: f64) -> Result<bool> {
    unscale_all_in_place(std::slice::from_mut(tensor), factor)
}

fn check_unscale(tensors: &[Tensor], factor: f64) -> Result<()> {
    for t in tensors {
        ensure_float("unscale_in_place", "tensor", t.dtype())?;
        crate::ensure_same_device("unscale_in_place", tensors[0].device(), t.device())?;
    }
    crate::validate::not_nan("factor", factor)?;
    Ok(())
}

/// Whether `t`'s layout visits a storage element twice (a stride-0 dim of size above 1).
fn repeats_elements(t: &Tensor) -> bool {
    t.dims()
        .iter()
        .zip(t.stride())
        .any(|(&d, &s)| s == 0 && d > 1)
}

fn unscale_fused(tensor: &mut Tensor, factor: f64) -> Result<bool> {
    if tensor.elem_count() == 0 {
        return Ok(false);
    }
    if repeats_elements(tensor) {
        *tensor = tensor.contiguous()?;
    }
    let op = Unscale {
        factor,
        non_finite: AtomicBool::new(false),
    };
    tensor.inplace_op1(&op)?;
    Ok(op.non_finite.load(Ordering::Relaxed))
}

/// The composed unscale: new tensors from candle ops, and one read-back of a single flag (the
/// minimum over every tensor of "all finite") for the whole set.
fn unscale_composed(tensors: &mut [Tensor], factor: f64) -> Result<bool> {
    let mut all_finite = Vec::with_capacity(tensors.len());
    for t in tensors {
        *t = t.affine(factor, 0.0)?;
        if t.elem_count() > 0 {
            // `|x| < inf` is false for NaN and infinities; the minimum of 0/1 is exact in f32.
            all_finite.push(
                t.abs()?
                    .lt(f64::INFINITY)?
                    .to_dtype(DType::F32)?
                    .min_all()?,
            );
        }
    }
    if all_finite.is_empty() {
        return Ok(false);
    }
    let flags = Tensor::stack(&all_finite, 0)?.min_all()?;
    Ok(read_back_scalar(&flags)? < 1.0)
}

/// An in-place kernel, generic over the float element type.
trait InPlace {
    /// Updates the elements of `layout` in `data`.
    fn apply<T: Float>(&self, data: &mut [T], layout: &Layout);
}

/// The element-wise update an in-place op applies.
#[derive(Debug, Clone)]
enum Update {
    Scale(f64),
    /// Bounds, and whether the fused kernel changed an element.
    Clamp(f64, f64, Arc<AtomicBool>),
    ScaleRows(Vec<f64>),
    /// Subtract each of this many rows' mean (a contiguous layout).
    CenterRows(usize),
}

impl InPlace for Update {
    fn apply<T: Float>(&self, data: &mut [T], layout: &Layout) {
        match *self {
            Self::Scale(f) => for_each_mut(data, layout, move |_, x: T| scale(x, f)),
            Self::ScaleRows(ref factors) => {
                let row = (layout.shape().elem_count() / factors.len().max(1)).max(1);
                for_each_mut(data, layout, move |i, x: T| scale(x, factors[i / row]));
            }
            Self::CenterRows(rows) => {
                if let Some((start, end)) = layout.contiguous_offsets() {
                    let len = ((end - start) / rows.max(1)).max(1);
                    #[allow(clippy::cast_precision_loss, reason = "rows are far below 2^52")]
                    let n = len as f64;
                    data[start..end].par_chunks_mut(len).for_each(|row| {
                        let mean = crate::cpu::sum_by(row, |v| v) / n;
                        for x in row.iter_mut() {
                            *x = T::cast_f64(x.as_f64() - mean);
                        }
                    });
                }
            }
            Self::Clamp(lo, hi, ref changed) => {
                let (lo, hi) = (T::cast_f64(lo), T::cast_f64(hi));
                for_each_mut(data, layout, move |_, x: T| {
                    if x < lo || x > hi {
                        changed.store(true, Ordering::Relaxed);
                    }
                    if x < lo {
                        lo
                    } else if x > hi {
                        hi
                    } else {
                        x
                    }
                });
            }
        }
    }
}

#[inline(always)]
fn scale<T: Float>(x: T, factor: f64) -> T {
    if T::DTYPE == DType::F64 {
        T::cast_f64(x.as_f64() * factor)
    } else {
        // f32, f16 and bf16 scale in f32 as PyTorch does; the factor is rounded once.
        #[allow(
            clippy::cast_possible_truncation,
            reason = "f32 arithmetic is intended"
        )]
        T::from_f32(x.to_f32() * factor as f32)
    }
}

/// Applies `f(logical index, value)` to each element of `layout` in `data`, in parallel when
/// contiguous.
fn for_each_mut<T: Float>(data: &mut [T], layout: &Layout, f: impl Fn(usize, T) -> T + Sync) {
    match layout.contiguous_offsets() {
        // Small tensors (biases, norms' weights) are not worth a rayon split.
        Some((start, end)) if end - start <= INLINE_MAX => {
            for (i, x) in data[start..end].iter_mut().enumerate() {
                *x = f(i, *x);
            }
        }
        Some((start, end)) => {
            data[start..end]
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(k, chunk)| {
                    with_avx2(
                        #[inline(always)]
                        || {
                            for (j, x) in chunk.iter_mut().enumerate() {
                                *x = f(k * CHUNK + j, *x);
                            }
                        },
                    );
                })
        }
        None => {
            // candle refuses in-place ops on layouts with repeated elements, so each offset is
            // visited once.
            let n = layout.shape().elem_count();
            for (i, o) in Offsets::new(layout, 0).take(n).enumerate() {
                data[o] = f(i, data[o]);
            }
        }
    }
}

/// `x * factor` in place, noting whether any result is not finite.
#[derive(Debug)]
struct Unscale {
    factor: f64,
    non_finite: AtomicBool,
}

impl InPlace for Unscale {
    /// Scales each cached chunk and checks it before moving on: one pass over memory. The check
    /// sums `x * 0`, which is NaN exactly when some `x` is NaN or infinite, so the write loop
    /// stays branch-free.
    fn apply<T: Float>(&self, data: &mut [T], layout: &Layout) {
        let factor = self.factor;
        let bad = match layout.contiguous_offsets() {
            Some((start, end)) => data[start..end]
                .par_chunks_mut(CHUNK)
                .map(|chunk| {
                    for x in chunk.iter_mut() {
                        *x = scale(*x, factor);
                    }
                    !crate::cpu::sum_by(chunk, |v| v * 0.0).is_finite()
                })
                .reduce(|| false, |a, b| a || b),
            None => {
                let n = layout.shape().elem_count();
                let mut bad = false;
                for o in Offsets::new(layout, 0).take(n) {
                    data[o] = scale(data[o], factor);
                    bad |= !data[o].as_f64().is_finite();
                }
                bad
            }
        };
        if bad {
            self.non_finite.store(true, Ordering::Relaxed);
        }
    }
}

impl InplaceOp1 for Unscale {
    fn name(&self) -> &'static str {
        "gradkit-unscale-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        run_in_place(self, self.name(), storage, layout)
    }
}

impl InplaceOp1 for Update {
    fn name(&self) -> &'static str {
        match self {
            Self::Scale(_) => "gradkit-scale-in-place",
            Self::Clamp(..) => "gradkit-clamp-in-place",
            Self::ScaleRows(_) => "gradkit-scale-rows-in-place",
            Self::CenterRows(_) => "gradkit-center-rows-in-place",
        }
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        run_in_place(self, self.name(), storage, layout)
    }
}

/// Runs `kernel` on a float storage; other dtypes are an error (the public functions check the
/// dtype first, so this is unreachable through them).
fn run_in_place(
    kernel: &impl InPlace,
    name: &str,
    storage: &mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<()> {
    match storage {
        CpuStorage::F16(d) => kernel.apply(d, layout),
        CpuStorage::BF16(d) => kernel.apply(d, layout),
        CpuStorage::F32(d) => kernel.apply(d, layout),
        CpuStorage::F64(d) => kernel.apply(d, layout),
        other => candle_core::bail!(
            "{name}: unsupported dtype {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn updates_write_through_views_and_keep_other_elements() -> Result<()> {
        let base = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?;
        let mut view = base.narrow(1, 1, 2)?.t()?;
        scale_in_place(&mut view, 10.0)?;
        assert_eq!(
            base.to_vec2::<f32>()?,
            [[0., 10., 20., 3.], [4., 50., 60., 7.], [8., 90., 100., 11.]]
        );
        Ok(())
    }

    #[test]
    fn half_precision_rounds_once() -> Result<()> {
        let mut g = Tensor::new(&[1f32, 3.0], &Device::Cpu)?.to_dtype(DType::BF16)?;
        scale_in_place(&mut g, 1.0 / 3.0)?;
        let got = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        assert_eq!(got, [half::bf16::from_f32(1.0 / 3.0).to_f32(), 1.0]);
        Ok(())
    }

    #[test]
    fn clamp_keeps_nan_and_rejects_bad_bounds() -> Result<()> {
        let mut g = Tensor::new(&[f32::NAN, f32::INFINITY, -5.0], &Device::Cpu)?;
        clamp_in_place(&mut g, -1.0, 1.0)?;
        let v = g.to_vec1::<f32>()?;
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], [1.0, -1.0]);
        assert!(clamp_in_place(&mut g, 1.0, -1.0).is_err());
        assert!(scale_in_place(&mut g, f64::NAN).is_err());
        let mut ints = Tensor::new(&[1u32], &Device::Cpu)?;
        assert!(matches!(
            scale_in_place(&mut ints, 2.0),
            Err(Error::UnsupportedDType { .. })
        ));
        Ok(())
    }
}

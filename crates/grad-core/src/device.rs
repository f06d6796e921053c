//! The seam between gradkit's two ways of running an op, and the one door back to the host.
//!
//! Every public op that touches tensors validates its arguments once, then runs one of two
//! implementations with the same semantics (the same errors, the same state updates):
//!
//! - [`Path::Fused`]: a hand-written CPU kernel (one or two passes over memory, no temporaries).
//!   Only CPU tensors can take it.
//! - [`Path::Composed`]: candle ops on the tensors' own device. This is what CUDA and Metal
//!   tensors run; it is also the fused kernel's test oracle on the CPU.
//!
//! [`Path::of`] picks: composed off the CPU, fused on it, unless [`with_path`] (a scoped,
//! per-thread switch, for tests) or the `GRADKIT_PATH=composed` environment variable (read once,
//! for a whole process: run a CPU program the way a GPU runs it) forces the composed path.
//!
//! # What comes back to the host
//! A composed path keeps its work on the device: no full-size tensor is copied to the host and
//! no host-built tensor larger than a lookup table is uploaded. The few numbers it must read
//! back, each as one small tensor in one transfer, go through [`read_back`], which counts them
//! ([`read_back_count`]):
//!
//! - a norm or a count the caller asked for as a number (`global_norm`, a clip's total norm);
//! - a finite flag that decides whether an optimizer steps (`Clipped`, `LossScaler`);
//! - a validity flag that decides whether an input is an error (class-index targets in range);
//! - the monitor's and a probe's statistics, one small tensor per observation;
//! - at initialisation only (never per step): LSUV's variance per iteration.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Which implementation an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// The fused CPU kernel.
    Fused,
    /// candle ops on the tensors' device.
    Composed,
}

thread_local! {
    static FORCED: Cell<Option<Path>> = const { Cell::new(None) };
}

/// The process-wide choice from `GRADKIT_PATH` (`composed` forces the composed path; anything
/// else, or nothing, leaves the choice to the device).
fn from_environment() -> Option<Path> {
    static ENV: OnceLock<Option<Path>> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var("GRADKIT_PATH")
            .ok()
            .filter(|v| v.eq_ignore_ascii_case("composed"))
            .map(|_| Path::Composed)
    })
}

impl Path {
    /// The path an op on `device` takes: composed off the CPU; on the CPU fused unless
    /// [`with_path`] or `GRADKIT_PATH=composed` forces the composed path.
    ///
    /// ```
    /// use candle_core::Device;
    /// use gradkit::core::device::{Path, with_path};
    /// assert_eq!(Path::of(&Device::Cpu), Path::Fused);
    /// assert_eq!(with_path(Path::Composed, || Path::of(&Device::Cpu)), Path::Composed);
    /// ```
    pub fn of(device: &Device) -> Self {
        if !device.is_cpu() {
            return Self::Composed;
        }
        FORCED
            .get()
            .or_else(from_environment)
            .unwrap_or(Self::Fused)
    }
}

/// Runs `f` with every op called on this thread taking `path` where it can ([`Path::Fused`]
/// still means composed off the CPU). Scoped: the previous choice is restored afterwards, also
/// when `f` panics. Work an op hands to other threads was dispatched before it left, so the
/// choice holds for it too.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::device::{Path, with_path};
/// use gradkit::core::{NormType, global_norm};
/// let g = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
/// let fused = global_norm(&[g.clone()], NormType::L2)?;
/// let composed = with_path(Path::Composed, || global_norm(&[g.clone()], NormType::L2))?;
/// assert_eq!(fused, composed);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn with_path<R>(path: Path, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Path>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.set(self.0);
        }
    }
    let _restore = Restore(FORCED.replace(Some(path)));
    f()
}

/// The dtype a composed path accumulates sums in on `device`: f64, except on Metal, which has
/// no f64 (f32 there).
///
/// ```
/// assert_eq!(gradkit::core::device::wide_dtype(&candle_core::Device::Cpu), candle_core::DType::F64);
/// ```
pub fn wide_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// The dtype a composed path computes in for inputs of `dtype`: f32 for f16 and bf16 (as the
/// fused kernels, whose half-precision elements compute in f32), else `dtype` itself.
///
/// ```
/// use candle_core::DType;
/// use gradkit::core::device::compute_dtype;
/// assert_eq!(compute_dtype(DType::BF16), DType::F32);
/// assert_eq!(compute_dtype(DType::F64), DType::F64);
/// ```
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// A rank-0 tensor holding `value` in `dtype` on `device`, made on the device (no f64 tensor
/// on the way, which Metal lacks).
///
/// # Errors
/// A candle error from the device.
///
/// ```
/// use candle_core::{DType, Device};
/// let t = gradkit::core::device::scalar(0.25, DType::F32, &Device::Cpu)?;
/// assert_eq!(t.to_scalar::<f32>()?, 0.25);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn scalar(value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::ones((), dtype, device)?.affine(value, 0.0)?)
}

/// `x`, or, when it is a view with no elements that starts past its storage (a zero-size
/// tensor narrowed at a nonzero start), a fresh empty tensor of the same shape, dtype and
/// device: candle's CPU ops slice the storage at the view's offset and panic on such a view.
/// Every op that takes a tensor passes its input through this first. Any other tensor comes
/// back as is (a cheap clone, autograd intact).
///
/// # Errors
/// A candle error from the allocation.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?.narrow(1, 1, 2)?;
/// let safe = gradkit::core::device::own_empty(&empty)?;
/// assert_eq!(safe.dims(), [0, 2]);
/// assert_eq!(safe.relu()?.dims(), [0, 2]); // `empty.relu()` panics inside candle
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn own_empty(x: &Tensor) -> Result<Tensor> {
    if x.elem_count() == 0 && x.layout().start_offset() > 0 {
        return Ok(Tensor::zeros(x.shape(), x.dtype(), x.device())?);
    }
    Ok(x.clone())
}

thread_local! {
    static READ_BACKS: Cell<u64> = const { Cell::new(0) };
}

/// Copies a small tensor's values to the host as f64: the one place a composed path reads
/// device memory, counted by [`read_back_count`] (the list of what may come back is in the
/// module docs). Any shape; the values in row-major order.
///
/// # Errors
/// A candle error from the transfer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let before = gradkit::core::device::read_back_count();
/// let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// assert_eq!(gradkit::core::device::read_back(&t)?, [1.0, 2.0]);
/// assert_eq!(gradkit::core::device::read_back_count(), before + 1);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn read_back(t: &Tensor) -> Result<Vec<f64>> {
    READ_BACKS.set(READ_BACKS.get() + 1);
    // Moved first, converted on the host: Metal has no f64.
    let host = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(host.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// [`read_back`] of a one-element tensor.
///
/// # Errors
/// A candle error from the transfer, or [`Error::ShapeMismatch`](crate::Error::ShapeMismatch)
/// when `t` does not hold exactly one element.
pub fn read_back_scalar(t: &Tensor) -> Result<f64> {
    if t.elem_count() != 1 {
        return Err(crate::Error::shape_mismatch(
            "read_back_scalar",
            "tensor",
            "one element",
            t.dims(),
        ));
    }
    Ok(read_back(t)?[0])
}

/// How many times [`read_back`] ran on this thread: what a user counts around a training step
/// to see how often gradkit synchronised with the device (composed paths read back on the
/// calling thread).
pub fn read_back_count() -> u64 {
    READ_BACKS.get()
}

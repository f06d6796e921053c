//! The fused CPU kernel behind the dropout family.
//!
//! Each element (or each channel plane, for channel dropout) is kept when its word of the
//! mask stream ([`grad_core::mask`]) is below `threshold`. Kept elements become
//! `x * keep_scale + keep_shift`, dropped ones `x * 0 + drop_value` (standard dropout: `x / (1 - p)`
//! and 0; alpha dropout: an affine map and a constant), so a NaN or infinite input stays NaN as
//! in PyTorch. Nothing is stored for the backward: it regenerates the same words from the same
//! `(seed, offset)` and writes `grad * keep_scale` where kept, `grad * 0` elsewhere. Forward and
//! backward each read one tensor and write one.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use grad_core::PhiloxState;
use grad_core::cpu::{CHUNK, UninitVec, cpu_slice};
use grad_core::cpu::{Float, FloatFn, Real, dispatch_op, dtype_of, with_avx2};
use grad_core::mask::MaskStream;
use rayon::prelude::*;

/// The element-wise map of a dropout forward (or, with shift and drop value 0, its backward).
#[derive(Debug, Clone)]
pub(crate) struct DropoutOp {
    /// Where the words of this call start.
    pub state: PhiloxState,
    /// The mask stream's tables at `state` (shared by the forward and its backward).
    pub stream: Arc<MaskStream>,
    /// Keep when `word < threshold` (a `u64` so that keep-probability 1 keeps everything).
    pub threshold: u64,
    /// Elements per random word: 1 for element dropout, the plane size for channel dropout.
    pub plane: usize,
    pub keep_scale: f64,
    pub keep_shift: f64,
    pub drop_value: f64,
}

impl DropoutOp {
    /// The same mask applied to an upstream gradient.
    pub(crate) fn gradient(&self) -> Self {
        Self {
            keep_shift: 0.0,
            drop_value: 0.0,
            ..self.clone()
        }
    }

    fn apply<T: Float>(&self, x: &[T]) -> Vec<T> {
        let mut out = UninitVec::new(x.len());
        let (ka, kb, kd) = (
            T::Acc::of(self.keep_scale),
            T::Acc::of(self.keep_shift),
            T::Acc::of(self.drop_value),
        );
        let zero = T::Acc::of(0.0);
        // Work items hold whole planes so each needs one contiguous run of words.
        let planes_per_task = (CHUNK / self.plane).max(1);
        let task = planes_per_task * self.plane;
        out.as_uninit_mut()
            .par_chunks_mut(task)
            .zip(x.par_chunks(task))
            .enumerate()
            .for_each_init(Vec::new, |words, (t, (o, xs))| {
                let planes = xs.len().div_ceil(self.plane);
                words.resize(planes, 0);
                let first = self.state.advanced((t * planes_per_task) as u64).offset;
                self.stream.fill(first, words);
                // Constants copied into locals: captured by reference they would be reloaded
                // every element (the compiler cannot rule out aliasing with the output).
                let (threshold, plane) = (self.threshold, self.plane);
                with_avx2(
                    #[inline(always)]
                    move || {
                        // Dropped values are `x * 0 + drop_value`, as PyTorch's `x * mask`:
                        // a NaN or infinite input stays visible (NaN) instead of becoming 0.
                        if plane == 1 {
                            for ((o, x), w) in o.iter_mut().zip(xs).zip(words.iter()) {
                                let keep = u64::from(*w) < threshold;
                                let (a, b) = if keep { (ka, kb) } else { (zero, kd) };
                                o.write(T::from_acc(x.to_acc() * a + b));
                            }
                        } else {
                            for ((o, xs), w) in
                                o.chunks_mut(plane).zip(xs.chunks(plane)).zip(words.iter())
                            {
                                let keep = u64::from(*w) < threshold;
                                let (a, b) = if keep { (ka, kb) } else { (zero, kd) };
                                for (o, x) in o.iter_mut().zip(xs) {
                                    o.write(T::from_acc(x.to_acc() * a + b));
                                }
                            }
                        }
                    },
                );
            });
        #[allow(unsafe_code, reason = "skipping the zero fill of a fresh output")]
        // SAFETY: output and input chunks have equal lengths, and every branch writes each slot
        // of its chunk (element-wise, or whole planes that tile the chunk).
        unsafe {
            out.assume_init()
        }
    }
}

struct Apply<'a> {
    op: &'a DropoutOp,
    x: (&'a CpuStorage, &'a Layout),
}

impl FloatFn for Apply<'_> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        Ok(T::to_cpu_storage_owned(self.op.apply(x)))
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "gradkit-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dtype = dtype_of(storage);
        let out = dispatch_op(
            self.name(),
            dtype,
            Apply {
                op: self,
                x: (storage, layout),
            },
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.gradient())?))
    }
}

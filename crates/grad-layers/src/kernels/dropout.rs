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

use grad_core::PhiloxState;
use grad_core::cpu::{CHUNK, Float, Grad, Kernel, Real, fill_with, with_avx2};
use grad_core::mask::MaskStream;

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

    /// The words of elements `start .. start + len` into `out`, one per element (a plane's word
    /// repeated over its elements); `units` is scratch for the planes' words.
    pub(crate) fn element_words(
        &self,
        start: usize,
        len: usize,
        out: &mut Vec<u32>,
        units: &mut Vec<u32>,
    ) {
        out.clear();
        let plane = self.plane;
        if plane == 1 {
            out.resize(len, 0);
            self.stream
                .fill(self.state.advanced(start as u64).offset, out);
            return;
        }
        let (first, end) = (start / plane, (start + len).div_ceil(plane));
        units.resize(end - first, 0);
        self.stream
            .fill(self.state.advanced(first as u64).offset, units);
        for (i, &word) in units.iter().enumerate() {
            let from = (first + i) * plane;
            let span = (from + plane).min(start + len) - from.max(start);
            out.extend(std::iter::repeat_n(word, span));
        }
    }

    fn apply<T: Float>(&self, x: &[T]) -> Vec<T> {
        let (ka, kb, kd) = (
            T::Acc::of(self.keep_scale),
            T::Acc::of(self.keep_shift),
            T::Acc::of(self.drop_value),
        );
        let zero = T::Acc::of(0.0);
        // Work items hold whole planes so each needs one contiguous run of words.
        let planes_per_task = (CHUNK / self.plane).max(1);
        let task = planes_per_task * self.plane;
        let (y, _) = fill_with(x.len(), task, Vec::new, |words, t, out| {
            let xs = &x[t * task..t * task + out.len()];
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
                    let coefficients = |w: &u32| {
                        if u64::from(*w) < threshold {
                            (ka, kb)
                        } else {
                            (zero, kd)
                        }
                    };
                    if plane == 1 {
                        out.extend(xs.iter().zip(words.iter()).map(|(x, w)| {
                            let (a, b) = coefficients(w);
                            T::from_acc(x.to_acc() * a + b)
                        }));
                    } else {
                        for (xs, w) in xs.chunks(plane).zip(words.iter()) {
                            let (a, b) = coefficients(w);
                            out.extend(xs.iter().map(|x| T::from_acc(x.to_acc() * a + b)));
                        }
                    }
                },
            );
        });
        y
    }
}

impl Kernel<1> for DropoutOp {
    fn name(&self) -> &'static str {
        "gradkit-dropout"
    }

    fn forward<T: Float>(&self, [x]: [&[T]; 1]) -> grad_core::Result<Vec<T>> {
        Ok(self.apply(x))
    }

    fn backward<T: Float>(&self, _: [&[T]; 1], g: &[T]) -> grad_core::Result<[Option<Grad<T>>; 1]> {
        Ok([Some(Grad::Elem(self.gradient().apply(g)))])
    }
}

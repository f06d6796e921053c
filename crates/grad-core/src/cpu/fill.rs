//! Fresh kernel outputs, written once and never zeroed first, without `unsafe` in the kernel.
//!
//! `vec![0.0; n]` costs a full extra write pass whenever the allocator recycles memory (calloc
//! must clear it), about 3 ms for 25 MB here, as much as the kernel that then overwrites it.
//! [`fill`] hands a kernel its output chunk by chunk as [`Slots`]: slots it can only write front
//! to back ([`Slots::push`], [`Slots::extend`]) and read back once written
//! ([`Slots::filled_mut`]). After each chunk, `fill` checks that every slot was written, so the
//! finished vector never holds an uninitialised element; the one `unsafe` block that turns the
//! slots into a `Vec` lives here, behind that check.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cpu::{CHUNK, Float, INLINE_MAX, with_avx2};

/// One chunk of a fresh output: `len` slots, written front to back.
///
/// ```
/// let (v, sums) = gradkit::core::cpu::fill(5, 2, |chunk, out| {
///     out.extend((0..out.len()).map(|i| (2 * chunk + i) as f32));
///     out.filled_mut().iter().sum::<f32>()
/// });
/// assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 4.0]);
/// assert_eq!(sums, [1.0, 5.0, 4.0]);
/// ```
#[derive(Debug)]
pub struct Slots<'a, T> {
    slots: &'a mut [MaybeUninit<T>],
    written: usize,
}

impl<T> Slots<'_, T> {
    /// The chunk's length.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the chunk has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// How many slots are written so far (the next one written is this index).
    pub fn written(&self) -> usize {
        self.written
    }

    /// Writes the next slot.
    ///
    /// # Panics
    /// When every slot is already written (a kernel bug, like an index out of bounds).
    #[inline(always)]
    pub fn push(&mut self, value: T) {
        self.slots[self.written].write(value);
        self.written += 1;
    }

    /// Writes the next slots from `values`, until the chunk is full or `values` runs out.
    ///
    /// Give it a zip of slices mapped through the element's formula: the loop vectorises.
    #[inline(always)]
    pub fn extend(&mut self, values: impl IntoIterator<Item = T>) {
        let mut n = 0;
        for (slot, v) in self.slots[self.written..].iter_mut().zip(values) {
            slot.write(v);
            n += 1;
        }
        self.written += n;
    }

    /// The slots written so far, to read or adjust in place.
    pub fn filled_mut(&mut self) -> &mut [T] {
        let written = &mut self.slots[..self.written];
        #[allow(unsafe_code, reason = "reading back the slots this chunk wrote")]
        // SAFETY: `written` only grows by one per slot written (`push`, `extend`), so the first
        // `written` slots are initialised; `MaybeUninit<T>` has `T`'s layout.
        unsafe {
            &mut *(std::ptr::from_mut::<[MaybeUninit<T>]>(written) as *mut [T])
        }
    }
}

/// [`Slots::extend`] as the standard trait, so one routine can write a kernel's output or a
/// scratch `Vec`.
///
/// ```
/// let (v, _) = gradkit::core::cpu::fill(3, 3, |_, out| Extend::extend(out, [1u8, 2, 3]));
/// assert_eq!(v, [1, 2, 3]);
/// ```
impl<T> Extend<T> for Slots<'_, T> {
    #[inline(always)]
    fn extend<I: IntoIterator<Item = T>>(&mut self, values: I) {
        Slots::extend(self, values);
    }
}

/// A vector of `len` elements written by `f`, one call per `chunk`-element piece (the last may
/// be shorter), in parallel when `len` exceeds [`INLINE_MAX`]; also what each call returned, in
/// chunk order. `f` gets the chunk's index and its [`Slots`].
///
/// The chunking is fixed by `len` and `chunk`, never by the thread count, so neither is the
/// result. A `chunk` of 0 counts as 1.
///
/// # Panics
/// When `f` leaves a slot of its chunk unwritten: a kernel bug, caught before the output is
/// read.
///
/// ```
/// // Chunks of 3: the calls get chunks 0 (3 slots) and 1 (1 slot).
/// let (v, lens) = gradkit::core::cpu::fill(4, 3, |chunk, out| {
///     out.push(10 * chunk as u32);
///     let rest = out.len() - out.written();
///     out.extend(std::iter::repeat_n(7, rest));
///     out.len()
/// });
/// assert_eq!(v, [0, 7, 7, 10]);
/// assert_eq!(lens, [3, 1]);
/// ```
pub fn fill<T, R, F>(len: usize, chunk: usize, f: F) -> (Vec<T>, Vec<R>)
where
    T: Send,
    R: Send,
    F: Fn(usize, &mut Slots<'_, T>) -> R + Sync,
{
    fill_with(len, chunk, || (), |(), i, out| f(i, out))
}

/// [`fill`] with a per-thread state made by `init` (a scratch buffer) handed to each call.
///
/// # Panics
/// As [`fill`].
///
/// ```
/// let (v, _) = gradkit::core::cpu::fill_with(6, 4, Vec::new, |scratch: &mut Vec<f64>, _, out| {
///     scratch.clear();
///     scratch.extend((0..out.len()).map(|i| i as f64));
///     out.extend(scratch.iter().map(|v| v * 0.5));
/// });
/// assert_eq!(v, [0.0, 0.5, 1.0, 1.5, 0.0, 0.5]);
/// ```
pub fn fill_with<T, R, S, I, F>(len: usize, chunk: usize, init: I, f: F) -> (Vec<T>, Vec<R>)
where
    T: Send,
    R: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut Slots<'_, T>) -> R + Sync + Send,
{
    let chunk = chunk.max(1);
    let mut out = Vec::with_capacity(len);
    advise_huge_pages(&mut out);
    let run = |state: &mut S, (i, slots): (usize, &mut [MaybeUninit<T>])| {
        let mut slots = Slots { slots, written: 0 };
        let r = f(state, i, &mut slots);
        assert_eq!(
            slots.written,
            slots.len(),
            "a kernel left slots of chunk {i} unwritten"
        );
        r
    };
    let slots = &mut out.spare_capacity_mut()[..len];
    let results = if len <= INLINE_MAX {
        let mut state = init();
        slots
            .chunks_mut(chunk)
            .enumerate()
            .map(|item| run(&mut state, item))
            .collect()
    } else {
        slots
            .par_chunks_mut(chunk)
            .enumerate()
            .map_init(init, run)
            .collect()
    };
    #[allow(unsafe_code, reason = "every slot was checked written")]
    // SAFETY: the capacity is `len`; the chunks tile `0..len` and `run` asserted that each one
    // was written in full before returning, so no call returned with a slot uninitialised.
    unsafe {
        out.set_len(len);
    }
    (out, results)
}

/// `out[i] = f(a[i])` into a fresh vector, in parallel, in the element type's arithmetic type.
///
/// `f` runs inside [`with_avx2`]; give it `#[inline(always)]` helpers so it vectorises.
///
/// ```
/// let y: Vec<f32> = gradkit::core::cpu::par_map(&[1.0f32, -2.0], |v| v * 3.0);
/// assert_eq!(y, [3.0, -6.0]);
/// ```
#[inline(always)]
pub fn par_map<T: Float>(a: &[T], f: impl Fn(T::Acc) -> T::Acc + Sync + Copy + Send) -> Vec<T> {
    fill(a.len(), CHUNK, |k, out| {
        let a = &a[k * CHUNK..k * CHUNK + out.len()];
        with_avx2(
            #[inline(always)]
            || {
                // A local copy: what `f` captures stays in registers instead of being reloaded
                // through a reference every element.
                let op = f;
                out.extend(a.iter().map(|v| T::from_acc(op(v.to_acc()))));
            },
        );
    })
    .0
}

/// `out[i] = f(a[i], b[i])` into a fresh vector, in parallel, like [`par_map`].
///
/// # Panics
/// When `a` and `b` differ in length (callers pass equal shapes).
///
/// ```
/// let y: Vec<f64> = gradkit::core::cpu::par_zip_map(&[1.0, 2.0], &[3.0, 4.0], |a, b| a * b);
/// assert_eq!(y, [3.0, 8.0]);
/// ```
#[inline(always)]
pub fn par_zip_map<T: Float>(
    a: &[T],
    b: &[T],
    f: impl Fn(T::Acc, T::Acc) -> T::Acc + Sync + Copy + Send,
) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "par_zip_map needs equal lengths");
    fill(a.len(), CHUNK, |k, out| {
        let span = k * CHUNK..k * CHUNK + out.len();
        let (a, b) = (&a[span.clone()], &b[span]);
        with_avx2(
            #[inline(always)]
            || {
                let op = f;
                out.extend(
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| T::from_acc(op(a.to_acc(), b.to_acc()))),
                );
            },
        );
    })
    .0
}

/// Asks the kernel to back the 2 MiB-aligned interior of `vec`'s buffer with huge pages.
///
/// The allocator maps buffers of 4 MiB or more fresh from the kernel, and faulting them in
/// 4 KiB pages costs more than the kernel that fills them (about 2.5x the write time of a
/// 64 MiB output here).
#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(vec: &mut Vec<T>) {
    const HUGE: usize = 2 << 20;
    let bytes = vec.capacity() * size_of::<T>();
    if bytes < 2 * HUGE {
        return;
    }
    let start = (vec.as_mut_ptr() as usize).next_multiple_of(HUGE);
    let end = (vec.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
    if end > start {
        #[allow(
            unsafe_code,
            reason = "an advisory system call on memory this vector owns"
        )]
        // SAFETY: `[start, end)` lies inside the vector's allocation (rounded inwards to 2 MiB
        // boundaries); MADV_HUGEPAGE only changes how the kernel backs the pages, never their
        // contents, and its failure (THP disabled) is harmless, so the result is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_vec: &mut Vec<T>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_output_serial_and_parallel() {
        for len in [0, 1, 7, INLINE_MAX, INLINE_MAX + 3] {
            let (v, starts) = fill(len, 1000, |k, out| {
                out.extend((0..out.len()).map(|i| (k * 1000 + i) as u64));
                k * 1000
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
            assert_eq!(starts.len(), len.div_ceil(1000));
        }
    }

    #[test]
    fn filled_slots_can_be_adjusted() {
        let (v, _) = fill(3, 3, |_, out| {
            out.push(1.0);
            out.extend([2.0, 3.0, 99.0]);
            out.filled_mut()[0] = -1.0;
        });
        assert_eq!(v, [-1.0, 2.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "unwritten")]
    fn a_short_chunk_is_caught() {
        let _ = fill(4, 2, |k, out: &mut Slots<'_, f32>| {
            if k == 0 {
                out.extend([1.0, 2.0]);
            }
        });
    }

    #[test]
    fn zero_chunk_counts_as_one() {
        let (v, r) = fill(2, 0, |k, out| out.push(k));
        assert_eq!((v, r.len()), (vec![0, 1], 2));
    }
}

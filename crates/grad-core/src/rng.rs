//! A seeded, counter-based random number generator: Philox 4x32-10.
//!
//! Philox (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
//! maps a 128-bit counter and a 64-bit key through ten rounds of multiply-and-xor to four random
//! 32-bit words. Word `i` of the stream depends only on `(seed, i)`, so any range of the stream
//! can be generated independently: a bulk fill splits its output across threads and still
//! produces exactly the words a sequential generator would, whatever the thread count. This is
//! the generator PyTorch (CUDA) and JAX use for dropout; candle's CPU generator cannot be seeded
//! at all (candle issue #2651).
//!
//! # The stream
//! With key `(seed mod 2^32, seed >> 32)`, block `j` is Philox 4x32-10 of the counter
//! `(j mod 2^32, j >> 32, 0, 0)`, and the stream is the blocks' words in order. A [`PhiloxState`]
//! `(seed, offset)` points at word `offset`; every draw advances it by the words it used:
//!
//! | draw | words per element |
//! | --- | --- |
//! | `u32`, f32/f16/bf16 uniform, Bernoulli | 1 |
//! | `u64`, f64 uniform | 2 |
//! | f32/f16/bf16 normal | 1 (Box–Muller on pairs; an odd count rounds up to even) |
//! | f64 normal | 2 (likewise) |
//!
//! Saving the state and restoring it later continues the same stream. Dropout masks come from a
//! sibling stream built on this one, [`mask`](crate::mask), which candle ops can also compute on
//! a GPU; a [`PhiloxState`] names a position in either.

use candle_core::{DType, Device, Shape, Tensor};
use half::{bf16, f16};
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::cpu::CHUNK;
use crate::cpu::with_avx2;
use crate::validate::ensure_float;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Blocks computed together so that the compiler vectorises the rounds across them.
const LANES: usize = 16;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    #[allow(clippy::cast_possible_truncation, reason = "taking the low word")]
    ((p >> 32) as u32, p as u32)
}

/// Philox 4x32-10 of one 128-bit counter under a 64-bit key.
///
/// ```
/// // Known-answer test from the Random123 distribution (kat_vectors).
/// let out = gradkit::core::rng::philox4x32_10([0; 4], [0; 2]);
/// assert_eq!(out, [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
/// ```
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// [`LANES`] consecutive blocks starting at block `first`, as `out[word][lane]`.
///
/// The 32-bit state words live in 64-bit lanes (upper half zero) so that each 32x32 -> 64 product
/// is one `pmuludq` lane with no shuffling; with AVX2 that runs at about 0.7 G words/s per core.
#[inline(always)]
fn philox_lanes(first: u64, key: [u32; 2]) -> [[u64; LANES]; 4] {
    const MASK: u64 = 0xffff_ffff;
    let mut c0 = [0u64; LANES];
    let mut c1 = [0u64; LANES];
    let mut c2 = [0u64; LANES];
    let mut c3 = [0u64; LANES];
    for l in 0..LANES {
        let j = first.wrapping_add(l as u64);
        c0[l] = j & MASK;
        c1[l] = j >> 32;
    }
    let (mut k0, mut k1) = (u64::from(key[0]), u64::from(key[1]));
    for round in 0..10 {
        if round > 0 {
            k0 = (k0 + u64::from(W0)) & MASK;
            k1 = (k1 + u64::from(W1)) & MASK;
        }
        for l in 0..LANES {
            let p0 = u64::from(M0) * (c0[l] & MASK);
            let p1 = u64::from(M1) * (c2[l] & MASK);
            let n0 = (p1 >> 32) ^ c1[l] ^ k0;
            let n2 = (p0 >> 32) ^ c3[l] ^ k1;
            c1[l] = p1 & MASK;
            c3[l] = p0 & MASK;
            c0[l] = n0;
            c2[l] = n2;
        }
    }
    [c0, c1, c2, c3]
}

/// A position in a Philox stream: the seed (key) and the index of the next 32-bit word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct PhiloxState {
    /// The seed, used as the 64-bit Philox key.
    pub seed: u64,
    /// The index of the next word of the stream.
    pub offset: u64,
}

impl PhiloxState {
    /// The start of the stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    fn key(self) -> [u32; 2] {
        #[allow(clippy::cast_possible_truncation, reason = "splitting into words")]
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// Writes the stream's words `offset .. offset + out.len()` into `out`, in parallel, without
    /// moving the state. The result does not depend on the number of threads.
    ///
    /// ```
    /// use gradkit::core::rng::PhiloxState;
    /// let s = PhiloxState { seed: 7, offset: 3 };
    /// let mut all = vec![0; 10];
    /// PhiloxState::new(7).fill_u32(&mut all);
    /// let mut tail = vec![0; 7];
    /// s.fill_u32(&mut tail);
    /// assert_eq!(tail, all[3..]);
    /// ```
    pub fn fill_u32(self, out: &mut [u32]) {
        let key = self.key();
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(k, chunk)| {
                with_avx2(
                    #[inline(always)]
                    || fill_words(key, self.offset + (k * CHUNK) as u64, chunk),
                );
            });
    }

    /// As [`fill_u32`](Self::fill_u32) on the calling thread only: for kernels that already
    /// run one chunk per rayon task.
    pub fn fill_u32_serial(self, out: &mut [u32]) {
        with_avx2(
            #[inline(always)]
            || fill_words(self.key(), self.offset, out),
        );
    }

    /// The state `n` words further on.
    pub fn advanced(self, n: u64) -> Self {
        Self {
            seed: self.seed,
            offset: self.offset.wrapping_add(n),
        }
    }
}

/// Writes words `first .. first + out.len()` of the stream for `key`, sequentially.
#[inline(always)]
fn fill_words(key: [u32; 2], first: u64, out: &mut [u32]) {
    let mut block = first / 4;
    let mut skip = (first % 4) as usize;
    let mut pos = 0;
    while pos < out.len() {
        let words = group_words(block, key);
        let n = (words.len() - skip).min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&words[skip..skip + n]);
        pos += n;
        skip = 0;
        block += LANES as u64;
    }
}

/// The words of `LANES` consecutive blocks from `first`, in stream order.
#[inline(always)]
fn group_words(first: u64, key: [u32; 2]) -> [u32; 4 * LANES] {
    let lanes = philox_lanes(first, key);
    let mut words = [0u32; 4 * LANES];
    for l in 0..LANES {
        for w in 0..4 {
            #[allow(clippy::cast_possible_truncation, reason = "lanes hold 32-bit values")]
            {
                words[l * 4 + w] = lanes[w][l] as u32;
            }
        }
    }
    words
}

/// The Philox 4x32-10 generator: [`RngCore`] for the rand ecosystem plus fast parallel fills.
///
/// ```
/// use candle_core::{DType, Device};
/// use gradkit::core::Philox;
/// let mut a = Philox::new(42);
/// let x = a.normal((2, 3), 0.0, 1.0, DType::F32, &Device::Cpu)?;
/// let mut b = Philox::new(42);
/// let y = b.normal((2, 3), 0.0, 1.0, DType::F32, &Device::Cpu)?;
/// assert_eq!(x.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
/// assert_eq!(a.state().offset, 6);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Philox {
    state: PhiloxState,
}

impl Philox {
    /// A generator at the start of the stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self::from_state(PhiloxState::new(seed))
    }

    /// A generator at a saved position.
    pub fn from_state(state: PhiloxState) -> Self {
        Self { state }
    }

    /// The current position (save it to resume the stream later).
    pub fn state(&self) -> PhiloxState {
        self.state
    }

    /// Moves to a saved position.
    pub fn set_state(&mut self, state: PhiloxState) {
        self.state = state;
    }

    /// Returns the current position and moves `n` words past it: the words a caller then
    /// generates itself (a fused kernel regenerating a mask, say).
    pub fn reserve(&mut self, n: u64) -> PhiloxState {
        let at = self.state;
        self.state = at.advanced(n);
        at
    }

    /// The next `out.len()` words, in parallel.
    pub fn fill_u32(&mut self, out: &mut [u32]) {
        self.reserve(out.len() as u64).fill_u32(out);
    }

    /// A tensor of samples from `U[lo, hi)`.
    ///
    /// f32, f16 and bf16 use 24 random bits per element (one word) computed in f32; f64 uses 53
    /// bits (two words). Every sample is a value of `dtype` in `[lo, hi)`: one that would round
    /// up to `hi` (or below `lo`) in the output dtype is moved to the nearest value inside.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`](crate::Error::InvalidHyperParameter) unless `lo < hi`
    /// are finite, within `dtype`'s finite range, `hi - lo` is finite, and `dtype` has a value
    /// in `[lo, hi)`; [`Error::UnsupportedDType`](crate::Error::UnsupportedDType) for a
    /// non-float dtype.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let mut rng = gradkit::core::Philox::new(0);
    /// let u = rng.uniform(1000, -2.0, 2.0, DType::F64, &Device::Cpu)?;
    /// let v = u.to_vec1::<f64>()?;
    /// assert!(v.iter().all(|x| (-2.0..2.0).contains(x)));
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn uniform(
        &mut self,
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        ensure_float("uniform", "dtype", dtype)?;
        crate::validate::finite_ordered(("lo", lo), ("hi", hi))?;
        let (first, last) = sample_bounds(lo, hi, dtype)?;
        let n = shape.elem_count();
        if dtype == DType::F64 {
            let at = self.reserve(2 * n as u64);
            let data = par_generate(n, 2, at, |w| {
                (lo + (hi - lo) * unit_f64(w[0], w[1])).clamp(first, last)
            });
            return Ok(Tensor::from_vec(data, shape, device)?);
        }
        let at = self.reserve(n as u64);
        // `first` and `last` are values of `dtype`, so exact in f32, and rounding to f16/bf16
        // is monotonic: the clamped samples stay inside after conversion.
        #[allow(clippy::cast_possible_truncation, reason = "f32 sampling is intended")]
        let (lo32, span32, first32, last32) =
            (lo as f32, (hi - lo) as f32, first as f32, last as f32);
        let data = par_generate(n, 1, at, |w| {
            (lo32 + span32 * unit_f32(w[0])).clamp(first32, last32)
        });
        f32_tensor(data, shape, dtype, device)
    }

    /// A tensor of samples from `N(mean, std^2)` (Box–Muller, as PyTorch's CPU `normal_`).
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`](crate::Error::InvalidHyperParameter) unless `mean` is finite and `std >= 0` finite,
    /// both within `dtype`'s finite range;
    /// [`Error::UnsupportedDType`](crate::Error::UnsupportedDType) for a non-float dtype.
    pub fn normal(
        &mut self,
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        ensure_float("normal", "dtype", dtype)?;
        crate::validate::non_negative("std", std)?;
        crate::validate::finite("mean", mean)?;
        let (max, range) = finite_range(dtype);
        if mean.abs() > max {
            return Err(crate::validate::invalid("mean", mean, range));
        }
        if std > max {
            return Err(crate::validate::invalid("std", std, range));
        }
        let n = shape.elem_count();
        let pairs = n.div_ceil(2);
        if dtype == DType::F64 {
            let at = self.reserve(4 * pairs as u64);
            let mut data = par_generate_pairs(pairs, 4, at, |w| {
                box_muller(unit_f64(w[0], w[1]), unit_f64(w[2], w[3]))
            });
            data.truncate(n);
            data.iter_mut().for_each(|z| *z = mean + std * *z);
            return Ok(Tensor::from_vec(data, shape, device)?);
        }
        let at = self.reserve(2 * pairs as u64);
        #[allow(clippy::cast_possible_truncation, reason = "f32 sampling is intended")]
        let mut data = par_generate_pairs(pairs, 2, at, |w| {
            let (a, b) = box_muller(f64::from(unit_f32(w[0])), f64::from(unit_f32(w[1])));
            (a as f32, b as f32)
        });
        data.truncate(n);
        #[allow(clippy::cast_possible_truncation, reason = "f32 sampling is intended")]
        let (mean32, std32) = (mean as f32, std as f32);
        data.iter_mut().for_each(|z| *z = mean32 + std32 * *z);
        f32_tensor(data, shape, dtype, device)
    }

    /// A tensor of independent Bernoulli(`p`) samples, 1 with probability `p`, else 0.
    ///
    /// Each element compares one 32-bit word with `p * 2^32`, so `p = 0` and `p = 1` are exact.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`](crate::Error::InvalidHyperParameter) for `p` outside `[0, 1]`; [`Error::UnsupportedDType`](crate::Error::UnsupportedDType)
    /// for a non-float dtype.
    pub fn bernoulli(
        &mut self,
        shape: impl Into<Shape>,
        p: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        ensure_float("bernoulli", "dtype", dtype)?;
        let threshold = bernoulli_threshold(p)?;
        let n = shape.elem_count();
        let at = self.reserve(n as u64);
        let data = par_generate(n, 1, at, |w| {
            if u64::from(w[0]) < threshold {
                1f32
            } else {
                0f32
            }
        });
        f32_tensor(data, shape, dtype, device)
    }

    /// `n` Bernoulli(`p`) samples packed one bit per element (bit `i % 64` of word `i / 64`),
    /// the compact mask a dropout backward can keep. Uses the same words as
    /// [`bernoulli`](Self::bernoulli): element `i` is set exactly when `bernoulli` gives 1.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`](crate::Error::InvalidHyperParameter) for `p` outside `[0, 1]`.
    ///
    /// ```
    /// let mut rng = gradkit::core::Philox::new(3);
    /// let mask = rng.bernoulli_bits(100, 1.0)?;
    /// assert_eq!(mask.len(), 2);
    /// assert_eq!(mask[0], u64::MAX);
    /// assert_eq!(mask[1], (1u64 << 36) - 1);
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn bernoulli_bits(&mut self, n: usize, p: f64) -> Result<Vec<u64>> {
        let threshold = bernoulli_threshold(p)?;
        let at = self.reserve(n as u64);
        let mut bits = vec![0u64; n.div_ceil(64)];
        // 512 words of bits per work item: CHUNK elements.
        bits.par_chunks_mut(CHUNK / 64)
            .enumerate()
            .for_each_init(Vec::new, |words, (k, out)| {
                let first = k * CHUNK;
                let len = CHUNK.min(n - first);
                words.resize(len, 0);
                at.advanced(first as u64).fill_u32(words);
                for (b, word_bits) in out.iter_mut().enumerate() {
                    let lo = b * 64;
                    let hi = (lo + 64).min(len);
                    *word_bits = words[lo..hi].iter().enumerate().fold(0, |acc, (i, &w)| {
                        acc | (u64::from(u64::from(w) < threshold) << i)
                    });
                }
            });
        Ok(bits)
    }
}

/// A seed from a name (a layer's `VarBuilder` prefix): 64-bit FNV-1a of its bytes, the same on
/// every platform and run. Layers that draw random numbers without a given seed take theirs
/// from their name, so two layers differ and a rebuilt model draws the same numbers.
///
/// ```
/// use gradkit::core::rng::seed_of_name;
/// assert_eq!(seed_of_name("drop1"), seed_of_name("drop1"));
/// assert_ne!(seed_of_name("drop1"), seed_of_name("drop2"));
/// ```
pub fn seed_of_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `p * 2^32` rounded, as a `u64` so that `p = 1` passes every word.
///
/// # Errors
/// [`Error::InvalidHyperParameter`](crate::Error::InvalidHyperParameter) for `p` outside `[0, 1]` or NaN.
pub fn bernoulli_threshold(p: f64) -> Result<u64> {
    crate::validate::unit_interval("p", p)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "p in [0, 1], so the product is in [0, 2^32]"
    )]
    Ok((p * 4_294_967_296.0).round() as u64)
}

/// A uniform `f32` in `[0, 1)` from the top 24 bits of a word.
#[inline(always)]
pub fn unit_f32(w: u32) -> f32 {
    #[allow(clippy::cast_precision_loss, reason = "24 bits are exact in f32")]
    let v = (w >> 8) as f32;
    v * (1.0 / 16_777_216.0)
}

/// A uniform `f64` in `[0, 1)` from 53 bits of two words.
#[inline(always)]
pub fn unit_f64(w0: u32, w1: u32) -> f64 {
    let bits = ((u64::from(w0) << 32) | u64::from(w1)) >> 11;
    #[allow(clippy::cast_precision_loss, reason = "53 bits are exact in f64")]
    let v = bits as f64;
    v * (1.0 / 9_007_199_254_740_992.0)
}

/// Two independent standard normals from two uniforms in `[0, 1)`.
#[inline(always)]
fn box_muller(u1: f64, u2: f64) -> (f64, f64) {
    // 1 - u1 lies in (0, 1], so the log is finite.
    let r = (-2.0 * (1.0 - u1).ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// `n` values, value `i` made from words `at + i * per .. at + (i + 1) * per`, in parallel.
fn par_generate<T: Send + Copy + Default>(
    n: usize,
    per: usize,
    at: PhiloxState,
    f: impl Fn(&[u32]) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each_init(Vec::new, |words, (k, chunk)| {
            words.resize(chunk.len() * per, 0);
            at.advanced((k * CHUNK * per) as u64).fill_u32(words);
            for (x, w) in chunk.iter_mut().zip(words.chunks_exact(per)) {
                *x = f(w);
            }
        });
    out
}

/// Like [`par_generate`] for a function producing two values per `per` words.
fn par_generate_pairs<T: Send + Copy + Default>(
    pairs: usize,
    per: usize,
    at: PhiloxState,
    f: impl Fn(&[u32]) -> (T, T) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); 2 * pairs];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each_init(Vec::new, |words, (k, chunk)| {
            words.resize(chunk.len() / 2 * per, 0);
            at.advanced((k * CHUNK / 2 * per) as u64).fill_u32(words);
            for (xy, w) in chunk.chunks_exact_mut(2).zip(words.chunks_exact(per)) {
                (xy[0], xy[1]) = f(w);
            }
        });
    out
}

/// The largest finite value of a float dtype, and the words that say so in an error.
fn finite_range(dtype: DType) -> (f64, &'static str) {
    match dtype {
        DType::F16 => (
            f16::MAX.to_f64(),
            "within f16's finite range [-65504, 65504]",
        ),
        DType::BF16 => (
            bf16::MAX.to_f64(),
            "within bf16's finite range [-3.39e38, 3.39e38]",
        ),
        DType::F32 => (
            f64::from(f32::MAX),
            "within f32's finite range [-3.40e38, 3.40e38]",
        ),
        _ => (f64::MAX, "finite"),
    }
}

/// `x` rounded to `dtype`, as f64.
fn round_to(x: f64, dtype: DType) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "rounding to f32 is the point"
    )]
    match dtype {
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::F32 => f64::from(x as f32),
        _ => x,
    }
}

/// The next value of `dtype` after `x` (a value of `dtype`), up or down.
fn step(x: f64, up: bool, dtype: DType) -> f64 {
    // For 16-bit floats: adjacent values have adjacent bit patterns within a sign.
    let half_step = |bits: u16| -> u16 {
        let negative = bits & 0x8000 != 0;
        match (bits & 0x7fff == 0, up == negative) {
            (true, _) if up => 0x0001,
            (true, _) => 0x8001,
            (false, true) => bits - 1,
            (false, false) => bits + 1,
        }
    };
    #[allow(clippy::cast_possible_truncation, reason = "x is a value of dtype")]
    match dtype {
        DType::F16 => f16::from_bits(half_step(f16::from_f64(x).to_bits())).to_f64(),
        DType::BF16 => bf16::from_bits(half_step(bf16::from_f64(x).to_bits())).to_f64(),
        DType::F32 if up => f64::from((x as f32).next_up()),
        DType::F32 => f64::from((x as f32).next_down()),
        _ if up => x.next_up(),
        _ => x.next_down(),
    }
}

/// The smallest and the largest value of `dtype` in `[lo, hi)` (`lo < hi`, both finite).
fn sample_bounds(lo: f64, hi: f64, dtype: DType) -> Result<(f64, f64)> {
    use crate::validate::invalid;
    let (max, range) = finite_range(dtype);
    if lo < -max {
        return Err(invalid("lo", lo, range));
    }
    if hi > max {
        return Err(invalid("hi", hi, range));
    }
    if !(hi - lo).is_finite() {
        return Err(invalid("hi", hi, "such that hi - lo is finite"));
    }
    let mut first = round_to(lo, dtype);
    if first < lo {
        first = step(first, true, dtype);
    }
    let mut last = round_to(hi, dtype);
    if last >= hi {
        last = step(last, false, dtype);
    }
    if first > last {
        return Err(invalid(
            "hi",
            hi,
            "above lo by at least one value of the dtype",
        ));
    }
    Ok((first, last))
}

fn f32_tensor(data: Vec<f32>, shape: Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(match dtype {
        DType::F16 => Tensor::from_vec(
            data.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::BF16 => Tensor::from_vec(
            data.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        _ => Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?,
    })
}

impl RngCore for Philox {
    fn next_u32(&mut self) -> u32 {
        let at = self.reserve(1);
        let block = philox4x32_10(
            {
                let j = at.offset / 4;
                #[allow(clippy::cast_possible_truncation, reason = "splitting into words")]
                [j as u32, (j >> 32) as u32, 0, 0]
            },
            at.key(),
        );
        block[(at.offset % 4) as usize]
    }

    fn next_u64(&mut self) -> u64 {
        // Low word first, like rand_core's `next_u64_via_u32`.
        let lo = u64::from(self.next_u32());
        let hi = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        let mut words = vec![0u32; dst.len().div_ceil(4)];
        self.fill_u32(&mut words);
        for (chunk, w) in dst.chunks_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
        }
    }
}

impl SeedableRng for Philox {
    type Seed = [u8; 8];

    /// The seed bytes, little-endian, are the 64-bit key.
    fn from_seed(seed: Self::Seed) -> Self {
        Self::new(u64::from_le_bytes(seed))
    }

    /// Uses `state` directly as the key, so `seed_from_u64(s)` equals [`Philox::new`]`(s)`.
    fn seed_from_u64(state: u64) -> Self {
        Self::new(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0xffff_ffff; 4], [0xffff_ffff; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn lanes_equal_scalar_blocks() {
        let key = [0x1234_5678, 0x9abc_def0];
        let lanes = philox_lanes((1 << 32) - 3, key);
        for l in 0..LANES {
            let j = (1u64 << 32) - 3 + l as u64;
            let scalar = philox4x32_10([j as u32, (j >> 32) as u32, 0, 0], key);
            for w in 0..4 {
                assert_eq!(lanes[w][l], u64::from(scalar[w]));
            }
        }
    }

    #[test]
    fn bulk_fill_equals_sequential_draws_at_any_offset() {
        for offset in [0u64, 1, 2, 3, 5, 31, 33] {
            let state = PhiloxState { seed: 99, offset };
            let mut bulk = vec![0u32; 2 * CHUNK + 77];
            state.fill_u32(&mut bulk);
            let mut seq = Philox::from_state(state);
            for (i, &w) in bulk.iter().enumerate() {
                assert_eq!(w, seq.next_u32(), "offset {offset}, word {i}");
            }
        }
    }

    #[test]
    fn same_stream_on_one_and_two_threads() {
        let draw = || {
            let mut out = vec![0u32; 5 * CHUNK + 11];
            PhiloxState { seed: 5, offset: 7 }.fill_u32(&mut out);
            out
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(draw);
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(draw);
        assert_eq!(one, two);
    }

    #[test]
    fn bits_agree_with_bernoulli_tensor() -> Result<()> {
        let n = CHUNK + 100;
        let bits = Philox::new(11).bernoulli_bits(n, 0.3)?;
        let t = Philox::new(11).bernoulli(n, 0.3, DType::F32, &Device::Cpu)?;
        for (i, v) in t.to_vec1::<f32>()?.into_iter().enumerate() {
            let bit = (bits[i / 64] >> (i % 64)) & 1;
            assert_eq!(bit == 1, v == 1.0, "element {i}");
        }
        Ok(())
    }

    #[test]
    fn seedable_and_fill_bytes_follow_the_word_stream() {
        let mut a = Philox::seed_from_u64(17);
        let mut b = Philox::from_seed(17u64.to_le_bytes());
        let mut bytes = [0u8; 10];
        a.fill_bytes(&mut bytes);
        let w0 = b.next_u32().to_le_bytes();
        let w1 = b.next_u32().to_le_bytes();
        let w2 = b.next_u32().to_le_bytes();
        assert_eq!(bytes[..4], w0);
        assert_eq!(bytes[4..8], w1);
        assert_eq!(bytes[8..], w2[..2]);
    }
}

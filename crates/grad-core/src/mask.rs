//! The dropout mask stream: one random 32-bit word per counter, the same on every device.
//!
//! Dropout needs a word per element (or channel) from a stream that a GPU can compute with
//! candle's ops alone, which have no bitwise operations, so Philox (multiplies and XORs) cannot
//! run there. The mask stream is **double tabulation hashing** (Thorup 2013, "Simple Tabulation,
//! Fast Expanders, Double Tabulation, and High Independence"; Pătraşcu & Thorup 2012), with
//! addition modulo 2^32 as the group operation instead of XOR, so it needs only integer adds,
//! integer division and table lookups:
//!
//! ```text
//! word(c) = S0[u0] + S1[u1] + S2[u2] + S3[u3]      (mod 2^32, u0..u3 the bytes of u, low first)
//!       u = T0[c0] + T1[c1] + T2[c2] + T3[c3]      (mod 2^32, c0..c3 the bytes of c mod 2^32)
//! ```
//!
//! The eight 256-entry tables are words of the Philox 4x32-10 stream keyed by the seed: block
//! `j` (0..512) of the counter `(j, c >> 32, 0x6d61_736b, 0)` gives entries `4j..4j+4` of the
//! tables in order (`T0..T3`, then `S0..S3`). The third counter word keeps these blocks apart
//! from the ordinary [`Philox`](crate::Philox) stream, whose third word is 0. Simple tabulation
//! alone is 3-independent but its words are sums of row and column terms, which a threshold
//! turns into correlated masks; the second tabulation of the sum removes that structure.
//!
//! The CPU computes words with table lookups ([`MaskStream::fill`]); other devices compute the
//! same words with candle integer ops ([`mask_words_tensor`]): the same `(seed, offset)` gives the
//! same mask on the CPU, on CUDA and on Metal, run after run. A [`PhiloxState`] names a position
//! in the stream (its `offset` counts words).

use candle_core::{DType, Device, Tensor};

use crate::rng::{PhiloxState, philox4x32_10};
use crate::{Error, Result};

/// The third Philox counter word of table blocks (`"mask"` in ASCII).
const TABLE_DOMAIN: u32 = 0x6d61_736b;

/// The eight lookup tables of the mask stream for one seed and one 2^32-word segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskStream {
    seed: u64,
    segment: u32,
    tables: Box<[[u32; 256]; 8]>,
}

impl MaskStream {
    /// The tables for words `segment * 2^32 .. (segment + 1) * 2^32` of the stream for `seed`.
    pub fn new(seed: u64, segment: u32) -> Self {
        #[allow(clippy::cast_possible_truncation, reason = "splitting into words")]
        let key = [seed as u32, (seed >> 32) as u32];
        let mut tables = Box::new([[0u32; 256]; 8]);
        for j in 0..512u32 {
            let block = philox4x32_10([j, segment, TABLE_DOMAIN, 0], key);
            for (w, word) in block.into_iter().enumerate() {
                let entry = (4 * j) as usize + w;
                tables[entry / 256][entry % 256] = word;
            }
        }
        Self {
            seed,
            segment,
            tables,
        }
    }

    /// The tables for the segment holding word `offset` of `state`'s stream.
    pub fn at(state: PhiloxState) -> Self {
        Self::new(state.seed, segment_of(state.offset))
    }

    /// The segment (`counter >> 32`) these tables serve.
    pub fn segment(&self) -> u32 {
        self.segment
    }

    /// The word at position `low` of the segment.
    ///
    /// ```
    /// use gradkit::core::mask::MaskStream;
    /// let s = MaskStream::new(7, 0);
    /// let mut words = [0; 3];
    /// s.fill(5, &mut words);
    /// assert_eq!(words[1], s.word(6));
    /// ```
    #[inline(always)]
    pub fn word(&self, low: u32) -> u32 {
        let t = &self.tables;
        let [c0, c1, c2, c3] = low.to_le_bytes();
        let u = t[0][usize::from(c0)]
            .wrapping_add(t[1][usize::from(c1)])
            .wrapping_add(t[2][usize::from(c2)])
            .wrapping_add(t[3][usize::from(c3)]);
        self.finish(u)
    }

    /// The second tabulation.
    #[inline(always)]
    fn finish(&self, u: u32) -> u32 {
        let t = &self.tables;
        let [u0, u1, u2, u3] = u.to_le_bytes();
        t[4][usize::from(u0)]
            .wrapping_add(t[5][usize::from(u1)])
            .wrapping_add(t[6][usize::from(u2)])
            .wrapping_add(t[7][usize::from(u3)])
    }

    /// Writes the words at stream positions `first .. first + out.len()` (full 64-bit
    /// positions) into `out`, on the calling thread. Positions in another segment than this
    /// one's get their own tables.
    pub fn fill(&self, first: u64, out: &mut [u32]) {
        let mut pos = first;
        let mut rest = out;
        while !rest.is_empty() {
            let segment = segment_of(pos);
            #[allow(clippy::cast_possible_truncation, reason = "the low word")]
            let low = pos as u32;
            let room = (1u64 << 32) - u64::from(low);
            let n = usize::try_from(room).map_or(rest.len(), |r| r.min(rest.len()));
            let (head, tail) = rest.split_at_mut(n);
            if segment == self.segment {
                self.fill_segment(low, head);
            } else {
                Self::new(self.seed, segment).fill_segment(low, head);
            }
            rest = tail;
            pos = pos.wrapping_add(n as u64);
        }
    }

    /// Words `low .. low + out.len()` of this segment (which must not run past its end): the
    /// first tabulation is one lookup plus a constant per run of 256.
    #[inline(always)]
    fn fill_segment(&self, low: u32, out: &mut [u32]) {
        let t = &self.tables;
        let mut c = low;
        let mut rest = out;
        while !rest.is_empty() {
            let [c0, c1, c2, c3] = c.to_le_bytes();
            let high = t[1][usize::from(c1)]
                .wrapping_add(t[2][usize::from(c2)])
                .wrapping_add(t[3][usize::from(c3)]);
            let run = (256 - usize::from(c0)).min(rest.len());
            let (head, tail) = rest.split_at_mut(run);
            for (o, &t0) in head.iter_mut().zip(&t[0][usize::from(c0)..]) {
                *o = self.finish(t0.wrapping_add(high));
            }
            rest = tail;
            c = c.wrapping_add(run as u32);
        }
    }

    /// The tables as one `[8, 256]` i64 tensor on `device`: what [`mask_words_tensor`] uploads.
    fn table_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<i64> = self
            .tables
            .iter()
            .flatten()
            .map(|&w| i64::from(w))
            .collect();
        Ok(Tensor::from_vec(flat, (8, 256), device)?)
    }
}

fn segment_of(position: u64) -> u32 {
    #[allow(clippy::cast_possible_truncation, reason = "the high word")]
    let s = (position >> 32) as u32;
    s
}

/// The `n` words at `state`'s position as a u32 tensor `[n]` computed on `device` with candle
/// integer ops: the same words as [`MaskStream::fill`].
///
/// What crosses to the device: the 8 KiB of tables (16 KiB as i64) per 2^32-word segment touched,
/// and index ramps of about `2 sqrt(n / 256)` elements. Nothing is read back. The casts to u8 and
/// u32 that take bytes keep the low bits on the CPU (Rust's `as`), CUDA and Metal (C++'s
/// conversion to an unsigned type).
///
/// # Errors
/// A candle error from the device.
///
/// ```
/// use candle_core::Device;
/// use gradkit::core::PhiloxState;
/// use gradkit::core::mask::{MaskStream, mask_words_tensor};
/// let at = PhiloxState { seed: 3, offset: 1000 };
/// let words = mask_words_tensor(at, 600, &Device::Cpu)?.to_vec1::<u32>()?;
/// let mut host = vec![0u32; 600];
/// MaskStream::at(at).fill(at.offset, &mut host);
/// assert_eq!(words, host);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn mask_words_tensor(state: PhiloxState, n: usize, device: &Device) -> Result<Tensor> {
    let mut parts = Vec::new();
    let (mut pos, mut left) = (state.offset, n as u64);
    while left > 0 {
        #[allow(clippy::cast_possible_truncation, reason = "the low word")]
        let low = pos as u32;
        let len = left.min((1u64 << 32) - u64::from(low));
        let stream = MaskStream::new(state.seed, segment_of(pos));
        parts.push(segment_words(&stream, low, len, device)?);
        pos = pos.wrapping_add(len);
        left -= len;
    }
    Ok(match parts.len() {
        0 => Tensor::zeros(0, DType::U32, device)?,
        1 => parts.remove(0),
        _ => Tensor::cat(&parts, 0)?,
    })
}

/// Words `low .. low + len` of one segment on `device`, as u32.
///
/// Full-size work: one broadcast add (the first tabulation, from per-row sums), three integer
/// divisions and eight casts for the bytes (a cast to u8 or u32 keeps the low bits on every
/// backend), four table gathers and three adds, and a final cast: 19 passes.
fn segment_words(stream: &MaskStream, low: u32, len: u64, device: &Device) -> Result<Tensor> {
    let too_long = || Error::InvalidHyperParameter {
        name: "n",
        value: len as f64,
        allowed: "a count that fits in usize",
    };
    let tables = stream.table_tensor(device)?;
    let table = |k: usize| tables.get(k);
    let (q0, r0) = (i64::from(low >> 8), u64::from(low & 255));
    // Rows of 256 consecutive counters: row q holds counters q * 256 .. q * 256 + 256.
    let rows = usize::try_from((r0 + len).div_ceil(256)).map_err(|_| too_long())?;
    let byte = Tensor::new(256i64, device)?;
    // The low byte of `x`: a cast to u8 (C++ and Rust casts keep the low bits), then to u32 for
    // the index (candle's index_select reads a u8 index of 255 as "out of range").
    let gather = |k: usize, x: &Tensor| -> Result<Tensor> {
        Ok(table(k)?.index_select(&x.to_dtype(DType::U8)?.to_dtype(DType::U32)?, 0)?)
    };
    let q = ramp(rows, device)?.broadcast_add(&Tensor::new(q0, device)?)?;
    let q1 = q.broadcast_div(&byte)?;
    let q2 = q1.broadcast_div(&byte)?;
    let high = ((gather(1, &q)? + gather(2, &q1)?)? + gather(3, &q2)?)?;
    let u = high
        .unsqueeze(1)?
        .broadcast_add(&table(0)?.unsqueeze(0)?)?
        .flatten_all()?;
    let start = usize::try_from(r0).map_err(|_| too_long())?;
    let u = u.narrow(0, start, usize::try_from(len).map_err(|_| too_long())?)?;
    // u < 2^34: its four low bytes, then the second tabulation.
    let u1 = u.broadcast_div(&byte)?;
    let u2 = u1.broadcast_div(&byte)?;
    let u3 = u2.broadcast_div(&byte)?;
    let sum = (((gather(4, &u)? + gather(5, &u1)?)? + gather(6, &u2)?)? + gather(7, &u3)?)?;
    Ok(sum.to_dtype(DType::U32)?)
}

/// `0, 1, .., n - 1` as i64 on `device`, built from two short ramps (`i = a * w + b`) so that
/// only about `2 sqrt(n)` values cross from the host.
fn ramp(n: usize, device: &Device) -> Result<Tensor> {
    let w = n.isqrt().max(1);
    let h = n.div_ceil(w);
    let to_i64 = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    let a =
        Tensor::arange(0, to_i64(h), device)?.broadcast_mul(&Tensor::new(to_i64(w), device)?)?;
    let b = Tensor::arange(0, to_i64(w), device)?;
    Ok(a.unsqueeze(1)?
        .broadcast_add(&b.unsqueeze(0)?)?
        .flatten_all()?
        .narrow(0, 0, n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_words_equal_host_words_across_a_segment_boundary() -> Result<()> {
        let at = PhiloxState {
            seed: 99,
            offset: (1 << 32) - 700,
        };
        let n = 1500;
        let device = mask_words_tensor(at, n, &Device::Cpu)?.to_vec1::<u32>()?;
        let mut host = vec![0u32; n];
        MaskStream::at(at).fill(at.offset, &mut host);
        assert_eq!(device, host);
        // The second segment's words come from its own tables.
        let second = MaskStream::new(99, 1);
        assert_eq!(host[700], second.word(0));
        Ok(())
    }

    #[test]
    fn words_look_uniform_and_unstructured() {
        let s = MaskStream::new(1, 0);
        let mut w = vec![0u32; 1 << 20];
        s.fill(0, &mut w);
        // Top 4 bits of consecutive pairs: 256 cells, chi-square with 255 degrees of freedom.
        let mut cells = [0f64; 256];
        for p in w.windows(2) {
            cells[((p[0] >> 28) * 16 + (p[1] >> 28)) as usize] += 1.0;
        }
        let expect = (w.len() - 1) as f64 / 256.0;
        let chi: f64 = cells.iter().map(|c| (c - expect).powi(2) / expect).sum();
        // 255 dof: mean 255, sd ~22.6; 400 is over six sd.
        assert!(chi < 400.0, "chi-square {chi}");
        // Rows of 256 (one first-stage table row each) agree on a p = 0.5 mask about half the
        // time, as independent rows would.
        let keep: Vec<bool> = w.iter().map(|&x| x < 1 << 31).collect();
        let rows: Vec<&[bool]> = keep.chunks(256).take(256).collect();
        for a in 0..rows.len() {
            for b in a + 1..rows.len() {
                let same = rows[a].iter().zip(rows[b]).filter(|(x, y)| x == y).count();
                assert!((70..=186).contains(&same), "rows {a} and {b}: {same}/256");
            }
        }
    }
}

//! Reading and writing a CPU tensor's elements in logical (row-major) order, whatever its layout.
//!
//! candle hands a kernel the whole storage plus a [`Layout`] (shape, strides, start offset). A
//! contiguous tensor is a sub-slice; a transposed, narrowed or broadcast one is not. [`HostView`]
//! gives kernels the same thing in both cases: consecutive logical ranges as plain slices, borrowed
//! when contiguous and gathered into a caller-owned scratch buffer otherwise. A kernel that works
//! on ranges of a fixed size therefore produces bit-identical results for contiguous and
//! non-contiguous inputs, and for any thread count.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};

use rayon::prelude::*;

use crate::cpu::{Float, with_avx2};
use crate::{Error, Result};

/// Elements per work item of the chunked parallel kernels.
///
/// 32 Ki elements (128 KiB of f32) keeps a chunk's scratch buffer in L2 and gives a 25M-element
/// model about 800 work items, plenty for rayon to balance. Results depend on this constant
/// (it fixes the reduction order), never on the number of threads.
pub const CHUNK: usize = 32 * 1024;

/// Work of at most this many elements runs on the calling thread. Handing work to the rayon
/// pool wakes a worker and waits for it, about 0.05–0.1 ms here, as long as a single-threaded
/// pass over 128 Ki f32 elements; small activations and parameters are faster inline. The
/// chunking, and so every result, is the same either way.
pub const INLINE_MAX: usize = 4 * CHUNK;

/// A CPU tensor's elements seen through its layout.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a, T> {
    data: &'a [T],
    layout: &'a Layout,
}

impl<'a, T: Copy> HostView<'a, T> {
    /// Views `data` (a whole CPU storage) through `layout`.
    pub fn new(data: &'a [T], layout: &'a Layout) -> Self {
        Self { data, layout }
    }

    /// The number of logical elements.
    pub fn len(&self) -> usize {
        self.layout.shape().elem_count()
    }

    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The layout the view reads through.
    pub fn layout(&self) -> &'a Layout {
        self.layout
    }

    /// The elements as one slice when the layout is contiguous.
    pub fn as_contiguous(&self) -> Option<&'a [T]> {
        self.layout
            .contiguous_offsets()
            .map(|(start, end)| &self.data[start..end])
    }

    /// The logical elements `start..end` as a slice: borrowed from the storage when the layout is
    /// contiguous, else gathered into `scratch` (cleared first).
    ///
    /// # Panics
    /// When `start > end` or `end > self.len()`: callers compute ranges from `len()`.
    pub fn range<'s>(&self, start: usize, end: usize, scratch: &'s mut Vec<T>) -> &'s [T]
    where
        'a: 's,
    {
        assert!(start <= end && end <= self.len(), "range out of bounds");
        if let Some(all) = self.as_contiguous() {
            return &all[start..end];
        }
        scratch.clear();
        scratch.extend(
            Offsets::new(self.layout, start)
                .take(end - start)
                .map(|o| self.data[o]),
        );
        scratch
    }

    /// Copies the elements into a new vector in logical order.
    pub fn to_vec(&self) -> Vec<T> {
        match self.as_contiguous() {
            Some(all) => all.to_vec(),
            None => Offsets::new(self.layout, 0)
                .take(self.len())
                .map(|o| self.data[o])
                .collect(),
        }
    }
}

/// The storage offsets of a layout's elements in logical order, starting at a logical index.
#[derive(Debug, Clone)]
pub struct Offsets<'a> {
    dims: &'a [usize],
    stride: &'a [usize],
    index: Vec<usize>,
    offset: usize,
    remaining: usize,
}

impl<'a> Offsets<'a> {
    /// The offsets of `layout`'s elements from logical index `start` on.
    pub fn new(layout: &'a Layout, start: usize) -> Self {
        let dims = layout.dims();
        let stride = layout.stride();
        let total = layout.shape().elem_count();
        let mut index = vec![0; dims.len()];
        let mut offset = layout.start_offset();
        let mut rest = start.min(total);
        for d in (0..dims.len()).rev() {
            if dims[d] == 0 {
                break;
            }
            index[d] = rest % dims[d];
            rest /= dims[d];
            offset += index[d] * stride[d];
        }
        Self {
            dims,
            stride,
            index,
            offset,
            remaining: total - start.min(total),
        }
    }
}

impl Iterator for Offsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        let current = self.offset;
        self.remaining -= 1;
        if self.remaining > 0 {
            // Odometer step: bump the innermost index, carrying into outer dims.
            for d in (0..self.dims.len()).rev() {
                self.index[d] += 1;
                self.offset += self.stride[d];
                if self.index[d] < self.dims[d] {
                    break;
                }
                self.offset -= self.index[d] * self.stride[d];
                self.index[d] = 0;
            }
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Offsets<'_> {}

/// The elements of a contiguous CPU storage of element type `T` (any candle dtype), through its
/// layout.
///
/// # Errors
/// [`Error::UnsupportedDType`] when the storage holds another dtype; a candle error when the
/// layout is not contiguous (kernels make their inputs contiguous first).
pub fn cpu_slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(storage)?;
    if layout.shape().elem_count() == 0 {
        // A zero-size view may start past its (empty) storage.
        return Ok(&[]);
    }
    layout
        .contiguous_offsets()
        .map(|(start, end)| &all[start..end])
        .ok_or_else(|| Error::Candle(candle_core::Error::RequiresContiguous { op: "cpu_slice" }))
}

/// As [`cpu_slice`] for a storage that must be on the CPU (the guard of
/// [`Tensor::storage_and_layout`](candle_core::Tensor::storage_and_layout)).
///
/// # Errors
/// As [`cpu_slice`], and [`Error::DeviceMismatch`] for a storage on another device.
pub fn storage_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(cpu) => cpu_slice(cpu, layout),
        _ => Err(Error::DeviceMismatch {
            op: "storage_slice",
            first: "cpu".into(),
            other: "another device".into(),
        }),
    }
}

/// A per-chunk computation for [`map_chunks`], generic over the element type. Implement `call`
/// with `#[inline(always)]` so it is compiled inside [`with_avx2`].
pub trait ChunkFn: Sync {
    /// What one chunk yields.
    type Output: Send;
    /// Runs on chunk `chunk` (consecutive logical elements) of tensor number `tensor`.
    fn call<T: Float>(&self, tensor: usize, chunk: &[T]) -> Self::Output;
}

/// A tensor's elements on the host, typed.
enum Source<'a> {
    F16(HostView<'a, half::f16>),
    BF16(HostView<'a, half::bf16>),
    F32(HostView<'a, f32>),
    F64(HostView<'a, f64>),
}

/// Per-thread gather buffers for non-contiguous tensors, one per dtype.
#[derive(Default)]
struct Scratch {
    f16: Vec<half::f16>,
    bf16: Vec<half::bf16>,
    f32: Vec<f32>,
    f64: Vec<f64>,
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::BF16(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    #[inline(always)]
    fn run<F: ChunkFn>(
        &self,
        f: &F,
        tensor: usize,
        start: usize,
        end: usize,
        s: &mut Scratch,
    ) -> F::Output {
        match self {
            Self::F16(v) => f.call(tensor, v.range(start, end, &mut s.f16)),
            Self::BF16(v) => f.call(tensor, v.range(start, end, &mut s.bf16)),
            Self::F32(v) => f.call(tensor, v.range(start, end, &mut s.f32)),
            Self::F64(v) => f.call(tensor, v.range(start, end, &mut s.f64)),
        }
    }
}

/// Runs `f` on every [`CHUNK`]-element range of every tensor (CPU, float), in parallel across
/// tensors and within large ones, and returns the results per tensor, in chunk order.
///
/// One work item per (tensor, chunk): small tensors cost one item, large ones spread over the
/// threads, and no barrier separates one tensor from the next. A non-contiguous tensor is read
/// through its layout into a per-thread buffer, one chunk at a time, so `f` sees the same
/// chunks as for its contiguous copy. The result does not depend on the thread count.
///
/// # Errors
/// [`Error::UnsupportedDType`] for a non-float tensor, [`Error::DeviceMismatch`] for a tensor
/// not on the CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::cpu::Float;
/// use gradkit::core::cpu::{ChunkFn, map_chunks};
/// struct Count;
/// impl ChunkFn for Count {
///     type Output = usize;
///     #[inline(always)]
///     fn call<T: Float>(&self, _tensor: usize, chunk: &[T]) -> usize {
///         chunk.len()
///     }
/// }
/// let ts = [Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu)?];
/// assert_eq!(map_chunks("count", &ts, &Count)?, [vec![5]]);
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn map_chunks<F: ChunkFn>(
    op: &'static str,
    tensors: &[Tensor],
    f: &F,
) -> Result<Vec<Vec<F::Output>>> {
    let guards: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
    let sources = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(cpu) => Ok(match cpu {
                CpuStorage::F16(d) => Source::F16(HostView::new(d.as_slice(), layout)),
                CpuStorage::BF16(d) => Source::BF16(HostView::new(d.as_slice(), layout)),
                CpuStorage::F32(d) => Source::F32(HostView::new(d.as_slice(), layout)),
                CpuStorage::F64(d) => Source::F64(HostView::new(d.as_slice(), layout)),
                other => {
                    return Err(Error::UnsupportedDType {
                        op,
                        arg: "tensors",
                        dtype: candle_core::backend::BackendStorage::dtype(other),
                        expected: "a float dtype (f16, bf16, f32 or f64)",
                    });
                }
            }),
            _ => Err(Error::DeviceMismatch {
                op,
                first: "cpu".into(),
                other: "another device".into(),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    let items: Vec<(usize, usize, usize)> = sources
        .iter()
        .enumerate()
        .flat_map(|(i, src)| chunk_ranges(src.len()).map(move |(a, b)| (i, a, b)))
        .collect();
    let run = |scratch: &mut Scratch, &(i, a, b): &(usize, usize, usize)| {
        with_avx2(
            #[inline(always)]
            || sources[i].run(f, i, a, b, scratch),
        )
    };
    let results: Vec<F::Output> = if items.len() * CHUNK <= INLINE_MAX {
        let mut scratch = Scratch::default();
        items.iter().map(|item| run(&mut scratch, item)).collect()
    } else {
        items.par_iter().map_init(Scratch::default, run).collect()
    };
    let mut out: Vec<Vec<F::Output>> = tensors.iter().map(|_| Vec::new()).collect();
    for (&(i, _, _), r) in items.iter().zip(results) {
        out[i].push(r);
    }
    Ok(out)
}

/// The ranges `[k * CHUNK, min((k + 1) * CHUNK, len))` that cover `0..len`.
pub fn chunk_ranges(len: usize) -> impl Iterator<Item = (usize, usize)> + Clone {
    (0..len.div_ceil(CHUNK)).map(move |k| (k * CHUNK, ((k + 1) * CHUNK).min(len)))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn storage_vec(t: &Tensor) -> Vec<f32> {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.clone(),
            _ => unreachable!("test tensors are f32 on the CPU"),
        }
    }

    #[test]
    fn strided_view_reads_logical_order() -> candle_core::Result<()> {
        let base = Tensor::arange(0f32, 60., &Device::Cpu)?.reshape((3, 4, 5))?;
        for t in [
            base.transpose(0, 2)?,
            base.narrow(1, 1, 2)?,
            base.narrow(2, 3, 2)?.transpose(1, 2)?,
            base.i_broadcast()?,
        ] {
            let data = storage_vec(&t);
            let view = HostView::new(&data, t.layout());
            assert_eq!(view.to_vec(), t.flatten_all()?.to_vec1::<f32>()?);
            let mut scratch = Vec::new();
            let expected = t.flatten_all()?.to_vec1::<f32>()?;
            let n = view.len();
            for (a, b) in [(0, n), (1, n - 1), (n / 2, n)] {
                assert_eq!(view.range(a, b, &mut scratch), &expected[a..b]);
            }
        }
        Ok(())
    }

    trait BroadcastExt {
        fn i_broadcast(&self) -> candle_core::Result<Tensor>;
    }
    impl BroadcastExt for Tensor {
        fn i_broadcast(&self) -> candle_core::Result<Tensor> {
            self.narrow(0, 1, 1)?.broadcast_as((2, 4, 5))
        }
    }

    #[test]
    fn chunk_ranges_cover_exactly() {
        let ranges: Vec<_> = chunk_ranges(2 * CHUNK + 3).collect();
        assert_eq!(
            ranges,
            vec![(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK + 3)]
        );
        assert_eq!(chunk_ranges(0).count(), 0);
    }
}

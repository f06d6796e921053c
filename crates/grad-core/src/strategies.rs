//! proptest strategies for candle tensors, shared by every gradkit crate's tests.
//!
//! Enabled by the `proptest` feature. Strategies are named functions with named value ranges
//! (nalgebra's habit): [`shape`], [`values`], [`float_dtype`], [`layout_kind`] and [`tensor`],
//! which combines them according to a [`TensorSpec`]. Every generated tensor can be compared with
//! its `.contiguous()` copy to check that a kernel reads layouts correctly.
//!
//! ```
//! use gradkit::core::strategies::{TensorSpec, tensor};
//! use proptest::prelude::*;
//! use proptest::strategy::ValueTree;
//! use proptest::test_runner::TestRunner;
//! let mut runner = TestRunner::default();
//! let t = tensor(TensorSpec::default()).new_tree(&mut runner).unwrap().current();
//! assert!(t.rank() >= 1 && t.rank() <= 4);
//! ```

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

/// Which values a generated tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Values {
    /// Finite values drawn from `[lo, hi]`.
    Finite {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// Mostly finite values from `[lo, hi]`, with about one element in eight replaced by a
    /// special value: NaN, ±inf, ±0 or a subnormal (of f32 or f64).
    WithSpecials {
        /// Lower bound of the finite values.
        lo: f64,
        /// Upper bound of the finite values.
        hi: f64,
    },
}

/// The special values [`Values::WithSpecials`] mixes in.
pub const SPECIALS: [f64; 8] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    0.0,
    -0.0,
    1e-40,  // subnormal in f32
    -1e-45, // smallest f32 subnormal
    5e-324, // smallest f64 subnormal
];

/// How a generated tensor's elements are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    /// Row-major, offset 0.
    Contiguous,
    /// The transpose of a contiguous tensor of transposed shape (last two dims swapped): column
    /// major in the last two dims. Rank-1 tensors stay contiguous.
    Transposed,
    /// A narrow of a larger tensor: one padding element either side along the last dim, so the
    /// view has a start offset and (for rank >= 2) gaps between rows. The padding holds `1e30`,
    /// so a kernel that reads outside the view fails loudly.
    Narrowed,
}

/// What [`tensor`] generates.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Largest rank (at least 1). Default: 4.
    pub max_rank: usize,
    /// Largest size of any dim (at least 1). Default: 6.
    pub max_dim: usize,
    /// The values. Default: finite in `[-10, 10]`.
    pub values: Values,
    /// The dtypes to choose from. Default: f16, bf16, f32 and f64.
    pub dtypes: Vec<DType>,
    /// The layouts to choose from. Default: all three.
    pub layouts: Vec<LayoutKind>,
}

impl Default for TensorSpec {
    fn default() -> Self {
        Self {
            max_rank: 4,
            max_dim: 6,
            values: Values::Finite {
                lo: -10.0,
                hi: 10.0,
            },
            dtypes: vec![DType::F16, DType::BF16, DType::F32, DType::F64],
            layouts: vec![
                LayoutKind::Contiguous,
                LayoutKind::Transposed,
                LayoutKind::Narrowed,
            ],
        }
    }
}

/// Shapes of rank `1..=max_rank` with every dim in `1..=max_dim`.
pub fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim.max(1), 1..=max_rank.max(1))
}

/// `n` values as described by `values`.
pub fn values(n: usize, values: Values) -> impl Strategy<Value = Vec<f64>> {
    let (lo, hi, specials) = match values {
        Values::Finite { lo, hi } => (lo, hi, 0),
        Values::WithSpecials { lo, hi } => (lo, hi, 1),
    };
    let element = prop_oneof![
        7 => lo..=hi,
        specials => prop::sample::select(SPECIALS.to_vec()),
    ];
    prop::collection::vec(element, n)
}

/// One of the four float dtypes.
pub fn float_dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F16, DType::BF16, DType::F32, DType::F64])
}

/// One of the three layouts.
pub fn layout_kind() -> impl Strategy<Value = LayoutKind> {
    prop::sample::select(vec![
        LayoutKind::Contiguous,
        LayoutKind::Transposed,
        LayoutKind::Narrowed,
    ])
}

/// Builds the CPU tensor of shape `dims` whose logical elements are `data` (row-major, rounded
/// to `dtype`), stored with the given layout.
///
/// # Errors
/// candle's error when `data.len()` differs from the element count.
pub fn build_tensor(
    dims: &[usize],
    data: Vec<f64>,
    dtype: DType,
    layout: LayoutKind,
) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    let logical = Tensor::from_vec(data, dims, &dev)?.to_dtype(dtype)?;
    let rank = dims.len();
    match layout {
        LayoutKind::Contiguous => Ok(logical),
        LayoutKind::Transposed if rank < 2 => Ok(logical),
        LayoutKind::Transposed => logical
            .transpose(rank - 2, rank - 1)?
            .contiguous()?
            .transpose(rank - 2, rank - 1),
        LayoutKind::Narrowed => {
            let last = rank - 1;
            let mut pad_dims = dims.to_vec();
            pad_dims[last] = 1;
            let pad = Tensor::full(1e30f64, pad_dims, &dev)?.to_dtype(dtype)?;
            let padded = Tensor::cat(&[&pad, &logical, &pad], last)?;
            padded.narrow(last, 1, dims[last])
        }
    }
}

/// Tensors as described by `spec`.
pub fn tensor(spec: TensorSpec) -> impl Strategy<Value = Tensor> {
    let TensorSpec {
        max_rank,
        max_dim,
        values: kind,
        dtypes,
        layouts,
    } = spec;
    (
        shape(max_rank, max_dim),
        prop::sample::select(dtypes),
        prop::sample::select(layouts),
    )
        .prop_flat_map(move |(dims, dtype, layout)| {
            let n = dims.iter().product();
            (Just(dims), values(n, kind), Just(dtype), Just(layout))
        })
        .prop_filter_map(
            "tensor construction failed",
            |(dims, data, dtype, layout)| build_tensor(&dims, data, dtype, layout).ok(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #[test]
        fn built_tensors_hold_their_logical_values(
            (dims, data) in shape(3, 5).prop_flat_map(|d| {
                let n = d.iter().product();
                (Just(d), values(n, Values::Finite { lo: -4.0, hi: 4.0 }))
            }),
            layout in layout_kind(),
        ) {
            let t = build_tensor(&dims, data.clone(), DType::F64, layout).unwrap();
            prop_assert_eq!(t.dims(), &dims[..]);
            prop_assert_eq!(t.flatten_all().unwrap().to_vec1::<f64>().unwrap(), data);
            if layout == LayoutKind::Narrowed {
                prop_assert!(t.layout().start_offset() > 0);
            }
        }
    }
}

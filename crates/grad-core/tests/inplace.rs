//! In-place updates equal their candle compositions for every dtype and layout, and write into
//! the existing storage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor};
use grad_core::strategies::{TensorSpec, Values, tensor};
use grad_core::{clamp_in_place, scale_in_place};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn values(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn same(a: &[f64], b: &[f64]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

proptest! {
    #[test]
    fn scale_equals_affine(
        t in tensor(TensorSpec { values: Values::WithSpecials { lo: -100.0, hi: 100.0 }, ..TensorSpec::default() }),
        factor in -3.0f64..3.0,
    ) {
        // candle's affine computes in the tensor's dtype (f32 for f32; f32 for f16/bf16 after
        // rounding the factor the same way), so results must agree exactly.
        let expected = if t.dtype() == DType::F64 {
            values(&t.affine(factor, 0.0)?)
        } else {
            let f = factor as f32;
            values(&t.to_dtype(DType::F32)?.affine(f64::from(f), 0.0)?.to_dtype(t.dtype())?)
        };
        let mut g = t.clone();
        scale_in_place(&mut g, factor)?;
        prop_assert!(same(&values(&g), &expected));
    }

    #[test]
    fn clamp_equals_candle_clamp(
        t in tensor(TensorSpec { values: Values::WithSpecials { lo: -10.0, hi: 10.0 }, ..TensorSpec::default() }),
        bound in 0.0f64..5.0,
    ) {
        let expected = values(&t.clamp(-bound, bound)?);
        let mut g = t.clone();
        clamp_in_place(&mut g, -bound, bound)?;
        prop_assert!(same(&values(&g), &expected));
    }
}

#[test]
fn updates_are_visible_through_clones_so_no_copy_was_made() -> TestResult {
    let g = Tensor::randn(0f32, 1.0, (512, 512), &Device::Cpu)?;
    let alias = g.clone();
    let before = values(&g);
    let mut target = g;
    scale_in_place(&mut target, 2.0)?;
    let after = values(&alias);
    assert!(before.iter().zip(&after).all(|(b, a)| *a == 2.0 * b));
    Ok(())
}

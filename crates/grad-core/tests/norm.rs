//! Fused multi-tensor norms against a naive f64 reference, across dtypes, layouts and threads.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor};
use grad_core::strategies::{LayoutKind, TensorSpec, Values, tensor};
use grad_core::{Error, NormType, global_norm, multi_norm};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The reference: every element to f64, then the textbook formula.
fn naive(tensors: &[Tensor], p: f64) -> (f64, Vec<f64>) {
    let per: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| grad_testkit::values(t).unwrap())
        .collect();
    let norm = |v: &[f64]| -> f64 {
        if p.is_infinite() {
            v.iter().fold(0.0, |m, x| {
                if x.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(x.abs())
                }
            })
        } else {
            v.iter().map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
        }
    };
    let per_norms: Vec<f64> = per.iter().map(|v| norm(v)).collect();
    let all: Vec<f64> = per.concat();
    (norm(&all), per_norms)
}

fn close(a: f64, b: f64, rtol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rtol * b.abs()
}

fn norm_types() -> impl Strategy<Value = NormType> {
    prop_oneof![
        Just(NormType::L1),
        Just(NormType::L2),
        Just(NormType::Inf),
        (0.3f64..6.0).prop_map(NormType::P),
    ]
}

proptest! {
    #[test]
    fn equals_naive_reference_in_f64(
        tensors in prop::collection::vec(
            tensor(TensorSpec { dtypes: vec![DType::F64], max_dim: 9, ..TensorSpec::default() }),
            1..6,
        ),
        norm_type in norm_types(),
    ) {
        let got = multi_norm(&tensors, norm_type)?;
        let (total, per) = naive(&tensors, norm_type.p());
        prop_assert!(close(got.total, total, 1e-12), "{} vs {}", got.total, total);
        for (g, w) in got.per_tensor.iter().zip(&per) {
            prop_assert!(close(g.norm, *w, 1e-12), "{} vs {}", g.norm, w);
            prop_assert_eq!(g.nan_count + g.inf_count, 0);
        }
    }

    #[test]
    fn half_and_single_precision_accumulate_exactly_in_f64(
        tensors in prop::collection::vec(tensor(TensorSpec::default()), 1..6),
        norm_type in norm_types(),
    ) {
        // The reference reads the same rounded values, so only summation order differs.
        let got = global_norm(&tensors, norm_type)?;
        let (total, _) = naive(&tensors, norm_type.p());
        prop_assert!(close(got, total, 1e-12), "{got} vs {total}");
    }

    #[test]
    fn non_finite_values_are_counted_and_poison_the_norm(
        tensors in prop::collection::vec(
            tensor(TensorSpec { values: Values::WithSpecials { lo: -5.0, hi: 5.0 }, ..TensorSpec::default() }),
            1..5,
        ),
        norm_type in norm_types(),
    ) {
        let got = multi_norm(&tensors, norm_type)?;
        let mut nan = 0;
        let mut inf = 0;
        for (t, n) in tensors.iter().zip(&got.per_tensor) {
            let v = grad_testkit::values(t)?;
            let (tn, ti) = (v.iter().filter(|x| x.is_nan()).count() as u64, v.iter().filter(|x| x.is_infinite()).count() as u64);
            prop_assert_eq!((n.nan_count, n.inf_count), (tn, ti));
            nan += tn;
            inf += ti;
        }
        prop_assert_eq!(got.non_finite_count(), nan + inf);
        if nan > 0 {
            prop_assert!(got.total.is_nan());
        } else if inf > 0 {
            prop_assert_eq!(got.total, f64::INFINITY);
        } else {
            prop_assert!(got.total.is_finite());
        }
    }

    #[test]
    fn non_contiguous_gives_bit_identical_results(
        t in tensor(TensorSpec {
            max_dim: 40,
            max_rank: 3,
            layouts: vec![LayoutKind::Transposed, LayoutKind::Narrowed],
            ..TensorSpec::default()
        }),
        norm_type in norm_types(),
    ) {
        let strided = multi_norm(std::slice::from_ref(&t), norm_type)?;
        let contiguous = multi_norm(&[t.contiguous()?], norm_type)?;
        prop_assert_eq!(strided.total.to_bits(), contiguous.total.to_bits());
    }
}

#[test]
fn result_does_not_depend_on_thread_count() -> TestResult {
    let dev = Device::Cpu;
    let tensors = vec![
        Tensor::randn(0f32, 1.0, (300, 700), &dev)?,
        Tensor::randn(0f32, 1e-3, (64,), &dev)?,
        Tensor::randn(0f64, 10.0, (2048, 33), &dev)?.t()?,
        Tensor::randn(0f32, 1.0, (1000, 100), &dev)?.to_dtype(DType::BF16)?,
    ];
    for norm_type in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.5)] {
        let totals: Vec<u64> = [1, 2, 3, 8]
            .into_iter()
            .map(|threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| global_norm(&tensors, norm_type).unwrap().to_bits())
            })
            .collect();
        assert!(
            totals.windows(2).all(|w| w[0] == w[1]),
            "{norm_type:?}: {totals:?}"
        );
    }
    Ok(())
}

#[test]
fn large_f64_sum_matches_reference_to_1e12() -> TestResult {
    let t = Tensor::randn(0f64, 1.0, (3_000_000,), &Device::Cpu)?;
    let got = global_norm(std::slice::from_ref(&t), NormType::L2)?;
    let v = t.to_vec1::<f64>()?;
    // Kahan-compensated reference.
    let (mut sum, mut c) = (0.0f64, 0.0f64);
    for x in v {
        let y = x * x - c;
        let s = sum + y;
        c = (s - sum) - y;
        sum = s;
    }
    assert!(close(got, sum.sqrt(), 1e-12), "{got} vs {}", sum.sqrt());
    Ok(())
}

#[test]
fn empty_tensors_count_as_zero() -> TestResult {
    let dev = Device::Cpu;
    let empty = Tensor::zeros((0, 3), DType::F32, &dev)?;
    let g = Tensor::new(&[3f32, 4.0], &dev)?;
    assert_eq!(global_norm(&[empty.clone(), g], NormType::L2)?, 5.0);
    assert_eq!(global_norm(&[empty], NormType::Inf)?, 0.0);
    Ok(())
}

#[test]
fn bad_input_is_an_error_not_a_panic() -> TestResult {
    let dev = Device::Cpu;
    let g = Tensor::new(&[1f32], &dev)?;
    assert!(matches!(
        global_norm(&[], NormType::L2),
        Err(Error::EmptyInput { .. })
    ));
    for p in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
        assert!(matches!(
            global_norm(std::slice::from_ref(&g), NormType::P(p)),
            Err(Error::InvalidHyperParameter {
                name: "norm_type",
                ..
            })
        ));
        assert!(NormType::from_p(p).is_err());
    }
    let ints = Tensor::new(&[1u32, 2], &dev)?;
    assert!(matches!(
        global_norm(&[g, ints], NormType::L2),
        Err(Error::UnsupportedDType { .. })
    ));
    Ok(())
}

/// The composed path (what CUDA and Metal run) reads back one small tensor per call, whatever
/// the number of tensors, and agrees with the fused path on norms and non-finite counts.
#[test]
fn composed_norms_and_unscale_read_back_once_per_call() -> TestResult {
    use grad_core::device::{Path, read_back_count, with_path};
    let ts: Vec<Tensor> = (0..7)
        .map(|k| {
            Tensor::arange(0f32, 10.0 + k as f32, &Device::Cpu)
                .unwrap()
                .affine(0.5, -2.0)
                .unwrap()
        })
        .collect();
    let fused = multi_norm(&ts, NormType::L2)?;
    let (composed, reads) = with_path(Path::Composed, || {
        let before = read_back_count();
        let n = multi_norm(&ts, NormType::L2).unwrap();
        (n, read_back_count() - before)
    });
    assert_eq!(reads, 1);
    for (a, b) in fused.per_tensor.iter().zip(&composed.per_tensor) {
        assert!((a.norm - b.norm).abs() < 1e-9 * b.norm.max(1.0));
    }
    let mut gs = ts.clone();
    gs[3] = Tensor::new(&[1f32, f32::INFINITY], &Device::Cpu)?;
    let (found, reads) = with_path(Path::Composed, || {
        let before = read_back_count();
        let found = grad_core::unscale_all_in_place(&mut gs, 0.5).unwrap();
        (found, read_back_count() - before)
    });
    assert!(found);
    assert_eq!(reads, 1);
    assert_eq!(
        gs[0].to_vec1::<f32>()?,
        ts[0].affine(0.5, 0.0)?.to_vec1::<f32>()?
    );
    Ok(())
}

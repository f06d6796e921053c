//! The Philox generator: reproducible, resumable, and distributed as documented.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor};
use grad_core::{Philox, PhiloxState};
use rand_core::{RngCore, SeedableRng};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn values(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
}

const N: usize = 400_000;

#[test]
fn uniform_moments_within_five_sigma() -> TestResult {
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let v = values(&Philox::new(1).uniform(N, -1.0, 3.0, dtype, &Device::Cpu)?);
        assert!(v.iter().all(|x| (-1.0..=3.0).contains(x)));
        let (m, var) = mean_var(&v);
        // U(-1, 3): mean 1, variance 16/12; sd of the mean = sqrt(16/12 / N).
        let sd = (16.0 / 12.0 / N as f64).sqrt();
        assert!(
            (m - 1.0).abs() < 5.0 * sd + 0.01 * f64::from(dtype == DType::BF16),
            "{dtype:?}: mean {m}"
        );
        assert!((var - 16.0 / 12.0).abs() < 0.02, "{dtype:?}: var {var}");
    }
    Ok(())
}

#[test]
fn normal_moments_and_tails_within_five_sigma() -> TestResult {
    for dtype in [DType::F32, DType::F64] {
        let v = values(&Philox::new(2).normal(N + 1, 0.5, 2.0, dtype, &Device::Cpu)?);
        assert_eq!(v.len(), N + 1);
        let (m, var) = mean_var(&v);
        assert!(
            (m - 0.5).abs() < 5.0 * 2.0 / (N as f64).sqrt(),
            "{dtype:?}: mean {m}"
        );
        // Var of the sample variance of a normal: 2 sigma^4 / n.
        assert!(
            (var - 4.0).abs() < 5.0 * (2.0 * 16.0 / N as f64).sqrt(),
            "{dtype:?}: var {var}"
        );
        // P(|z| > 2) = 0.0455; binomial sd.
        let tail = v.iter().filter(|x| ((**x - 0.5) / 2.0).abs() > 2.0).count() as f64 / N as f64;
        assert!(
            (tail - 0.0455).abs() < 5.0 * (0.0455 * 0.9545 / N as f64).sqrt(),
            "tail {tail}"
        );
    }
    Ok(())
}

#[test]
fn bernoulli_frequency_and_exact_extremes() -> TestResult {
    for p in [0.1, 0.5, 0.9] {
        let v = values(&Philox::new(3).bernoulli(N, p, DType::F32, &Device::Cpu)?);
        let freq = v.iter().sum::<f64>() / N as f64;
        assert!(
            (freq - p).abs() < 5.0 * (p * (1.0 - p) / N as f64).sqrt(),
            "p {p}: {freq}"
        );
    }
    let ones = values(&Philox::new(3).bernoulli(1000, 1.0, DType::F16, &Device::Cpu)?);
    assert!(ones.iter().all(|&x| x == 1.0));
    let zeros = values(&Philox::new(3).bernoulli(1000, 0.0, DType::F64, &Device::Cpu)?);
    assert!(zeros.iter().all(|&x| x == 0.0));
    assert!(
        Philox::new(0)
            .bernoulli(3, 1.5, DType::F32, &Device::Cpu)
            .is_err()
    );
    assert!(Philox::new(0).bernoulli_bits(3, f64::NAN).is_err());
    Ok(())
}

#[test]
fn saved_state_resumes_the_same_stream() -> TestResult {
    let mut rng = Philox::new(77);
    let _ = rng.uniform((10, 10), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let saved: PhiloxState = rng.state();
    assert_eq!(saved.offset, 100);
    let a = values(&rng.normal(33, 0.0, 1.0, DType::F64, &Device::Cpu)?);
    let b_state = rng.state();
    assert_eq!(b_state.offset, 100 + 4 * 17);

    let mut resumed = Philox::from_state(saved);
    let b = values(&resumed.normal(33, 0.0, 1.0, DType::F64, &Device::Cpu)?);
    assert_eq!(a, b);
    assert_eq!(resumed.state(), b_state);

    // Different offsets give different draws.
    let mut other = Philox::from_state(saved.advanced(1));
    let c = values(&other.normal(33, 0.0, 1.0, DType::F64, &Device::Cpu)?);
    assert_ne!(a, c);
    Ok(())
}

#[test]
fn plugs_into_rand_core_and_differs_across_seeds() -> TestResult {
    fn draw<R: RngCore>(rng: &mut R) -> Vec<u64> {
        (0..8).map(|_| rng.next_u64()).collect()
    }
    let a = draw(&mut Philox::seed_from_u64(1));
    assert_eq!(a, draw(&mut Philox::new(1)));
    assert_ne!(a, draw(&mut Philox::new(2)));
    Ok(())
}

#[test]
fn bad_parameters_are_errors() -> TestResult {
    let dev = Device::Cpu;
    let mut rng = Philox::new(0);
    assert!(rng.uniform(3, 1.0, 1.0, DType::F32, &dev).is_err());
    assert!(
        rng.uniform(3, 0.0, f64::INFINITY, DType::F32, &dev)
            .is_err()
    );
    assert!(rng.normal(3, 0.0, -1.0, DType::F32, &dev).is_err());
    assert!(rng.normal(3, f64::NAN, 1.0, DType::F32, &dev).is_err());
    assert!(rng.uniform(3, 0.0, 1.0, DType::U32, &dev).is_err());
    // Failed calls consume nothing.
    assert_eq!(rng.state().offset, 0);
    Ok(())
}

/// `U[lo, hi)` stays half-open after rounding to the output dtype: at 1e7 in f32 (ulp 1) and at
/// 1000 in f16 (ulp 0.5), about half and a quarter of the raw samples round up to `hi`.
#[test]
fn uniform_never_returns_its_upper_bound_after_rounding() -> TestResult {
    for (dtype, lo, hi) in [
        (DType::F32, 1e7, 1e7 + 1.0),
        (DType::F16, 1000.0, 1001.0),
        (DType::BF16, 256.0, 258.0),
        (DType::F32, 1.0, 2.0),
        (DType::F64, 0.0, 1e-300),
        (DType::F16, 0.1, 0.2),
    ] {
        let u = Philox::new(3).uniform(4096, lo, hi, dtype, &Device::Cpu)?;
        let v = u.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (min, max) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        assert!(
            min >= lo && max < hi,
            "{dtype:?} [{lo}, {hi}): [{min}, {max}]"
        );
    }
    Ok(())
}

/// Ranges and scales the dtype cannot represent are errors naming the argument.
#[test]
fn generators_reject_what_the_dtype_cannot_represent() -> TestResult {
    let mut rng = Philox::new(0);
    let cases: [(&str, DType, f64, f64); 6] = [
        ("hi", DType::F16, 0.0, 1e5),
        ("lo", DType::F32, -1e39, 0.0),
        ("hi", DType::BF16, 0.0, 1e39),
        ("hi", DType::F64, -f64::MAX, f64::MAX),
        ("hi", DType::F16, 1000.1, 1000.2),
        ("hi", DType::F32, 1.0 + 1e-9, 1.0 + 2e-9),
    ];
    for (name, dtype, lo, hi) in cases {
        let before = rng.state();
        let e = rng
            .uniform(8, lo, hi, dtype, &Device::Cpu)
            .err()
            .ok_or(format!("{dtype:?} [{lo}, {hi}) accepted"))?;
        assert!(
            matches!(e, grad_core::Error::InvalidHyperParameter { name: n, .. } if n == name),
            "{dtype:?} [{lo}, {hi}): {e}"
        );
        assert_eq!(rng.state(), before, "a refused call draws nothing");
    }
    for (name, dtype, mean, std) in [
        ("mean", DType::F16, 1e5, 1.0),
        ("std", DType::F32, 0.0, 1e39),
        ("mean", DType::BF16, -1e39, 1.0),
    ] {
        let e = rng
            .normal(8, mean, std, dtype, &Device::Cpu)
            .err()
            .ok_or(format!("{dtype:?} N({mean}, {std}) accepted"))?;
        assert!(
            matches!(e, grad_core::Error::InvalidHyperParameter { name: n, .. } if n == name),
            "{dtype:?}: {e}"
        );
    }
    // At the edge of f16's range, still representable: accepted.
    let t = rng.uniform(64, -65504.0, 65504.0, DType::F16, &Device::Cpu)?;
    assert!(
        t.to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite())
    );
    Ok(())
}

//! Statistics against a naive f64 computation, and the history bound.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use grad_core::NamedVars;
use grad_core::strategies::{TensorSpec, Values, tensor};
use grad_diagnostics::{GradMonitor, MonitorConfig, Probe, ProbeKind};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn parameter_statistics_equal_a_naive_computation(
        g in tensor(TensorSpec { dtypes: vec![DType::F32, DType::F64], values: Values::Finite { lo: -3.0, hi: 3.0 }, max_dim: 9, ..TensorSpec::default() }),
    ) {
        let w = Var::from_tensor(&g.ones_like()?.to_dtype(g.dtype())?)?;
        let mut store = GradStore::default();
        store.insert(w.as_tensor(), g.clone());
        let mut monitor = GradMonitor::new(NamedVars::new([("net.w", w.clone())])?, MonitorConfig::default())?;
        let record = monitor.observe(0, &store).unwrap().unwrap().clone();
        let p = &record.params[0];
        let v = grad_testkit::values(&g)?;
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        prop_assert!(close(p.grad_norm, norm, 1e-12));
        prop_assert!(close(p.grad_mean, mean, 1e-12));
        prop_assert!(close(p.grad_std, std, 1e-9));
        prop_assert_eq!(p.grad_max_abs, v.iter().fold(0.0f64, |m, x| m.max(x.abs())));
        prop_assert_eq!(p.zero_fraction, v.iter().filter(|x| **x == 0.0).count() as f64 / n);
        prop_assert!(close(p.weight_norm, n.sqrt(), 1e-12));
        prop_assert!(close(record.global_grad_norm, norm, 1e-12));
    }

    #[test]
    fn the_history_never_exceeds_its_bound(bound in 1usize..8, steps in 1u64..40, every in 1u64..4) {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let cfg = MonitorConfig { history: bound, every, ..MonitorConfig::default() };
        let mut monitor = GradMonitor::new(NamedVars::new([("w", w.clone())])?, cfg)?;
        for step in 0..steps {
            let grads = w.sqr()?.sum_all()?.backward()?;
            let observed = monitor.observe(step, &grads)?.is_some();
            prop_assert_eq!(observed, step % every == 0);
            prop_assert!(monitor.history().len() <= bound);
        }
        let observed = steps.div_ceil(every) as usize;
        prop_assert_eq!(monitor.history().len(), observed.min(bound));
        let last = monitor.last().unwrap().step;
        prop_assert_eq!(last, (steps - 1) / every * every);
    }
}

/// What a probe should report for one forward of `g` (window 1), computed naively in f64.
fn check_probe(g: &Tensor, kind: ProbeKind) -> Result<(), TestCaseError> {
    let probe = Probe::new("p", kind, 1);
    let y = probe.try_forward(g).unwrap();
    prop_assert_eq!(
        grad_testkit::values(&y).unwrap(),
        grad_testkit::values(g).unwrap()
    );
    let s = probe.stats();
    let v = grad_testkit::values(&g.contiguous().unwrap()).unwrap();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    prop_assert!(close(s.mean, mean, 1e-12), "mean {} vs {}", s.mean, mean);
    prop_assert!(close(s.std, std, 1e-9), "std {} vs {}", s.std, std);
    let frac = |f: &dyn Fn(f64) -> bool| v.iter().filter(|x| f(**x)).count() as f64 / n;
    prop_assert_eq!(s.nonpositive_fraction, frac(&|x| x <= 0.0));
    let saturated = match kind {
        ProbeKind::Tanh => Some(frac(&|x| x.abs() > 0.99)),
        ProbeKind::Sigmoid => Some(frac(&|x| !(0.01..=0.99).contains(&x))),
        _ => None,
    };
    prop_assert_eq!(s.saturated_fraction, saturated);
    let (units, spatial) = match g.rank() {
        0 => (1, 1),
        1 => (v.len(), 1),
        _ => (g.dims()[1], g.dims()[2..].iter().product()),
    };
    prop_assert_eq!(s.units, units);
    if kind == ProbeKind::Relu {
        let dead = (0..units)
            .filter(|&u| {
                v.chunks(units * spatial).all(|row| {
                    row[u * spatial..(u + 1) * spatial]
                        .iter()
                        .all(|x| *x <= 0.0)
                })
            })
            .count();
        prop_assert_eq!(s.dead_fraction, Some(dead as f64 / units as f64));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn probe_statistics_equal_a_naive_computation(
        g in tensor(TensorSpec { values: Values::Finite { lo: -1.5, hi: 1.5 }, ..TensorSpec::default() }),
        kind in prop_oneof![Just(ProbeKind::Relu), Just(ProbeKind::Tanh), Just(ProbeKind::Sigmoid)],
    ) {
        check_probe(&g, kind)?;
    }
}

#[test]
fn probe_statistics_hold_across_many_blocks() -> TestResult {
    let mut rng = grad_core::Philox::new(7);
    for dims in [vec![300usize, 200], vec![4, 8, 40, 40]] {
        // Rounded to quarters, so exact zeros and saturated values occur.
        let x = (rng.normal(dims.as_slice(), 0.0, 1.0, DType::F32, &Device::Cpu)? * 4.0)?
            .round()?
            .affine(0.25, 0.0)?;
        for kind in [ProbeKind::Relu, ProbeKind::Tanh, ProbeKind::Sigmoid] {
            check_probe(&x, kind).unwrap();
        }
        check_probe(&x.to_dtype(DType::F64).unwrap(), ProbeKind::Relu).unwrap();
    }
    Ok(())
}

#[test]
fn gradient_statistics_hold_across_many_chunks() -> TestResult {
    let mut rng = grad_core::Philox::new(8);
    let g = (rng.normal((500, 300), 1e3, 1.0, DType::F32, &Device::Cpu)? * 2.0)?
        .round()?
        .affine(0.5, -1e3)?;
    let w = Var::from_tensor(&g.ones_like()?)?;
    let mut store = GradStore::default();
    store.insert(w.as_tensor(), g.clone());
    let mut monitor = GradMonitor::new(
        NamedVars::new([("w", w.clone())])?,
        MonitorConfig::default(),
    )?;
    let p = monitor.observe(0, &store).unwrap().unwrap().params[0].clone();
    let v = grad_testkit::values(&g)?;
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    assert!(close(
        p.grad_norm,
        v.iter().map(|x| x * x).sum::<f64>().sqrt(),
        1e-12
    ));
    assert!(close(p.grad_mean, mean, 1e-12));
    assert!(close(p.grad_std, std, 1e-9));
    assert_eq!(p.grad_max_abs, v.iter().fold(0.0f64, |m, x| m.max(x.abs())));
    let zeros = v.iter().filter(|x| **x == 0.0).count();
    assert!(zeros > 1000, "the test wants many zeros, got {zeros}");
    assert_eq!(p.zero_fraction, zeros as f64 / n);
    Ok(())
}

#[test]
fn update_ratios_are_exact_for_small_parameters_and_close_for_large_ones() -> TestResult {
    let dev = Device::Cpu;
    let small =
        Var::from_tensor(&grad_core::Philox::new(1).normal(100, 0.0, 1.0, DType::F64, &dev)?)?;
    let large = Var::from_tensor(&grad_core::Philox::new(2).normal(
        (300, 300),
        0.0,
        1.0,
        DType::F64,
        &dev,
    )?)?;
    let params = NamedVars::new([("a.small", small.clone()), ("b.large", large.clone())])?;
    let mut monitor = GradMonitor::new(params, MonitorConfig::default())?;
    let store = GradStore::default();
    monitor.observe(0, &store)?;
    let (ds, dl) = (
        grad_core::Philox::new(3).normal(100, 0.0, 1e-3, DType::F64, &dev)?,
        grad_core::Philox::new(4).normal((300, 300), 0.0, 1e-3, DType::F64, &dev)?,
    );
    let (ws, wl) = ((small.as_tensor() + &ds)?, (large.as_tensor() + &dl)?);
    small.set(&ws)?;
    large.set(&wl)?;
    let r = monitor.observe(1, &store).unwrap().unwrap().clone();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let exact_small = norm(&ds) / norm(&ws);
    let exact_large = norm(&dl) / norm(&wl);
    assert!(close(r.params[0].update_ratio.unwrap(), exact_small, 1e-12));
    // 4096 of 90,000 elements sampled: within a few percent.
    assert!((r.params[1].update_ratio.unwrap() / exact_large - 1.0).abs() < 0.1);
    Ok(())
}

#[test]
fn probes_are_thread_safe() -> TestResult {
    let probe = Probe::new("shared", ProbeKind::Relu, 2);
    std::thread::scope(|s| {
        for t in 0..4 {
            let p = probe.clone();
            s.spawn(move || {
                for _ in 0..25 {
                    let x = Tensor::full(t as f32 - 1.5, (3, 5), &Device::Cpu).unwrap();
                    p.try_forward(&x).unwrap();
                }
            });
        }
    });
    let s = probe.stats();
    assert_eq!(s.forwards, 100);
    assert_eq!(s.units, 5);
    Ok(())
}

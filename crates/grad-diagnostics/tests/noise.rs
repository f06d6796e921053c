//! Gradient noise from micro-batch gradients: the estimates are unbiased on synthetic
//! gradients of known mean and covariance, the simple noise scale matches a linear
//! regression's closed form, the fused and composed paths agree, bad input is an error, and
//! the detectors read the records.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use grad_core::device::{Path, with_path};
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{
    DetectorConfig, FindingKind, GradMonitor, MonitorConfig, NoiseRecord, Remedy, StepContext,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two layers: `a.weight` (3×4) and `b.bias` (5).
struct Model {
    vars: Vec<Var>,
    monitor: GradMonitor,
}

impl Model {
    fn new(dtype: DType) -> Self {
        let dev = Device::Cpu;
        let vars = vec![
            Var::zeros((3, 4), dtype, &dev).unwrap(),
            Var::zeros(5, dtype, &dev).unwrap(),
        ];
        let params =
            NamedVars::new([("a.weight", vars[0].clone()), ("b.bias", vars[1].clone())]).unwrap();
        let monitor = GradMonitor::new(params, MonitorConfig::default()).unwrap();
        Self { vars, monitor }
    }

    /// A store holding `grads` (flat, 12 + 5 values) for the two variables.
    fn store(&self, grads: &[f64]) -> GradStore {
        let mut store = GradStore::default();
        let dtype = self.vars[0].dtype();
        let a = Tensor::new(&grads[..12], &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = Tensor::new(&grads[12..], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        store.insert(self.vars[0].as_tensor(), a);
        store.insert(self.vars[1].as_tensor(), b);
        store
    }
}

/// Per-sample gradients `μ + L z` (z standard normal), so Σ = L Lᵀ; a micro-batch gradient of
/// `b` samples is `μ + L z / √b`.
struct Synthetic {
    mu: Vec<f64>,
    /// Lower-triangular, 17×17, row-major.
    l: Vec<f64>,
}

const N: usize = 17;

impl Synthetic {
    fn new() -> Self {
        let mut rng = Philox::new(5);
        let mu: Vec<f64> = rng
            .normal(N, 0.0, 0.3, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let raw: Vec<f64> = rng
            .normal(N * N, 0.0, 1.0, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let l = (0..N * N)
            .map(|idx| {
                let (i, j) = (idx / N, idx % N);
                if j < i {
                    0.3 * raw[idx]
                } else if j == i {
                    0.5 + raw[idx].abs()
                } else {
                    0.0
                }
            })
            .collect();
        Self { mu, l }
    }

    fn gradient_sq(&self) -> f64 {
        self.mu.iter().map(|m| m * m).sum()
    }

    /// The first `N` rows' squared norms: `tr(L Lᵀ)`.
    fn trace(&self) -> f64 {
        self.l.iter().map(|x| x * x).sum()
    }

    /// `tr` of the first layer's block (elements 0..12).
    fn layer_trace(&self, range: std::ops::Range<usize>) -> f64 {
        range
            .map(|i| (0..N).map(|j| self.l[i * N + j].powi(2)).sum::<f64>())
            .sum()
    }

    fn micro_batch(&self, b: usize, rng: &mut Philox) -> Vec<f64> {
        let z: Vec<f64> = rng
            .normal(N, 0.0, 1.0, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = 1.0 / (b as f64).sqrt();
        (0..N)
            .map(|i| self.mu[i] + scale * (0..N).map(|j| self.l[i * N + j] * z[j]).sum::<f64>())
            .collect()
    }
}

/// The mean and its standard error.
fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[test]
fn the_estimates_are_unbiased_on_gradients_of_known_mean_and_covariance() -> TestResult {
    let truth = Synthetic::new();
    let model = Model::new(DType::F64);
    let b = 8;
    for k in [2usize, 4] {
        let mut rng = Philox::new(100 + k as u64);
        let (mut g, mut t, mut ta) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3000 {
            let stores: Vec<GradStore> = (0..k)
                .map(|_| model.store(&truth.micro_batch(b, &mut rng)))
                .collect();
            let noise = model.monitor.gradient_noise(&stores, b)?;
            assert_eq!((noise.micro_batches, noise.micro_batch_size), (k, b));
            g.push(noise.gradient_sq);
            t.push(noise.trace);
            ta.push(noise.layers[0].trace);
        }
        for (name, xs, expected) in [
            ("|G|²", &g, truth.gradient_sq()),
            ("tr Σ", &t, truth.trace()),
            ("tr Σ of a", &ta, truth.layer_trace(0..12)),
        ] {
            let (mean, se) = mean_se(xs);
            assert!(
                (mean - expected).abs() <= 4.0 * se,
                "k = {k}: {name} {mean} ± {se}, expected {expected}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_noise_scale_of_a_linear_regression_matches_its_closed_form() -> TestResult {
    // y = xᵀw* + ε with x ~ N(0, I_d), ε ~ N(0, σ²), loss ½(xᵀw − y)² at w = w* + δ: the
    // per-sample gradient x(xᵀδ − ε) has mean δ and covariance (|δ|² + σ²) I + δδᵀ, so
    // B_simple = (d (|δ|² + σ²) + |δ|²) / |δ|².
    let (d, sigma) = (8usize, 0.5f64);
    let dev = Device::Cpu;
    let mut rng = Philox::new(9);
    let delta = rng.normal(d, 0.0, 1.0, DType::F64, &dev)?;
    let delta = (&delta / delta.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?)?; // |δ| = 1
    let w_star = rng.normal(d, 0.0, 1.0, DType::F64, &dev)?;
    let w = Var::from_tensor(&(&w_star + &delta)?)?;
    let monitor = GradMonitor::new(
        NamedVars::new([("fc.weight", w.clone())])?,
        MonitorConfig::default(),
    )?;
    let expected = (d as f64 * (1.0 + sigma * sigma) + 1.0) / 1.0;
    let (k, b) = (4usize, 32usize);
    let (mut g, mut t) = (0.0, 0.0);
    let steps = 1500;
    for _ in 0..steps {
        let stores = (0..k)
            .map(|_| {
                let x = rng.normal((b, d), 0.0, 1.0, DType::F64, &dev)?;
                let eps = rng.normal(b, 0.0, sigma, DType::F64, &dev)?;
                let y = (x.matmul(&w_star.unsqueeze(1)?)?.squeeze(1)? + eps)?;
                let r = (x.matmul(&w.as_tensor().unsqueeze(1)?)?.squeeze(1)? - y)?;
                Ok((r.sqr()?.mean_all()? * 0.5)?.backward()?)
            })
            .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
        let noise = monitor.gradient_noise(&stores, b)?;
        g += noise.gradient_sq;
        t += noise.trace;
    }
    let estimate = t / g;
    assert!(
        (estimate - expected).abs() <= 0.05 * expected,
        "B_simple {estimate}, closed form {expected} (|G|² {}, tr Σ {})",
        g / steps as f64,
        t / steps as f64
    );
    Ok(())
}

#[test]
fn fused_and_composed_agree_and_the_mean_is_the_mean() -> TestResult {
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let model = Model::new(dtype);
        let truth = Synthetic::new();
        let mut rng = Philox::new(3);
        let grads: Vec<Vec<f64>> = (0..3).map(|_| truth.micro_batch(4, &mut rng)).collect();
        let stores: Vec<GradStore> = grads.iter().map(|g| model.store(g)).collect();
        let fused = with_path(Path::Fused, || model.monitor.gradient_noise(&stores, 4))?;
        let composed = with_path(Path::Composed, || model.monitor.gradient_noise(&stores, 4))?;
        let mean = model.monitor.mean_gradients(&stores)?;
        // Both paths read the same stored values; f16 and bf16 sum in f32 on the fused path,
        // and the mean is rounded to the dtype.
        let (tol, mean_tol) = match dtype {
            DType::F64 => (1e-12, 1e-12),
            DType::F32 => (1e-5, 1e-5),
            _ => (1e-5, 2e-2),
        };
        let close = |a: f64, b: f64| (a - b).abs() <= tol * (1.0 + b.abs());
        assert!(
            close(fused.gradient_sq, composed.gradient_sq),
            "{fused:?} {composed:?}"
        );
        assert!(close(fused.trace, composed.trace), "{fused:?} {composed:?}");
        for (a, b) in fused.layers.iter().zip(&composed.layers) {
            assert_eq!(a.name, b.name);
            assert!(close(a.snr, b.snr), "{a:?} {b:?}");
        }
        let m = mean.get(model.vars[1].as_tensor()).expect("mean of b.bias");
        let m: Vec<f64> = m.to_dtype(DType::F64)?.to_vec1()?;
        for (j, v) in m.iter().enumerate() {
            let expected = grads.iter().map(|g| g[12 + j]).sum::<f64>() / 3.0;
            assert!(
                (v - expected).abs() <= mean_tol * (1.0 + expected.abs()),
                "{dtype:?}: {v} vs {expected}"
            );
        }
    }
    // Large tensors, across many chunks and threads, against the same sums in f64 by hand.
    let dev = Device::Cpu;
    let v = Var::zeros(300_001, DType::F32, &dev)?;
    let monitor = GradMonitor::new(
        NamedVars::new([("big.weight", v.clone())])?,
        MonitorConfig::default(),
    )?;
    let gs: Vec<Tensor> = (0..4)
        .map(|i| Philox::new(i).normal(300_001, 0.1, 1.0, DType::F32, &dev))
        .collect::<grad_core::Result<_>>()?;
    let stores: Vec<GradStore> = gs
        .iter()
        .map(|g| {
            let mut s = GradStore::default();
            s.insert(v.as_tensor(), g.clone());
            s
        })
        .collect();
    let fused = with_path(Path::Fused, || monitor.gradient_noise(&stores, 2))?;
    let composed = with_path(Path::Composed, || monitor.gradient_noise(&stores, 2))?;
    // The fused kernel sums f32 gradients in f32 within blocks of 512 elements (the composed
    // path in f64): agreement to f32's rounding of those partial sums.
    assert!(
        (fused.trace - composed.trace).abs() <= 1e-6 * composed.trace.abs(),
        "{fused:?} {composed:?}"
    );
    assert!(
        (fused.gradient_sq - composed.gradient_sq).abs() <= 1e-6 * composed.trace.abs(),
        "{fused:?} {composed:?}"
    );
    Ok(())
}

#[test]
fn bad_input_is_an_error_naming_the_argument() -> TestResult {
    let model = Model::new(DType::F32);
    let g = vec![0.5; N];
    let one = [model.store(&g)];
    let err = model.monitor.gradient_noise(&one, 8).unwrap_err();
    assert!(err.to_string().contains("micro_batches = 1"), "{err}");
    let err = model.monitor.mean_gradients(&one).unwrap_err();
    assert!(err.to_string().contains("micro_batches = 1"), "{err}");
    let err = model.monitor.gradient_noise(&[], 8).unwrap_err();
    assert!(err.to_string().contains("micro_batches = 0"), "{err}");
    let two = [model.store(&g), model.store(&g)];
    let err = model.monitor.gradient_noise(&two, 0).unwrap_err();
    assert!(err.to_string().contains("micro_batch_size = 0"), "{err}");

    // A gradient of another shape in one micro-batch.
    let mut odd = model.store(&g);
    odd.insert(
        model.vars[1].as_tensor(),
        Tensor::zeros(4, DType::F32, &Device::Cpu)?,
    );
    let err = model
        .monitor
        .gradient_noise(&[model.store(&g), odd], 8)
        .unwrap_err();
    assert!(err.to_string().contains("b.bias in micro-batch 1"), "{err}");
    // Another dtype.
    let mut odd = model.store(&g);
    odd.insert(
        model.vars[1].as_tensor(),
        Tensor::zeros(5, DType::F64, &Device::Cpu)?,
    );
    let err = model
        .monitor
        .gradient_noise(&[odd, model.store(&g)], 8)
        .unwrap_err();
    assert!(err.to_string().contains("b.bias in micro-batch 0"), "{err}");
    // Missing from one micro-batch only.
    let mut partial = model.store(&g);
    partial.remove(model.vars[0].as_tensor());
    let err = model
        .monitor
        .gradient_noise(&[model.store(&g), model.store(&g), partial], 8)
        .unwrap_err();
    assert!(
        err.to_string().contains("a.weight in micro-batch 2"),
        "{err}"
    );

    // Identical micro-batches: no noise, an infinite signal-to-noise ratio, a zero scale.
    let noise = model.monitor.gradient_noise(&two, 8)?;
    assert_eq!(noise.trace, 0.0);
    assert_eq!(noise.simple_noise_scale, 0.0);
    assert!(noise.layers.iter().all(|l| l.snr == f64::INFINITY));
    // Zero gradients everywhere: no signal and no noise, said as an infinite scale and a
    // ratio of 0, never NaN.
    let zeros = vec![0.0; N];
    let noise = model
        .monitor
        .gradient_noise(&[model.store(&zeros), model.store(&zeros)], 8)?;
    assert_eq!(noise.simple_noise_scale, f64::INFINITY);
    assert_eq!(noise.layers.len(), 2);
    assert!(noise.layers.iter().all(|l| l.snr == 0.0), "{noise:?}");
    // NaN gradients are not hidden.
    let mut nan = g.clone();
    nan[0] = f64::NAN;
    let noise = model
        .monitor
        .gradient_noise(&[model.store(&nan), model.store(&g)], 8)?;
    assert!(
        noise.trace.is_nan() && noise.layers[0].snr.is_nan(),
        "{noise:?}"
    );

    for (field, cfg) in [
        (
            "noise_scale_ratio",
            DetectorConfig {
                noise_scale_ratio: 1.0,
                ..Default::default()
            },
        ),
        (
            "low_snr",
            DetectorConfig {
                low_snr: 0.0,
                ..Default::default()
            },
        ),
    ] {
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    Ok(())
}

/// A record of `k` micro-batches of `b` with the given scale and per-layer ratios.
fn noise(scale: f64, k: usize, b: usize, snr: &[(&str, f64)]) -> NoiseRecord {
    NoiseRecord {
        micro_batches: k,
        micro_batch_size: b,
        gradient_sq: 1.0,
        trace: scale,
        simple_noise_scale: scale,
        layers: snr
            .iter()
            .map(|(name, s)| grad_diagnostics::LayerNoise {
                name: (*name).into(),
                gradient_sq: 1.0,
                trace: 1.0,
                snr: *s,
            })
            .collect(),
    }
}

#[test]
fn the_detectors_flag_a_small_batch_and_a_noisy_layer_from_the_records() -> TestResult {
    let mut model = Model::new(DType::F32);
    let g = vec![0.5; N];
    let grads = model.store(&g);
    let monitor = &mut model.monitor;
    for step in 0..6 {
        // B_simple 5,000 against a batch of 4 × 32 = 128; layer b stays at SNR 0.01.
        let n = noise(5000.0, 4, 32, &[("a", 2.0), ("b", 0.01)]);
        let ctx = StepContext {
            noise: Some(&n),
            ..Default::default()
        };
        monitor.observe_with(step, &grads, ctx)?;
    }
    let findings = monitor.findings();
    let scale = findings
        .iter()
        .find(|f| f.kind == FindingKind::NoiseScale)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert!(scale.evidence.contains("128"), "{scale}");
    assert_eq!(scale.remedies, [Remedy::LargerBatch]);
    let low = findings
        .iter()
        .find(|f| f.kind == FindingKind::LowSignalToNoise)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(low.layers, ["b"]);
    assert_eq!(low.steps, [0, 5]);

    // The same from the JSON Lines log: the records carry the noise.
    let dir = std::env::temp_dir().join(format!("gradkit-noise-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("log.jsonl");
    let mut sink = grad_diagnostics::JsonlSink::create(&path)?;
    for r in monitor.history() {
        sink.write(r)?;
    }
    drop(sink);
    let log = grad_diagnostics::read_log(&path)?;
    let again = grad_diagnostics::detect(&log.records, &DetectorConfig::default());
    assert_eq!(again, findings);
    let plotted = grad_diagnostics::plot::noise_scale(&log.records, &dir.join("noise.svg"))?;
    let svg = std::fs::read_to_string(plotted)?;
    assert!(svg.contains("<svg"));
    std::fs::remove_dir_all(&dir)?;

    // A batch near the noise scale with healthy layers: nothing.
    let mut model = Model::new(DType::F32);
    let grads = model.store(&g);
    let monitor = &mut model.monitor;
    for step in 0..6 {
        let n = noise(200.0, 4, 32, &[("a", 2.0), ("b", 0.5)]);
        let ctx = StepContext {
            noise: Some(&n),
            ..Default::default()
        };
        monitor.observe_with(step, &grads, ctx)?;
    }
    let findings = monitor.findings();
    assert!(
        findings.iter().all(|f| !matches!(
            f.kind,
            FindingKind::NoiseScale | FindingKind::LowSignalToNoise
        )),
        "{findings:#?}"
    );
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// On random micro-batch gradients: the fused and composed paths agree, reversing the
    /// micro-batches changes nothing, scaling every gradient by `c` scales `|G|²` and `tr(Σ)`
    /// by `c²` and leaves `B_simple` and the ratios alone.
    #[test]
    fn the_estimates_are_invariant_to_order_and_scale(
        k in 2usize..6,
        seed in 0u64..10_000,
        c in 0.01f64..100.0,
        b in 1usize..64,
    ) {
        let model = Model::new(DType::F64);
        let mut rng = Philox::new(seed);
        let grads: Vec<Vec<f64>> = (0..k)
            .map(|_| rng.normal(N, 0.2, 1.0, DType::F64, &Device::Cpu).unwrap().to_vec1().unwrap())
            .collect();
        let stores: Vec<GradStore> = grads.iter().map(|g| model.store(g)).collect();
        let reversed: Vec<GradStore> = grads.iter().rev().map(|g| model.store(g)).collect();
        let scaled: Vec<GradStore> = grads
            .iter()
            .map(|g| model.store(&g.iter().map(|x| c * x).collect::<Vec<_>>()))
            .collect();
        let close = |a: f64, e: f64| (a - e).abs() <= 1e-9 * (1.0 + e.abs());
        let fused = with_path(Path::Fused, || model.monitor.gradient_noise(&stores, b))?;
        let composed = with_path(Path::Composed, || model.monitor.gradient_noise(&stores, b))?;
        let back = model.monitor.gradient_noise(&reversed, b)?;
        let big = model.monitor.gradient_noise(&scaled, b)?;
        for other in [&composed, &back] {
            proptest::prop_assert!(close(fused.trace, other.trace), "{:?} {:?}", fused, other);
            proptest::prop_assert!(close(fused.gradient_sq, other.gradient_sq), "{:?} {:?}", fused, other);
        }
        proptest::prop_assert!(close(big.trace, c * c * fused.trace));
        let scale_close = |a: f64, e: f64| a == e || (a - e).abs() <= 1e-8 * e.abs();
        proptest::prop_assert!(scale_close(big.simple_noise_scale, fused.simple_noise_scale), "{:?} {:?}", big, fused);
        for (x, y) in big.layers.iter().zip(&fused.layers) {
            proptest::prop_assert!(scale_close(x.snr, y.snr), "{:?} {:?}", x, y);
        }
    }
}

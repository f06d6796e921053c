//! Sharpness: the top Hessian eigenvalue by power iteration on finite-difference
//! Hessian-vector products, the parameters restored bit for bit, and the curvature-limit
//! finding on real training.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{Mlp, Style};
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{Error, FindingKind, Remedy, SharpnessConfig, sharpness};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Every parameter's bits, to compare before and after.
fn bits(params: &NamedVars) -> Vec<Vec<u64>> {
    params
        .vars()
        .iter()
        .map(|v| {
            let t = v.as_tensor().flatten_all().unwrap();
            match t.dtype() {
                DType::F64 => t
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                _ => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| u64::from(x.to_bits()))
                    .collect(),
            }
        })
        .collect()
}

/// `A = Q diag(eigenvalues) Qᵀ` with a seeded random orthogonal `Q` (n × n, f64).
fn symmetric_with(eigenvalues: &[f64], seed: u64) -> Tensor {
    let n = eigenvalues.len();
    let dev = Device::Cpu;
    let g = Philox::new(seed)
        .normal((n, n), 0.0, 1.0, DType::F64, &dev)
        .unwrap();
    // Gram-Schmidt on the columns.
    let cols: Vec<Vec<f64>> = g.t().unwrap().to_vec2().unwrap();
    let mut q: Vec<Vec<f64>> = Vec::new();
    for mut c in cols {
        for u in &q {
            let d: f64 = c.iter().zip(u).map(|(a, b)| a * b).sum();
            c.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
        }
        let norm = c.iter().map(|a| a * a).sum::<f64>().sqrt();
        q.push(c.iter().map(|a| a / norm).collect());
    }
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            a[i * n + j] = (0..n).map(|k| q[k][i] * eigenvalues[k] * q[k][j]).sum();
        }
    }
    Tensor::from_vec(a, (n, n), &dev).unwrap()
}

/// `L(θ) = ½ θᵀ A θ` with θ split over two variables (a 3×2 "weight" and a 4-vector "bias").
struct Quadratic {
    params: NamedVars,
    w: Var,
    b: Var,
    a: Tensor,
}

impl Quadratic {
    fn new(eigenvalues: &[f64], dtype: DType) -> Self {
        assert_eq!(eigenvalues.len(), 10);
        let dev = Device::Cpu;
        let theta = Philox::new(7)
            .normal(10, 0.0, 1.0, DType::F64, &dev)
            .unwrap();
        let w = Var::from_tensor(
            &theta
                .narrow(0, 0, 6)
                .unwrap()
                .reshape((3, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(&theta.narrow(0, 6, 4).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let params =
            NamedVars::new([("layer.0.weight", w.clone()), ("layer.1.bias", b.clone())]).unwrap();
        let a = symmetric_with(eigenvalues, 3).to_dtype(dtype).unwrap();
        Self { params, w, b, a }
    }

    fn loss(&self) -> candle_core::Result<Tensor> {
        let theta = Tensor::cat(
            &[
                self.w.as_tensor().flatten_all()?,
                self.b.as_tensor().clone(),
            ],
            0,
        )?
        .unsqueeze(1)?;
        (theta.t()?.matmul(&self.a.matmul(&theta)?)? * 0.5)?.sum_all()
    }
}

#[test]
fn a_quadratic_gives_its_top_eigenvalue_within_1e_3() -> TestResult {
    let eigenvalues = [9.0, 4.0, 3.0, 2.5, 1.0, 0.5, 0.2, 0.1, -0.3, -1.0];
    let q = Quadratic::new(&eigenvalues, DType::F64);
    let before = bits(&q.params);
    let config = SharpnessConfig {
        iterations: 200,
        tolerance: 1e-9,
        ..Default::default()
    };
    let s = sharpness(&q.params, || q.loss(), &config)?;
    assert!(
        (s.top_eigenvalue - 9.0).abs() <= 1e-3 * 9.0,
        "{} after {} iterations",
        s.top_eigenvalue,
        s.iterations
    );
    assert!(s.converged);
    assert_eq!(s.gradient_evaluations, 2 * s.iterations);
    assert_eq!(bits(&q.params), before);
    // The shares of the eigenvector sum to one, one row per layer, in the parameters' order.
    let names: Vec<&str> = s.layers.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(names, ["layer.0", "layer.1"]);
    let total: f64 = s.layers.iter().map(|(_, share)| share).sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");

    // f32 parameters: the finite differences of f32 gradients, still within 1e-3.
    let q = Quadratic::new(&eigenvalues, DType::F32);
    let before = bits(&q.params);
    let s = sharpness(&q.params, || q.loss(), &config)?;
    assert!(
        (s.top_eigenvalue - 9.0).abs() <= 1e-3 * 9.0,
        "f32: {}",
        s.top_eigenvalue
    );
    assert_eq!(bits(&q.params), before);
    Ok(())
}

#[test]
fn a_dominant_negative_eigenvalue_does_not_hide_the_top_one() -> TestResult {
    // Near a saddle the most curved direction can be a descending one: power iteration finds
    // it first, and the shifted second phase still finds the top eigenvalue.
    let eigenvalues = [2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.5, -6.0];
    let q = Quadratic::new(&eigenvalues, DType::F64);
    let config = SharpnessConfig {
        iterations: 400,
        tolerance: 1e-10,
        ..Default::default()
    };
    let s = sharpness(&q.params, || q.loss(), &config)?;
    assert!((s.top_eigenvalue - 2.0).abs() <= 2e-3, "{s:?}");
    let negative = s.most_negative.expect("the -6 found first");
    assert!((negative + 6.0).abs() <= 6e-3, "{s:?}");
    assert!(s.finding(1.5, 0)?.is_some()); // 2 > 2 / 1.5
    assert!(s.finding(0.9, 0)?.is_none()); // 2 < 2 / 0.9

    // A negative and a positive eigenvalue of the same size: the Rayleigh quotient of phase
    // one is stuck between them, the second phase is not.
    let q = Quadratic::new(
        &[5.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.5, -5.0],
        DType::F64,
    );
    let s = sharpness(&q.params, || q.loss(), &config)?;
    assert!((s.top_eigenvalue - 5.0).abs() <= 5e-3, "{s:?}");
    Ok(())
}

#[test]
fn a_linear_loss_has_no_curvature() -> TestResult {
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?)?;
    let params = NamedVars::new([("w", w.clone())])?;
    let s = sharpness(
        &params,
        || w.as_tensor().sum_all(),
        &SharpnessConfig::default(),
    )?;
    assert_eq!(s.top_eigenvalue, 0.0);
    assert!(s.converged);
    assert_eq!(s.iterations, 1);
    assert_eq!(s.most_negative, None);
    Ok(())
}

#[test]
fn a_parameter_the_loss_never_reaches_counts_as_flat() -> TestResult {
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu)?)?;
    let unused = Var::from_tensor(&Tensor::new(&[5.0f64], &Device::Cpu)?)?;
    let params = NamedVars::new([("a.w", w.clone()), ("b.unused", unused)])?;
    let s = sharpness(
        &params,
        || (w.as_tensor().sqr()? * 2.0)?.sum_all(),
        &SharpnessConfig::default(),
    )?;
    assert!(
        (s.top_eigenvalue - 4.0).abs() < 1e-6,
        "{}",
        s.top_eigenvalue
    );
    let unused_share = s.layers.iter().find(|(l, _)| l == "b").map(|(_, x)| *x);
    assert!(unused_share.is_some_and(|x| x < 1e-12), "{:?}", s.layers);
    Ok(())
}

fn digits_batch(n: usize) -> (Tensor, Tensor) {
    let data =
        grad_testkit::digits::load(&grad_testkit::digits::default_path(), &Device::Cpu).unwrap();
    (
        data.train.images.narrow(0, 0, n).unwrap(),
        data.train.labels.narrow(0, 0, n).unwrap(),
    )
}

/// Full-batch SGD on a fixed batch of digits: the loss at each step.
fn train_losses(net: &Mlp, x: &Tensor, y: &Tensor, lr: f64, steps: usize) -> Vec<f64> {
    use candle_nn::Optimizer;
    let mut sgd = candle_nn::SGD::new(net.params().vars().to_vec(), lr).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = candle_nn::loss::cross_entropy(&net.forward(x), y).unwrap();
        losses.push(f64::from(loss.to_scalar::<f32>().unwrap()));
        sgd.backward_step(&loss).unwrap();
    }
    losses
}

#[test]
fn the_digits_mlp_at_a_diverging_learning_rate_is_flagged_before_it_diverges() -> TestResult {
    let (x, y) = digits_batch(256);
    let net = Mlp::new(4, 32, Style::ScaledRelu(1.0), 11);
    let params = net.params();
    let before = bits(&params);
    let config = SharpnessConfig {
        iterations: 30,
        ..Default::default()
    };
    let s = sharpness(
        &params,
        || candle_nn::loss::cross_entropy(&net.forward(&x), &y),
        &config,
    )?;
    assert_eq!(bits(&params), before, "parameters restored");
    assert!(s.top_eigenvalue > 0.0, "{s:?}");
    let limit_lr = 2.0 / s.top_eigenvalue;

    // Eight times the limit: flagged at step 0, and the loss then blows up (measured: 2.47
    // at step 0, above 30 by step 8, NaN by step 13). Between about 1.5 and 4 times the
    // limit this network oscillates instead (the catapult of Lewkowycz et al. 2020) and at
    // 16 times it collapses to chance: a learning rate above the limit is a warning, not a
    // verdict.
    let fast = 8.0 * limit_lr;
    let f = s.finding(fast, 0)?.expect("flagged at step 0");
    assert_eq!(f.kind, FindingKind::CurvatureLimit);
    assert_eq!(f.severity, grad_diagnostics::Severity::Critical);
    assert!(f.remedies.contains(&Remedy::LowerLearningRate), "{f}");
    assert!(!f.layers.is_empty(), "{f}");
    let losses = train_losses(&net, &x, &y, fast, 30);
    let first = losses[0];
    let diverged = losses
        .iter()
        .position(|l| !l.is_finite() || *l > 10.0 * first);
    assert!(
        diverged.is_some_and(|step| step > 0),
        "lr {fast}: {losses:?}"
    );

    // Half the limit on a fresh copy of the same network: not flagged, and it trains.
    let net = Mlp::new(4, 32, Style::ScaledRelu(1.0), 11);
    let slow = 0.5 * limit_lr;
    assert!(s.finding(slow, 0)?.is_none());
    let losses = train_losses(&net, &x, &y, slow, 30);
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses[29] < 0.8 * losses[0],
        "lr {slow}: {losses:?}"
    );
    Ok(())
}

#[test]
fn bad_input_is_an_error_and_leaves_the_parameters_unchanged() -> TestResult {
    let q = Quadratic::new(
        &[5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        DType::F32,
    );
    let before = bits(&q.params);
    let message = |config: SharpnessConfig| {
        sharpness(&q.params, || q.loss(), &config)
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            SharpnessConfig {
                iterations: 0,
                ..Default::default()
            },
            "iterations = 0",
        ),
        (
            SharpnessConfig {
                epsilon: 0.0,
                ..Default::default()
            },
            "epsilon = 0",
        ),
        (
            SharpnessConfig {
                epsilon: -1e-3,
                ..Default::default()
            },
            "epsilon = -0.001",
        ),
        (
            SharpnessConfig {
                epsilon: f64::NAN,
                ..Default::default()
            },
            "epsilon = NaN",
        ),
        (
            SharpnessConfig {
                tolerance: 1.0,
                ..Default::default()
            },
            "tolerance = 1",
        ),
    ];
    for (config, expected) in cases {
        let m = message(config);
        assert!(m.contains(expected), "{m}");
    }

    // A loss that fails on its third call: the error comes back, the parameters as they were.
    let mut calls = 0;
    let err = sharpness(
        &q.params,
        || {
            calls += 1;
            if calls == 3 {
                candle_core::bail!("the data loader ran dry")
            }
            q.loss()
        },
        &SharpnessConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("ran dry"), "{err}");
    assert_eq!(bits(&q.params), before);

    // A loss that is not a scalar.
    let err = sharpness(
        &q.params,
        || q.w.as_tensor().sqr(),
        &SharpnessConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("loss"), "{err}");
    assert_eq!(bits(&q.params), before);

    // A NaN loss.
    let err = sharpness(
        &q.params,
        || q.loss()?.affine(f64::NAN, 0.0),
        &SharpnessConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Core(grad_core::Error::NonFinite { .. })),
        "{err}"
    );
    assert_eq!(bits(&q.params), before);

    // No parameters; an integer parameter.
    let err = sharpness(
        &NamedVars::new(Vec::<(String, Var)>::new())?,
        || q.loss(),
        &SharpnessConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("params is empty"), "{err}");
    let ints = NamedVars::new([(
        "steps",
        Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu)?)?,
    )])?;
    let err = sharpness(&ints, || q.loss(), &SharpnessConfig::default()).unwrap_err();
    assert!(err.to_string().contains("U32"), "{err}");
    assert_eq!(bits(&q.params), before);

    // A learning rate that is not finite and positive.
    let s = sharpness(&q.params, || q.loss(), &SharpnessConfig::default())?;
    for lr in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        assert!(s.finding(lr, 0).is_err(), "lr {lr}");
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// On `½ Σ dᵢ θᵢ²` the top eigenvalue is the largest `dᵢ` (kept 1.5x above the rest so 60
    /// iterations converge), scaling the loss by `c > 0` scales it by `c`, and the parameters
    /// come back bit for bit.
    #[test]
    fn a_diagonal_quadratic_gives_its_largest_coefficient(
        rest in proptest::collection::vec(-4.0f64..4.0, 1..12),
        top in 6.0f64..50.0,
        c in 0.1f64..10.0,
        seed in 0u64..1000,
    ) {
        let mut d = rest;
        d.push(top);
        let n = d.len();
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Philox::new(seed).normal(n, 0.0, 1.0, DType::F64, &dev)?)?;
        let params = NamedVars::new([("w", w.clone())])?;
        let before = bits(&params);
        let coefficients = Tensor::from_vec(d, n, &dev)?;
        let config = SharpnessConfig { iterations: 60, tolerance: 1e-12, seed, ..Default::default() };
        let loss = |scale: f64| {
            let (w, coefficients) = (w.clone(), coefficients.clone());
            move || w.as_tensor().sqr()?.mul(&coefficients)?.sum_all()? * (0.5 * scale)
        };
        let s = sharpness(&params, loss(1.0), &config)?;
        proptest::prop_assert!((s.top_eigenvalue - top).abs() <= 1e-3 * top, "{:?}", s);
        let scaled = sharpness(&params, loss(c), &config)?;
        proptest::prop_assert!((scaled.top_eigenvalue - c * top).abs() <= 1e-3 * c * top, "{:?}", scaled);
        proptest::prop_assert_eq!(bits(&params), before);
    }
}

//! Initialisation: sample statistics against the formulas (5-sigma bounds, fixed seeds),
//! orthogonality, truncation, LSUV on a 10-layer MLP, and bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use grad_core::Philox;
use grad_layers::init::{FanMode, Initializer, Nonlinearity, calculate_gain, fans};
use grad_layers::lsuv::{LsuvConfig, lsuv};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
}

/// Kolmogorov–Smirnov distance between a sample and a CDF.
fn ks(sample: &[f64], cdf: impl Fn(f64) -> f64) -> f64 {
    let mut s = sample.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    s.iter()
        .enumerate()
        .map(|(i, x)| {
            let f = cdf(*x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0, f64::max)
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / 2f64.sqrt()))
}

#[test]
fn kaiming_and_xavier_samples_match_their_bounds_and_std() -> TestResult {
    let dev = Device::Cpu;
    let shape = [512usize, 256, 3];
    let (fan_in, fan_out) = fans(&shape)?;
    let n = shape.iter().product::<usize>() as f64;
    let mut rng = Philox::new(42);
    let cases = [
        (
            Initializer::KaimingUniform {
                a: 0.0,
                mode: FanMode::FanIn,
                nonlinearity: Nonlinearity::Relu,
            },
            true,
            2f64.sqrt() / (fan_in as f64).sqrt(),
        ),
        (
            Initializer::KaimingNormal {
                a: 0.2,
                mode: FanMode::FanOut,
                nonlinearity: Nonlinearity::LeakyRelu,
            },
            false,
            calculate_gain(Nonlinearity::LeakyRelu, Some(0.2))? / (fan_out as f64).sqrt(),
        ),
        (
            Initializer::XavierUniform { gain: 1.0 },
            true,
            (2.0 / (fan_in + fan_out) as f64).sqrt(),
        ),
        (
            Initializer::XavierNormal { gain: 5.0 / 3.0 },
            false,
            5.0 / 3.0 * (2.0 / (fan_in + fan_out) as f64).sqrt(),
        ),
    ];
    for (init, uniform, std) in cases {
        let v = vals(&init.sample(&shape[..], DType::F32, &dev, &mut rng)?);
        let (m, var) = moments(&v);
        assert!(m.abs() < 5.0 * std / n.sqrt(), "{init:?}: mean {m}");
        // Sample variance sd: sigma^2 sqrt(2/n) for normals, sigma^2 sqrt(0.8/n) for uniforms.
        let var_sd = std
            * std
            * if uniform {
                (0.8 / n).sqrt()
            } else {
                (2.0 / n).sqrt()
            };
        assert!(
            (var - std * std).abs() < 5.0 * var_sd,
            "{init:?}: var {var} vs {}",
            std * std
        );
        if uniform {
            let bound = 3f64.sqrt() * std;
            assert!(v.iter().all(|x| x.abs() <= bound * (1.0 + 1e-6)));
            let d = ks(&v[..20_000], |x| {
                ((x + bound) / (2.0 * bound)).clamp(0.0, 1.0)
            });
            assert!(d < 1.63 / (20_000f64).sqrt() * 1.5, "{init:?}: KS {d}");
        } else {
            let d = ks(&v[..20_000], |x| normal_cdf(x / std));
            assert!(d < 1.63 / (20_000f64).sqrt() * 1.5, "{init:?}: KS {d}");
        }
    }
    Ok(())
}

#[test]
fn orthogonal_gives_orthonormal_rows_or_columns() -> TestResult {
    let dev = Device::Cpu;
    let mut rng = Philox::new(7);
    for shape in [vec![64, 32], vec![32, 64], vec![16, 4, 3, 3], vec![50, 50]] {
        let w = Initializer::Orthogonal { gain: 2.0 }.sample(
            shape.as_slice(),
            DType::F64,
            &dev,
            &mut rng,
        )?;
        let m = w.reshape((shape[0], ()))?;
        let (rows, cols) = m.dims2()?;
        // W^T W = gain^2 I when tall, W W^T = gain^2 I when wide.
        let gram = if rows >= cols {
            m.t()?.matmul(&m)?
        } else {
            m.matmul(&m.t()?)?
        };
        let k = rows.min(cols);
        let g = gram.to_vec2::<f64>()?;
        for i in 0..k {
            for j in 0..k {
                let want = if i == j { 4.0 } else { 0.0 };
                assert!(
                    (g[i][j] - want).abs() < 1e-10,
                    "{shape:?}: ({i}, {j}) = {}",
                    g[i][j]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn trunc_normal_stays_inside_and_matches_moments() -> TestResult {
    let mut rng = Philox::new(3);
    let init = Initializer::TruncNormal {
        mean: 0.5,
        std: 1.0,
        a: -1.0,
        b: 1.5,
    };
    let v = vals(&init.sample(200_000, DType::F64, &Device::Cpu, &mut rng)?);
    assert!(v.iter().all(|x| (-1.0..=1.5).contains(x)));
    // Mean of N(0.5, 1) truncated to [-1.5, 1] standard units: mu + (phi(a) - phi(b)) / Z.
    let phi = |z: f64| (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let (a, b) = (-1.5, 1.0);
    let z = normal_cdf(b) - normal_cdf(a);
    let mean = 0.5 + (phi(a) - phi(b)) / z;
    let (m, _) = moments(&v);
    assert!(
        (m - mean).abs() < 5.0 / (200_000f64).sqrt(),
        "mean {m} vs {mean}"
    );
    Ok(())
}

#[test]
fn lsuv_reaches_unit_variance_on_a_ten_layer_mlp() -> TestResult {
    let dev = Device::Cpu;
    let mut rng = Philox::new(11);
    let widths = [64usize, 128, 128, 96, 96, 128, 64, 64, 64, 32, 10];
    let weights: Vec<Var> = widths
        .windows(2)
        .map(|w| {
            Var::from_tensor(
                &rng.normal((w[1], w[0]), 0.0, 1.0, DType::F32, &dev)
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(weights.len(), 10);
    let batch = rng.uniform((512, 64), 0.0, 1.0, DType::F32, &dev)?;
    let output_of = |i: usize, x: &Tensor| -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (k, w) in weights.iter().enumerate().take(i + 1) {
            h = h.matmul(&w.as_tensor().t()?)?;
            if k < i {
                h = h.relu()?;
            }
        }
        Ok(h)
    };
    let cfg = LsuvConfig {
        tol: 0.05,
        ..LsuvConfig::default()
    };
    let report = lsuv(&weights, &batch, &cfg, &mut rng, output_of)?;
    assert_eq!(report.len(), 10);
    for (i, layer) in report.iter().enumerate() {
        assert!(layer.converged, "layer {i}: {layer:?}");
        let out = output_of(i, &batch)?;
        let (_, var) = moments(&vals(&out));
        assert!((var - 1.0).abs() < 0.05, "layer {i}: variance {var}");
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> TestResult {
    let dev = Device::Cpu;
    let mut rng = Philox::new(0);
    let kaiming = Initializer::KaimingUniform {
        a: 0.0,
        mode: FanMode::FanIn,
        nonlinearity: Nonlinearity::Relu,
    };
    assert!(
        kaiming.sample(10, DType::F32, &dev, &mut rng).is_err(),
        "rank 1 has no fans"
    );
    assert!(
        Initializer::Orthogonal { gain: 1.0 }
            .sample(10, DType::F32, &dev, &mut rng)
            .is_err()
    );
    assert!(
        Initializer::Uniform { lo: 1.0, hi: 0.0 }
            .sample(3, DType::F32, &dev, &mut rng)
            .is_err()
    );
    assert!(
        Initializer::Normal {
            mean: 0.0,
            std: -1.0
        }
        .sample(3, DType::F32, &dev, &mut rng)
        .is_err()
    );
    assert!(
        Initializer::TruncNormal {
            mean: 0.0,
            std: 1.0,
            a: 2.0,
            b: -2.0
        }
        .sample(3, DType::F32, &dev, &mut rng)
        .is_err()
    );
    assert!(
        Initializer::XavierNormal { gain: f64::NAN }
            .sample((3, 3), DType::F32, &dev, &mut rng)
            .is_err()
    );
    assert!("swish".parse::<Nonlinearity>().is_err());
    assert!(calculate_gain(Nonlinearity::LeakyRelu, Some(f64::INFINITY)).is_err());
    let w = Var::zeros((4, 4), DType::F32, &dev)?;
    let x = Tensor::zeros((8, 4), DType::F32, &dev)?;
    let dead = |_: usize, x: &Tensor| x.matmul(&w.as_tensor().t()?);
    let cfg = LsuvConfig {
        orthogonal: false,
        ..LsuvConfig::default()
    };
    assert!(matches!(
        lsuv(std::slice::from_ref(&w), &x, &cfg, &mut rng, dead),
        Err(grad_layers::Error::DegenerateVariance { layer: 0, .. })
    ));
    Ok(())
}

#[test]
fn reinit_names_the_parameter_whose_rule_failed() -> TestResult {
    use candle_nn::{VarBuilder, VarMap};
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    candle_nn::linear(4, 3, vb.pp("fc"))?;
    let kaiming = Initializer::KaimingNormal {
        a: 0.0,
        mode: FanMode::FanIn,
        nonlinearity: Nonlinearity::Relu,
    };
    // Kaiming needs a rank-2 weight: the rank-1 bias fails, by name.
    let err =
        grad_layers::init::reinit(&map, &mut Philox::new(0), |_, _| Some(kaiming)).unwrap_err();
    match &err {
        grad_layers::Error::Reinit { name, .. } => assert_eq!(name, "fc.bias"),
        other => panic!("expected Reinit, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with("reinit: parameter fc.bias:"),
        "{err}"
    );
    Ok(())
}

#[test]
fn fan_in_bias_takes_the_fan_in_of_the_weight_beside_it() -> TestResult {
    use candle_nn::{VarBuilder, VarMap};
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    candle_nn::linear(400, 3, vb.pp("fc"))?;
    let lonely = vb.get_with_hints(5, "bias", candle_nn::Init::Const(0.0))?;
    let done = grad_layers::init::reinit(&map, &mut Philox::new(0), |name, _| {
        (name == "fc.bias").then_some(Initializer::FanInBias)
    })?;
    assert_eq!(done, ["fc.bias"]);
    let b = map.data().lock().unwrap()["fc.bias"]
        .as_tensor()
        .to_vec1::<f32>()?;
    assert!(
        b.iter().all(|v| v.abs() <= 0.05) && b.iter().any(|&v| v != 0.0),
        "{b:?}"
    );
    // A bias with no weight beside it is an error naming it; sampling the rule alone too.
    let err = grad_layers::init::reinit(&map, &mut Philox::new(0), |name, _| {
        (name == "bias").then_some(Initializer::FanInBias)
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("parameter bias") && err.to_string().contains("weight"),
        "{err}"
    );
    assert_eq!(lonely.to_vec1::<f32>()?, [0.0; 5]);
    assert!(
        Initializer::FanInBias
            .sample(3, DType::F32, &Device::Cpu, &mut Philox::new(0))
            .is_err()
    );
    Ok(())
}

#[test]
fn zero_element_tensors_are_left_alone_by_every_rule() -> TestResult {
    let kaiming = Initializer::KaimingUniform {
        a: 0.0,
        mode: FanMode::FanOut,
        nonlinearity: Nonlinearity::Relu,
    };
    for rule in [
        kaiming,
        Initializer::XavierNormal { gain: 1.0 },
        Initializer::Orthogonal { gain: 1.0 },
        Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        },
    ] {
        for dims in [&[0usize, 5][..], &[4, 0], &[0]] {
            let t = rule
                .sample(dims, DType::F32, &Device::Cpu, &mut Philox::new(0))
                .unwrap_or_else(|e| panic!("{rule:?} on {dims:?}: {e}"));
            assert_eq!(t.dims(), dims);
        }
    }
    Ok(())
}

//! Activations and PReLU: gradcheck away from the kink, fused equals composed, layouts, extreme
//! inputs and bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use grad_core::device::{Path, with_path};
use grad_core::strategies::{LayoutKind, Values, build_tensor, values};
use grad_core::{GradcheckConfig, Philox, gradcheck};
use grad_layers::{Activation, GeluApproximation, PReluConfig, ops, prelu};
use grad_testkit::grads_of;
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ALL: [Activation; 20] = [
    Activation::Relu6,
    Activation::Silu,
    Activation::Mish,
    Activation::Softplus {
        beta: 1.0,
        threshold: 20.0,
    },
    Activation::Softplus {
        beta: 2.0,
        threshold: 5.0,
    },
    Activation::Hardswish,
    Activation::Hardsigmoid,
    Activation::Hardtanh {
        min_val: -1.0,
        max_val: 1.5,
    },
    Activation::Celu { alpha: 0.5 },
    Activation::Softsign,
    Activation::LogSigmoid,
    Activation::Relu,
    Activation::LeakyRelu {
        negative_slope: 0.2,
    },
    Activation::Elu { alpha: 0.7 },
    Activation::Selu,
    Activation::Gelu {
        approximate: GeluApproximation::None,
    },
    Activation::Gelu {
        approximate: GeluApproximation::Tanh,
    },
    Activation::Sigmoid,
    Activation::Tanh,
    Activation::LeakyRelu {
        negative_slope: -0.5,
    },
];

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

/// Inputs in `[-3, -0.1] ∪ [0.1, 3]`: away from the kink, where finite differences are exact.
fn away_from_kink(n: usize, seed: u64) -> Tensor {
    let u = Philox::new(seed)
        .uniform(n, -1.0, 1.0, DType::F64, &Device::Cpu)
        .unwrap();
    let v: Vec<f64> = vals(&u)
        .into_iter()
        .map(|x| x.signum() * (0.1 + 2.9 * x.abs()))
        .collect();
    Tensor::from_vec(v, (3, n / 3), &Device::Cpu).unwrap()
}

#[test]
fn gradcheck_every_activation_in_f64() -> TestResult {
    let x = away_from_kink(24, 1);
    for act in ALL {
        gradcheck(
            |t: &[Tensor]| ops::activation(&t[0], act),
            std::slice::from_ref(&x),
            &GradcheckConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{act:?}: {e}"));
    }
    for w in [
        Tensor::new(&[0.3f64], &Device::Cpu)?,
        Tensor::new(&[0.3f64, -0.2, 1.5, 0.0, 0.1, 0.25, 0.7, 2.0], &Device::Cpu)?,
    ] {
        gradcheck(
            |t: &[Tensor]| ops::prelu(&t[0], &t[1]),
            &[x.clone(), w],
            &GradcheckConfig::default(),
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fused_equals_composed(
        act in prop::sample::select(ALL.to_vec()),
        (dims, data, up) in prop::collection::vec(1usize..6, 1..4).prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -6.0, hi: 6.0 }), values(n, Values::Finite { lo: -1.0, hi: 1.0 }))
        }),
        dtype in prop::sample::select(vec![DType::F64, DType::F32]),
        layout in prop::sample::select(vec![LayoutKind::Contiguous, LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let x = Var::from_tensor(&build_tensor(&dims, data, dtype, layout)?)?;
        let up = build_tensor(&dims, up, dtype, LayoutKind::Contiguous)?;
        let y = ops::activation(x.as_tensor(), act)?;
        let z = ops::activation_composed(x.as_tensor(), act)?;
        let gy = grads_of(&y, &up, &[x.as_tensor()]).unwrap()[0].clone().unwrap();
        let gz = grads_of(&z, &up, &[x.as_tensor()]).unwrap()[0].clone().unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
        for (a, b) in vals(&y).iter().zip(vals(&z)).chain(vals(&gy).iter().zip(vals(&gz))) {
            prop_assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{act:?}: {a} vs {b}");
        }
    }

    #[test]
    fn non_contiguous_equals_contiguous(
        act in prop::sample::select(ALL.to_vec()),
        (dims, data) in prop::collection::vec(2usize..7, 2..4).prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::WithSpecials { lo: -5.0, hi: 5.0 }))
        }),
        layout in prop::sample::select(vec![LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let strided = build_tensor(&dims, data, DType::F32, layout)?;
        let a = vals(&ops::activation(&strided, act)?);
        let b = vals(&ops::activation(&strided.contiguous()?, act)?);
        for (x, y) in a.iter().zip(&b) {
            prop_assert!(x == y || (x.is_nan() && y.is_nan()));
        }
    }
}

#[test]
fn prelu_fused_equals_composed_with_weight_gradient() -> TestResult {
    let x =
        Var::from_tensor(&Philox::new(4).normal((3, 4, 5), 0.0, 1.0, DType::F64, &Device::Cpu)?)?;
    let up = Philox::new(5).normal((3, 4, 5), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    for w in [vec![0.25], vec![0.1, -0.3, 0.5, 2.0]] {
        let w = Var::from_tensor(&Tensor::new(w.as_slice(), &Device::Cpu)?)?;
        let y = ops::prelu(x.as_tensor(), w.as_tensor())?;
        let z = ops::prelu_composed(x.as_tensor(), w.as_tensor())?;
        let gy = grads_of(&y, &up, &[x.as_tensor(), w.as_tensor()])?;
        let gz = grads_of(&z, &up, &[x.as_tensor(), w.as_tensor()])?;
        assert_eq!(vals(&y), vals(&z));
        for (a, b) in gy.iter().zip(&gz) {
            for (p, q) in vals(a.as_ref().unwrap())
                .iter()
                .zip(vals(b.as_ref().unwrap()))
            {
                assert!((p - q).abs() < 1e-12);
            }
        }
    }
    Ok(())
}

#[test]
fn extreme_inputs_saturate_without_nan() -> TestResult {
    // ±800 overflows exp in f64 too: no activation may turn that into a NaN or an inf.
    let f64s = Var::from_tensor(&Tensor::new(
        &[-800f64, -710.0, 710.0, 800.0],
        &Device::Cpu,
    )?)?;
    for act in ALL {
        for path in [Path::Fused, Path::Composed] {
            let y = with_path(path, || ops::activation(f64s.as_tensor(), act))?;
            let g = grads_of(&y, &f64s.ones_like()?, &[f64s.as_tensor()])?[0]
                .clone()
                .unwrap();
            for v in vals(&y).iter().chain(vals(&g).iter()) {
                assert!(
                    v.is_finite(),
                    "{act:?} {path:?}: {:?} / {:?}",
                    vals(&y),
                    vals(&g)
                );
            }
        }
    }
    let x = Var::from_tensor(&Tensor::new(
        &[
            -1e30f32, -1e4, -800.0, -100.0, 0.0, -0.0, 100.0, 800.0, 1e4, 1e30,
        ],
        &Device::Cpu,
    )?)?;
    let ones = x.ones_like()?;
    for act in ALL {
        let y = ops::activation(x.as_tensor(), act)?;
        let g = grads_of(&y, &ones, &[x.as_tensor()])?[0].clone().unwrap();
        for v in vals(&y).iter().chain(vals(&g).iter()) {
            assert!(
                !v.is_nan(),
                "{act:?}: NaN in {:?} / {:?}",
                vals(&y),
                vals(&g)
            );
        }
    }
    let elu = vals(&ops::activation(
        x.as_tensor(),
        Activation::Elu { alpha: 0.5 },
    )?);
    assert_eq!(elu[0], -0.5);
    Ok(())
}

#[test]
fn activations_serialise_and_modules_build() -> TestResult {
    let json = serde_json::to_string(&ALL)?;
    let back: Vec<Activation> = serde_json::from_str(&json)?;
    assert_eq!(back, ALL);
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let p = prelu(PReluConfig::default(), vb.pp("p"))?;
    assert_eq!(vals(p.weight()), [0.25]);
    let y = p.forward(&Tensor::new(&[[-4f32, 4.0]], &Device::Cpu)?)?;
    assert_eq!(vals(&y), [-1.0, 4.0]);
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> TestResult {
    let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
    assert!(ops::activation(&x, Activation::Elu { alpha: -1.0 }).is_err());
    assert!(
        ops::activation(
            &x,
            Activation::LeakyRelu {
                negative_slope: f64::NAN
            }
        )
        .is_err()
    );
    let w2 = Tensor::ones(2, DType::F32, &Device::Cpu)?;
    assert!(
        ops::prelu(&x, &w2).is_err(),
        "two slopes for three channels"
    );
    let w64 = Tensor::ones(3, DType::F64, &Device::Cpu)?;
    assert!(ops::prelu(&x, &w64).is_err(), "dtype mismatch");
    let ints = Tensor::ones(3, DType::I64, &Device::Cpu)?;
    assert!(ops::activation(&ints, Activation::Relu).is_err());
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(
        prelu(
            PReluConfig {
                num_parameters: 0,
                init: 0.25
            },
            vb
        )
        .is_err()
    );
    Ok(())
}

#[test]
fn prelu_of_an_input_with_a_zero_size_dim_is_empty_not_a_panic() -> TestResult {
    let x = Tensor::zeros((2, 3, 0), DType::F32, &Device::Cpu)?;
    let w = Tensor::new(&[0.25f32, 0.5, 0.75], &Device::Cpu)?;
    for y in [ops::prelu(&x, &w)?, ops::prelu_composed(&x, &w)?] {
        assert_eq!(y.dims(), [2, 3, 0]);
    }
    let shared = Tensor::new(&[0.25f32], &Device::Cpu)?;
    assert_eq!(
        ops::prelu(&Tensor::zeros(0, DType::F32, &Device::Cpu)?, &shared)?.dims(),
        [0]
    );
    Ok(())
}

/// PyTorch's backward at a NaN input: its branch tests (`x <= 0`, `x > 0`, `x <= -3`, ...) are
/// false for NaN, which picks a branch, not a NaN, for the piecewise activations.
#[test]
fn gradients_at_nan_inputs_follow_pytorch() -> TestResult {
    use grad_core::device::{Path, with_path};
    let nan = f64::NAN;
    let table = [
        (Activation::Relu, 1.0),
        (
            Activation::LeakyRelu {
                negative_slope: 0.1,
            },
            0.1,
        ),
        (Activation::Elu { alpha: 0.7 }, 1.0),
        (Activation::Selu, grad_layers::SELU_SCALE),
        (Activation::Celu { alpha: 0.5 }, 1.0),
        (Activation::Relu6, 1.0),
        (
            Activation::Hardtanh {
                min_val: -1.0,
                max_val: 1.0,
            },
            1.0,
        ),
        (Activation::Hardswish, 1.0),
        (Activation::Hardsigmoid, 0.0),
        (
            Activation::Gelu {
                approximate: GeluApproximation::None,
            },
            nan,
        ),
        (Activation::Sigmoid, nan),
        (Activation::Tanh, nan),
        (Activation::Silu, nan),
        (Activation::Mish, nan),
        (Activation::Softsign, nan),
        (Activation::LogSigmoid, nan),
    ];
    for (act, want) in table {
        for path in [Path::Fused, Path::Composed] {
            for dtype in [DType::F32, DType::F64] {
                let x =
                    Var::from_tensor(&Tensor::new(&[f64::NAN], &Device::Cpu)?.to_dtype(dtype)?)?;
                let got = with_path(path, || -> Result<f64, Box<dyn std::error::Error>> {
                    let store = ops::activation(x.as_tensor(), act)?.sum_all()?.backward()?;
                    let g = store.get(x.as_tensor()).ok_or("no gradient")?;
                    Ok(g.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
                })?;
                let ok = if want.is_nan() {
                    got.is_nan()
                } else {
                    (got - want).abs() < 1e-6
                };
                assert!(
                    ok,
                    "{act:?} {path:?} {dtype:?}: d/dx at NaN = {got}, PyTorch {want}"
                );
            }
        }
    }
    Ok(())
}

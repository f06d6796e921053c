//! The batch-norm block against its three layers (batch norm, activation, dropout) in sequence:
//! forward, backward, running statistics and the dropout stream, on the fused and the composed
//! path; gradcheck in f64; bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use grad_core::device::{Path, with_path};
use grad_core::strategies::{LayoutKind, Values, build_tensor, values};
use grad_core::{GradcheckConfig, Philox, gradcheck};
use grad_layers::ops::{self, BatchNormStats, BlockDropout, DropoutKind};
use grad_layers::{
    Activation, BatchNorm, BatchNormBlock, BatchNormBlockConfig, BatchNormConfig, Dropout,
    DropoutConfig, GeluApproximation, batch_norm, batch_norm_block, dropout,
};
use grad_testkit::{grads_of, values as host_values};
use proptest::prelude::*;

mod common;

use common::activations;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The block and its three separate layers, built from the same parameters and seed.
struct Pair {
    block: BatchNormBlock,
    norm: BatchNorm,
    act: Activation,
    drop: Option<Dropout>,
}

fn pair(c: usize, act: Activation, drop: Option<DropoutConfig>, dtype: DType) -> Pair {
    let config = BatchNormBlockConfig {
        norm: BatchNormConfig {
            momentum: Some(0.3),
            ..Default::default()
        },
        activation: act,
        dropout: drop,
    };
    let (block_map, norm_map) = (VarMap::new(), VarMap::new());
    let vb = VarBuilder::from_varmap(&block_map, dtype, &Device::Cpu);
    let block = batch_norm_block(c, config, vb.pp("b")).unwrap();
    let vb = VarBuilder::from_varmap(&norm_map, dtype, &Device::Cpu);
    let norm = batch_norm(c, config.norm, vb.pp("b")).unwrap();
    // Nontrivial affine parameters, the same in both.
    let mut rng = Philox::new(99);
    let w = rng.normal(c, 1.0, 0.5, dtype, &Device::Cpu).unwrap();
    let b = rng.normal(c, 0.2, 0.5, dtype, &Device::Cpu).unwrap();
    for map in [&block_map, &norm_map] {
        let mut map = map.clone();
        map.set_one("b.weight", &w).unwrap();
        map.set_one("b.bias", &b).unwrap();
    }
    let drop = drop.map(|d| dropout(d, vb.pp("b").pp("dropout")).unwrap());
    Pair {
        block,
        norm,
        act,
        drop,
    }
}

/// `y` and the gradients of `x`, the weight and the bias for upstream gradient `g`.
fn step(
    forward: impl Fn(&Tensor) -> Tensor,
    norm: &BatchNorm,
    x: &Tensor,
    g: &Tensor,
) -> Vec<Vec<f64>> {
    let x = candle_core::Var::from_tensor(x).unwrap();
    let y = forward(x.as_tensor());
    let wrt = [x.as_tensor(), norm.weight().unwrap(), norm.bias().unwrap()];
    let grads = grads_of(&y, g, &wrt).unwrap();
    let mut out = vec![host_values(&y).unwrap()];
    out.extend(
        grads
            .iter()
            .map(|t| host_values(t.as_ref().unwrap()).unwrap()),
    );
    out.push(host_values(norm.running_mean().unwrap()).unwrap());
    out.push(host_values(norm.running_var().unwrap()).unwrap());
    out
}

const NAMES: [&str; 6] = [
    "y",
    "grad_x",
    "grad_weight",
    "grad_bias",
    "running_mean",
    "running_var",
];

/// Runs two training steps and one evaluation forward through both, the block on `path` and the
/// layers on the fused path, comparing every output within `tol` (relative to the largest
/// magnitude of each output); `Err` names the first miss.
fn compare(p: &Pair, dims: &[usize], dtype: DType, tol: f64, path: Path) -> Result<(), String> {
    let mut rng = Philox::new(dims.iter().product::<usize>() as u64);
    for (round, train) in [true, true, false].into_iter().enumerate() {
        let x = rng.normal(dims, 0.3, 1.5, dtype, &Device::Cpu).unwrap();
        let g = rng.normal(dims, 0.0, 1.0, dtype, &Device::Cpu).unwrap();
        let fused = with_path(path, || {
            step(
                |x| p.block.try_forward(x, train).unwrap(),
                p.block.norm(),
                &x,
                &g,
            )
        });
        let separate = step(
            |x| {
                let y = p.act.forward(&p.norm.forward_t(x, train).unwrap()).unwrap();
                match &p.drop {
                    Some(d) => d.try_forward(&y, train).unwrap(),
                    None => y,
                }
            },
            &p.norm,
            &x,
            &g,
        );
        for ((name, a), b) in NAMES.iter().zip(&fused).zip(&separate) {
            let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
            for (i, (u, v)) in a.iter().zip(b).enumerate() {
                let same = (u.is_nan() && v.is_nan()) || (u - v).abs() <= tol * scale;
                if !same {
                    return Err(format!(
                        "{:?} {dims:?} {dtype:?} round {round} {name}[{i}]: block {u}, separate {v}",
                        p.act
                    ));
                }
            }
        }
        let (a, b) = (p.block.dropout(), p.drop.as_ref());
        if a.map(Dropout::state) != b.map(Dropout::state) {
            return Err(format!(
                "{:?} round {round}: the dropout streams differ",
                p.act
            ));
        }
        if p.block.norm().num_batches_tracked().unwrap() != p.norm.num_batches_tracked().unwrap() {
            return Err(format!(
                "{:?} round {round}: num_batches_tracked differs",
                p.act
            ));
        }
    }
    Ok(())
}

fn dropouts() -> Vec<(Option<DropoutConfig>, Vec<usize>)> {
    let d = |p, kind| {
        Some(DropoutConfig {
            p,
            kind,
            seed: Some(11),
        })
    };
    vec![
        (None, vec![4, 6, 5, 7]),
        (d(0.3, DropoutKind::Element), vec![4, 6, 5, 7]),
        (d(0.3, DropoutKind::Channel2d), vec![4, 6, 5, 7]),
        (d(0.2, DropoutKind::Alpha), vec![4, 6, 5, 7]),
        (d(0.25, DropoutKind::FeatureAlpha), vec![3, 5, 11]),
        (d(0.3, DropoutKind::Element), vec![37, 6]),
        (None, vec![37, 6]),
        (d(1.0, DropoutKind::Element), vec![5, 3, 4]),
    ]
}

#[test]
fn block_equals_its_three_layers_step_for_step() -> TestResult {
    // f32 and f64: the same arithmetic in the same order, so the same bits.
    for dtype in [DType::F64, DType::F32] {
        for act in activations() {
            for (drop, dims) in dropouts() {
                let p = pair(dims[1], act, drop, dtype);
                compare(&p, &dims, dtype, 0.0, Path::Fused)?;
            }
        }
    }
    Ok(())
}

#[test]
fn composed_path_equals_the_fused_block() -> TestResult {
    for act in activations() {
        for (drop, dims) in dropouts() {
            let p = pair(dims[1], act, drop, DType::F64);
            compare(&p, &dims, DType::F64, 1e-12, Path::Composed)?;
            let p = pair(dims[1], act, drop, DType::F32);
            compare(&p, &dims, DType::F32, 2e-5, Path::Composed)?;
        }
    }
    Ok(())
}

#[test]
fn half_precision_inputs_follow_the_layers() -> TestResult {
    // f16 parameters: the block rounds only its output, the layers round after each step.
    for dtype in [DType::F16, DType::BF16] {
        let act = Activation::LeakyRelu {
            negative_slope: 0.1,
        };
        let drop = Some(DropoutConfig {
            p: 0.3,
            seed: Some(4),
            ..Default::default()
        });
        let p = pair(6, act, drop, dtype);
        compare(&p, &[4, 6, 5, 7], dtype, 2e-2, Path::Fused)?;
    }
    Ok(())
}

#[test]
fn gradcheck_in_f64() -> TestResult {
    let mut rng = Philox::new(5);
    let x = rng.normal(&[3usize, 4, 5][..], 0.5, 2.0, DType::F64, &Device::Cpu)?;
    let w = rng.normal(4, 1.0, 0.5, DType::F64, &Device::Cpu)?;
    let b = rng.normal(4, 0.0, 0.5, DType::F64, &Device::Cpu)?;
    let smooth = [
        Activation::Gelu {
            approximate: GeluApproximation::None,
        },
        Activation::Tanh,
        Activation::Silu,
        Activation::Mish,
        Activation::Softplus {
            beta: 1.0,
            threshold: 20.0,
        },
        Activation::Sigmoid,
    ];
    for act in smooth {
        for kind in [
            DropoutKind::Element,
            DropoutKind::Channel1d,
            DropoutKind::Alpha,
        ] {
            let report = gradcheck(
                |t: &[Tensor]| {
                    // A fresh stream at the same position every call: the same mask.
                    let mut rng = Philox::new(8);
                    let dropout = Some(BlockDropout {
                        p: 0.3,
                        kind,
                        rng: &mut rng,
                    });
                    let stats = BatchNormStats::Batch;
                    ops::batch_norm_block(
                        &t[0],
                        Some(&t[1]),
                        Some(&t[2]),
                        stats,
                        1e-3,
                        act,
                        dropout,
                    )
                    .map(|o| o.y)
                },
                &[x.clone(), w.clone(), b.clone()],
                &GradcheckConfig::default(),
            )
            .unwrap_or_else(|e| panic!("{act:?} {kind:?}: {e}"));
            assert!(report.passed(), "{act:?} {kind:?}");
        }
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error_and_draws_no_words() -> TestResult {
    let drop = Some(DropoutConfig {
        p: 0.5,
        kind: DropoutKind::Channel2d,
        seed: Some(1),
    });
    let p = pair(3, Activation::Relu, drop, DType::F32);
    let before = p.block.dropout().unwrap().state();
    let bad = [
        Tensor::zeros((2, 4, 5, 5), DType::F32, &Device::Cpu)?, // 4 channels, not 3
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,            // rank 1
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?,       // Dropout2d needs rank 3 or 4
        Tensor::zeros((1, 3, 1, 1), DType::F32, &Device::Cpu)?, // one value per channel
        Tensor::zeros((0, 3, 4, 4), DType::F32, &Device::Cpu)?, // empty
        Tensor::zeros((2, 3, 4, 4), DType::U32, &Device::Cpu)?, // not a float
    ];
    for x in &bad {
        let err = p.block.try_forward(x, true);
        assert!(err.is_err(), "{:?} was accepted", x.dims());
    }
    assert_eq!(p.block.dropout().unwrap().state(), before);
    assert_eq!(p.block.norm().num_batches_tracked()?, Some(0));
    // Bad hyper-parameters are rejected when the block is built, naming the field.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let configs = [
        BatchNormBlockConfig {
            dropout: Some(DropoutConfig {
                p: 1.5,
                ..Default::default()
            }),
            ..Default::default()
        },
        BatchNormBlockConfig {
            activation: Activation::Elu { alpha: -1.0 },
            ..Default::default()
        },
        BatchNormBlockConfig {
            norm: BatchNormConfig {
                eps: 0.0,
                ..Default::default()
            },
            ..Default::default()
        },
    ];
    for (config, field) in configs.iter().zip(["p", "alpha", "eps"]) {
        let err = batch_norm_block(3, *config, vb.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err}");
    }
    assert!(batch_norm_block(0, BatchNormBlockConfig::default(), vb.clone()).is_err());
    // The functional form: a bad p is an error before anything is drawn.
    let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?;
    let mut rng = Philox::new(2);
    let dropout = Some(BlockDropout {
        p: f64::NAN,
        kind: DropoutKind::Element,
        rng: &mut rng,
    });
    let act = Activation::Relu;
    assert!(
        ops::batch_norm_block(&x, None, None, BatchNormStats::Batch, 1e-5, act, dropout).is_err()
    );
    assert_eq!(rng.state().offset, 0);
    Ok(())
}

#[test]
fn non_finite_inputs_stay_visible() -> TestResult {
    let p = pair(
        2,
        Activation::Relu,
        Some(DropoutConfig {
            p: 0.5,
            seed: Some(3),
            ..Default::default()
        }),
        DType::F32,
    );
    let mut v = vec![1f32; 2 * 2 * 3];
    v[0] = f32::NAN;
    let x = Tensor::from_vec(v, (2, 2, 3), &Device::Cpu)?;
    let y = host_values(&p.block.try_forward(&x, true)?)?;
    // Channel 0's statistics are NaN, so its every output is NaN, dropped or kept (x * 0).
    for n in 0..2 {
        for i in 0..3 {
            assert!(y[n * 6 + i].is_nan(), "{y:?}");
        }
    }
    // So is the running mean it updated.
    assert!(host_values(p.block.norm().running_mean().unwrap())?[0].is_nan());
    Ok(())
}

#[test]
fn serde_rejects_unknown_fields() {
    let ok = serde_json::to_string(&BatchNormBlockConfig::default()).unwrap();
    let back: BatchNormBlockConfig = serde_json::from_str(&ok).unwrap();
    assert_eq!(back, BatchNormBlockConfig::default());
    let bad = ok.replacen('{', "{\"momentum\":0.1,", 1);
    assert!(serde_json::from_str::<BatchNormBlockConfig>(&bad).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any shape, layout, dtype and dropout kind: the fused block equals the composed one.
    #[test]
    fn fused_equals_composed_for_any_layout(
        (dims, data) in prop::sample::select(vec![vec![5usize, 3], vec![3, 4, 6], vec![2, 3, 4, 5], vec![2, 2, 3, 2, 2]])
            .prop_flat_map(|d| {
                let n: usize = d.iter().product();
                (Just(d), values(n, Values::Finite { lo: -3.0, hi: 3.0 }))
            }),
        act in prop::sample::select(activations()),
        kind in prop::sample::select(vec![DropoutKind::Element, DropoutKind::Alpha, DropoutKind::FeatureAlpha]),
        p in 0.0f64..1.0,
        train in any::<bool>(),
        dtype in prop::sample::select(vec![DType::F64, DType::F32]),
        layout in prop::sample::select(vec![LayoutKind::Contiguous, LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let x = build_tensor(&dims, data, dtype, layout)?;
        let c = dims[1];
        let mean = Tensor::new(vec![0.1f64; c], &Device::Cpu)?.to_dtype(dtype)?;
        let var = Tensor::new(vec![2.0f64; c], &Device::Cpu)?.to_dtype(dtype)?;
        let stats = if train { BatchNormStats::Batch } else { BatchNormStats::Running { mean: &mean, var: &var } };
        let run = |composed: bool| -> Vec<Vec<f64>> {
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let mut rng = Philox::new(21);
            let dropout = train.then_some(BlockDropout { p, kind, rng: &mut rng });
            let f = if composed { ops::batch_norm_block_composed } else { ops::batch_norm_block };
            let y = f(xv.as_tensor(), None, None, stats, 1e-5, act, dropout).unwrap().y;
            let g = y.ones_like().unwrap();
            let gx = grads_of(&y, &g, &[xv.as_tensor()]).unwrap().remove(0).unwrap();
            vec![host_values(&y).unwrap(), host_values(&gx).unwrap(), vec![rng.state().offset as f64]]
        };
        let (a, b) = (run(false), run(true));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
        for (u, v) in a.iter().flatten().zip(b.iter().flatten()) {
            prop_assert!((u.is_nan() && v.is_nan()) || (u - v).abs() <= tol * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
}

//! The layer-norm and group-norm blocks against their three layers (norm, activation, dropout)
//! in sequence: forward, backward and the dropout stream, on the fused and the composed path;
//! gradcheck in f64; bad input.

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
use grad_layers::ops::{self, BlockDropout, DropoutKind};
use grad_layers::{
    Activation, Dropout, DropoutConfig, GeluApproximation, GroupNorm, GroupNormBlock,
    GroupNormBlockConfig, GroupNormConfig, LayerNorm, LayerNormBlock, LayerNormBlockConfig,
    dropout, group_norm, group_norm_block, layer_norm, layer_norm_block,
};
use grad_testkit::{grads_of, values as host_values};
use proptest::prelude::*;

mod common;

use common::activations;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Which norm a block holds, and its layout.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Layer norm over the last dim.
    Layer,
    /// Group norm with this many groups.
    Group(usize),
}

/// A block and its three separate layers, built from the same parameters and seed.
enum Pair {
    Layer(LayerNormBlock, LayerNorm),
    Group(GroupNormBlock, GroupNorm),
}

struct Built {
    pair: Pair,
    act: Activation,
    drop: Option<Dropout>,
}

impl Built {
    fn block(&self, x: &Tensor, train: bool) -> grad_layers::Result<Tensor> {
        match &self.pair {
            Pair::Layer(b, _) => b.try_forward(x, train),
            Pair::Group(b, _) => b.try_forward(x, train),
        }
    }

    fn separate(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.pair {
            Pair::Layer(_, n) => n.forward(x).unwrap(),
            Pair::Group(_, n) => n.forward(x).unwrap(),
        };
        let y = self.act.forward(&y).unwrap();
        match &self.drop {
            Some(d) => d.forward_t(&y, train).unwrap(),
            None => y,
        }
    }

    /// The block's parameters, then the separate norm's.
    fn params(&self) -> [[&Tensor; 2]; 2] {
        match &self.pair {
            Pair::Layer(b, n) => [
                [b.norm().weight().unwrap(), b.norm().bias().unwrap()],
                [n.weight().unwrap(), n.bias().unwrap()],
            ],
            Pair::Group(b, n) => [
                [b.norm().weight().unwrap(), b.norm().bias().unwrap()],
                [n.weight().unwrap(), n.bias().unwrap()],
            ],
        }
    }

    fn block_dropout(&self) -> Option<&Dropout> {
        match &self.pair {
            Pair::Layer(b, _) => b.dropout(),
            Pair::Group(b, _) => b.dropout(),
        }
    }
}

fn build(
    kind: Kind,
    dims: &[usize],
    act: Activation,
    drop: Option<DropoutConfig>,
    dtype: DType,
) -> Built {
    let (block_map, norm_map) = (VarMap::new(), VarMap::new());
    let bvb = VarBuilder::from_varmap(&block_map, dtype, &Device::Cpu).pp("b");
    let nvb = VarBuilder::from_varmap(&norm_map, dtype, &Device::Cpu).pp("b");
    let (pair, width) = match kind {
        Kind::Layer => {
            let d = dims[dims.len() - 1];
            let config = LayerNormBlockConfig {
                activation: act,
                dropout: drop,
                ..Default::default()
            };
            let block = layer_norm_block(d, config, bvb).unwrap();
            let norm = layer_norm(d, config.norm, nvb.clone()).unwrap();
            (Pair::Layer(block, norm), d)
        }
        Kind::Group(g) => {
            let c = dims[1];
            let config = GroupNormBlockConfig {
                activation: act,
                dropout: drop,
                ..Default::default()
            };
            let block = group_norm_block(g, c, config, bvb).unwrap();
            let norm = group_norm(g, c, config.norm, nvb.clone()).unwrap();
            (Pair::Group(block, norm), c)
        }
    };
    // Nontrivial affine parameters, the same in both.
    let mut rng = Philox::new(99);
    let w = rng.normal(width, 1.0, 0.5, dtype, &Device::Cpu).unwrap();
    let b = rng.normal(width, 0.2, 0.5, dtype, &Device::Cpu).unwrap();
    for map in [&block_map, &norm_map] {
        let mut map = map.clone();
        map.set_one("b.weight", &w).unwrap();
        map.set_one("b.bias", &b).unwrap();
    }
    let drop = drop.map(|d| dropout(d, nvb.pp("dropout")).unwrap());
    Built { pair, act, drop }
}

/// `y` and the gradients of `x`, the weight and the bias for upstream gradient `g`.
fn step(y: &Tensor, x: &candle_core::Var, params: [&Tensor; 2], g: &Tensor) -> Vec<Vec<f64>> {
    let wrt = [x.as_tensor(), params[0], params[1]];
    let grads = grads_of(y, g, &wrt).unwrap();
    let mut out = vec![host_values(y).unwrap()];
    out.extend(
        grads
            .iter()
            .map(|t| host_values(t.as_ref().unwrap()).unwrap()),
    );
    out
}

const NAMES: [&str; 4] = ["y", "grad_x", "grad_weight", "grad_bias"];

/// Two training steps and one evaluation forward through both, the block on `path` and the
/// layers on the fused path, comparing every output within `tol` (relative to the largest
/// magnitude of each output); `Err` names the first miss.
fn compare(p: &Built, dims: &[usize], dtype: DType, tol: f64, path: Path) -> Result<(), String> {
    let mut rng = Philox::new(dims.iter().product::<usize>() as u64);
    let [block_params, norm_params] = p.params();
    for (round, train) in [true, true, false].into_iter().enumerate() {
        let x = rng.normal(dims, 0.3, 1.5, dtype, &Device::Cpu).unwrap();
        let g = rng.normal(dims, 0.0, 1.0, dtype, &Device::Cpu).unwrap();
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let fused = with_path(path, || {
            let y = p.block(xv.as_tensor(), train).unwrap();
            step(&y, &xv, block_params, &g)
        });
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let separate = step(&p.separate(xv.as_tensor(), train), &xv, norm_params, &g);
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
        if p.block_dropout().map(Dropout::state) != p.drop.as_ref().map(Dropout::state) {
            return Err(format!(
                "{:?} round {round}: the dropout streams differ",
                p.act
            ));
        }
    }
    Ok(())
}

/// Norms, dropouts and shapes: element, channel and alpha dropout, rows of several sizes.
fn cases() -> Vec<(Kind, Option<DropoutConfig>, Vec<usize>)> {
    let d = |p, kind| {
        Some(DropoutConfig {
            p,
            kind,
            seed: Some(11),
        })
    };
    vec![
        (Kind::Layer, None, vec![5, 7, 24]),
        (Kind::Layer, d(0.3, DropoutKind::Element), vec![5, 7, 24]),
        (Kind::Layer, d(0.2, DropoutKind::Alpha), vec![37, 6]),
        (Kind::Layer, d(0.3, DropoutKind::Channel1d), vec![4, 6, 9]),
        (Kind::Layer, d(1.0, DropoutKind::Element), vec![3, 4]),
        (Kind::Group(3), None, vec![4, 6, 5, 7]),
        (
            Kind::Group(2),
            d(0.3, DropoutKind::Element),
            vec![4, 6, 5, 7],
        ),
        (
            Kind::Group(6),
            d(0.3, DropoutKind::Channel2d),
            vec![4, 6, 5, 7],
        ),
        (
            Kind::Group(1),
            d(0.25, DropoutKind::FeatureAlpha),
            vec![3, 4, 11],
        ),
        (Kind::Group(2), d(0.3, DropoutKind::Element), vec![9, 8]),
    ]
}

#[test]
fn blocks_equal_their_three_layers_step_for_step() -> TestResult {
    // f32 and f64: the same arithmetic in the same order, so the same bits.
    for dtype in [DType::F64, DType::F32] {
        for act in activations() {
            for (kind, drop, dims) in cases() {
                let p = build(kind, &dims, act, drop, dtype);
                compare(&p, &dims, dtype, 0.0, Path::Fused)?;
            }
        }
    }
    Ok(())
}

#[test]
fn composed_path_equals_the_fused_blocks() -> TestResult {
    for act in activations() {
        for (kind, drop, dims) in cases() {
            let p = build(kind, &dims, act, drop, DType::F64);
            compare(&p, &dims, DType::F64, 1e-12, Path::Composed)?;
            let p = build(kind, &dims, act, drop, DType::F32);
            compare(&p, &dims, DType::F32, 2e-5, Path::Composed)?;
        }
    }
    Ok(())
}

#[test]
fn half_precision_inputs_follow_the_layers() -> TestResult {
    // f16 parameters: the block rounds only its output, the layers round after each step.
    for dtype in [DType::F16, DType::BF16] {
        let drop = Some(DropoutConfig {
            p: 0.3,
            seed: Some(4),
            ..Default::default()
        });
        for (kind, dims) in [(Kind::Layer, vec![6, 16]), (Kind::Group(2), vec![4, 6, 5])] {
            let p = build(kind, &dims, Activation::Silu, drop, dtype);
            compare(&p, &dims, dtype, 3e-2, Path::Fused)?;
        }
    }
    Ok(())
}

#[test]
fn gradcheck_in_f64() -> TestResult {
    let mut rng = Philox::new(5);
    let x = rng.normal(&[3usize, 4, 5][..], 0.5, 2.0, DType::F64, &Device::Cpu)?;
    let w4 = rng.normal(4, 1.0, 0.5, DType::F64, &Device::Cpu)?;
    let b4 = rng.normal(4, 0.0, 0.5, DType::F64, &Device::Cpu)?;
    let w5 = rng.normal(5, 1.0, 0.5, DType::F64, &Device::Cpu)?;
    let b5 = rng.normal(5, 0.0, 0.5, DType::F64, &Device::Cpu)?;
    let smooth = [
        Activation::Gelu {
            approximate: GeluApproximation::None,
        },
        Activation::Tanh,
        Activation::Silu,
        Activation::Mish,
        Activation::Sigmoid,
    ];
    for act in smooth {
        for kind in [
            DropoutKind::Element,
            DropoutKind::Channel1d,
            DropoutKind::Alpha,
        ] {
            for group in [false, true] {
                let report = gradcheck(
                    |t: &[Tensor]| {
                        // A fresh stream at the same position every call: the same mask.
                        let mut rng = Philox::new(8);
                        let d = Some(BlockDropout {
                            p: 0.3,
                            kind,
                            rng: &mut rng,
                        });
                        let (w, b) = (Some(&t[1]), Some(&t[2]));
                        if group {
                            ops::group_norm_block(&t[0], 2, w, b, 1e-3, act, d)
                        } else {
                            ops::layer_norm_block(&t[0], &[5], w, b, 1e-3, act, d)
                        }
                    },
                    &if group {
                        [x.clone(), w4.clone(), b4.clone()]
                    } else {
                        [x.clone(), w5.clone(), b5.clone()]
                    },
                    &GradcheckConfig::default(),
                )
                .unwrap_or_else(|e| panic!("{act:?} {kind:?} group {group}: {e}"));
                assert!(report.passed(), "{act:?} {kind:?} group {group}");
            }
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
    let gn = build(
        Kind::Group(3),
        &[2, 6, 4, 4],
        Activation::Relu,
        drop,
        DType::F32,
    );
    let ln = build(
        Kind::Layer,
        &[2, 6, 4, 4],
        Activation::Relu,
        drop,
        DType::F32,
    );
    let before = gn.block_dropout().unwrap().state();
    let bad_gn = [
        Tensor::zeros((2, 4, 5, 5), DType::F32, &Device::Cpu)?, // 4 channels, not 6
        Tensor::zeros(6, DType::F32, &Device::Cpu)?,            // rank 1
        Tensor::zeros((2, 6), DType::F32, &Device::Cpu)?,       // Dropout2d needs rank 3 or 4
        Tensor::zeros((0, 6, 4, 4), DType::F32, &Device::Cpu)?, // empty
        Tensor::zeros((2, 6, 4, 4), DType::U32, &Device::Cpu)?, // not a float
    ];
    for x in &bad_gn {
        assert!(gn.block(x, true).is_err(), "{:?} was accepted", x.dims());
    }
    let bad_ln = [
        Tensor::zeros((2, 6, 4, 5), DType::F32, &Device::Cpu)?, // last dim 5, not 4
        Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?,       // Dropout2d needs rank 3 or 4
        Tensor::zeros((0, 4), DType::F32, &Device::Cpu)?,       // empty
        Tensor::zeros((2, 6, 4, 4), DType::U8, &Device::Cpu)?,  // not a float
    ];
    for x in &bad_ln {
        assert!(ln.block(x, true).is_err(), "{:?} was accepted", x.dims());
    }
    assert_eq!(gn.block_dropout().unwrap().state(), before);
    assert_eq!(ln.block_dropout().unwrap().state(), before);
    // Bad hyper-parameters are rejected when the block is built, naming the field.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let p15 = Some(DropoutConfig {
        p: 1.5,
        ..Default::default()
    });
    let elu = Activation::Elu { alpha: -1.0 };
    let gn_configs = [
        GroupNormBlockConfig {
            dropout: p15,
            ..Default::default()
        },
        GroupNormBlockConfig {
            activation: elu,
            ..Default::default()
        },
        GroupNormBlockConfig {
            norm: GroupNormConfig {
                eps: 0.0,
                ..Default::default()
            },
            ..Default::default()
        },
    ];
    for (config, field) in gn_configs.iter().zip(["p", "alpha", "eps"]) {
        let err = group_norm_block(2, 4, *config, vb.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err}");
    }
    let ln_configs = [
        LayerNormBlockConfig {
            dropout: p15,
            ..Default::default()
        },
        LayerNormBlockConfig {
            activation: elu,
            ..Default::default()
        },
        LayerNormBlockConfig {
            norm: grad_layers::LayerNormConfig {
                eps: -1.0,
                ..Default::default()
            },
            ..Default::default()
        },
    ];
    for (config, field) in ln_configs.iter().zip(["p", "alpha", "eps"]) {
        let err = layer_norm_block(4, *config, vb.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err}");
    }
    assert!(group_norm_block(3, 4, GroupNormBlockConfig::default(), vb.clone()).is_err());
    assert!(group_norm_block(0, 4, GroupNormBlockConfig::default(), vb.clone()).is_err());
    assert!(layer_norm_block(0, LayerNormBlockConfig::default(), vb.clone()).is_err());
    // The functional forms: a bad p is an error before anything is drawn.
    let x = Tensor::ones((2, 4, 3), DType::F32, &Device::Cpu)?;
    let mut rng = Philox::new(2);
    fn nan(rng: &mut Philox) -> Option<BlockDropout<'_>> {
        drop_at(f64::NAN, rng)
    }
    let act = Activation::Relu;
    assert!(ops::layer_norm_block(&x, &[3], None, None, 1e-5, act, nan(&mut rng)).is_err());
    assert!(ops::group_norm_block(&x, 2, None, None, 1e-5, act, nan(&mut rng)).is_err());
    assert!(
        ops::layer_norm_block_composed(&x, &[3], None, None, 1e-5, act, nan(&mut rng)).is_err()
    );
    assert!(ops::group_norm_block_composed(&x, 2, None, None, 1e-5, act, nan(&mut rng)).is_err());
    // A bad norm argument too, with a good dropout.
    fn good(rng: &mut Philox) -> Option<BlockDropout<'_>> {
        drop_at(0.5, rng)
    }
    assert!(ops::layer_norm_block(&x, &[4], None, None, 1e-5, act, good(&mut rng)).is_err());
    assert!(ops::group_norm_block(&x, 3, None, None, 1e-5, act, good(&mut rng)).is_err());
    assert!(ops::layer_norm_block(&x, &[3], None, None, 0.0, act, good(&mut rng)).is_err());
    assert_eq!(rng.state().offset, 0);
    Ok(())
}

/// Element dropout with probability `p` drawn from `rng`.
fn drop_at(p: f64, rng: &mut Philox) -> Option<BlockDropout<'_>> {
    Some(BlockDropout {
        p,
        kind: DropoutKind::Element,
        rng,
    })
}

#[test]
fn non_finite_inputs_stay_visible() -> TestResult {
    let drop = Some(DropoutConfig {
        p: 0.5,
        seed: Some(3),
        ..Default::default()
    });
    for kind in [Kind::Layer, Kind::Group(1)] {
        let p = build(kind, &[2, 2, 3], Activation::Relu, drop, DType::F32);
        let mut v = vec![1f32; 2 * 2 * 3];
        v[0] = f32::NAN;
        let x = Tensor::from_vec(v, (2, 2, 3), &Device::Cpu)?;
        let y = host_values(&p.block(&x, true)?)?;
        // The first row's statistics are NaN, so its every output is NaN, dropped or kept
        // (x * 0); the other rows are finite.
        let row = match kind {
            Kind::Layer => 3,
            Kind::Group(_) => 6,
        };
        assert!(y[..row].iter().all(|v| v.is_nan()), "{kind:?} {y:?}");
        assert!(y[row..].iter().all(|v| v.is_finite()), "{kind:?} {y:?}");
    }
    Ok(())
}

#[test]
fn serde_rejects_unknown_fields() {
    let ok = serde_json::to_string(&LayerNormBlockConfig::default()).unwrap();
    let back: LayerNormBlockConfig = serde_json::from_str(&ok).unwrap();
    assert_eq!(back, LayerNormBlockConfig::default());
    let bad = ok.replacen('{', "{\"momentum\":0.1,", 1);
    assert!(serde_json::from_str::<LayerNormBlockConfig>(&bad).is_err());
    let ok = serde_json::to_string(&GroupNormBlockConfig::default()).unwrap();
    let back: GroupNormBlockConfig = serde_json::from_str(&ok).unwrap();
    assert_eq!(back, GroupNormBlockConfig::default());
    let bad = ok.replacen('{', "{\"groups\":2,", 1);
    assert!(serde_json::from_str::<GroupNormBlockConfig>(&bad).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any shape, layout, dtype and dropout kind: the fused blocks equal the composed ones.
    #[test]
    fn fused_equals_composed_for_any_layout(
        (dims, data) in prop::sample::select(vec![vec![5usize, 4], vec![3, 4, 6], vec![2, 4, 4, 5], vec![2, 2, 3, 2, 2]])
            .prop_flat_map(|d| {
                let n: usize = d.iter().product();
                (Just(d), values(n, Values::Finite { lo: -3.0, hi: 3.0 }))
            }),
        act in prop::sample::select(activations()),
        kind in prop::sample::select(vec![DropoutKind::Element, DropoutKind::Alpha, DropoutKind::FeatureAlpha]),
        p in 0.0f64..1.0,
        group in any::<bool>(),
        train in any::<bool>(),
        dtype in prop::sample::select(vec![DType::F64, DType::F32]),
        layout in prop::sample::select(vec![LayoutKind::Contiguous, LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let x = build_tensor(&dims, data, dtype, layout)?;
        let last = dims[dims.len() - 1];
        // Rows can be two near-equal values: an eps this size keeps f32's variance well
        // conditioned on both paths (as in norm_properties.rs).
        const EPS: f64 = 1e-3;
        let run = |composed: bool| -> Vec<Vec<f64>> {
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let mut rng = Philox::new(21);
            let dropout = train.then_some(BlockDropout { p, kind, rng: &mut rng });
            let y = match (group, composed) {
                (true, false) => ops::group_norm_block(xv.as_tensor(), 2, None, None, EPS, act, dropout),
                (true, true) => ops::group_norm_block_composed(xv.as_tensor(), 2, None, None, EPS, act, dropout),
                (false, false) => ops::layer_norm_block(xv.as_tensor(), &[last], None, None, EPS, act, dropout),
                (false, true) => ops::layer_norm_block_composed(xv.as_tensor(), &[last], None, None, EPS, act, dropout),
            }.unwrap();
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

//! Every layer constructor with hyper-parameters at and past their bounds, as a table: at the
//! bound the layer builds and a forward is finite; past it the error names the argument. Plus
//! the initialisers and LSUV at their edges.

#![allow(clippy::panic, reason = "a test fails by panicking")]

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use grad_core::{Philox, PhiloxState};
use grad_layers::init::{FanMode, Initializer, Nonlinearity};
use grad_layers::lsuv::{LsuvConfig, lsuv};
use grad_layers::ops::DropoutKind;
use grad_layers::{
    Activation, Affine, BatchNormConfig, DropoutConfig, GroupNormConfig, LayerNormConfig,
    PReluConfig, RmsNormConfig, batch_norm, dropout, group_norm, layer_norm, prelu, rms_norm,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A layer's forward in training mode.
type Forward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;
/// A built layer, or its constructor's error.
type Built = Result<Forward, grad_layers::Error>;

fn build(what: &str, vb: VarBuilder) -> Built {
    fn boxed<M: ModuleT + 'static>(m: M) -> Forward {
        Box::new(move |x| m.forward_t(x, true))
    }
    fn act(a: Activation) -> Built {
        a.validate()?;
        Ok(boxed(a))
    }
    let bn = BatchNormConfig::default;
    let dr = |p: f64| DropoutConfig {
        p,
        kind: DropoutKind::Element,
        seed: Some(1),
    };
    Ok(match what {
        "bn eps tiny" => boxed(batch_norm(
            4,
            BatchNormConfig {
                eps: f64::MIN_POSITIVE,
                ..bn()
            },
            vb,
        )?),
        "bn momentum 0" => boxed(batch_norm(
            4,
            BatchNormConfig {
                momentum: Some(0.0),
                ..bn()
            },
            vb,
        )?),
        "bn momentum 1" => boxed(batch_norm(
            4,
            BatchNormConfig {
                momentum: Some(1.0),
                ..bn()
            },
            vb,
        )?),
        "bn cumulative" => boxed(batch_norm(
            4,
            BatchNormConfig {
                momentum: None,
                ..bn()
            },
            vb,
        )?),
        "bn eps 0" => boxed(batch_norm(4, BatchNormConfig { eps: 0.0, ..bn() }, vb)?),
        "bn eps NaN" => boxed(batch_norm(
            4,
            BatchNormConfig {
                eps: f64::NAN,
                ..bn()
            },
            vb,
        )?),
        "bn momentum 1.5" => boxed(batch_norm(
            4,
            BatchNormConfig {
                momentum: Some(1.5),
                ..bn()
            },
            vb,
        )?),
        "bn momentum -0" => boxed(batch_norm(
            4,
            BatchNormConfig {
                momentum: Some(-1e-9),
                ..bn()
            },
            vb,
        )?),
        "bn num_features 0" => boxed(batch_norm(0, bn(), vb)?),
        "ln eps f64::MAX" => boxed(layer_norm(
            4,
            LayerNormConfig {
                eps: f64::MAX,
                affine: Affine::WeightAndBias,
            },
            vb,
        )?),
        "ln eps inf" => boxed(layer_norm(
            4,
            LayerNormConfig {
                eps: f64::INFINITY,
                affine: Affine::None,
            },
            vb,
        )?),
        "ln shape 0" => boxed(layer_norm(0, LayerNormConfig::default(), vb)?),
        "gn groups = channels" => boxed(group_norm(4, 4, GroupNormConfig::default(), vb)?),
        "gn groups 3 of 4" => boxed(group_norm(3, 4, GroupNormConfig::default(), vb)?),
        "gn groups 0" => boxed(group_norm(0, 4, GroupNormConfig::default(), vb)?),
        "gn eps -1" => boxed(group_norm(
            2,
            4,
            GroupNormConfig {
                eps: -1.0,
                affine: true,
            },
            vb,
        )?),
        "rms eps None" => boxed(rms_norm(
            4,
            RmsNormConfig {
                eps: None,
                elementwise_affine: true,
            },
            vb,
        )?),
        "rms eps 0" => boxed(rms_norm(
            4,
            RmsNormConfig {
                eps: Some(0.0),
                elementwise_affine: true,
            },
            vb,
        )?),
        "dropout p 0" => boxed(dropout(dr(0.0), vb)?),
        "dropout p 1" => boxed(dropout(dr(1.0), vb)?),
        "dropout p next below 1" => boxed(dropout(dr(1.0 - f64::EPSILON), vb)?),
        "dropout p -0.1" => boxed(dropout(dr(-0.1), vb)?),
        "dropout p NaN" => boxed(dropout(dr(f64::NAN), vb)?),
        "dropout p 1.5" => boxed(dropout(dr(1.5), vb)?),
        "prelu 4 channels" => boxed(prelu(
            PReluConfig {
                num_parameters: 4,
                init: -10.0,
            },
            vb,
        )?),
        "prelu 0 parameters" => boxed(prelu(
            PReluConfig {
                num_parameters: 0,
                init: 0.25,
            },
            vb,
        )?),
        "prelu init NaN" => boxed(prelu(
            PReluConfig {
                num_parameters: 1,
                init: f64::NAN,
            },
            vb,
        )?),
        "softplus beta 0" => act(Activation::Softplus {
            beta: 0.0,
            threshold: 20.0,
        })?,
        "softplus threshold NaN" => act(Activation::Softplus {
            beta: 1.0,
            threshold: f64::NAN,
        })?,
        "hardtanh min = max" => act(Activation::Hardtanh {
            min_val: 1.0,
            max_val: 1.0,
        })?,
        "celu alpha 0" => act(Activation::Celu { alpha: 0.0 })?,
        "elu alpha 0" => act(Activation::Elu { alpha: 0.0 })?,
        "leaky slope -1" => act(Activation::LeakyRelu {
            negative_slope: -1.0,
        })?,
        other => panic!("no such row: {other}"),
    })
}

#[test]
fn layer_configs_at_and_past_their_bounds() -> TestResult {
    // (row, Ok(()) or the argument the error names)
    let table: [(&str, Option<&str>); 33] = [
        ("bn eps tiny", None),
        ("bn momentum 0", None),
        ("bn momentum 1", None),
        ("bn cumulative", None),
        ("bn eps 0", Some("eps")),
        ("bn eps NaN", Some("eps")),
        ("bn momentum 1.5", Some("momentum")),
        ("bn momentum -0", Some("momentum")),
        ("bn num_features 0", Some("num_features")),
        ("ln eps f64::MAX", None),
        ("ln eps inf", Some("eps")),
        ("ln shape 0", Some("normalized_shape")),
        ("gn groups = channels", None),
        ("gn groups 3 of 4", Some("groups")),
        ("gn groups 0", Some("groups")),
        ("gn eps -1", Some("eps")),
        ("rms eps None", None),
        ("rms eps 0", Some("eps")),
        ("dropout p 0", None),
        ("dropout p 1", None),
        ("dropout p next below 1", None),
        ("dropout p -0.1", Some("p")),
        ("dropout p NaN", Some("p")),
        ("dropout p 1.5", Some("p")),
        ("prelu 4 channels", None),
        ("prelu 0 parameters", Some("num_parameters")),
        ("prelu init NaN", Some("init")),
        ("softplus beta 0", Some("beta")),
        ("softplus threshold NaN", Some("threshold")),
        ("hardtanh min = max", Some("max_val")),
        ("celu alpha 0", Some("alpha")),
        ("elu alpha 0", None),
        ("leaky slope -1", None),
    ];
    let x = Philox::new(4).normal((8, 4), 0.0, 3.0, DType::F32, &Device::Cpu)?;
    for (row, named) in table {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu).pp("l");
        let outcome = build(row, vb).and_then(|f| {
            let y = f(&x)?.to_dtype(DType::F64)?.flatten_all()?;
            Ok(y.to_vec1::<f64>()?)
        });
        grad_testkit::judge_row(row, outcome, named)?;
    }
    Ok(())
}

#[test]
fn initialisers_and_lsuv_at_their_edges() -> TestResult {
    let dev = Device::Cpu;
    // A generator at the end of its stream keeps drawing (the offset wraps as PyTorch's does).
    let mut rng = Philox::from_state(PhiloxState {
        seed: 3,
        offset: u64::MAX - 2,
    });
    let t = rng.uniform(16, -1.0, 1.0, DType::F32, &dev)?;
    assert_eq!(t.dims(), [16]);
    let w = candle_core::Var::zeros((3, 5), DType::F32, &dev)?;
    for init in [
        Initializer::KaimingUniform {
            a: 0.0,
            mode: FanMode::FanIn,
            nonlinearity: Nonlinearity::LeakyRelu,
        },
        Initializer::XavierNormal { gain: 1e-30 },
        Initializer::Orthogonal { gain: 1.0 },
        Initializer::Constant { value: f64::MAX },
    ] {
        init.init_var(&w, &mut rng)?;
    }
    for bad in [
        Initializer::XavierNormal { gain: f64::NAN },
        Initializer::Orthogonal {
            gain: f64::INFINITY,
        },
    ] {
        assert!(bad.init_var(&w, &mut rng).is_err(), "{bad:?} accepted");
    }
    let layer = candle_core::Var::zeros((4, 4), DType::F32, &dev)?;
    let batch = Tensor::ones((8, 4), DType::F32, &dev)?;
    for (cfg, arg) in [
        (
            LsuvConfig {
                tol: 0.0,
                ..LsuvConfig::default()
            },
            "tol",
        ),
        (
            LsuvConfig {
                max_iters: 0,
                ..LsuvConfig::default()
            },
            "max_iters",
        ),
    ] {
        let e = lsuv(
            std::slice::from_ref(&layer),
            &batch,
            &cfg,
            &mut rng,
            |_, x| x.matmul(&layer.t()?),
        )
        .err()
        .ok_or(format!("{cfg:?} accepted"))?;
        assert!(e.to_string().contains(arg), "{e}");
    }
    Ok(())
}

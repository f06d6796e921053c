//! Activations and PReLU against PyTorch's vectors: every case, in f64 and in f32; and every
//! activation case through a batch-norm block whose norm is the identity.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{Tensor, Var};
use grad_core::device::{Path, with_path};
use grad_layers::ops::{self, BatchNormStats};
use grad_layers::{Activation, GeluApproximation};
use grad_testkit::{Case, CaseError, Outputs, Precision, grads_of, run, run_as, run_subset};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The case's activation: `None` for PReLU (a layer with a weight, not an [`Activation`]).
fn parse_activation(case: &Case) -> Result<Option<Activation>, CaseError> {
    let name = case.attr_str("activation")?.ok_or("activation is null")?;
    Ok(Some(match name {
        "prelu" => return Ok(None),
        "leaky_relu" => Activation::LeakyRelu {
            negative_slope: case.attr_f64("negative_slope")?.ok_or("negative_slope")?,
        },
        "elu" => Activation::Elu {
            alpha: case.attr_f64("alpha")?.ok_or("alpha")?,
        },
        "selu" => Activation::Selu,
        "gelu" => Activation::Gelu {
            approximate: match case.attr_str("approximate")? {
                Some("tanh") => GeluApproximation::Tanh,
                _ => GeluApproximation::None,
            },
        },
        "relu" => Activation::Relu,
        "relu6" => Activation::Relu6,
        "sigmoid" => Activation::Sigmoid,
        "tanh" => Activation::Tanh,
        "silu" => Activation::Silu,
        "mish" => Activation::Mish,
        "softplus" => Activation::Softplus {
            beta: case.attr_f64("beta")?.ok_or("beta")?,
            threshold: case.attr_f64("threshold")?.ok_or("threshold")?,
        },
        "hardswish" => Activation::Hardswish,
        "hardsigmoid" => Activation::Hardsigmoid,
        "hardtanh" => Activation::Hardtanh {
            min_val: case.attr_f64("min_val")?.ok_or("min_val")?,
            max_val: case.attr_f64("max_val")?.ok_or("max_val")?,
        },
        "celu" => Activation::Celu {
            alpha: case.attr_f64("alpha")?.ok_or("alpha")?,
        },
        "softsign" => Activation::Softsign,
        "logsigmoid" => Activation::LogSigmoid,
        unknown => return Err(format!("unknown activation {unknown}").into()),
    }))
}

fn activation_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let x = Var::from_tensor(&case.input("x")?.to_tensor(p.dtype())?)?;
    let mut weight = None;
    let y = match parse_activation(case)? {
        None => {
            let w = Var::from_tensor(&case.input("weight")?.to_tensor(p.dtype())?)?;
            let y = ops::prelu(x.as_tensor(), w.as_tensor())?;
            weight = Some(w);
            y
        }
        Some(act) => ops::activation(x.as_tensor(), act)?,
    };
    outputs(case, p, &x, weight.as_ref(), &y)
}

/// The activation through a batch-norm block whose norm is exactly the identity (evaluation,
/// running mean 0, `running_var + eps = 1` exactly, no affine) and without dropout: the block's
/// activation on the case's vectors, laid out as `[1, C]`.
fn block_activation_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let act = parse_activation(case)?.ok_or("prelu is not a block's activation")?;
    let x = Var::from_tensor(&case.input("x")?.to_tensor(p.dtype())?)?;
    let c = x.elem_count();
    let eps = 2f64.powi(-20);
    let mean = Tensor::zeros(c, p.dtype(), x.device())?;
    let var = Tensor::full(1.0 - eps, c, x.device())?.to_dtype(p.dtype())?;
    let stats = BatchNormStats::Running {
        mean: &mean,
        var: &var,
    };
    let flat = x.as_tensor().reshape((1, c))?;
    let y = ops::batch_norm_block(&flat, None, None, stats, eps, act, None)?.y;
    outputs(case, p, &x, None, &y.reshape(x.shape())?)
}

/// `y`, `grad_x` and (with a weight) `grad_weight` for the case's upstream gradient.
fn outputs(
    case: &Case,
    p: Precision,
    x: &Var,
    weight: Option<&Var>,
    y: &Tensor,
) -> Result<Outputs, CaseError> {
    let mut out = Outputs::new();
    let upstream = case.input("grad_output")?.to_tensor(p.dtype())?;
    let mut wrt: Vec<&Tensor> = vec![x.as_tensor()];
    wrt.extend(weight.map(Var::as_tensor));
    let grads = grads_of(y, &upstream, &wrt)?;
    out.insert(
        "grad_x".into(),
        grads[0].clone().ok_or("no gradient for x")?,
    );
    if let Some(Some(gw)) = grads.get(1) {
        out.insert("grad_weight".into(), gw.clone());
    }
    out.insert("y".into(), y.clone());
    Ok(out)
}

#[test]
fn activations_f64() -> TestResult {
    run("activations", Precision::F64, activation_case).assert_all_passed();
    Ok(())
}

#[test]
fn activations_f32() -> TestResult {
    run("activations", Precision::F32, activation_case).assert_all_passed();
    Ok(())
}

#[test]
fn activations_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "activations",
            "activations_composed",
            Precision::F64,
            activation_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn activations_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "activations",
            "activations_composed",
            Precision::F32,
            activation_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

/// Whether a case's activation can be a block's (every one but PReLU).
fn block_applies(case: &Case) -> bool {
    case.attr_str("activation").ok().flatten() != Some("prelu")
}

#[test]
fn block_activations_f64() -> TestResult {
    let label = "batch_norm_block_activations";
    run_subset(
        "activations",
        label,
        Precision::F64,
        block_applies,
        block_activation_case,
    )
    .assert_all_passed();
    Ok(())
}

#[test]
fn block_activations_f32() -> TestResult {
    let label = "batch_norm_block_activations";
    run_subset(
        "activations",
        label,
        Precision::F32,
        block_applies,
        block_activation_case,
    )
    .assert_all_passed();
    Ok(())
}

#[test]
fn block_activations_composed_f64() -> TestResult {
    let label = "batch_norm_block_activations_composed";
    with_path(Path::Composed, || {
        run_subset(
            "activations",
            label,
            Precision::F64,
            block_applies,
            block_activation_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn block_activations_composed_f32() -> TestResult {
    let label = "batch_norm_block_activations_composed";
    with_path(Path::Composed, || {
        run_subset(
            "activations",
            label,
            Precision::F32,
            block_applies,
            block_activation_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

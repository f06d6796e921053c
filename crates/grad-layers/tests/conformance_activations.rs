//! Activations and PReLU against PyTorch's vectors: every case, in f64 and in f32.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{Tensor, Var};
use grad_core::device::{Path, with_path};
use grad_layers::{Activation, GeluApproximation, ops};
use grad_testkit::{Case, CaseError, Outputs, Precision, grads_of, run, run_as};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn activation_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let x = Var::from_tensor(&case.input("x")?.to_tensor(p.dtype())?)?;
    let name = case.attr_str("activation")?.ok_or("activation is null")?;
    let mut weight = None;
    let y = match name {
        "prelu" => {
            let w = Var::from_tensor(&case.input("weight")?.to_tensor(p.dtype())?)?;
            let y = ops::prelu(x.as_tensor(), w.as_tensor())?;
            weight = Some(w);
            y
        }
        other => {
            let act = match other {
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
            };
            ops::activation(x.as_tensor(), act)?
        }
    };
    let mut out = Outputs::new();
    let upstream = case.input("grad_output")?.to_tensor(p.dtype())?;
    let mut wrt: Vec<&Tensor> = vec![x.as_tensor()];
    wrt.extend(weight.as_ref().map(Var::as_tensor));
    let grads = grads_of(&y, &upstream, &wrt)?;
    out.insert(
        "grad_x".into(),
        grads[0].clone().ok_or("no gradient for x")?,
    );
    if let Some(Some(gw)) = grads.get(1) {
        out.insert("grad_weight".into(), gw.clone());
    }
    out.insert("y".into(), y);
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

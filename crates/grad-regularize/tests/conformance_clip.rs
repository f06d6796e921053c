//! Gradient clipping and AGC against PyTorch's vectors: every case, in f64 and in f32.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{Device, Tensor, Var};
use grad_core::device::{Path, with_path};
use grad_core::{NamedVars, NormType};
use grad_regularize::{AgcConfig, NonFiniteNorm, adaptive_clip, clip_grad_norm, clip_grad_value};
use grad_testkit::{Case, CaseError, Outputs, Precision, run, run_as};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The case's `<prefix>0`, `<prefix>1`, ... inputs, in order.
fn numbered(case: &Case, prefix: &str, p: Precision) -> Result<Vec<Tensor>, CaseError> {
    let mut out = Vec::new();
    while let Some(t) = case.input_opt(&format!("{prefix}{}", out.len())) {
        out.push(t.to_tensor(p.dtype())?);
    }
    Ok(out)
}

fn clip_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let mut grads = numbered(case, "g", p)?;
    let mut out = Outputs::new();
    match case.attr_str("kind")? {
        Some("norm") => {
            let norm_type = NormType::from_p(case.attr_f64("norm_type")?.ok_or("norm_type")?)?;
            let outcome = clip_grad_norm(
                &mut grads,
                case.attr_f64("max_norm")?.ok_or("max_norm")?,
                norm_type,
                if case.attr_bool("error_if_nonfinite")? {
                    NonFiniteNorm::Error
                } else {
                    NonFiniteNorm::Scale
                },
            )?;
            out.insert(
                "total_norm".into(),
                Tensor::new(outcome.total_norm, &Device::Cpu)?.to_dtype(p.dtype())?,
            );
        }
        Some("value") => {
            clip_grad_value(
                &mut grads,
                case.attr_f64("clip_value")?.ok_or("clip_value")?,
            )?;
        }
        other => return Err(format!("unknown kind {other:?}").into()),
    }
    for (i, g) in grads.into_iter().enumerate() {
        out.insert(format!("g{i}"), g);
    }
    Ok(out)
}

fn agc_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let params = numbered(case, "p", p)?;
    let grads = numbered(case, "g", p)?;
    let vars: Vec<Var> = params
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_, _>>()?;
    let named = NamedVars::new(
        vars.iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone())),
    )?;
    // A gradient store holding exactly the case's gradients.
    let mut store = candle_core::backprop::GradStore::default();
    for (v, g) in vars.iter().zip(&grads) {
        store.insert(v.as_tensor(), g.clone());
    }
    let mut named_grads = named.grads(&store)?;
    let cfg = AgcConfig {
        clip_factor: case.attr_f64("clip_factor")?.ok_or("clip_factor")?,
        eps: case.attr_f64("eps")?.ok_or("eps")?,
        exclude: Vec::new(),
    };
    adaptive_clip(&mut named_grads, &cfg)?;
    let mut out = Outputs::new();
    for i in 0..grads.len() {
        out.insert(
            format!("clipped_g{i}"),
            named_grads
                .get(&format!("p{i}"))
                .ok_or("missing gradient")?
                .clone(),
        );
    }
    Ok(out)
}

#[test]
fn clip_grad_f64() -> TestResult {
    run("clip_grad", Precision::F64, clip_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn clip_grad_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as("clip_grad", "clip_grad_composed", Precision::F64, clip_case)
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn clip_grad_f32() -> TestResult {
    run("clip_grad", Precision::F32, clip_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn clip_grad_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as("clip_grad", "clip_grad_composed", Precision::F32, clip_case)
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn agc_f64() -> TestResult {
    run("agc", Precision::F64, agc_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn agc_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as("agc", "agc_composed", Precision::F64, agc_case)
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn agc_f32() -> TestResult {
    run("agc", Precision::F32, agc_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn agc_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as("agc", "agc_composed", Precision::F32, agc_case)
    })
    .assert_all_passed();
    Ok(())
}

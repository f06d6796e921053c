//! Cross-entropy and the loss scaler against PyTorch's vectors: every case, in f64 and in f32.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use grad_core::device::{Path, with_path};
use grad_regularize::{CrossEntropyConfig, LossScaler, LossScalerConfig, Reduction, cross_entropy};
use grad_testkit::{Case, CaseError, Outputs, Precision, grads_of, run, run_as};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn cross_entropy_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let logits = Var::from_tensor(&case.input("logits")?.to_tensor(p.dtype())?)?;
    let targets = case.input("target")?.to_tensor(p.dtype())?;
    let options = CrossEntropyConfig {
        weight: case
            .input_opt("weight")
            .map(|w| w.to_tensor(p.dtype()))
            .transpose()?,
        ignore_index: Some(case.attr_i64("ignore_index")?.unwrap_or(-100)),
        reduction: match case.attr_str("reduction")? {
            Some("sum") => Reduction::Sum,
            Some("none") => Reduction::None,
            _ => Reduction::Mean,
        },
        label_smoothing: case.attr_f64("label_smoothing")?.unwrap_or(0.0),
    };
    let loss = cross_entropy(logits.as_tensor(), &targets, &options)?;
    let upstream = case.input("grad_output")?.to_tensor(p.dtype())?;
    let grad = grads_of(&loss, &upstream, &[logits.as_tensor()])?[0]
        .clone()
        .ok_or("no gradient")?;
    Ok(Outputs::from([
        ("loss".to_string(), loss),
        ("grad_logits".to_string(), grad),
    ]))
}

fn grad_scaler_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let config = LossScalerConfig {
        init_scale: case.attr_f64("init_scale")?.ok_or("init_scale")?,
        growth_factor: case.attr_f64("growth_factor")?.ok_or("growth_factor")?,
        backoff_factor: case.attr_f64("backoff_factor")?.ok_or("backoff_factor")?,
        growth_interval: u32::try_from(
            case.attr_i64("growth_interval")?.ok_or("growth_interval")?,
        )?,
    };
    let mut scaler = LossScaler::new(config)?;
    let initial = f64::from(scaler.scale_value());
    let (mut scale, mut tracker, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for found in case.input("found_inf")?.values_i64()? {
        // A real step: gradients scaled by the current scale, overflowing on flagged steps.
        let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let params = grad_core::NamedVars::new([("w", w.clone())])?;
        let loss = if found == 1 {
            (w.as_tensor() * f64::INFINITY)?.sum_all()?
        } else {
            w.sqr()?.sum_all()?
        };
        let store = scaler.scale(&loss)?.backward()?;
        let mut sgd = candle_nn::SGD::new(vec![w.clone()], 0.01)?;
        let stepped = scaler.step(&mut sgd, &params.grads(&store)?)?;
        scaler.update();
        scale.push(f64::from(scaler.scale_value()));
        tracker.push(i64::from(scaler.state().growth_tracker));
        skipped.push(i64::from(!stepped));
    }
    let n = scale.len();
    let dt = p.dtype();
    Ok(Outputs::from([
        (
            "initial_scale".to_string(),
            Tensor::new(initial, &Device::Cpu)?.to_dtype(dt)?,
        ),
        (
            "scale".to_string(),
            Tensor::from_vec(scale, n, &Device::Cpu)?.to_dtype(dt)?,
        ),
        (
            "growth_tracker".to_string(),
            Tensor::from_vec(tracker, n, &Device::Cpu)?,
        ),
        (
            "skipped".to_string(),
            Tensor::from_vec(skipped, n, &Device::Cpu)?,
        ),
    ]))
}

#[test]
fn cross_entropy_f64() -> TestResult {
    run("cross_entropy", Precision::F64, cross_entropy_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn cross_entropy_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "cross_entropy",
            "cross_entropy_composed",
            Precision::F64,
            cross_entropy_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn cross_entropy_f32() -> TestResult {
    run("cross_entropy", Precision::F32, cross_entropy_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn cross_entropy_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "cross_entropy",
            "cross_entropy_composed",
            Precision::F32,
            cross_entropy_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn grad_scaler_f64() -> TestResult {
    run("grad_scaler", Precision::F64, grad_scaler_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn grad_scaler_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "grad_scaler",
            "grad_scaler_composed",
            Precision::F64,
            grad_scaler_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn grad_scaler_f32() -> TestResult {
    run("grad_scaler", Precision::F32, grad_scaler_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn grad_scaler_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "grad_scaler",
            "grad_scaler_composed",
            Precision::F32,
            grad_scaler_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn scales_are_bit_exact_float32() -> TestResult {
    // The README: scales are f32 values PyTorch computes exactly.
    let file = grad_testkit::load("grad_scaler")?;
    for case in file.cases.iter().filter(|c| !c.expects_error()) {
        let got = grad_scaler_case(case, Precision::F64).unwrap();
        let want = case.expected_tensors()["scale"].values_f64();
        let have = got["scale"].to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert_eq!(have, want, "{}", case.name);
    }
    Ok(())
}

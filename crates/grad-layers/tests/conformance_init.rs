//! Initialisation gains, fans, bounds and standard deviations against PyTorch's values.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor};
use grad_layers::init::{FanMode, Nonlinearity, calculate_gain, fans, kaiming_std, xavier_std};
use grad_testkit::{Case, CaseError, Outputs, Precision, run};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn scalar(v: f64, p: Precision) -> Result<Tensor, CaseError> {
    Ok(Tensor::new(v, &Device::Cpu)?.to_dtype(p.dtype())?)
}

fn init_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let function = case.attr_str("fn")?.ok_or("fn is null")?;
    let mut out = Outputs::new();
    if function == "calculate_gain" {
        let nl: Nonlinearity = case
            .attr_str("nonlinearity")?
            .ok_or("nonlinearity")?
            .parse()?;
        out.insert(
            "gain".into(),
            scalar(calculate_gain(nl, case.attr_f64("param")?)?, p)?,
        );
        return Ok(out);
    }
    let shape: Vec<usize> = case
        .input("weight_shape")?
        .values_i64()?
        .into_iter()
        .map(usize::try_from)
        .collect::<Result<_, _>>()?;
    let (fan_in, fan_out) = fans(&shape)?;
    out.insert(
        "fan_in".into(),
        Tensor::new(i64::try_from(fan_in)?, &Device::Cpu)?,
    );
    out.insert(
        "fan_out".into(),
        Tensor::new(i64::try_from(fan_out)?, &Device::Cpu)?,
    );
    let (gain, std) = match function {
        "kaiming_uniform_" | "kaiming_normal_" => {
            let nl: Nonlinearity = case
                .attr_str("nonlinearity")?
                .ok_or("nonlinearity")?
                .parse()?;
            let a = case.attr_f64("a")?.unwrap_or(0.0);
            let mode = match case.attr_str("mode")? {
                Some("fan_out") => FanMode::FanOut,
                _ => FanMode::FanIn,
            };
            (
                calculate_gain(nl, Some(a))?,
                kaiming_std(&shape, a, mode, nl)?,
            )
        }
        "xavier_uniform_" | "xavier_normal_" => {
            let gain = case.attr_f64("gain")?.ok_or("gain")?;
            (gain, xavier_std(&shape, gain)?)
        }
        other => return Err(format!("unknown init function {other}").into()),
    };
    out.insert("gain".into(), scalar(gain, p)?);
    if function.ends_with("uniform_") {
        out.insert("bound".into(), scalar(3f64.sqrt() * std, p)?);
    } else {
        out.insert("std".into(), scalar(std, p)?);
    }
    Ok(out)
}

#[test]
fn init_f64() -> TestResult {
    run("init", Precision::F64, init_case).assert_all_passed();
    Ok(())
}

#[test]
fn init_f32() -> TestResult {
    run("init", Precision::F32, init_case).assert_all_passed();
    Ok(())
}

#[test]
fn closed_form_values_agree_to_1e15() -> TestResult {
    // The README suggests comparing init values at rtol ~1e-15: check the f64 run that tightly.
    let file = grad_testkit::load("init")?;
    for case in file.cases.iter().filter(|c| !c.expects_error()) {
        let got = init_case(case, Precision::F64).unwrap();
        for (name, want) in case.expected_tensors() {
            let g = got[&name].to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let w = want.scalar_f64()?;
            assert!(
                (g - w).abs() <= 1e-15 * w.abs(),
                "{}: {name}: {g} vs {w}",
                case.name
            );
        }
    }
    Ok(())
}

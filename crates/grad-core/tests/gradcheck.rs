//! gradcheck passes candle's own ops and catches wrong or missing backward passes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use grad_core::{Error, GradcheckConfig, gradcheck};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn input(shape: &[usize], seed: u64) -> Tensor {
    grad_core::Philox::new(seed)
        .normal(shape, 0.0, 1.0, DType::F64, &Device::Cpu)
        .unwrap()
}

/// `x^3`, with a backward that is deliberately wrong (`2 x^2` instead of `3 x^2`) or absent.
struct Cube {
    backward: Option<f64>,
}

impl CustomOp1 for Cube {
    fn name(&self) -> &'static str {
        "cube"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F64(v) = s else {
            candle_core::bail!("f64 only")
        };
        let (a, b) = l.contiguous_offsets().unwrap();
        Ok((
            CpuStorage::F64(v[a..b].iter().map(|x| x * x * x).collect()),
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match self.backward {
            Some(k) => Ok(Some((arg.sqr()?.affine(k, 0.0)? * grad)?)),
            None => Ok(None),
        }
    }
}

#[test]
fn candle_ops_pass() -> TestResult {
    let cfg = GradcheckConfig::default();
    let x = input(&[3, 4], 1);
    let w = input(&[4, 5], 2);
    let b = input(&[5], 3);
    let report = gradcheck(
        |xs: &[Tensor]| {
            let h = xs[0].matmul(&xs[1])?.broadcast_add(&xs[2])?;
            candle_nn::ops::softmax(&h.tanh()?, candle_core::D::Minus1)?.sqr()
        },
        &[x.clone(), w, b],
        &cfg,
    )?;
    assert_eq!(report.inputs.len(), 3);
    assert!(report.inputs.iter().all(|i| i.passed && i.has_gradient));
    assert!(report.inputs.iter().all(|i| i.max_abs_error < 1e-7));

    gradcheck(
        |xs: &[Tensor]| candle_nn::ops::sigmoid(&xs[0])?.exp(),
        std::slice::from_ref(&x),
        &cfg,
    )?;
    gradcheck(
        |xs: &[Tensor]| xs[0].t()?.contiguous()?.sum_keepdim(0),
        &[x],
        &cfg,
    )?;
    Ok(())
}

#[test]
fn a_wrong_backward_is_caught_and_located() -> TestResult {
    let x = input(&[2, 3], 4);
    let err = gradcheck(
        |xs: &[Tensor]| {
            xs[0].apply_op1(Cube {
                backward: Some(2.0),
            })
        },
        &[x],
        &GradcheckConfig::default(),
    )
    .unwrap_err();
    let Error::GradcheckFailed(report) = err else {
        panic!("expected GradcheckFailed")
    };
    let input = &report.inputs[0];
    assert!(!input.passed);
    let worst = input.worst.as_ref().unwrap();
    assert_eq!(worst.position.len(), 2);
    // analytic = 2/3 of the true derivative everywhere.
    assert!((worst.analytic / worst.numeric - 2.0 / 3.0).abs() < 1e-6);
    assert!(report.to_string().contains("FAILED"));

    // The same op with the right backward passes.
    gradcheck(
        |xs: &[Tensor]| {
            xs[0].apply_op1(Cube {
                backward: Some(3.0),
            })
        },
        &[input_tensor()],
        &GradcheckConfig::default(),
    )?;
    Ok(())
}

fn input_tensor() -> Tensor {
    input(&[2, 3], 4)
}

#[test]
fn a_missing_backward_is_caught() -> TestResult {
    let err = gradcheck(
        |xs: &[Tensor]| xs[0].apply_op1(Cube { backward: None }),
        &[input_tensor()],
        &GradcheckConfig::default(),
    )
    .unwrap_err();
    let Error::GradcheckFailed(report) = err else {
        panic!("expected GradcheckFailed")
    };
    assert!(!report.inputs[0].has_gradient);
    assert!(
        report
            .to_string()
            .contains("no gradient reached this input")
    );

    // A real case: candle-nn 0.11.1's fused `softmax_last_dim` has no backward on the CPU, so
    // `backward()` succeeds and nothing upstream learns. gradcheck sees it.
    let err = gradcheck(
        |xs: &[Tensor]| candle_nn::ops::softmax_last_dim(&xs[0]),
        &[input_tensor()],
        &GradcheckConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::GradcheckFailed(r) if !r.inputs[0].has_gradient));
    Ok(())
}

#[test]
fn bad_arguments_are_errors() -> TestResult {
    let f = |xs: &[Tensor]| xs[0].exp();
    let x32 = input_tensor().to_dtype(DType::F32)?;
    assert!(matches!(
        gradcheck(f, &[x32], &GradcheckConfig::default()),
        Err(Error::UnsupportedDType { .. })
    ));
    assert!(matches!(
        gradcheck(f, &[], &GradcheckConfig::default()),
        Err(Error::EmptyInput { .. })
    ));
    let cfg = GradcheckConfig {
        eps: 0.0,
        ..GradcheckConfig::default()
    };
    assert!(matches!(
        gradcheck(f, &[input_tensor()], &cfg),
        Err(Error::InvalidHyperParameter { .. })
    ));
    let failing = |_: &[Tensor]| -> candle_core::Result<Tensor> { candle_core::bail!("boom") };
    assert!(matches!(
        gradcheck(failing, &[input_tensor()], &GradcheckConfig::default()),
        Err(Error::Function(_))
    ));
    Ok(())
}

#[test]
fn a_function_returning_nan_fails_with_a_nan_error_not_zero() -> TestResult {
    let err = gradcheck(
        |xs: &[Tensor]| xs[0].affine(f64::NAN, 0.0),
        &[input(&[2, 3], 5)],
        &GradcheckConfig::default(),
    )
    .unwrap_err();
    let Error::GradcheckFailed(report) = err else {
        panic!("expected GradcheckFailed")
    };
    assert!(!report.inputs[0].passed);
    assert!(report.inputs[0].max_abs_error.is_nan(), "{report}");
    Ok(())
}

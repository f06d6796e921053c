//! Weight and spectral normalisation as layers around candle-nn's `Linear` and `Conv2d`:
//! PyTorch's parameter and buffer names, what reaches the gradients, the power iteration's
//! fixed point, gradcheck in f64, bad input and shared use.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use grad_core::{GradcheckConfig, NamedVars, Philox, gradcheck};
use grad_layers::ops::{self, SpectralNormStep};
use grad_layers::{
    Error, SpectralNormConfig, WeightNormConfig, spectral_norm_conv2d, spectral_norm_linear,
    weight_norm_conv2d, weight_norm_linear,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn names(map: &VarMap) -> (Vec<String>, Vec<String>) {
    let own = |n: NamedVars| n.names().map(str::to_owned).collect();
    (
        own(NamedVars::from_var_map(map)),
        own(NamedVars::buffers_of(map)),
    )
}

#[test]
fn weight_norm_starts_as_the_plain_layer_and_trains_g_and_v() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let fc = weight_norm_linear(5, 3, WeightNormConfig::default(), vb.pp("fc"))?;
    assert_eq!(
        names(&map),
        (
            vec!["fc.weight_v".into(), "fc.bias".into(), "fc.weight_g".into()],
            vec![]
        )
    );
    // g starts at ||v||, so the weight starts as v.
    let w = fc.weight()?;
    let diff = (w - fc.weight_v())?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(diff < 1e-12, "{diff}");
    let x = Philox::new(1).normal((4, 5), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let grads = fc.forward(&x)?.sqr()?.sum_all()?.backward()?;
    for n in ["fc.weight_v", "fc.weight_g", "fc.bias"] {
        let var = map.data().lock().map_err(|e| e.to_string())?[n].clone();
        assert!(grads.get(var.as_tensor()).is_some(), "{n} has no gradient");
    }
    let conv = weight_norm_conv2d(
        2,
        4,
        3,
        Conv2dConfig::default(),
        WeightNormConfig {
            dim: None,
            bias: false,
        },
        vb.pp("conv"),
    )?;
    assert_eq!(conv.weight_g().dims(), [] as [usize; 0]);
    let img = Tensor::ones((1, 2, 5, 5), DType::F64, &Device::Cpu)?;
    assert_eq!(conv.forward(&img)?.dims(), [1, 4, 3, 3]);
    Ok(())
}

/// The largest singular value of `w` ([h, k]) by many power iterations in f64.
fn top_singular_value(w: &Tensor) -> Result<f64, Box<dyn std::error::Error>> {
    let w = w.to_dtype(DType::F64)?.flatten_from(1)?;
    let k = w.dim(1)?;
    let mut v = Tensor::ones(k, DType::F64, &Device::Cpu)?;
    for _ in 0..500 {
        let u = w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?;
        let next = w.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?;
        v = next.broadcast_div(&next.sqr()?.sum_all()?.sqrt()?)?;
    }
    let wv = w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?;
    Ok(wv.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?)
}

#[test]
fn spectral_norm_converges_to_unit_spectral_norm_and_keeps_u_v_as_buffers() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let fc = spectral_norm_linear(6, 4, SpectralNormConfig::default(), vb.pp("fc"))?;
    assert_eq!(
        names(&map),
        (
            vec!["fc.weight_orig".into(), "fc.bias".into()],
            vec!["fc.weight_u".into(), "fc.weight_v".into()]
        )
    );
    let x = Tensor::ones((2, 6), DType::F64, &Device::Cpu)?;
    // Each training forward is one more power iteration: the estimate converges to the top
    // singular value.
    for _ in 0..200 {
        fc.forward_t(&x, true)?;
    }
    let sigma = fc.sigma(false)?.to_scalar::<f64>()?;
    let truth = top_singular_value(fc.weight_orig())?;
    assert!((sigma - truth).abs() < 1e-8 * truth, "{sigma} vs {truth}");
    // Evaluation leaves the buffers alone.
    let before = fc.weight_u().to_vec1::<f64>()?;
    fc.forward_t(&x, false)?;
    assert_eq!(fc.weight_u().to_vec1::<f64>()?, before);
    // Gradients reach weight_orig and bias, never the buffers.
    let grads = fc.forward_t(&x, true)?.sum_all()?.backward()?;
    assert!(grads.get(fc.weight_orig()).is_some());
    assert!(grads.get(fc.weight_u()).is_none() && grads.get(fc.weight_v()).is_none());
    let conv = spectral_norm_conv2d(
        3,
        4,
        3,
        Conv2dConfig::default(),
        SpectralNormConfig::default(),
        vb.pp("conv"),
    )?;
    assert_eq!(conv.weight_v().dims(), [27]);
    // Two layers built with the defaults start from different vectors.
    let other = spectral_norm_linear(6, 4, SpectralNormConfig::default(), vb.pp("fc2"))?;
    assert_ne!(
        other.weight_v().to_vec1::<f64>()?,
        fc.weight_v().to_vec1::<f64>()?
    );
    Ok(())
}

#[test]
fn gradcheck_weight_and_spectral_norm_in_f64() -> TestResult {
    let mut rng = Philox::new(3);
    let v = rng.normal((4, 3), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let g = rng.normal((4, 1), 1.0, 0.3, DType::F64, &Device::Cpu)?;
    let cfg = GradcheckConfig::default();
    let report = gradcheck(
        |t: &[Tensor]| ops::weight_norm(&t[0], &t[1], Some(0)),
        &[v.clone(), g],
        &cfg,
    )?;
    assert!(report.passed(), "{report:?}");
    let u = rng.normal(4, 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let v0 = rng.normal(3, 0.0, 1.0, DType::F64, &Device::Cpu)?;
    // With u and v fixed (evaluation) the op is a function of the weight alone: gradcheck it.
    let eval = SpectralNormStep {
        training: false,
        ..SpectralNormStep::default()
    };
    let report = gradcheck(
        |t: &[Tensor]| ops::spectral_norm(&t[0], &u, &v0, eval).map(|o| o.w),
        std::slice::from_ref(&v),
        &cfg,
    )?;
    assert!(report.passed(), "{report:?}");
    // In training u and v are constants for autograd (as in PyTorch), so its gradient is the
    // evaluation gradient at the updated u and v, not the derivative through the iterations.
    let weight = candle_core::Var::from_tensor(&v)?;
    let up = rng.normal((4, 3), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    let train = ops::spectral_norm(weight.as_tensor(), &u, &v0, SpectralNormStep::default())?;
    let g_train = (&train.w * &up)?.sum_all()?.backward()?;
    let at_new = ops::spectral_norm(weight.as_tensor(), &train.u, &train.v, eval)?;
    let g_eval = (&at_new.w * &up)?.sum_all()?.backward()?;
    let (a, b) = (
        g_train
            .get(weight.as_tensor())
            .ok_or("no training gradient")?,
        g_eval
            .get(weight.as_tensor())
            .ok_or("no evaluation gradient")?,
    );
    assert!((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-14);
    Ok(())
}

#[test]
fn bad_reparameterisations_name_the_argument() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let e = weight_norm_linear(
        3,
        2,
        WeightNormConfig {
            dim: Some(2),
            bias: true,
        },
        vb.pp("a"),
    )
    .err()
    .ok_or("dim 2 of a rank-2 weight accepted")?;
    assert!(
        matches!(
            e,
            Error::DimOutOfRange {
                dim: 2,
                rank: 2,
                ..
            }
        ),
        "{e}"
    );
    let zero = SpectralNormConfig {
        n_power_iterations: 0,
        ..SpectralNormConfig::default()
    };
    let e = spectral_norm_linear(3, 2, zero, vb.pp("b"))
        .err()
        .ok_or("0 iterations")?;
    assert!(e.to_string().contains("n_power_iterations"), "{e}");
    let bad_eps = SpectralNormConfig {
        eps: f64::NAN,
        ..SpectralNormConfig::default()
    };
    let e = spectral_norm_linear(3, 2, bad_eps, vb.pp("c"))
        .err()
        .ok_or("NaN eps")?;
    assert!(e.to_string().contains("eps"), "{e}");
    // A rank-1 weight with dim 1.
    let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
    let one = Tensor::ones(1, DType::F32, &Device::Cpu)?;
    let step = SpectralNormStep {
        dim: 1,
        ..SpectralNormStep::default()
    };
    let e = ops::spectral_norm(&w, &one, &one, step)
        .err()
        .ok_or("rank 1, dim 1")?;
    assert!(
        matches!(
            e,
            Error::DimOutOfRange {
                dim: 1,
                rank: 1,
                ..
            }
        ),
        "{e}"
    );
    // Training with 0 iterations in the functional form, and u of the wrong length.
    let w2 = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
    let (u, v) = (
        Tensor::ones(2, DType::F32, &Device::Cpu)?,
        Tensor::ones(3, DType::F32, &Device::Cpu)?,
    );
    let step0 = SpectralNormStep {
        n_power_iterations: 0,
        ..SpectralNormStep::default()
    };
    assert!(ops::spectral_norm(&w2, &u, &v, step0).is_err());
    let e = ops::spectral_norm(&w2, &v, &v, SpectralNormStep::default())
        .err()
        .ok_or("u of 3")?;
    assert!(e.to_string().contains('u'), "{e}");
    // g of a shape that does not broadcast.
    let e = ops::weight_norm(
        &w2,
        &Tensor::ones((3, 1), DType::F32, &Device::Cpu)?,
        Some(0),
    )
    .err()
    .ok_or("g [3, 1] for a [2, 3] weight")?;
    assert!(e.to_string().contains('g'), "{e}");
    Ok(())
}

#[test]
fn a_spectral_norm_layer_shared_by_threads_trains() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = spectral_norm_linear(8, 8, SpectralNormConfig::default(), vb.pp("fc"))?;
    let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu)?;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let y = fc.forward_t(&x, true).map_err(|e| e.to_string());
                    assert!(y.is_ok(), "{y:?}");
                }
            });
        }
    });
    let u = fc.weight_u().to_vec1::<f32>()?;
    let norm: f32 = u.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    Ok(())
}

#[test]
fn weight_standardisation_matches_timm_and_gradchecks() -> TestResult {
    // timm's StdConv2d: F.batch_norm over weight.reshape(1, out, -1), biased variance, eps 1e-6.
    let mut rng = Philox::new(9);
    let w = rng.normal((4, 3, 3, 3), 0.2, 0.05, DType::F64, &Device::Cpu)?;
    let s = ops::standardize_weight(&w, 1e-6)?.reshape((4, 27))?;
    let means = s.mean(1)?.to_vec1::<f64>()?;
    let vars = s.sqr()?.mean(1)?.to_vec1::<f64>()?;
    for (m, v) in means.iter().zip(&vars) {
        assert!(m.abs() < 1e-12, "{m}");
        // var / (var + eps) with var = 0.05^2.
        assert!((v - 0.0025 / (0.0025 + 1e-6)).abs() < 2e-2, "{v}");
    }
    let report = gradcheck(
        |t: &[Tensor]| ops::standardize_weight(&t[0], 1e-6),
        std::slice::from_ref(&w),
        &GradcheckConfig::default(),
    )?;
    assert!(report.passed(), "{report:?}");
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let conv = grad_layers::std_conv2d(
        3,
        4,
        3,
        Conv2dConfig::default(),
        Default::default(),
        vb.pp("c"),
    )?;
    assert_eq!(names(&map).0, ["c.weight", "c.bias"]);
    let y = conv.forward(&Tensor::ones((1, 3, 5, 5), DType::F64, &Device::Cpu)?)?;
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(conv.raw_weight()).is_some());
    let bad = grad_layers::WeightStandardizationConfig {
        eps: 0.0,
        bias: true,
    };
    let e = grad_layers::std_conv2d(3, 4, 3, Conv2dConfig::default(), bad, vb.pp("d"))
        .err()
        .ok_or("eps 0 accepted")?;
    assert!(e.to_string().contains("eps"), "{e}");
    assert!(ops::standardize_weight(&Tensor::ones(3, DType::F32, &Device::Cpu)?, 1e-6).is_err());
    Ok(())
}

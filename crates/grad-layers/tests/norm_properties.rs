//! Invariants of the normalisation layers: fused equals composed, statistics, invariances,
//! precision, layouts and gradcheck.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use grad_core::strategies::{LayoutKind, Values, build_tensor, values};
use grad_core::{GradcheckConfig, gradcheck};
use grad_layers::ops::{self, BatchNormStats};
use grad_testkit::grads_of;
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Which normaliser a property runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Norm {
    BatchTrain,
    BatchEval,
    Layer,
    Group(usize),
    Rms,
}

/// Runs `norm` (fused or composed) on `x` with optional affine parameters `[C]` or trailing.
fn apply(
    norm: Norm,
    composed: bool,
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> grad_layers::Result<Tensor> {
    let last = &x.dims()[x.rank() - 1..];
    match norm {
        Norm::BatchTrain | Norm::BatchEval => {
            let c = x.dim(1)?;
            let mean = Tensor::arange(0.0, c as f64, x.device())?.to_dtype(x.dtype())?;
            let var = (mean.clone() + 0.5)?;
            let stats = if norm == Norm::BatchTrain {
                BatchNormStats::Batch
            } else {
                BatchNormStats::Running {
                    mean: &mean,
                    var: &var,
                }
            };
            let f = if composed {
                ops::batch_norm_composed
            } else {
                ops::batch_norm
            };
            Ok(f(x, w, b, stats, eps)?.y)
        }
        Norm::Layer if composed => ops::layer_norm_composed(x, last, w, b, eps),
        Norm::Layer => ops::layer_norm(x, last, w, b, eps),
        Norm::Group(g) if composed => ops::group_norm_composed(x, g, w, b, eps),
        Norm::Group(g) => ops::group_norm(x, g, w, b, eps),
        Norm::Rms if composed => ops::rms_norm_composed(x, last, w, Some(eps)),
        Norm::Rms => ops::rms_norm(x, last, w, Some(eps)),
    }
}

/// The shape of the affine parameters for `norm` on `dims`.
fn param_dims(norm: Norm, dims: &[usize]) -> Vec<usize> {
    match norm {
        Norm::Layer | Norm::Rms => vec![dims[dims.len() - 1]],
        _ => vec![dims[1]],
    }
}

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn assert_close(a: &[f64], b: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

fn norms() -> impl Strategy<Value = Norm> {
    prop_oneof![
        Just(Norm::BatchTrain),
        Just(Norm::BatchEval),
        Just(Norm::Layer),
        Just(Norm::Group(1)),
        Just(Norm::Group(2)),
        Just(Norm::Rms),
    ]
}

/// `[N, C, *]` shapes with an even C (so 2 groups divide it) and at least 2 values per channel.
fn shapes() -> impl Strategy<Value = Vec<usize>> {
    (2usize..6, 1usize..4, prop::collection::vec(1usize..5, 0..3)).prop_map(|(n, half_c, rest)| {
        let mut d = vec![n, 2 * half_c];
        d.extend(rest);
        d
    })
}

/// Output and every gradient of `norm` for upstream `g`.
fn forward_backward(
    norm: Norm,
    composed: bool,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: &Tensor,
) -> Vec<Vec<f64>> {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let bias = (norm != Norm::Rms).then_some(bv.as_tensor());
    let y = apply(
        norm,
        composed,
        xv.as_tensor(),
        Some(wv.as_tensor()),
        bias,
        1e-3,
    )
    .unwrap();
    let mut out = vec![vals(&y)];
    let wrt = [xv.as_tensor(), wv.as_tensor(), bv.as_tensor()];
    for grad in grads_of(&y, g, &wrt).unwrap() {
        out.push(grad.map(|t| vals(&t)).unwrap_or_default());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fused_equals_composed_forward_and_backward(
        norm in norms(),
        (dims, data, grad) in shapes().prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -3.0, hi: 3.0 }), values(n, Values::Finite { lo: -1.0, hi: 1.0 }))
        }),
        dtype in prop::sample::select(vec![DType::F64, DType::F32, DType::BF16]),
        layout in prop::sample::select(vec![LayoutKind::Contiguous, LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let x = build_tensor(&dims, data, dtype, layout)?;
        let g = build_tensor(&dims, grad, dtype, LayoutKind::Contiguous)?;
        let pd = param_dims(norm, &dims);
        let k = pd[0];
        let w = build_tensor(&pd, (0..k).map(|i| 0.5 + i as f64 * 0.25).collect(), dtype, LayoutKind::Contiguous)?;
        let b = build_tensor(&pd, (0..k).map(|i| i as f64 * 0.1 - 0.2).collect(), dtype, LayoutKind::Contiguous)?;
        let fused = forward_backward(norm, false, &x, &w, &b, &g);
        let composed = forward_backward(norm, true, &x, &w, &b, &g);
        let (rtol, atol) = match dtype {
            DType::F64 => (1e-10, 1e-10),
            DType::F32 => (1e-4, 1e-4),
            _ => (2e-2, 2e-2),
        };
        for (i, what) in ["y", "grad_x", "grad_weight", "grad_bias"].iter().enumerate() {
            if norm == Norm::Rms && i == 3 {
                continue;
            }
            assert_close(&fused[i], &composed[i], rtol, atol * (1.0 + (i as f64) * 4.0), what);
        }
    }

    #[test]
    fn without_affine_outputs_are_standardised(
        norm in prop_oneof![Just(Norm::BatchTrain), Just(Norm::Layer), Just(Norm::Group(2)), Just(Norm::Rms)],
        (dims, data) in shapes().prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -50.0, hi: 50.0 }))
        }),
    ) {
        let x = build_tensor(&dims, data, DType::F64, LayoutKind::Contiguous)?;
        let y = apply(norm, false, &x, None, None, 1e-12)?;
        // Regroup y so each row is one normalisation group.
        let (n, c) = (dims[0], dims[1]);
        let rows = match norm {
            Norm::BatchTrain => y.transpose(0, 1)?.contiguous()?.reshape((c, ()))?,
            Norm::Group(g) => y.reshape((n * g, ()))?,
            _ => y.reshape(((), dims[dims.len() - 1]))?,
        };
        for row in rows.to_vec2::<f64>()? {
            let len = row.len() as f64;
            let spread = row.iter().map(|v| (v - row[0]).abs()).fold(0.0, f64::max);
            if spread == 0.0 && norm != Norm::Rms {
                continue; // a constant group normalises to 0, not unit variance
            }
            let mean = row.iter().sum::<f64>() / len;
            let sq = row.iter().map(|v| v * v).sum::<f64>() / len;
            if norm != Norm::Rms {
                prop_assert!(mean.abs() < 1e-9, "mean {mean}");
                prop_assert!((sq - mean * mean - 1.0).abs() < 1e-6, "variance {}", sq - mean * mean);
            } else if row.iter().any(|v| *v != 0.0) {
                prop_assert!((sq - 1.0).abs() < 1e-6, "mean square {sq}");
            }
        }
    }

    #[test]
    fn invariant_to_shift_and_positive_scale(
        norm in prop_oneof![Just(Norm::BatchTrain), Just(Norm::Layer), Just(Norm::Group(2)), Just(Norm::Rms)],
        (dims, data) in shapes().prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -5.0, hi: 5.0 }))
        }),
        scale in 0.01f64..100.0,
        shift in -1e3f64..1e3,
    ) {
        let x = build_tensor(&dims, data, DType::F64, LayoutKind::Contiguous)?;
        // The shift varies along the group axis of each norm (per channel for batch norm, per
        // row for layer norm, per sample for group norm); RMS norm is only scale invariant.
        let rank = dims.len();
        let shift_t = match norm {
            Norm::BatchTrain => {
                let mut s = vec![1; rank];
                s[1] = dims[1];
                Tensor::arange(0.0, dims[1] as f64, &Device::Cpu)?.affine(shift, shift)?.reshape(s)?
            }
            Norm::Rms => Tensor::zeros(1, DType::F64, &Device::Cpu)?,
            _ => {
                let mut s = vec![1; rank];
                s[0] = dims[0];
                Tensor::arange(0.0, dims[0] as f64, &Device::Cpu)?.affine(shift, shift)?.reshape(s)?
            }
        };
        let moved = x.affine(scale, 0.0)?.broadcast_add(&shift_t)?;
        let eps = 1e-3;
        let a = apply(norm, false, &x, None, None, eps)?;
        // Exact invariance needs eps scaled by scale^2.
        let b = apply(norm, false, &moved, None, None, eps * scale * scale)?;
        assert_close(&vals(&b), &vals(&a), 1e-7, 1e-7, "shifted and scaled");
    }

    #[test]
    fn single_precision_agrees_with_double(
        norm in norms(),
        (dims, data) in shapes().prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -4.0, hi: 4.0 }))
        }),
    ) {
        // Round the inputs to f32 first, so both runs see the same numbers.
        let x32 = build_tensor(&dims, data, DType::F32, LayoutKind::Contiguous)?;
        let x64 = x32.to_dtype(DType::F64)?;
        let y32 = apply(norm, false, &x32, None, None, 1e-3)?;
        let y64 = apply(norm, false, &x64, None, None, 1e-3)?;
        assert_close(&vals(&y32), &vals(&y64), 1e-4, 1e-5, "f32 vs f64");
    }

    #[test]
    fn non_contiguous_equals_contiguous(
        norm in norms(),
        (dims, data) in shapes().prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -4.0, hi: 4.0 }))
        }),
        layout in prop::sample::select(vec![LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let strided = build_tensor(&dims, data, DType::F32, layout)?;
        let dense = strided.contiguous()?;
        let a = apply(norm, false, &strided, None, None, 1e-5)?;
        let b = apply(norm, false, &dense, None, None, 1e-5)?;
        prop_assert_eq!(vals(&a), vals(&b));
    }
}

#[test]
fn gradcheck_every_norm_in_f64() -> TestResult {
    let mut rng = grad_core::Philox::new(5);
    let dims = [3usize, 4, 5];
    let x = rng.normal(&dims[..], 0.5, 2.0, DType::F64, &Device::Cpu)?;
    let cfg = GradcheckConfig::default();
    for norm in [
        Norm::BatchTrain,
        Norm::BatchEval,
        Norm::Layer,
        Norm::Group(1),
        Norm::Group(2),
        // One channel per group: instance norm's training path.
        Norm::Group(4),
        Norm::Rms,
    ] {
        let pd = param_dims(norm, &dims);
        let w = rng.normal(pd.as_slice(), 1.0, 0.5, DType::F64, &Device::Cpu)?;
        let b = rng.normal(pd.as_slice(), 0.0, 0.5, DType::F64, &Device::Cpu)?;
        let mut inputs = vec![x.clone(), w];
        if norm != Norm::Rms {
            inputs.push(b);
        }
        let report = gradcheck(
            |t: &[Tensor]| apply(norm, false, &t[0], Some(&t[1]), t.get(2), 1e-3),
            &inputs,
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{norm:?}: {e}"));
        assert!(report.inputs.iter().all(|i| i.has_gradient), "{norm:?}");
    }
    Ok(())
}

#[test]
fn large_offsets_keep_double_precision() -> TestResult {
    // Channels offset by 1e4 with unit spread: E[x^2] - E[x]^2 would lose 8 digits here.
    let mut rng = grad_core::Philox::new(9);
    let x = (rng.normal((64, 3, 7), 0.0, 1.0, DType::F64, &Device::Cpu)? + 1e4)?;
    let y = ops::batch_norm(&x, None, None, BatchNormStats::Batch, 1e-5)?.y;
    let data = x
        .transpose(0, 1)?
        .contiguous()?
        .reshape((3, ()))?
        .to_vec2::<f64>()?;
    let got = y
        .transpose(0, 1)?
        .contiguous()?
        .reshape((3, ()))?
        .to_vec2::<f64>()?;
    // The reference mean is exact to rounding: x - 1e4 is exact (Sterbenz), so sum the offsets.
    let exact_mean =
        |row: &[f64]| 1e4 + row.iter().map(|v| v - 1e4).sum::<f64>() / row.len() as f64;
    for (row, out) in data.iter().zip(&got) {
        let n = row.len() as f64;
        let mean = exact_mean(row);
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let expected: Vec<f64> = row
            .iter()
            .map(|v| (v - mean) / (var + 1e-5).sqrt())
            .collect();
        assert_close(out, &expected, 1e-9, 1e-12, "batch norm with offset");
    }
    let ly = ops::layer_norm(&x, &[7], None, None, 1e-5)?;
    for (row, out) in x
        .reshape(((), 7))?
        .to_vec2::<f64>()?
        .iter()
        .zip(ly.reshape(((), 7))?.to_vec2::<f64>()?)
    {
        let mean = exact_mean(row);
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 7.0;
        let expected: Vec<f64> = row
            .iter()
            .map(|v| (v - mean) / (var + 1e-5).sqrt())
            .collect();
        assert_close(&out, &expected, 1e-9, 1e-12, "layer norm with offset");
    }
    Ok(())
}

#[test]
fn results_do_not_depend_on_thread_count() -> TestResult {
    let x = grad_core::Philox::new(1).normal((64, 32, 9, 9), 3.0, 2.0, DType::F32, &Device::Cpu)?;
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let y = ops::batch_norm(&x, None, None, BatchNormStats::Batch, 1e-5).unwrap();
                let g = ops::group_norm(&x, 4, None, None, 1e-5).unwrap();
                (vals(&y.y), vals(&y.batch_stats.unwrap().var), vals(&g))
            })
    };
    assert_eq!(run(1), run(2));
    Ok(())
}

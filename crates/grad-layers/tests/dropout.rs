//! The dropout family: statistics (5-sigma bounds, fixed seeds), reproducibility, the backward's
//! regenerated mask, and bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use grad_core::device::{Path, with_path};
use grad_core::{Philox, PhiloxState};
use grad_layers::ops::{DropoutKind, dropout as dropout_op, dropout_composed};
use grad_layers::{DropoutConfig, dropout};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn root() -> candle_nn::VarBuilder<'static> {
    candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu)
}

fn layer(p: f64, kind: DropoutKind, seed: u64) -> grad_layers::Dropout {
    let seed = Some(seed);
    dropout(DropoutConfig { p, kind, seed }, root().pp("drop")).unwrap()
}

const N: usize = 1 << 20;

#[test]
fn keep_fraction_and_expectation_within_five_sigma() -> TestResult {
    let x = Tensor::ones(N, DType::F32, &Device::Cpu)?;
    for p in [0.1, 0.5, 0.9] {
        let y = vals(&layer(p, DropoutKind::Element, 3).forward_t(&x, true)?);
        let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / N as f64;
        let sd = ((1.0 - p) * p / N as f64).sqrt();
        assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        // Kept values are exactly 1 / (1 - p), so E[y] = x.
        let scale = 1.0 / (1.0 - p);
        assert!(
            y.iter()
                .all(|v| *v == 0.0 || (v - scale).abs() < 1e-6 * scale)
        );
        let mean = y.iter().sum::<f64>() / N as f64;
        assert!((mean - 1.0).abs() < 5.0 * sd * scale, "p {p}: mean {mean}");
    }
    Ok(())
}

#[test]
fn channel_dropout_drops_whole_channels_only() -> TestResult {
    for (kind, dims) in [
        (DropoutKind::Channel1d, vec![8, 16, 10]),
        (DropoutKind::Channel2d, vec![4, 16, 5, 6]),
        (DropoutKind::Channel2d, vec![16, 5, 6]),
        (DropoutKind::Channel3d, vec![2, 16, 3, 4, 5]),
        (DropoutKind::FeatureAlpha, vec![4, 16, 7]),
    ] {
        let x = Philox::new(1).normal(dims.as_slice(), 3.0, 1.0, DType::F32, &Device::Cpu)?;
        let y = layer(0.5, kind, 9).forward_t(&x, true)?;
        // A rank-3 input to Channel2d is [N, C, L], as PyTorch 2.15 reads it.
        let plane: usize = dims[2..].iter().product();
        let (xs, ys) = (vals(&x), vals(&y));
        let mut dropped = 0;
        for (xp, yp) in xs.chunks(plane).zip(ys.chunks(plane)) {
            let first_dropped = (yp[0] - drop_value(kind)).abs() < 1e-6;
            for (xv, yv) in xp.iter().zip(yp) {
                if first_dropped {
                    assert!(
                        (yv - drop_value(kind)).abs() < 1e-6,
                        "{kind:?}: partial plane"
                    );
                } else {
                    assert!(
                        (yv - kept_value(kind, *xv)).abs() < 1e-4,
                        "{kind:?}: kept value"
                    );
                }
            }
            dropped += usize::from(first_dropped);
        }
        let planes = xs.len() / plane;
        assert!(
            dropped > 0 && dropped < planes,
            "{kind:?}: dropped {dropped} of {planes}"
        );
    }
    Ok(())
}

fn alpha_coefficients(p: f64) -> (f64, f64, f64) {
    let alpha = 1.758_099_340_847_376_6;
    let a = 1.0 / ((alpha * alpha * p + 1.0) * (1.0 - p)).sqrt();
    (a, alpha * a * p, alpha * a * (p - 1.0))
}

fn drop_value(kind: DropoutKind) -> f64 {
    match kind {
        DropoutKind::FeatureAlpha | DropoutKind::Alpha => alpha_coefficients(0.5).2,
        _ => 0.0,
    }
}

fn kept_value(kind: DropoutKind, x: f64) -> f64 {
    match kind {
        DropoutKind::FeatureAlpha | DropoutKind::Alpha => {
            let (a, b, _) = alpha_coefficients(0.5);
            a * x + b
        }
        _ => 2.0 * x,
    }
}

#[test]
fn alpha_dropout_keeps_standard_normal_moments() -> TestResult {
    let x = Philox::new(2).normal(N, 0.0, 1.0, DType::F64, &Device::Cpu)?;
    for p in [0.05, 0.2, 0.5] {
        let y = vals(&layer(p, DropoutKind::Alpha, 4).forward_t(&x, true)?);
        let n = y.len() as f64;
        let mean = y.iter().sum::<f64>() / n;
        let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        // Mean and variance estimates of a unit-variance sample: sd 1/sqrt(n) and about
        // sqrt(2/n) (wider here: the output is not Gaussian), 5 sigma.
        assert!(mean.abs() < 5.0 / n.sqrt(), "p {p}: mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (3.0 / n).sqrt(),
            "p {p}: var {var}"
        );
    }
    Ok(())
}

#[test]
fn same_seed_same_mask_on_one_and_two_threads() -> TestResult {
    let x = Tensor::ones((300, 1000), DType::F32, &Device::Cpu)?;
    let draw = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                vals(
                    &layer(0.3, DropoutKind::Element, 11)
                        .forward_t(&x, true)
                        .unwrap(),
                )
            })
    };
    assert_eq!(draw(1), draw(2));
    let mut a = Philox::from_state(PhiloxState {
        seed: 11,
        offset: 0,
    });
    let mut b = Philox::from_state(PhiloxState {
        seed: 11,
        offset: 1,
    });
    let ya = vals(&dropout_op(&x, 0.3, DropoutKind::Element, &mut a)?);
    let yb = vals(&dropout_op(&x, 0.3, DropoutKind::Element, &mut b)?);
    assert_ne!(ya, yb, "different offsets, different masks");
    assert_eq!(ya, draw(1));
    Ok(())
}

#[test]
fn forwards_advance_and_a_restored_state_repeats() -> TestResult {
    let d = layer(0.5, DropoutKind::Element, 5);
    let x = Tensor::ones(1000, DType::F32, &Device::Cpu)?;
    let first = vals(&d.forward_t(&x, true)?);
    assert_eq!(
        d.state(),
        PhiloxState {
            seed: 5,
            offset: 1000
        }
    );
    let saved = d.state();
    let second = vals(&d.forward_t(&x, true)?);
    assert_ne!(first, second);
    d.set_state(saved);
    assert_eq!(vals(&d.forward_t(&x, true)?), second);
    // Evaluation is the identity and draws nothing.
    let before = d.state();
    assert_eq!(vals(&d.forward_t(&x, false)?), vals(&x));
    assert_eq!(d.state(), before);
    Ok(())
}

#[test]
fn backward_regenerates_the_forward_mask() -> TestResult {
    for kind in [
        DropoutKind::Element,
        DropoutKind::Channel2d,
        DropoutKind::Alpha,
        DropoutKind::FeatureAlpha,
    ] {
        let x = Var::from_tensor(&Philox::new(8).normal(
            (4, 6, 5, 5),
            0.0,
            1.0,
            DType::F64,
            &Device::Cpu,
        )?)?;
        let up = Philox::new(9).normal((4, 6, 5, 5), 0.0, 1.0, DType::F64, &Device::Cpu)?;
        let mut rng = Philox::new(10);
        let y = dropout_op(x.as_tensor(), 0.4, kind, &mut rng)?;
        let g = grad_testkit::grads_of(&y, &up, &[x.as_tensor()])?[0]
            .clone()
            .unwrap();
        // The composed version (mask built on the host, autograd through candle ops) is the oracle.
        let mut rng2 = Philox::new(10);
        let y2 = dropout_composed(x.as_tensor(), 0.4, kind, &mut rng2)?;
        let g2 = grad_testkit::grads_of(&y2, &up, &[x.as_tensor()])?[0]
            .clone()
            .unwrap();
        assert_eq!(rng.state(), rng2.state());
        for (a, b) in vals(&y)
            .iter()
            .zip(vals(&y2))
            .chain(vals(&g).iter().zip(vals(&g2)))
        {
            assert!((a - b).abs() < 1e-12, "{kind:?}: {a} vs {b}");
        }
    }
    Ok(())
}

#[test]
fn extreme_probabilities() -> TestResult {
    let x = Philox::new(1).normal((64, 64), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let x = Var::from_tensor(&x)?;
    for kind in [DropoutKind::Element, DropoutKind::Alpha] {
        let y = layer(1.0, kind, 0).forward_t(x.as_tensor(), true)?;
        assert!(
            vals(&y).iter().all(|v| *v == 0.0),
            "p = 1 gives zeros, never NaN"
        );
        let g = grad_testkit::grads_of(&y, &x.ones_like()?, &[x.as_tensor()])?[0]
            .clone()
            .unwrap();
        assert!(vals(&g).iter().all(|v| *v == 0.0));
        let d = layer(0.0, kind, 0);
        assert_eq!(
            vals(&d.forward_t(x.as_tensor(), true)?),
            vals(x.as_tensor())
        );
        assert_eq!(d.state().offset, 0);
    }
    Ok(())
}

#[test]
fn non_contiguous_equals_contiguous() -> TestResult {
    let base = Philox::new(3).normal((40, 30), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let strided = base.t()?;
    let dense = strided.contiguous()?;
    let a = dropout_op(&strided, 0.5, DropoutKind::Element, &mut Philox::new(1))?;
    let b = dropout_op(&dense, 0.5, DropoutKind::Element, &mut Philox::new(1))?;
    assert_eq!(vals(&a), vals(&b));
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> TestResult {
    for p in [-0.1, 1.1, f64::NAN] {
        assert!(
            dropout(
                DropoutConfig {
                    p,
                    ..Default::default()
                },
                root()
            )
            .is_err(),
            "p {p}"
        );
    }
    let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
    assert!(
        layer(0.5, DropoutKind::Channel2d, 0)
            .try_forward(&x, true)
            .is_err()
    );
    assert!(
        layer(0.5, DropoutKind::Channel3d, 0)
            .try_forward(&x, true)
            .is_err()
    );
    let ints = Tensor::ones(4, DType::U32, &Device::Cpu)?;
    assert!(
        layer(0.5, DropoutKind::Element, 0)
            .try_forward(&ints, true)
            .is_err()
    );
    Ok(())
}

/// Issue 15, problem 5: a dropped NaN or infinite input stays visible (NaN, PyTorch's
/// `x * mask`), on the fused and the composed path, and so does a NaN gradient.
#[test]
fn dropped_non_finite_values_stay_visible() -> TestResult {
    let x = Tensor::new(
        &[f32::NAN, f32::INFINITY, -f32::INFINITY, 1.0],
        &Device::Cpu,
    )?;
    let x = x.repeat(64)?;
    for kind in [DropoutKind::Element, DropoutKind::Alpha] {
        for p in [0.5, 1.0] {
            let (a, b) = (
                dropout_op(&x, p, kind, &mut Philox::new(3))?,
                dropout_composed(&x, p, kind, &mut Philox::new(3))?,
            );
            for y in [vals(&a), vals(&b)] {
                for (i, v) in y.iter().enumerate() {
                    if i % 4 != 3 {
                        assert!(!v.is_finite(), "{kind:?} p={p}: input {i} became {v}");
                    }
                }
            }
        }
    }
    let v = Var::from_tensor(&Tensor::ones(256, DType::F32, &Device::Cpu)?)?;
    let y = dropout_op(
        v.as_tensor(),
        0.5,
        DropoutKind::Element,
        &mut Philox::new(1),
    )?;
    let upstream = Tensor::full(f32::NAN, 256, &Device::Cpu)?;
    let g = grad_testkit::grads_of(&y, &upstream, &[v.as_tensor()])?;
    assert!(vals(g[0].as_ref().unwrap()).iter().all(|v| v.is_nan()));
    Ok(())
}

/// The mask stream is the same on both paths: equal outputs for every kind, bit for bit in f32.
#[test]
fn fused_and_composed_masks_are_identical() -> TestResult {
    let x =
        Tensor::arange(1f32, 1.0 + 2.0 * 3.0 * 4.0 * 5.0, &Device::Cpu)?.reshape((2, 3, 4, 5))?;
    for kind in [
        DropoutKind::Element,
        DropoutKind::Channel2d,
        DropoutKind::FeatureAlpha,
    ] {
        let mut a = Philox::from_state(PhiloxState {
            seed: 11,
            offset: u64::from(u32::MAX) - 10,
        });
        let mut b = a.clone();
        let (ya, yb) = (
            dropout_op(&x, 0.3, kind, &mut a)?,
            dropout_composed(&x, 0.3, kind, &mut b)?,
        );
        assert_eq!(a.state(), b.state());
        let (va, vb) = (vals(&ya), vals(&yb));
        for (p, q) in va.iter().zip(&vb) {
            assert!(
                (p - q).abs() <= 1e-6 * p.abs().max(1.0),
                "{kind:?}: {p} vs {q}"
            );
        }
    }
    Ok(())
}

#[test]
fn default_seeds_differ_per_layer_name_and_repeat_per_name() -> TestResult {
    let x = Tensor::ones(4096, DType::F32, &Device::Cpu)?;
    let build = |name: &str| dropout(DropoutConfig::default(), root().pp(name)).unwrap();
    let mask = |d: &grad_layers::Dropout| vals(&d.try_forward(&x, true).unwrap());
    let (a, b) = (build("block1.drop"), build("block2.drop"));
    assert_ne!(
        mask(&a),
        mask(&b),
        "two layers built with the defaults draw different masks"
    );
    assert_eq!(
        mask(&build("block1.drop")),
        mask(&build("block1.drop")),
        "a rebuilt model repeats"
    );
    assert_ne!(a.state().seed, b.state().seed);
    Ok(())
}

#[test]
fn threads_sharing_a_layer_draw_disjoint_stretches_of_its_stream() -> TestResult {
    let d = layer(0.5, DropoutKind::Element, 11);
    let x = Tensor::ones(1000, DType::F32, &Device::Cpu)?;
    let masks: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..25)
                        .map(|_| vals(&d.try_forward(&x, true).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(
        d.state().offset,
        100 * 1000,
        "every forward reserved its own words"
    );
    let mut distinct = masks.clone();
    distinct.sort_by(|a, b| a.partial_cmp(b).unwrap());
    distinct.dedup();
    assert_eq!(distinct.len(), 100, "no two forwards drew the same mask");
    Ok(())
}

#[test]
fn dropout2d_reads_a_rank_3_input_as_n_c_l_like_pytorch() -> TestResult {
    // PyTorch 2.15: `F.dropout2d(torch.ones(16, 5, 6), 0.5)` drops whole rows of 6 (it warns
    // that it reads [N, C, L]), so a [5, 6] block holds both dropped and kept rows.
    let x = Tensor::ones((16, 5, 6), DType::F32, &Device::Cpu)?;
    for path in [Path::Fused, Path::Composed] {
        let y = with_path(path, || {
            layer(0.5, DropoutKind::Channel2d, 3).forward_t(&x, true)
        })?;
        let ys = vals(&y);
        let rows: Vec<bool> = ys.chunks(6).map(|r| r[0] == 0.0).collect();
        for (r, row) in ys.chunks(6).enumerate() {
            assert!(
                row.iter().all(|v| (*v == 0.0) == rows[r]),
                "{path:?}: partial row"
            );
        }
        let mixed = rows
            .chunks(5)
            .any(|b| b.contains(&true) && b.contains(&false));
        assert!(
            mixed,
            "{path:?}: whole [5, 6] blocks dropped: read as [C, H, W]"
        );
    }
    Ok(())
}

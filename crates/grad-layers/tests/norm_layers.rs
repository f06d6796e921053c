//! The normalisation layers inside models: gradients reach upstream layers, checkpoints move
//! between candle-nn and gradkit, running statistics evolve, and bad input is an error.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use std::collections::HashMap;

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use grad_layers::{
    Affine, BatchNormConfig, Error, GroupNormConfig, InstanceNormConfig, InstanceNormDims,
    LayerNormConfig, RmsNormConfig, batch_norm, group_norm, instance_norm, layer_norm, ops,
    rms_norm,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

/// The gradient of the first linear layer's weight in `linear -> norm -> (y * w).sum()`, with
/// fixed weights and data.
fn first_layer_grad(dtype: DType, norm: &dyn Fn(&Tensor) -> Tensor) -> Option<Vec<f64>> {
    let mut rng = grad_core::Philox::new(4);
    let w =
        candle_core::Var::from_tensor(&rng.normal((8, 6), 0.0, 0.5, dtype, &Device::Cpu).unwrap())
            .unwrap();
    let lin = candle_nn::Linear::new(w.as_tensor().clone(), None);
    let x = rng.normal((5, 6), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
    let up = rng.normal((5, 8), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
    let y = norm(&lin.forward(&x).unwrap());
    let store = (y * up).unwrap().sum_all().unwrap().backward().unwrap();
    store.get(w.as_tensor()).map(vals)
}

#[test]
fn gradients_reach_the_layer_before_the_norm() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let ln = layer_norm(8, LayerNormConfig::default(), vb.pp("ln"))?;
    let rms = rms_norm(
        8,
        RmsNormConfig {
            eps: Some(1e-6),
            elementwise_affine: true,
        },
        vb.pp("rms"),
    )?;

    let ours =
        first_layer_grad(DType::F64, &|h| ln.forward(h).unwrap()).expect("a gradient upstream");
    let oracle = first_layer_grad(DType::F64, &|h| {
        ops::layer_norm_composed(h, &[8], ln.weight(), ln.bias(), 1e-5).unwrap()
    })
    .unwrap();
    assert!(ours.iter().any(|g| g.abs() > 1e-3));
    for (a, b) in ours.iter().zip(&oracle) {
        assert!((a - b).abs() <= 1e-10 * (1.0 + b.abs()));
    }
    let ours =
        first_layer_grad(DType::F64, &|h| rms.forward(h).unwrap()).expect("a gradient upstream");
    let oracle = first_layer_grad(DType::F64, &|h| {
        ops::rms_norm_composed(h, &[8], rms.weight(), Some(1e-6)).unwrap()
    })
    .unwrap();
    assert!(ours.iter().any(|g| g.abs() > 1e-3));
    for (a, b) in ours.iter().zip(&oracle) {
        assert!((a - b).abs() <= 1e-10 * (1.0 + b.abs()));
    }

    // What this replaces: candle-nn 0.11.1's fused LayerNorm and RmsNorm let `backward()` succeed
    // while no gradient reaches the layer before them.
    // (Its fused ops take f32 only.)
    let vb32 = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let cnn_ln = candle_nn::layer_norm(8, 1e-5, vb32.pp("cnn_ln"))?;
    assert!(first_layer_grad(DType::F32, &|h| cnn_ln.forward(h).unwrap()).is_none());
    let cnn_rms = candle_nn::rms_norm(8, 1e-6, vb32.pp("cnn_rms"))?;
    assert!(first_layer_grad(DType::F32, &|h| cnn_rms.forward(h).unwrap()).is_none());
    let ln32 = layer_norm(8, LayerNormConfig::default(), vb32.pp("ln32"))?;
    assert!(first_layer_grad(DType::F32, &|h| ln32.forward(h).unwrap()).is_some());
    Ok(())
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gradkit-{}-{name}", std::process::id()))
}

#[test]
fn candle_nn_checkpoints_load_both_ways() -> TestResult {
    let dev = Device::Cpu;
    let x = grad_core::Philox::new(2).normal((16, 4, 3), 1.0, 2.0, DType::F32, &dev)?;

    // candle-nn's BatchNorm, trained one step, saved.
    let map = VarMap::new();
    let cnn = candle_nn::batch_norm(
        4,
        candle_nn::BatchNormConfig::default(),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    )?;
    cnn.forward_t(&x, true)?;
    let path = temp_file("candle-nn-bn.safetensors");
    map.save(&path)?;

    // ... loads into gradkit's BatchNorm unchanged, counter starting at 0.
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &dev)?;
    assert!(!tensors.contains_key("num_batches_tracked"));
    let ours = batch_norm(
        4,
        BatchNormConfig::default(),
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
    )?;
    assert_eq!(ours.num_batches_tracked()?, Some(0));
    assert_eq!(vals(ours.running_mean().unwrap()), vals(cnn.running_mean()));
    let (a, b) = (ours.forward_t(&x, false)?, cnn.forward_t(&x, false)?);
    for (p, q) in vals(&a).iter().zip(vals(&b)) {
        assert!((p - q).abs() < 1e-5);
    }

    // gradkit's checkpoint (with num_batches_tracked) loads into candle-nn too.
    let map = VarMap::new();
    let ours = batch_norm(
        4,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    )?;
    ours.forward_t(&x, true)?;
    let path2 = temp_file("gradkit-bn.safetensors");
    map.save(&path2)?;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path2, &dev)?;
    assert_eq!(tensors["num_batches_tracked"].to_scalar::<i64>()?, 1);
    let cnn = candle_nn::batch_norm(
        4,
        candle_nn::BatchNormConfig::default(),
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
    )?;
    assert_eq!(vals(cnn.running_var()), vals(ours.running_var().unwrap()));
    std::fs::remove_file(path)?;
    std::fs::remove_file(path2)?;
    Ok(())
}

#[test]
fn running_statistics_follow_pytorch_rules() -> TestResult {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let cma = BatchNormConfig {
        momentum: None,
        ..BatchNormConfig::default()
    };
    let bn = batch_norm(2, cma, VarBuilder::from_varmap(&map, DType::F64, &dev))?;
    let batches: Vec<Tensor> = (0..3)
        .map(|i| {
            grad_core::Philox::new(i)
                .normal((10, 2), i as f64, 1.0, DType::F64, &dev)
                .unwrap()
        })
        .collect();
    for b in &batches {
        bn.forward_t(b, true)?;
    }
    // The cumulative average of the batch means.
    let mean_of_means: Vec<f64> = (0..2)
        .map(|c| {
            batches
                .iter()
                .map(|b| {
                    b.narrow(1, c, 1)
                        .unwrap()
                        .mean_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                })
                .sum::<f64>()
                / 3.0
        })
        .collect();
    for (a, b) in vals(bn.running_mean().unwrap()).iter().zip(&mean_of_means) {
        assert!((a - b).abs() < 1e-12);
    }
    assert_eq!(bn.num_batches_tracked()?, Some(3));
    // The VarMap sees the same buffers, so saving after training saves the updated statistics.
    let stored = map.data().lock().unwrap()["running_mean"]
        .as_tensor()
        .clone();
    assert_eq!(vals(&stored), vals(bn.running_mean().unwrap()));

    // Evaluation neither uses nor changes batch statistics; without tracking, batch statistics
    // are used in both modes.
    let before = vals(bn.running_var().unwrap());
    bn.forward_t(&batches[0], false)?;
    assert_eq!(before, vals(bn.running_var().unwrap()));
    let untracked = batch_norm(
        2,
        BatchNormConfig {
            track_running_stats: false,
            ..BatchNormConfig::default()
        },
        VarBuilder::from_varmap(&VarMap::new(), DType::F64, &dev),
    )?;
    assert_eq!(untracked.num_batches_tracked()?, None);
    let (t, e) = (
        untracked.forward_t(&batches[1], true)?,
        untracked.forward_t(&batches[1], false)?,
    );
    assert_eq!(vals(&t), vals(&e));
    Ok(())
}

#[test]
fn rank_five_inputs_normalise_per_channel() -> TestResult {
    let dev = Device::Cpu;
    let bn = batch_norm(
        3,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
    )?;
    let x = grad_core::Philox::new(0).normal((2, 3, 2, 3, 4), 5.0, 3.0, DType::F32, &dev)?;
    let y = bn.forward_t(&x, true)?;
    let per_channel = y.transpose(0, 1)?.contiguous()?.reshape((3, ()))?;
    for row in per_channel.to_vec2::<f32>()? {
        let mean = row.iter().sum::<f32>() / row.len() as f32;
        assert!(mean.abs() < 1e-5);
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error_not_a_panic() -> TestResult {
    let dev = Device::Cpu;
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev);
    let bn = batch_norm(4, BatchNormConfig::default(), vb.pp("bn"))?;
    let rank1 = Tensor::zeros(4, DType::F32, &dev)?;
    let rank6 = Tensor::zeros((2, 4, 1, 1, 1, 2), DType::F32, &dev)?;
    let wrong_c = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let empty = Tensor::zeros((0, 4), DType::F32, &dev)?;
    let one = Tensor::zeros((1, 4), DType::F32, &dev)?;
    assert!(matches!(
        bn.try_forward(&rank1, true),
        Err(Error::Core(grad_core::Error::RankMismatch { .. }))
    ));
    assert!(matches!(
        bn.try_forward(&rank6, true),
        Err(Error::Core(grad_core::Error::RankMismatch { .. }))
    ));
    assert!(matches!(
        bn.try_forward(&wrong_c, true),
        Err(Error::Core(grad_core::Error::ShapeMismatch { .. }))
    ));
    assert!(matches!(
        bn.try_forward(&empty, true),
        Err(Error::Core(grad_core::Error::EmptyInput { .. }))
    ));
    assert!(matches!(
        bn.try_forward(&one, true),
        Err(Error::TooFewValuesPerChannel { .. })
    ));
    assert!(bn.try_forward(&one, false).is_ok());
    // The error also comes through candle's ModuleT, downcastable.
    let err = bn.forward_t(&one, true).unwrap_err();
    assert!(err.to_string().contains("more than 1 value per channel"));

    for (eps, momentum) in [
        (0.0, Some(0.1)),
        (-1e-5, Some(0.1)),
        (f64::NAN, Some(0.1)),
        (1e-5, Some(1.5)),
        (1e-5, Some(-0.1)),
        (1e-5, Some(f64::NAN)),
    ] {
        let cfg = BatchNormConfig {
            eps,
            momentum,
            ..BatchNormConfig::default()
        };
        assert!(
            matches!(
                batch_norm(4, cfg, vb.pp("x")),
                Err(Error::Core(grad_core::Error::InvalidHyperParameter { .. }))
            ),
            "eps {eps}, momentum {momentum:?}"
        );
    }
    assert!(batch_norm(0, BatchNormConfig::default(), vb.pp("zero")).is_err());

    let bad_eps = LayerNormConfig {
        eps: 0.0,
        ..LayerNormConfig::default()
    };
    assert!(layer_norm(4, bad_eps, vb.pp("ln")).is_err());
    let ln = layer_norm(4, LayerNormConfig::default(), vb.pp("ln2"))?;
    assert!(ln.try_forward(&wrong_c).is_err());
    assert!(
        ln.try_forward(&Tensor::zeros((0, 4), DType::F32, &dev)?)
            .is_err()
    );
    assert!(matches!(
        group_norm(4, 6, GroupNormConfig::default(), vb.pp("gn")),
        Err(Error::IndivisibleGroups {
            channels: 6,
            groups: 4
        })
    ));
    assert!(group_norm(0, 6, GroupNormConfig::default(), vb.pp("gn0")).is_err());
    let gn = group_norm(2, 4, GroupNormConfig::default(), vb.pp("gn2"))?;
    assert!(gn.try_forward(&rank1).is_err());
    assert!(gn.try_forward(&wrong_c).is_err());
    assert!(
        rms_norm(
            4,
            RmsNormConfig {
                eps: Some(f64::NAN),
                elementwise_affine: true
            },
            vb.pp("r")
        )
        .is_err()
    );
    let ints = Tensor::zeros((2, 4), DType::U32, &dev)?;
    assert!(ops::layer_norm(&ints, &[4], None, None, 1e-5).is_err());
    let w64 = Tensor::ones(4, DType::F64, &dev)?;
    let x32 = Tensor::ones((2, 4), DType::F32, &dev)?;
    assert!(ops::layer_norm(&x32, &[4], Some(&w64), None, 1e-5).is_err());
    Ok(())
}

/// Issue 15, problem 10: training forwards from four threads sharing one layer each count once
/// and each blend into the running mean (a cumulative average of batches whose means are all 2
/// stays exactly 2 only if no update is lost or torn).
#[test]
fn concurrent_training_forwards_each_update_the_statistics_once() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let config = BatchNormConfig {
        momentum: None,
        ..Default::default()
    };
    let bn = batch_norm(3, config, vb)?;
    let x = (Tensor::arange(0f64, 24.0, &Device::Cpu)?.reshape((8, 3))? * 0.0)?.affine(1.0, 2.0)?;
    let x = Tensor::cat(&[(&x - 1.0)?, (&x + 1.0)?], 0)?;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    bn.try_forward(&x, true).unwrap();
                }
            });
        }
    });
    assert_eq!(bn.num_batches_tracked()?, Some(800));
    for m in vals(bn.running_mean().unwrap()) {
        assert!((m - 2.0).abs() < 1e-12, "running mean {m}");
    }
    Ok(())
}

#[test]
fn rms_norm_default_config_learns_a_weight() -> TestResult {
    assert!(RmsNormConfig::default().elementwise_affine);
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    rms_norm(4, RmsNormConfig::default(), vb.pp("rms"))?;
    let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    assert_eq!(names, ["rms.weight"]);
    Ok(())
}

#[test]
fn layer_norm_affine_names_exactly_the_parameters_it_learns() -> TestResult {
    for (affine, expected) in [
        (Affine::None, vec![]),
        (Affine::Weight, vec!["ln.weight"]),
        (Affine::WeightAndBias, vec!["ln.bias", "ln.weight"]),
    ] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let config = LayerNormConfig {
            affine,
            ..Default::default()
        };
        let ln = layer_norm(4, config, vb.pp("ln"))?;
        let mut names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(names, expected, "{affine:?}");
        let y = ln.forward(&Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?)?;
        assert_eq!(y.dims(), [3, 4]);
    }
    Ok(())
}

#[test]
fn half_inputs_with_f32_parameters_compute_in_f32() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let bn = batch_norm(4, BatchNormConfig::default(), vb.pp("bn"))?;
    let ln = layer_norm(4, LayerNormConfig::default(), vb.pp("ln"))?;
    let gn = group_norm(2, 4, GroupNormConfig::default(), vb.pp("gn"))?;
    let rms = rms_norm(4, RmsNormConfig::default(), vb.pp("rms"))?;
    let x32 = Tensor::randn(0f32, 2.0, (8, 4), &Device::Cpu)?;
    for half in [DType::F16, DType::BF16] {
        let x = candle_core::Var::from_tensor(&x32.to_dtype(half)?)?;
        // The reference: the same (rounded) input in f32.
        let xr = x.as_tensor().to_dtype(DType::F32)?;
        let pairs: Vec<(Tensor, Tensor)> = vec![
            (bn.forward_t(&x, true)?, bn.forward_t(&xr, true)?),
            (bn.forward_t(&x, false)?, bn.forward_t(&xr, false)?),
            (ln.forward(&x)?, ln.forward(&xr)?),
            (gn.forward(&x)?, gn.forward(&xr)?),
            (rms.forward(&x)?, rms.forward(&xr)?),
        ];
        for (got, want) in pairs {
            assert_eq!(got.dtype(), half);
            let (g, w) = (vals(&got.to_dtype(DType::F32)?), vals(&want));
            for (a, b) in g.iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 1e-2 * (1.0 + b.abs()),
                    "{half:?}: {a} vs {b}"
                );
            }
        }
        let store = ln
            .forward(&x)?
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(store.get(x.as_tensor()).is_some_and(|g| g.dtype() == half));
        let w = ln.weight().expect("affine");
        assert!(store.get(w).is_some_and(|g| g.dtype() == DType::F32));
    }
    // The running statistics stay f32 and were updated by the half-precision batches.
    let running = map.data().lock().unwrap()["bn.running_mean"]
        .as_tensor()
        .clone();
    assert_eq!(running.dtype(), DType::F32);
    assert!(vals(&running).iter().any(|&v| v != 0.0));
    Ok(())
}

fn instance(cfg: InstanceNormConfig, map: &VarMap, dtype: DType) -> grad_layers::InstanceNorm {
    let vb = VarBuilder::from_varmap(map, dtype, &Device::Cpu);
    instance_norm(3, cfg, vb.pp("in")).unwrap()
}

#[test]
fn instance_norm_cumulative_running_stats_average_every_batch() -> TestResult {
    let map = VarMap::new();
    let cfg = InstanceNormConfig {
        dims: InstanceNormDims::One,
        momentum: None,
        track_running_stats: true,
        ..InstanceNormConfig::default()
    };
    let layer = instance(cfg, &map, DType::F64);
    let mut rng = grad_core::Philox::new(8);
    let batches: Vec<Tensor> = (0..3)
        .map(|k| {
            rng.normal(
                (2, 3, 7),
                f64::from(k),
                1.0 + f64::from(k),
                DType::F64,
                &Device::Cpu,
            )
        })
        .collect::<Result<_, _>>()?;
    for x in &batches {
        layer.try_forward(x, true)?;
    }
    // Each batch's statistic: the mean over N of the per-instance mean / unbiased variance.
    let stat = |x: &Tensor, f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| -> Vec<f64> {
        f(x).unwrap().mean(0).unwrap().to_vec1::<f64>().unwrap()
    };
    let mut want_mean = [0.0f64; 3];
    let mut want_var = [0.0f64; 3];
    for x in &batches {
        let m = stat(x, &|x| x.mean(2));
        let v = stat(x, &|x| {
            x.broadcast_sub(&x.mean_keepdim(2)?)?.sqr()?.sum(2)? / 6.0
        });
        for c in 0..3 {
            want_mean[c] += m[c] / 3.0;
            want_var[c] += v[c] / 3.0;
        }
    }
    let got_mean = layer.running_mean().unwrap().to_vec1::<f64>()?;
    let got_var = layer.running_var().unwrap().to_vec1::<f64>()?;
    for c in 0..3 {
        assert!(
            (got_mean[c] - want_mean[c]).abs() < 1e-12,
            "{got_mean:?} {want_mean:?}"
        );
        assert!(
            (got_var[c] - want_var[c]).abs() < 1e-12,
            "{got_var:?} {want_var:?}"
        );
    }
    assert_eq!(layer.num_batches_tracked()?, Some(3));
    Ok(())
}

#[test]
fn instance_norm_reads_ranks_as_pytorch_and_computes_half_in_f32() -> TestResult {
    let map = VarMap::new();
    let cfg = InstanceNormConfig {
        affine: true,
        ..InstanceNormConfig::default()
    };
    let layer = instance(cfg, &map, DType::F32);
    let x = grad_core::Philox::new(2).normal((3, 4, 5), 1.0, 2.0, DType::F32, &Device::Cpu)?;
    // Unbatched [C, H, W] equals the batch of one.
    let unbatched = layer.try_forward(&x, true)?;
    let batched = layer.try_forward(&x.unsqueeze(0)?, true)?.squeeze(0)?;
    assert_eq!(
        unbatched.flatten_all()?.to_vec1::<f32>()?,
        batched.flatten_all()?.to_vec1::<f32>()?
    );
    // f16 input, f32 parameters: the output is f16, close to the f32 result.
    let half = layer.try_forward(&x.to_dtype(DType::F16)?, true)?;
    assert_eq!(half.dtype(), DType::F16);
    let diff = (half.to_dtype(DType::F32)? - &unbatched)?
        .abs()?
        .max_all()?;
    assert!(diff.to_scalar::<f32>()? < 1e-2);
    // Ranks of the other two kinds, and a lone spatial element, are errors.
    for bad in [vec![3usize, 5], vec![1, 3, 2, 2, 2]] {
        let x = Tensor::zeros(bad.as_slice(), DType::F32, &Device::Cpu)?;
        assert!(layer.try_forward(&x, true).is_err(), "{bad:?}");
    }
    let lone = Tensor::zeros((2, 3, 1, 1), DType::F32, &Device::Cpu)?;
    let e = layer
        .try_forward(&lone, true)
        .err()
        .ok_or("one spatial element accepted")?;
    assert!(matches!(e, Error::TooFewValuesPerChannel { .. }), "{e}");
    Ok(())
}

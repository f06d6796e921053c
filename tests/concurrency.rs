//! Concurrent use, as a table: every layer shared by several threads (each forward equals the
//! single-threaded one bit for bit, and stateful layers count every call once), the pure ops
//! called from several threads at once, and the fused/composed seam, which is per thread.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gradkit::core::{NormType, Philox, device::Path, device::with_path};
use gradkit::layers::{
    Activation, BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, PReluConfig,
    RmsNormConfig, batch_norm, group_norm, instance_norm, layer_norm, prelu, rms_norm,
};
use gradkit::regularize::{CrossEntropyConfig, cross_entropy};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A call made from several threads at once.
type Call<'a> = Box<dyn Fn() -> Tensor + Sync + 'a>;

const THREADS: usize = 4;
const CALLS: usize = 25;

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

/// Runs `f` `CALLS` times on each of `THREADS` threads at once; every result must equal the
/// single-threaded one. Returns the number of calls made.
fn hammer(what: &str, f: &(dyn Fn() -> Tensor + Sync)) -> usize {
    let want = bits(&f());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..CALLS {
                        assert_eq!(bits(&f()), want, "{what}: a concurrent call differs");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .unwrap_or_else(|_| panic!("{what}: a thread panicked"));
        }
    });
    THREADS * CALLS + 1
}

#[test]
fn shared_layers_and_ops_give_the_single_threaded_result_under_contention() -> TestResult {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let x = Philox::new(7).normal((8, 4, 6, 6), 0.0, 2.0, DType::F32, &dev)?;
    let rows = x.reshape((32, 36))?;
    let ln = layer_norm(36, LayerNormConfig::default(), vb.pp("ln"))?;
    let rms = rms_norm(36, RmsNormConfig::default(), vb.pp("rms"))?;
    let gn = group_norm(2, 4, GroupNormConfig::default(), vb.pp("gn"))?;
    let bn = batch_norm(4, BatchNormConfig::default(), vb.pp("bn"))?;
    let pr = prelu(
        PReluConfig {
            num_parameters: 4,
            init: 0.1,
        },
        vb.pp("prelu"),
    )?;
    let targets = Tensor::arange(0u32, 32, &dev)?.affine(1.0, 0.0)?;
    let targets = (targets.to_dtype(DType::F32)? / 4.0)?
        .floor()?
        .to_dtype(DType::U32)?;
    let mut table: Vec<(&str, Call)> = vec![
        ("layer_norm", Box::new(|| ln.forward(&rows).unwrap())),
        ("rms_norm", Box::new(|| rms.forward(&rows).unwrap())),
        ("group_norm", Box::new(|| gn.forward(&x).unwrap())),
        (
            "batch_norm (eval)",
            Box::new(|| bn.forward_t(&x, false).unwrap()),
        ),
        ("prelu", Box::new(|| pr.forward(&x).unwrap())),
        (
            "cross_entropy",
            Box::new(|| cross_entropy(&rows, &targets, &CrossEntropyConfig::default()).unwrap()),
        ),
        (
            "global_norm",
            Box::new(|| {
                let n = gradkit::core::global_norm(std::slice::from_ref(&x), NormType::L2);
                Tensor::new(n.unwrap(), &Device::Cpu).unwrap()
            }),
        ),
    ];
    for act in [
        Activation::Gelu {
            approximate: gradkit::layers::GeluApproximation::Tanh,
        },
        Activation::Silu,
        Activation::LeakyRelu {
            negative_slope: 0.2,
        },
    ] {
        let x = x.clone();
        table.push(("activation", Box::new(move || act.forward(&x).unwrap())));
    }
    let mut calls = 0;
    for (what, f) in &table {
        calls += hammer(what, f.as_ref());
    }
    println!(
        "concurrency: {} ops, {calls} calls, all equal to one thread's",
        table.len()
    );
    Ok(())
}

#[test]
fn batch_and_instance_norm_training_forwards_from_several_threads_each_count_once() -> TestResult {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let bn = batch_norm(
        3,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&map, DType::F32, &dev).pp("bn"),
    )?;
    let x = Philox::new(1).normal((16, 3), 1.0, 1.0, DType::F32, &dev)?;
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..CALLS {
                    bn.forward_t(&x, true).unwrap();
                }
            });
        }
    });
    assert_eq!(bn.num_batches_tracked()?, Some((THREADS * CALLS) as i64));
    let cfg = InstanceNormConfig {
        track_running_stats: true,
        dims: gradkit::layers::InstanceNormDims::One,
        ..InstanceNormConfig::default()
    };
    let inorm = instance_norm(
        3,
        cfg,
        VarBuilder::from_varmap(&map, DType::F32, &dev).pp("in"),
    )?;
    let x = x.reshape((4, 3, 4))?;
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..CALLS {
                    inorm.forward_t(&x, true).unwrap();
                }
            });
        }
    });
    assert_eq!(inorm.num_batches_tracked()?, Some((THREADS * CALLS) as i64));
    Ok(())
}

#[test]
fn the_path_seam_is_per_thread() -> TestResult {
    // One thread forces the composed path while another runs the default: each gets its own
    // path's result, whatever the other does.
    let x = Philox::new(2).normal((64, 32), 0.0, 3.0, DType::F32, &Device::Cpu)?;
    let act = Activation::Gelu {
        approximate: gradkit::layers::GeluApproximation::None,
    };
    let fused = bits(&with_path(Path::Fused, || act.forward(&x))?);
    let composed = bits(&with_path(Path::Composed, || act.forward(&x))?);
    std::thread::scope(|s| {
        for (path, want) in [(Path::Fused, &fused), (Path::Composed, &composed)] {
            let (act, x) = (act, &x);
            s.spawn(move || {
                for _ in 0..CALLS {
                    let got = with_path(path, || act.forward(x)).unwrap();
                    assert_eq!(
                        &bits(&got),
                        want,
                        "{path:?}: the other thread's path leaked"
                    );
                }
            });
        }
    });
    Ok(())
}

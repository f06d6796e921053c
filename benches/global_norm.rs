//! `global_norm/resnet50`: the total L2 norm of ResNet-50-shaped f32 gradients (25.6M values in
//! 161 tensors), fused (`gradkit`), as a candle user writes it (`candle`), and a plain
//! multi-threaded f32 sum over the same bytes (`bandwidth`, the memory-bound reference).

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::Tensor;
use criterion::{Criterion, criterion_group};
use grad_core::{NormType, global_norm};

fn candle_global_norm(grads: &[Tensor]) -> candle_core::Result<f32> {
    let mut total = 0f32;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(total.sqrt())
}

fn bench(c: &mut Criterion) {
    let grads = common::resnet50_grads(1e-2);
    let host: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| {
            g.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32 data")
        })
        .collect();

    let mut group = c.benchmark_group("global_norm/resnet50");
    group.sample_size(30);
    group.bench_function("gradkit", |b| {
        b.iter(|| global_norm(&grads, NormType::L2).expect("norm"))
    });
    group.bench_function("candle", |b| {
        b.iter(|| candle_global_norm(&grads).expect("norm"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| common::plain_sum(&host)));
    group.finish();
}

criterion_group!(benches, bench);
tuned_main!(benches);

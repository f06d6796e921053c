//! `global_norm/resnet50`: the total L2 norm of ResNet-50-shaped f32 gradients (25.6M values in
//! 161 tensors), fused (`gradkit`), as a candle user writes it (`candle`), and a plain
//! multi-threaded f32 sum over the same bytes (`bandwidth`, the memory-bound reference).

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::Tensor;
use criterion::{Criterion, criterion_group};
use grad_core::{NormType, global_norm};
use rayon::prelude::*;

fn candle_global_norm(grads: &[Tensor]) -> candle_core::Result<f32> {
    let mut total = 0f32;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(total.sqrt())
}

/// Sixteen f32 lanes so the compiler vectorises; parallel across 32 Ki-element chunks.
fn plain_sum(data: &[Vec<f32>]) -> f32 {
    data.par_iter()
        .flat_map(|v| v.par_chunks(32 * 1024))
        .map(|chunk| {
            let mut lanes = [0f32; 16];
            let mut blocks = chunk.chunks_exact(16);
            for b in &mut blocks {
                for (l, x) in lanes.iter_mut().zip(b) {
                    *l += x;
                }
            }
            lanes.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
        })
        .sum()
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
    group.bench_function("bandwidth", |b| b.iter(|| plain_sum(&host)));
    group.finish();
}

criterion_group!(benches, bench);
tuned_main!(benches);

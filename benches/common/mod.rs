//! Data and helpers shared by the benches.

#![allow(dead_code, reason = "each bench uses part of the helpers")]

pub mod mlp;
pub mod step;

/// criterion's `criterion_main!` with [`grad_core::tune_allocator`] and
/// [`grad_core::tune_threads`] called first, as a training binary does. To time glibc's
/// defaults instead, set one of its variables, e.g. `MALLOC_MMAP_MAX_=65536` (its default): the
/// environment then stands. To time candle recounting the cores on every matmul, set
/// `GRADKIT_BENCH_UNTUNED_THREADS=1` (a bench-only switch).
#[macro_export]
macro_rules! tuned_main {
    ($($group:path),+ $(,)?) => {
        fn main() {
            grad_core::tune_allocator();
            if std::env::var_os("GRADKIT_BENCH_UNTUNED_THREADS").is_none() {
                grad_core::tune_threads();
            }
            $($group();)+
            criterion::Criterion::default()
                .configure_from_args()
                .final_summary();
        }
    };
}

use candle_core::{DType, Device, Tensor};

/// The 161 parameter shapes of ResNet-50 (torchvision layout), from `data/resnet50_shapes.json`.
pub fn resnet50_shapes() -> Vec<Vec<usize>> {
    let text = include_str!("../../data/resnet50_shapes.json");
    let json: serde_json::Value = serde_json::from_str(text).expect("valid shapes file");
    json["shapes"]
        .as_array()
        .expect("a shapes array")
        .iter()
        .map(|s| {
            s.as_array()
                .expect("a shape")
                .iter()
                .map(|d| d.as_u64().expect("a dim") as usize)
                .collect()
        })
        .collect()
}

/// One f32 gradient per ResNet-50 parameter, N(0, std^2), seeded.
pub fn resnet50_grads(std: f64) -> Vec<Tensor> {
    let mut rng = grad_core::Philox::new(2024);
    resnet50_shapes()
        .iter()
        .map(|s| {
            rng.normal(s.as_slice(), 0.0, std, DType::F32, &Device::Cpu)
                .expect("a gradient")
        })
        .collect()
}

/// Sixteen f32 lanes so the compiler vectorises; parallel across 32 Ki-element chunks: a
/// plain read of the same bytes, the memory-bound reference of the `bandwidth` functions.
pub fn plain_sum(data: &[Vec<f32>]) -> f32 {
    use rayon::prelude::*;
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

/// Clipping as a candle user writes it: per-tensor `sqr().sum_all()` read back, then
/// `g * coefficient` per gradient (new tensors).
pub fn candle_clip(grads: &[Tensor], max_norm: f64) -> candle_core::Result<Vec<Tensor>> {
    let mut total = 0f32;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    }
    let coef = (max_norm / (f64::from(total.sqrt()) + 1e-6)).min(1.0);
    grads.iter().map(|g| g * coef).collect()
}

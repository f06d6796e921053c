//! Gradient noise on the digits data: a ReLU MLP trained with SGD on batches of `k` micro-batches
//! (gradient accumulation), the monitor estimating the simple noise scale `B_simple` and each
//! layer's gradient signal-to-noise ratio from the micro-batch gradients of every step
//! (McCandlish et al. 2018). Run twice: with batches far below the noise scale (flagged: larger
//! batches would help) and with batches near it.
//!
//! ```sh
//! cargo run --release --example noise_scale
//! ```
//!
//! Writes `noise_scale.svg` and `signal_to_noise.svg` for each run under
//! `target/gradkit-demo/noise_scale/`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use gradkit::diagnostics::{FindingKind, GradMonitor, StepContext, plot};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Micro-batches per step.
const K: usize = 4;
/// Optimizer steps per run.
const STEPS: usize = 150;

/// Trains a fresh 64-128-128-10 ReLU MLP for [`STEPS`] steps of `K` micro-batches of
/// `micro_batch_size` rows, estimating the gradient noise at every step.
fn run(data: &grad_testkit::digits::Split, micro_batch_size: usize, name: &str) -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let layers = [
        candle_nn::linear(64, 128, vb.pp("layer.0"))?,
        candle_nn::linear(128, 128, vb.pp("layer.1"))?,
        candle_nn::linear(128, 10, vb.pp("layer.2"))?,
    ];
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        let h = layers[0].forward(x)?.relu()?;
        let h = layers[1].forward(&h)?.relu()?;
        layers[2].forward(&h)
    };
    let mut sgd = SGD::new(map.all_vars(), 0.05)?;
    let mut monitor = GradMonitor::from_var_map(&map)?;
    let rows = data.images.dim(0)?;
    let batch = K * micro_batch_size;
    println!("\n== batches of {K} x {micro_batch_size} = {batch} rows ==");
    println!("step   loss    B_simple   SNR per layer");
    for step in 0..STEPS {
        let start = (step * batch) % (rows - batch);
        let mut stores = Vec::with_capacity(K);
        let mut losses = Vec::with_capacity(K);
        for i in 0..K {
            let at = start + i * micro_batch_size;
            let x = data.images.narrow(0, at, micro_batch_size)?;
            let y = data.labels.narrow(0, at, micro_batch_size)?;
            let loss = candle_nn::loss::cross_entropy(&forward(&x)?, &y)?;
            stores.push(loss.backward()?);
            losses.push(loss);
        }
        let noise = monitor.gradient_noise(&stores, micro_batch_size)?;
        let grads = monitor.mean_gradients(&stores)?;
        let loss = (Tensor::stack(&losses, 0)?.mean_all())?;
        let context = StepContext {
            loss: Some(&loss),
            learning_rate: Some(sgd.learning_rate()),
            noise: Some(&noise),
        };
        monitor.observe_with(step as u64, &grads, context)?;
        sgd.step(&grads)?;
        if step % 25 == 0 || step + 1 == STEPS {
            let snr: Vec<String> = noise
                .layers
                .iter()
                .map(|l| format!("{} {:.3}", l.name, l.snr))
                .collect();
            println!(
                "{step:>4}  {:.3}  {:>9.1}   {}",
                loss.to_scalar::<f32>()?,
                noise.simple_noise_scale,
                snr.join(", ")
            );
        }
    }
    let records: Vec<_> = monitor.history().cloned().collect();
    let dir = std::path::Path::new("target/gradkit-demo/noise_scale").join(name);
    std::fs::create_dir_all(&dir)?;
    plot::noise_scale(&records, &dir.join("noise_scale.svg"))?;
    plot::signal_to_noise(&records, &dir.join("signal_to_noise.svg"))?;
    let findings: Vec<_> = monitor
        .findings()
        .into_iter()
        .filter(|f| {
            matches!(
                f.kind,
                FindingKind::NoiseScale | FindingKind::LowSignalToNoise
            )
        })
        .collect();
    if findings.is_empty() {
        println!("no noise finding");
    }
    for f in findings {
        println!("{f}");
    }
    println!("plots in {}", dir.display());
    Ok(())
}

fn main() -> Result<()> {
    gradkit::core::tune_allocator();
    gradkit::core::tune_threads();
    let data = grad_testkit::digits::load(&grad_testkit::digits::default_path(), &Device::Cpu)?;
    run(&data.train, 2, "batch8")?;
    run(&data.train, 64, "batch256")?;
    Ok(())
}

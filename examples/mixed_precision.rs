//! f16 gradient underflow, and dynamic loss scaling as the fix (Micikevicius et al. 2018).
//!
//! ```sh
//! cargo run --release --example mixed_precision
//! ```
//!
//! A deep sigmoid MLP on the digits data (Xavier init, AdamW) keeps f32 master weights and computes in f16, as PyTorch's
//! autocast does: each forward casts the weights to f16, so the backward's activation and
//! weight gradients are f16 until they reach the f32 masters. f16's smallest positive value is
//! about 6e-8; smaller gradients round to exactly zero, and a deep sigmoid stack's early-layer
//! gradients are far smaller than that. The network is trained twice, f16 unscaled and f16 with
//! `grad_regularize::LossScaler` (scale, unscale, skip on overflow, grow/back off). Every `--probe-every` steps the example
//! takes the current batch twice — f32 throughout (the reference) and the run's own f16 way — and
//! counts the gradient elements that are non-zero in the reference but zero in f16: the updates
//! underflow threw away.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use grad_core::{NamedVars, Philox};
use grad_layers::init::{Initializer, Nonlinearity, calculate_gain, reinit};
use grad_regularize::{CrossEntropyConfig, LossScaler, LossScalerConfig, cross_entropy};
use serde::Serialize;
use support::{OutDir, Result};

/// Show f16 gradient underflow and how loss scaling prevents it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Passes over the training set.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Hidden sigmoid layers.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Measure underflow every this many steps.
    #[arg(long, default_value_t = 50)]
    probe_every: u64,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 5)]
    seed: u64,
    /// The digits data (gzip-compressed CSV).
    #[arg(long, default_value_os_t = support::default_data())]
    data: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "target/gradkit-demo/mixed-precision")]
    out: PathBuf,
}

/// The MLP: f32 master weights, computed in `dtype`.
struct Mlp {
    params: NamedVars,
    depth: usize,
}

impl Mlp {
    fn new(depth: usize, rng: &mut Philox) -> Result<Self> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        for i in 0..=depth {
            let b = if i == depth { 10 } else { 64 };
            candle_nn::linear(64, b, vb.pp(format!("layer.{i}")))?;
        }
        let gain = calculate_gain(Nonlinearity::Sigmoid, None)?;
        reinit(&map, rng, |name, _| {
            Some(if name.ends_with("weight") {
                Initializer::XavierNormal { gain }
            } else {
                Initializer::Zeros
            })
        })?;
        Ok(Self {
            params: NamedVars::from_var_map(&map),
            depth,
        })
    }

    fn param(&self, name: &str) -> Result<Tensor> {
        Ok(self
            .params
            .get(name)
            .ok_or_else(|| format!("no parameter {name}"))?
            .as_tensor()
            .clone())
    }

    /// Logits in f32, computed in `dtype`.
    fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut h = x.to_dtype(dtype)?;
        for i in 0..=self.depth {
            let w = self.param(&format!("layer.{i}.weight"))?.to_dtype(dtype)?;
            let b = self.param(&format!("layer.{i}.bias"))?.to_dtype(dtype)?;
            h = h.matmul(&w.t()?)?.broadcast_add(&b)?;
            if i < self.depth {
                h = candle_nn::ops::sigmoid(&h)?;
            }
        }
        Ok(h.to_dtype(DType::F32)?)
    }

    /// The f32 master gradients of `loss * scale`, divided by `scale`, flattened.
    fn grads(&self, x: &Tensor, y: &Tensor, dtype: DType, scale: f64) -> Result<Vec<f32>> {
        let loss = cross_entropy(&self.forward(x, dtype)?, y, &CrossEntropyConfig::default())?;
        let store = loss.affine(scale, 0.0)?.backward()?;
        let mut out = Vec::new();
        for (_, g) in self.params.grads(&store)?.present() {
            out.extend((g / scale)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Underflow at one probe step.
#[derive(Debug, Serialize)]
struct Probe {
    step: u64,
    /// The loss scale used (1 when unscaled).
    scale: f32,
    /// Gradient elements non-zero in f32 but zero in f16.
    underflow: f64,
    /// Exactly-zero gradient elements: f32 reference, f16.
    zero_f32: f64,
    zero_f16: f64,
}

fn fractions(reference: &[f32], f16: &[f32]) -> (f64, f64) {
    let live = reference.iter().filter(|v| **v != 0.0).count().max(1);
    let lost = reference
        .iter()
        .zip(f16)
        .filter(|(r, h)| **r != 0.0 && **h == 0.0)
        .count();
    let zeros = f16.iter().filter(|v| **v == 0.0).count();
    #[allow(clippy::cast_precision_loss, reason = "element counts")]
    (
        lost as f64 / live as f64,
        zeros as f64 / f16.len().max(1) as f64,
    )
}

/// One training run's outcome.
#[derive(Debug, Serialize)]
struct Run {
    scaled: bool,
    test_accuracy: f64,
    steps: u64,
    /// Steps skipped because a scaled gradient overflowed.
    skipped: u64,
    final_scale: Option<f32>,
    probes: Vec<Probe>,
}

/// Trains with AdamW in f16 compute, with or without dynamic loss scaling. Adam rescales each
/// parameter's step by its gradient's size, so tiny gradients still train — unless f16 has
/// already flushed them to zero.
fn train(cli: &Cli, data: &support::Digits, scaled: bool) -> Result<Run> {
    let mut rng = Philox::new(cli.seed);
    let mlp = Mlp::new(cli.depth, &mut rng)?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(mlp.params.vars().to_vec(), params)?;
    let mut scaler = LossScaler::new(LossScalerConfig::default())?;
    let (mut step, mut skipped, mut probes) = (0u64, 0u64, Vec::new());
    let n = data.train.images.dim(0)?;
    let ce = CrossEntropyConfig::default();
    for _ in 0..cli.epochs {
        for idx in support::epoch_batches(n, 64, &mut rng)? {
            let (x, y) = support::rows(&data.train, &idx)?;
            let scale = if scaled {
                f64::from(scaler.scale_value())
            } else {
                1.0
            };
            if step % cli.probe_every == 0 {
                let reference = mlp.grads(&x, &y, DType::F32, 1.0)?;
                let f16 = mlp.grads(&x, &y, DType::F16, scale)?;
                let (underflow, zero_f16) = fractions(&reference, &f16);
                probes.push(Probe {
                    step,
                    #[allow(clippy::cast_possible_truncation, reason = "the scale is an f32")]
                    scale: scale as f32,
                    underflow,
                    zero_f32: fractions(&reference, &reference).1,
                    zero_f16,
                });
            }
            let loss = cross_entropy(&mlp.forward(&x, DType::F16)?, &y, &ce)?;
            if scaled {
                let store = scaler.scale(&loss)?.backward()?;
                skipped += u64::from(!scaler.step(&mut opt, &mlp.params.grads(&store)?)?);
                scaler.update();
            } else {
                opt.backward_step(&loss)?;
            }
            step += 1;
        }
    }
    let logits = mlp.forward(&data.test.images, DType::F16)?;
    Ok(Run {
        scaled,
        test_accuracy: support::accuracy(&logits, &data.test.labels)?,
        steps: step,
        skipped,
        final_scale: scaled.then(|| scaler.scale_value()),
        probes,
    })
}

fn run(cli: &Cli) -> Result<()> {
    if cli.epochs == 0 || cli.depth == 0 || cli.probe_every == 0 {
        return Err("--epochs, --depth and --probe-every must be at least 1".into());
    }
    let data = support::load_digits(&cli.data)?;
    let out = OutDir::create(&cli.out)?;
    let mut runs = Vec::new();
    for scaled in [false, true] {
        let run = train(cli, &data, scaled)?;
        #[allow(clippy::cast_precision_loss, reason = "a probe count")]
        let mean = |f: fn(&Probe) -> f64| {
            run.probes.iter().map(f).sum::<f64>() / run.probes.len().max(1) as f64
        };
        println!(
            "f16 {}: test accuracy {:.1}% after {} steps; gradient elements zero: {:.1}% (f32 reference {:.1}%); live gradients flushed to zero by f16: {:.1}%{}",
            if scaled {
                "with LossScaler"
            } else {
                "unscaled"
            },
            run.test_accuracy * 100.0,
            run.steps,
            mean(|p| p.zero_f16) * 100.0,
            mean(|p| p.zero_f32) * 100.0,
            mean(|p| p.underflow) * 100.0,
            run.final_scale
                .map(|s| format!(
                    "; {} steps skipped for overflow, final scale {s}",
                    run.skipped
                ))
                .unwrap_or_default()
        );
        runs.push(run);
    }
    let path = out.write_json("underflow.json", &runs)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    // Keep freed step buffers for reuse (glibc) and stop candle recounting the cores on every
    // matmul: see README, "Training speed on the CPU".
    grad_core::tune_allocator();
    grad_core::tune_threads();
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => support::fail(&e),
    }
}

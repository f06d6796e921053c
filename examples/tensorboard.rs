//! A monitored digits run exported to TensorBoard: loss, learning rate, gradient norms, update
//! ratios, clip events and per-layer gradient histograms, next to the same records as JSON Lines.
//!
//! ```sh
//! cargo run --release --example tensorboard
//! tensorboard --logdir target/gradkit-demo/tensorboard    # then open the Scalars, Distributions and Histograms tabs
//! ```
//!
//! An MLP with batch norm and Leaky ReLU trained with SGD whose global norm is clipped at 1 (most
//! steps clip), and one step whose loss is made NaN on purpose, so the log shows a skipped step.
//! `.ci/tensorboard-check.sh` reads the event file back with TensorBoard's own reader and checks
//! every tag, step and value against `log.jsonl`.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Module, ModuleT};
use candle_nn::{SGD, VarBuilder, VarMap};
use clap::Parser;
use grad_core::Philox;
use grad_diagnostics::{GradMonitor, JsonlSink, TensorBoardSink};
use grad_layers::{Activation, BatchNormConfig, batch_norm};
use grad_regularize::Clipped;
use support::{OutDir, Result, context};

/// Train a small digits MLP and write its monitor records as TensorBoard events and JSON Lines.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Training steps (mini-batches of 64).
    #[arg(long, default_value_t = 60)]
    steps: u64,
    /// The step whose loss is made NaN (skipped by the clipper); past `--steps` for none.
    #[arg(long, default_value_t = 25)]
    nan_step: u64,
    /// The digits data (gzip-compressed CSV).
    #[arg(long, default_value_os_t = support::default_data())]
    data: PathBuf,
    /// Output folder (the TensorBoard log folder).
    #[arg(long, default_value = "target/gradkit-demo/tensorboard")]
    out: PathBuf,
}

fn run(cli: &Cli) -> Result<()> {
    let out = OutDir::create(&cli.out)?;
    let digits = support::load_digits(&cli.data)?;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc1 = candle_nn::linear(64, 64, vb.pp("fc1"))?;
    let bn1 = batch_norm(64, BatchNormConfig::default(), vb.pp("bn1"))?;
    let fc2 = candle_nn::linear(64, 64, vb.pp("fc2"))?;
    let head = candle_nn::linear(64, 10, vb.pp("head"))?;
    let act = Activation::leaky_relu();
    let mut opt = Clipped::<SGD>::with_max_norm(&map, 0.05, 1.0)?;
    let mut monitor = GradMonitor::from_var_map(&map)?;
    let mut events = TensorBoardSink::create(out.path())?;
    let mut log = JsonlSink::create(out.path().join("log.jsonl"))?;
    let mut rng = Philox::new(3);
    let mut batches = Vec::new();
    let mut step = 0;
    while step < cli.steps {
        if batches.is_empty() {
            batches = support::epoch_batches(digits.train.images.dim(0)?, 64, &mut rng)?;
        }
        let idx = batches.remove(0);
        let (x, y) = support::rows(&digits.train, &idx)?;
        let h = act.forward(&bn1.forward_t(&fc1.forward(&x)?, true)?)?;
        let logits = head.forward(&act.forward(&fc2.forward(&h)?)?)?;
        let mut loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        if step == cli.nan_step {
            loss = (loss * f64::NAN)?;
        }
        if let Some(record) = monitor.backward_step(step, &loss, &mut opt)? {
            events.write(record)?;
            log.write(record)?;
        }
        step += 1;
    }
    println!("{}", monitor.report().summary_table());
    println!(
        "wrote {} and {}; open with: tensorboard --logdir {}",
        events.path().display(),
        out.path().join("log.jsonl").display(),
        out.path().display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // Keep freed step buffers for reuse (glibc) and stop candle recounting the cores on every
    // matmul: see README, "Training speed on the CPU".
    grad_core::tune_allocator();
    grad_core::tune_threads();
    let cli = Cli::parse();
    match run(&cli).map_err(context("tensorboard example")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => support::fail(&e),
    }
}

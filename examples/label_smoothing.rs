//! Label smoothing and calibration on the digits data: the same classifier trained with
//! `label_smoothing` ε = 0 and ε = 0.1 (Szegedy et al. 2016; Müller, Kornblith & Hinton 2019).
//!
//! ```sh
//! cargo run --release --example label_smoothing
//! ```
//!
//! Reports test accuracy, negative log-likelihood and the expected calibration error (ECE, 15
//! equal-width confidence bins, Guo et al. 2017), and draws a reliability diagram — accuracy
//! against confidence per bin, both runs, with the diagonal of perfect calibration — to
//! `--out/reliability.svg`.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use grad_core::{NamedVars, Philox};
use grad_layers::init::{FanMode, Initializer, Nonlinearity, reinit};
use grad_regularize::{CrossEntropyConfig, cross_entropy};
use plotters::prelude::*;
use serde::Serialize;
use support::{OutDir, Result};

/// Confidence bins of the calibration error.
const BINS: usize = 15;

/// Train a digits classifier with and without label smoothing and compare calibration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Passes over the training set.
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// The smoothed run's ε.
    #[arg(long, default_value_t = 0.1)]
    smoothing: f64,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// The digits data (gzip-compressed CSV).
    #[arg(long, default_value_os_t = support::default_data())]
    data: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "target/gradkit-demo/label-smoothing")]
    out: PathBuf,
}

/// One run's test metrics.
#[derive(Debug, Serialize)]
struct Calibration {
    smoothing: f64,
    accuracy: f64,
    nll: f64,
    ece: f64,
    /// Per bin: (mean confidence, accuracy, count).
    bins: Vec<(f64, f64, usize)>,
}

/// ECE and the reliability bins from test probabilities `[N, C]` and labels.
fn calibration(smoothing: f64, probs: &Tensor, labels: &Tensor) -> Result<Calibration> {
    let probs = probs.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let labels = labels.to_vec1::<u32>()?;
    let mut bins = vec![(0.0, 0.0, 0usize); BINS];
    let (mut nll, mut hits) = (0.0, 0usize);
    for (p, &y) in probs.iter().zip(&labels) {
        let (pred, conf) = p
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .ok_or("empty probability row")?;
        let correct = pred == y as usize;
        nll -= p[y as usize].max(f64::MIN_POSITIVE).ln();
        hits += usize::from(correct);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "conf in [0, 1]"
        )]
        let b = ((conf * BINS as f64) as usize).min(BINS - 1);
        bins[b].0 += conf;
        bins[b].1 += f64::from(u8::from(correct));
        bins[b].2 += 1;
    }
    #[allow(clippy::cast_precision_loss, reason = "a test-set size")]
    let n = labels.len() as f64;
    let bins: Vec<(f64, f64, usize)> = bins
        .into_iter()
        .map(|(c, a, k)| {
            if k == 0 {
                (0.0, 0.0, 0)
            } else {
                (c / k as f64, a / k as f64, k)
            }
        })
        .collect();
    let ece = bins
        .iter()
        .map(|&(c, a, k)| k as f64 / n * (a - c).abs())
        .sum();
    #[allow(clippy::cast_precision_loss, reason = "a test-set size")]
    Ok(Calibration {
        smoothing,
        accuracy: hits as f64 / n,
        nll: nll / n,
        ece,
        bins,
    })
}

/// Trains the classifier (64 -> 128 -> 128 -> 10, ReLU, Kaiming init, AdamW) with `smoothing`.
fn train(data: &support::Digits, cli: &Cli, smoothing: f64) -> Result<Calibration> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let layers = [(64, 128), (128, 128), (128, 10)]
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| candle_nn::linear(a, b, vb.pp(format!("layer.{i}"))))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut rng = Philox::new(cli.seed);
    let kaiming = Initializer::KaimingNormal {
        a: 0.0,
        mode: FanMode::FanIn,
        nonlinearity: Nonlinearity::Relu,
    };
    reinit(&map, &mut rng, |name, _| {
        Some(if name.ends_with("weight") {
            kaiming
        } else {
            Initializer::Zeros
        })
    })?;
    let forward = |x: &Tensor| -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    };
    let params = NamedVars::from_var_map(&map);
    let mut opt = AdamW::new(
        params.vars().to_vec(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let options = CrossEntropyConfig {
        label_smoothing: smoothing,
        ..Default::default()
    };
    let n = data.train.images.dim(0)?;
    for _ in 0..cli.epochs {
        for idx in support::epoch_batches(n, 32, &mut rng)? {
            let (x, y) = support::rows(&data.train, &idx)?;
            opt.backward_step(&cross_entropy(&forward(&x)?, &y, &options)?)?;
        }
    }
    let probs = candle_nn::ops::softmax(&forward(&data.test.images)?, D::Minus1)?;
    calibration(smoothing, &probs, &data.test.labels)
}

/// The reliability diagram: per-bin accuracy against mean confidence, one series per run.
fn reliability_diagram(runs: &[Calibration], path: &std::path::Path) -> Result<()> {
    let root = SVGBackend::new(path, (640, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "reliability diagram (test set, 15 bins)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("confidence")
        .y_desc("accuracy")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            BLACK.stroke_width(1),
        ))?
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
    for (run, color) in runs.iter().zip([RED, BLUE]) {
        let pts: Vec<(f64, f64)> = run
            .bins
            .iter()
            .filter(|b| b.2 > 0)
            .map(|b| (b.0, b.1))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("ε = {} (ECE {:.3})", run.smoothing, run.ece))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    if cli.epochs == 0 {
        return Err("--epochs must be at least 1, got 0".into());
    }
    if !(0.0..=1.0).contains(&cli.smoothing) {
        return Err(format!("--smoothing must be in [0, 1], got {}", cli.smoothing).into());
    }
    let data = support::load_digits(&cli.data)?;
    let out = OutDir::create(&cli.out)?;
    let mut runs = Vec::new();
    for eps in [0.0, cli.smoothing] {
        let c = train(&data, cli, eps)?;
        println!(
            "ε = {eps}: test accuracy {:.1}%, NLL {:.4}, ECE {:.4}",
            c.accuracy * 100.0,
            c.nll,
            c.ece
        );
        runs.push(c);
    }
    let svg = out.path().join("reliability.svg");
    reliability_diagram(&runs, &svg)?;
    out.write_json("calibration.json", &runs)?;
    println!("wrote {} and calibration.json", svg.display());
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

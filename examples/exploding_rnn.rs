//! Exploding gradients in a vanilla RNN, and global-norm clipping as the cure: the adding
//! problem (Hochreiter & Schmidhuber 1997), the task Pascanu, Mikolov & Bengio (2013) used to
//! show clipping at work.
//!
//! ```sh
//! cargo run --release --example exploding_rnn
//! ```
//!
//! Each input is a sequence of `T` pairs: a value drawn from `U[0, 1]` and a marker that is 1 at
//! two positions (one in each half) and 0 elsewhere; the target is the sum of the two marked
//! values. Always predicting 1 scores a mean squared error of 1/6 ≈ 0.167 (the variance of a sum
//! of two uniforms): a network beats it only by carrying the marked values across the sequence.
//!
//! A tanh and a ReLU RNN (`h_t = f(W_x x_t + W_h h_{t-1} + b)`, the recurrent matrix drawn with
//! spectral radius about `--gain`, default 1.1: just past the edge where products of Jacobians
//! blow up) are trained with plain SGD at `T` = 50 and 100, with and without global-norm
//! clipping. For each run: the largest gradient-norm spike, the clipping events, the
//! diagnostics' findings and the test MSE against the 0.167 baseline; the global-norm plot (with
//! the clipping threshold) and the JSONL log go to `--out`.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{GradMonitor, JsonlSink, MonitorConfig, RunReport, plot};
use serde::Serialize;
use support::{OutDir, Result, Sgd};

/// The 1/6 error of always predicting 1.
const BASELINE_MSE: f64 = 1.0 / 6.0;

/// Train vanilla RNNs on the adding problem with and without gradient clipping.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// SGD steps per run.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50,100")]
    lengths: Vec<usize>,
    /// Hidden units.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// SGD's learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Initial recurrent gain, relative to the cell's edge of stability (1 for tanh, sqrt 2 for
    /// ReLU): above 1, products of Jacobians grow with the sequence length.
    #[arg(long, default_value_t = 1.1)]
    gain: f64,
    /// The global-norm clipping threshold of the clipped runs.
    #[arg(long, default_value_t = 1.0)]
    max_norm: f64,
    /// Seed of the data and the initialisation.
    #[arg(long, default_value_t = 3)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "target/gradkit-demo/exploding-rnn")]
    out: PathBuf,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    quiet: bool,
}

impl Cli {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.hidden == 0 {
            return Err("--steps and --hidden must be at least 1".into());
        }
        if self.lengths.is_empty() || self.lengths.iter().any(|&t| t < 2) {
            return Err(
                format!("--lengths must each be at least 2, got {:?}", self.lengths).into(),
            );
        }
        for (name, v) in [
            ("--lr", self.lr),
            ("--gain", self.gain),
            ("--max-norm", self.max_norm),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number, got {v}").into());
            }
        }
        Ok(())
    }
}

/// The recurrent nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Cell {
    Tanh,
    Relu,
}

impl Cell {
    /// The recurrent gain where a random network is on the edge between contracting and
    /// expanding its state: 1 for tanh, sqrt(2) for ReLU (which passes half its input; He et al.
    /// 2015).
    fn critical_gain(self) -> f64 {
        match self {
            Self::Tanh => 1.0,
            Self::Relu => std::f64::consts::SQRT_2,
        }
    }
}

/// A batch of the adding problem: inputs `[B, T, 2]` and targets `[B, 1]`.
fn adding_batch(batch: usize, len: usize, rng: &mut Philox) -> Result<(Tensor, Tensor)> {
    let values = rng.uniform((batch, len), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let values = values.to_vec2::<f32>()?;
    let mut words = vec![0u32; 2 * batch];
    rng.fill_u32(&mut words);
    let half = len / 2;
    let mut x = vec![0f32; batch * len * 2];
    let mut y = vec![0f32; batch];
    for b in 0..batch {
        let first = words[2 * b] as usize % half;
        let second = half + words[2 * b + 1] as usize % (len - half);
        for t in 0..len {
            x[(b * len + t) * 2] = values[b][t];
        }
        for t in [first, second] {
            x[(b * len + t) * 2 + 1] = 1.0;
            y[b] += values[b][t];
        }
    }
    Ok((
        Tensor::from_vec(x, (batch, len, 2), &Device::Cpu)?,
        Tensor::from_vec(y, (batch, 1), &Device::Cpu)?,
    ))
}

/// A vanilla RNN with a linear read-out of the last state.
struct Rnn {
    cell: Cell,
    params: NamedVars,
}

impl Rnn {
    fn new(cell: Cell, hidden: usize, gain: f64, rng: &mut Philox) -> Result<Self> {
        #[allow(clippy::cast_precision_loss, reason = "a layer width")]
        let h = hidden as f64;
        let var = |t: Tensor| Var::from_tensor(&t);
        let params = NamedVars::new([
            (
                "rnn.w_x",
                var(rng.normal(
                    (hidden, 2),
                    0.0,
                    1.0 / 2f64.sqrt(),
                    DType::F32,
                    &Device::Cpu,
                )?)?,
            ),
            // A Gaussian H x H matrix with entries N(0, g^2 / H) has spectral radius about g.
            (
                "rnn.w_h",
                var(rng.normal(
                    (hidden, hidden),
                    0.0,
                    gain * cell.critical_gain() / h.sqrt(),
                    DType::F32,
                    &Device::Cpu,
                )?)?,
            ),
            (
                "rnn.b",
                var(Tensor::zeros(hidden, DType::F32, &Device::Cpu)?)?,
            ),
            (
                "out.weight",
                var(rng.normal((1, hidden), 0.0, 1.0 / h.sqrt(), DType::F32, &Device::Cpu)?)?,
            ),
            ("out.bias", var(Tensor::ones(1, DType::F32, &Device::Cpu)?)?),
        ])?;
        Ok(Self { cell, params })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        Ok(self
            .params
            .get(name)
            .ok_or_else(|| format!("no parameter {name}"))?
            .as_tensor())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let w_h = self.get("rnn.w_h")?.t()?;
        // The input projections of every step at once: [B, T, H].
        let xw = x
            .broadcast_matmul(&self.get("rnn.w_x")?.t()?)?
            .broadcast_add(self.get("rnn.b")?)?;
        let hidden = w_h.dim(0)?;
        let mut h = Tensor::zeros((batch, hidden), DType::F32, &Device::Cpu)?;
        for t in 0..len {
            let pre = (xw.narrow(1, t, 1)?.squeeze(1)? + h.matmul(&w_h)?)?;
            h = match self.cell {
                Cell::Tanh => pre.tanh()?,
                Cell::Relu => pre.relu()?,
            };
        }
        Ok(h.broadcast_matmul(&self.get("out.weight")?.t()?)?
            .broadcast_add(self.get("out.bias")?)?)
    }
}

/// One run's results.
#[derive(Debug, Serialize)]
struct RunResult {
    cell: Cell,
    length: usize,
    clipped: bool,
    test_mse: f64,
    beats_baseline: bool,
    /// Largest global gradient norm observed, and its step.
    peak_grad_norm: f64,
    peak_step: u64,
    median_grad_norm: f64,
    /// Steps whose gradients were clipped / skipped as non-finite.
    clip_events: u64,
    skipped_steps: u64,
    /// The step where an unclipped run's loss became NaN or infinite, if it did.
    diverged_at: Option<u64>,
    findings: Vec<String>,
    report: RunReport,
}

fn train(cli: &Cli, cell: Cell, length: usize, clip: bool, dir: &OutDir) -> Result<RunResult> {
    let mut rng = Philox::new(cli.seed);
    let rnn = Rnn::new(cell, cli.hidden, cli.gain, &mut rng)?;
    let (test_x, test_y) = adding_batch(1000, length, &mut Philox::new(cli.seed ^ 0x7e57))?;
    let config = MonitorConfig {
        every: 1,
        history: usize::try_from(cli.steps)?,
        // Network order: the recurrence, then the read-out (not the names' natural order).
        layer_order: Some(vec!["rnn".into(), "out".into()]),
        ..MonitorConfig::default()
    };
    let mut monitor = GradMonitor::new(rnn.params.clone(), config)?;
    let clip = clip.then_some(cli.max_norm);
    monitor.set_clip_threshold(clip);
    let mut optimizer = Sgd::new(&rnn.params, cli.lr, clip)?;
    let mut sink = JsonlSink::create(dir.path().join("log.jsonl"))?;
    let label = format!(
        "{cell:?} T={length} {}",
        if clip.is_some() {
            "clipped"
        } else {
            "unclipped"
        }
    );
    let bar = support::progress(cli.steps, &label, cli.quiet);
    if cli.quiet {
        println!("training {label}");
    }
    let mut diverged_at = None;
    for step in 0..cli.steps {
        let (x, y) = adding_batch(64, length, &mut rng)?;
        let loss = (rnn.forward(&x)? - &y)?.sqr()?.mean_all()?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        if let Some(record) = monitor.observe(step, &grads)? {
            sink.write(record)?;
        }
        optimizer.step(&grads)?;
        bar.inc(1);
        bar.set_message(format!("loss {value:.3}"));
        if !value.is_finite() && clip.is_none() {
            // Unclipped SGD has written NaN into the weights: nothing more to learn.
            diverged_at = Some(step);
            break;
        }
    }
    bar.finish_and_clear();
    let test_mse = f64::from(
        (rnn.forward(&test_x)? - &test_y)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()?,
    );
    let history: Vec<_> = monitor.history().cloned().collect();
    plot::global_norm_history(&history, &dir.path().join("global_norm.svg"))?;
    let report = monitor.report();
    let (peak_step, peak_grad_norm) = history
        .iter()
        .map(|r| (r.step, r.global_grad_norm))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, f64::NAN));
    let counters = optimizer.counters();
    Ok(RunResult {
        cell,
        length,
        clipped: clip.is_some(),
        test_mse,
        beats_baseline: test_mse < BASELINE_MSE,
        peak_grad_norm,
        peak_step,
        median_grad_norm: report.median_global_grad_norm,
        clip_events: counters.clipped,
        skipped_steps: counters.skipped,
        diverged_at,
        findings: report.findings.iter().map(ToString::to_string).collect(),
        report,
    })
}

fn run(cli: &Cli) -> Result<()> {
    cli.validate()?;
    let out = OutDir::create(&cli.out)?;
    let mut results = Vec::new();
    for &length in &cli.lengths {
        for cell in [Cell::Tanh, Cell::Relu] {
            for clip in [false, true] {
                let name = format!(
                    "{}-T{length}-{}",
                    format!("{cell:?}").to_lowercase(),
                    if clip { "clipped" } else { "unclipped" }
                );
                let dir = out.sub(&name)?;
                let r = train(cli, cell, length, clip, &dir)?;
                println!(
                    "{name}: test MSE {:.4} ({} the 0.167 baseline); peak gradient norm {:.3e} at step {} (median {:.3e}); {} clipping events{}",
                    r.test_mse,
                    if r.beats_baseline {
                        "beats"
                    } else {
                        "does not beat"
                    },
                    r.peak_grad_norm,
                    r.peak_step,
                    r.median_grad_norm,
                    r.clip_events,
                    r.diverged_at
                        .map(|s| format!("; diverged (NaN loss) at step {s}"))
                        .unwrap_or_default()
                );
                for f in &r.findings {
                    println!("  diagnostics: {f}");
                }
                dir.write_json("report.json", &r)?;
                results.push(r);
            }
        }
    }
    let mut table = String::from(
        "| cell | T | clipping | test MSE | vs 0.167 | peak grad norm | clip events | findings |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        table.push_str(&format!(
            "| {:?} | {} | {} | {:.4} | {} | {:.2e} | {} | {} |\n",
            r.cell,
            r.length,
            if r.clipped {
                format!("norm {}", cli.max_norm)
            } else {
                "none".into()
            },
            r.test_mse,
            if r.beats_baseline {
                "better"
            } else {
                "not better"
            },
            r.peak_grad_norm,
            r.clip_events,
            support::finding_kinds(&r.report),
        ));
    }
    out.write("summary.md", table.as_bytes())?;
    out.write_json("summary.json", &results)?;
    println!("\n{table}\nwrote {}", out.path().display());
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

//! The seed's story end to end: a deep MLP on the digits data whose gradients vanish, then the
//! remedies one by one, each run watched by gradkit's gradient monitor.
//!
//! ```sh
//! cargo run --release --example vanishing_gradients -- --epochs 30 --out target/gradkit-demo
//! ```
//!
//! First it runs the monitor's preflight and the sharpness estimate on every set-up at
//! initialisation (one forward and backward on its first batch, then 10 power iterations) and
//! prints what they predict. For each set-up it then prints test accuracy, the first-to-last
//! layer gradient-norm ratio, the detectors' findings in words and the wall time, then one
//! comparison table; it writes each
//! run's JSON report, JSON Lines log and SVG plots, and an overlay of the gradient flows.

#[path = "../support/mod.rs"]
mod support;

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use demo::{Options, Outcome, Setup};
use grad_diagnostics::{Preflight, PreflightConfig, plot};
use support::{OutDir, Result};

/// Train the same deep MLP on the digits data four ways and watch its gradients.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Passes over the training set.
    #[arg(long, default_value_t = Options::default().epochs)]
    epochs: usize,
    /// Seed of the initialisation, batch order and dropout.
    #[arg(long, default_value_t = Options::default().seed)]
    seed: u64,
    /// Output directory for reports, logs and plots.
    #[arg(long, default_value = "target/gradkit-demo")]
    out: PathBuf,
    /// Hidden layers.
    #[arg(long, default_value_t = Options::default().depth)]
    depth: usize,
    /// Units per hidden layer.
    #[arg(long, default_value_t = Options::default().width)]
    width: usize,
    /// Rows per mini-batch.
    #[arg(long, default_value_t = Options::default().batch_size)]
    batch_size: usize,
    /// SGD's learning rate.
    #[arg(long, default_value_t = Options::default().lr)]
    lr: f64,
    /// Observe the gradients every this many steps.
    #[arg(long, default_value_t = Options::default().observe_every)]
    observe_every: u64,
    /// The digits data (gzip-compressed CSV).
    #[arg(long, default_value_os_t = support::default_data())]
    data: PathBuf,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    // Keep freed step buffers for reuse (glibc) and stop candle recounting the cores on every
    // matmul: see README, "Training speed on the CPU".
    gradkit::core::tune_allocator();
    gradkit::core::tune_threads();
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => support::fail(&e),
    }
}

fn run(cli: &Cli) -> Result<()> {
    let options = Options {
        epochs: cli.epochs,
        depth: cli.depth,
        width: cli.width,
        batch_size: cli.batch_size,
        lr: cli.lr,
        seed: cli.seed,
        observe_every: cli.observe_every,
    };
    options.validate()?;
    let data = support::load_digits(&cli.data)?;
    let out = OutDir::create(&cli.out)?;
    println!(
        "digits: {} training and {} test images; MLP 64 -> {} x {} -> 10, SGD lr {}, batch {}, {} epochs, seed {}\n",
        data.train.images.dim(0)?,
        data.test.images.dim(0)?,
        options.depth,
        options.width,
        options.lr,
        options.batch_size,
        options.epochs,
        options.seed
    );
    println!(
        "at initialisation, before any step (preflight: one forward and backward; sharpness: 10 power iterations):"
    );
    let mut preflights = Vec::new();
    for setup in Setup::ALL {
        let initial = demo::initial(setup, &data, &options)?;
        describe_initial(setup, &initial, options.lr);
        out.sub(setup.slug())?
            .write("preflight.txt", initial.preflight.report().as_bytes())?;
        preflights.push((setup.title().to_owned(), initial.preflight));
    }
    let runs: Vec<(String, &Preflight)> = preflights.iter().map(|(t, p)| (t.clone(), p)).collect();
    plot::preflight(
        &runs,
        &PreflightConfig::default(),
        &out.path().join("preflight.svg"),
    )?;
    println!();
    let mut outcomes = Vec::new();
    for setup in Setup::ALL {
        let dir = out.sub(setup.slug())?;
        let outcome = train(setup, &data, &options, &dir, cli.quiet)?;
        describe(&outcome);
        dir.write_json("report.json", &outcome)?;
        plot::plot_all(&outcome.records, dir.path())?;
        outcomes.push(outcome);
    }
    let runs: Vec<(String, &[grad_diagnostics::StepRecord])> = outcomes
        .iter()
        .map(|o| (o.title.clone(), o.records.as_slice()))
        .collect();
    plot::gradient_flow_overlay(
        &runs,
        "gradient flow at the last observed step",
        &out.path().join("gradient_flow.svg"),
    )?;
    let table = comparison_table(&outcomes);
    out.write("summary.md", table.as_bytes())?;
    out.write_json("summary.json", &outcomes)?;
    println!("{table}");
    println!(
        "wrote {}: summary.md, summary.json, gradient_flow.svg and preflight.svg (overlays) and, per set-up, preflight.txt, report.json, log.jsonl and SVG plots",
        out.path().display()
    );
    Ok(())
}

fn train(
    setup: Setup,
    data: &support::Digits,
    options: &Options,
    dir: &OutDir,
    quiet: bool,
) -> Result<Outcome> {
    let steps_per_epoch = data.train.images.dim(0)?.div_ceil(options.batch_size) as u64;
    let bar = support::progress(
        steps_per_epoch * options.epochs as u64,
        setup.title(),
        quiet,
    );
    if quiet {
        println!("training {}", setup.title());
    }
    let log = dir.path().join("log.jsonl");
    let outcome = demo::run(setup, data, options, Some(&log), |_, loss| {
        bar.inc(1);
        bar.set_message(format!("loss {loss:.3}"));
    })?;
    bar.finish_and_clear();
    Ok(outcome)
}

fn describe(o: &Outcome) {
    println!("{}", o.title);
    println!(
        "  test accuracy {:.1}%  |  gradient norm, first layer / last layer: {:.2e}  |  {:.1} s{}",
        o.test_accuracy * 100.0,
        o.first_last_ratio,
        o.wall_seconds,
        if o.setup == Setup::AllRemedies {
            format!(
                "  |  clipped {} of {} steps at {}",
                o.clipped_steps,
                o.steps,
                demo::CLIP_MAX_NORM
            )
        } else {
            String::new()
        }
    );
    if o.findings.is_empty() {
        println!("  diagnostics: no findings — gradients are healthy at every layer");
    }
    for f in &o.findings {
        println!("  diagnostics: {f}");
    }
    println!();
}

/// One line per set-up: the preflight's verdict, the gradient ratio and the layers flagged, and
/// the sharpness against the learning rate's limit.
fn describe_initial(setup: Setup, initial: &demo::Initial, lr: f64) {
    let pre = &initial.preflight;
    let ratio = pre
        .gradient_ratio
        .map_or_else(|| "-".to_owned(), |r| format!("{r:.1e}"));
    let flagged = pre
        .findings
        .iter()
        .map(|f| {
            let layers = match f.layers.as_slice() {
                [] => "the whole model".to_owned(),
                [one] => one.clone(),
                [first, .., last] => format!("{} layers, {first} to {last}", f.layers.len()),
            };
            format!("; {:?} in {layers}", f.kind)
        })
        .collect::<String>();
    let curvature = initial.sharpness.as_ref().map_or_else(
        || "sharpness not estimated (dropout)".to_owned(),
        |s| {
            format!(
                "top Hessian eigenvalue {:.3} (2/lr = {:.0})",
                s.top_eigenvalue,
                2.0 / lr
            )
        },
    );
    println!(
        "  {:<40} {:?}: first/last gradient norm {ratio}; {curvature}{flagged}",
        setup.title(),
        pre.verdict
    );
}

/// The comparison table, as Markdown.
fn comparison_table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| set-up | test accuracy | grad norm first/last | findings | wall time |\n|---|---|---|---|---|\n",
    );
    for o in outcomes {
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1e} | {} | {:.1} s |\n",
            o.title,
            o.test_accuracy * 100.0,
            o.first_last_ratio,
            support::finding_kinds(&o.report),
            o.wall_seconds
        ));
    }
    s
}

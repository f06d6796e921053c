//! SVG plots of a run, drawn with plotters:
//!
//! - [`gradient_flow`]: per-layer gradient norm (log scale) against depth, several steps
//!   overlaid — vanishing gradients slope down towards the input;
//! - [`global_norm_history`]: the global gradient norm over steps, with the clipping threshold when one
//!   was set — exploding gradients spike;
//! - [`update_ratio`]: each layer's update-to-weight ratio over steps (log scale);
//! - [`probe_fractions`]: each probe's dead (ReLU) or saturated (sigmoid/tanh) fraction over steps;
//! - [`noise_scale`]: the simple noise scale over steps against the batch size, and
//!   [`signal_to_noise`]: each layer's gradient signal-to-noise ratio (from the records'
//!   [`NoiseRecord`](crate::NoiseRecord)s);
//! - [`preflight`]: several runs' gradient profile at initialisation, against the vanishing
//!   threshold;
//! - [`gradient_histograms`]: per layer, the distribution of `|g|` over steps (TensorBoard's
//!   "distributions" view): a column per step, a row per factor-of-two bin, shaded by the share
//!   of that step's elements in the bin.
//!
//! Non-positive and non-finite values cannot sit on a log axis and are left out of those plots.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::histogram::{BINS, FIRST_EXPONENT};
use crate::preflight::{Preflight, PreflightConfig};
use crate::record::{ProbeKind, ProbeStats, StepRecord};
use crate::{Error, Result};

const SIZE: (u32, u32) = (900, 560);

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A colour per series, cycling through a readable palette.
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    PALETTE[i % PALETTE.len()]
}

/// The widest log axis drawn: values beyond it (up to f64's limits, subnormals included) sit
/// on its edge instead of padding the axis to infinity or zero, where the axis' tick loop would
/// never end.
const LOG_AXIS: (f64, f64) = (1e-300, 1e300);

/// The most decades one log axis spans: plotters' log axis never returns once `hi / lo`
/// overflows (about 308 decades), so a wider range is cut at the bottom, keeping the largest
/// values (an explosion) in view.
const MAX_SPAN: f64 = 1e280;

/// The range of the positive finite values, padded by a factor of 2 each way, for a log axis
/// (within [`LOG_AXIS`]).
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| v.clamp(LOG_AXIS.0, LOG_AXIS.1))
        .fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !(lo.is_finite() && hi > 0.0) {
        return (1e-8, 1.0);
    }
    // Both ends are inside LOG_AXIS, so the padded range is never empty.
    let (lo, hi) = ((lo / 2.0).max(LOG_AXIS.0), (hi * 2.0).min(LOG_AXIS.1));
    (lo.max(hi / MAX_SPAN), hi)
}

/// A set of named series `(x, y)` on one log-y chart.
struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: Vec<(String, Vec<(f64, f64)>)>,
    /// A labelled horizontal line (the clipping threshold, the batch size).
    threshold: Option<(&'a str, f64)>,
    log_y: bool,
}

impl Chart<'_> {
    fn draw(self, path: &Path) -> Result<PathBuf> {
        let err = |e: &dyn std::fmt::Display| plot_error(path, e);
        let points = || self.series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
            (a.min(*x), b.max(*x))
        });
        let (x0, x1) = if x0.is_finite() {
            (x0, x1.max(x0 + 1.0))
        } else {
            (0.0, 1.0)
        };
        let ys = points()
            .map(|(_, y)| *y)
            .chain(self.threshold.map(|(_, t)| t));
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        if self.log_y {
            let (y0, y1) = log_range(ys);
            let mut chart = builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc(self.x_label)
                .y_desc(self.y_label)
                .y_label_formatter(&|v| format!("{v:.0e}"))
                .draw()
                .map_err(|e| err(&e))?;
            for (i, (name, pts)) in self.series.iter().enumerate() {
                let c = colour(i);
                let pts: Vec<(f64, f64)> = pts
                    .iter()
                    .copied()
                    .filter(|(_, y)| y.is_finite() && *y > 0.0)
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
            }
            if let Some((label, t)) = self.threshold {
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(x0, t), (x1, t)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(|e| err(&e))?
                    .label(format!("{label} {t:.3e}"))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| err(&e))?;
        } else {
            let mut chart = builder
                .build_cartesian_2d(x0..x1, 0f64..1f64)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc(self.x_label)
                .y_desc(self.y_label)
                .draw()
                .map_err(|e| err(&e))?;
            for (i, (name, pts)) in self.series.iter().enumerate() {
                let c = colour(i);
                let pts: Vec<(f64, f64)> =
                    pts.iter().copied().filter(|(_, y)| y.is_finite()).collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(path.to_path_buf())
    }
}

#[allow(clippy::cast_precision_loss, reason = "steps and depths are small")]
fn step_x(r: &StepRecord) -> f64 {
    r.step as f64
}

/// Up to `n` records evenly spread over the run (first and last included).
fn spread(records: &[StepRecord], n: usize) -> Vec<&StepRecord> {
    if records.len() <= n {
        return records.iter().collect();
    }
    let mut idx: Vec<usize> = (0..n)
        .map(|k| k * (records.len() - 1) / (n - 1).max(1))
        .collect();
    idx.dedup();
    idx.into_iter().map(|i| &records[i]).collect()
}

/// The gradient-flow plot: per-layer gradient norm against depth, up to `steps` observations
/// overlaid (one series each), written to `path`.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn gradient_flow(
    records: &[StepRecord],
    steps: usize,
    title: &str,
    path: &Path,
) -> Result<PathBuf> {
    let series = spread(records, steps.max(1))
        .into_iter()
        .map(|r| {
            #[allow(clippy::cast_precision_loss, reason = "depths are small")]
            let pts = r
                .layers
                .iter()
                .map(|l| (l.depth as f64, l.grad_norm))
                .collect();
            (format!("step {}", r.step), pts)
        })
        .collect();
    Chart {
        title,
        x_label: "layer depth (0 = input side)",
        y_label: "gradient L2 norm",
        series,
        threshold: None,
        log_y: true,
    }
    .draw(path)
}

/// Several runs' gradient flow at their last observation, one series per run: the overlay that
/// compares remedies.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn gradient_flow_overlay(
    runs: &[(String, &[StepRecord])],
    title: &str,
    path: &Path,
) -> Result<PathBuf> {
    let series = runs
        .iter()
        .filter_map(|(name, records)| {
            records.last().map(|r| {
                #[allow(clippy::cast_precision_loss, reason = "depths are small")]
                let pts = r
                    .layers
                    .iter()
                    .map(|l| (l.depth as f64, l.grad_norm))
                    .collect();
                (name.clone(), pts)
            })
        })
        .collect();
    Chart {
        title,
        x_label: "layer depth (0 = input side)",
        y_label: "gradient L2 norm",
        series,
        threshold: None,
        log_y: true,
    }
    .draw(path)
}

/// The global gradient norm over steps, with the clipping threshold when the records carry one.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn global_norm_history(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    Chart {
        title: "global gradient norm",
        x_label: "step",
        y_label: "L2 norm",
        series: vec![(
            "global norm".into(),
            records
                .iter()
                .map(|r| (step_x(r), r.global_grad_norm))
                .collect(),
        )],
        threshold: records
            .iter()
            .rev()
            .find_map(|r| r.clip_threshold)
            .map(|t| ("clip threshold", t)),
        log_y: true,
    }
    .draw(path)
}

/// One series per item over the records' steps: `value(record, i)` reads item `i` of a record.
fn over_steps(
    records: &[StepRecord],
    names: Vec<String>,
    value: impl Fn(&StepRecord, usize) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let pts = records
                .iter()
                .filter_map(|r| value(r, i).map(|v| (step_x(r), v)));
            (name, pts.collect())
        })
        .collect()
}

/// Each layer's update-to-weight ratio over steps, one series per layer.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn update_ratio(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    let names = records
        .last()
        .map(|r| r.layers.iter().map(|l| l.name.clone()).collect());
    Chart {
        title: "update-to-weight ratio per layer",
        x_label: "step",
        y_label: "||update|| / ||weight||",
        series: over_steps(records, names.unwrap_or_default(), |r, i| {
            r.layers.get(i).and_then(|x| x.update_ratio)
        }),
        threshold: None,
        log_y: true,
    }
    .draw(path)
}

/// Each probe's dead fraction (ReLU) or saturated fraction (sigmoid/tanh) over steps.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn probe_fractions(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    let names = records.last().map(|r| {
        let name = |p: &ProbeStats| {
            let what = match p.kind {
                ProbeKind::Relu => "dead",
                ProbeKind::Tanh | ProbeKind::Sigmoid => "saturated",
                ProbeKind::Linear => "non-positive",
            };
            format!("{} ({what})", p.name)
        };
        r.probes.iter().map(name).collect()
    });
    Chart {
        title: "dead / saturated fraction per probed layer",
        x_label: "step",
        y_label: "fraction",
        series: over_steps(records, names.unwrap_or_default(), |r, i| {
            let q = r.probes.get(i)?;
            match q.kind {
                ProbeKind::Relu => q.dead_fraction,
                ProbeKind::Tanh | ProbeKind::Sigmoid => q.saturated_fraction,
                ProbeKind::Linear => Some(q.nonpositive_fraction),
            }
        }),
        threshold: None,
        log_y: false,
    }
    .draw(path)
}

/// Per layer (a panel each, input side on top), the share of the gradient's elements in each
/// magnitude bin, over steps: at most 200 steps, evenly spread, are drawn.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be written.
pub fn gradient_histograms(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    let err = |e: &dyn std::fmt::Display| plot_error(path, e);
    let steps = spread(records, 200);
    let layers: Vec<&str> = records
        .last()
        .map(|r| r.layers.iter().map(|l| l.name.as_str()).collect())
        .unwrap_or_default();
    // The bins with data anywhere, so the rows are not mostly empty.
    let used = |k: usize| {
        steps
            .iter()
            .any(|r| r.layers.iter().any(|l| l.grad_histogram.count(k) > 0))
    };
    let lo = (0..BINS).find(|&k| used(k)).unwrap_or(0);
    let hi = (0..BINS).rev().find(|&k| used(k)).unwrap_or(BINS - 1);
    let height = 120 * u32::try_from(layers.len().clamp(1, 40)).unwrap_or(40) + 60;
    let root = SVGBackend::new(path, (SIZE.0, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "gradient magnitudes |g| per layer over steps",
            ("sans-serif", 20),
        )
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((layers.len().max(1), 1));
    let x0 = steps.first().map_or(0.0, |r| step_x(r));
    let x1 = steps.last().map_or(1.0, |r| step_x(r)).max(x0 + 1.0);
    let width = (x1 - x0) / steps.len().max(1) as f64;
    #[allow(clippy::cast_possible_wrap, reason = "bins are few")]
    let exponent = |k: usize| FIRST_EXPONENT + k as i32;
    for (panel, name) in panels.iter().zip(&layers) {
        let mut chart = ChartBuilder::on(panel)
            .caption(*name, ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(24)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1 + width, exponent(lo)..exponent(hi) + 1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .y_desc("log2 |g|")
            .y_labels(5)
            .disable_x_mesh()
            .draw()
            .map_err(|e| err(&e))?;
        let mut cells = Vec::new();
        for r in &steps {
            let Some(h) = r
                .layers
                .iter()
                .find(|l| l.name == *name)
                .map(|l| &l.grad_histogram)
            else {
                continue;
            };
            let total = h.bins.iter().sum::<u64>().max(1) as f64;
            for k in lo..=hi {
                let share = h.count(k) as f64 / total;
                if share > 0.0 {
                    let shade = 255 - (share.sqrt() * 235.0).min(235.0) as u8;
                    let x = step_x(r);
                    cells.push(Rectangle::new(
                        [(x, exponent(k)), (x + width, exponent(k) + 1)],
                        RGBColor(shade, shade, 255).filled(),
                    ));
                }
            }
        }
        chart.draw_series(cells).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(path.to_path_buf())
}

/// The simple noise scale `B_simple` over the steps that estimated it, with the batch size
/// (`k·b`) as a dashed line: well above the line, larger batches would help.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn noise_scale(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    let batch = records
        .iter()
        .rev()
        .find_map(|r| r.noise.as_ref())
        .map(|n| ("batch size", (n.micro_batches * n.micro_batch_size) as f64));
    Chart {
        title: "simple noise scale B_simple",
        x_label: "step",
        y_label: "tr(Σ) / |G|²",
        series: vec![(
            "B_simple".into(),
            records
                .iter()
                .filter_map(|r| r.noise.as_ref().map(|n| (step_x(r), n.simple_noise_scale)))
                .collect(),
        )],
        threshold: batch,
        log_y: true,
    }
    .draw(path)
}

/// Each layer's gradient signal-to-noise ratio over the steps that estimated it, with 1 as a
/// dashed line.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
pub fn signal_to_noise(records: &[StepRecord], path: &Path) -> Result<PathBuf> {
    let names = records
        .iter()
        .rev()
        .find_map(|r| r.noise.as_ref())
        .map(|n| n.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let series = names
        .into_iter()
        .map(|name| {
            let pts = records
                .iter()
                .filter_map(|r| {
                    let n = r.noise.as_ref()?;
                    let l = n.layers.iter().find(|l| l.name == name)?;
                    Some((step_x(r), l.snr))
                })
                .collect();
            (name, pts)
        })
        .collect();
    Chart {
        title: "gradient signal-to-noise ratio per layer",
        x_label: "step",
        y_label: "|G|² / (tr(Σ) / b)",
        series,
        threshold: Some(("signal = noise", 1.0)),
        log_y: true,
    }
    .draw(path)
}

/// Preflights overlaid: each layer's gradient norm at initialisation over the last layer's,
/// one series per run, with the vanishing threshold `1 / gradient_ratio` as a dashed line. A
/// run whose line falls towards the input side (depth 0) through the line vanishes.
///
/// # Errors
/// [`Error::Plot`] when the file cannot be drawn.
///
/// ```no_run
/// # fn demo(sick: &gradkit::diagnostics::Preflight, fixed: &gradkit::diagnostics::Preflight) -> gradkit::diagnostics::Result<()> {
/// use gradkit::diagnostics::{PreflightConfig, plot};
/// let runs = [("sigmoid".to_owned(), sick), ("batch norm".to_owned(), fixed)];
/// plot::preflight(&runs, &PreflightConfig::default(), std::path::Path::new("preflight.svg"))?;
/// # Ok(()) }
/// ```
pub fn preflight(
    runs: &[(String, &Preflight)],
    config: &PreflightConfig,
    path: &Path,
) -> Result<PathBuf> {
    let series = runs
        .iter()
        .map(|(name, pre)| {
            #[allow(clippy::cast_precision_loss, reason = "depths are small")]
            let pts = pre
                .layers
                .iter()
                .filter_map(|l| l.relative.map(|r| (l.depth as f64, r)))
                .collect();
            (name.clone(), pts)
        })
        .collect();
    Chart {
        title: "preflight: gradient norm at initialisation",
        x_label: "layer depth (0 = input side)",
        y_label: "gradient norm / last layer's",
        series,
        threshold: Some(("vanishing below", 1.0 / config.gradient_ratio)),
        log_y: true,
    }
    .draw(path)
}

/// Draws all the plots into `dir` (created if missing) as `gradient_flow.svg`,
/// `global_norm.svg`, `update_ratio.svg`, `gradient_histograms.svg`, `probes.svg` (only when
/// there are probes) and `noise_scale.svg` with `signal_to_noise.svg` (only when records carry
/// gradient noise).
///
/// # Errors
/// [`Error::Io`] when the folder cannot be created, [`Error::Plot`] when a plot fails.
pub fn plot_all(records: &[StepRecord], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = vec![
        gradient_flow(records, 5, "gradient flow", &dir.join("gradient_flow.svg"))?,
        global_norm_history(records, &dir.join("global_norm.svg"))?,
        update_ratio(records, &dir.join("update_ratio.svg"))?,
        gradient_histograms(records, &dir.join("gradient_histograms.svg"))?,
    ];
    if records.last().is_some_and(|r| !r.probes.is_empty()) {
        out.push(probe_fractions(records, &dir.join("probes.svg"))?);
    }
    if records.iter().any(|r| r.noise.is_some()) {
        out.push(noise_scale(records, &dir.join("noise_scale.svg"))?);
        out.push(signal_to_noise(records, &dir.join("signal_to_noise.svg"))?);
    }
    Ok(out)
}

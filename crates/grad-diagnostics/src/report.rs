//! Reports: a run's per-layer summary and findings, as data (serde) and as a table a terminal
//! user reads at a glance.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::detect::{DetectorConfig, Finding, FindingKind, detect};
use crate::record::StepRecord;

/// One layer's line of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// The layer.
    pub layer: String,
    /// Its position in network order.
    pub depth: usize,
    /// Gradient norm at the last observation.
    pub grad_norm: f64,
    /// Median gradient norm over the observations.
    pub median_grad_norm: f64,
    /// Median update-to-weight ratio over the observations that have one.
    pub median_update_ratio: Option<f64>,
    /// `ok`, or the findings naming this layer.
    pub verdict: String,
}

/// A run's report: what was observed, per layer, and what the detectors found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Observations the report covers.
    pub observations: usize,
    /// First and last observed steps.
    pub steps: [u64; 2],
    /// Global gradient norm at the last observation.
    pub global_grad_norm: f64,
    /// Median global gradient norm.
    pub median_global_grad_norm: f64,
    /// The loss at the last observation that recorded one.
    #[serde(default, with = "crate::record::float::opt")]
    pub loss: Option<f64>,
    /// The learning rate at the last observation that recorded one.
    #[serde(default, with = "crate::record::float::opt")]
    pub learning_rate: Option<f64>,
    /// Observed steps a clipping optimizer clipped, and skipped.
    #[serde(default)]
    pub clipped_steps: usize,
    /// Observed steps skipped for non-finite gradients.
    #[serde(default)]
    pub skipped_steps: usize,
    /// Per layer, in network order.
    pub layers: Vec<LayerSummary>,
    /// The detectors' findings.
    pub findings: Vec<Finding>,
    /// The model's buffers (state such as running statistics), never monitored as parameters.
    #[serde(default)]
    pub buffers: Vec<String>,
    /// Caveats about the report itself (layers in name order when network order was unknown).
    #[serde(default)]
    pub warnings: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[(v.len() - 1) / 2]
    }
}

/// The verdict word for a finding kind.
fn kind_word(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::NoGradient => "no gradient",
        FindingKind::Vanishing => "vanishing",
        FindingKind::Exploding => "exploding",
        FindingKind::NonFinite => "non-finite",
        FindingKind::DeadUnits => "dead units",
        FindingKind::Saturation => "saturation",
        FindingKind::UpdateRatio => "update ratio",
        FindingKind::CurvatureLimit => "curvature limit",
        FindingKind::NoiseScale => "noise scale",
        FindingKind::LowSignalToNoise => "low signal-to-noise",
    }
}

impl RunReport {
    /// The report of `records` (oldest first) under `config`.
    ///
    /// ```
    /// use gradkit::diagnostics::RunReport;
    /// let report = RunReport::from_records(&[], &Default::default());
    /// assert_eq!(report.observations, 0);
    /// ```
    pub fn from_records(records: &[StepRecord], config: &DetectorConfig) -> Self {
        Self::from_parts(records, detect(records, config))
    }

    /// The report of `records` (oldest first) with `findings` already made (a monitor's, over a
    /// longer run than the records it kept).
    pub fn from_parts<'a>(
        records: impl IntoIterator<Item = &'a StepRecord> + Clone,
        findings: Vec<Finding>,
    ) -> Self {
        let last = records.clone().into_iter().last();
        let first = records.clone().into_iter().next();
        let count = records.clone().into_iter().count();
        let named = |f: &Finding, layer: &str| {
            f.layers
                .iter()
                .any(|n| n == layer || n.rsplit_once('.').is_some_and(|(l, _)| l == layer))
        };
        let layers = last
            .map(|last| {
                last.layers
                    .iter()
                    .map(|l| {
                        let norms: Vec<f64> = records
                            .clone()
                            .into_iter()
                            .filter_map(|r| r.layers.get(l.depth))
                            .map(|x| x.grad_norm)
                            .collect();
                        let ratios: Vec<f64> = records
                            .clone()
                            .into_iter()
                            .filter_map(|r| r.layers.get(l.depth).and_then(|x| x.update_ratio))
                            .collect();
                        let mut verdicts: Vec<String> = findings
                            .iter()
                            .filter(|f| named(f, &l.name))
                            .map(|f| kind_word(f.kind).to_owned())
                            .collect();
                        // A layer whose gradient is not finite is never "ok", named or not.
                        if (l.non_finite > 0 || !l.grad_norm.is_finite())
                            && !verdicts
                                .iter()
                                .any(|v| v == kind_word(FindingKind::NonFinite))
                        {
                            verdicts.push(kind_word(FindingKind::NonFinite).to_owned());
                        }
                        if !l.has_grad
                            && !verdicts
                                .iter()
                                .any(|v| v == kind_word(FindingKind::NoGradient))
                        {
                            verdicts.push(kind_word(FindingKind::NoGradient).to_owned());
                        }
                        LayerSummary {
                            layer: l.name.clone(),
                            depth: l.depth,
                            grad_norm: l.grad_norm,
                            median_grad_norm: median(norms),
                            median_update_ratio: (!ratios.is_empty()).then(|| median(ratios)),
                            verdict: if verdicts.is_empty() {
                                "ok".into()
                            } else {
                                verdicts.join(", ")
                            },
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let clips: Vec<_> = records.clone().into_iter().filter_map(|r| r.clip).collect();
        Self {
            observations: count,
            steps: [first.map_or(0, |r| r.step), last.map_or(0, |r| r.step)],
            global_grad_norm: last.map_or(f64::NAN, |r| r.global_grad_norm),
            median_global_grad_norm: median(
                records
                    .clone()
                    .into_iter()
                    .map(|r| r.global_grad_norm)
                    .collect(),
            ),
            loss: records.clone().into_iter().filter_map(|r| r.loss).last(),
            learning_rate: records
                .clone()
                .into_iter()
                .filter_map(|r| r.learning_rate)
                .last(),
            clipped_steps: clips.iter().filter(|c| c.clipped).count(),
            skipped_steps: clips.iter().filter(|c| c.skipped).count(),
            layers,
            findings,
            buffers: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The plain-text summary: one line per layer (gradient norm, update ratio, verdict), then
    /// the findings.
    ///
    /// ```
    /// use gradkit::diagnostics::RunReport;
    /// let report = RunReport::from_records(&[], &Default::default());
    /// assert!(report.summary_table().contains("no findings"));
    /// ```
    pub fn summary_table(&self) -> String {
        let mut s = String::new();
        let width = self
            .layers
            .iter()
            .map(|l| l.layer.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            s,
            "{} observations, steps {}-{}; global gradient norm {:.3e} (median {:.3e})",
            self.observations,
            self.steps[0],
            self.steps[1],
            self.global_grad_norm,
            self.median_global_grad_norm
        );
        if self.loss.is_some() || self.learning_rate.is_some() {
            let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.4e}"));
            let _ = writeln!(
                s,
                "last loss {}, learning rate {}; {} observed step(s) clipped, {} skipped",
                show(self.loss),
                show(self.learning_rate),
                self.clipped_steps,
                self.skipped_steps
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        let _ = writeln!(
            s,
            "{:>5}  {:<width$}  {:>10}  {:>10}  {:>12}  verdict",
            "depth", "layer", "grad norm", "median", "update ratio"
        );
        for l in &self.layers {
            let ratio = l
                .median_update_ratio
                .map_or("-".to_owned(), |r| format!("{r:.2e}"));
            let _ = writeln!(
                s,
                "{:>5}  {:<width$}  {:>10.3e}  {:>10.3e}  {:>12}  {}",
                l.depth, l.layer, l.grad_norm, l.median_grad_norm, ratio, l.verdict
            );
        }
        if !self.buffers.is_empty() {
            let _ = writeln!(s, "buffers (not parameters): {}", self.buffers.join(", "));
        }
        if self.findings.is_empty() {
            let _ = writeln!(s, "no findings");
        } else {
            let _ = writeln!(s, "{} finding(s):", self.findings.len());
            for f in &self.findings {
                let _ = writeln!(s, "- {f}");
            }
        }
        s
    }
}

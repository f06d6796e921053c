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
    /// Per layer, in network order.
    pub layers: Vec<LayerSummary>,
    /// The detectors' findings.
    pub findings: Vec<Finding>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl RunReport {
    /// The report of `records` (oldest first) under `config`.
    pub fn from_records(records: &[StepRecord], config: &DetectorConfig) -> Self {
        let findings = detect(records, config);
        let last = records.last();
        let layers = last
            .map(|last| {
                last.layers
                    .iter()
                    .map(|l| {
                        let norms: Vec<f64> = records
                            .iter()
                            .filter_map(|r| r.layers.get(l.depth))
                            .map(|x| x.grad_norm)
                            .collect();
                        let ratios: Vec<f64> = records
                            .iter()
                            .filter_map(|r| r.layers.get(l.depth).and_then(|x| x.update_ratio))
                            .collect();
                        let verdicts: Vec<String> = findings
                            .iter()
                            .filter(|f| {
                                f.layers.contains(&l.name)
                                    || (f.kind == FindingKind::NonFinite
                                        && f.layers.iter().any(|p| {
                                            p.rsplit_once('.')
                                                .is_some_and(|(layer, _)| layer == l.name)
                                        }))
                            })
                            .map(|f| format!("{:?}", f.kind).to_lowercase())
                            .collect();
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
        Self {
            observations: records.len(),
            steps: [
                records.first().map_or(0, |r| r.step),
                last.map_or(0, |r| r.step),
            ],
            global_grad_norm: last.map_or(f64::NAN, |r| r.global_grad_norm),
            median_global_grad_norm: median(records.iter().map(|r| r.global_grad_norm).collect()),
            layers,
            findings,
        }
    }

    /// The plain-text summary: one line per layer (gradient norm, update ratio, verdict), then
    /// the findings.
    ///
    /// ```
    /// use grad_diagnostics::RunReport;
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

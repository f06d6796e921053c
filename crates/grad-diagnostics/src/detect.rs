//! Detectors: which failure the network has, where, and what to do about it.
//!
//! Each detector reads the observation history (oldest first) and returns [`Finding`]s naming
//! the layers involved, the evidence and a remedy in terms of gradkit's API. Every threshold is
//! a field of [`DetectorConfig`] (serde-serialisable); the defaults and where they come from:
//!
//! - **Vanishing** (Hochreiter 1991; Glorot & Bengio 2010): a layer's gradient norm below
//!   `vanishing_norm` = 1e-7 (about where f32 training of typical layer sizes stops moving
//!   weights), or the first layer's gradient norm below `vanishing_ratio` = 1e-4 times the
//!   last's, for `patience` = 3 consecutive observations.
//! - **Exploding** (Pascanu, Mikolov & Bengio 2013): the global norm above `exploding_norm` = 1e6,
//!   or grown `growth_factor` = 10x over the median of the `growth_window` = 5 previous
//!   observations to above the run's median (a climb back to the usual level after a quiet patch, common
//!   late in training, is not an explosion), or any NaN/Inf gradient (named: the first parameter in network order, and the step).
//! - **Dead units** (Maas et al. 2013; Lu et al. 2019): a probed ReLU layer with more than
//!   `dead_fraction` = 0.95 of its units not positive once over the probe's window.
//! - **Saturation** (Glorot & Bengio 2010): a probed sigmoid/tanh layer with more than
//!   `saturation_fraction` = 0.5 of its outputs saturated.
//! - **Update ratio** (Karpathy's rule of thumb, CS231n: about 1e-3): a layer whose median
//!   update-to-weight ratio over the last `patience` observations lies outside
//!   `update_ratio_band` = [1e-5, 1e-1], two decades either side.

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::record::{ProbeKind, StepRecord};

/// Detector thresholds; the defaults are documented in the module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Absolute gradient-norm floor of a layer. Default: 1e-7.
    pub vanishing_norm: f64,
    /// First-to-last layer gradient-norm ratio floor. Default: 1e-4.
    pub vanishing_ratio: f64,
    /// Consecutive observations a vanishing or update-ratio condition must hold. Default: 3.
    pub patience: usize,
    /// Global gradient-norm ceiling. Default: 1e6.
    pub exploding_norm: f64,
    /// Growth of the global norm that counts as exploding (when it also ends above the median of
    /// the observed run). Default: 10.
    pub growth_factor: f64,
    /// Previous observations whose median the growth is measured against. Default: 5.
    pub growth_window: usize,
    /// Fraction of a ReLU layer's units dead over the window that is flagged. Default: 0.95.
    pub dead_fraction: f64,
    /// Fraction of a sigmoid/tanh layer's outputs saturated that is flagged. Default: 0.5.
    pub saturation_fraction: f64,
    /// Healthy range of a layer's update-to-weight ratio. Default: `[1e-5, 1e-1]`.
    pub update_ratio_band: [f64; 2],
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            vanishing_norm: 1e-7,
            vanishing_ratio: 1e-4,
            patience: 3,
            exploding_norm: 1e6,
            growth_factor: 10.0,
            growth_window: 5,
            dead_fraction: 0.95,
            saturation_fraction: 0.5,
            update_ratio_band: [1e-5, 1e-1],
        }
    }
}

impl DetectorConfig {
    /// Checks that thresholds are positive and ordered.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the field.
    pub fn validate(&self) -> Result<()> {
        use grad_core::validate::{at_least_one, greater_than_one, positive, unit_interval};
        positive("vanishing_norm", self.vanishing_norm)?;
        positive("vanishing_ratio", self.vanishing_ratio)?;
        at_least_one("patience", self.patience)?;
        positive("exploding_norm", self.exploding_norm)?;
        greater_than_one("growth_factor", self.growth_factor)?;
        at_least_one("growth_window", self.growth_window)?;
        unit_interval("dead_fraction", self.dead_fraction)?;
        unit_interval("saturation_fraction", self.saturation_fraction)?;
        let [lo, hi] = self.update_ratio_band;
        positive("update_ratio_band", lo)?;
        if !(hi.is_finite() && hi > lo) {
            return Err(grad_core::Error::InvalidHyperParameter {
                name: "update_ratio_band",
                value: hi,
                allowed: "an upper bound above the lower one",
            }
            .into());
        }
        Ok(())
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Training is likely impaired.
    Warning,
    /// Training is broken.
    Critical,
}

/// Which failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FindingKind {
    /// Gradients too small to move the early layers.
    Vanishing,
    /// Gradients too large or growing fast.
    Exploding,
    /// NaN or infinite gradients.
    NonFinite,
    /// ReLU units that never activate.
    DeadUnits,
    /// Sigmoid/tanh units pinned at their bounds.
    Saturation,
    /// Updates far too small or too large for the weights.
    UpdateRatio,
}

/// A detector's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Which failure.
    pub kind: FindingKind,
    /// How bad.
    pub severity: Severity,
    /// The layers (or probes, or the parameter) involved, in network order.
    pub layers: Vec<String>,
    /// The evidence, in words with the numbers.
    pub evidence: String,
    /// The first and last observed steps the evidence covers.
    pub steps: [u64; 2],
    /// What to do, in terms of gradkit's API.
    pub remedy: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:?}] {:?} in {} (steps {}-{}): {}. Remedy: {}",
            self.severity,
            self.kind,
            self.layers.join(", "),
            self.steps[0],
            self.steps[1],
            self.evidence,
            self.remedy
        )
    }
}

/// Runs every detector on `records` (oldest first).
pub fn detect(records: &[StepRecord], config: &DetectorConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    let Some(last) = records.last() else {
        return out;
    };
    non_finite(last, &mut out);
    exploding(records, config, &mut out);
    vanishing(records, config, &mut out);
    probes(last, config, &mut out);
    update_ratio(records, config, &mut out);
    out
}

fn non_finite(last: &StepRecord, out: &mut Vec<Finding>) {
    if let Some(p) = last.first_non_finite() {
        out.push(Finding {
            kind: FindingKind::NonFinite,
            severity: Severity::Critical,
            layers: vec![p.name.clone()],
            evidence: format!(
                "{} NaN and {} infinite gradient elements in {} at step {} (the first parameter in network order with any)",
                p.nan_count, p.inf_count, p.name, last.step
            ),
            steps: [last.step, last.step],
            remedy: "skip non-finite steps with grad_regularize::Clipped (skip_non_finite) and trace the source back from this parameter; with f16/bf16 scale the loss with grad_regularize::LossScaler".into(),
        });
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn exploding(records: &[StepRecord], c: &DetectorConfig, out: &mut Vec<Finding>) {
    let Some(last) = records.last() else { return };
    let mut finite: Vec<f64> = records
        .iter()
        .map(|r| r.global_grad_norm)
        .filter(|v| v.is_finite())
        .collect();
    let med = median(&mut finite);
    // The recent window: the last observation and the `growth_window` before it.
    let window = &records[records.len().saturating_sub(c.growth_window + 1)..];
    let Some((peak_at, peak)) = window
        .iter()
        .filter(|r| r.global_grad_norm.is_finite())
        .map(|r| (r, r.global_grad_norm))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return;
    };
    // The baseline is the median of the window before the peak: late in training single
    // batches swing by 10x about a small typical norm, which a minimum would read as growth.
    let mut before: Vec<f64> = window
        .iter()
        .take_while(|r| r.step < peak_at.step)
        .map(|r| r.global_grad_norm)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let floor = if before.is_empty() {
        f64::INFINITY
    } else {
        median(&mut before)
    };
    let (evidence, severity) = if peak > c.exploding_norm {
        (
            format!(
                "global gradient norm {peak:.3e} above {:.0e} at step {}",
                c.exploding_norm, peak_at.step
            ),
            Severity::Critical,
        )
    } else if floor.is_finite() && peak > c.growth_factor * floor && peak > med {
        (
            format!(
                "global gradient norm grew {:.1}x (from a median of {floor:.3e} to {peak:.3e} at step {}) within {} observations",
                peak / floor,
                peak_at.step,
                window.len()
            ),
            Severity::Warning,
        )
    } else {
        return;
    };
    let mut layers: Vec<(f64, &str)> = peak_at
        .layers
        .iter()
        .map(|l| (l.grad_norm, l.name.as_str()))
        .collect();
    layers.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut named: Vec<String> = layers
        .iter()
        .take(3)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    named.sort_by_key(|n| peak_at.layers.iter().position(|l| &l.name == n));
    out.push(Finding {
        kind: FindingKind::Exploding,
        severity,
        layers: named,
        evidence,
        steps: [window[0].step, last.step],
        remedy: format!(
            "clip the global norm at about 1-5x its median ({med:.3e}) with grad_regularize::Clipped and ClipRule::global_norm, lower the learning rate, or add normalisation (grad_layers::batch_norm / layer_norm)"
        ),
    });
}

fn vanishing(records: &[StepRecord], c: &DetectorConfig, out: &mut Vec<Finding>) {
    if records.len() < c.patience {
        return;
    }
    let recent = &records[records.len() - c.patience..];
    let Some(last) = recent.last() else { return };
    if last.layers.is_empty() {
        return;
    }
    // Layers below the absolute floor, or below `ratio` times the last layer, in every record.
    let below = |r: &StepRecord, depth: usize| -> bool {
        let Some(l) = r.layers.get(depth) else {
            return false;
        };
        let top = r.layers.last().map_or(0.0, |t| t.grad_norm);
        l.grad_norm < c.vanishing_norm
            || (depth + 1 < r.layers.len() && l.grad_norm < c.vanishing_ratio * top)
    };
    let ratio_holds = recent.iter().all(|r| {
        let (first, lastl) = (
            r.layers.first().map_or(0.0, |l| l.grad_norm),
            r.layers.last().map_or(0.0, |l| l.grad_norm),
        );
        lastl > 0.0 && first / lastl < c.vanishing_ratio
    });
    let layers: Vec<String> = (0..last.layers.len())
        .filter(|&d| recent.iter().all(|r| below(r, d)))
        .map(|d| last.layers[d].name.clone())
        .collect();
    if layers.is_empty() && !ratio_holds {
        return;
    }
    let first = &last.layers[0];
    let top = last.layers.last().map_or(first, |l| l);
    out.push(Finding {
        kind: FindingKind::Vanishing,
        severity: Severity::Warning,
        layers: if layers.is_empty() { vec![first.name.clone()] } else { layers.clone() },
        evidence: format!(
            "gradient norm of {} is {:.3e}, {:.1e} times that of {} ({:.3e}); {} layer(s) below {:.0e} of the last or {:.0e} absolute for {} observations",
            first.name,
            first.grad_norm,
            first.grad_norm / top.grad_norm,
            top.name,
            top.grad_norm,
            layers.len(),
            c.vanishing_ratio,
            c.vanishing_norm,
            c.patience
        ),
        steps: [recent[0].step, last.step],
        remedy: format!(
            "insert BatchNorm after {} (grad_layers::batch_norm), use LeakyReLU with Kaiming init instead of saturating activations (grad_layers::Activation::LeakyRelu, grad_layers::init::Initializer::KaimingNormal), or initialise with LSUV (grad_layers::lsuv)",
            layers.first().unwrap_or(&first.name)
        ),
    });
}

fn probes(last: &StepRecord, c: &DetectorConfig, out: &mut Vec<Finding>) {
    for p in &last.probes {
        match (p.kind, p.dead_fraction, p.saturated_fraction) {
            (ProbeKind::Relu, Some(dead), _) if dead > c.dead_fraction => out.push(Finding {
                kind: FindingKind::DeadUnits,
                severity: Severity::Warning,
                layers: vec![p.name.clone()],
                evidence: format!("{:.1}% of {} units not positive once over the probe's window ({} forwards seen)", dead * 100.0, p.units, p.forwards),
                steps: [last.step, last.step],
                remedy: "use LeakyReLU or PReLU (grad_layers::Activation::LeakyRelu, grad_layers::prelu), lower the learning rate, or re-initialise the layer's bias (grad_layers::init::reinit)".into(),
            }),
            (ProbeKind::Tanh | ProbeKind::Sigmoid, _, Some(sat)) if sat > c.saturation_fraction => out.push(Finding {
                kind: FindingKind::Saturation,
                severity: Severity::Warning,
                layers: vec![p.name.clone()],
                evidence: format!("{:.1}% of the outputs saturated (mean {:.3}, std {:.3})", sat * 100.0, p.mean, p.std),
                steps: [last.step, last.step],
                remedy: "normalise the layer's input (grad_layers::batch_norm, grad_layers::layer_norm) and use Xavier init with the activation's gain (grad_layers::init::Initializer::XavierNormal, calculate_gain)".into(),
            }),
            _ => {}
        }
    }
}

fn update_ratio(records: &[StepRecord], c: &DetectorConfig, out: &mut Vec<Finding>) {
    if records.len() < c.patience {
        return;
    }
    let recent = &records[records.len() - c.patience..];
    let Some(last) = recent.last() else { return };
    let [lo, hi] = c.update_ratio_band;
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for (d, layer) in last.layers.iter().enumerate() {
        let mut v: Vec<f64> = recent
            .iter()
            .filter_map(|r| r.layers.get(d).and_then(|l| l.update_ratio))
            .filter(|v| v.is_finite())
            .collect();
        if v.len() < c.patience {
            continue;
        }
        let m = median(&mut v);
        if m < lo {
            small.push((layer.name.clone(), m));
        } else if m > hi {
            large.push((layer.name.clone(), m));
        }
    }
    for (list, too, remedy) in [
        (
            small,
            "small",
            "raise the learning rate (or the layer's: its updates barely move it); about 1e-3 of the weights per step is typical",
        ),
        (
            large,
            "large",
            "lower the learning rate or clip the gradients (grad_regularize::Clipped); about 1e-3 of the weights per step is typical",
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        out.push(Finding {
            kind: FindingKind::UpdateRatio,
            severity: Severity::Info,
            evidence: format!(
                "median update-to-weight ratio too {too} (outside [{lo:.0e}, {hi:.0e}]): {}",
                list.iter()
                    .map(|(n, m)| format!("{n} {m:.1e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            layers: list.into_iter().map(|(n, _)| n).collect(),
            steps: [recent[0].step, last.step],
            remedy: remedy.into(),
        });
    }
}

//! Gradient noise from the k micro-batch gradients of one step: the simple noise scale
//! `B_simple = tr(Σ) / |G|²` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
//! Training", Appendix A) and each layer's gradient signal-to-noise ratio.
//!
//! With micro-batch gradients `g_1 … g_k`, each the mean over `b` samples, the only statistics
//! needed per parameter are `A = Σ_i |g_i|²` and `C = |Σ_i g_i|²`. Since
//! `E|g_i|² = |G|² + tr(Σ)/b` and `E|ḡ|² = |G|² + tr(Σ)/(kb)`, the two-batch-size estimator of
//! the paper (small batch `b`, big batch `kb`) gives unbiased
//!
//! - `noise = (A − C/k) / (k − 1)`: the expected `|g_i − G|²`, a micro-batch gradient's noise;
//! - `tr(Σ) = b · noise`: the per-sample gradient covariance's trace;
//! - `|G|² = C/k² − noise/k`: the true gradient's squared norm.
//!
//! The fused CPU kernel reads every micro-batch gradient exactly once, in lockstep, and
//! writes nothing; other devices compute `A` and `C` with candle reductions and read them back
//! as one tensor.

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use grad_core::cpu::{
    Float, FloatFn, INLINE_MAX, LANES, Real, chunk_ranges, dispatch, storage_slice, with_avx2,
};
use grad_core::device::{Path, read_back, wide_dtype};
use rayon::prelude::*;

use crate::detect::{DetectorConfig, Finding, FindingKind, Severity};
use crate::error::{Error, Result};
use crate::record::{LayerNoise, NoiseRecord};
use crate::remedy::Remedy;

/// Per parameter, the micro-batch gradients (empty when no micro-batch reached it).
pub(crate) type Gathered = Vec<Vec<Tensor>>;

/// Each parameter's gradient from every store, checked: a parameter has a gradient in all of
/// them or in none, always of the variable's shape and dtype.
pub(crate) fn gather(
    names: &[&str],
    vars: &[candle_core::Var],
    stores: &[GradStore],
) -> Result<Gathered> {
    if stores.len() < 2 {
        return Err(Error::Core(grad_core::Error::InvalidHyperParameter {
            name: "micro_batches",
            value: stores.len() as f64,
            allowed: "at least 2 gradient stores",
        }));
    }
    names
        .iter()
        .zip(vars)
        .map(|(name, var)| {
            let grads: Vec<Option<&Tensor>> =
                stores.iter().map(|s| s.get(var.as_tensor())).collect();
            if grads.iter().all(Option::is_none) {
                return Ok(Vec::new());
            }
            grads
                .into_iter()
                .enumerate()
                .map(|(i, g)| {
                    let g = g.ok_or_else(|| {
                        Error::Core(grad_core::Error::ShapeMismatch {
                            op: "gradient_noise",
                            arg: format!("{name} in micro-batch {i}"),
                            expected: "a gradient, as in the other micro-batches".into(),
                            got: Vec::new(),
                        })
                    })?;
                    if g.dims() != var.dims() || g.dtype() != var.dtype() {
                        return Err(Error::Core(grad_core::Error::ShapeMismatch {
                            op: "gradient_noise",
                            arg: format!("{name} in micro-batch {i}"),
                            expected: format!(
                                "{:?} {:?} (the variable's)",
                                var.dims(),
                                var.dtype()
                            ),
                            got: g.dims().to_vec(),
                        }));
                    }
                    Ok(g.contiguous()?)
                })
                .collect()
        })
        .collect()
}

/// Per parameter, `(Σ_i |g_i|², |Σ_i g_i|²)`; `None` for a parameter with no gradient.
pub(crate) fn sums(gathered: &Gathered) -> Result<Vec<Option<(f64, f64)>>> {
    let device = gathered.iter().flatten().next().map(Tensor::device);
    let sums = match device.map(Path::of) {
        Some(Path::Fused) => fused(gathered)?,
        Some(Path::Composed) => composed(gathered)?,
        None => vec![(0.0, 0.0); gathered.len()],
    };
    Ok(sums
        .into_iter()
        .zip(gathered)
        .map(|(s, gs)| (!gs.is_empty()).then_some(s))
        .collect())
}

/// `(Σ_i Σ_j x_ij², Σ_j (Σ_i x_ij)²)` over elements `start..end` of the slices: each slice
/// read once, 16 elements of every slice at a time, their sum kept in registers. The sums of
/// squares run in the element's accumulator type (f32 for f32) over blocks of 512 elements (at
/// most 32 terms per lane and slice), each block's total added in f64; the squared sums in f64.
#[inline(always)]
fn lockstep<T: Float>(slices: &[&[T]], start: usize, end: usize) -> (f64, f64) {
    const BLOCK: usize = 512;
    let zero = <T::Acc as Real>::ZERO;
    let (mut sq, mut ss) = (0.0, [0f64; LANES]);
    let mut a = start;
    while a < end {
        let b = (a + BLOCK).min(end);
        let mut lanes = [zero; LANES];
        let mut j = a;
        while j + LANES <= b {
            let mut total = [zero; LANES];
            for s in slices {
                let xs = &s[j..j + LANES];
                for ((lane, t), x) in lanes.iter_mut().zip(&mut total).zip(xs) {
                    let v = x.to_acc();
                    *lane += v * v;
                    *t += v;
                }
            }
            for (w, t) in ss.iter_mut().zip(total) {
                *w += t.f64() * t.f64();
            }
            j += LANES;
        }
        for (k, w) in (j..b).zip(ss.iter_mut()) {
            let mut t = zero;
            for s in slices {
                let v = s[k].to_acc();
                lanes[0] += v * v;
                t += v;
            }
            *w += t.f64() * t.f64();
        }
        sq += lanes.iter().map(|l| l.f64()).sum::<f64>();
        a = b;
    }
    (sq, ss.iter().sum())
}

/// One parameter's micro-batch gradients, typed by [`dispatch`]: its chunks in parallel when
/// it is large, summed in chunk order.
struct Lockstep<'a>(&'a [Tensor]);

impl FloatFn for Lockstep<'_> {
    type Output = (f64, f64);

    fn call<T: Float>(self) -> grad_core::Result<(f64, f64)> {
        let guards: Vec<_> = self.0.iter().map(Tensor::storage_and_layout).collect();
        let slices = guards
            .iter()
            .map(|(s, l)| storage_slice::<T>(s, l))
            .collect::<grad_core::Result<Vec<_>>>()?;
        let len = slices.first().map_or(0, |s| s.len());
        let ranges: Vec<(usize, usize)> = chunk_ranges(len).collect();
        let run = |&(a, b): &(usize, usize)| {
            with_avx2(
                #[inline(always)]
                || lockstep(&slices, a, b),
            )
        };
        let parts: Vec<(f64, f64)> = if len * slices.len() <= INLINE_MAX {
            ranges.iter().map(run).collect()
        } else {
            ranges.par_iter().map(run).collect()
        };
        Ok(parts
            .into_iter()
            .fold((0.0, 0.0), |(x, y), (a, b)| (x + a, y + b)))
    }
}

fn fused(gathered: &Gathered) -> Result<Vec<(f64, f64)>> {
    let one = |gs: &Vec<Tensor>| match gs.first() {
        Some(g) => dispatch("gradient_noise", g.dtype(), Lockstep(gs)),
        None => Ok((0.0, 0.0)),
    };
    let total: usize = gathered.iter().flatten().map(Tensor::elem_count).sum();
    Ok(if total <= INLINE_MAX {
        gathered.iter().map(one).collect::<grad_core::Result<_>>()?
    } else {
        gathered
            .par_iter()
            .map(one)
            .collect::<grad_core::Result<_>>()?
    })
}

fn composed(gathered: &Gathered) -> Result<Vec<(f64, f64)>> {
    let mut parts = Vec::new();
    for gs in gathered.iter().filter(|gs| !gs.is_empty()) {
        let dtype = wide_dtype(gs[0].device());
        let wide = gs
            .iter()
            .map(|g| g.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let squares = wide
            .iter()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        parts.push(Tensor::stack(&squares, 0)?.sum_all()?);
        let mut total = wide[0].clone();
        for g in &wide[1..] {
            total = (total + g)?;
        }
        parts.push(total.sqr()?.sum_all()?);
    }
    let values = if parts.is_empty() {
        Vec::new()
    } else {
        read_back(&Tensor::stack(&parts, 0)?)?
    };
    let mut values = values.chunks_exact(2);
    Ok(gathered
        .iter()
        .map(|gs| {
            if gs.is_empty() {
                (0.0, 0.0)
            } else {
                values.next().map_or((0.0, 0.0), |v| (v[0], v[1]))
            }
        })
        .collect())
}

/// The estimates of one group of parameters from its `(A, C)` sums.
fn estimate(a: f64, c: f64, k: usize, b: usize) -> (f64, f64) {
    let (kf, bf) = (k as f64, b as f64);
    let noise = (a - c / kf) / (kf - 1.0);
    let gradient_sq = c / (kf * kf) - noise / kf;
    (gradient_sq, bf * noise)
}

/// The step's record from the per-parameter sums, each parameter in layer `layer_of[p]`.
pub(crate) fn record(
    sums: &[Option<(f64, f64)>],
    layer_of: &[usize],
    layers: &[String],
    k: usize,
    micro_batch_size: usize,
) -> NoiseRecord {
    let mut per_layer = vec![(0.0, 0.0, false); layers.len()];
    for (sum, &l) in sums.iter().zip(layer_of) {
        let Some((a, c)) = *sum else { continue };
        let slot = &mut per_layer[l];
        slot.0 += a;
        slot.1 += c;
        slot.2 = true;
    }
    let (total_a, total_c) = sums
        .iter()
        .flatten()
        .fold((0.0, 0.0), |(x, y), (a, c)| (x + a, y + c));
    let (gradient_sq, trace) = estimate(total_a, total_c, k, micro_batch_size);
    NoiseRecord {
        micro_batches: k,
        micro_batch_size,
        gradient_sq,
        trace,
        simple_noise_scale: noise_scale(trace, gradient_sq),
        layers: layers
            .iter()
            .zip(per_layer)
            .filter(|(_, (_, _, seen))| *seen)
            .map(|(name, (a, c, _))| {
                let (gradient_sq, trace) = estimate(a, c, k, micro_batch_size);
                LayerNoise {
                    name: name.clone(),
                    gradient_sq,
                    trace,
                    snr: snr(gradient_sq, trace / micro_batch_size as f64),
                }
            })
            .collect(),
    }
}

/// `tr(Σ) / |G|²`; infinite when the estimate of `|G|²` is not positive (the noise explains
/// all of the gradient), NaN when either is.
fn noise_scale(trace: f64, gradient_sq: f64) -> f64 {
    if trace.is_nan() || gradient_sq.is_nan() {
        f64::NAN
    } else if gradient_sq > 0.0 {
        trace / gradient_sq
    } else {
        f64::INFINITY
    }
}

/// `max(|G|², 0) / noise`: 0 when the noise explains all of the gradient, infinite when there
/// is no noise at all, NaN when either is.
fn snr(gradient_sq: f64, noise: f64) -> f64 {
    if gradient_sq.is_nan() || noise.is_nan() {
        return f64::NAN;
    }
    let signal = gradient_sq.max(0.0);
    if noise > 0.0 {
        signal / noise
    } else if signal > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The mean of the micro-batch gradients, as one store for the optimizer's step.
pub(crate) fn mean(gathered: &Gathered, vars: &[candle_core::Var]) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (gs, var) in gathered.iter().zip(vars) {
        let Some(first) = gs.first() else { continue };
        let mut total = first.clone();
        for g in &gs[1..] {
            total = (total + g)?;
        }
        store.insert(var.as_tensor(), total.affine(1.0 / gs.len() as f64, 0.0)?);
    }
    Ok(store)
}

/// The detectors' state for the noise records of a run: the batch size against the noise
/// scale, and the layers whose signal-to-noise ratio stays low. Bounded memory: running sums
/// for the scale, counts per layer.
#[derive(Debug, Clone, Default)]
pub(crate) struct NoiseFindings {
    steps: Option<[u64; 2]>,
    /// Noise observations, and the sums of their `tr(Σ)` and `|G|²` estimates: the run's noise
    /// scale is the ratio of the means (McCandlish et al. average both before dividing; the
    /// ratio of one step's estimates is noisy and biased).
    observations: usize,
    trace: f64,
    gradient_sq: f64,
    /// The last observation's batch, `k·b`.
    batch: usize,
    /// Per layer in first-seen order: observations, those below the threshold, the lowest
    /// ratio and the steps it was below.
    layers: Vec<LayerTally>,
}

#[derive(Debug, Clone)]
struct LayerTally {
    name: String,
    observations: usize,
    below: usize,
    lowest: f64,
    steps: Option<[u64; 2]>,
}

impl NoiseFindings {
    pub(crate) fn observe(&mut self, step: u64, noise: &NoiseRecord, config: &DetectorConfig) {
        self.steps = Some(self.steps.map_or([step, step], |[a, _]| [a, step]));
        self.observations += 1;
        self.trace += noise.trace;
        self.gradient_sq += noise.gradient_sq;
        self.batch = noise.micro_batches * noise.micro_batch_size;
        for l in &noise.layers {
            let i = match self.layers.iter().position(|t| t.name == l.name) {
                Some(i) => i,
                None => {
                    self.layers.push(LayerTally {
                        name: l.name.clone(),
                        observations: 0,
                        below: 0,
                        lowest: f64::INFINITY,
                        steps: None,
                    });
                    self.layers.len() - 1
                }
            };
            let t = &mut self.layers[i];
            t.observations += 1;
            if l.snr < config.low_snr {
                t.below += 1;
                t.lowest = t.lowest.min(l.snr);
                t.steps = Some(t.steps.map_or([step, step], |[a, _]| [a, step]));
            }
        }
    }

    pub(crate) fn finding(&self, config: &DetectorConfig, out: &mut Vec<Finding>) {
        let Some(steps) = self.steps else { return };
        let n = self.observations;
        if n >= config.patience {
            let scale = noise_scale(self.trace, self.gradient_sq);
            let batch = self.batch;
            if scale > config.noise_scale_ratio * batch as f64 {
                let remedies = vec![Remedy::LargerBatch];
                out.push(Finding {
                    kind: FindingKind::NoiseScale,
                    severity: Severity::Info,
                    layers: Vec::new(),
                    evidence: format!(
                        "the simple noise scale B_simple over {n} steps (the mean tr(Σ) over the mean |G|²) is {scale:.4e}, more than {}x the batch of {batch}: larger batches would cut the gradient noise nearly for free per sample",
                        config.noise_scale_ratio
                    ),
                    steps,
                    peak: Some(scale),
                    remedy: Remedy::render_all(&remedies),
                    remedies,
                });
            }
        }
        let low: Vec<&LayerTally> = self
            .layers
            .iter()
            .filter(|t| t.observations >= config.patience && 2 * t.below > t.observations)
            .collect();
        if let Some(first) = low.first() {
            let remedies = vec![Remedy::LargerBatch, Remedy::LowerLearningRate];
            let detail: Vec<String> = low
                .iter()
                .map(|t| {
                    format!(
                        "{} below in {} of {} (lowest {:.3e})",
                        t.name, t.below, t.observations, t.lowest
                    )
                })
                .collect();
            let lowest = low.iter().map(|t| t.lowest).fold(f64::INFINITY, f64::min);
            let span = low
                .iter()
                .filter_map(|t| t.steps)
                .fold(first.steps.unwrap_or(steps), |[a, b], [c, d]| {
                    [a.min(c), b.max(d)]
                });
            out.push(Finding {
                kind: FindingKind::LowSignalToNoise,
                severity: Severity::Info,
                layers: low.iter().map(|t| t.name.clone()).collect(),
                evidence: format!(
                    "the gradient signal-to-noise ratio across micro-batches stays below {} in most observations: {}; these layers' updates are mostly noise",
                    config.low_snr,
                    detail.join(", ")
                ),
                steps: span,
                peak: Some(lowest),
                remedy: Remedy::render_all(&remedies),
                remedies,
            });
        }
    }
}

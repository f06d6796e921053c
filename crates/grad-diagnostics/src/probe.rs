//! Activation probes: a pass-through module recording what flows forward and backward at a
//! point of the network.
//!
//! candle keeps no activation gradients and has no hooks (candle issue #2774). A [`Probe`]
//! inserted after a layer returns its input unchanged and, while enabled, records in the
//! forward pass the mean, standard deviation, fraction at or below zero, saturated fraction and
//! which units were positive; its output goes through a custom op whose backward records the
//! norm of the gradient arriving at that point before passing it on untouched. Disabled, a
//! probe costs one atomic flag check. Probes are `Clone` (clones share state) and thread-safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};
use grad_core::cpu::sum_by;
use grad_core::cpu::{CHUNK, INLINE_MAX, cpu_slice, par_map};
use grad_core::cpu::{Float, FloatFn, dispatch, dispatch_op, with_avx2};
use grad_core::device::Path;
use rayon::prelude::*;

use crate::Result;
use crate::record::{ProbeKind, ProbeStats};
use crate::stats::{Moments, chunk_moments};

/// A pass-through module that records activation and gradient statistics.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use gradkit::diagnostics::{Probe, ProbeKind};
/// let probe = Probe::new("layer.0", ProbeKind::Relu, 4);
/// let x = Var::new(&[[1f32, -2.0], [3.0, -4.0]], &Device::Cpu)?;
/// let y = probe.forward(&x.as_tensor().relu()?)?;
/// y.sum_all()?.backward()?;
/// let s = probe.stats();
/// assert_eq!(s.nonpositive_fraction, 0.5);
/// assert_eq!(s.grad_norm, Some(2.0)); // sqrt of four ones
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Probe {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    kind: ProbeKind,
    window: u64,
    enabled: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    forwards: u64,
    last: Option<Activation>,
    /// Per unit, the forward count at which it was last positive (0 = never).
    last_positive: Vec<u64>,
    grad_norm: Option<f64>,
    /// The composed path's statistics, still on the device until [`Probe::stats`] reads them.
    pending: Pending,
}

/// What the composed path keeps on the device between reads.
#[derive(Debug, Default)]
struct Pending {
    /// The last forward's `[moments row, non-positive count, saturated count]`.
    activation: Option<Tensor>,
    /// Per unit, the forward count at which it was last positive, in the wide dtype.
    last_positive: Option<Tensor>,
    /// The L2 norm of the last gradient through the tap, rank 0.
    grad_norm: Option<Tensor>,
}

/// One forward's activation statistics.
#[derive(Debug, Clone, Copy)]
struct Activation {
    mean: f64,
    std: f64,
    nonpositive: f64,
    saturated: Option<f64>,
}

impl Probe {
    /// A probe called `name` after an activation of `kind`; a unit counts as dead when it is not
    /// positive once in `window` forward passes.
    pub fn new(name: impl Into<String>, kind: ProbeKind, window: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                kind,
                window: window.max(1),
                enabled: AtomicBool::new(true),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The probe's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Starts or stops recording (a disabled probe is one flag check per forward).
    pub fn set_enabled(&self, enabled: bool) {
        self.inner.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether the probe records.
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// The statistics recorded so far. After forwards on the composed path (a GPU), this reads
    /// their statistics back: one small tensor.
    ///
    /// # Errors
    /// A candle error reading the composed path's statistics from the device.
    pub fn try_stats(&self) -> Result<ProbeStats> {
        let inner = &self.inner;
        let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
        settle(&mut state, inner.kind)?;
        Ok(summarise(inner, &state))
    }

    /// [`try_stats`](Self::try_stats), with statistics that could not be read from the device
    /// reported as NaN rather than failing the caller.
    pub fn stats(&self) -> ProbeStats {
        self.try_stats().unwrap_or_else(|_| {
            let state = self
                .inner
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut s = summarise(&self.inner, &state);
            s.mean = f64::NAN;
            s.std = f64::NAN;
            s.grad_norm = s.grad_norm.map(|_| f64::NAN);
            s
        })
    }
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// On the CPU one read of the activation gives its statistics; on the composed path (other
    /// devices) candle reductions compute them on the device, where they stay until
    /// [`stats`](Self::stats) reads them. Either way the output passes through a gradient tap
    /// when the input takes part in autograd.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) for a non-float input.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_enabled() {
            return Ok(x.clone());
        }
        grad_core::validate::ensure_float("probe", "input", x.dtype())?;
        let (units, spatial) = units_of(x);
        let x = x.contiguous()?;
        match Path::of(x.device()) {
            Path::Fused => self.record_fused(&x, units, spatial)?,
            Path::Composed => self.record_composed(&x, units, spatial)?,
        }
        if x.track_op() {
            Ok(x.apply_op1(GradTap(self.inner.clone()))?)
        } else {
            Ok(x)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record_fused(&self, x: &Tensor, units: usize, spatial: usize) -> Result<()> {
        let scan = scan(x, self.inner.kind, units, spatial)?;
        let m = scan.moments;
        let mut state = self.lock();
        settle(&mut state, self.inner.kind)?;
        state.forwards += 1;
        let now = state.forwards;
        if state.last_positive.len() != units {
            state.last_positive = vec![0; units];
        }
        for (seen, positive) in state.last_positive.iter_mut().zip(&scan.positive) {
            if *positive != 0 {
                *seen = now;
            }
        }
        let n = m.count.max(1.0);
        state.last = Some(Activation {
            mean: m.mean,
            std: m.std(),
            nonpositive: scan.nonpositive as f64 / n,
            saturated: matches!(self.inner.kind, ProbeKind::Tanh | ProbeKind::Sigmoid)
                .then(|| scan.saturated as f64 / n),
        });
        Ok(())
    }

    /// The same statistics with candle reductions on `x`'s device, kept there.
    fn record_composed(&self, x: &Tensor, units: usize, spatial: usize) -> Result<()> {
        let device = x.device();
        let wide = grad_core::device::wide_dtype(device);
        let count =
            |mask: Tensor| -> Result<Tensor> { Ok(mask.to_dtype(wide)?.sum_all()?.reshape(1)?) };
        let nonpositive = count(x.le(0.0)?)?;
        let saturated = match self.inner.kind {
            ProbeKind::Tanh => count(x.abs()?.gt(0.99)?)?,
            ProbeKind::Sigmoid => {
                // Outside [0.01, 0.99], NaN included (as on the fused path).
                let inside = (x.ge(0.01)?.to_dtype(wide)? * x.le(0.99)?.to_dtype(wide)?)?;
                let n = grad_core::device::scalar(x.elem_count() as f64, wide, device)?;
                (n - inside.sum_all()?)?.reshape(1)?
            }
            ProbeKind::Relu | ProbeKind::Linear => Tensor::zeros(1, wide, device)?,
        };
        let row = Tensor::cat(&[crate::stats::moment_row(x)?, nonpositive, saturated], 0)?;
        let samples = if x.rank() >= 2 { x.dims()[0] } else { 1 };
        let positive = x
            .gt(0.0)?
            .to_dtype(wide)?
            .reshape((samples, units, spatial))?
            .max(2)?
            .max(0)?;
        let mut state = self.lock();
        state.forwards += 1;
        #[allow(
            clippy::cast_precision_loss,
            reason = "forward counts are far below 2^52"
        )]
        let now = grad_core::device::scalar(state.forwards as f64, wide, device)?;
        let previous = match state.pending.last_positive.take() {
            Some(p) if p.elem_count() == units => p,
            _ => Tensor::zeros(units, wide, device)?,
        };
        let seen = positive
            .ne(0.0)?
            .where_cond(&now.broadcast_as(units)?, &previous)?;
        state.pending.last_positive = Some(seen);
        state.pending.activation = Some(row);
        Ok(())
    }
}

/// Reads the composed path's pending statistics (one transfer) into the host state.
fn settle(state: &mut State, kind: ProbeKind) -> Result<()> {
    let pending = std::mem::take(&mut state.pending);
    let Pending {
        activation,
        last_positive,
        grad_norm,
    } = pending;
    let mut parts = Vec::new();
    parts.extend(activation.clone());
    parts.extend(grad_norm.as_ref().map(|g| g.reshape(1)).transpose()?);
    parts.extend(last_positive.clone());
    if parts.is_empty() {
        return Ok(());
    }
    let values = grad_core::device::read_back(&Tensor::cat(&parts, 0)?)?;
    let mut rest = values.as_slice();
    if activation.is_some() {
        let (row, tail) = rest.split_at(ACTIVATION_ROW);
        rest = tail;
        let m = crate::stats::moments_of_row(row);
        let n = m.count.max(1.0);
        state.last = Some(Activation {
            mean: m.mean,
            std: m.std(),
            nonpositive: row[8] / n,
            saturated: matches!(kind, ProbeKind::Tanh | ProbeKind::Sigmoid).then(|| row[9] / n),
        });
    }
    if grad_norm.is_some() {
        state.grad_norm = rest.first().copied();
        rest = rest.get(1..).unwrap_or_default();
    }
    if last_positive.is_some() {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "forward counts"
        )]
        let seen: Vec<u64> = rest.iter().map(|&v| v as u64).collect();
        state.last_positive = seen;
        // Keep the device copy: later forwards continue from it.
        state.pending.last_positive = last_positive;
    }
    Ok(())
}

/// The moments row (8) plus the non-positive and saturated counts.
const ACTIVATION_ROW: usize = 10;

fn summarise(inner: &Inner, state: &State) -> ProbeStats {
    let last = state.last.unwrap_or(Activation {
        mean: 0.0,
        std: 0.0,
        nonpositive: 0.0,
        saturated: None,
    });
    let dead_fraction = (inner.kind == ProbeKind::Relu
        && state.forwards >= inner.window
        && !state.last_positive.is_empty())
    .then(|| {
        let dead = state
            .last_positive
            .iter()
            .filter(|&&seen| seen == 0 || state.forwards - seen >= inner.window)
            .count();
        dead as f64 / state.last_positive.len() as f64
    });
    let inactive_fraction =
        (inner.kind == ProbeKind::Relu && state.forwards > 0 && !state.last_positive.is_empty())
            .then(|| {
                let inactive = state
                    .last_positive
                    .iter()
                    .filter(|&&seen| seen != state.forwards)
                    .count();
                inactive as f64 / state.last_positive.len() as f64
            });
    ProbeStats {
        name: inner.name.clone(),
        kind: inner.kind,
        units: state.last_positive.len(),
        mean: last.mean,
        std: last.std,
        nonpositive_fraction: last.nonpositive,
        dead_fraction,
        inactive_fraction,
        saturated_fraction: last.saturated,
        grad_norm: state.grad_norm,
        forwards: state.forwards,
    }
}

impl Module for Probe {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}

/// `(units, elements per unit and sample)`: units are dim 1 (channels/features) for rank >= 2.
fn units_of(x: &Tensor) -> (usize, usize) {
    match x.rank() {
        0 => (1, 1),
        1 => (x.elem_count(), 1),
        _ => (x.dims()[1], x.dims()[2..].iter().product()),
    }
}

/// What one read of an activation counts.
struct Scan {
    moments: Moments,
    nonpositive: u64,
    saturated: u64,
    /// Per unit, whether any of its elements was positive (0 or 1).
    positive: Vec<u8>,
}

impl Scan {
    fn empty(units: usize) -> Self {
        Self {
            moments: Moments::default(),
            nonpositive: 0,
            saturated: 0,
            positive: vec![0; units],
        }
    }

    fn merge(mut self, other: Self) -> Self {
        self.moments = self.moments.merge(other.moments);
        self.nonpositive += other.nonpositive;
        self.saturated += other.saturated;
        for (p, q) in self.positive.iter_mut().zip(other.positive) {
            *p |= q;
        }
        self
    }
}

/// One block of whole rows (`row = units * spatial` elements each), read from cache: its
/// moments, then the sign and saturation counts.
#[inline(always)]
fn scan_block<T: Float>(block: &[T], kind: ProbeKind, units: usize, spatial: usize) -> Scan {
    let mut s = Scan::empty(units);
    s.moments = chunk_moments(block);
    if spatial == 1 {
        for row in block.chunks(units) {
            for (p, v) in s.positive.iter_mut().zip(row) {
                *p |= u8::from(v.as_f64() > 0.0);
            }
        }
    } else {
        for row in block.chunks(units * spatial) {
            for (p, plane) in s.positive.iter_mut().zip(row.chunks(spatial)) {
                *p |= u8::from(plane.iter().any(|v| v.as_f64() > 0.0));
            }
        }
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an exact count below 2^53"
    )]
    let positive = sum_by(block, |v| if v > 0.0 { 1.0 } else { 0.0 }) as u64;
    // NaN is neither positive nor at most zero.
    s.nonpositive = block.len() as u64 - positive - s.moments.nan;
    s.saturated = match kind {
        ProbeKind::Tanh => block
            .iter()
            .map(|v| u64::from(v.as_f64().abs() > 0.99))
            .sum(),
        ProbeKind::Sigmoid => block
            .iter()
            .map(|v| u64::from(!(0.01..=0.99).contains(&v.as_f64())))
            .sum(),
        ProbeKind::Relu | ProbeKind::Linear => 0,
    };
    s
}

/// Moments, sign counts and per-unit positivity of `x` in one parallel read, in blocks of
/// whole rows merged in order (independent of the thread count). `x` is a contiguous CPU tensor.
fn scan(x: &Tensor, kind: ProbeKind, units: usize, spatial: usize) -> Result<Scan> {
    struct Run<'a> {
        x: &'a Tensor,
        kind: ProbeKind,
        units: usize,
        spatial: usize,
    }
    impl FloatFn for Run<'_> {
        type Output = Scan;
        fn call<T: Float>(self) -> grad_core::Result<Scan> {
            let (storage, layout) = self.x.storage_and_layout();
            let data = grad_core::cpu::storage_slice::<T>(&storage, layout)?;
            let (units, spatial, kind) = (self.units, self.spatial, self.kind);
            let row = (units * spatial).max(1);
            let block = (CHUNK / row).max(1) * row;
            let run = |b: &[T]| {
                with_avx2(
                    #[inline(always)]
                    || scan_block(b, kind, units, spatial),
                )
            };
            let parts: Vec<Scan> = if data.len() <= INLINE_MAX {
                data.chunks(block).map(run).collect()
            } else {
                data.par_chunks(block).map(run).collect()
            };
            Ok(parts.into_iter().fold(Scan::empty(units), Scan::merge))
        }
    }
    Ok(dispatch(
        "probe",
        x.dtype(),
        Run {
            x,
            kind,
            units,
            spatial,
        },
    )?)
}

/// Identity in the forward; its backward records the arriving gradient's norm.
#[derive(Debug)]
struct GradTap(Arc<Inner>);

struct Copy<'a>(&'a CpuStorage, &'a Layout);

impl FloatFn for Copy<'_> {
    type Output = CpuStorage;
    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let x = cpu_slice::<T>(self.0, self.1)?;
        Ok(T::to_cpu_storage_owned(par_map(x, |v| v)))
    }
}

impl CustomOp1 for GradTap {
    fn name(&self) -> &'static str {
        "gradkit-probe"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_op(self.name(), s.dtype(), Copy(s, l))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_storage(s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        copy_storage(s, l)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        if Path::of(grad.device()) == Path::Fused {
            let norm = grad_core::global_norm(std::slice::from_ref(grad), grad_core::NormType::L2)
                .map_err(candle_core::Error::from)?;
            state.grad_norm = Some(norm);
            state.pending.grad_norm = None;
        } else {
            // Kept on the device until the statistics are read.
            let wide = grad_core::device::wide_dtype(grad.device());
            state.pending.grad_norm = Some(grad.to_dtype(wide)?.sqr()?.sum_all()?.sqrt()?);
        }
        Ok(Some(grad.clone()))
    }
}

/// The tap's forward on any backend: a copy of the input's logical elements into a fresh
/// contiguous storage of the same device (what CUDA and Metal run; CPU has its parallel copy,
/// and tests this one on CPU storage).
#[cfg_attr(
    not(any(feature = "cuda", feature = "metal")),
    allow(dead_code, reason = "only the GPU backends and the unit test call it")
)]
fn copy_storage<S>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, l.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_probes_record_nothing_and_pass_through() -> Result<()> {
        let p = Probe::new("p", ProbeKind::Tanh, 2);
        p.set_enabled(false);
        let x = Tensor::new(&[0.5f32, 0.999], &candle_core::Device::Cpu)?;
        let y = p.try_forward(&x)?;
        assert_eq!(y.to_vec1::<f32>()?, [0.5, 0.999]);
        assert_eq!(p.stats().forwards, 0);
        p.set_enabled(true);
        p.try_forward(&x.to_dtype(candle_core::DType::F64)?)?;
        assert_eq!(p.stats().saturated_fraction, Some(0.5));
        Ok(())
    }

    #[test]
    fn the_generic_tap_copy_reads_strided_and_offset_layouts() -> Result<()> {
        let base = Tensor::arange(0f32, 24.0, &candle_core::Device::Cpu)?.reshape((4, 6))?;
        let view = base.narrow(0, 1, 2)?.narrow(1, 2, 3)?.t()?;
        let (storage, layout) = view.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            unreachable!("a CPU tensor")
        };
        let (copy, shape) = copy_storage(cpu, layout)?;
        assert_eq!(shape.dims(), [3, 2]);
        let CpuStorage::F32(values) = copy else {
            unreachable!("f32 in, f32 out")
        };
        assert_eq!(values, view.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

//! Layer-sequential unit-variance initialisation (Mishkin & Matas 2015, "All you need is a good
//! init").
//!
//! Starting from orthogonal weights, each layer in network order is rescaled until the variance
//! of its output on a batch of real data is 1 within a tolerance: `W <- W / sqrt(Var(out))`,
//! repeated up to a maximum number of times (the output of later layers depends on earlier ones,
//! so layers are visited in order). Neither PyTorch, burn nor candle ship it in core.
//!
//! candle has no forward hooks, so the caller supplies `output_of(i, batch)`: the output of layer
//! `i` (before its nonlinearity) for the batch — typically the model run up to that layer.

use candle_core::{Tensor, Var};
use grad_core::Philox;
use grad_core::device::{read_back_scalar, wide_dtype};
use serde::{Deserialize, Serialize};

use crate::init::Initializer;
use crate::{Error, Result};

/// Settings of [`lsuv`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LsuvConfig {
    /// Accept a layer when `|Var(out) - 1| < tol`. Default: 0.1 (the paper's `Tol_var`).
    pub tol: f64,
    /// Rescaling rounds per layer at most. Default: 10 (the paper's `T_max`).
    pub max_iters: usize,
    /// Start from orthogonal weights (the paper's first step). Default: true.
    pub orthogonal: bool,
}

impl Default for LsuvConfig {
    fn default() -> Self {
        Self {
            tol: 0.1,
            max_iters: 10,
            orthogonal: true,
        }
    }
}

/// What LSUV did to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LsuvLayer {
    /// The output variance before rescaling.
    pub initial_variance: f64,
    /// The output variance after the last round.
    pub variance: f64,
    /// Rescaling rounds applied.
    pub iterations: usize,
    /// Whether the variance ended within the tolerance.
    pub converged: bool,
}

/// Runs LSUV on `weights` (in network order), measuring each layer's output on `batch` through
/// `output_of(i, batch)`.
///
/// # Errors
/// [`Error::Core`] for a `tol` that is not positive and finite or `max_iters` of 0;
/// [`Error::DegenerateVariance`] when a layer's output has zero or non-finite variance;
/// candle's error from `output_of`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use gradkit::core::Philox;
/// use gradkit::layers::lsuv::{LsuvConfig, lsuv};
/// let mut rng = Philox::new(0);
/// let mut weights = Vec::new();
/// for _ in 0..3 {
///     let w = rng.normal((32, 32), 0.0, 1.0, DType::F32, &Device::Cpu)?;
///     weights.push(Var::from_tensor(&w)?);
/// }
/// let batch = rng.normal((256, 32), 0.0, 1.0, DType::F32, &Device::Cpu)?;
/// let output_of = |i: usize, x: &Tensor| -> candle_core::Result<Tensor> {
///     let mut h = x.clone();
///     for (k, w) in weights.iter().enumerate().take(i + 1) {
///         h = h.matmul(&w.as_tensor().t()?)?;
///         if k < i { h = h.tanh()?; }
///     }
///     Ok(h)
/// };
/// let report = lsuv(&weights, &batch, &LsuvConfig::default(), &mut rng, output_of)?;
/// assert!(report.iter().all(|layer| layer.converged));
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn lsuv(
    weights: &[Var],
    batch: &Tensor,
    config: &LsuvConfig,
    rng: &mut Philox,
    output_of: impl Fn(usize, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<LsuvLayer>> {
    grad_core::validate::positive("tol", config.tol)?;
    grad_core::validate::at_least_one("max_iters", config.max_iters)?;
    if config.orthogonal {
        for w in weights {
            Initializer::Orthogonal { gain: 1.0 }.init_var(w, rng)?;
        }
    }
    let variance = |i: usize| -> Result<f64> {
        // Two passes on the output's device, one number read back per iteration.
        let out = output_of(i, batch)?;
        let out = out.to_dtype(wide_dtype(out.device()))?.flatten_all()?;
        let var = if out.elem_count() == 0 {
            f64::NAN
        } else {
            let centred = out.broadcast_sub(&out.mean_all()?)?;
            read_back_scalar(&centred.sqr()?.mean_all()?)?
        };
        if var.is_finite() && var > 0.0 {
            Ok(var)
        } else {
            Err(Error::DegenerateVariance {
                layer: i,
                variance: var,
            })
        }
    };
    let mut report = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let initial_variance = variance(i)?;
        let mut var = initial_variance;
        let mut iterations = 0;
        while (var - 1.0).abs() >= config.tol && iterations < config.max_iters {
            w.set(&w.as_tensor().affine(1.0 / var.sqrt(), 0.0)?)?;
            iterations += 1;
            var = variance(i)?;
        }
        report.push(LsuvLayer {
            initial_variance,
            variance: var,
            iterations,
            converged: (var - 1.0).abs() < config.tol,
        });
    }
    Ok(report)
}

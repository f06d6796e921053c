//! Weight reparameterisations as functions of their parameters: weight normalisation (Salimans
//! & Kingma 2016, PyTorch's `torch._weight_norm`), spectral normalisation (Miyato et al.
//! 2018, PyTorch's `parametrizations.spectral_norm`) and weight standardisation (Qiao et al.
//! 2019, timm's `StdConv2d`). Both work on weights, not activations, so
//! they are candle ops on any device (no fused kernel: a weight is read once per forward).

use candle_core::{D, Tensor};

use crate::{Error, Result};

/// `dim` of a rank-`rank` tensor, negative counting from the end (PyTorch's convention).
fn resolve_dim(dim: isize, rank: usize, op: &'static str) -> Result<usize> {
    let r = isize::try_from(rank).unwrap_or(isize::MAX);
    let d = if dim < 0 { dim + r } else { dim };
    usize::try_from(d)
        .ok()
        .filter(|&d| d < rank)
        .ok_or(Error::DimOutOfRange { op, dim, rank })
}

/// `||v||` over every dim but `dim`, kept as size-1 dims: the shape of weight normalisation's
/// `g`. `None` and, as in PyTorch's `norm_except_dim`, `Some(-1)` take one norm over the whole
/// tensor (PyTorch uses -1 for `dim=None`); other negative dims count from the end.
///
/// # Errors
/// [`Error::DimOutOfRange`] for a `dim` outside `v`'s rank; candle's errors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::ops::norm_except_dim;
/// let v = Tensor::new(&[[3f64, 4.0], [0.0, 1.0]], &Device::Cpu)?;
/// assert_eq!(norm_except_dim(&v, Some(0))?.to_vec2::<f64>()?, [[5.0], [1.0]]);
/// assert_eq!(norm_except_dim(&v, Some(-1))?.to_scalar::<f64>()?, 26f64.sqrt()); // PyTorch's -1
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn norm_except_dim(v: &Tensor, dim: Option<isize>) -> Result<Tensor> {
    let Some(dim) = dim.filter(|&d| d != -1) else {
        return Ok(v.sqr()?.sum_all()?.sqrt()?);
    };
    let keep = resolve_dim(dim, v.rank(), "weight_norm")?;
    let mut sq = v.sqr()?;
    for d in (0..v.rank()).filter(|&d| d != keep) {
        sq = sq.sum_keepdim(d)?;
    }
    Ok(sq.sqrt()?)
}

/// Weight normalisation: `w = g * v / ||v||`, the norm over every dim of `v` except `dim`, as
/// [`norm_except_dim`] takes it (`None` or -1: one norm over the whole tensor, PyTorch's
/// `_weight_norm`). Gradients reach `v` and `g` through autograd.
///
/// # Shapes
/// `v`: any rank ≥ 1; `g`: the norm's shape (`v`'s with size 1 in every dim but `dim`, `[]`
/// for the whole tensor), or any shape that broadcasts to `v` with the whole-tensor norm; the
/// result has `v`'s shape.
///
/// # Errors
/// [`Error::DimOutOfRange`] for `dim`; [`Error::Core`] when `g`'s shape is not the norm's.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let v = Tensor::new(&[[3f64, 4.0], [0.0, 2.0]], &Device::Cpu)?;
/// let g = Tensor::new(&[[10f64], [1.0]], &Device::Cpu)?;
/// let w = gradkit::layers::ops::weight_norm(&v, &g, Some(0))?;
/// assert_eq!(w.to_vec2::<f64>()?, [[6.0, 8.0], [0.0, 1.0]]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn weight_norm(v: &Tensor, g: &Tensor, dim: Option<isize>) -> Result<Tensor> {
    let norm = norm_except_dim(v, dim)?;
    let broadcasts = g.rank() == v.rank()
        && g.dims()
            .iter()
            .zip(v.dims())
            .all(|(a, b)| a == b || *a == 1);
    if g.dims() != norm.dims() && !(norm.rank() == 0 && broadcasts) {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            "weight_norm",
            "g",
            format!("{:?}", norm.dims()),
            g.dims(),
        )));
    }
    Ok(v.broadcast_mul(&g.broadcast_div(&norm)?)?)
}

/// The settings of one [`spectral_norm`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpectralNormStep {
    /// Power iterations to run in training (at least 1 then). PyTorch's default: 1.
    pub n_power_iterations: usize,
    /// The floor of a norm in the power iteration's normalisation. PyTorch's default: 1e-12.
    pub eps: f64,
    /// The output dim of the weight (moved to the front before flattening). Default: 0.
    pub dim: isize,
    /// Training runs the power iterations and returns updated `u`, `v`; evaluation uses them
    /// as given.
    pub training: bool,
}

impl Default for SpectralNormStep {
    fn default() -> Self {
        Self {
            n_power_iterations: 1,
            eps: 1e-12,
            dim: 0,
            training: true,
        }
    }
}

/// What [`spectral_norm`] returns.
#[derive(Debug, Clone)]
pub struct SpectralNormOutput {
    /// `weight / sigma`, differentiable with respect to `weight`.
    pub w: Tensor,
    /// The estimated largest singular value, `[]`.
    pub sigma: Tensor,
    /// The left singular vector estimate after the step, `[weight.dim(dim)]`: store it back.
    pub u: Tensor,
    /// The right singular vector estimate after the step: store it back.
    pub v: Tensor,
}

/// The lengths of spectral normalisation's `u` and `v` for `weight` with output dim `dim`
/// (negative counts from the end): `weight.dim(dim)` and the product of the other dims.
///
/// # Errors
/// [`Error::DimOutOfRange`] for `dim`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu)?;
/// assert_eq!(gradkit::layers::ops::power_vector_lengths(&w, 0)?, (4, 27));
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn power_vector_lengths(weight: &Tensor, dim: isize) -> Result<(usize, usize)> {
    let d = resolve_dim(dim, weight.rank(), "spectral_norm")?;
    let rows = weight.dim(d)?;
    Ok((rows, weight.elem_count() / rows.max(1)))
}

/// `a / max(||a||, eps)`.
fn normalize(a: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(a.broadcast_div(&a.sqr()?.sum_all()?.sqrt()?.maximum(eps)?)?)
}

/// Spectral normalisation: `w = weight / sigma`, with `sigma = u . (W v)` the power-iteration
/// estimate of `W`'s largest singular value, `W` being `weight` with `dim` moved to the front
/// and flattened to `[weight.dim(dim), -1]`. In training, each iteration first does
/// `u = normalize(W v)`, then `v = normalize(W^T u)` (PyTorch's `parametrizations` order; the
/// older `torch.nn.utils.spectral_norm` updated `v` first), with
/// `normalize(a) = a / max(||a||, eps)`. `u` and `v` are constants for autograd
/// (the gradient flows through `weight` and `sigma` only), as in PyTorch.
///
/// # Shapes
/// `weight`: any rank ≥ 1 (`dim` within it); `u`: `[weight.dim(dim)]`; `v`: the product of the
/// other dims (1 for a rank-1 weight).
///
/// # Errors
/// [`Error::DimOutOfRange`] for `dim`; [`Error::Core`] for `n_power_iterations` of 0 in
/// training, `eps` not positive and finite, or `u`/`v` of the wrong length.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::ops::{SpectralNormStep, spectral_norm};
/// let w = Tensor::new(&[[2f64, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// let u = Tensor::new(&[1f64, 0.0], &Device::Cpu)?;
/// let v = Tensor::new(&[1f64, 0.0], &Device::Cpu)?;
/// let out = spectral_norm(&w, &u, &v, SpectralNormStep::default())?;
/// assert_eq!(out.sigma.to_scalar::<f64>()?, 2.0);
/// assert_eq!(out.w.to_vec2::<f64>()?, [[1.0, 0.0], [0.0, 0.5]]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn spectral_norm(
    weight: &Tensor,
    u: &Tensor,
    v: &Tensor,
    step: SpectralNormStep,
) -> Result<SpectralNormOutput> {
    if step.training {
        grad_core::validate::at_least_one("n_power_iterations", step.n_power_iterations)?;
    }
    grad_core::validate::positive("eps", step.eps)?;
    let dim = resolve_dim(step.dim, weight.rank(), "spectral_norm")?;
    let rows = weight.dim(dim)?;
    let mut order = vec![dim];
    order.extend((0..weight.rank()).filter(|&d| d != dim));
    let w_mat = weight.permute(order)?.contiguous()?.reshape((rows, ()))?;
    let cols = w_mat.dim(1)?;
    for (name, t, len) in [("u", u, rows), ("v", v, cols)] {
        if t.dims() != [len] {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "spectral_norm",
                name,
                format!("[{len}]"),
                t.dims(),
            )));
        }
    }
    let (mut u, mut v) = (u.detach(), v.detach());
    if step.training {
        let w_const = w_mat.detach();
        for _ in 0..step.n_power_iterations {
            u = normalize(&w_const.matmul(&v.unsqueeze(1)?)?.squeeze(1)?, step.eps)?;
            v = normalize(
                &w_const.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?,
                step.eps,
            )?;
        }
    }
    let wv = w_mat.matmul(&v.unsqueeze(1)?)?.squeeze(D::Minus1)?;
    let sigma = (&u * &wv)?.sum_all()?;
    Ok(SpectralNormOutput {
        w: weight.broadcast_div(&sigma)?,
        sigma,
        u,
        v,
    })
}

/// Weight standardisation: each output unit's weight (each dim-0 slice) minus its mean, divided
/// by `sqrt(var + eps)` with the biased variance, as timm's `StdConv2d` computes it (through
/// `batch_norm` over the flattened weight). Gradients reach the weight through autograd.
///
/// # Shapes
/// `weight`: rank ≥ 2 (`[out, *]`); the result has its shape.
///
/// # Errors
/// [`Error::Core`] for `eps` not positive and finite or a weight of rank below 2.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let w = Tensor::new(&[[1f64, 3.0], [0.0, 0.0]], &Device::Cpu)?;
/// let s = gradkit::layers::ops::standardize_weight(&w, 1e-12)?.to_vec2::<f64>()?;
/// assert!((s[0][0] + 1.0).abs() < 1e-9 && (s[0][1] - 1.0).abs() < 1e-9);
/// assert_eq!(s[1], [0.0, 0.0]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn standardize_weight(weight: &Tensor, eps: f64) -> Result<Tensor> {
    grad_core::validate::positive("eps", eps)?;
    if weight.rank() < 2 {
        return Err(Error::rank(
            "standardize_weight",
            "weight",
            "at least 2 ([out, *])",
            weight.rank(),
        ));
    }
    let rows = weight.dim(0)?;
    let flat = weight.reshape((rows, ()))?;
    let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    Ok(centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(weight.shape())?)
}

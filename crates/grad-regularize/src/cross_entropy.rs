//! Cross-entropy with label smoothing, class weights, `ignore_index` and probability targets:
//! `torch.nn.functional.cross_entropy`, exactly.
//!
//! Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture") replaces the
//! one-hot target with `(1 - eps) * one_hot + eps / C`, which keeps logits from growing without
//! bound and improves calibration (Müller, Kornblith & Hinton 2019). With `lp =
//! log_softmax(logits)` and class weights `w` (1 without weights), a class-index target `y`
//! gives `loss = (1 - eps) w[y] (-lp[y]) + (eps / C) sum_c w[c] (-lp[c])`; `mean` divides the
//! sum by the summed target weights of the non-ignored elements (NaN when every target is
//! ignored). Probability targets `t` give `loss = -sum_c w[c] t'[c] lp[c]` with
//! `t' = (1 - eps) t + eps / C`, and `mean` divides by the element count.

use candle_core::{DType, Tensor};
use grad_core::device::{Path, read_back_scalar, scalar};
use serde::{Deserialize, Serialize};

use crate::kernels::cross_entropy::{CrossEntropyOp, Reduce, TargetKind};
use crate::{Error, Result};

/// How per-element losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Reduction {
    /// The weighted mean (see the module docs for the denominator).
    #[default]
    Mean,
    /// The sum.
    Sum,
    /// One loss per element, shaped like the class-index target.
    None,
}

/// The configuration of [`cross_entropy`]: PyTorch's keyword arguments, checked when the loss
/// is computed.
#[derive(Debug, Clone)]
pub struct CrossEntropyConfig {
    /// Per-class weights `[C]`, same dtype as the logits. Default: none.
    pub weight: Option<Tensor>,
    /// Class-index targets equal to this are ignored (it may be a valid class); `None` ignores
    /// none. Probability targets take no index (PyTorch raises for one that is not negative).
    /// Default: `Some(-100)`, PyTorch's.
    pub ignore_index: Option<i64>,
    /// How to combine the losses. Default: [`Reduction::Mean`].
    pub reduction: Reduction,
    /// Label smoothing `eps` in `[0, 1]`. Default: 0.
    pub label_smoothing: f64,
}

impl Default for CrossEntropyConfig {
    fn default() -> Self {
        Self {
            weight: None,
            ignore_index: Some(-100),
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
        }
    }
}

const OP: &str = "cross_entropy";

/// The inputs rearranged as rows of `C` logits, validated (class-index targets not yet checked
/// against the class count: each path does that where the targets live).
struct Prepared {
    /// Logits `[rows, C]`, contiguous.
    logits: Tensor,
    /// Class indices `[rows]` (i64, contiguous) or probabilities `[rows, C]`.
    targets: Tensor,
    kind: TargetKind,
    classes: usize,
    /// Per-class weights `[C]`, the logits' dtype.
    weight: Option<Tensor>,
    /// The shape of a `none` loss.
    loss_shape: Vec<usize>,
}

/// Cross-entropy between `logits` (`[N, C]` or `[N, C, d1, ...]`, class dim 1; `[C]` for one
/// unbatched example) and `targets`: class indices (an integer tensor shaped like the logits
/// without the class dim) or probabilities (a float tensor shaped like the logits).
///
/// On the CPU a fused kernel (one exponential per logit, the gradient written once in the
/// forward and scaled in place by the backward; a second `backward()` of the same graph
/// recomputes it); other devices use [`cross_entropy_composed`], which keeps the targets on the
/// device and reads back one flag (whether any class index is out of range).
/// With `label_smoothing = 0` and the default configuration it equals `candle_nn::loss::cross_entropy`.
///
/// # Shapes
/// `logits`: `[N, C]` or `[N, C, d1, ...]`; `targets`: class indices (an integer dtype) shaped
/// `[N]` or `[N, d1, ...]`, or probabilities shaped like the logits; `weight`: `[C]`. The loss
/// is a scalar, or shaped like the class-index targets with `Reduction::None`.
///
/// # Errors
/// [`Error::TargetOutOfRange`] for a class index outside `[0, C)` that is not `ignore_index`;
/// [`Error::IgnoreIndexWithProbabilities`]; [`Error::Core`] for `label_smoothing` outside
/// `[0, 1]`, a weight of the wrong length or dtype, mismatched shapes or devices, or an empty
/// input.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::regularize::{CrossEntropyConfig, cross_entropy};
/// let logits = Tensor::new(&[[2f32, 0.0, 0.0], [0.0, 0.0, 4.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[0i64, 2], &Device::Cpu)?;
/// let plain = cross_entropy(&logits, &targets, &CrossEntropyConfig::default())?;
/// let smoothed = cross_entropy(&logits, &targets, &CrossEntropyConfig { label_smoothing: 0.1, ..Default::default() })?;
/// assert!(smoothed.to_scalar::<f32>()? > plain.to_scalar::<f32>()?);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    config: &CrossEntropyConfig,
) -> Result<Tensor> {
    let logits = &grad_core::device::own_empty(logits)?;
    let p = prepare(logits, targets, config)?;
    match Path::of(logits.device()) {
        Path::Fused => fused(&p, config),
        Path::Composed => composed(&p, config),
    }
}

/// [`cross_entropy`] written with candle ops on the logits' device (a composed log-softmax,
/// gathers and sums): the path for other devices and the fused kernel's oracle.
///
/// # Errors
/// As [`cross_entropy`].
pub fn cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    config: &CrossEntropyConfig,
) -> Result<Tensor> {
    let logits = &grad_core::device::own_empty(logits)?;
    composed(&prepare(logits, targets, config)?, config)
}

fn fused(p: &Prepared, config: &CrossEntropyConfig) -> Result<Tensor> {
    if let TargetKind::Indices { ignore_index } = p.kind {
        let idx = p.targets.to_vec1::<i64>()?;
        if let Some(position) = idx
            .iter()
            .position(|&t| ignore_index != Some(t) && !(0..p.classes as i64).contains(&t))
        {
            return Err(Error::TargetOutOfRange {
                target: idx[position],
                position,
                classes: p.classes,
            });
        }
    }
    let weight = match &p.weight {
        Some(w) => Some(w.to_dtype(DType::F64)?.to_vec1::<f64>()?),
        None => None,
    };
    let reduce = match config.reduction {
        Reduction::Mean => Reduce::Mean,
        Reduction::Sum => Reduce::Sum,
        Reduction::None => Reduce::None,
    };
    let op = CrossEntropyOp::new(
        p.classes,
        p.kind,
        weight,
        config.label_smoothing,
        reduce,
        p.logits.track_op(),
    );
    let loss = p.logits.apply_op2(&p.targets, op)?;
    Ok(match config.reduction {
        Reduction::None => loss.reshape(p.loss_shape.as_slice())?,
        _ => loss,
    })
}

/// Fails with the first class index out of range, reading back one flag (and, only when it is
/// set, the targets, to name the culprit).
fn check_targets_on_device(
    targets: &Tensor,
    ignore_index: Option<i64>,
    classes: usize,
) -> Result<()> {
    let dev = targets.device();
    let c = i64::try_from(classes).unwrap_or(i64::MAX);
    let below = targets.lt(&Tensor::zeros(targets.shape(), DType::I64, dev)?)?;
    let above = targets.ge(&Tensor::new(c, dev)?.broadcast_as(targets.shape())?)?;
    let mut bad = (below + above)?.to_dtype(DType::F32)?;
    if let Some(ignore) = ignore_index {
        let counted = targets.ne(&Tensor::new(ignore, dev)?.broadcast_as(targets.shape())?)?;
        bad = (bad * counted.to_dtype(DType::F32)?)?;
    }
    if read_back_scalar(&bad.max_all()?)? == 0.0 {
        return Ok(());
    }
    let idx = targets.to_vec1::<i64>()?;
    let position = idx
        .iter()
        .position(|&t| ignore_index != Some(t) && !(0..c).contains(&t))
        .unwrap_or(0);
    Err(Error::TargetOutOfRange {
        target: idx.get(position).copied().unwrap_or(0),
        position,
        classes,
    })
}

fn composed(p: &Prepared, config: &CrossEntropyConfig) -> Result<Tensor> {
    let (eps, c) = (config.label_smoothing, p.classes);
    let dev = p.logits.device();
    let lp = candle_nn::ops::log_softmax(&p.logits, 1)?;
    let dtype = lp.dtype();
    let w = match &p.weight {
        Some(w) => w.clone(),
        None => Tensor::ones(c, dtype, dev)?,
    };
    let rows = lp.dim(0)?;
    #[allow(
        clippy::cast_precision_loss,
        reason = "class counts are far below 2^52"
    )]
    let smooth_weight = eps / c as f64;
    // The smoothing term only where it counts: with eps = 0 a -inf logit must not turn the
    // loss into 0 * inf = NaN.
    let smoothing = |active: Option<&Tensor>| -> Result<Option<Tensor>> {
        if eps == 0.0 {
            return Ok(None);
        }
        let s = lp.broadcast_mul(&w.unsqueeze(0)?)?.sum(1)?.neg()?;
        let s = match active {
            Some(a) => (s * a)?,
            None => s,
        };
        Ok(Some(s.affine(smooth_weight, 0.0)?))
    };
    let (losses, denominator) = match p.kind {
        TargetKind::Indices { ignore_index } => {
            check_targets_on_device(&p.targets, ignore_index, c)?;
            // Ignoring none compares with a value no kept target has (it passed the range check).
            let ignore = Tensor::new(ignore_index.unwrap_or(-1), dev)?.broadcast_as(rows)?;
            let mask = p.targets.ne(&ignore)?;
            let active = mask.to_dtype(dtype)?;
            let safe = mask.where_cond(&p.targets, &Tensor::zeros(rows, DType::I64, dev)?)?;
            let wy = (w.index_select(&safe, 0)? * &active)?;
            let nll = lp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
            let mut loss = (nll * &wy)?.affine(1.0 - eps, 0.0)?;
            if let Some(s) = smoothing(Some(&active))? {
                loss = (loss + s)?;
            }
            (loss, Some((wy.sum_all()?, active)))
        }
        TargetKind::Probabilities => {
            let t = p.targets.affine(1.0 - eps, smooth_weight)?;
            let loss = (t * &lp)?.broadcast_mul(&w.unsqueeze(0)?)?.sum(1)?.neg()?;
            (loss, None)
        }
    };
    Ok(match config.reduction {
        Reduction::None => losses.reshape(p.loss_shape.as_slice())?,
        Reduction::Sum => losses.sum_all()?,
        Reduction::Mean => match denominator {
            #[allow(clippy::cast_precision_loss, reason = "row counts are far below 2^52")]
            None => losses.sum_all()?.affine(1.0 / rows as f64, 0.0)?,
            Some((total_weight, active)) => {
                // PyTorch: with every target ignored the mean is 0/0 = NaN, yet the gradients
                // are 0. On the device: divide by 1 instead of 0, and add a constant NaN.
                let none_active = active.max_all()?.affine(-1.0, 1.0)?;
                let safe = (total_weight + &none_active)?;
                let nan = none_active.ne(0.0)?.where_cond(
                    &scalar(f64::NAN, dtype, dev)?,
                    &Tensor::zeros((), dtype, dev)?,
                )?;
                (losses.sum_all()?.div(&safe)? + nan)?
            }
        },
    })
}

/// `(1 - eps) * targets + eps / C` along the class dim (dim 1, or dim 0 for rank 1): smoothed
/// one-hot (or probability) targets that still sum to 1.
///
/// # Errors
/// [`Error::Core`] for `eps` outside `[0, 1]`, a non-float tensor or rank 0.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let one_hot = Tensor::new(&[[0f32, 1.0, 0.0, 0.0]], &Device::Cpu)?;
/// let t = gradkit::regularize::smooth_labels(&one_hot, 0.2)?;
/// assert_eq!(t.to_vec2::<f32>()?, [[0.05, 0.85, 0.05, 0.05]]);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
pub fn smooth_labels(targets: &Tensor, eps: f64) -> Result<Tensor> {
    grad_core::validate::unit_interval("label_smoothing", eps)?;
    grad_core::validate::ensure_float("smooth_labels", "targets", targets.dtype())?;
    let class_dim = match targets.rank() {
        0 => {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "smooth_labels",
                "targets",
                "[C] or [N, C, ...]",
                &[],
            )));
        }
        1 => 0,
        _ => 1,
    };
    let c = targets.dim(class_dim)? as f64;
    Ok(targets.affine(1.0 - eps, eps / c)?)
}

fn prepare(logits: &Tensor, targets: &Tensor, config: &CrossEntropyConfig) -> Result<Prepared> {
    grad_core::validate::unit_interval("label_smoothing", config.label_smoothing)?;
    grad_core::validate::ensure_float(OP, "logits", logits.dtype())?;
    if logits.rank() == 0 {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            OP,
            "logits",
            "[C] or [N, C, ...]",
            &[],
        )));
    }
    if logits.elem_count() == 0 {
        return Err(grad_core::Error::EmptyInput {
            op: OP,
            what: "logits",
        }
        .into());
    }
    let rank = logits.rank();
    let class_dim = usize::from(rank > 1);
    let classes = logits.dim(class_dim)?;
    let mut loss_shape = logits.dims().to_vec();
    loss_shape.remove(class_dim);
    // Rows of C logits: move the class dim last.
    let to_rows = |t: &Tensor| -> Result<Tensor> {
        Ok(match rank {
            1 => t.reshape((1, classes))?,
            2 => t.contiguous()?,
            _ => {
                let mut order: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
                order.push(1);
                t.permute(order)?.contiguous()?.reshape(((), classes))?
            }
        })
    };
    let weight = match &config.weight {
        Some(w) => {
            if w.dims() != [classes] {
                return Err(Error::Core(grad_core::Error::shape_mismatch(
                    OP,
                    "weight",
                    format!("[{classes}] (one weight per class)"),
                    w.dims(),
                )));
            }
            grad_core::validate::ensure_float(OP, "weight", w.dtype())?;
            grad_core::ensure_same_device(OP, logits.device(), w.device())?;
            Some(w.to_dtype(logits.dtype())?.contiguous()?)
        }
        None => None,
    };
    grad_core::ensure_same_device(OP, logits.device(), targets.device())?;
    let (targets, kind) = if grad_core::validate::is_float(targets.dtype()) {
        if let Some(index) = config.ignore_index.filter(|&i| i >= 0) {
            return Err(Error::IgnoreIndexWithProbabilities(index));
        }
        if targets.dims() != logits.dims() {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                OP,
                "targets",
                format!("{:?} (probabilities shaped like the logits)", logits.dims()),
                targets.dims(),
            )));
        }
        (
            to_rows(&targets.to_dtype(logits.dtype())?)?,
            TargetKind::Probabilities,
        )
    } else {
        if targets.dims() != loss_shape.as_slice() {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                OP,
                "targets",
                format!("{loss_shape:?} (class indices: the logits' shape without the class dim)"),
                targets.dims(),
            )));
        }
        let idx = targets.to_dtype(DType::I64)?.flatten_all()?.contiguous()?;
        (
            idx,
            TargetKind::Indices {
                ignore_index: config.ignore_index,
            },
        )
    };
    Ok(Prepared {
        logits: to_rows(logits)?,
        targets,
        kind,
        classes,
        weight,
        loss_shape,
    })
}

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

/// Options of [`cross_entropy`]: PyTorch's keyword arguments.
#[derive(Debug, Clone)]
pub struct CrossEntropyOptions {
    /// Per-class weights `[C]`, same dtype as the logits. Default: none.
    pub weight: Option<Tensor>,
    /// Class-index targets equal to this are ignored (it may be a valid class). Must stay at
    /// the default with probability targets. Default: -100.
    pub ignore_index: i64,
    /// How to combine the losses. Default: [`Reduction::Mean`].
    pub reduction: Reduction,
    /// Label smoothing `eps` in `[0, 1]`. Default: 0.
    pub label_smoothing: f64,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        Self {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
        }
    }
}

const OP: &str = "cross_entropy";

/// The inputs rearranged as rows of `C` logits.
struct Prepared {
    /// Logits `[rows, C]`, contiguous.
    logits: Tensor,
    /// Class indices `[rows]` (i64) or probabilities `[rows, C]`.
    targets: Tensor,
    kind: TargetKind,
    classes: usize,
    weight: Option<Vec<f64>>,
    /// The shape of a `none` loss.
    loss_shape: Vec<usize>,
}

/// Cross-entropy between `logits` (`[N, C]` or `[N, C, d1, ...]`, class dim 1; `[C]` for one
/// unbatched example) and `targets`: class indices (an integer tensor shaped like the logits
/// without the class dim) or probabilities (a float tensor shaped like the logits).
///
/// On the CPU a fused kernel (one exponential per logit, the gradient written once in the
/// forward and scaled in place by the backward); other devices use [`cross_entropy_composed`].
/// With `label_smoothing = 0` and no options it equals `candle_nn::loss::cross_entropy`.
///
/// # Errors
/// [`Error::TargetOutOfRange`] for a class index outside `[0, C)` that is not `ignore_index`;
/// [`Error::IgnoreIndexWithProbabilities`]; [`Error::Core`] for `label_smoothing` outside
/// `[0, 1]`, a weight of the wrong length or dtype, mismatched shapes or an empty input.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use grad_regularize::{CrossEntropyOptions, cross_entropy};
/// let logits = Tensor::new(&[[2f32, 0.0, 0.0], [0.0, 0.0, 4.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[0i64, 2], &Device::Cpu)?;
/// let plain = cross_entropy(&logits, &targets, &CrossEntropyOptions::default())?;
/// let smoothed = cross_entropy(&logits, &targets, &CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() })?;
/// assert!(smoothed.to_scalar::<f32>()? > plain.to_scalar::<f32>()?);
/// # Ok::<(), grad_regularize::Error>(())
/// ```
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    let p = prepare(logits, targets, options)?;
    if !logits.device().is_cpu() {
        return cross_entropy_composed(logits, targets, options);
    }
    let reduce = match options.reduction {
        Reduction::Mean => Reduce::Mean,
        Reduction::Sum => Reduce::Sum,
        Reduction::None => Reduce::None,
    };
    let op = CrossEntropyOp::new(
        p.classes,
        p.kind,
        p.weight,
        options.label_smoothing,
        reduce,
        logits.track_op(),
    );
    let loss = p.logits.apply_op2(&p.targets, op)?;
    Ok(match options.reduction {
        Reduction::None => loss.reshape(p.loss_shape)?,
        _ => loss,
    })
}

/// [`cross_entropy`] written with candle ops (a composed log-softmax, gathers and sums): the
/// test oracle and the path for other devices.
///
/// # Errors
/// As [`cross_entropy`].
pub fn cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    let p = prepare(logits, targets, options)?;
    let (eps, c) = (options.label_smoothing, p.classes);
    let dev = logits.device();
    let lp = candle_nn::ops::log_softmax(&p.logits, 1)?;
    let w = match &p.weight {
        Some(w) => Tensor::from_vec(w.clone(), c, dev)?.to_dtype(lp.dtype())?,
        None => Tensor::ones(c, lp.dtype(), dev)?,
    };
    let rows = lp.dim(0)?;
    let mut all_ignored = false;
    let (losses, denominator) = match p.kind {
        TargetKind::Indices { ignore_index } => {
            let idx = p.targets.to_vec1::<i64>()?;
            all_ignored = idx.iter().all(|&y| y == ignore_index);
            let active: Vec<f64> = idx
                .iter()
                .map(|&y| f64::from(u8::from(y != ignore_index)))
                .collect();
            let safe: Vec<u32> = idx
                .iter()
                .map(|&y| {
                    if y == ignore_index {
                        0
                    } else {
                        u32::try_from(y).unwrap_or(0)
                    }
                })
                .collect();
            let safe = Tensor::from_vec(safe, (rows, 1), dev)?;
            let active = Tensor::from_vec(active, rows, dev)?.to_dtype(lp.dtype())?;
            let wy = (w.index_select(&safe.flatten_all()?, 0)? * &active)?;
            let nll = lp.gather(&safe, 1)?.squeeze(1)?.neg()?;
            let smooth = lp.broadcast_mul(&w.unsqueeze(0)?)?.sum(1)?.neg()?;
            let loss = ((nll * &wy)?.affine(1.0 - eps, 0.0)?
                + (smooth * &active)?.affine(eps / c as f64, 0.0)?)?;
            (loss, wy.sum_all()?)
        }
        TargetKind::Probabilities => {
            let t = p.targets.affine(1.0 - eps, eps / c as f64)?;
            let loss = (t * &lp)?.broadcast_mul(&w.unsqueeze(0)?)?.sum(1)?.neg()?;
            let n = Tensor::new(rows as f64, dev)?.to_dtype(lp.dtype())?;
            (loss, n)
        }
    };
    Ok(match options.reduction {
        Reduction::None => losses.reshape(p.loss_shape)?,
        Reduction::Sum => losses.sum_all()?,
        // PyTorch: with every target ignored the mean is 0/0 = NaN, yet the gradients are 0.
        Reduction::Mean if all_ignored => {
            let zero = Tensor::zeros((), lp.dtype(), dev)?;
            ((losses.sum_all()? * zero)? + f64::NAN)?
        }
        Reduction::Mean => losses.sum_all()?.div(&denominator)?,
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
/// let t = grad_regularize::smooth_labels(&one_hot, 0.2)?;
/// assert_eq!(t.to_vec2::<f32>()?, [[0.05, 0.85, 0.05, 0.05]]);
/// # Ok::<(), grad_regularize::Error>(())
/// ```
pub fn smooth_labels(targets: &Tensor, eps: f64) -> Result<Tensor> {
    grad_core::validate::unit_interval("label_smoothing", eps)?;
    grad_core::float::ensure_float("smooth_labels", "targets", targets.dtype())?;
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

fn prepare(logits: &Tensor, targets: &Tensor, options: &CrossEntropyOptions) -> Result<Prepared> {
    grad_core::validate::unit_interval("label_smoothing", options.label_smoothing)?;
    grad_core::float::ensure_float(OP, "logits", logits.dtype())?;
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
    let weight = match &options.weight {
        Some(w) => {
            if w.dims() != [classes] {
                return Err(Error::Core(grad_core::Error::shape_mismatch(
                    OP,
                    "weight",
                    format!("[{classes}] (one weight per class)"),
                    w.dims(),
                )));
            }
            grad_core::float::ensure_float(OP, "weight", w.dtype())?;
            grad_core::ensure_same_device(OP, logits.device(), w.device())?;
            Some(w.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        }
        None => None,
    };
    grad_core::ensure_same_device(OP, logits.device(), targets.device())?;
    let (targets, kind) = if grad_core::float::is_float(targets.dtype()) {
        if options.ignore_index != -100 {
            return Err(Error::IgnoreIndexWithProbabilities(options.ignore_index));
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
        let idx = targets.to_dtype(DType::I64)?.flatten_all()?;
        let ignore = options.ignore_index;
        for (position, &t) in idx.to_vec1::<i64>()?.iter().enumerate() {
            if t != ignore && !(0..classes as i64).contains(&t) {
                return Err(Error::TargetOutOfRange {
                    target: t,
                    position,
                    classes,
                });
            }
        }
        (
            idx,
            TargetKind::Indices {
                ignore_index: ignore,
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

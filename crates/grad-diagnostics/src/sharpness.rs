//! Sharpness: the top eigenvalue of the loss's Hessian with respect to the parameters, against
//! the learning rate's curvature limit.
//!
//! Gradient descent with learning rate `lr` on a quadratic is stable only while every Hessian
//! eigenvalue is below `2 / lr`; full-batch training drifts up to that edge and hovers there
//! (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
//! Stability"). A top eigenvalue above it at initialisation, or one that keeps rising through it,
//! says the learning rate is too large for the network's curvature before the loss shows it.
//!
//! candle has no double backward, so each Hessian-vector product is a central finite difference
//! of two gradients, `(∇L(θ + εv) − ∇L(θ − εv)) / 2ε`, and [`sharpness`] runs power iteration on
//! it: two forward and backward passes per iteration, on whatever device the parameters live.

use candle_core::{DType, Tensor, Var};
use grad_core::{NamedVars, Philox};

use crate::detect::{Finding, FindingKind, Severity};
use crate::error::{Error, Result};
use crate::monitor::LayerGrouping;
use crate::remedy::Remedy;

/// Settings of [`sharpness`], validated by [`SharpnessConfig::validate`] before any parameter
/// is touched.
#[derive(Debug, Clone, PartialEq)]
pub struct SharpnessConfig {
    /// The most power iterations of each phase (each iteration is two gradient
    /// evaluations); at least 1. Default 20.
    pub iterations: usize,
    /// The finite-difference step along the unit direction `v`, as a fraction of the
    /// parameters' norm `‖θ‖` (in parameter units where `‖θ‖` is 0); finite and positive.
    /// Default 1e-3: each parameter moves by about `1e-3 ‖θ‖ / √n`, small next to the weights,
    /// yet large enough that f32 gradients differ by far more than their rounding and that a
    /// ReLU network's kinks average out instead of dominating the difference. On a piecewise
    /// linear network the result is the curvature of the loss smoothed at that scale.
    pub epsilon: f64,
    /// Stop once the estimate changes by at most this fraction of itself between iterations;
    /// in `[0, 1)`, 0 runs every iteration. Default 1e-3.
    pub tolerance: f64,
    /// The seed of the random starting direction.
    pub seed: u64,
    /// How parameter names map to the layers [`Sharpness::layers`] reports.
    pub grouping: LayerGrouping,
}

impl Default for SharpnessConfig {
    fn default() -> Self {
        Self {
            iterations: 20,
            epsilon: 1e-3,
            tolerance: 1e-3,
            seed: 0,
            grouping: LayerGrouping::default(),
        }
    }
}

impl SharpnessConfig {
    /// Checks every setting, naming the first one out of range.
    ///
    /// ```
    /// use gradkit::diagnostics::SharpnessConfig;
    /// assert!(SharpnessConfig::default().validate().is_ok());
    /// let bad = SharpnessConfig { epsilon: 0.0, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("epsilon = 0"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let invalid = |name, value, allowed| {
            Err(Error::Core(grad_core::Error::InvalidHyperParameter {
                name,
                value,
                allowed,
            }))
        };
        if self.iterations == 0 {
            return invalid("iterations", 0.0, "at least 1");
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return invalid("epsilon", self.epsilon, "(0, inf)");
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return invalid("tolerance", self.tolerance, "[0, 1)");
        }
        Ok(())
    }
}

/// What [`sharpness`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Sharpness {
    /// The largest Hessian eigenvalue (the most positive one): the Rayleigh quotient `vᵀHv`
    /// of the last unit direction. The one gradient descent's stability depends on.
    pub top_eigenvalue: f64,
    /// The eigenvalue of largest magnitude, when it is negative (a saddle's descent direction
    /// is more curved than any ascent one): power iteration finds it first, and a second
    /// phase shifted by its magnitude finds [`top_eigenvalue`](Self::top_eigenvalue). `None`
    /// when the eigenvalue of largest magnitude is the top one.
    pub most_negative: Option<f64>,
    /// The power iterations run, both phases together.
    pub iterations: usize,
    /// Whether the last phase's estimate settled within [`SharpnessConfig::tolerance`] before
    /// the iteration limit.
    pub converged: bool,
    /// Forward and backward passes taken (two per iteration): the cost in training steps.
    pub gradient_evaluations: usize,
    /// Each layer's share of the top eigenvector (`|v_layer|²`, summing to 1), in the
    /// parameters' order: where the curvature lives.
    pub layers: Vec<(String, f64)>,
}

impl Sharpness {
    /// The largest curvature plain gradient descent with learning rate `lr` is stable under:
    /// `2 / lr`.
    ///
    /// ```
    /// assert_eq!(gradkit::diagnostics::Sharpness::curvature_limit(0.1), 20.0);
    /// ```
    pub fn curvature_limit(lr: f64) -> f64 {
        2.0 / lr
    }

    /// A [`FindingKind::CurvatureLimit`] finding at `step` when the top eigenvalue is above
    /// `2 / lr`, naming the layers that hold at least a tenth of the top eigenvector; `None`
    /// below it. Momentum lowers the limit further (to `(2 + 2β) / lr` for heavy ball it is
    /// higher, for Adam the relevant curvature is the preconditioned one): the comparison is
    /// the one for SGD.
    ///
    /// # Errors
    /// `lr` not finite and positive.
    ///
    /// ```
    /// use gradkit::diagnostics::{FindingKind, Sharpness};
    /// let s = Sharpness {
    ///     top_eigenvalue: 50.0,
    ///     most_negative: None,
    ///     iterations: 8,
    ///     converged: true,
    ///     gradient_evaluations: 16,
    ///     layers: vec![("layer.0".into(), 0.9), ("layer.1".into(), 0.1)],
    /// };
    /// let f = s.finding(0.1, 0)?.expect("50 > 2 / 0.1");
    /// assert_eq!(f.kind, FindingKind::CurvatureLimit);
    /// assert!(s.finding(0.01, 0)?.is_none()); // 50 < 200
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn finding(&self, lr: f64, step: u64) -> Result<Option<Finding>> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::Core(grad_core::Error::InvalidHyperParameter {
                name: "lr",
                value: lr,
                allowed: "(0, inf)",
            }));
        }
        let limit = Self::curvature_limit(lr);
        if self.top_eigenvalue <= limit {
            return Ok(None);
        }
        let remedies = vec![
            Remedy::LowerLearningRate,
            Remedy::Warmup,
            Remedy::ClipGlobalNorm,
        ];
        Ok(Some(Finding {
            kind: FindingKind::CurvatureLimit,
            severity: if self.top_eigenvalue > 2.0 * limit {
                Severity::Critical
            } else {
                Severity::Warning
            },
            layers: self
                .layers
                .iter()
                .filter(|(_, share)| *share >= 0.1)
                .map(|(name, _)| name.clone())
                .collect(),
            evidence: format!(
                "the top Hessian eigenvalue {:.4e} is above 2/lr = {limit:.4e} (lr {lr}): gradient descent is unstable along its direction; a learning rate below {:.4e} is not",
                self.top_eigenvalue,
                2.0 / self.top_eigenvalue
            ),
            steps: [step, step],
            peak: Some(self.top_eigenvalue),
            remedy: Remedy::render_all(&remedies),
            remedies,
        }))
    }
}

/// The top Hessian eigenvalue of `loss` with respect to `params`, by power iteration on
/// finite-difference Hessian-vector products. `loss` is called twice per iteration and must
/// compute the loss from the parameters' current values (the same batch each time: with
/// dropout, a fixed seed or evaluation mode). The parameters hold their original values,
/// bit for bit, when it returns, whether it succeeds or fails.
///
/// # Errors
/// An invalid config, no parameters, a parameter that is not a float, a loss that fails or
/// holds more than one element, and non-finite Hessian-vector products (a NaN loss or
/// gradient near the parameters).
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use gradkit::core::NamedVars;
/// use gradkit::diagnostics::{SharpnessConfig, sharpness};
///
/// // L(w) = 3 w0² + w1²/2: the Hessian is diag(6, 1).
/// let w = Var::from_tensor(&Tensor::new(&[0.5f64, -1.0], &Device::Cpu)?)?;
/// let params = NamedVars::new([("layer.0.weight", w.clone())])?;
/// let scale = Tensor::new(&[3.0f64, 0.5], &Device::Cpu)?;
/// let s = sharpness(&params, || w.as_tensor().sqr()?.mul(&scale)?.sum_all(), &SharpnessConfig::default())?;
/// assert!((s.top_eigenvalue - 6.0).abs() < 1e-3);
/// assert_eq!(w.to_vec1::<f64>()?, [0.5, -1.0]); // untouched
/// # Ok::<(), gradkit::diagnostics::Error>(())
/// ```
pub fn sharpness<F>(params: &NamedVars, mut loss: F, config: &SharpnessConfig) -> Result<Sharpness>
where
    F: FnMut() -> candle_core::Result<Tensor>,
{
    config.validate()?;
    if params.is_empty() {
        return Err(Error::Core(grad_core::Error::EmptyInput {
            op: "sharpness",
            what: "params",
        }));
    }
    for (_, var) in params.iter() {
        if !var.dtype().is_float() {
            return Err(Error::Core(grad_core::Error::UnsupportedDType {
                op: "sharpness",
                arg: "params",
                dtype: var.dtype(),
                expected: "a float dtype",
            }));
        }
    }
    let origin = params
        .vars()
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let found = power_iteration(params, &origin, &mut loss, config);
    let restored = restore(params.vars(), &origin);
    let found = found?;
    restored?;
    Ok(found)
}

/// The dtype directions and products are kept in: f64 parameters in f64, every other float in
/// f32 (Metal has no f64; f16 sums lose too much).
fn work_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The per-tensor sums of `a_i * b_i` as one tensor (f64 when every tensor is).
fn sums(a: &[Tensor], b: &[Tensor]) -> Result<Tensor> {
    let dtype = if a.iter().all(|t| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let sums = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.mul(y)?.sum_all()?.to_dtype(dtype))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sums, 0)?)
}

/// `Σ_i sum(a_i * b_i)`, read back once.
fn dot(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    Ok(grad_core::device::read_back_scalar(
        &sums(a, b)?.sum_all()?,
    )?)
}

fn power_iteration<F>(
    params: &NamedVars,
    origin: &[Tensor],
    loss: &mut F,
    config: &SharpnessConfig,
) -> Result<Sharpness>
where
    F: FnMut() -> candle_core::Result<Tensor>,
{
    let theta_norm = dot(origin, origin)?.sqrt();
    if !theta_norm.is_finite() {
        return Err(Error::Core(grad_core::Error::NonFinite {
            op: "sharpness",
            what: "params".into(),
            count: 1,
        }));
    }
    let epsilon = if theta_norm > 0.0 {
        config.epsilon * theta_norm
    } else {
        config.epsilon
    };
    let mut hvp = |v: &[Tensor]| hessian_vector(params.vars(), origin, v, loss, epsilon);
    let mut rng = Philox::new(config.seed);
    let start = origin
        .iter()
        .map(|o| rng.normal(o.shape(), 0.0, 1.0, work_dtype(o.dtype()), o.device()))
        .collect::<grad_core::Result<Vec<_>>>()?;
    let first = Phase::run(&mut hvp, start.clone(), 0.0, config)?;
    // Power iteration finds the eigenvalue of largest magnitude, `‖Hv‖`. When the Rayleigh
    // quotient falls short of it, that eigenvalue is negative (or a negative one of about the
    // same size keeps v from settling): shifted by it, every eigenvalue of H + ‖Hv‖ I is at
    // least about 0, and the largest is the top eigenvalue plus the shift.
    let (last, most_negative, iterations) = if first.estimate >= 0.99 * first.norm {
        let iterations = first.iterations;
        (first, None, iterations)
    } else {
        let second = Phase::run(&mut hvp, start, -first.norm, config)?;
        let iterations = first.iterations + second.iterations;
        let negative = (first.estimate < 0.0).then_some(first.estimate);
        (second, negative, iterations)
    };
    let shares = grad_core::device::read_back(&sums(&last.v, &last.v)?)?;
    let total: f64 = shares.iter().sum();
    let mut layers: Vec<(String, f64)> = Vec::new();
    for ((name, _), share) in params.iter().zip(shares) {
        let layer = config.grouping.layer_of(name);
        let share = if total > 0.0 { share / total } else { 0.0 };
        match layers.iter_mut().find(|(l, _)| *l == layer) {
            Some((_, s)) => *s += share,
            None => layers.push((layer, share)),
        }
    }
    Ok(Sharpness {
        top_eigenvalue: last.estimate,
        most_negative,
        iterations,
        converged: last.converged,
        gradient_evaluations: 2 * iterations,
        layers,
    })
}

/// One run of power iteration on `H - shift·I`.
struct Phase {
    /// The Rayleigh quotient `vᵀHv` of the last direction.
    estimate: f64,
    /// The last unit direction.
    v: Vec<Tensor>,
    /// `‖(H - shift·I) v‖` of the last direction: the magnitude of the operator's dominant
    /// eigenvalue, once converged.
    norm: f64,
    iterations: usize,
    converged: bool,
}

impl Phase {
    fn run(
        hvp: &mut impl FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
        start: Vec<Tensor>,
        shift: f64,
        config: &SharpnessConfig,
    ) -> Result<Self> {
        let mut v = scaled(&start, 1.0 / dot(&start, &start)?.sqrt())?;
        let mut estimate = f64::NAN;
        let mut last_norm = f64::NAN;
        let mut iterations = 0;
        while iterations < config.iterations {
            iterations += 1;
            let hv = hvp(&v)?;
            let previous = estimate;
            estimate = dot(&v, &hv)?;
            let next = if shift == 0.0 {
                hv
            } else {
                hv.iter()
                    .zip(&v)
                    .map(|(h, x)| h - x.affine(shift, 0.0)?)
                    .collect::<candle_core::Result<Vec<_>>>()?
            };
            let norm = dot(&next, &next)?.sqrt();
            if !(estimate.is_finite() && norm.is_finite()) {
                return Err(Error::Core(grad_core::Error::NonFinite {
                    op: "sharpness",
                    what: "a Hessian-vector product (the loss or a gradient near the parameters)"
                        .into(),
                    count: 1,
                }));
            }
            if norm == 0.0 {
                // v is an exact eigenvector (H v = shift v, or no curvature at all): done.
                return Ok(Self {
                    estimate,
                    v,
                    norm,
                    iterations,
                    converged: true,
                });
            }
            v = scaled(&next, 1.0 / norm)?;
            last_norm = norm;
            if (estimate - previous).abs() <= config.tolerance * estimate.abs() {
                return Ok(Self {
                    estimate,
                    v,
                    norm,
                    iterations,
                    converged: true,
                });
            }
        }
        Ok(Self {
            estimate,
            v,
            norm: last_norm,
            iterations,
            converged: false,
        })
    }
}

fn scaled(v: &[Tensor], by: f64) -> Result<Vec<Tensor>> {
    Ok(v.iter()
        .map(|t| t.affine(by, 0.0))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// `(∇L(θ + εv) − ∇L(θ − εv)) / 2ε`, in the work dtype. Leaves the parameters perturbed: the
/// caller restores them.
fn hessian_vector<F>(
    vars: &[Var],
    origin: &[Tensor],
    v: &[Tensor],
    loss: &mut F,
    epsilon: f64,
) -> Result<Vec<Tensor>>
where
    F: FnMut() -> candle_core::Result<Tensor>,
{
    let plus = gradient_at(vars, origin, v, epsilon, loss)?;
    let minus = gradient_at(vars, origin, v, -epsilon, loss)?;
    Ok(plus
        .iter()
        .zip(&minus)
        .map(|(p, m)| (p - m)?.affine(0.5 / epsilon, 0.0))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// The gradient of `loss` at `θ + step·v`, in the work dtype (zeros for a parameter the loss
/// does not reach).
fn gradient_at<F>(
    vars: &[Var],
    origin: &[Tensor],
    v: &[Tensor],
    step: f64,
    loss: &mut F,
) -> Result<Vec<Tensor>>
where
    F: FnMut() -> candle_core::Result<Tensor>,
{
    for ((var, o), d) in vars.iter().zip(origin).zip(v) {
        let moved = (o.to_dtype(d.dtype())? + d.affine(step, 0.0)?)?;
        var.set(&moved.to_dtype(o.dtype())?)?;
    }
    let value = loss()?;
    if value.elem_count() != 1 {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            "sharpness",
            "loss",
            "a scalar (one element)",
            value.dims(),
        )));
    }
    let store = value.sum_all()?.backward()?;
    Ok(vars
        .iter()
        .zip(v)
        .map(|(var, d)| match store.get(var.as_tensor()) {
            Some(g) => g.to_dtype(d.dtype()),
            None => d.zeros_like(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// Puts every parameter back to `origin`, bit for bit.
fn restore(vars: &[Var], origin: &[Tensor]) -> Result<()> {
    for (var, o) in vars.iter().zip(origin) {
        var.set(o)?;
    }
    Ok(())
}

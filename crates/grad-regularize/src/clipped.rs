//! `Clipped<O>`: any candle optimizer, with gradient clipping and non-finite step skipping.
//!
//! `backward_step(&loss)` computes the gradients, takes those of the optimizer's parameters
//! (never the input's or intermediate results'), measures their global norm and counts NaN/Inf
//! in one read, skips the step when a gradient is non-finite (like optax's `apply_if_finite`,
//! up to a limit of consecutive skips that then becomes an error), applies the clipping policy
//! in place, and steps. It keeps the numbers a training loop logs: the last total norm, whether
//! the last step was clipped or skipped, and counters. Each step's outcome is also published on
//! the calling thread ([`grad_core::step`]), where a `grad_diagnostics::GradMonitor` that ran the
//! step picks it up for its record.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use grad_core::{NamedVars, NormType, multi_norm};
use serde::{Deserialize, Serialize};

use crate::policy::{ClipPolicy, ClipRule, GroupOutcome};
use crate::{Error, Result};

/// Settings of [`Clipped`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClippedConfig {
    /// How to clip. No default: choose a rule (`ClipPolicy::single(ClipRule::max_norm(1.0))`
    /// is the common one).
    pub policy: ClipPolicy,
    /// Skip the optimizer step when any gradient holds a NaN or infinity. Default: true.
    pub skip_non_finite: bool,
    /// How many consecutive steps may be skipped before [`Clipped::try_step`] fails (a run that
    /// keeps producing NaN is broken, not unlucky). `None` never fails. Default: `Some(10)`.
    pub max_consecutive_skips: Option<usize>,
    /// Centralise the gradients (of rank ≥ 2) before clipping them
    /// ([`centralize_gradients`](crate::centralize_gradients)): the order is centralise, then
    /// clip, then step. Default: false.
    #[serde(default)]
    pub centralize: bool,
}

impl ClippedConfig {
    /// The policy with the defaults for everything else.
    pub fn new(policy: ClipPolicy) -> Self {
        Self {
            policy,
            skip_non_finite: true,
            max_consecutive_skips: Some(10),
            centralize: false,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The global L2 norm of the gradients as the backward left them, before centralising and
    /// clipping (NaN or inf if one is non-finite).
    pub total_norm: f64,
    /// NaN and infinite gradient elements.
    pub non_finite: u64,
    /// The first parameter (in order) whose gradient is non-finite.
    pub first_non_finite: Option<String>,
    /// Whether the optimizer step was skipped.
    pub skipped: bool,
    /// Whether any gradient was clipped.
    pub clipped: bool,
    /// Per-group outcomes of the policy (empty when skipped).
    pub groups: Vec<GroupOutcome>,
}

/// Counters over the wrapper's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipCounters {
    /// Steps taken by the inner optimizer.
    pub steps: u64,
    /// Steps skipped for non-finite gradients.
    pub skipped: u64,
    /// Steps in which clipping changed a gradient.
    pub clipped: u64,
    /// Skips in a row, up to now.
    pub consecutive_skips: usize,
}

/// An optimizer wrapped with a clipping policy and non-finite step skipping.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Module, Optimizer, SGD, VarBuilder, VarMap};
/// use gradkit::core::NamedVars;
/// use gradkit::regularize::{ClipPolicy, ClipRule, Clipped, ClippedConfig};
/// let map = VarMap::new();
/// let net = candle_nn::linear(4, 1, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
/// let params = NamedVars::from_var_map(&map);
/// let policy = ClipPolicy::single(ClipRule::max_norm(1.0))?;
/// // SGD's configuration is its learning rate; `Clipped` builds it over `params`.
/// let mut opt = Clipped::<SGD>::new(params, 0.1, ClippedConfig::new(policy))?;
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// let loss = net.forward(&x)?.sqr()?.mean_all()?;
/// let report = opt.try_backward_step(&loss)?;
/// assert!(!report.skipped);
/// assert_eq!(opt.counters().steps, 1);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
#[derive(Debug)]
pub struct Clipped<O> {
    inner: O,
    params: NamedVars,
    config: ClippedConfig,
    counters: ClipCounters,
    last: Option<StepReport>,
}

impl<O: Optimizer> Clipped<O> {
    /// Builds the inner optimizer from its configuration over exactly the variables of `params`
    /// (their names select the policy's groups), so the clipped and the stepped variables are
    /// the same list by construction.
    ///
    /// # Errors
    /// The inner optimizer's construction error (e.g. an invalid learning rate).
    pub fn new(params: NamedVars, inner: O::Config, config: ClippedConfig) -> Result<Self> {
        let inner = O::new(params.vars().to_vec(), inner)?;
        Ok(Self {
            inner,
            params,
            config,
            counters: ClipCounters::default(),
            last: None,
        })
    }

    /// Builds the inner optimizer from its configuration over the parameters of `vars`,
    /// clipping their global L2 norm at `max_norm` (PyTorch's `clip_grad_norm_(params,
    /// max_norm)` before every step) and skipping steps with non-finite gradients: the one-line
    /// drop-in for a candle training loop. Buffers in `vars` (BatchNorm's running statistics)
    /// are neither clipped nor stepped.
    ///
    /// # Errors
    /// [`Error::Core`] when `max_norm` is not positive and finite; the inner optimizer's
    /// construction error.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
    /// use gradkit::regularize::Clipped;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _layer = candle_nn::linear(4, 2, vb.pp("fc"))?;
    /// let mut sgd = Clipped::<SGD>::with_max_norm(&varmap, 0.1, 1.0)?;
    /// assert_eq!(sgd.learning_rate(), 0.1);
    /// # Ok::<(), gradkit::regularize::Error>(())
    /// ```
    pub fn with_max_norm(vars: &VarMap, inner: O::Config, max_norm: f64) -> Result<Self> {
        let policy = ClipPolicy::single(ClipRule::max_norm(max_norm))?;
        Self::new(
            NamedVars::from_var_map(vars),
            inner,
            ClippedConfig::new(policy),
        )
    }

    /// Computes the gradients of `loss`, then [`try_step`](Self::try_step).
    ///
    /// # Errors
    /// As [`try_step`](Self::try_step), and candle's backward errors.
    pub fn try_backward_step(&mut self, loss: &Tensor) -> Result<StepReport> {
        let grads = loss.backward()?;
        self.try_step(&grads)
    }

    /// Clips the parameters' gradients from `grads` by the policy, or skips when one is
    /// non-finite, and steps the inner optimizer. `grads` itself is not modified on other
    /// devices; on the CPU the clipping writes into the gradients' storage.
    ///
    /// # Errors
    /// [`Error::TooManySkippedSteps`] past the configured limit; a rule's error (a non-finite
    /// norm with [`NonFiniteNorm::Error`](crate::NonFiniteNorm::Error)); the inner optimizer's
    /// error.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<StepReport> {
        let mut named = self.params.grads(grads)?;
        let tensors = named.tensors();
        let norms = if tensors.is_empty() {
            None
        } else {
            Some(multi_norm(&tensors, NormType::L2)?)
        };
        let (total_norm, non_finite, first_non_finite) = match &norms {
            Some(n) => {
                let first = n
                    .first_non_finite()
                    .and_then(|i| named.present().nth(i).map(|(name, _)| name.to_owned()));
                (n.total, n.non_finite_count(), first)
            }
            None => (0.0, 0, None),
        };
        let mut report = StepReport {
            total_norm,
            non_finite,
            first_non_finite,
            skipped: false,
            clipped: false,
            groups: Vec::new(),
        };
        if non_finite > 0 && self.config.skip_non_finite {
            self.counters.skipped += 1;
            self.counters.consecutive_skips += 1;
            report.skipped = true;
            self.record(&report);
            if let Some(limit) = self.config.max_consecutive_skips
                && self.counters.consecutive_skips > limit
            {
                return Err(Error::TooManySkippedSteps {
                    skips: self.counters.consecutive_skips,
                    limit,
                    parameter: report.first_non_finite.unwrap_or_default(),
                });
            }
            return Ok(report);
        }
        self.counters.consecutive_skips = 0;
        // Centralising changes the norms: the policy then measures them again.
        let norms = if self.config.centralize {
            crate::centralize_gradients(&mut named)?;
            None
        } else {
            norms
        };
        report.groups = self.config.policy.apply(&mut named, norms.as_ref())?;
        report.clipped = report.groups.iter().any(|g| g.clipped);
        // The clipped gradients, keyed by variable, for the inner optimizer.
        let mut store = GradStore::default();
        named.write_back(&mut store);
        self.inner.step(&store)?;
        self.counters.steps += 1;
        self.counters.clipped += u64::from(report.clipped);
        self.record(&report);
        Ok(report)
    }

    /// Keeps the report and publishes its outcome for a monitor on this thread
    /// ([`grad_core::step`]).
    fn record(&mut self, report: &StepReport) {
        grad_core::step::publish(grad_core::step::StepOutcome {
            total_norm: report.total_norm,
            clipped: report.clipped,
            skipped: report.skipped,
        });
        self.last = Some(report.clone());
    }

    /// The last step's report.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last.as_ref()
    }

    /// The last step's total gradient norm (before clipping).
    pub fn last_total_norm(&self) -> Option<f64> {
        self.last.as_ref().map(|r| r.total_norm)
    }

    /// Whether the last step clipped a gradient.
    pub fn last_clipped(&self) -> bool {
        self.last.as_ref().is_some_and(|r| r.clipped)
    }

    /// Whether the last step was skipped.
    pub fn last_skipped(&self) -> bool {
        self.last.as_ref().is_some_and(|r| r.skipped)
    }

    /// The counters.
    pub fn counters(&self) -> ClipCounters {
        self.counters
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The wrapped optimizer, mutably.
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// The configuration.
    pub fn config(&self) -> &ClippedConfig {
        &self.config
    }
}

/// The configuration of [`Clipped`] used through candle's [`Optimizer::new`].
#[derive(Debug, Clone)]
pub struct ClippedOptimizerConfig<C> {
    /// The inner optimizer's configuration.
    pub inner: C,
    /// The clipping settings.
    pub clip: ClippedConfig,
}

impl<O: Optimizer> Optimizer for Clipped<O> {
    type Config = ClippedOptimizerConfig<O::Config>;

    /// Builds the inner optimizer; the variables are named `param.0`, `param.1`, ... in the
    /// order given (use [`Clipped::new`] with a [`NamedVars`] to select groups by real names).
    fn new(vars: Vec<Var>, config: Self::Config) -> candle_core::Result<Self> {
        let params = NamedVars::new(
            vars.iter()
                .enumerate()
                .map(|(i, v)| (format!("param.{i}"), v.clone())),
        )
        .map_err(candle_core::Error::from)?;
        Self::new(params, config.inner, config.clip).map_err(candle_core::Error::from)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.try_step(grads)
            .map(|_| ())
            .map_err(candle_core::Error::from)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }
}

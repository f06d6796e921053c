//! Per-group clipping policies: named groups of parameters, each with its own rule.
//!
//! A parameter belongs to the first group whose selector matches its name; parameters no group
//! selects are left alone. Typical uses: clip the global norm of everything but leave the
//! embeddings alone; AGC on the body with the classifier excluded (NFNets); value clipping on a
//! recurrent block.

use candle_core::Tensor;
use grad_core::{MultiNorm, NamedGrads, NormType};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::agc::{AgcConfig, adaptive_clip};
use crate::clip::{NonFiniteNorm, clip_grad_value, clip_grads_with_norm, get_total_norm};

/// How to clip a group's gradients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClipRule {
    /// Leave the gradients as they are.
    Unclipped,
    /// Clamp each element into `[-clip_value, clip_value]` ([`clip_grad_value`]).
    Value {
        /// The bound.
        clip_value: f64,
    },
    /// Clip the group's total norm ([`clip_grad_norm`](crate::clip_grad_norm)).
    Norm {
        /// The largest total norm allowed.
        max_norm: f64,
        /// Which norm.
        norm_type: NormType,
        /// What a non-finite total norm does.
        non_finite: NonFiniteNorm,
    },
    /// Adaptive gradient clipping, unit-wise ([`adaptive_clip`]).
    Adaptive {
        /// Largest gradient-to-weight norm ratio per unit.
        clip_factor: f64,
        /// Smallest weight norm used.
        eps: f64,
    },
}

impl ClipRule {
    /// The global L2-norm rule PyTorch users reach for first.
    pub fn max_norm(max_norm: f64) -> Self {
        Self::Norm {
            max_norm,
            norm_type: NormType::L2,
            non_finite: NonFiniteNorm::Scale,
        }
    }

    fn validate(&self) -> Result<()> {
        match *self {
            Self::Unclipped => Ok(()),
            Self::Value { clip_value } => {
                Ok(grad_core::validate::positive("clip_value", clip_value)?)
            }
            Self::Norm {
                max_norm,
                norm_type,
                ..
            } => {
                grad_core::validate::positive("max_norm", max_norm)?;
                Ok(norm_type.validate()?)
            }
            Self::Adaptive { clip_factor, eps } => AgcConfig {
                clip_factor,
                eps,
                exclude: Vec::new(),
            }
            .validate(),
        }
    }
}

/// Which parameters a group holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    /// Every parameter.
    All,
    /// Parameters whose name starts with the prefix (`"encoder."`).
    Prefix(String),
    /// Parameters with exactly these names.
    Names(Vec<String>),
}

impl Selector {
    fn selects(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(p) => name.starts_with(p.as_str()),
            Self::Names(names) => names.iter().any(|n| n == name),
        }
    }
}

/// A named group of parameters with its rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// The group's name, for reports.
    pub name: String,
    /// Which parameters it holds.
    pub select: Selector,
    /// How they are clipped.
    pub rule: ClipRule,
}

/// What a policy did to one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupOutcome {
    /// The group's name.
    pub group: String,
    /// Parameters with a gradient in the group.
    pub parameters: usize,
    /// The group's total norm before clipping (norm rules only).
    pub total_norm: Option<f64>,
    /// Whether any gradient was changed.
    pub clipped: bool,
}

/// An ordered list of parameter groups and their rules.
///
/// ```
/// use candle_core::{Device, Var};
/// use gradkit::core::NamedVars;
/// use gradkit::regularize::{ClipPolicy, ClipRule, ParamGroup, Selector};
/// let policy = ClipPolicy::new(vec![
///     ParamGroup { name: "head".into(), select: Selector::Prefix("head.".into()), rule: ClipRule::Unclipped },
///     ParamGroup { name: "body".into(), select: Selector::All, rule: ClipRule::max_norm(1.0) },
/// ])?;
/// let body = Var::new(&[30f32, 40.0], &Device::Cpu)?;
/// let head = Var::new(&[30f32, 40.0], &Device::Cpu)?;
/// let params = NamedVars::new([("body.w", body.clone()), ("head.w", head.clone())])?;
/// let store = (body.sqr()?.sum_all()? + head.sqr()?.sum_all()?)?.backward()?;
/// let mut grads = params.grads(&store)?;
/// let report = policy.apply(&mut grads, None)?;
/// assert!(report[1].clipped && !report[0].clipped);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Groups", into = "Groups")]
pub struct ClipPolicy {
    groups: Vec<ParamGroup>,
}

/// A policy as written in a file: deserialised through [`ClipPolicy::new`], so a policy read
/// from JSON is validated like one built in code.
#[derive(Serialize, Deserialize)]
struct Groups {
    groups: Vec<ParamGroup>,
}

impl TryFrom<Groups> for ClipPolicy {
    type Error = crate::Error;

    fn try_from(g: Groups) -> Result<Self> {
        Self::new(g.groups)
    }
}

impl From<ClipPolicy> for Groups {
    fn from(p: ClipPolicy) -> Self {
        Self { groups: p.groups }
    }
}

impl ClipPolicy {
    /// A policy of `groups`, checked in order.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) for an invalid rule.
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        for g in &groups {
            g.rule.validate()?;
        }
        Ok(Self { groups })
    }

    /// One group holding every parameter, with `rule`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn single(rule: ClipRule) -> Result<Self> {
        Self::new(vec![ParamGroup {
            name: "all".into(),
            select: Selector::All,
            rule,
        }])
    }

    /// The groups, in order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The L2 max norm when the policy is exactly "clip the global L2 norm of everything", so a
    /// caller that already computed that norm can pass it to [`apply`](Self::apply).
    pub(crate) fn global_l2(&self) -> bool {
        matches!(
            self.groups.as_slice(),
            [ParamGroup {
                select: Selector::All,
                rule: ClipRule::Norm {
                    norm_type: NormType::L2,
                    ..
                },
                ..
            }]
        )
    }

    /// Applies every group's rule to its parameters' gradients, in place.
    ///
    /// `all_l2` may carry the L2 norms of all present gradients (in order), already computed;
    /// a single global-L2 group then reuses them instead of reading the gradients again.
    ///
    /// # Errors
    /// A rule's error (a non-finite norm with [`NonFiniteNorm::Error`]).
    pub fn apply(
        &self,
        grads: &mut NamedGrads,
        all_l2: Option<&MultiNorm>,
    ) -> Result<Vec<GroupOutcome>> {
        let names: Vec<(String, bool)> = grads
            .iter()
            .map(|e| (e.name().to_owned(), e.grad().is_some()))
            .collect();
        let mut taken = vec![false; names.len()];
        let mut report = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let members: Vec<usize> = (0..names.len())
                .filter(|&i| !taken[i] && names[i].1 && group.select.selects(&names[i].0))
                .collect();
            members.iter().for_each(|&i| taken[i] = true);
            let mut outcome = GroupOutcome {
                group: group.name.clone(),
                parameters: members.len(),
                total_norm: None,
                clipped: false,
            };
            if !members.is_empty() {
                self.apply_rule(group, grads, &names, &members, all_l2, &mut outcome)?;
            }
            report.push(outcome);
        }
        Ok(report)
    }

    fn apply_rule(
        &self,
        group: &ParamGroup,
        grads: &mut NamedGrads,
        names: &[(String, bool)],
        members: &[usize],
        all_l2: Option<&MultiNorm>,
        outcome: &mut GroupOutcome,
    ) -> Result<()> {
        let member_names: Vec<&str> = members.iter().map(|&i| names[i].0.as_str()).collect();
        let mut tensors: Vec<Tensor> = member_names
            .iter()
            .filter_map(|n| grads.get(n).cloned())
            .collect();
        match group.rule {
            ClipRule::Unclipped => return Ok(()),
            ClipRule::Value { clip_value } => {
                outcome.clipped = clip_grad_value(&mut tensors, clip_value)?;
            }
            ClipRule::Norm {
                max_norm,
                norm_type,
                non_finite,
            } => {
                let total = match all_l2 {
                    Some(norms) if self.global_l2() => {
                        non_finite.check(NormType::L2, norms.total)?;
                        norms.total
                    }
                    _ => get_total_norm(&tensors, norm_type, non_finite)?.total,
                };
                let coefficient = clip_grads_with_norm(&mut tensors, max_norm, total)?;
                outcome.total_norm = Some(total);
                outcome.clipped = coefficient < 1.0 || coefficient.is_nan();
            }
            ClipRule::Adaptive { clip_factor, eps } => {
                // AGC needs the weights: run it on a view holding only this group.
                let exclude: Vec<String> = names
                    .iter()
                    .filter(|(n, _)| !member_names.contains(&n.as_str()))
                    .map(|(n, _)| n.clone())
                    .collect();
                let cfg = AgcConfig {
                    clip_factor,
                    eps,
                    exclude,
                };
                outcome.clipped = adaptive_clip(grads, &cfg)? > 0;
                return Ok(());
            }
        }
        for (name, t) in member_names.iter().zip(tensors) {
            grads.entry_mut(name)?.set_grad(t)?;
        }
        Ok(())
    }
}

//! Named views over a model's parameters and their gradients.
//!
//! candle's [`GradStore`] maps every tensor of the graph that received a gradient to that
//! gradient: trainable variables, but also intermediate results and any other leaf that required
//! a gradient (an input batch made a `Var` for an adversarial step, say). Norms and clipping must
//! see exactly the trainable parameters, as `model.parameters()` does in PyTorch. [`NamedVars`]
//! is that list, with names and a stable order; [`NamedVars::grads`] picks those variables'
//! gradients out of a store, and [`NamedGrads::write_back`] puts modified ones back.

use std::cmp::Ordering;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// A list of uniquely named variables in a fixed order.
#[derive(Debug, Clone, Default)]
pub struct NamedVars {
    names: Vec<String>,
    vars: Vec<Var>,
    order: VarOrder,
}

/// How a [`NamedVars`] list is ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum VarOrder {
    /// In the order given ([`NamedVars::new`], [`NamedVars::filter`] of such a list).
    #[default]
    Given,
    /// In the order the variables were created: network order for a model built layer by layer.
    Creation,
    /// In natural name order ([`natural_cmp`]): [`NamedVars::sorted`], or the fallback when the
    /// creation order cannot be read.
    Name,
}

/// PyTorch's buffer names: the last component of a variable's name that marks it as state, not
/// a parameter (`bn1.running_mean`; spectral normalisation's power-iteration vector
/// `fc.weight_u`).
pub const BUFFER_NAMES: [&str; 4] = [
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "weight_u",
];

/// Whether `name` names a buffer: its last dot-separated component is one of [`BUFFER_NAMES`].
///
/// ```
/// assert!(gradkit::core::is_buffer_name("layer.1.bn.running_var"));
/// assert!(!gradkit::core::is_buffer_name("layer.1.bn.weight"));
/// ```
pub fn is_buffer_name(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BUFFER_NAMES.contains(&last)
}

/// Whether `name` is a buffer among the variables `all`: [`is_buffer_name`], or spectral
/// normalisation's `X.weight_v` beside an `X.weight_orig` (weight normalisation's `weight_v`,
/// beside a `weight_g`, is a parameter: PyTorch uses the one name for both).
fn is_buffer_among(name: &str, all: &std::collections::HashSet<&str>) -> bool {
    is_buffer_name(name)
        || name
            .strip_suffix("weight_v")
            .is_some_and(|prefix| all.contains(format!("{prefix}weight_orig").as_str()))
}

/// The variable's creation index: candle numbers every tensor from one global counter
/// (`TensorId`), which it does not expose as a number, only through `Debug` (`TensorId(42)`).
/// candle is pinned exactly (0.11.1); a test pins the format.
fn creation_index(var: &Var) -> Option<usize> {
    let text = format!("{:?}", var.as_tensor().id());
    text.strip_prefix("TensorId(")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

impl NamedVars {
    /// The variables in the order given.
    ///
    /// # Errors
    /// [`Error::DuplicateName`] when two entries share a name.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use gradkit::core::NamedVars;
    /// let w = Var::zeros((2, 3), DType::F32, &Device::Cpu)?;
    /// let b = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let params = NamedVars::new([("fc.weight", w), ("fc.bias", b)])?;
    /// assert_eq!(params.names().collect::<Vec<_>>(), ["fc.weight", "fc.bias"]);
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn new<S: Into<String>>(entries: impl IntoIterator<Item = (S, Var)>) -> Result<Self> {
        let mut out = Self::default();
        for (name, var) in entries {
            let name = name.into();
            if out.names.contains(&name) {
                return Err(Error::DuplicateName { name });
            }
            out.names.push(name);
            out.vars.push(var);
        }
        Ok(out)
    }

    /// The trainable parameters of a [`VarMap`] (its floating-point variables that are not
    /// buffers, see [`is_buffer_name`]), in the order the model created them: network order for
    /// a model built the usual way, first layer first. Buffers (batch norm's running statistics
    /// and counter) have no gradient and must never be clipped, counted in a global norm or
    /// monitored as parameters, as PyTorch's `named_parameters` leaves them out; get them with
    /// [`NamedVars::buffers_of`]. Mark more variables as buffers with [`filter`](Self::filter).
    ///
    /// The creation order is candle's tensor id, which a global counter assigns; should it be
    /// unreadable, the order falls back to natural name order and [`order`](Self::order) says so.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use gradkit::core::{NamedVars, VarOrder};
    /// let map = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    /// candle_nn::linear(4, 4, vb.pp("encoder"))?;
    /// candle_nn::batch_norm(4, candle_nn::BatchNormConfig::default(), vb.pp("bn"))?;
    /// candle_nn::linear(4, 2, vb.pp("decoder"))?;
    /// let params = NamedVars::from_var_map(&map);
    /// assert_eq!(params.order(), VarOrder::Creation);
    /// assert_eq!(
    ///     params.names().collect::<Vec<_>>(),
    ///     ["encoder.weight", "encoder.bias", "bn.weight", "bn.bias", "decoder.weight", "decoder.bias"]
    /// );
    /// let buffers = NamedVars::buffers_of(&map);
    /// assert_eq!(buffers.names().collect::<Vec<_>>(), ["bn.running_mean", "bn.running_var"]);
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn from_var_map(map: &VarMap) -> Self {
        Self::of_var_map(map, |name, var, all| {
            var.dtype().is_float() && !is_buffer_among(name, all)
        })
    }

    /// The buffers of a [`VarMap`] (variables named as buffers, see [`is_buffer_name`], of any
    /// dtype), in creation order: what [`from_var_map`](Self::from_var_map) leaves out.
    pub fn buffers_of(map: &VarMap) -> Self {
        Self::of_var_map(map, |name, _, all| is_buffer_among(name, all))
    }

    fn of_var_map(
        map: &VarMap,
        keep: impl Fn(&str, &Var, &std::collections::HashSet<&str>) -> bool,
    ) -> Self {
        // A poisoned lock only means another thread panicked while holding it; the map itself
        // is still a valid set of variables.
        let data = map
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all: std::collections::HashSet<&str> = data.keys().map(String::as_str).collect();
        let mut entries: Vec<(&String, &Var)> =
            data.iter().filter(|(n, v)| keep(n, v, &all)).collect();
        let ids: Option<Vec<usize>> = entries.iter().map(|(_, v)| creation_index(v)).collect();
        let order = match ids {
            Some(ids) => {
                let mut keyed: Vec<(usize, (&String, &Var))> =
                    ids.into_iter().zip(entries).collect();
                keyed.sort_by_key(|(id, _)| *id);
                entries = keyed.into_iter().map(|(_, e)| e).collect();
                VarOrder::Creation
            }
            None => {
                entries.sort_by(|a, b| natural_cmp(a.0, b.0));
                VarOrder::Name
            }
        };
        Self {
            names: entries.iter().map(|(n, _)| (*n).clone()).collect(),
            vars: entries.into_iter().map(|(_, v)| v.clone()).collect(),
            order,
        }
    }

    /// How the list is ordered.
    pub fn order(&self) -> VarOrder {
        self.order
    }

    /// The same variables sorted in natural name order.
    pub fn sorted(self) -> Self {
        let mut pairs: Vec<(String, Var)> = self.names.into_iter().zip(self.vars).collect();
        pairs.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        let (names, vars) = pairs.into_iter().unzip();
        Self {
            names,
            vars,
            order: VarOrder::Name,
        }
    }

    /// The variables whose name satisfies `keep`, in the same order.
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> Self {
        let (names, vars) = self
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, v)| (n.to_owned(), v.clone()))
            .unzip();
        Self {
            names,
            vars,
            order: self.order,
        }
    }

    /// The number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The names, in order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// `(name, variable)` pairs, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Var)> {
        self.names.iter().map(String::as_str).zip(&self.vars)
    }

    /// The variable called `name`.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.vars[i])
    }

    /// The gradients of exactly these variables in `store`, in this list's order. A variable
    /// the loss does not depend on has no gradient (`None`), as `param.grad is None` in PyTorch.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a stored gradient's shape differs from its variable's.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use gradkit::core::NamedVars;
    /// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let unused = Var::zeros(3, DType::F32, &Device::Cpu)?;
    /// let params = NamedVars::new([("w", w.clone()), ("unused", unused)])?;
    /// let store = w.sqr()?.sum_all()?.backward()?;
    /// let grads = params.grads(&store)?;
    /// assert_eq!(grads.get("w").unwrap().to_vec1::<f32>()?, [2.0, 4.0]);
    /// assert!(grads.get("unused").is_none());
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn grads(&self, store: &GradStore) -> Result<NamedGrads> {
        let entries = self
            .iter()
            .map(|(name, var)| {
                let grad = store.get(var.as_tensor()).cloned();
                if let Some(g) = &grad {
                    check_shape(name, var, g)?;
                }
                Ok(NamedGrad {
                    name: name.to_owned(),
                    var: var.clone(),
                    grad,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NamedGrads { entries })
    }
}

fn check_shape(name: &str, var: &Var, grad: &Tensor) -> Result<()> {
    if grad.dims() == var.dims() {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op: "gradient of a variable",
            arg: name.to_owned(),
            expected: format!("{:?} (the variable's shape)", var.dims()),
            got: grad.dims().to_vec(),
        })
    }
}

/// One variable with its name and (possibly absent) gradient.
#[derive(Debug, Clone)]
pub struct NamedGrad {
    name: String,
    var: Var,
    grad: Option<Tensor>,
}

impl NamedGrad {
    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The variable.
    pub fn var(&self) -> &Var {
        &self.var
    }

    /// The gradient, if the loss depends on the variable.
    pub fn grad(&self) -> Option<&Tensor> {
        self.grad.as_ref()
    }

    /// The gradient, mutably, for in-place updates such as [`crate::scale_in_place`].
    pub fn grad_mut(&mut self) -> Option<&mut Tensor> {
        self.grad.as_mut()
    }

    /// Replaces the gradient.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `grad`'s shape differs from the variable's.
    pub fn set_grad(&mut self, grad: Tensor) -> Result<()> {
        check_shape(&self.name, &self.var, &grad)?;
        self.grad = Some(grad);
        Ok(())
    }
}

/// The gradients of a [`NamedVars`] list, in its order.
#[derive(Debug, Clone)]
pub struct NamedGrads {
    entries: Vec<NamedGrad>,
}

impl NamedGrads {
    /// The number of variables (with or without a gradient).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no variables.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &NamedGrad> {
        self.entries.iter()
    }

    /// Every entry, mutably, in order.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = &mut NamedGrad> {
        self.entries.iter_mut()
    }

    /// The gradient of the variable called `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.grad.as_ref())
    }

    /// The entry of the variable called `name`.
    ///
    /// # Errors
    /// [`Error::UnknownName`] when no variable has that name.
    pub fn entry_mut(&mut self, name: &str) -> Result<&mut NamedGrad> {
        self.entries
            .iter_mut()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::UnknownName {
                name: name.to_owned(),
            })
    }

    /// The gradients that exist, in order (cheap clones sharing storage).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.present().map(|(_, g)| g.clone()).collect()
    }

    /// `(name, gradient)` for the variables that have a gradient, in order.
    pub fn present(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries
            .iter()
            .filter_map(|e| e.grad.as_ref().map(|g| (e.name.as_str(), g)))
    }

    /// Runs `f` on the present gradients as one mutable slice (in order), then stores back what
    /// `f` left there. In-place CPU updates change the shared storage anyway; updates that
    /// produce new tensors (other devices) are kept this way.
    ///
    /// # Errors
    /// `f`'s error, or [`Error::ShapeMismatch`] when `f` changed a gradient's shape.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use gradkit::core::{NamedVars, scale_in_place};
    /// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let store = w.sqr()?.sum_all()?.backward()?;
    /// let mut grads = NamedVars::new([("w", w.clone())])?.grads(&store)?;
    /// grads.apply(|gs| gs.iter_mut().try_for_each(|g| scale_in_place(g, 0.5)))?;
    /// assert_eq!(grads.get("w").unwrap().to_vec1::<f32>()?, [1.0, 2.0]);
    /// # Ok::<(), gradkit::core::Error>(())
    /// ```
    pub fn apply<R, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&mut [Tensor]) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let present: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].grad.is_some())
            .collect();
        let mut tensors: Vec<Tensor> = present
            .iter()
            .filter_map(|&i| self.entries[i].grad.clone())
            .collect();
        let out = f(&mut tensors)?;
        for (i, t) in present.into_iter().zip(tensors) {
            self.entries[i].set_grad(t)?;
        }
        Ok(out)
    }

    /// Writes every gradient back into `store` under its variable.
    ///
    /// In-place CPU updates already changed the stored tensors; this matters after an update
    /// that produced new tensors (on another device, or after [`NamedGrad::set_grad`]).
    pub fn write_back(&self, store: &mut GradStore) {
        for e in &self.entries {
            if let Some(g) = &e.grad {
                store.insert(e.var.as_tensor(), g.clone());
            }
        }
    }
}

/// Compares two names in natural order: runs of ASCII digits compare by numeric value, so
/// `layer.2` sorts before `layer.10`; everything else compares byte-wise.
///
/// ```
/// use std::cmp::Ordering;
/// use gradkit::core::natural_cmp;
/// assert_eq!(natural_cmp("layer.2.weight", "layer.10.weight"), Ordering::Less);
/// assert_eq!(natural_cmp("a.bias", "a.weight"), Ordering::Less);
/// ```
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (trim_zeros(da), trim_zeros(db));
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| da.len().cmp(&db.len()));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b'0').count();
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_indices_are_readable_and_increase() {
        let a = Var::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let b = Var::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let (ia, ib) = (creation_index(&a).unwrap(), creation_index(&b).unwrap());
        assert!(ia < ib, "{ia} then {ib}");
    }

    #[test]
    fn natural_order_sorts_numbers_by_value() {
        let mut names = vec!["l.10.w", "l.2.w", "l.1.w", "l.02.w", "l.2.b", "k", "l"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["k", "l", "l.1.w", "l.2.b", "l.2.w", "l.02.w", "l.10.w"]
        );
    }
}

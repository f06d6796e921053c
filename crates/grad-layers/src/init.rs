//! Weight initialisation with PyTorch's formulas (`torch.nn.init`), drawing from grad-core's
//! seeded Philox generator.
//!
//! Whether gradients vanish or explode at step 0 is decided here: Glorot & Bengio (2010) keep the
//! variance of activations and gradients constant through linear/tanh layers (Xavier), He et al.
//! (2015) through ReLU-family layers (Kaiming, gain `sqrt(2 / (1 + a^2))`), Saxe et al. (2014)
//! with orthogonal matrices. Fans follow PyTorch's convention for `[out, in]` and
//! `[out, in, k...]` weights: `fan_in = in * prod(k)`, `fan_out = out * prod(k)`.

use std::str::FromStr;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarMap;
use grad_core::{NamedVars, Philox};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The nonlinearities `calculate_gain` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Nonlinearity {
    /// Identity (and the conv/conv-transpose layers): gain 1.
    Linear,
    /// Gain 1.
    Sigmoid,
    /// Gain 5/3.
    Tanh,
    /// Gain `sqrt(2)`.
    Relu,
    /// Gain `sqrt(2 / (1 + slope^2))`.
    LeakyRelu,
    /// Gain 3/4 (PyTorch's choice for self-normalising networks).
    Selu,
}

impl FromStr for Nonlinearity {
    type Err = Error;

    /// PyTorch's names: `linear`, `conv1d`, `conv2d`, `conv3d`, `conv_transpose1d`,
    /// `conv_transpose2d`, `conv_transpose3d`, `sigmoid`, `tanh`, `relu`, `leaky_relu`, `selu`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" | "conv1d" | "conv2d" | "conv3d" | "conv_transpose1d" | "conv_transpose2d"
            | "conv_transpose3d" => Self::Linear,
            "sigmoid" => Self::Sigmoid,
            "tanh" => Self::Tanh,
            "relu" => Self::Relu,
            "leaky_relu" => Self::LeakyRelu,
            "selu" => Self::Selu,
            other => return Err(Error::UnknownNonlinearity(other.to_owned())),
        })
    }
}

/// PyTorch's `calculate_gain(nonlinearity, param)`: the recommended scale of a layer's weights.
/// `param` is Leaky ReLU's negative slope (`None` means 0.01) and is ignored otherwise.
///
/// # Errors
/// [`Error::Core`] for a non-finite `param`.
///
/// ```
/// use gradkit::layers::init::{Nonlinearity, calculate_gain};
/// assert_eq!(calculate_gain(Nonlinearity::Relu, None)?, 2f64.sqrt());
/// assert_eq!(calculate_gain(Nonlinearity::Tanh, None)?, 5.0 / 3.0);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn calculate_gain(nonlinearity: Nonlinearity, param: Option<f64>) -> Result<f64> {
    Ok(match nonlinearity {
        Nonlinearity::Linear | Nonlinearity::Sigmoid => 1.0,
        Nonlinearity::Tanh => 5.0 / 3.0,
        Nonlinearity::Relu => 2f64.sqrt(),
        Nonlinearity::LeakyRelu => {
            let slope = param.unwrap_or(0.01);
            grad_core::validate::finite("negative_slope", slope)?;
            (2.0 / (1.0 + slope * slope)).sqrt()
        }
        Nonlinearity::Selu => 3.0 / 4.0,
    })
}

/// `(fan_in, fan_out)` of a weight shape, PyTorch's `_calculate_fan_in_and_fan_out`.
///
/// # Errors
/// [`Error::Core`] with a rank mismatch for fewer than 2 dims (PyTorch raises the same).
///
/// ```
/// assert_eq!(gradkit::layers::init::fans(&[64, 3, 7, 7])?, (147, 3136));
/// assert!(gradkit::layers::init::fans(&[10]).is_err());
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn fans(shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::rank(
            "init",
            "weight",
            "at least 2 (fan in and fan out need [out, in, ...])",
            shape.len(),
        ));
    }
    let receptive: usize = shape[2..].iter().product();
    Ok((shape[1] * receptive, shape[0] * receptive))
}

/// Which fan Kaiming initialisation preserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum FanMode {
    /// The variance of activations in the forward pass (PyTorch's default).
    #[default]
    FanIn,
    /// The variance of gradients in the backward pass.
    FanOut,
}

/// A weight initialisation rule: the arguments of PyTorch's `torch.nn.init` functions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Initializer {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// A constant.
    Constant {
        /// The value.
        value: f64,
    },
    /// `U[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// `N(mean, std^2)`.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// `U[-bound, bound]` with `bound = sqrt(3) * gain(nonlinearity, a) / sqrt(fan)`.
    KaimingUniform {
        /// Leaky ReLU's negative slope (used when `nonlinearity` is `LeakyRelu`; PyTorch's
        /// default 0 gives gain `sqrt 2`).
        a: f64,
        /// Which fan.
        mode: FanMode,
        /// The nonlinearity after the layer.
        nonlinearity: Nonlinearity,
    },
    /// `N(0, std^2)` with `std = gain(nonlinearity, a) / sqrt(fan)`.
    KaimingNormal {
        /// As for [`Initializer::KaimingUniform`].
        a: f64,
        /// Which fan.
        mode: FanMode,
        /// The nonlinearity after the layer.
        nonlinearity: Nonlinearity,
    },
    /// `U[-bound, bound]` with `bound = sqrt(3) * gain * sqrt(2 / (fan_in + fan_out))`.
    XavierUniform {
        /// The gain.
        gain: f64,
    },
    /// `N(0, std^2)` with `std = gain * sqrt(2 / (fan_in + fan_out))`.
    XavierNormal {
        /// The gain.
        gain: f64,
    },
    /// A (semi-)orthogonal matrix from the QR decomposition of a Gaussian one, times `gain`.
    Orthogonal {
        /// The gain.
        gain: f64,
    },
    /// PyTorch's default bias of `nn.Linear` and `nn.ConvNd`: `U[-1/sqrt(fan_in), 1/sqrt(fan_in))`
    /// with the fan-in of the layer's *weight* (`in_features`, or `in_channels / groups *
    /// prod(kernel)`). [`reinit`] finds that weight (the parameter named `weight` beside the
    /// bias); outside `reinit` use [`Initializer::fan_in_bias`] with the weight's shape.
    FanInBias,
    /// `N(mean, std^2)` truncated to `[a, b]` (inverse-CDF sampling, as PyTorch).
    TruncNormal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
        /// Lower cut.
        a: f64,
        /// Upper cut.
        b: f64,
    },
}

/// Kaiming's `std = gain(nonlinearity, a) / sqrt(fan)` for `shape`.
///
/// # Errors
/// As [`fans`] and [`calculate_gain`].
pub fn kaiming_std(
    shape: &[usize],
    a: f64,
    mode: FanMode,
    nonlinearity: Nonlinearity,
) -> Result<f64> {
    let (fan_in, fan_out) = fans(shape)?;
    let fan = match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    };
    let gain = calculate_gain(nonlinearity, Some(a))?;
    #[allow(clippy::cast_precision_loss, reason = "fans are far below 2^52")]
    Ok(gain / (fan as f64).sqrt())
}

/// Xavier's `std = gain * sqrt(2 / (fan_in + fan_out))` for `shape`.
///
/// # Errors
/// As [`fans`].
pub fn xavier_std(shape: &[usize], gain: f64) -> Result<f64> {
    let (fan_in, fan_out) = fans(shape)?;
    #[allow(clippy::cast_precision_loss, reason = "fans are far below 2^52")]
    Ok(gain * (2.0 / (fan_in + fan_out) as f64).sqrt())
}

impl Initializer {
    /// The bias rule of PyTorch's `nn.Linear`/`nn.ConvNd` for a layer whose weight has shape
    /// `weight_dims`: `U[-1/sqrt(fan_in), 1/sqrt(fan_in))` as an [`Initializer::Uniform`] (zeros
    /// when the fan-in is 0, as PyTorch leaves a bias of an empty layer alone).
    ///
    /// # Errors
    /// As [`fans`]: a weight of rank below 2.
    ///
    /// ```
    /// use gradkit::layers::init::Initializer;
    /// let rule = Initializer::fan_in_bias(&[16, 4, 3, 3])?; // a conv: fan-in 4 * 3 * 3 = 36
    /// assert_eq!(rule, Initializer::Uniform { lo: -1.0 / 6.0, hi: 1.0 / 6.0 });
    /// # Ok::<(), gradkit::layers::Error>(())
    /// ```
    pub fn fan_in_bias(weight_dims: &[usize]) -> Result<Self> {
        let (fan_in, _) = fans(weight_dims)?;
        if fan_in == 0 {
            return Ok(Self::Zeros);
        }
        #[allow(clippy::cast_precision_loss, reason = "fans are far below 2^52")]
        let bound = 1.0 / (fan_in as f64).sqrt();
        Ok(Self::Uniform {
            lo: -bound,
            hi: bound,
        })
    }

    /// Checks the rule's parameters.
    ///
    /// # Errors
    /// [`Error::Core`] naming the parameter: bounds not finite with `lo < hi` (`a < b`), a
    /// standard deviation or gain that is negative or not finite.
    pub fn validate(&self) -> Result<()> {
        use grad_core::validate::{finite, finite_ordered, non_negative, positive};
        match *self {
            Self::Zeros | Self::Ones | Self::FanInBias => {}
            Self::Constant { value } => finite("value", value)?,
            Self::Uniform { lo, hi } => finite_ordered(("lo", lo), ("hi", hi))?,
            Self::Normal { mean, std } => {
                finite("mean", mean)?;
                non_negative("std", std)?;
            }
            Self::KaimingUniform { a, .. } | Self::KaimingNormal { a, .. } => finite("a", a)?,
            Self::XavierUniform { gain }
            | Self::XavierNormal { gain }
            | Self::Orthogonal { gain } => non_negative("gain", gain)?,
            Self::TruncNormal { mean, std, a, b } => {
                finite("mean", mean)?;
                positive("std", std)?;
                finite_ordered(("a", a), ("b", b))?;
            }
        }
        Ok(())
    }

    /// Samples a tensor of `shape` following the rule.
    ///
    /// A zero-element shape gives an empty tensor for every rule, as PyTorch's initialisers
    /// leave zero-element tensors alone.
    ///
    /// # Errors
    /// [`Error::Core`] for invalid parameters or a rank below 2 for the fan-based and orthogonal
    /// rules; [`Error::Core`] for [`Initializer::FanInBias`], which needs its layer's weight
    /// (use [`reinit`] or [`Initializer::fan_in_bias`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use gradkit::core::Philox;
    /// use gradkit::layers::init::{FanMode, Initializer, Nonlinearity};
    /// let rule = Initializer::KaimingUniform { a: 0.0, mode: FanMode::FanIn, nonlinearity: Nonlinearity::Relu };
    /// let w = rule.sample((256, 128), DType::F32, &Device::Cpu, &mut Philox::new(0))?;
    /// let bound = (6.0f32 / 128.0).sqrt();
    /// assert!(w.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.abs() <= bound));
    /// # Ok::<(), gradkit::layers::Error>(())
    /// ```
    pub fn sample(
        &self,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
        rng: &mut Philox,
    ) -> Result<Tensor> {
        self.validate()?;
        let shape = shape.into();
        if shape.elem_count() == 0 {
            // PyTorch: "Initializing zero-element tensors is a no-op", whatever the rule.
            return Ok(Tensor::zeros(shape, dtype, device)?);
        }
        let dims = shape.dims().to_vec();
        let sqrt3 = 3f64.sqrt();
        let uniform = |rng: &mut Philox, bound: f64| -> Result<Tensor> {
            if bound == 0.0 {
                return Ok(Tensor::zeros(dims.as_slice(), dtype, device)?);
            }
            Ok(rng.uniform(dims.as_slice(), -bound, bound, dtype, device)?)
        };
        Ok(match *self {
            Self::Zeros => Tensor::zeros(shape, dtype, device)?,
            Self::Ones => Tensor::ones(shape, dtype, device)?,
            Self::Constant { value } => Tensor::full(value, shape, device)?.to_dtype(dtype)?,
            Self::Uniform { lo, hi } => rng.uniform(shape, lo, hi, dtype, device)?,
            Self::Normal { mean, std } => rng.normal(shape, mean, std, dtype, device)?,
            Self::KaimingUniform {
                a,
                mode,
                nonlinearity,
            } => uniform(rng, sqrt3 * kaiming_std(&dims, a, mode, nonlinearity)?)?,
            Self::KaimingNormal {
                a,
                mode,
                nonlinearity,
            } => rng.normal(
                shape,
                0.0,
                kaiming_std(&dims, a, mode, nonlinearity)?,
                dtype,
                device,
            )?,
            Self::XavierUniform { gain } => uniform(rng, sqrt3 * xavier_std(&dims, gain)?)?,
            Self::XavierNormal { gain } => {
                rng.normal(shape, 0.0, xavier_std(&dims, gain)?, dtype, device)?
            }
            Self::Orthogonal { gain } => orthogonal(&dims, gain, dtype, device, rng)?,
            Self::FanInBias => {
                return Err(Error::Core(grad_core::Error::shape_mismatch(
                    "Initializer::FanInBias",
                    "weight",
                    "the layer's weight, to take its fan-in from (use reinit, or Initializer::fan_in_bias(weight dims))",
                    &dims,
                )));
            }
            Self::TruncNormal { mean, std, a, b } => {
                trunc_normal(&dims, [mean, std, a, b], dtype, device, rng)?
            }
        })
    }

    /// Overwrites `var` with a sample of its shape and dtype.
    ///
    /// # Errors
    /// As [`sample`](Self::sample).
    pub fn init_var(&self, var: &Var, rng: &mut Philox) -> Result<()> {
        let t = self.sample(var.shape(), var.dtype(), var.device(), rng)?;
        Ok(var.set(&t)?)
    }
}

/// Re-initialises the parameters of `map` chosen by `rule` (name and shape in, rule or `None`
/// out), visiting them in natural name order so a seed gives the same weights every run,
/// however the model's code orders its layers. Buffers (running statistics) are never visited.
/// [`Initializer::FanInBias`] takes the fan-in of the `weight` beside the bias (`fc1.bias` →
/// `fc1.weight`), so PyTorch's default layer initialisation is two rules. Returns the names
/// re-initialised.
///
/// # Errors
/// [`Error::Reinit`] naming the parameter whose rule failed (the first one stops the pass), with
/// [`Initializer::sample`]'s error inside; for `FanInBias`, a bias with no `weight` beside it.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::core::Philox;
/// use gradkit::layers::init::{FanMode, Initializer, Nonlinearity, reinit};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// candle_nn::linear(8, 8, vb.pp("fc1"))?;
/// candle_nn::linear(8, 2, vb.pp("fc2"))?;
/// let kaiming = Initializer::KaimingNormal { a: 0.0, mode: FanMode::FanIn, nonlinearity: Nonlinearity::Relu };
/// let done = reinit(&map, &mut Philox::new(1), |name, _| {
///     if name.ends_with("weight") { Some(kaiming) } else { Some(Initializer::FanInBias) }
/// })?;
/// assert_eq!(done, ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]);
/// let b = map.data().lock().unwrap()["fc2.bias"].flatten_all()?.to_vec1::<f32>()?;
/// assert!(b.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt())); // fan-in 8
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn reinit(
    map: &VarMap,
    rng: &mut Philox,
    rule: impl Fn(&str, &[usize]) -> Option<Initializer>,
) -> Result<Vec<String>> {
    let params = NamedVars::from_var_map(map).sorted();
    let mut done = Vec::new();
    for (name, var) in params.iter() {
        let Some(init) = rule(name, var.dims()) else {
            continue;
        };
        let resolved = match init {
            Initializer::FanInBias => {
                let weight = match name.rsplit_once('.') {
                    Some((layer, _)) => format!("{layer}.weight"),
                    None => "weight".to_owned(),
                };
                params
                    .get(&weight)
                    .ok_or_else(|| {
                        Error::Core(grad_core::Error::UnknownName {
                            name: weight.clone(),
                        })
                    })
                    .and_then(|w| Initializer::fan_in_bias(w.dims()))
            }
            other => Ok(other),
        };
        resolved
            .and_then(|init| init.init_var(var, rng))
            .map_err(|source| Error::Reinit {
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        done.push(name.to_owned());
    }
    Ok(done)
}

/// A [`reinit`] rule zeroing the `weight` (and `bias`) of the last layer of each residual
/// branch, so every residual block starts as the identity: torchvision's `zero_init_residual`
/// (Goyal et al. 2017; it names each block's last batch norm, `layer1.0.bn3`). Other
/// parameters get `None`: chain with another rule by `or_else`.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::core::Philox;
/// use gradkit::layers::init::{reinit, zero_init_residual};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// candle_nn::linear(4, 4, vb.pp("block1.fc1"))?;
/// candle_nn::linear(4, 4, vb.pp("block1.fc2"))?;
/// let last = ["block1.fc2"];
/// let done = reinit(&map, &mut Philox::new(0), zero_init_residual(&last))?;
/// assert_eq!(done, ["block1.fc2.bias", "block1.fc2.weight"]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn zero_init_residual<'a>(
    last_layers: &'a [&'a str],
) -> impl Fn(&str, &[usize]) -> Option<Initializer> + 'a {
    move |name, _| {
        let (layer, param) = name.rsplit_once('.')?;
        (last_layers.contains(&layer) && matches!(param, "weight" | "bias"))
            .then_some(Initializer::Zeros)
    }
}

/// Sets the forget-gate bias of every candle-nn LSTM layer under `prefix` to `value`
/// (Jozefowicz et al. 2015: 1, so the cell remembers by default and gradients flow back
/// through time): in candle-nn's (and PyTorch's) layout the gates of `bias_ih_l{k}` and
/// `bias_hh_l{k}` (and their `_reverse`) are `[input, forget, cell, output]`, each of the
/// hidden size; the forget slice of `bias_ih` becomes `value` and that of `bias_hh` 0, so
/// their sum is `value`. Returns the names written.
///
/// # Errors
/// [`Error::Core`] for `value` not finite or a bias whose length is not a multiple of 4;
/// [`Error::Core`] ([`grad_core::Error::UnknownName`]) when `prefix` holds no LSTM bias.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// candle_nn::lstm(3, 2, Default::default(), vb.pp("rnn"))?;
/// gradkit::layers::init::lstm_forget_gate_bias(&map, "rnn", 1.0)?;
/// let b = map.data().lock().unwrap()["rnn.bias_ih_l0"].to_vec1::<f32>()?;
/// assert_eq!(b[2..4], [1.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn lstm_forget_gate_bias(map: &VarMap, prefix: &str, value: f64) -> Result<Vec<String>> {
    grad_core::validate::finite("value", value)?;
    let data = map
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let is_bias = |rest: &str, kind: &str| {
        rest.strip_prefix(kind).is_some_and(|layer| {
            let layer = layer.strip_suffix("_reverse").unwrap_or(layer);
            !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| {
            n.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| is_bias(r, "bias_ih_l") || is_bias(r, "bias_hh_l"))
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::Core(grad_core::Error::UnknownName {
            name: format!("{prefix}.bias_ih_l0 (no LSTM bias under {prefix:?})"),
        }));
    }
    for name in &names {
        let var = &data[*name];
        let n = var.elem_count();
        if !n.is_multiple_of(4) || var.rank() != 1 {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "lstm_forget_gate_bias",
                "bias",
                "[4 * hidden]".to_owned(),
                var.dims(),
            )));
        }
        let h = n / 4;
        let fill = if name.contains("bias_ih_l") {
            value
        } else {
            0.0
        };
        let gates = Tensor::cat(
            &[
                var.narrow(0, 0, h)?,
                Tensor::full(fill, h, var.device())?.to_dtype(var.dtype())?,
                var.narrow(0, 2 * h, 2 * h)?,
            ],
            0,
        )?;
        var.set(&gates)?;
    }
    Ok(names.into_iter().cloned().collect())
}

/// PyTorch's `orthogonal_`: QR of a Gaussian `[rows, prod(rest)]` matrix (transposed when wider
/// than tall), columns sign-corrected by `diag(R)`, times `gain`.
fn orthogonal(
    dims: &[usize],
    gain: f64,
    dtype: DType,
    device: &Device,
    rng: &mut Philox,
) -> Result<Tensor> {
    if dims.len() < 2 {
        return Err(Error::rank(
            "orthogonal",
            "weight",
            "at least 2",
            dims.len(),
        ));
    }
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    if rows == 0 || cols == 0 {
        return Ok(Tensor::zeros(dims, dtype, device)?);
    }
    let (m, n) = (rows.max(cols), rows.min(cols));
    // Column-major m x n Gaussian matrix.
    let a = rng
        .normal((n, m), 0.0, 1.0, DType::F64, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let q = householder_q(a, m, n);
    // q is column-major m x n; element (i, j) at q[j * m + i].
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let v = if rows >= cols {
                q[c * m + r]
            } else {
                q[r * m + c]
            };
            out[r * cols + c] = gain * v;
        }
    }
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// The `m x n` (m >= n) factor `Q` of a column-major matrix's QR decomposition, with columns
/// signed so that `R` has a non-negative diagonal (Householder reflections, Golub & Van Loan
/// algorithm 5.2.1).
fn householder_q(mut a: Vec<f64>, m: usize, n: usize) -> Vec<f64> {
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut signs = vec![1.0; n];
    for k in 0..n {
        let col = &a[k * m + k..k * m + m];
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        let alpha = if col[0] > 0.0 { -norm } else { norm };
        let mut v = col.to_vec();
        v[0] -= alpha;
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm > 0.0 {
            v.iter_mut().for_each(|x| *x /= vnorm);
            for j in k..n {
                let c = &mut a[j * m + k..j * m + m];
                let dot: f64 = v.iter().zip(c.iter()).map(|(x, y)| x * y).sum();
                c.iter_mut().zip(&v).for_each(|(y, x)| *y -= 2.0 * dot * x);
            }
        }
        // After the reflection R[k][k] = alpha (or the untouched value when v vanished).
        signs[k] = if a[k * m + k] < 0.0 { -1.0 } else { 1.0 };
        reflectors.push(v);
    }
    // Q = H_0 ... H_{n-1} I[:, :n], applied right to left.
    let mut q = vec![0.0; m * n];
    for j in 0..n {
        q[j * m + j] = 1.0;
    }
    for (k, v) in reflectors.iter().enumerate().rev() {
        for j in 0..n {
            let c = &mut q[j * m + k..j * m + m];
            let dot: f64 = v.iter().zip(c.iter()).map(|(x, y)| x * y).sum();
            c.iter_mut().zip(v).for_each(|(y, x)| *y -= 2.0 * dot * x);
        }
    }
    for (j, s) in signs.iter().enumerate() {
        q[j * m..(j + 1) * m].iter_mut().for_each(|x| *x *= s);
    }
    q
}

/// PyTorch's `trunc_normal_`: uniform in `[2 Phi(alpha) - 1, 2 Phi(beta) - 1]`, then
/// `erfinv`, scaled and shifted, clamped to `[a, b]`.
fn trunc_normal(
    dims: &[usize],
    [mean, std, a, b]: [f64; 4],
    dtype: DType,
    device: &Device,
    rng: &mut Philox,
) -> Result<Tensor> {
    let cdf = |x: f64| (1.0 + libm::erf(x / 2f64.sqrt())) / 2.0;
    let (l, u) = (cdf((a - mean) / std), cdf((b - mean) / std));
    let n: usize = dims.iter().product();
    let v = if l < u {
        rng.uniform(n, 2.0 * l - 1.0, 2.0 * u - 1.0, DType::F64, &Device::Cpu)?
            .to_vec1::<f64>()?
    } else {
        // The interval lies so far in a tail that both cdfs round to the same value.
        vec![2.0 * l - 1.0; n]
    };
    let out: Vec<f64> = v
        .into_iter()
        .map(|p| (erfinv(p) * std * 2f64.sqrt() + mean).clamp(a, b))
        .collect();
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// The inverse error function on `(-1, 1)`: Giles' (2010) approximation refined by two Newton
/// steps on libm's `erf`, accurate to a few ulps.
fn erfinv(p: f64) -> f64 {
    if p <= -1.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let w = -((1.0 - p) * (1.0 + p)).ln();
    let mut x = if w < 5.0 {
        let w = w - 2.5;
        let mut r = 2.810_226_36e-08;
        for c in [
            3.432_739_39e-07,
            -3.523_387_7e-06,
            -4.391_506_54e-06,
            0.000_218_580_87,
            -0.001_253_725_03,
            -0.004_177_681_64,
            0.246_640_727,
            1.501_409_41,
        ] {
            r = c + r * w;
        }
        r * p
    } else {
        let w = w.sqrt() - 3.0;
        let mut r = -0.000_200_214_257;
        for c in [
            0.000_100_950_558,
            0.001_349_343_22,
            -0.003_673_428_44,
            0.005_739_507_73,
            -0.007_622_461_3,
            0.009_438_870_47,
            1.001_674_06,
            2.832_976_82,
        ] {
            r = c + r * w;
        }
        r * p
    };
    let two_over_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
    for _ in 0..2 {
        let err = libm::erf(x) - p;
        x -= err / (two_over_sqrt_pi * (-x * x).exp());
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfinv_inverts_erf() {
        for p in [-0.999_999, -0.9, -0.3, 0.0, 1e-9, 0.5, 0.99, 0.999_999_9] {
            let x = erfinv(p);
            assert!((libm::erf(x) - p).abs() < 1e-15, "p {p}");
        }
    }

    #[test]
    fn householder_q_has_orthonormal_columns() {
        let (m, n) = (7, 4);
        let a: Vec<f64> = (0..m * n).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let q = householder_q(a, m, n);
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..m).map(|r| q[i * m + r] * q[j * m + r]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12);
            }
        }
    }
}
